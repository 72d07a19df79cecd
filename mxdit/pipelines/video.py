"""MP4 writing through imageio-ffmpeg (a real H.264 encoder), atomically."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _as_uint8_frames(frames) -> np.ndarray:
    try:
        import torch

        if isinstance(frames, torch.Tensor):
            frames = frames.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    frames = np.asarray(frames)
    if frames.ndim == 5 and frames.shape[0] == 1:
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.shape[0] < 1:
        raise ValueError("no frames to write")
    return np.ascontiguousarray(frames)


def write_mp4(frames, path: str | os.PathLike, fps: int = 16, *, crf: int = 18) -> Path:
    """Encode uint8 RGB frames ``[F, H, W, 3]`` to an H.264 MP4 (yuv420p) at ``path``.

    The file is written to a temporary name in the same directory and renamed into
    place, so ``path`` is either the complete video or untouched.  Odd sizes are
    padded to even ones by ffmpeg's scaler (yuv420p needs even dimensions).
    """
    import imageio_ffmpeg

    from mxdit.fsutil import atomic_file

    frames = _as_uint8_frames(frames)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = Path(path)
    _, h, w, _ = frames.shape
    with atomic_file(path, suffix=".tmp.mp4") as tmp:
        params = ["-crf", str(int(crf)), "-movflags", "+faststart"]
        if h % 2 or w % 2:
            params += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
        writer = imageio_ffmpeg.write_frames(
            tmp, (w, h), fps=float(fps), codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            macro_block_size=1, output_params=params, ffmpeg_log_level="error",
        )
        writer.send(None)  # start ffmpeg
        try:
            for frame in frames:
                writer.send(frame)
        finally:
            writer.close()
        if os.path.getsize(tmp) == 0:
            raise RuntimeError(f"ffmpeg wrote an empty file for {path}")
    return path


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video to uint8 ``[F, H, W, 3]`` (for tests and comparisons)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)
