"""Quantized linear layers vs ``F.linear`` in bf16 on this machine's CPU.

One [M x K] x [K x N] layer (default 4096 x 5120 x 5120: 4096 tokens through a
Wan2.2-A14B attention projection) per online method -- mxfp8, mxfp4,
mxfp4_dual, fp8 -- built as ``QuantLinear`` from the registry, against
``torch.nn.functional.linear`` on the bf16 weight.  Times are the median of
``--reps`` timed forward calls after ``--warmup`` untimed ones.  Weight bytes
are the stored weight plus its scales (bias excluded).

The quantized layers run on the CPU *reference* kernel backend (numerics
oracle: dequantize to fp32, fp32 GEMM), so they are expected to differ from
bf16 in speed; the table shows by how much.  On CPUs without native bf16 GEMM
(no AVX512-BF16 / AMX) torch's bf16 ``F.linear`` is itself slow, which the
ratio then reflects; the fp32 ``F.linear`` row shows the GEMM the reference
backend itself runs, so the gap to it is the cost of (de)quantization.

Usage:  .venv/bin/python benchmarks/bench_linear.py [--m 4096 --k 5120 --n 5120] [--reps 3] [--warmup 1]
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import argparse
import platform
import time

import torch

from _common import cpu_name, median_seconds
import torch.nn.functional as Fn
from torch import nn

from mxdit.layers.linear import QuantLinear
from mxdit.quant import get_quant_config

METHODS = ("mxfp8", "mxfp4", "mxfp4_dual", "fp8")
_WEIGHT_TENSORS = ("weight", "weight_scale", "weight_dual_scale")






def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    want = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
                    return ", ".join(f for f in want if f in flags) or "none of avx2/avx512/amx"
    except OSError:
        pass
    return "unknown"


def _weight_bytes(layer: nn.Module) -> int:
    return sum(getattr(layer, n).numel() * getattr(layer, n).element_size()
               for n in _WEIGHT_TENSORS if getattr(layer, n, None) is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=4096, help="tokens (rows of x)")
    ap.add_argument("--k", type=int, default=5120, help="in_features (a multiple of 512)")
    ap.add_argument("--n", type=int, default=5120, help="out_features")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]

    torch.manual_seed(0)
    m, k, n = args.m, args.k, args.n
    w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
    b = (torch.randn(n) * 0.02).to(torch.bfloat16)
    x = torch.randn(m, k).to(torch.bfloat16)

    print(f"# bench_linear: [{m} x {k}] x [{k} x {n}], bf16 activations, bias, CPU reference backend")
    print(f"torch {torch.__version__}; torch threads: {torch.get_num_threads()}; "
          f"CPU: {cpu_name()} ({os.cpu_count()} logical cores; {_cpu_flags()})")
    try:
        print(f"load average at start: {os.getloadavg()[0]:.2f}")
    except OSError:
        pass
    print(f"timing: median of {args.reps} runs after {args.warmup} warm-up run(s)\n", flush=True)

    rows = []
    t_bf16 = median_seconds(lambda: Fn.linear(x, w, b), args.reps, args.warmup)
    bf16_bytes = w.numel() * w.element_size()
    rows.append(("bf16 F.linear", t_bf16, bf16_bytes, None))
    print(f"  bf16 F.linear: {t_bf16:.3f} s", flush=True)
    # the reference backend's own core is an fp32 GEMM on dequantized operands: show it too
    w32, b32, x32 = w.float(), b.float(), x.float()
    t_fp32 = median_seconds(lambda: Fn.linear(x32, w32, b32), args.reps, args.warmup)
    rows.append(("fp32 F.linear", t_fp32, w32.numel() * w32.element_size(), None))
    print(f"  fp32 F.linear: {t_fp32:.3f} s", flush=True)
    del w32, b32, x32

    for method in methods:
        layer = QuantLinear(k, n, bias=True, quant_config=get_quant_config(method), prefix="bench.linear",
                            params_dtype=torch.bfloat16, device="meta")
        layer.weight = nn.Parameter(w.clone(), requires_grad=False)
        layer.bias = nn.Parameter(b.clone(), requires_grad=False)
        t0 = time.perf_counter()
        layer.process_weights_after_loading()
        t_load = time.perf_counter() - t0
        with torch.no_grad():
            t = median_seconds(lambda: layer(x), args.reps, args.warmup)
            out = layer(x)
        assert out.dtype == torch.bfloat16 and tuple(out.shape) == (m, n)
        rows.append((method, t, _weight_bytes(layer), t_load))
        print(f"  {method}: {t:.3f} s (load-time quantization {t_load:.2f} s)", flush=True)

    print()
    print("| method | time (s) | vs bf16 | weight bytes | bits/weight | load-time quantize (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t, nbytes, t_load in rows:
        bits = 8.0 * nbytes / (n * k)
        load = "-" if t_load is None else f"{t_load:.2f}"
        print(f"| {name} | {t:.3f} | {t / t_bf16:.2f}x | {nbytes / 2**20:.2f} MiB | {bits:.4g} | {load} |")


if __name__ == "__main__":
    main()
