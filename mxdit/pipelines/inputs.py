"""The one validator of a generation's settings.

:func:`check_sampling_inputs` is the only implementation; it is called by
:meth:`mxdit.pipelines.wan.WanVideoPipeline.check_inputs` (diffusers' name, run at
the start of every pipeline call), by ``mxdit generate`` and ``mxdit serve`` (before
any model loads: a :class:`~mxdit.pipelines.model_dir.ModelDirInfo` is read from the
model directory's JSON files only) and by ``mxdit quantize`` for its calibration
settings.  What it needs to know about the model is a :class:`WanModelSpec`, which a
model directory and a built pipeline both provide as ``.spec``.

It raises :class:`InputError` (a ``ValueError``), which names the offending field.
Each caller chooses how a field is spelled in messages (``--num-frames`` for the CLI,
``num_frames`` for the HTTP API and the pipeline, ``--calib-frames`` for quantize)
through ``name``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

#: model kinds (:func:`mxdit.models.wan.config.model_kind`) that condition on an image
IMAGE_KINDS = ("i2v-a14b", "i2v", "ti2v-5b")
#: ... and those that cannot run without one
IMAGE_REQUIRED_KINDS = ("i2v-a14b", "i2v")


class InputError(ValueError):
    """A bad request input; ``field`` is the request field's name (snake_case)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class WanModelSpec:
    """What validating a generation needs to know about a Wan model (no weights)."""

    name: str
    kind: str
    patch_size: tuple[int, int, int]
    vae_scale_spatial: int
    vae_scale_temporal: int
    two_experts: bool
    defaults: Mapping[str, Any]
    scheduler_config: Mapping[str, Any] = field(default_factory=dict)
    #: where ``scheduler_config`` came from (for messages)
    scheduler_config_name: str = "scheduler config"

    @property
    def size_multiple(self) -> tuple[int, int]:
        """(height, width) must be multiples of these: VAE spatial stride x patch size."""
        return self.vae_scale_spatial * self.patch_size[1], self.vae_scale_spatial * self.patch_size[2]

    @property
    def needs_image(self) -> bool:
        return self.kind in IMAGE_REQUIRED_KINDS

    @property
    def accepts_image(self) -> bool:
        return self.kind in IMAGE_KINDS


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _batch_size(prompt: Any, prompt_embeds: Any) -> int | None:
    if prompt is not None:
        return 1 if isinstance(prompt, str) else len(prompt)
    shape = getattr(prompt_embeds, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) else None


