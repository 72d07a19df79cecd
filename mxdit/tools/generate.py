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

from mxdit.cli import finite_float
from mxdit.errors import UsageError
from mxdit.quant.schemes import canonical_name

from mxdit.tools import sglang_args
from mxdit.tools.sglang_args import DEFAULTS

#: kept for callers of the old name: precision name -> torch dtype attribute (SGLang's names + mxdit's long ones)
DTYPES = {**{k: v for k, v in sglang_args.PRECISIONS.items()},
          **{k: sglang_args.PRECISIONS[v] for k, v in sglang_args.DTYPE_ALIASES.items()}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``sglang generate``'s flags (v0.5.23) for everything mxdit does, plus mxdit's own.

    Other argument groups (LoRA, switches) go in with one call each, before :func:`sglang_args.install`."""
    sglang_args.add_model_arguments(p)
    add_sampling_arguments(p)
    add_output_arguments(p)
    sglang_args.add_parallel_arguments(p)
    sglang_args.add_lora_arguments(p)
    sglang_args.add_switch_arguments(p)  # --enable-torch-compile, offload, VAE, cache-dit
    sglang_args.install(p)  # --config files; SGLang flags mxdit lacks -> "not supported: why" (exit 2)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", nargs="+", default=None,
                   help="the prompt(s): one video (or --num-outputs-per-prompt videos) each")
    g.add_argument("--prompt-file-path", "--prompt-path", dest="prompt_file_path", default=None,
                   help="a text file, one prompt per line (blank lines skipped)")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--image-path", "--image-paths", "--image", dest="image_path", nargs="+", default=None,
                   help="conditioning image: one for every prompt, or one per prompt (I2V-A14B: required; "
                        "TI2V-5B: optional; T2V: not allowed)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num-frames", type=int, default=None, help="4n+1 (default: the model's, e.g. 81)")
    g.add_argument("--num-inference-steps", type=int, default=None)
    g.add_argument("--guidance-scale", type=finite_float, default=None, help="CFG scale (A14B: the high-noise expert)")
    g.add_argument("--guidance-scale-2", type=finite_float, default=None, help="A14B: CFG scale of the low-noise expert")
    g.add_argument("--boundary-ratio", type=finite_float, default=None, help="A14B: expert switch point, in [0, 1]")
    g.add_argument("--seed", type=int, nargs="+", default=[DEFAULTS["seed"]],
                   help=f"one seed (output i of a prompt gets seed+i; default {DEFAULTS['seed']}), or one per output "
                        "of a prompt, or one per output of all prompts")
    g.add_argument("--num-outputs-per-prompt", "--num-outputs", dest="num_outputs_per_prompt", type=int,
                   default=DEFAULTS["num_outputs_per_prompt"], help="videos per prompt (seeds seed, seed+1, ...)")
    g.add_argument("--warmup", action="store_true",
                   help="one untimed run (--warmup-steps steps, the first request's size) before the timed ones")
    g.add_argument("--warmup-mode", choices=("off", "request", "server"), default=None,
                   help="SGLang's switch: 'request' or 'server' = --warmup here, 'off' = none")
    g.add_argument("--warmup-steps", type=int, default=DEFAULTS["warmup_steps"],
                   help=f"denoising steps of the warmup run (default {DEFAULTS['warmup_steps']})")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output-path", default=DEFAULTS["output_path"],
                   help=f"folder for the videos (default {DEFAULTS['output_path']})")
    g.add_argument("--output-file-name", default=None,
                   help="file name in --output-path (.mp4 appended when missing; default: from the prompt, a "
                        "timestamp and a hash of the settings, as SGLang); output i of a batch gets _i")
    g.add_argument("--output-file-path", "--output", dest="output_file_path", default=None,
                   help="the MP4 to write: sets --output-path (its folder) and --output-file-name (its name)")
    g.add_argument("--save-output", dest="save_output", action="store_true", default=DEFAULTS["save_output"],
                   help="write the video (default)")
    g.add_argument("--no-save-output", dest="save_output", action="store_false",
                   help="run, time and report, but write no video")
    g.add_argument("--fps", type=int, default=None, help="frames per second (default: the model's, 16 or 24)")
    g.add_argument("--perf-dump-path", default=None, help="write the performance JSON here (SGLang's format)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def warmup_enabled(args: argparse.Namespace) -> bool:
    """``--warmup`` or ``--warmup-mode request|server`` (``off`` wins): one untimed run first."""
    mode = getattr(args, "warmup_mode", None)
    if mode == "off":
        return False
    return bool(getattr(args, "warmup", False)) or mode in ("request", "server")


@dataclass
class Job:
    """One video of a batch: prompt i, output j (SGLang's per-output requests)."""

    prompt: str
    image: str | None
    seed: int
    output: Path | None  # None: --no-save-output
    perf_path: Path | None


@dataclass
class GenerateRequest:
    info: Any  # ModelDirInfo
    device: str
    dtype: Any  # torch.dtype (the transformers')
    jobs: list[Job]
    fps: int
    dtypes: dict[str, Any]  # from_pretrained's dtype / text_encoder_dtype / vae_dtype

    @property
    def output(self) -> Path | None:  # the first video (single-video callers)
        return self.jobs[0].output


#: file endings SGLang's ``_set_output_file_ext`` keeps; mxdit writes .mp4 only
_OTHER_OUTPUT_EXTS = (".jpg", ".png", ".webp", ".obj", ".glb", ".json", ".avi", ".mov", ".mkv", ".webm", ".gif")


def sglang_file_name(prompt: str, settings: dict[str, Any]) -> str:
    """SGLang's default output name: ``<prompt[:100]>_<YYYYmmdd-HHMMSS>_<hash8>``, sanitized as its
    ``_sanitize_filename`` (ASCII, spaces -> _, [A-Za-z0-9._-] only, _ collapsed, 150 chars)."""
    import hashlib
    import json
    import re
    import unicodedata

    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = f"{prompt[:100]}_{time.strftime('%Y%m%d-%H%M%S')}_{digest}"
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").replace(" ", "_")
    name = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9._-]", "_", name)).strip("._") or "output"
    return name[:150]


def _mp4_name(flag: str, name: str) -> str:
    if name.lower().endswith(".mp4"):
        return name
    if name.lower().endswith(_OTHER_OUTPUT_EXTS):
        raise UsageError(f"{flag} {name} must end in .mp4 (mxdit writes H.264 MP4 video only)")
    return name + ".mp4"


def _indexed(name: str, *indices: int) -> str:
    """SGLang's ``_with_output_index_suffix``: ``fox.mp4`` -> ``fox_1.mp4``."""
    stem, dot, ext = name.rpartition(".")
    return stem + "".join(f"_{i}" for i in indices) + dot + ext


def _seeds(args: argparse.Namespace, n_prompts: int) -> list[list[int]]:
    """Seeds per prompt per output, as SGLang's ``normalize_output_seeds``."""
    n = args.num_outputs_per_prompt
    seeds = list(args.seed) if isinstance(args.seed, list) else [args.seed]
    if len(seeds) == 1:
        return [[seeds[0] + j for j in range(n)] for _ in range(n_prompts)]
    if len(seeds) == n:
        return [list(seeds) for _ in range(n_prompts)]
    if len(seeds) == n * n_prompts:
        return [seeds[i * n:(i + 1) * n] for i in range(n_prompts)]
    raise UsageError(f"--seed: {len(seeds)} seeds match neither --num-outputs-per-prompt ({n}) nor all outputs "
                     f"({n * n_prompts} = {n_prompts} prompts x {n})")


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

    if args.model_path is None:
        raise UsageError("--model-path is required (or model_path in --config)")
    try:
        info = inspect_model_dir(args.model_path)
    except ModelDirError as e:
        raise UsageError(f"--model-path: {e}") from None
    if args.quantization is not None:
        canonical_name(args.quantization, what="--quantization")  # the one name check (a ValueError: exit 2)
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
    dtypes = sglang_args.resolve_precisions(args, UsageError)
    from mxdit.pipelines.switches import switch_config_from_args

    try:
        args.switch_config = switch_config_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
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
        prompts = [ln.strip() for ln in lines if ln.strip()]
        if not prompts:
            raise UsageError(f"--prompt-file-path {args.prompt_file_path} has no prompts")
    else:
        prompts = list(args.prompt) if isinstance(args.prompt, list) else [args.prompt]
    args.prompts = prompts
    images = args.image_path if isinstance(args.image_path, list) else ([args.image_path] if args.image_path else [])
    if len(images) > 1 and len(images) != len(prompts):
        raise UsageError(f"--image-path: {len(images)} images for {len(prompts)} prompt(s): give one image for "
                         "every prompt, or exactly one per prompt (Wan takes one conditioning image per video)")
    per_prompt_image = [images[i] if len(images) > 1 else (images[0] if images else None) for i in range(len(prompts))]
    if args.num_outputs_per_prompt < 1:
        raise UsageError(f"--num-outputs-per-prompt must be >= 1, got {args.num_outputs_per_prompt}")
    if args.warmup_steps < 1:
        raise UsageError(f"--warmup-steps must be >= 1, got {args.warmup_steps}")
    seeds = _seeds(args, len(prompts))

    fps = None
    checked: set[tuple[str, str | None]] = set()
    for prompt, image in zip(prompts, per_prompt_image):
        if (prompt, image) in checked:
            continue
        checked.add((prompt, image))
        try:
            fps = check_sampling_inputs(
                info, prompt=prompt, num_frames=args.num_frames, height=args.height, width=args.width,
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                guidance_scale_2=args.guidance_scale_2, boundary_ratio=args.boundary_ratio,
                flow_shift=args.flow_shift, image=image, fps=args.fps,
                name=lambda f: "--" + ("image-path" if f == "image" else f.replace("_", "-")),
            )
        except InputError as e:
            raise UsageError(str(e)) from None

    # ---- output names (SGLang's rules; a fixed name in a batch gets _<prompt> / _<output> suffixes)
    if args.output_file_path is not None:
        out_file = Path(args.output_file_path).expanduser()
        if out_file.is_dir():
            raise UsageError(f"--output-file-path {args.output_file_path} is a directory (a folder goes to --output-path)")
        out_dir, fixed = out_file.parent, _mp4_name("--output-file-path", out_file.name)
        flag = "--output-file-path"
    else:
        out_dir, flag = Path(args.output_path).expanduser(), "--output-path"
        fixed = None
        if args.output_file_name is not None:
            name = args.output_file_name
            if Path(name).name != name or name in (".", "..", ""):
                raise UsageError(f"--output-file-name {name!r} must be a file name, not a path")
            fixed = _mp4_name("--output-file-name", name)
    perf = _check_output_path("--perf-dump-path", args.perf_dump_path) if args.perf_dump_path else None
    n_out = args.num_outputs_per_prompt
    jobs: list[Job] = []
    for i, (prompt, image) in enumerate(zip(prompts, per_prompt_image)):
        for j in range(n_out):
            k = len(jobs)
            output = None
            if args.save_output:
                if fixed is not None:
                    idx = ([i] if len(prompts) > 1 else []) + ([j] if n_out > 1 else [])
                    name = _indexed(fixed, *idx)
                else:
                    base = sglang_file_name(prompt, {k_: v for k_, v in vars(args).items() if k_ != "prompts"} | {
                        "prompt": prompt, "seed": seeds[i][j]})
                    name = _indexed(base + ".mp4", j) if n_out > 1 else base + ".mp4"
                output = _check_output_path(flag, str(out_dir / name), ".mp4")
            perf_path = perf
            if perf is not None and len(prompts) * n_out > 1:
                perf_path = perf.with_name(f"{perf.stem}_{k}{perf.suffix}")
            jobs.append(Job(prompt=prompt, image=image, seed=seeds[i][j], output=output, perf_path=perf_path))
    outs = [jb.output.resolve() for jb in jobs if jb.output is not None]
    if len(set(outs)) != len(outs):
        raise UsageError(f"{flag}: two videos of this batch would have the same file name")
    for jb in jobs:
        if jb.perf_path is not None and jb.perf_path.resolve() in outs:
            raise UsageError("--perf-dump-path and the video are the same file")

    device = _resolve_device(args.device)
    return GenerateRequest(info=info, device=device, dtype=dtypes["dtype"], jobs=jobs, fps=fps, dtypes=dtypes)


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
    size_known = getattr(args, "image_path", None) is None or (args.height is not None and args.width is not None)
    seq_len = None
    if size_known:
        h = d["height"] if args.height is None else args.height
        w = d["width"] if args.width is None else args.width
        f = d["num_frames"] if args.num_frames is None else args.num_frames
        pt, ph, pw = info.patch_size
        st, ss = info.vae_scale_temporal, info.vae_scale_spatial
        seq_len = ((f - 1) // st + 1) // pt * (h // ss // ph) * (w // ss // pw)
    ulysses, cfg = args.ulysses_degree, args.enable_cfg_parallel
    sp = getattr(args, "sp_degree", None)  # SGLang: sp = ulysses x ring; ring is 1 here
    if sp is not None:
        ring = args.ring_degree or 1
        if ulysses is not None and ulysses * ring != sp:
            raise UsageError(f"--sp-degree {sp} != --ulysses-degree {ulysses} x --ring-degree {ring}")
        if sp % ring:
            raise UsageError(f"--sp-degree {sp} is not a multiple of --ring-degree {ring}")
        ulysses = sp // ring
    cfg_size = getattr(args, "cfg_parallel_size", None)
    if cfg_size is not None:
        if cfg_size not in (1, 2):
            raise UsageError(f"--cfg-parallel-size must be 1 or 2 (the two CFG branches), got {cfg_size}")
        if cfg_size == 1 and cfg:
            raise UsageError("--cfg-parallel-size 1 contradicts --enable-cfg-parallel")
        cfg = cfg or cfg_size == 2
    try:
        pc = ParallelConfig.resolve(num_gpus=num_gpus, ulysses_degree=ulysses,
                                    ring_degree=args.ring_degree, enable_cfg_parallel=cfg,
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

    from mxdit.pipelines.timing import stage_ms, write_json_atomic
    from mxdit.pipelines.video import write_mp4
    from mxdit.loader.lora import LoRAError, lora_specs_from_args
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
            device=req.device, flow_shift=args.flow_shift,
            attention_quantization=args.attention_backend,  # None: SGLang's env switch decides
            **req.dtypes, **sglang_args.quant_options(args),
            loras=lora_specs_from_args(args), lora_merge_mode=args.lora_merge_mode,
        )
    except LoRAError as e:  # a LoRA file that does not fit the model: bad input
        raise UsageError(str(e)) from None
    except (FileNotFoundError, NotImplementedError, ValueError) as e:  # a checkpoint problem found while loading
        from mxdit.cli import one_line_error

        raise GenerateFailure(one_line_error(e)) from None  # raised, so that every other rank is stopped too
    from mxdit.pipelines.switches import apply_generate_switches

    first = req.jobs[0]
    sw = apply_generate_switches(pipe, args, prompt=first.prompt, image=first.image, seed=first.seed)
    compiled_warm = sw is not None and sw.warmup_s is not None  # --enable-torch-compile warmed up already
    if args.quantization is None and rank0:
        print(f"quantization: {pipe.quantization or 'none'} (detected)", file=sys.stderr)

    def call(job: Job, steps: int | None, progress: bool):
        try:
            return pipe(
                job.prompt, args.negative_prompt, image=job.image, height=args.height, width=args.width,
                num_frames=args.num_frames, num_inference_steps=steps,
                guidance_scale=args.guidance_scale, guidance_scale_2=args.guidance_scale_2,
                boundary_ratio=args.boundary_ratio, seed=job.seed, progress=progress,
            )
        except ValueError as e:  # e.g. an image-derived size the model cannot take
            raise UsageError(str(e)) from None

    if warmup_enabled(args) and not compiled_warm:  # untimed: first-use costs (allocator, kernels, compilation) stay out of the report
        call(req.jobs[0], args.warmup_steps, False)
    for job in req.jobs:
        out = call(job, args.num_inference_steps, not args.no_progress)
        try:
            check_finite_output(out)  # every rank holds the same latents
        except NonFiniteOutputError as e:
            raise GenerateFailure(str(e)) from None
        if not rank0:
            continue
        if job.output is not None:
            write_mp4(out.frames, job.output, fps=req.fps)
        perf = out.perf
        perf["output"] = None if job.output is None else str(job.output)
        perf["fps"] = req.fps
        perf["warmup"] = warmup_enabled(args) or compiled_warm
        if job.perf_path is not None:
            write_json_atomic(job.perf_path, perf)
        f, h, w = out.frames.shape[:3]
        print(
            f"{'wrote ' + str(job.output) if job.output is not None else 'generated (not saved)'} "
            f"({f} frames, {h}x{w}, {req.fps} fps): total {perf['total_duration_ms'] / 1e3:.2f} s, "
            f"denoising {(stage_ms(perf, 'denoising') or 0.0) / 1e3:.2f} s, load {perf.get('model_load_ms') or 0.0:.0f} ms"
            + (f"; perf -> {job.perf_path}" if job.perf_path else "")
            + f" [{time.perf_counter() - t0:.1f} s wall]"
        )
    return 0
