"""The FastAPI app: SGLang's / OpenAI's ``/v1/videos`` surface, a bounded queue and one worker thread."""
from __future__ import annotations

import json
import math
import queue
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from mxdit.pipelines.inputs import InputError, check_sampling_inputs
from mxdit.serve.store import ID_RE, JobStore, new_id

INT_FIELDS = ("width", "height", "num_frames", "fps", "seed", "num_inference_steps")
FLOAT_FIELDS = ("guidance_scale", "guidance_scale_2", "seconds")


def _err(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status)


class BadRequest(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Server:
    def __init__(self, engine: Any, store: JobStore, output_dir: Path, *, queue_size: int = 16,
                 api_key: str | None = None, model_name: str = "mxdit", quantization: str | None = None):
        self.engine, self.store, self.output_dir = engine, store, Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "uploads").mkdir(exist_ok=True)
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.api_key, self.model_name, self.quantization = api_key, model_name, quantization
        self.accepting = True
        self.worker = threading.Thread(target=self._work, name="mxdit-serve-worker", daemon=True)

    # ---- request parsing: the same checks as `mxdit generate` (mxdit.pipelines.inputs) ----
    def parse(self, raw: dict[str, Any], job_id: str, upload: tuple[str, bytes] | None) -> dict[str, Any]:
        info = self.engine.info
        req: dict[str, Any] = {}
        for k in INT_FIELDS + FLOAT_FIELDS:
            v = raw.get(k)
            if v is None or v == "":
                continue
            try:
                fv = float(v)
                if not math.isfinite(fv):
                    raise ValueError
                if k in INT_FIELDS:
                    if fv != int(fv):
                        raise ValueError
                    fv = int(fv)
            except (TypeError, ValueError):
                raise BadRequest(k, f"{k} must be {'an integer' if k in INT_FIELDS else 'a finite number'}, "
                                    f"got {v!r}") from None
            req[k] = fv
        for k in ("prompt", "negative_prompt"):
            if raw.get(k) is not None:
                if not isinstance(raw[k], str):
                    raise BadRequest(k, f"{k} must be a string")
                req[k] = raw[k]
        size = raw.get("size")
        if size:
            try:
                w, h = (int(x) for x in str(size).lower().split("x"))
            except ValueError:
                raise BadRequest("size", f"size must be 'WIDTHxHEIGHT' (e.g. '832x480'), got {size!r}") from None
            req.setdefault("width", w)
            req.setdefault("height", h)
        if upload is not None:
            name, data = upload
            ext = Path(name or "").suffix.lower()
            ext = ext if ext in (".png", ".jpg", ".jpeg", ".webp", ".bmp") else ".img"
            p = self.output_dir / "uploads" / f"{job_id}{ext}"
            p.write_bytes(data)
            req["image"] = str(p)
        fps = req.get("fps", info.defaults["fps"])
        if "seconds" in req and "num_frames" not in req:  # seconds -> the nearest valid frame count
            st = info.vae_scale_temporal
            req["num_frames"] = max(1, round(req["seconds"] * fps / st)) * st + 1
        try:
            req["fps"] = check_sampling_inputs(
                info, prompt=req.get("prompt"), num_frames=req.get("num_frames"), height=req.get("height"),
                width=req.get("width"), num_inference_steps=req.get("num_inference_steps"),
                guidance_scale=req.get("guidance_scale"), guidance_scale_2=req.get("guidance_scale_2"),
                image=req.get("image"), fps=req.get("fps"),
                name=lambda f: "input_reference" if f == "image" else f)
        except InputError as e:
            if "image" in req:
                Path(req["image"]).unlink(missing_ok=True)
            raise BadRequest("input_reference" if e.field == "image" else e.field, str(e)) from None
        d = info.defaults
        req.setdefault("seed", 42)
        req["num_frames"] = req.get("num_frames", d["num_frames"])
        req["height"], req["width"] = req.get("height", d["height"]), req.get("width", d["width"])
        check = getattr(self.engine, "check", None)  # the device layout's rules (multi-rank engines)
        if check is not None:
            try:
                check(req)
            except ValueError as e:
                if "image" in req:
                    Path(req["image"]).unlink(missing_ok=True)
                raise BadRequest("size", str(e)) from None
        return req

    # ---- the worker: one job at a time, in order ----
    def _work(self) -> None:
        while True:
            job_id = self.queue.get()
            if job_id is None:
                return
            job = self.store.get(job_id)
            if job is None or job["status"] != "queued":  # deleted while queued
                continue
            self.store.update(job_id, status="in_progress", progress=0)
            try:
                perf = self.engine.generate(
                    job["request"], self.video_path(job_id),
                    lambda p: self.store.update(job_id, progress=int(p)))
                self.store.update(job_id, status="completed", progress=100, completed_at=int(time.time()), perf=perf)
            except BaseException as e:  # a job that raises fails alone; the server keeps serving
                self.store.update(job_id, status="failed", error=f"{type(e).__name__}: {e}" if str(e)
                                  else type(e).__name__)
                self.video_path(job_id).unlink(missing_ok=True)
                if not isinstance(e, Exception):
                    raise

    def video_path(self, job_id: str) -> Path:
        assert ID_RE.match(job_id)
        return self.output_dir / f"{job_id}.mp4"

    def video_object(self, job: dict[str, Any]) -> dict[str, Any]:
        r = job["request"]
        obj = {
            "id": job["id"], "object": "video", "model": self.model_name, "status": job["status"],
            "progress": job["progress"], "created_at": job["created_at"], "completed_at": job["completed_at"],
            "expires_at": None, "prompt": r.get("prompt"), "size": f"{r['width']}x{r['height']}",
            "seconds": f"{r['num_frames'] / r['fps']:g}", "remixed_from_video_id": None, "error": None,
            "num_frames": r["num_frames"], "fps": r["fps"], "seed": r["seed"],
            "num_inference_steps": r.get("num_inference_steps"), "quantization": self.quantization,
        }
        if job["status"] == "failed":
            obj["error"] = {"code": "generation_failed", "message": job["error"]}
        if job["status"] == "completed":
            obj["file_path"] = str(self.video_path(job["id"]))
            obj["perf"] = job["perf"]
        return obj

    def start(self) -> None:
        self.worker.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let the running job finish, end the worker (queued jobs are marked failed on restart)."""
        self.accepting = False
        while True:  # drop queued jobs: they end failed, with a reason
            try:
                jid = self.queue.get_nowait()
            except queue.Empty:
                break
            if jid is not None:
                self.store.update(jid, status="failed", error="cancelled: the server was shut down")
        self.queue.put(None)
        self.worker.join(timeout)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="mxdit serve")

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if server.api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {server.api_key}":
                return _err(401, "missing or wrong API key (Authorization: Bearer ...)", type_="authentication_error")
        return await call_next(request)

    def job_or_404(video_id: str):
        if not ID_RE.match(video_id):
            return None, _err(404, f"no video {video_id!r}", "video_id")
        job = server.store.get(video_id)
        if job is None:
            return None, _err(404, f"no video {video_id!r}", "video_id")
        return job, None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "mxdit",
                                            "created": 0, "quantization": server.quantization}]}

    @app.post("/v1/videos")
    async def create(request: Request):
        if not server.accepting:
            return _err(503, "the server is shutting down", type_="server_error")
        job_id = new_id()
        upload = None
        ctype = request.headers.get("content-type", "")
        try:
            if ctype.startswith("multipart/") or ctype.startswith("application/x-www-form-urlencoded"):
                form = await request.form()
                raw: dict[str, Any] = {}
                for k, v in form.multi_items():
                    if hasattr(v, "read"):
                        if k == "input_reference":
                            upload = (v.filename, await v.read())
                    else:
                        raw[k] = v
            else:
                try:
                    raw = json.loads(await request.body() or b"{}")
                except ValueError as e:
                    raise BadRequest("body", f"the body is not JSON ({e})") from None
                if not isinstance(raw, dict):
                    raise BadRequest("body", "the body must be a JSON object")
                if isinstance(raw.get("input_reference"), (str, dict)):
                    raise BadRequest("input_reference", "input_reference must be an image file upload "
                                                        "(multipart/form-data)")
            req = server.parse(raw, job_id, upload)
        except BadRequest as e:
            return _err(400, str(e), e.field)
        server.store.add(job_id, req)
        try:
            server.queue.put_nowait(job_id)
        except queue.Full:
            server.store.delete(job_id)
            if "image" in req:
                Path(req["image"]).unlink(missing_ok=True)
            return _err(429, f"the queue is full ({server.queue.maxsize} jobs); retry later", type_="rate_limit_error")
        return server.video_object(server.store.get(job_id))

    @app.get("/v1/videos")
    async def list_videos(after: str | None = None, limit: int = 20, order: str = "desc"):
        if order not in ("asc", "desc"):
            return _err(400, "order must be 'asc' or 'desc'", "order")
        if not 1 <= limit <= 100:
            return _err(400, "limit must be in [1, 100]", "limit")
        jobs = server.store.list(after, limit + 1, order)
        data = [server.video_object(j) for j in jobs[:limit]]
        return {"object": "list", "data": data, "has_more": len(jobs) > limit,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @app.get("/v1/videos/{video_id}")
    async def retrieve(video_id: str):
        job, err = job_or_404(video_id)
        return err or server.video_object(job)

    @app.get("/v1/videos/{video_id}/perf")
    async def perf(video_id: str):
        job, err = job_or_404(video_id)
        if err:
            return err
        if job["perf"] is None:
            return _err(404, f"video {video_id} has no perf record (status {job['status']})", "video_id")
        return job["perf"]

    @app.get("/v1/videos/{video_id}/content")
    async def content(video_id: str, variant: str = "video"):
        job, err = job_or_404(video_id)
        if err:
            return err
        path = server.video_path(video_id)
        if job["status"] != "completed" or not path.is_file():
            return _err(404, f"video {video_id} is {job['status']}; no content yet", "video_id")
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete(video_id: str):
        job, err = job_or_404(video_id)
        if err:
            return err
        if job["status"] == "in_progress":
            return _err(409, f"video {video_id} is being generated; delete it when it is done", "video_id")
        server.store.delete(video_id)
        server.video_path(video_id).unlink(missing_ok=True)
        for p in (server.output_dir / "uploads").glob(f"{video_id}.*"):
            p.unlink(missing_ok=True)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    add_lora_routes(app, server)
    return app


#: bounds of a LoRA request: adapters per call, characters per nickname / path
MAX_LORAS, MAX_NICKNAME, MAX_PATH = 16, 128, 4096


def _lora_body(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BadRequest("body", "the body must be a JSON object")
    return raw


def _str_or_list(raw: dict, key: str, *, required: bool, nullable: bool, limit: int) -> Any:
    v = raw.get(key)
    if v is None:
        if required:
            raise BadRequest(key, f"{key} is required")
        return None
    items = v if isinstance(v, list) else [v]
    if not 1 <= len(items) <= MAX_LORAS:
        raise BadRequest(key, f"{key} must have 1 to {MAX_LORAS} items, got {len(items)}")
    for it in items:
        if it is None and nullable and isinstance(v, list):
            continue
        if not isinstance(it, str) or not it or len(it) > limit:
            raise BadRequest(key, f"{key} must be a non-empty string of at most {limit} characters"
                                  + (" (or a list of them)" if not isinstance(v, list) else ""))
    return v


def _strengths(raw: dict, key: str = "strength") -> Any:
    v = raw.get(key, 1.0)
    items = v if isinstance(v, list) else [v]
    if not 1 <= len(items) <= MAX_LORAS:
        raise BadRequest(key, f"{key} must have 1 to {MAX_LORAS} items")
    for it in items:
        if isinstance(it, bool) or not isinstance(it, (int, float)) or not math.isfinite(it) or abs(it) > 1e4:
            raise BadRequest(key, f"{key} must be a finite number in [-1e4, 1e4] (or a list of them), got {it!r}")
    return [float(x) for x in v] if isinstance(v, list) else float(v)


def add_lora_routes(app: FastAPI, server: Server) -> None:
    """SGLang's LoRA routes: /v1/set_lora, /v1/merge_lora_weights, /v1/unmerge_lora_weights, /v1/list_loras.
    A change waits for the running job and applies from the next job; 400 names the bad field."""

    def run(op: str, kwargs: dict[str, Any], field: str, message: str):
        lora = getattr(server.engine, "lora", None)
        if lora is None:
            return _err(501, "this engine has no LoRA support", type_="server_error")
        try:
            out = lora(op, kwargs)
        except TimeoutError as e:
            return _err(503, str(e), type_="server_error")
        except ValueError as e:
            return _err(400, str(e).splitlines()[0], field)
        return out if op == "list" else {"status": "ok", "message": message}

    async def body(request: Request) -> dict:
        try:
            return _lora_body(json.loads(await request.body() or b"{}"))
        except ValueError as e:
            raise BadRequest("body", f"the body is not JSON ({e})") from None

    @app.post("/v1/set_lora")
    async def set_lora(request: Request):
        try:
            raw = await body(request)
            nick = _str_or_list(raw, "lora_nickname", required=True, nullable=False, limit=MAX_NICKNAME)
            path = _str_or_list(raw, "lora_path", required=False, nullable=True, limit=MAX_PATH)
            target = _str_or_list(raw, "target", required=False, nullable=False, limit=32) or "all"
            strength = _strengths(raw)
            mode = raw.get("merge_mode")
            if mode not in (None, "auto", "merge", "dynamic"):
                raise BadRequest("merge_mode", f"merge_mode must be auto, merge or dynamic, got {mode!r}")
            if raw.get("lora_alpha") is not None:
                raise BadRequest("lora_alpha", "lora_alpha is not supported: alphas come from the LoRA file")
        except BadRequest as e:
            return _err(400, str(e), e.field)
        from starlette.concurrency import run_in_threadpool

        kw = dict(nickname=nick, path=path, target=target, strength=strength)
        resp = await run_in_threadpool(run, "set_lora", kw, "lora_path" if path is not None else "lora_nickname",
                                       f"Successfully set LoRA adapter(s): {nick} (target: {target}, strength: {strength})")
        if mode == "merge" and isinstance(resp, dict):
            resp = await run_in_threadpool(run, "merge", {"target": "all" if isinstance(target, list) else target},
                                           "merge_mode", f"Successfully set and merged LoRA adapter(s): {nick}")
        return resp

    @app.post("/v1/merge_lora_weights")
    async def merge(request: Request):
        try:
            raw = await body(request)
            target = raw.get("target", "all")
            if not isinstance(target, str):
                raise BadRequest("target", "target must be a string")
            strength = _strengths(raw)
            if isinstance(strength, list):
                raise BadRequest("strength", "strength must be a number")
        except BadRequest as e:
            return _err(400, str(e), e.field)
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(run, "merge", {"target": target, "strength": strength}, "target",
                                       f"Successfully merged LoRA weights (target: {target}, strength: {strength})")

    @app.post("/v1/unmerge_lora_weights")
    async def unmerge(request: Request):
        try:
            raw = await body(request)
            target = raw.get("target", "all")
            if not isinstance(target, str):
                raise BadRequest("target", "target must be a string")
        except BadRequest as e:
            return _err(400, str(e), e.field)
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(run, "unmerge", {"target": target}, "target",
                                       f"Successfully unmerged LoRA weights (target: {target})")

    @app.get("/v1/list_loras")
    async def list_loras():
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(run, "list", {}, "body", "")
