"""SQNR, the one quality number of mxdit (quantize's report, the rule benchmark, the numerics demo).

SQNR = 10 log10(sum ref^2 / sum (ref - approx)^2) in dB, higher is better; +inf when exact, -inf
for an all-zero reference with a non-zero error.  Sums are float64 (per-chunk sums of squares in
fp32 for :class:`SqnrAccumulator`, accumulated in float64 across chunks).
"""
from __future__ import annotations

import math

import torch


def _db(sig: float, err: float) -> float:
    if err == 0:
        return math.inf
    if sig == 0:
        return -math.inf
    return 10.0 * math.log10(sig / err)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(sum ref^2 / sum (ref - approx)^2), float64; inf when exact."""
    ref = ref.to(torch.float64)
    return _db(float((ref**2).sum()), float(((ref - approx.to(torch.float64)) ** 2).sum()))


class SqnrAccumulator:
    """Accumulates sum ref^2 and sum err^2 over chunks (fp32 per chunk, float64 across chunks)."""

    def __init__(self):
        self.sig = 0.0
        self.err = 0.0

    def add(self, ref: torch.Tensor, approx: torch.Tensor) -> None:
        self.sig += float(ref.float().square().sum())
        self.err += float((ref.float() - approx.float()).square_().sum())

    @property
    def db(self) -> float:
        return _db(self.sig, self.err)
