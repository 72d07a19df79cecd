"""``mxdit demo --numerics``: what each MX format costs and keeps, on realistic tensors.

Quantizes a Wan2.2-like weight (a 5120 x 5120 attention projection: Gaussian
with a heavy tail) and a DiT-like activation (per-token Gaussian with a few
outlier channels) to every format, and prints bits per value, the error
(SQNR in dB and relative L2) and the quantize throughput on this machine.
"""
from __future__ import annotations

import time

import torch

from mxdit import formats as F
from mxdit.formats.metrics import sqnr_db
from mxdit.kernels import quantize_fp8_per_token


def realistic_weight(n: int = 5120, k: int = 5120, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w += torch.randn(n, k, generator=g).pow(3) * 0.002  # heavy tail
    return w.to(torch.bfloat16)


def realistic_activation(m: int = 4096, k: int = 5120, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    outliers = torch.randperm(k, generator=g)[: k // 200]
    x[:, outliers] *= 20.0
    return x.to(torch.bfloat16)


def _time(fn, reps: int = 3) -> tuple[float, object]:
    out = fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2], out


def _methods():
    """(name, quantize(x) -> q, dequantize(q) -> float tensor, nbytes(q))."""
    def mx(fmt, **kw):
        return (lambda x: F.quantize_mx(x, fmt, **kw)), (lambda q: q.dequantize()), (lambda q: q.nbytes)

    dual = (lambda x: F.quantize_mx_dual(x)), (lambda q: q.dequantize()), (lambda q: q.nbytes)
    fp8pc = (quantize_fp8_per_token, (lambda qs: qs[0].float() * qs[1]), (lambda qs: qs[0].numel() + qs[1].numel() * 4))

    return [
        ("MXFP8 E4M3 (floor)", *mx("fp8_e4m3")),
        ("MXFP8 E5M2 (floor)", *mx("fp8_e5m2")),
        ("MXFP4 E2M1 (floor)", *mx("fp4_e2m1")),
        ("MXFP4 E2M1 (rceil)", *mx("fp4_e2m1", scale_mode="rceil")),
        ("MXFP4 dual-level", *dual),
        ("FP8 per-row", *fp8pc),
    ]


def run(rows: int = 1024, width: int = 5120) -> str:
    tensors = [(f"weight {width}x{width}", realistic_weight(width, width)),
               (f"activation {rows}x{width}", realistic_activation(rows, width))]
    lines = [
        f"MX numerics on this machine (torch {torch.__version__}, {torch.get_num_threads()} threads)",
        "",
        "| tensor | format | bits/value | SQNR (dB) | rel. L2 error | quantize GB/s (bf16 in) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for tname, x in tensors:
        ref = x.float()
        lines.append(f"| {tname} | BF16 (reference) | 16.00 | inf | 0 | - |")
        for name, quant, dequant, size in _methods():
            secs, q = _time(lambda: quant(x))
            deq = dequant(q)
            err = (deq.float() - ref).norm().item() / ref.norm().item()
            bits = 8.0 * size(q) / x.numel()
            lines.append(
                f"| {tname} | {name} | {bits:.2f} | {sqnr_db(ref, deq):.2f} | {err:.4f} | {x.numel() * 2 / secs / 1e9:.2f} |"
            )
    return "\n".join(lines)


def main() -> int:
    print(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
