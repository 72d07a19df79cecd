"""``mxdit generate``: text/image-to-video with a diffusers-layout Wan2.2 model.

Flag names follow SGLang-Diffusion's ``sglang generate`` where it has them.
Every input is checked against the model's config files *before* any weights
are loaded; a bad one ends the command with one line on stderr and status 2.
The MP4 (H.264 via imageio-ffmpeg) and the perf JSON are written atomically.
"""
from __future__ import annotations

import argparse
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
    g.add_argument("--attention-backend", default=None,
                   help="self-attention: mxfp8, mxfp8_rotated, fp8_block, fp8_block_rotated, or sdpa / none (unquantized); "
                        "default: unquantized unless SGLANG_DIFFUSION_ENABLE_MXFP8_ATTENTION=1 or the checkpoint says FP8_DYNAMIC")

    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", default=None, help="the prompt (or --prompt-file-path)")
    g.add_argument("--prompt-file-path", default=None, help="one prompt per line: one video each, named <name>_<i>.mp4")
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
    g.add_argument("--output-path", default="outputs", help="folder for the video (default outputs/)")
    g.add_argument("--output-file-name", default=None, help="file name in --output-path (.mp4 appended; default output)")
    g.add_argument("--output", "--output-file-path", dest="output", default=None,
                   help="the MP4 file to write (a full path; overrides --output-path/--output-file-name)")
    g.add_argument("--fps", type=int, default=None, help="frames per second (default: the model's, 16 or 24)")
    g.add_argument("--perf-dump-path", default=None, help="write the performance JSON here")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = p.add_argument_group("parallelism", "split one video over devices (SGLang's flags; see README "
                             "'Running on N devices'); also works under torchrun --nproc-per-node N")
    g.add_argument("--num-gpus", type=int, default=None,
                   help="ranks to run (spawned here; under torchrun: its world size). Default: 1, or the "
                        "product of the degrees given")
    g.add_argument("--ulysses-degree", type=int, default=None,
                   help="Ulysses sequence-parallel degree (default: the GPUs left after CFG parallel)")
    g.add_argument("--ring-degree", type=int, default=None, help="ring-attention degree (only 1 is supported)")
    g.add_argument("--enable-cfg-parallel", action="store_true",
                   help="conditional and unconditional branches on different ranks (degree 2; on by default "
                        "when --num-gpus >= 2 and no SP degree is given)")
    g.add_argument("--tp-size", type=int, default=1, help="tensor parallel (only 1 is supported)")
    g.add_argument("--master-port", type=int, default=None,
                   help="rendezvous port on 127.0.0.1 for spawned ranks (default: a free port)")
    g.add_argument("--dist-timeout", type=float, default=None,
                   help="seconds a collective may wait before the run fails (default: 1800)")

    from mxdit.pipelines.switches import add_switch_arguments  # --enable-torch-compile, offload, VAE, cache-dit

    add_switch_arguments(p)


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
    from mxdit.pipelines.switches import switch_config_from_args

    try:
        args.switch_config = switch_config_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.dtype.lower() not in DTYPES:
        raise UsageError(f"unknown --dtype {args.dtype!r} (choose from: bf16, fp16, fp32)")
    from mxdit.pipelines.inputs import InputError, check_sampling_inputs

    if args.attention_backend is not None:
        from mxdit.layers.attention import available_attention_backends

        if args.attention_backend not in (*available_attention_backends(), "none"):
            raise UsageError(f"unknown --attention-backend {args.attention_backend!r} "
                             f"(choose from: {', '.join(available_attention_backends())})")
    if (args.prompt is None) == (args.prompt_file_path is None):
        raise UsageError("pass exactly one of --prompt and --prompt-file-path")
    if args.prompt_file_path is not None:
        try:
            lines = Path(args.prompt_file_path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompt-file-path {args.prompt_file_path}: cannot read ({e})") from None
        args.prompts = [ln.strip() for ln in lines if ln.strip()]
        if not args.prompts:
            raise UsageError(f"--prompt-file-path {args.prompt_file_path} has no prompts")
    else:
        args.prompts = [args.prompt]

    try:
        fps = check_sampling_inputs(
            info, prompt=args.prompts[0], num_frames=args.num_frames, height=args.height, width=args.width,
            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
            guidance_scale_2=args.guidance_scale_2, boundary_ratio=args.boundary_ratio,
            flow_shift=args.flow_shift, image=args.image, fps=args.fps,
            name=lambda f: "--" + f.replace("_", "-"),
        )
    except InputError as e:
        raise UsageError(str(e)) from None
    if args.output is not None:
        output = _check_output_path("--output", args.output, ".mp4")
    else:
        name = args.output_file_name or "output"
        if Path(name).name != name or name in (".", ".."):
            raise UsageError(f"--output-file-name {name!r} must be a file name, not a path")
        name = name if name.lower().endswith(".mp4") else name + ".mp4"
        output = _check_output_path("--output-path", str(Path(args.output_path).expanduser() / name), ".mp4")
    perf_path = _check_output_path("--perf-dump-path", args.perf_dump_path) if args.perf_dump_path else None
    if perf_path is not None and perf_path.resolve() == output.resolve():
        raise UsageError("--perf-dump-path and --output are the same file")

    import torch

    dtype = getattr(torch, DTYPES[args.dtype.lower()])
    device = _resolve_device(args.device)
    return GenerateRequest(info=info, device=device, dtype=dtype, output=output, perf_path=perf_path, fps=fps)


class GenerateFailure(RuntimeError):
    """A failure while loading or running (exit status 1), raised on any rank."""


def parallel_config(args: argparse.Namespace, info: Any) -> Any:
    """The device layout from the parallelism flags, checked against the model and size (no load)."""
    from mxdit.distributed import ParallelConfig, ParallelConfigError, under_torchrun

    num_gpus = getattr(args, "num_gpus", None)
    if num_gpus is None and under_torchrun():
        num_gpus = int(os.environ["WORLD_SIZE"])
    d = info.defaults
    gs = d["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    gs2 = d.get("guidance_scale_2") if args.guidance_scale_2 is None else args.guidance_scale_2
    two_experts = info.boundary_ratio is not None
    uses_cfg = gs > 1.0 or (two_experts and gs2 is not None and gs2 > 1.0)
    size_known = args.image is None or (args.height is not None and args.width is not None)
    seq_len = None
    if size_known:
        h = d["height"] if args.height is None else args.height
        w = d["width"] if args.width is None else args.width
        f = d["num_frames"] if args.num_frames is None else args.num_frames
        pt, ph, pw = info.patch_size
        st, ss = info.vae_scale_temporal, info.vae_scale_spatial
        seq_len = ((f - 1) // st + 1) // pt * (h // ss // ph) * (w // ss // pw)
    try:
        pc = ParallelConfig.resolve(num_gpus=num_gpus, ulysses_degree=args.ulysses_degree,
                                    ring_degree=args.ring_degree, enable_cfg_parallel=args.enable_cfg_parallel,
                                    tp_size=args.tp_size, uses_cfg=uses_cfg)
        pc.validate(num_heads=info.transformer_config.get("num_attention_heads"), seq_len=seq_len,
                    uses_cfg=uses_cfg)
        if under_torchrun() and int(os.environ["WORLD_SIZE"]) != pc.num_gpus:
            raise ParallelConfigError(f"--num-gpus {pc.num_gpus} does not match torchrun's world size "
                                      f"{os.environ['WORLD_SIZE']}")
    except ParallelConfigError as e:
        raise UsageError(str(e)) from None
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise UsageError(f"--master-port must be in 1..65535, got {args.master_port}")
    if args.dist_timeout is not None and not args.dist_timeout > 0:
        raise UsageError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    return pc


def run(args: argparse.Namespace) -> int:
    """Validate everything (inputs and the device layout), then run :func:`_run_rank` on every rank."""
    req = validate(args)  # before anything is loaded
    parallel = parallel_config(args, req.info)
    from mxdit.distributed import DEFAULT_DIST_TIMEOUT_S, launch

    try:
        rc = launch(_run_rank, parallel, args, device=req.device, master_port=args.master_port,
                    timeout_s=args.dist_timeout or DEFAULT_DIST_TIMEOUT_S)
    except GenerateFailure as e:
        print(f"mxdit generate: error: {e}", file=sys.stderr)
        return 1
    return 0 if rc is None else rc  # None: a non-zero torchrun rank


def _run_rank(args: argparse.Namespace) -> int:
    """One rank's generation (all of it without a process group); only rank 0 prints and writes."""
    from mxdit import distributed as mxdist

    req = validate(args)
    if mxdist.get_world_size() > 1:
        req.device = mxdist.rank_device(req.device, mxdist.get_local_rank())
    rank0 = mxdist.is_rank0()
    if not rank0:
        args.no_progress = True


    from mxdit.pipelines.timing import write_json_atomic
    from mxdit.pipelines.video import write_mp4
    from mxdit.pipelines.wan import NonFiniteOutputError, WanVideoPipeline, check_finite_output

    t0 = time.perf_counter()
    if rank0:
        print(f"loading {req.info.path} ({req.info.kind}) on {req.device}, "
              f"quantization={args.quantization or 'auto-detect'}"
              + (f", {mxdist.get_world_size()} ranks" if mxdist.get_world_size() > 1 else "") + " ...",
              file=sys.stderr)
    try:
        pipe = WanVideoPipeline.from_pretrained(
            req.info.path, quantization=args.quantization, transformer_weights_path=args.transformer_weights_path,
            device=req.device, dtype=req.dtype, flow_shift=args.flow_shift,
            attention_quantization=args.attention_backend,  # None: SGLang's env switch decides
        )
    except (FileNotFoundError, NotImplementedError, ValueError) as e:  # a checkpoint problem found while loading
        from mxdit.cli import one_line_error

        raise GenerateFailure(one_line_error(e)) from None  # raised, so that every other rank is stopped too
    from mxdit.pipelines.switches import apply_generate_switches

    apply_generate_switches(pipe, args)  # --enable-torch-compile (+ warmup), offload, VAE, cache-dit
    if args.quantization is None and rank0:
        print(f"quantization: {pipe.quantization or 'none'} (detected)", file=sys.stderr)
    many = len(args.prompts) > 1
    for i, prompt in enumerate(args.prompts):
        output = req.output.with_name(f"{req.output.stem}_{i}{req.output.suffix}") if many else req.output
        perf_path = req.perf_path
        if many and perf_path is not None:
            perf_path = perf_path.with_name(f"{perf_path.stem}_{i}{perf_path.suffix}")
        try:
            out = pipe(
                prompt, args.negative_prompt, image=args.image, height=args.height, width=args.width,
                num_frames=args.num_frames, num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, guidance_scale_2=args.guidance_scale_2,
                boundary_ratio=args.boundary_ratio, seed=args.seed, progress=not args.no_progress,
            )
        except ValueError as e:  # e.g. an image-derived size the model cannot take
            raise UsageError(str(e)) from None
        try:
            check_finite_output(out)  # every rank holds the same latents
        except NonFiniteOutputError as e:
            raise GenerateFailure(str(e)) from None
        if not rank0:
            continue
        write_mp4(out.frames, output, fps=req.fps)
        perf = out.perf
        perf["output"] = str(output)
        perf["fps"] = req.fps
        if perf_path is not None:
            write_json_atomic(perf_path, perf)
        f, h, w = out.frames.shape[:3]
        s = perf["stages"]
        print(
            f"wrote {output} ({f} frames, {h}x{w}, {req.fps} fps): total {perf['total_duration_ms'] / 1e3:.2f} s, "
            f"denoising {s.get('denoising', 0.0) / 1e3:.2f} s, load {perf.get('model_load_ms') or 0.0:.0f} ms"
            + (f"; perf -> {perf_path}" if perf_path else "")
            + f" [{time.perf_counter() - t0:.1f} s wall]"
        )
    return 0
