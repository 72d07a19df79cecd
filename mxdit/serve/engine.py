"""Generation behind one object: :class:`Engine` (one process). The HTTP layer only calls ``generate``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


class Engine:
    """Runs one validated request with the pipeline loaded at start and writes the MP4 atomically."""

    def __init__(self, pipe: Any, info: Any):
        self.pipe = pipe
        self.info = info

    def generate(self, req: dict[str, Any], output: Path, progress_cb: Callable[[int], None] | None = None) -> dict:
        from mxdit.pipelines.video import write_mp4
        from mxdit.pipelines.wan import check_finite_output

        out = self.pipe(
            req["prompt"], req.get("negative_prompt"), image=req.get("image"), height=req.get("height"),
            width=req.get("width"), num_frames=req.get("num_frames"),
            num_inference_steps=req.get("num_inference_steps"), guidance_scale=req.get("guidance_scale"),
            guidance_scale_2=req.get("guidance_scale_2"), seed=req.get("seed", 42), progress=False,
        )
        check_finite_output(out)  # a NaN run fails the job; no video
        write_mp4(out.frames, output, fps=req["fps"])  # temp file + rename: complete or absent
        perf = dict(out.perf)
        perf["fps"] = req["fps"]
        return perf

    def close(self) -> None:
        pass
