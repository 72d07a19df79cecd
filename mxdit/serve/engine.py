"""Generation behind one object: :class:`Engine` (one process) and :class:`DistributedEngine` (rank 0 of N).

The HTTP layer only calls ``generate`` (from its single worker thread) and, where the engine has one,
``check`` (request validation that depends on the device layout, before a job is queued).

Multi-rank serving (``mxdit serve --num-gpus N``): every rank loads the same pipeline; rank 0 runs the
HTTP server, and its :class:`DistributedEngine` hands each job to the other ranks with
``broadcast_object`` on a separate gloo *control group* before running the pipeline itself; the other
ranks sit in :func:`serve_peer` and run the same pipeline call on the same inputs (the SP / CFG
collectives inside it use the default group and its ``--dist-timeout``).  The control group has no
practical timeout, so an idle server's peers wait for the next job indefinitely.  A stop message
(``None``) from rank 0 ends every peer's loop.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Callable, Optional

#: how long peers wait on the control group for the next job (an idle server must not time them out)
CONTROL_TIMEOUT = datetime.timedelta(days=365)


def run_pipeline(pipe: Any, req: dict[str, Any], progress_cb: Callable[[int], None] | None = None) -> Any:
    """The one pipeline call of a validated request (the same on every rank); ``progress_cb`` gets
    the percentage of denoising steps done (at most 99: 100 means the video is written)."""
    step_callback = None if progress_cb is None else (lambda i, n: progress_cb(min(99, 100 * i // n)))
    return pipe(
        req["prompt"], req.get("negative_prompt"), image=req.get("image"), height=req.get("height"),
        width=req.get("width"), num_frames=req.get("num_frames"),
        num_inference_steps=req.get("num_inference_steps"), guidance_scale=req.get("guidance_scale"),
        guidance_scale_2=req.get("guidance_scale_2"), seed=req.get("seed", 42), progress=False,
        step_callback=step_callback,
    )


def apply_lora_op(pipe: Any, op: str, kwargs: dict[str, Any]) -> Any:
    """One LoRA operation on a pipeline (the same on every rank); creates its PipelineLoRA on first use."""
    from mxdit.loader.lora import PipelineLoRA

    if getattr(pipe, "lora", None) is None:
        pipe.lora = PipelineLoRA({"transformer": pipe.transformer,
                                  "transformer_2": pipe.transformer_2 if pipe.boundary_ratio is not None else None})
    if op == "set_lora":
        return pipe.lora.set_lora(**kwargs)
    if op == "merge":
        return pipe.lora.merge(**kwargs)
    if op == "unmerge":
        return pipe.lora.unmerge(**kwargs)
    if op == "list":
        return pipe.lora.list()
    raise ValueError(f"unknown LoRA operation {op!r}")


class Engine:
    """Runs one validated request with the pipeline loaded at start and writes the MP4 atomically."""

    def __init__(self, pipe: Any, info: Any):
        import threading

        self.pipe = pipe
        self.info = info
        self.lock = threading.Lock()  # a LoRA switch waits for the running job: it applies from the next one

    def _pipeline(self, req: dict[str, Any], progress_cb: Callable[[int], None] | None = None) -> Any:
        return run_pipeline(self.pipe, req, progress_cb)

    def lora(self, op: str, kwargs: dict[str, Any], timeout: float = 3600.0) -> Any:
        """SGLang's LoRA operations between jobs (``set_lora``, ``merge``, ``unmerge``, ``list``);
        a bad request raises ``ValueError`` (mxdit.loader.lora.LoRAError) and changes nothing."""
        if not self.lock.acquire(timeout=timeout):
            raise TimeoutError("the running job did not finish in time; retry the LoRA request")
        try:
            return self._lora(op, kwargs)
        finally:
            self.lock.release()

    def _lora(self, op: str, kwargs: dict[str, Any]) -> Any:
        return apply_lora_op(self.pipe, op, kwargs)

    def generate(self, req: dict[str, Any], output: Path, progress_cb: Callable[[int], None] | None = None) -> dict:
        from mxdit.pipelines.video import write_mp4
        from mxdit.pipelines.wan import check_finite_output

        with self.lock:
            out = self._pipeline(req, progress_cb)
        check_finite_output(out)  # a NaN run fails the job; no video (every rank computed the same latents)
        write_mp4(out.frames, output, fps=req["fps"])  # temp file + rename: complete or absent
        perf = dict(out.perf)
        perf["fps"] = req["fps"]
        return perf

    def close(self) -> None:
        pass


def control_group() -> Any:
    """The gloo group that carries jobs from rank 0 to the peers (collective: every rank calls it once)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


