"""`mxdit serve` against a real uvicorn on 127.0.0.1: the OpenAI SDK, plain HTTP, the job store."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from _tiny_wan import tiny_model_dir

from mxdit.cli import main

REQ = {"num_frames": 5, "num_inference_steps": 2, "seed": 7, "fps": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(base: str, proc=None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(2000):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise TimeoutError("server did not come up")


def _wait_done(base: str, vid: str, timeout: float = 60.0, headers=None) -> dict:
    deadline = time.monotonic() + timeout
    for _ in range(3000):
        obj = httpx.get(f"{base}/v1/videos/{vid}", timeout=5, headers=headers).json()
        if obj["status"] in ("completed", "failed") or time.monotonic() > deadline:
            return obj
        time.sleep(0.05)
    return obj


def _start(model, out, port, *extra):
    cmd = [sys.executable, "-m", "mxdit", "serve", "--model-path", str(model), "--dtype", "fp32", "--device", "cpu",
           "--port", str(port), "--output-path", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stop(proc, sig=signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def _frames(path):
    import imageio.v3 as iio

    return iio.imread(path, index=None)


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "t2v-a14b")


@pytest.fixture(scope="module")
def served(t2v, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-out")
    port = _free_port()
    proc = _start(t2v, out, port, "--dit-cpu-offload", "--vae-slicing")  # switches keep the frames identical
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_health(base, proc)
        yield base, out, proc
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def reference_frames(t2v, tmp_path_factory):
    """`mxdit generate` for the same request: what every server path must reproduce."""
    p = tmp_path_factory.mktemp("gen") / "ref.mp4"
    assert main(["generate", "--model-path", str(t2v), "--prompt", "a red fox", "--height", "32", "--width", "32",
                 "--num-frames", "5", "--num-inference-steps", "2", "--seed", "7", "--fps", "8", "--dtype", "fp32",
                 "--device", "cpu", "--output", str(p), "--no-progress"]) == 0
    return _frames(p)


def test_openai_sdk_gets_the_generate_video(served, reference_frames, tmp_path):
    from openai import OpenAI

    base, out, _ = served
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    v = client.videos.create(prompt="a red fox", size="32x32", extra_body=REQ)
    assert v.status in ("queued", "in_progress") and v.id.startswith("video_")
    deadline = time.monotonic() + 60
    for _ in range(3000):
        v = client.videos.retrieve(v.id)
        if v.status in ("completed", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert v.status == "completed", v.error
    assert v.progress == 100 and v.size == "32x32"
    dst = tmp_path / "sdk.mp4"
    client.videos.download_content(v.id).write_to_file(dst)
    np.testing.assert_array_equal(_frames(dst), reference_frames)
    perf = httpx.get(f"{base}/v1/videos/{v.id}/perf").json()
    assert len(perf["denoise_steps_ms"]) == 2 and perf["settings"]["seed"] == 7
    sw = perf["switches"]  # the server's switches, reported per job
    assert sw["dit_cpu_offload"] and sw["vae_slicing"] and not sw["dit_layerwise_offload"]
    assert [m["to_device"] for m in sw["expert_moves"]] == ["transformer_2"], sw  # one swap, at the boundary
    listed = client.videos.list()
    assert v.id in [x.id for x in listed.data]


def test_plain_http_json_and_multipart(served, reference_frames, tmp_path):
    base, _, _ = served
    ids = [httpx.post(f"{base}/v1/videos", json={"prompt": "a red fox", "width": 32, "height": 32, **REQ}).json()["id"],
           httpx.post(f"{base}/v1/videos", data={"prompt": "a red fox", "size": "32x32",
                                                 **{k: str(v) for k, v in REQ.items()}},
                      files={"unused": ("x.txt", b"x")}).json()["id"]]
    for vid in ids:
        assert _wait_done(base, vid)["status"] == "completed"
        r = httpx.get(f"{base}/v1/videos/{vid}/content")
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        (tmp_path / f"{vid}.mp4").write_bytes(r.content)
        np.testing.assert_array_equal(_frames(tmp_path / f"{vid}.mp4"), reference_frames)
    assert httpx.delete(f"{base}/v1/videos/{ids[0]}").json()["deleted"] is True
    assert httpx.get(f"{base}/v1/videos/{ids[0]}").status_code == 404


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "num_frames": 6}, "num_frames"),
    ({"prompt": "x", "size": "33x32"}, "width"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "  "}, "prompt"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
])
def test_bad_requests_name_the_field(served, body, field):
    base, _, _ = served
    r = httpx.post(f"{base}/v1/videos", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert field.split("_")[0] in r.json()["error"]["message"]


def test_unknown_and_hostile_ids_are_404(served):
    base, out, _ = served
    for vid in ("video_" + "0" * 32, "..%2F..%2Fetc%2Fpasswd", "jobs.sqlite"):
        for suffix in ("", "/content", "/perf"):
            assert httpx.get(f"{base}/v1/videos/{vid}{suffix}").status_code == 404
    m = httpx.get(f"{base}/v1/models").json()
    assert m["data"][0]["quantization"] == "none"


class _GatedEngine:
    """The real engine, held at a gate (to fill the queue) or made to raise (a failing job)."""

    def __init__(self, inner):
        self.inner, self.info, self.gate, self.fail = inner, inner.info, threading.Event(), False

    def generate(self, req, output, progress_cb=None):
        assert self.gate.wait(30)
        if self.fail:
            raise RuntimeError("out of memory (simulated)")
        return self.inner.generate(req, output, progress_cb)


def test_queue_full_failed_job_and_restart(t2v, tmp_path):
    import uvicorn

    from _tiny_wan import load_fp32
    from mxdit.serve.app import Server, create_app
    from mxdit.serve.engine import Engine
    from mxdit.serve.store import JobStore

    pipe = load_fp32(t2v)
    db = tmp_path / "jobs.sqlite"
    engine = _GatedEngine(Engine(pipe, pipe_info(t2v)))
    store = JobStore(str(db))
    srv = Server(engine, store, tmp_path, queue_size=1)
    srv.start()
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(srv), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=uv.run, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_health(base)
        body = {"prompt": "a red fox", "size": "32x32", **REQ}
        a = httpx.post(f"{base}/v1/videos", json=body).json()["id"]  # taken by the worker, held at the gate
        for _ in range(200):
            if httpx.get(f"{base}/v1/videos/{a}").json()["status"] == "in_progress":
                break
            time.sleep(0.02)
        b = httpx.post(f"{base}/v1/videos", json=body).json()["id"]  # fills the queue (size 1)
        r = httpx.post(f"{base}/v1/videos", json=body)
        assert r.status_code == 429
        assert httpx.get(f"{base}/v1/videos/{b}/content").status_code == 404  # not done yet
        engine.gate.set()
        assert _wait_done(base, a)["status"] == "completed"
        assert _wait_done(base, b)["status"] == "completed"
        engine.fail = True
        c = httpx.post(f"{base}/v1/videos", json=body).json()["id"]
        obj = _wait_done(base, c)
        assert obj["status"] == "failed" and "out of memory" in obj["error"]["message"]
        assert not (tmp_path / f"{c}.mp4").exists()
        engine.fail, engine.gate = False, threading.Event()
        d = httpx.post(f"{base}/v1/videos", json=body).json()["id"]  # held: "running" when the server dies
    finally:
        uv.should_exit = True
        th.join(30)
    # a crash: the store reopened without the worker having finished d
    store2 = JobStore(str(db))
    assert store2.get(a)["status"] == "completed" and store2.get(b)["status"] == "completed"
    assert store2.get(d)["status"] == "failed" and "interrupted" in store2.get(d)["error"]
    store2.close()
    engine.gate.set()
    srv.stop(30)
    store.close()


def pipe_info(model):
    from mxdit.pipelines.model_dir import inspect_model_dir

    return inspect_model_dir(model)


def test_restart_keeps_completed_and_kill_leaves_no_partial(t2v, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start(t2v, tmp_path, port)
    try:
        _wait_health(base, proc)
        done = httpx.post(f"{base}/v1/videos", json={"prompt": "a fox", "size": "32x32", **REQ}).json()["id"]
        assert _wait_done(base, done)["status"] == "completed"
        slow = httpx.post(f"{base}/v1/videos", json={"prompt": "a fox", "size": "64x64", "num_frames": 9,
                                                     "num_inference_steps": 400}).json()["id"]
        for _ in range(400):
            if httpx.get(f"{base}/v1/videos/{slow}").json()["status"] == "in_progress":
                break
            time.sleep(0.02)
    finally:
        _stop(proc, signal.SIGKILL)
    assert sorted(p.name for p in tmp_path.glob("*.mp4*")) == [f"{done}.mp4"]  # nothing partial
    proc = _start(t2v, tmp_path, port)
    try:
        _wait_health(base, proc)
        listed = {v["id"]: v for v in httpx.get(f"{base}/v1/videos").json()["data"]}
        assert listed[done]["status"] == "completed"
        assert listed[slow]["status"] == "failed" and "interrupted" in listed[slow]["error"]["message"]
        assert httpx.get(f"{base}/v1/videos/{done}/content").status_code == 200
    finally:
        assert _stop(proc) == 0  # SIGTERM: a clean exit


def test_non_loopback_needs_api_key(t2v, capsys):
    # refused before anything binds (192.0.2.0/24 is the RFC 5737 documentation range: never contacted)
    assert main(["serve", "--model-path", str(t2v), "--host", "192.0.2.10"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_api_key_guards_every_route_but_health(tmp_path):
    """With --api-key, a request needs `Authorization: Bearer KEY` (the OpenAI SDK's header); /health does not."""
    from fastapi.testclient import TestClient
    from openai import AuthenticationError, OpenAI

    from mxdit.serve.app import Server, create_app
    from mxdit.serve.store import JobStore

    srv = Server(object(), JobStore(str(tmp_path / "jobs.sqlite")), tmp_path, api_key="s3cret", quantization="mxfp8")
    http = TestClient(create_app(srv))
    assert http.get("/health").status_code == 200
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and "mxfp8" in ok.text
    assert http.get("/v1/videos/video_" + "0" * 32, headers={"Authorization": "Bearer s3cret"}).status_code == 404
    sdk = OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=http, max_retries=0)
    with pytest.raises(AuthenticationError):
        sdk.videos.list()


def test_engine_reports_progress_per_step(t2v, tmp_path):
    """A running job's progress comes from the pipeline's steps (3 steps: 33, 66, then 99 until written)."""
    from _tiny_wan import load_fp32
    from mxdit.serve.engine import Engine

    pipe = load_fp32(t2v)
    seen: list[int] = []
    req = dict(REQ, prompt="a red fox", height=32, width=32, num_inference_steps=3)
    Engine(pipe, pipe_info(t2v)).generate(req, tmp_path / "v.mp4", progress_cb=seen.append)
    assert seen == [33, 66, 99]
    assert (tmp_path / "v.mp4").stat().st_size > 0
