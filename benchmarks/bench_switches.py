"""Each switch of ``mxdit.pipelines.switches`` against the plain run, measured in the same process:
one generation's denoising time, total time and peak memory (device peak on CUDA; on CPU the
process's peak RSS growth during the run, which only ever rises, so each run is a fresh subprocess).

    python benchmarks/bench_switches.py [--device cpu|cuda] [--quantization mxfp8] [--steps 4]
        [--size 64] [--frames 9] [--compile-backend inductor]

On the tiny model (random weights, 2 blocks) the numbers show the mechanics (what each switch
costs or saves), not Wan2.2-A14B speed-ups: the tiny model's experts are ~30 MB, so offload
moves little, and cache-dit can skip at most one of two blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402

CASES = {
    "plain": {},
    "torch.compile": {"enable_torch_compile": True},
    "dit-cpu-offload": {"dit_cpu_offload": True},
    "dit-layerwise-offload": {"dit_layerwise_offload": True},
    "vae-tiling": {"vae_tiling": True},
    "vae-slicing": {"vae_slicing": True},
    "cache-dit": {"enable_cache_dit": True},
}


def one(args) -> None:
    """Child: load, apply one switch set, warm up, run once, print a JSON line."""
    import resource
    import time

    import torch

    from mxdit.pipelines import switches as S
    from mxdit.pipelines.wan import WanVideoPipeline

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    kw = json.loads(args.case_json)
    if kw.get("enable_torch_compile"):
        kw["torch_compile_backend"] = args.compile_backend
    if kw.get("enable_cache_dit"):
        kw["cache_dit"] = dict(S.CACHE_DIT_DEFAULTS, max_warmup_steps=1)
    pipe = WanVideoPipeline.from_pretrained(args.model, quantization=args.quantization, dtype=torch.bfloat16,
                                            device=args.device, text_encoder_dtype=torch.float32, progress=False)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    S.apply_switches(pipe, S.SwitchConfig(**kw))
    if kw.get("vae_tiling") and args.size < 256:  # diffusers' default tiles (256 px) exceed small frames
        t = args.size // 2
        pipe.vae.enable_tiling(tile_sample_min_height=t, tile_sample_min_width=t,
                               tile_sample_stride_height=t * 3 // 4, tile_sample_stride_width=t * 3 // 4)
    call = dict(height=args.size, width=args.size, num_frames=args.frames, seed=0, max_sequence_length=32)
    t0 = time.perf_counter()
    S.warmup(pipe, prompt="a red fox in the snow", negative_prompt="blurry", **call)
    warm = time.perf_counter() - t0
    out = pipe("a red fox in the snow", "blurry", num_inference_steps=args.steps, **call)
    p = out.perf
    cd = (p.get("switches") or {}).get("cache_dit") or {}
    print("RESULT " + json.dumps({
        "denoise_s": p["stages"]["denoising"] / 1e3, "decode_s": p["stages"].get("decoding", 0) / 1e3,
        "total_s": p["total_duration_ms"] / 1e3, "warmup_s": warm,
        "device_peak": p["peak_memory"]["device_max_allocated_bytes"],
        "rss_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0,
        "skipped": cd.get("skipped_block_computations"), "blocks": cd.get("block_computations"),
        "latents": out.latents.float().cpu().flatten()[:4096].tolist(),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantization", default="mxfp8")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case_json is not None:
        return one(args)

    from mxdit.pipelines.tiny import build_tiny_wan_model_dir

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_wan_model_dir(Path(tmp) / "model", "t2v-a14b")
        rows = {}
        for name in args.cases.split(","):
            cmd = [sys.executable, __file__, "--model", str(model), "--case-json", json.dumps(CASES[name]),
                   "--device", args.device, "--quantization", args.quantization, "--steps", str(args.steps),
                   "--size", str(args.size), "--frames", str(args.frames), "--compile-backend", args.compile_backend]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows[name] = json.loads(line[0][7:])
    base = rows.get("plain")
    mem_key = "device_peak" if args.device != "cpu" else "rss_growth"
    print(f"# bench_switches: tiny T2V-A14B-shaped model, {args.quantization}, {args.size}x{args.size}, "
          f"{args.frames} frames, {args.steps} steps, device {args.device} ({cpu_name()}), torch {torch.__version__}")
    print(f"| switch | denoise s | x plain | decode s | x plain | warmup s | "
          f"{'device peak MiB' if mem_key == 'device_peak' else 'RSS growth MiB'} | x plain | "
          "max abs diff vs plain | skipped blocks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        def ratio(k):
            return f"{r[k] / base[k]:.2f}" if base and base.get(k) else "n/a"

        diff = max(abs(a - b) for a, b in zip(r["latents"], base["latents"])) if base else float("nan")
        mem = r[mem_key]
        skipped = f"{r['skipped']} / {r['blocks']}" if r["skipped"] is not None else "-"
        print(f"| {name} | {r['denoise_s']:.3f} | {ratio('denoise_s')} | {r['decode_s']:.3f} | {ratio('decode_s')} | "
              f"{r['warmup_s']:.1f} | {(mem or 0) / 2**20:.1f} | {ratio(mem_key)} | {diff:.3g} | {skipped} |")


if __name__ == "__main__":
    main()
