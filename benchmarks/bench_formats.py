"""Throughput of mxdit.formats quantizers vs torchao 0.18.0 ``to_mx`` (CPU, same run).

Input: a 5120 x 13824 bf16 tensor (the shape of a Wan2.2-A14B FFN weight), randn * 0.02.
GB/s = input bytes / seconds (median of a few timed runs after one warm-up).
torchao has no dual-level (two-scale) MXFP4; for ``quantize_mx_dual`` the nearest torchao
baseline is single-level MXFP4 FLOOR, and the table says so.

Usage:  .venv/bin/python benchmarks/bench_formats.py [--reps N] [--rows R]
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import argparse
import logging
import platform
import warnings

import torch

from _common import cpu_name, median_seconds

import mxdit.formats as F






def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=5120)
    ap.add_argument("--cols", type=int, default=13824)
    args = ap.parse_args()

    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import torchao
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(args.rows, args.cols, generator=g) * 0.02).to(torch.bfloat16)
    nbytes = x.numel() * x.element_size()

    print("## mxdit.formats quantize throughput vs torchao (CPU)\n")
    print(f"- machine: {platform.machine()}, {cpu_name()}, {os.cpu_count()} logical CPUs, "
          f"{platform.system()} {platform.release()}")
    print(f"- python {platform.python_version()}, torch {torch.__version__} "
          f"(threads: {torch.get_num_threads()}), torchao {torchao.__version__}")
    print(f"- input: {args.rows} x {args.cols} bf16 (randn * 0.02), {nbytes / 1e6:.1f} MB; "
          f"median of {args.reps} runs after 1 warm-up; GB/s = input bytes / s\n")

    rows = [
        ("MXFP4 (fp4_e2m1), FLOOR",
         lambda: F.quantize_mx(x, "fp4_e2m1", scale_mode="floor"),
         lambda: to_mx(x, torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.FLOOR),
         "to_mx fp4 FLOOR"),
        ("MXFP8 (fp8_e4m3), FLOOR",
         lambda: F.quantize_mx(x, "fp8_e4m3", scale_mode="floor"),
         lambda: to_mx(x, torch.float8_e4m3fn, 32, ScaleCalculationMode.FLOOR),
         "to_mx e4m3 FLOOR"),
        ("dual-level MXFP4 (512/32)",
         lambda: F.quantize_mx_dual(x),
         lambda: to_mx(x, torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.FLOOR),
         "to_mx fp4 FLOOR (nearest baseline: torchao has no dual-level)"),
    ]
    print("| op | mxdit ms | mxdit GB/s | torchao baseline | torchao ms | torchao GB/s | mxdit/torchao |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for name, ours, theirs, tname in rows:
        t_o = median_seconds(ours, args.reps, warmup=1)
        t_t = median_seconds(theirs, args.reps, warmup=1)
        g_o, g_t = nbytes / t_o / 1e9, nbytes / t_t / 1e9
        print(f"| {name} | {t_o * 1e3:.1f} | {g_o:.3f} | {tname} | {t_t * 1e3:.1f} | {g_t:.3f} | "
              f"{g_o / g_t:.2f}x |")


if __name__ == "__main__":
    main()
