"""``mxdit demo``: the whole path, offline, in well under a minute on a laptop CPU.

1. Builds (once, cached) a tiny random model directory with the Wan2.2-T2V-A14B
   architecture shape: two experts, UMT5, Wan VAE, UniPC, boundary 0.875.
2. Generates the same short clip in BF16 and with each quantization (default
   ``mxfp8`` and ``mxfp4_dual``), through ``WanVideoPipeline.from_pretrained``.
3. Writes the MP4s and perf JSONs to ``--output-dir``, prints the performance
   comparison report and each quantized run's distance from BF16 (PSNR of the
   decoded frames, relative error of the final latents).

``mxdit demo --numerics`` runs :func:`mxdit.tools.numerics_demo.main` instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

DEFAULT_PROMPT = "A small red fox trots through fresh snow at sunrise, cinematic"
DEFAULT_NEGATIVE = "blurry, low quality, static"


def _check_demo_cache(model_dir: Path) -> None:
    """The demo's cache holds only what the demo wrote: a ``demo-model`` that is not the
    demo's tiny model (its marker file) is refused, never replaced or deleted."""
    from mxdit.errors import UsageError
    from mxdit.pipelines.tiny import _MARKER

    if os.path.islink(model_dir) or (model_dir.exists() and not (model_dir / _MARKER).is_file()):
        raise UsageError(f"'{model_dir}' exists and was not written by mxdit demo (no {_MARKER}); "
                         "remove it or pass another --cache-dir")


def default_cache_dir() -> Path:
    root = os.environ.get("MXDIT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mxdit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--numerics", action="store_true", help="run the MX numerics demo (mxdit.tools.numerics_demo)")
    p.add_argument("--output-dir", default="mxdit-demo", help="where the MP4s and perf JSONs go (default ./mxdit-demo)")
    p.add_argument("--cache-dir", default=None,
                   help="cache root for the tiny model (default $MXDIT_CACHE or ~/.cache/mxdit)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached tiny model")
    p.add_argument("--quantizations", default="mxfp8,mxfp4_dual",
                   help="comma-separated methods to compare with BF16 (default mxfp8,mxfp4_dual)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--num-frames", type=int, default=9)
    p.add_argument("--num-inference-steps", type=int, default=6, help="6 steps: 2 high-noise + 4 low-noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fps", type=int, default=8)


def _quiet_hub_progress_bars() -> None:
    """No per-component "Loading weights" bars in the demo's output (this process only)."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
    except Exception:
        pass


def run(args: argparse.Namespace) -> int:
    if args.numerics:
        from mxdit.tools import numerics_demo

        rc = numerics_demo.main()
        return int(rc or 0)

    from mxdit.errors import UsageError
    from mxdit.quant.schemes import canonical_name

    quants = [q.strip() for q in args.quantizations.split(",") if q.strip()]
    for q in quants:
        canonical_name(q, what="--quantizations entry")  # the one name check (a ValueError: exit 2)
    if args.num_frames < 1 or (args.num_frames - 1) % 4:
        raise UsageError(f"--num-frames must be 4n+1, got {args.num_frames}")
    if args.height % 16 or args.width % 16 or args.height <= 0 or args.width <= 0:
        raise UsageError(f"--height/--width must be positive multiples of 16, got {args.height}x{args.width}")
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output-dir {out_dir} is not a directory")

    import torch

    from mxdit.pipelines.tiny import ensure_tiny_wan_model_dir
    from mxdit.pipelines.timing import write_json_atomic
    from mxdit.pipelines.video import write_mp4
    from mxdit.pipelines.wan import WanVideoPipeline, psnr, relative_error
    from mxdit.tools.compare_perf import compare_files

    _quiet_hub_progress_bars()
    t_start = time.perf_counter()
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    model_dir = cache / "demo-model"
    _check_demo_cache(model_dir)
    if args.rebuild and model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)  # only ever the demo's own build (checked above)
    t = time.perf_counter()
    model_dir, built = ensure_tiny_wan_model_dir(model_dir, "t2v-a14b")
    print(f"{'built' if built else 'using cached'} tiny Wan2.2-T2V-A14B-shaped model: {model_dir}"
          f" ({time.perf_counter() - t:.1f} s)")
    out_dir.mkdir(parents=True, exist_ok=True)

    runs: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for q in [None, *quants]:
        name = q or "bf16"
        t = time.perf_counter()
        try:
            # BF16 experts (the baseline MX is measured against); the UMT5 encoder in FP32 as
            # SGLang runs it (CPUs without native BF16 matmul are 10x slower in BF16)
            pipe = WanVideoPipeline.from_pretrained(
                model_dir, quantization=q, device=args.device, dtype=torch.bfloat16, text_encoder_dtype=torch.float32,
                progress=False,  # mxdit.load_transformer's per-tensor bar
            )
            out = pipe(
                args.prompt, DEFAULT_NEGATIVE, height=args.height, width=args.width, num_frames=args.num_frames,
                num_inference_steps=args.num_inference_steps, seed=args.seed,
            )
        except Exception as e:  # a missing or broken quantization must not hide the others
            failures[name] = f"{type(e).__name__}: {e}"
            print(f"[{name}] FAILED: {failures[name]}", file=sys.stderr)
            if os.environ.get("MXDIT_DEBUG"):
                traceback.print_exc()
            continue
        video = out_dir / f"demo_{name}.mp4"
        perf_path = out_dir / f"perf_{name}.json"
        write_mp4(out.frames, video, fps=args.fps)
        out.perf["output"] = str(video)
        write_json_atomic(perf_path, out.perf)
        runs[name] = {"frames": out.frames, "latents": out.latents, "perf": perf_path, "record": out.perf}
        experts = [s["expert"] for s in out.perf["denoise_steps_ms"]]
        print(f"[{name}] {video} {tuple(out.frames.shape)}: generate {out.perf['total_duration_ms'] / 1e3:.2f} s "
              f"(load {out.perf['model_load_ms'] / 1e3:.2f} s), experts per step {experts} "
              f"[{time.perf_counter() - t:.1f} s]")

    if "bf16" in runs and len(runs) > 1:
        print()
        print(compare_files([runs[n]["perf"] for n in runs]), end="")
        print("(Peak RSS is the demo process's peak so far: the runs share one process. On CPU the MX layers "
          "run the reference backend: fp32 GEMMs on exactly dequantized values, not low-precision hardware. "
          "Times here compare CPU code paths (this CPU's BF16 matmul may be slower than its FP32 one); "
          "MX speed comes from the NPU and GPU backends.)")
        print()
        print("#### 3. Quality vs BF16")
        print("| Variant | PSNR of decoded frames (dB) | Rel. error of final latents |")
        print("| :--- | :--- | :--- |")
        ref = runs["bf16"]
        for name, r in runs.items():
            if name == "bf16":
                continue
            p = psnr(r["frames"], ref["frames"])
            e = relative_error(r["latents"].float(), ref["latents"].float())
            print(f"| {name} | {p:.2f} | {e:.4f} |")
    print()
    print(f"outputs in {out_dir.resolve()} ; total {time.perf_counter() - t_start:.1f} s")
    if failures:
        for name, msg in failures.items():
            print(f"{name}: not run ({msg})", file=sys.stderr)
        return 1
    return 0
