"""The one validator of a generation request's sampling inputs.

``mxdit generate`` and ``mxdit serve`` both call :func:`check_sampling_inputs`;
it checks the values against the model directory's configs (no weights are
loaded) and raises :class:`InputError`, which names the offending field. Each
caller chooses how a field is spelled in messages (``--num-frames`` for the
CLI, ``num_frames`` for the HTTP API) through ``name``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable


class InputError(ValueError):
    """A bad request input; ``field`` is the request field's name (snake_case)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_sampling_inputs(
    info: Any,  # ModelDirInfo
    *,
    prompt: str | None,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_scale_2: float | None = None,
    boundary_ratio: float | None = None,
    flow_shift: float | None = None,
    image: str | Path | None = None,
    fps: int | None = None,
    name: Callable[[str], str] = lambda f: f,
) -> int:
    """Raise :class:`InputError` on the first bad input; return the effective fps."""
    d = info.defaults
    if prompt is None or not str(prompt).strip():
        raise InputError("prompt", f"{name('prompt')} is empty")
    st = info.vae_scale_temporal
    if num_frames is not None and (num_frames < 1 or (num_frames - 1) % st):
        raise InputError("num_frames", f"{name('num_frames')} must be {st}n+1 (e.g. {d['num_frames']}), got {num_frames}")
    mh, mw = info.size_multiple
    for field, value, m in (("height", height, mh), ("width", width, mw)):
        if value is not None and (value <= 0 or value % m):
            raise InputError(field, 
                f"{name(field)} must be a positive multiple of {m} for {info.name} (VAE stride "
                f"{info.vae_scale_spatial} x patch {info.patch_size[1]}), got {value}")
    if num_inference_steps is not None and num_inference_steps < 1:
        raise InputError("num_inference_steps", f"{name('num_inference_steps')} must be >= 1, got {num_inference_steps}")
    for field, value in (("guidance_scale", guidance_scale), ("guidance_scale_2", guidance_scale_2)):
        if value is not None and not (value >= 0 and math.isfinite(value)):  # also rejects NaN / Inf
            raise InputError(field, f"{name(field)} must be a finite number >= 0, got {value}")
    two_experts = info.boundary_ratio is not None
    if guidance_scale_2 is not None and not two_experts:
        raise InputError("guidance_scale_2", f"{name('guidance_scale_2')} applies to two-expert (A14B) models; "
                                             f"{info.name} is {info.kind}")
    if boundary_ratio is not None:
        if not two_experts:
            raise InputError("boundary_ratio", f"{name('boundary_ratio')} applies to two-expert (A14B) models; "
                                               f"{info.name} is {info.kind}")
        if not 0.0 <= boundary_ratio <= 1.0:
            raise InputError("boundary_ratio", f"{name('boundary_ratio')} must be in [0, 1], got {boundary_ratio}")
    if flow_shift is not None and not (flow_shift > 0 and math.isfinite(flow_shift)):
        raise InputError("flow_shift", f"{name('flow_shift')} must be a finite number > 0, got {flow_shift}")
    cfg_shift = info.flow_shift  # the scheduler config's, used when no override is given
    if flow_shift is None and "flow_shift" in info.scheduler_config and (
            isinstance(cfg_shift, bool) or not isinstance(cfg_shift, (int, float)) or not math.isfinite(cfg_shift)
            or cfg_shift <= 0):
        raise InputError("flow_shift", f"{info.path}/scheduler/scheduler_config.json: flow_shift must be a finite "
                                       f"number > 0, got {cfg_shift!r}")
    if image is not None:
        if not info.accepts_image:
            raise InputError("image", f"{name('image')} given, but {info.name} is a text-to-video model ({info.kind})")
        img = Path(image)
        if not img.is_file():
            raise InputError("image", f"{name('image')} {image} does not exist")
        try:
            from PIL import Image

            with Image.open(img) as im:
                im.verify()
        except Exception as e:
            raise InputError("image", f"{name('image')} {image} is not a readable image ({e})") from None
    elif info.needs_image:
        raise InputError("image", f"{info.name} is an image-to-video model ({info.kind}); pass {name('image')}")
    fps = d["fps"] if fps is None else fps
    if fps < 1:
        raise InputError("fps", f"{name('fps')} must be >= 1, got {fps}")
    return fps