class DistributedEngine(Engine):
    """Rank 0's engine: broadcast each job to the peers, then run it here; only rank 0 writes the MP4.

    Failures: a ``ValueError`` from the pipeline is an input problem that every rank meets the
    same way on the same inputs (before any collective), so the job fails and all ranks stay in
    step.  Any other exception inside the pipeline (out of memory on one rank, a collective that
    timed out) may leave the ranks out of step: the job fails, the engine is marked ``broken``,
    ``on_broken`` is called (the server then shuts down) and :meth:`close` sends no stop message
    (the peers end when their collective fails or times out, within ``--dist-timeout``).
    """

    def __init__(self, pipe: Any, info: Any, group: Any, *, check: Optional[Callable[[dict], None]] = None,
                 on_broken: Optional[Callable[[], None]] = None):
        super().__init__(pipe, info)
        self.group, self._check, self.on_broken = group, check, on_broken
        self.broken = False
        self.closed = False

    def check(self, req: dict[str, Any]) -> None:
        """Layout-dependent validation (e.g. tokens divisible by the SP degree); raises ValueError."""
        if self._check is not None:
            self._check(req)

    def _pipeline(self, req: dict[str, Any], progress_cb: Callable[[int], None] | None = None) -> Any:
        from mxdit.distributed import broadcast_object

        if self.broken:
            raise RuntimeError("the ranks are out of step after an earlier failure; the server is shutting down")
        job = dict(req)
        if job.get("image") is not None:  # decoded here (as the pipeline would): other hosts cannot read uploads/
            from mxdit.pipelines.wan import _load_image

            job["image"] = _load_image(job["image"])
        broadcast_object({"job": job}, group=self.group)
        try:
            return run_pipeline(self.pipe, job, progress_cb)
        except ValueError:
            raise  # the same on every rank
        except BaseException:
            self.broken = True
            if self.on_broken is not None:
                self.on_broken()
            raise

    def _lora(self, op: str, kwargs: dict[str, Any]) -> Any:
        from mxdit.distributed import broadcast_object

        if self.broken:
            raise RuntimeError("the ranks are out of step after an earlier failure; the server is shutting down")
        if op != "list":
            broadcast_object({"lora": (op, kwargs)}, group=self.group)  # every rank applies the same change
        return apply_lora_op(self.pipe, op, kwargs)

    def close(self) -> None:
        """Tell the peers to stop (once; not after a failure that left them out of step)."""
        from mxdit.distributed import broadcast_object

        if self.closed or self.broken:
            return
        self.closed = True
        try:
            broadcast_object(None, group=self.group)
        except Exception:  # the peers are gone already (e.g. torchrun stopped every worker): nothing to stop
            pass


def serve_peer(pipe: Any, group: Any) -> int:
    """A peer rank's loop: run every job rank 0 broadcasts, until the stop message (``None``)."""
    from mxdit.distributed import broadcast_object

    while True:
        msg = broadcast_object(None, group=group)
        if msg is None:
            return 0
        try:
            if "lora" in msg:
                apply_lora_op(pipe, *msg["lora"])
            else:
                run_pipeline(pipe, msg["job"])
        except ValueError:
            continue  # rank 0 met the same input error; its job failed, we stay in step
