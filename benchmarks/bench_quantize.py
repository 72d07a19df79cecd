"""Seconds and peak RSS of ``mxdit quantize`` on a synthetic full-width Wan2.2-A14B expert.

The input is one A14B expert's architecture (dim 5120, ffn 13824, 40 heads, text_dim 4096,
freq_dim 256, in/out 16) cut to ``--blocks`` blocks (default 4), random BF16 weights
(N(0, 0.02)), diffusers names, written tensor by tensor with ``write_safetensors`` (the writer
never holds more than one tensor).  Each recipe is quantized in a fresh subprocess (so peak RSS
is that run's own), no calibration (the report uses random activation rows), mindie layout.

The table extrapolates linearly to both full experts (2 x 40 blocks): the time per block
(total / blocks, i.e. the fixed cost is charged to the blocks, an upper bound) times 80; peak
memory does not grow with the number of blocks (streaming), so it carries over as measured.

Usage:  .venv/bin/python benchmarks/bench_quantize.py [--blocks 4] [--recipes all-mxfp8,all-mxfp4-dual]
                                                      [--device cpu] [--threads N] [--workdir DIR] [--keep] [--reuse]
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time

A14B = dict(patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=1e-6, rope_max_seq_len=1024)


def write_synthetic(path: str, blocks: int) -> dict:
    import torch

    from mxdit.loader.safetensors_io import write_safetensors
    from mxdit.models.wan.config import WanTransformerConfig
    from mxdit.models.wan.transformer import WanTransformer3DModel

    cfg = dict(A14B, num_layers=blocks)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "WanTransformer3DModel", **cfg}, f, indent=2)
    model = WanTransformer3DModel(WanTransformerConfig.from_dict(cfg), device="meta")
    g = torch.Generator().manual_seed(0)

    def make(shape, is_norm):
        def produce():
            t = torch.randn(shape, generator=g) * 0.02
            return (t + 1.0 if is_norm else t).to(torch.bfloat16)
        return produce

    entries, largest, total = [], 0, 0
    for name, p in model.named_parameters():
        n = p.numel() * 2
        largest, total = max(largest, n), total + n
        entries.append((name, torch.bfloat16, tuple(p.shape), make(tuple(p.shape), "norm" in name)))
    write_safetensors(os.path.join(path, "diffusion_pytorch_model.safetensors"), entries, metadata={"format": "pt"})
    return {"largest_tensor_bytes": largest, "total_bytes": total}


def _vm_hwm() -> int:
    """Peak RSS of this process's address space (VmHWM), in bytes.  Not ru_maxrss: Linux carries
    ru_maxrss across fork + exec, so a worker would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> None:
    import psutil
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mxdit.tools.quantize import QuantizeOptions, quantize_model

    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    res = quantize_model(args.src, args.out, QuantizeOptions(recipe=args.recipe, device=args.device, progress=False,
                                                             overwrite=True), log=lambda m: None)
    dt = time.perf_counter() - t0
    peak = _vm_hwm()
    out_bytes = sum(os.path.getsize(f) for e in res.experts for f in e.weight_files)
    layers = res.experts[0].layers
    print(json.dumps({"seconds": dt, "peak_rss": peak, "base_rss": base, "out_bytes": out_bytes,
                      "layers": len(layers),
                      "mean_weight_sqnr": sum(l.weight_sqnr_db for l in layers) / len(layers),
                      "mean_output_sqnr": sum(l.output_sqnr_db for l in layers) / len(layers)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--recipes", default="all-mxfp8,all-mxfp4-dual")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse the synthetic checkpoint in --workdir if present")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    work = args.workdir or tempfile.mkdtemp(prefix="bench_quantize-")
    src = os.path.join(work, "a14b-synthetic")
    try:
        t0 = time.perf_counter()
        marker = os.path.join(src, "bench_info.json")
        if args.reuse and os.path.isfile(marker):
            with open(marker) as f:
                info = json.load(f)
            if info.get("blocks") != args.blocks:
                raise SystemExit(f"--reuse: {src} has {info.get('blocks')} blocks, not {args.blocks}")
            how = "reused"
        else:
            if os.path.isdir(src):
                shutil.rmtree(src)
            info = dict(write_synthetic(src, args.blocks), blocks=args.blocks)
            with open(marker, "w") as f:
                json.dump(info, f)
            how = (f"written in {time.perf_counter() - t0:.1f} s (peak RSS of the streaming writer "
                   f"{_vm_hwm() / 2**30:.2f} GiB)")
        print(f"synthetic A14B expert, {args.blocks} blocks: {info['total_bytes'] / 2**30:.2f} GiB BF16, "
              f"largest tensor {info['largest_tensor_bytes'] / 2**20:.0f} MiB; {how}")
        rows = []
        for recipe in args.recipes.split(","):
            out = os.path.join(work, f"out-{recipe}")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--src", src, "--out", out,
                   "--recipe", recipe, "--device", args.device, "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                sys.stderr.write(res.stderr)
                raise SystemExit(f"worker for {recipe} failed")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append((recipe, r))
            shutil.rmtree(out, ignore_errors=True)
        import torch

        threads = args.threads or torch.get_num_threads()
        print(f"\ndevice {args.device}, {threads} thread(s), {os.cpu_count()} CPUs; mindie layout, default weight rule "
              f"(mse), report on 32 random rows per layer\n")
        print("| recipe | blocks | seconds | s / block | peak RSS (GiB) | RSS after imports (GiB) | largest BF16 tensor "
              "(GiB) | output (GiB) | mean weight / output SQNR (dB) | est. 2 experts x 40 blocks (min) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for recipe, r in rows:
            per_block = r["seconds"] / args.blocks
            print(f"| {recipe} | {args.blocks} | {r['seconds']:.1f} | {per_block:.1f} | {r['peak_rss'] / 2**30:.2f} | "
                  f"{r['base_rss'] / 2**30:.2f} | {info['largest_tensor_bytes'] / 2**30:.3f} | "
                  f"{r['out_bytes'] / 2**30:.2f} | {r['mean_weight_sqnr']:.2f} / {r['mean_output_sqnr']:.2f} | "
                  f"{per_block * 80 / 60:.1f} |")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
