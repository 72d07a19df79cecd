"""Weights prepared for the Triton GEMMs (``prepare_*_weight``), and the dual-level expansion to E4M3.

**Dual-level MXFP4 on FP8 tensor cores** (``dual_matmul_kernel``).  Within a
512-group an FP4 value times its L1 scale is exactly an E4M3 value when the
block's L1 is within 2^-8 of the group's largest (FP4 {0.5..6} x 2^e, e in
[-8, 0], lies on E4M3's grid: minimum subnormal 2^-9, max 448).  The quantizer's
largest L1 in a group is 127 by construction (max |temp| rounds to 6); weights
are normalized at load so that it is (the factor moves into L0 exactly).  So
both operands become E4M3 (value * 2^(L1-127), round-half-even for smaller L1)
with one fp32 L0 per 512 per row / column, and the matmul is an FP8 GEMM with
one scale-and-accumulate per chunk: **exact vs the reference up to fp32
accumulation order when every L1 byte of a group is >= 119**; blocks with
L1 < 119 lose their values below 2^-9 x the group scale.  Groups holding an
L1 = 0xFF block get L0 = NaN (NaN never goes through an FP8 operand).  Weight
modes (``dual_weight`` / ``MXDIT_TRITON_DUAL_WEIGHT``): ``fp8`` expanded once at
load (8.06 bits per weight; no per-tile expansion work) or ``fp4`` (the default,
:class:`~mxdit.kernels.triton.backend.TritonBackend`) packed 4-bit + L1, expanded per tile in the kernel
(4.31 bits per weight); both
produce the same E4M3 operand and, in the interpreter, bit-identical outputs.
(The layer keeps its canonical 4-bit parameters too, so ``fp8`` mode holds about
12.4 bits per weight in memory; ``fp4`` mode reuses the packed storage and adds
only the normalized scales.)
Promotion (``promote`` / ``MXDIT_TRITON_PROMOTE``, default on): each BLOCK_K <= 128
chunk is its own tensor-core dot whose partial is scaled and added in fp32 (so
Hopper's reduced-precision FP8 accumulation never spans more than 128 of K);
off: a whole 512-group accumulates inside ``tl.dot`` (Triton's default
``max_num_imprecise_acc`` on sm_90) and is scaled once.

Dual-level expansion error, measured (``dual_expansion_stats``; synthetic data,
1024 x 5120 bf16; CPU):

=====================================  ============  ===============  ===============
tensor                                 blocks < 119  elements changed expanded rel L2
=====================================  ============  ===============  ===============
weights N(0, 0.02)                     0 %           0                0 (exact)
weights t(3) x 0.02, 1 % channels x8   0 %           0                0 (exact)
activations N(0,1), 0.5 % ch x50,      0.31 %        0.08 %           6.5e-5
0.1 % ch x300
activations N(0,1), 0.1 % ch x1000     17.5 %        6.7 %            1.7e-4
=====================================  ============  ===============  ===============

(the dual-level FP4 quantization error itself is 1.2e-1, 1.3e-1, 4.8e-2 and
6.6e-3 on these tensors).  A block 2^-11 below its group's largest loses ~60 %
(L2) of its own contribution (tests/test_triton_backend.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mxdit import formats as F
from mxdit.formats.e8m0 import e8m0_to_float
from mxdit.formats.elements import FP4_E2M1, decode_elements

#: L1 bytes (relative to the group's largest, normalized to 127) from which an
#: FP4 value times its L1 scale is exactly an E4M3 value: {0.5..6} * 2^-8 >= 2^-9.
DUAL_EXACT_MIN_L1 = 119


@dataclass
class TritonMXWeight:
    """MX weight for the kernels: ``data`` E4M3 bytes [N, K] (MXFP8, or MXFP4
    expanded once to E4M3 values) or packed FP4 [N, K/2] (``packed``); ``scale``
    E8M0 [N, K/32].  ``ref`` is the canonical tensor (reference fallback)."""

    ref: F.MXTensor
    data: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]
    packed: bool = False

    @property
    def shape(self) -> torch.Size:
        return self.ref.shape

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() + self.scale.numel()


@dataclass
class TritonDualWeight:
    """Dual-level weight for the FP8 GEMM.

    The L1 bytes are normalized per 512-group so that the largest finite one is
    127 (the factor 2^(max-127) moves into L0 exactly); ``l0`` is NaN for groups
    holding an L1 = 0xFF block.  ``mode="fp8"``: ``data`` is E4M3(fp4 * 2^(L1-127))
    [N, K] (expanded once); ``mode="fp4"``: ``data`` is the packed FP4 [N, K/2] and
    ``l1`` the normalized bytes, expanded per tile in the kernel.  Both modes give
    the same E4M3 operand (round half to even where a block's L1 < 119)."""

    ref: F.DualMXTensor
    mode: str
    data: Optional[torch.Tensor]
    l1: Optional[torch.Tensor]
    l0: Optional[torch.Tensor]

    @property
    def shape(self) -> torch.Size:
        return self.ref.shape

    @property
    def nbytes(self) -> int:
        if self.data is None:
            return 0
        return self.data.numel() + (0 if self.l1 is None else self.l1.numel()) + 4 * self.l0.numel()


@dataclass
class TritonFP8Weight:
    w: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # float32 [N]


def normalize_dual_scales(w: F.DualMXTensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(l1n uint8 [N, K/32], l0n float32 [N, K/512], ok): L1 shifted so each group's
    largest finite byte is 127 and L0 multiplied by the same power of two (exact);
    groups with an L1 = 0xFF block get L0 = NaN (their bytes become 0).  ``ok`` is
    False if a group cannot be normalized exactly and would overflow E4M3."""
    n, k = w.shape
    g = k // F.L0_BLOCK
    l1 = w.scale_l1.reshape(n, g, 16).to(torch.int32)
    finite = l1 != 255
    gmax = torch.where(finite, l1, 0).amax(-1)
    shift = torch.where(gmax > 0, gmax - 127, torch.zeros_like(gmax))
    pow2 = ((shift + 127) << 23).view(torch.float32)  # 2^shift exactly, shift in [-126, 127]
    l0 = w.scale_l0.to(torch.float32)
    l0n = l0 * pow2
    exact = (l0n / pow2 == l0) | ~torch.isfinite(l0)
    shift = torch.where(exact, shift, torch.zeros_like(shift))
    l0n = torch.where(exact, l0n, l0)
    ok = bool(((gmax - shift) <= 127 + 6).all())  # 6 * 2^6 = 384 still fits E4M3
    l1n = torch.where(finite, (l1 - shift.unsqueeze(-1)).clamp(0, 254), torch.zeros_like(l1))
    l0n = torch.where(finite.all(-1), l0n, torch.full_like(l0n, float("nan")))
    return l1n.reshape(n, k // 32).to(torch.uint8), l0n.contiguous(), ok


def expand_dual_to_e4m3(codes: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
    """E4M3 (float8_e4m3fn) of fp4(codes) * 2^(l1-127): torch's RNE cast of the exact
    fp32 product.  codes uint8 [..., K], l1 uint8 [..., K/32]."""
    v = decode_elements(codes, FP4_E2M1)
    kdim = v.shape[-1]
    v = v.reshape(*v.shape[:-1], kdim // 32, 32) * e8m0_to_float(l1).unsqueeze(-1)
    return v.reshape(*v.shape[:-2], kdim).to(torch.float8_e4m3fn)


def dual_expansion_stats(w: F.DualMXTensor) -> dict:
    """How exact the E4M3 expansion of a dual-level tensor is (weights or activations):
    blocks whose normalized L1 < 119 and hold a non-zero value, elements whose
    E4M3 value differs from fp4 * 2^(L1-127), and the relative L2 error of the
    expanded tensor against the exact one (L0 factors omitted)."""
    l1n, _, _ = normalize_dual_scales(w)
    codes = w.codes()
    exact = decode_elements(codes, FP4_E2M1)
    shp = exact.shape
    exact = (exact.reshape(*shp[:-1], shp[-1] // 32, 32) * e8m0_to_float(l1n).unsqueeze(-1)).reshape(shp)
    finite_blk = (w.scale_l1 != 255).repeat_interleave(32, dim=-1)
    exact = torch.where(finite_blk, exact, torch.zeros_like(exact))
    expanded = expand_dual_to_e4m3(codes, l1n).to(torch.float32)
    nz_blk = (codes.reshape(*shp[:-1], shp[-1] // 32, 32) & 7).amax(-1) > 0
    low = (l1n < DUAL_EXACT_MIN_L1) & nz_blk & (w.scale_l1 != 255)
    diff = expanded != exact
    return {
        "blocks": int(l1n.numel()),
        "blocks_below_119": int(low.sum()),
        "groups_all_ge_119": int((~low.reshape(*shp[:-1], -1, 16).any(-1)).sum()),
        "groups": int(l1n.numel() // 16),
        "elements_changed": int(diff.sum()),
        "elements_nonzero": int((exact != 0).sum()),
        "rel_l2_error": float((expanded - exact).norm() / exact.norm().clamp_min(1e-30)),
        "max_abs_error": float((expanded - exact).abs().max()) if exact.numel() else 0.0,
    }
