"""``mxdit generate``: text/image-to-video with a diffusers-layout Wan2.2 model.

Flag names follow SGLang-Diffusion's ``sglang generate`` where it has them.
Every input is checked against the model's config files *before* any weights
are loaded; a bad one ends the command with one line on stderr and status 2.
The MP4 (H.264 via imageio-ffmpeg) and the perf JSON are written atomically.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mxdit.cli import UsageError, available_quant_methods, finite_float

DTYPES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-path", required=True, help="diffusers-layout Wan2.2 model directory")
    g.add_argument("--quantization", default=None,
                   help=f"quantize both experts online (one of: {', '.join(available_quant_methods())})")
    g.add_argument("--transformer-weights-path", default=None,
                   help="weights replacing transformer/ (the high-noise expert only, as SGLang)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N, npu (default: the first accelerator, else cpu)")
    g.add_argument("--dtype", default="bf16", help="transformer/text-encoder dtype: bf16 (default), fp16, fp32")
    g.add_argument("--flow-shift", type=finite_float, default=None, help="override the scheduler config's flow_shift")

    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--image", "--image-path", dest="image", default=None,
                   help="conditioning image (I2V-A14B: required; TI2V-5B: optional; T2V: not allowed)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num-frames", type=int, default=None, help="4n+1 (default: the model's, e.g. 81)")
    g.add_argument("--num-inference-steps", type=int, default=None)
    g.add_argument("--guidance-scale", type=finite_float, default=None, help="CFG scale (A14B: the high-noise expert)")
    g.add_argument("--guidance-scale-2", type=finite_float, default=None, help="A14B: CFG scale of the low-noise expert")
    g.add_argument("--boundary-ratio", type=finite_float, default=None, help="A14B: expert switch point, in [0, 1]")
    g.add_argument("--seed", type=int, default=42)

    g = p.add_argument_group("output")
    g.add_argument("--output", "--output-file-path", dest="output", default="output.mp4", help="MP4 file to write")
    g.add_argument("--fps", type=int, default=None, help="frames per second (default: the model's, 16 or 24)")
    g.add_argument("--perf-dump-path", default=None, help="write the performance JSON here")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class GenerateRequest:
    info: Any  # ModelDirInfo
    device: str
    dtype: Any  # torch.dtype
    output: Path
    perf_path: Path | None
    fps: int


def _resolve_device(name: str | None) -> str:
    import torch

    if name is not None and name.startswith("npu"):
        from mxdit.kernels.npu import check_npu_available

        try:  # imports torch_npu, which registers the "npu" device type with torch
            check_npu_available()
        except (ImportError, RuntimeError) as e:
            raise UsageError(f"--device {name}: {e}") from None
    if name is None:
        from mxdit.kernels import default_device

        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {name!r} is not a device ({e})") from None
    if dev.type == "cpu":
        return str(dev)
    mod = getattr(torch, dev.type, None)
    if mod is None or not hasattr(mod, "is_available") or not mod.is_available():
        raise UsageError(f"--device {name}: no {dev.type} device is available on this machine")
    if dev.index is not None and hasattr(mod, "device_count") and dev.index >= mod.device_count():
        raise UsageError(f"--device {name}: only {mod.device_count()} {dev.type} device(s) present")
    return str(dev)


def _check_output_path(flag: str, value: str, suffix: str | None = None) -> Path:
    path = Path(value).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {value} is a directory")
    if suffix and path.suffix.lower() != suffix:
        raise UsageError(f"{flag} {value} must end in {suffix}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {value}: directory {parent} is not writable")
    return path


def validate(args: argparse.Namespace) -> GenerateRequest:
    """Check every input against the model's configs; raise :class:`UsageError`. Loads no weights."""
    from mxdit.pipelines.model_dir import ModelDirError, inspect_model_dir

    try:
        info = inspect_model_dir(args.model_path)
    except ModelDirError as e:
        raise UsageError(f"--model-path: {e}") from None
    d = info.defaults

    if args.quantization is not None:
        methods = available_quant_methods()
        if args.quantization not in methods:
            raise UsageError(f"unknown --quantization {args.quantization!r} (choose from: {', '.join(methods)})")
    if args.transformer_weights_path is not None and not Path(args.transformer_weights_path).exists():
        raise UsageError(f"--transformer-weights-path {args.transformer_weights_path} does not exist")
    if args.quantization == "modelslim":  # needs a description next to each expert's weights
        from mxdit.quant.modelslim import DESCRIPTION_FILE, DESCRIPTION_GLOB

        dirs = [Path(args.transformer_weights_path) if args.transformer_weights_path else info.path / "transformer"]
        if info.boundary_ratio is not None:
            dirs.append(info.path / "transformer_2")
        for d_ in dirs:
            if d_.is_dir() and not (d_ / DESCRIPTION_FILE).is_file() and not list(d_.glob(DESCRIPTION_GLOB)):
                raise UsageError(f"--quantization modelslim: {d_} has no {DESCRIPTION_FILE} or {DESCRIPTION_GLOB} "
                                 "(an msmodelslim export goes through 'mxdit repack' first)")
    if args.dtype.lower() not in DTYPES:
        raise UsageError(f"unknown --dtype {args.dtype!r} (choose from: bf16, fp16, fp32)")
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")

    st = info.vae_scale_temporal
    if args.num_frames is not None and (args.num_frames < 1 or (args.num_frames - 1) % st):
        raise UsageError(f"--num-frames must be {st}n+1 (e.g. {d['num_frames']}), got {args.num_frames}")
    mh, mw = info.size_multiple
    for flag, value, m in (("--height", args.height, mh), ("--width", args.width, mw)):
        if value is not None and (value <= 0 or value % m):
            raise UsageError(
                f"{flag} must be a positive multiple of {m} for {info.name} (VAE stride {info.vae_scale_spatial} "
                f"x patch {info.patch_size[1]}), got {value}"
            )
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        raise UsageError(f"--num-inference-steps must be >= 1, got {args.num_inference_steps}")
    for flag, value in (("--guidance-scale", args.guidance_scale), ("--guidance-scale-2", args.guidance_scale_2)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    two_experts = info.boundary_ratio is not None
    if args.guidance_scale_2 is not None and not two_experts:
        raise UsageError(f"--guidance-scale-2 applies to two-expert (A14B) models; {info.name} is {info.kind}")
    if args.boundary_ratio is not None:
        if not two_experts:
            raise UsageError(f"--boundary-ratio applies to two-expert (A14B) models; {info.name} is {info.kind}")
        if not 0.0 <= args.boundary_ratio <= 1.0:
            raise UsageError(f"--boundary-ratio must be in [0, 1], got {args.boundary_ratio}")
    if args.flow_shift is not None and args.flow_shift <= 0:
        raise UsageError(f"--flow-shift must be > 0, got {args.flow_shift}")
    cfg_shift = info.flow_shift
    if args.flow_shift is None and "flow_shift" in info.scheduler_config and (
            isinstance(cfg_shift, bool) or not isinstance(cfg_shift, (int, float)) or not math.isfinite(cfg_shift) or cfg_shift <= 0):
        raise UsageError(f"{info.path}/scheduler/scheduler_config.json: flow_shift must be a finite number > 0, got {cfg_shift!r}")

    if args.image is not None:
        if not info.accepts_image:
            raise UsageError(f"--image given, but {info.name} is a text-to-video model ({info.kind})")
        img = Path(args.image)
        if not img.is_file():
            raise UsageError(f"--image {args.image} does not exist")
        try:
            from PIL import Image

            with Image.open(img) as im:
                im.verify()
        except Exception as e:
            raise UsageError(f"--image {args.image} is not a readable image ({e})") from None
    elif info.needs_image:
        raise UsageError(f"{info.name} is an image-to-video model ({info.kind}); pass --image")

    fps = d["fps"] if args.fps is None else args.fps
    if fps < 1:
        raise UsageError(f"--fps must be >= 1, got {fps}")
    output = _check_output_path("--output", args.output, ".mp4")
    perf_path = _check_output_path("--perf-dump-path", args.perf_dump_path) if args.perf_dump_path else None
    if perf_path is not None and perf_path.resolve() == output.resolve():
        raise UsageError("--perf-dump-path and --output are the same file")

    import torch

    dtype = getattr(torch, DTYPES[args.dtype.lower()])
    device = _resolve_device(args.device)
    return GenerateRequest(info=info, device=device, dtype=dtype, output=output, perf_path=perf_path, fps=fps)


def run(args: argparse.Namespace) -> int:
    req = validate(args)  # before anything is loaded

    import torch

    from mxdit.pipelines.timing import write_json_atomic
    from mxdit.pipelines.video import write_mp4
    from mxdit.pipelines.wan import WanVideoPipeline

    t0 = time.perf_counter()
    print(f"loading {req.info.path} ({req.info.kind}) on {req.device}, "
          f"quantization={args.quantization or 'auto-detect'} ...", file=sys.stderr)
    try:
        pipe = WanVideoPipeline.from_pretrained(
            req.info.path, quantization=args.quantization, transformer_weights_path=args.transformer_weights_path,
            device=req.device, dtype=req.dtype, flow_shift=args.flow_shift,
        )
    except (FileNotFoundError, NotImplementedError, ValueError) as e:  # a checkpoint problem found while loading
        from mxdit.cli import one_line_error

        print(f"mxdit generate: error: {one_line_error(e)}", file=sys.stderr)
        return 1
    if args.quantization is None:
        print(f"quantization: {pipe.quantization or 'none'} (detected)", file=sys.stderr)
    try:
        out = pipe(
            args.prompt, args.negative_prompt, image=args.image, height=args.height, width=args.width,
            num_frames=args.num_frames, num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale, guidance_scale_2=args.guidance_scale_2,
            boundary_ratio=args.boundary_ratio, seed=args.seed, progress=not args.no_progress,
        )
    except ValueError as e:  # e.g. an image-derived size the model cannot take
        raise UsageError(str(e)) from None
    if not bool(torch.isfinite(out.latents).all()):  # a run that produced NaN/Inf says so and writes no video
        n = int((~torch.isfinite(out.latents)).sum())
        print(f"mxdit generate: error: the final latents hold {n} non-finite value(s) of {out.latents.numel()}; "
              f"no video written (check the weights, --guidance-scale and the scheduler's flow_shift)", file=sys.stderr)
        return 1
    write_mp4(out.frames, req.output, fps=req.fps)
    perf = out.perf
    perf["output"] = str(req.output)
    perf["fps"] = req.fps
    if req.perf_path is not None:
        write_json_atomic(req.perf_path, perf)
    f, h, w = out.frames.shape[:3]
    s = perf["stages"]
    print(
        f"wrote {req.output} ({f} frames, {h}x{w}, {req.fps} fps): total {perf['total_duration_ms'] / 1e3:.2f} s, "
        f"denoising {s.get('denoising', 0.0) / 1e3:.2f} s, load {perf.get('model_load_ms') or 0.0:.0f} ms"
        + (f"; perf -> {req.perf_path}" if req.perf_path else "")
        + f" [{time.perf_counter() - t0:.1f} s wall]"
    )
    return 0