def check_sampling_inputs(
    model: Any,  # WanModelSpec, or an object with one as .spec (ModelDirInfo, WanVideoPipeline)
    *,
    prompt: str | list[str] | tuple[str, ...] | None,
    negative_prompt: str | list[str] | tuple[str, ...] | None = None,
    prompt_embeds: Any = None,
    negative_prompt_embeds: Any = None,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_scale_2: float | None = None,
    boundary_ratio: float | None = None,
    flow_shift: float | None = None,
    image: Any = None,
    fps: int | None = None,
    name: Callable[[str], str] = lambda f: f,
) -> int:
    """Raise :class:`InputError` on the first bad input; return the effective fps.

    ``None`` means "the model's default" (always valid).  ``image`` is a file path
    (it must be a readable image), a PIL image, a uint8 ``[H, W, 3]`` array or a tensor.
    """
    spec: WanModelSpec = model if isinstance(model, WanModelSpec) else model.spec
    d = spec.defaults

    # ---- prompts (diffusers' check_inputs: prompt xor prompt_embeds, matching negatives)
    if prompt is not None and prompt_embeds is not None:
        raise InputError("prompt", f"give {name('prompt')} or prompt_embeds, not both")
    if prompt is None and prompt_embeds is None:
        raise InputError("prompt", f"{name('prompt')} is empty")
    if prompt is not None:
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise InputError("prompt", f"{name('prompt')} is empty (an empty list)")
            for i, p in enumerate(prompt):
                if not isinstance(p, str):
                    raise InputError("prompt", f"{name('prompt')}[{i}] must be a string, got {type(p).__name__}")
                if not p.strip():
                    raise InputError("prompt", f"{name('prompt')}[{i}] is empty")
        elif not isinstance(prompt, str):
            raise InputError("prompt", f"{name('prompt')} must be a string or a list of strings, "
                                       f"got {type(prompt).__name__}")
        elif not prompt.strip():
            raise InputError("prompt", f"{name('prompt')} is empty")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise InputError("negative_prompt", f"give {name('negative_prompt')} or negative_prompt_embeds, not both")
    if negative_prompt is not None:
        if isinstance(negative_prompt, (list, tuple)):
            if any(not isinstance(p, str) for p in negative_prompt):
                raise InputError("negative_prompt", f"{name('negative_prompt')} must hold strings only")
            batch = _batch_size(prompt, prompt_embeds)
            if batch is not None and len(negative_prompt) != batch:
                raise InputError("negative_prompt", f"{name('negative_prompt')} has {len(negative_prompt)} "
                                                    f"entries for {batch} prompts")
        elif not isinstance(negative_prompt, str):
            raise InputError("negative_prompt", f"{name('negative_prompt')} must be a string or a list of "
                                                f"strings, got {type(negative_prompt).__name__}")

    # ---- sizes and counts
    st = spec.vae_scale_temporal
    if num_frames is not None and (not _is_int(num_frames) or num_frames < 1 or (num_frames - 1) % st):
        raise InputError("num_frames", f"{name('num_frames')} must be {st}n+1 (e.g. {d['num_frames']}), "
                                       f"got {num_frames}")
    mh, mw = spec.size_multiple
    for fld, value, m in (("height", height, mh), ("width", width, mw)):
        if value is not None and (not _is_int(value) or value <= 0 or value % m):
            raise InputError(fld,
                f"{name(fld)} must be a positive multiple of {m} for {spec.name} (height x width multiples of "
                f"{mh}x{mw}: VAE stride {spec.vae_scale_spatial} x patch {spec.patch_size[1]}), got {value}")
    if num_inference_steps is not None and (not _is_int(num_inference_steps) or num_inference_steps < 1):
        raise InputError("num_inference_steps", f"{name('num_inference_steps')} must be >= 1, got {num_inference_steps}")

    # ---- guidance and the expert switch
    for fld, value in (("guidance_scale", guidance_scale), ("guidance_scale_2", guidance_scale_2)):
        if value is not None and not (_is_number(value) and value >= 0 and math.isfinite(value)):
            raise InputError(fld, f"{name(fld)} must be a finite number >= 0, got {value}")
    if guidance_scale_2 is not None and not spec.two_experts:
        raise InputError("guidance_scale_2", f"{name('guidance_scale_2')} applies to two-expert (A14B) models; "
                                             f"{spec.name} is {spec.kind}")
    if boundary_ratio is not None:
        if not spec.two_experts:
            raise InputError("boundary_ratio", f"{name('boundary_ratio')} applies to two-expert (A14B) models; "
                                               f"{spec.name} is {spec.kind}")
        if not (_is_number(boundary_ratio) and 0.0 <= boundary_ratio <= 1.0):  # also rejects NaN
            raise InputError("boundary_ratio", f"{name('boundary_ratio')} must be in [0, 1], got {boundary_ratio}")
    if flow_shift is not None and not (_is_number(flow_shift) and flow_shift > 0 and math.isfinite(flow_shift)):
        raise InputError("flow_shift", f"{name('flow_shift')} must be a finite number > 0, got {flow_shift}")
    cfg_shift = spec.scheduler_config.get("flow_shift")  # the scheduler's, used when no override is given
    if flow_shift is None and "flow_shift" in spec.scheduler_config and (
            not _is_number(cfg_shift) or not math.isfinite(cfg_shift) or cfg_shift <= 0):
        raise InputError("flow_shift", f"{spec.scheduler_config_name}: flow_shift must be a finite "
                                       f"number > 0, got {cfg_shift!r}")

    # ---- the conditioning image
    if image is not None:
        if not spec.accepts_image:
            raise InputError("image", f"{name('image')} given, but {spec.name} is a text-to-video model "
                                      f"({spec.kind}); it takes no image")
        _check_image(image, name)
    elif spec.needs_image:
        raise InputError("image", f"{spec.name} is an image-to-video model ({spec.kind}): an image is required; "
                                  f"pass {name('image')}")

    fps = d["fps"] if fps is None else fps
    if not _is_int(fps) or fps < 1:
        raise InputError("fps", f"{name('fps')} must be >= 1, got {fps}")
    return int(fps)


def _check_image(image: Any, name: Callable[[str], str]) -> None:
    if isinstance(image, (str, Path)):
        img = Path(image)
        if not img.is_file():
            raise InputError("image", f"{name('image')} {image} does not exist")
        try:
            from PIL import Image

            with Image.open(img) as im:
                im.verify()
        except Exception as e:
            raise InputError("image", f"{name('image')} {image} is not a readable image ({e})") from None
        return
    shape = getattr(image, "shape", None)
    if type(image).__module__.startswith("numpy"):
        if len(shape) != 3 or shape[-1] != 3:
            raise InputError("image", f"{name('image')} array must be [H, W, 3], got shape {tuple(shape)}")
        if str(image.dtype) != "uint8":
            raise InputError("image", f"{name('image')} array must be uint8, got {image.dtype}")
        return
    if type(image).__module__.startswith(("torch", "PIL")):
        return
    raise InputError("image", f"{name('image')} must be a file path, a PIL image, a uint8 [H, W, 3] array or a "
                              f"tensor, got {type(image).__name__}")
