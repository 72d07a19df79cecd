"""Weight scale rules for MX blocks: the OCP rules and msmodelslim's (``mxdit quantize``).

A *rule* decides each 32-block's shared exponent ``s`` (scale ``2^s``, stored
as the E8M0 byte ``s + 127``) and how the block's elements are rounded.

=========  ===========================================================  ==============
rule       shared exponent per 32-block (amax = max |x| of the block)    elements
=========  ===========================================================  ==============
floor      OCP / torch_npu scale_alg 0: exponent(amax) - emax            rint, saturate
           (``mxdit.formats.quantize_mx(scale_mode="floor")``)
rceil      NVIDIA / cuBLAS: ceil(log2(amax / max_elem)) from the bits    rint, saturate
           (``mxdit.formats.quantize_mx(scale_mode="rceil")``)
minmax     msmodelslim "minmax" (``calculate_mxfp4_qparam`` /              half away from
           ``calculate_mx_qparam``).  MXFP4: floor(log2(amax*8/7 +        zero (msmodelslim
           9.6e-7)) - 2 clipped to [-129, 125]: the 8/7 factor moves a     formulas, fp32)
           block whose amax mantissa is >= 1.75 to the next exponent.
           MXFP8: floor(log2(amax)) - 8 clamped to [-127, 127].
ceil_x     msmodelslim "ceil_x" (MXFP4 only): ceil(log2(amax/7.25 +       as minmax
           9.6e-7)) clipped to [-129, 125]; the scaled block max lands
           in (3.625, 7.25].  (msmodelslim's doc writes "- emax" but its
           code does not subtract it; the code is followed.)
mse        per block, the better of exponent(amax) - emax and one more    as minmax
           (smaller squared error; ties keep the smaller exponent):
           msmodelslim's ``mse_round`` (its Wan2.2 MXFP8 weight method),
           applied to MXFP4 too.  Every other rule picks one of these two
           exponents, so ``mse`` is the per-block optimum among them.
=========  ===========================================================  ==============

msmodelslim's formulas are reproduced literally in fp32 torch ops
(``torch.log2``/``floor``/``floor(|a| + 0.5)``), so their float quirks are kept
(e.g. log2 of a value just below a power of two may round up to it).  Blocks
whose exponent falls below -127 are written as byte 0 with zero elements
(msmodelslim zeroes the elements too; its ``+127`` uint8 cast would wrap).

Dual-scale's first level (msmodelslim ``dualscale.py``, :func:`dual_level0`): per 512 elements
L0 = amax / 6.0 (a true fp32 division), W' = fp32(W) / L0 kept in fp32; the rule then quantizes W'.
An all-zero 512-block gets L0 = 0 and zero elements (msmodelslim would divide 0 by 0).

Rows are processed in chunks (:mod:`mxdit.formats.chunks`); which rule to use per scheme and the
measured errors are in :mod:`mxdit.quant.offline_rules`.
"""
from __future__ import annotations

import torch

from mxdit.formats.chunks import row_chunks
from mxdit.formats.dual import L0_BLOCK
from mxdit.formats.elements import FP4_E2M1, FP8_E4M3, encode_elements
from mxdit.formats.mx import quantize_mx
from mxdit.formats.packing import pack_fp4

BLOCK = 32
DUAL_BLOCK = L0_BLOCK  # 512
FP4_MAX = 6.0
CEIL_X_VALUE = 7.25
_EPS = 9.6e-7  # msmodelslim's "numerical stability" term
_FP32_MIN_NORMAL = 2.0**-126

RULES = ("floor", "rceil", "minmax", "ceil_x", "mse")
#: rules each MX element format supports (ceil_x is an MXFP4 method in msmodelslim)
FORMAT_RULES = {"fp8_e4m3": ("floor", "rceil", "minmax", "mse"), "fp4_e2m1": RULES}

# ---------------------------------------------------------------------------- exponents
def _exponent_floor(amax: torch.Tensor, emax: int) -> torch.Tensor:
    """exponent(amax) - emax from the fp32 bits (0 / subnormal amax -> -127 - emax)."""
    e = ((amax.to(torch.float32).view(torch.int32) >> 23) & 0xFF) - 127
    return (e - emax).to(torch.float32)


def shared_exponent(amax: torch.Tensor, fmt: str, rule: str) -> torch.Tensor:
    """The msmodelslim-family shared exponent (float tensor) for ``rule`` in minmax / ceil_x."""
    amax = amax.to(torch.float32)
    if fmt == "fp4_e2m1":
        if rule == "minmax":
            s = torch.floor(torch.log2(amax / (1 - 0.5**3) + _EPS)) - 2
        elif rule == "ceil_x":
            s = torch.ceil(torch.log2((amax / CEIL_X_VALUE).clamp(min=0) + _EPS))
        else:
            raise ValueError(rule)
        return torch.clip(s, -127 - 2, 127 - 2)
    if fmt == "fp8_e4m3":
        if rule != "minmax":
            raise ValueError(rule)
        s = torch.floor(torch.log2(amax + _FP32_MIN_NORMAL * (amax == 0).to(amax.dtype))) - 8
        return s.clamp(min=-127)  # > 127 only for amax >= 2^136: not a float32 weight
    raise ValueError(fmt)


# ---------------------------------------------------------------------------- elements
# msmodelslim's element formulas on magnitudes (the sign is applied once, at encoding), with
# in-place ops on small chunks.  Each step is msmodelslim's fp32 operation, in its order
# (x / 2^s and x * 2^-s are the same exact power-of-two scaling), except that the private
# exponent's power of two 2^clip(floor(log2(a)), lo, hi) is read from the exponent bits of a
# instead of log2/floor/exp2.  The two differ only where fp32 log2 (or msmodelslim's "+ 9.6e-7"
# inside it) rounds a value within a few ulps below 2^k up to k; that value then rounds to 2^k
# with either step (a / 2^k * m ~ m - tiny and a / 2^(k-1) * m ~ 2m - tiny both round half up to
# the boundary), so the elements are the same -- the tests compare against a literal
# transcription of msmodelslim's code.
def _pow2_floor(a: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """2^floor(log2 a) for normal a (0 for zero/subnormal a), clamped to [lo, hi]."""
    return (a.view(torch.int32) & 0x7F800000).view(torch.float32).clamp_(lo, hi)


def _fp4_magnitudes(ax: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """msmodelslim ``mxfp4_quantize`` on |x|: FP4 grid magnitudes of |x| / 2^s (half away, clip 6)."""
    xb = ax * torch.exp2(-s)
    step = _pow2_floor(xb, 1.0, 4.0)  # 2^clip(floor(log2(xb + 9.6e-7)), 0, 2)
    v = xb.div_(step).mul_(2).add_(0.5).floor_().div_(2).mul_(step).clamp_(max=FP4_MAX)
    if bool((s < -127).any()):
        v.masked_fill_((s < -127).expand_as(v), 0.0)
    return v


def _fp8_magnitudes(ax: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """msmodelslim ``mxfp_per_block_quantize`` (E4M3) on |x|: grid magnitudes of |x| / 2^s (half away, 448)."""
    a = ax * torch.exp2(-s)
    step = _pow2_floor(a, 2.0**-6, 2.0**127)  # 2^max(floor(log2(|a| + (a == 0))), -6)
    return a.div_(step).mul_(8).add_(0.5).floor_().div_(8).mul_(step).clamp_(max=448.0)


def _magnitudes(ax: torch.Tensor, s: torch.Tensor, fmt: str) -> torch.Tensor:
    return _fp4_magnitudes(ax, s) if fmt == "fp4_e2m1" else _fp8_magnitudes(ax, s)


def _codes(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Exact signed grid values (zeros +0) -> uint8 codes."""
    if fmt == "fp4_e2m1":
        return encode_elements(v.to(torch.bfloat16), FP4_E2M1, "rint")  # exact: grid values, table lookup
    return v.to(torch.float8_e4m3fn).view(torch.uint8)


def _byte(s: torch.Tensor) -> torch.Tensor:
    return (s.clamp(-127, 127) + 127).to(torch.uint8)


def _quantize_chunk(x: torch.Tensor, fmt: str, rule: str, want_deq: bool = False):
    """x fp32 [R, K] -> (codes uint8 [R, K], scale bytes uint8 [R, K/32], dequantized fp32 [R, K] or None)."""
    if rule in ("floor", "rceil"):
        q = quantize_mx(x, fmt, scale_mode=rule, round_mode="rint")
        return q.codes(), q.scale, (q.dequantize(torch.float32) if want_deq else None)
    r, k = x.shape
    xb = x.reshape(r, k // BLOCK, BLOCK)
    ax = xb.abs()
    amax = ax.amax(dim=-1, keepdim=True)
    if rule == "mse":
        emax = FP4_E2M1.emax if fmt == "fp4_e2m1" else FP8_E4M3.emax
        s0 = _exponent_floor(amax, emax).clamp(-127, 126)
        v0 = _magnitudes(ax, s0, fmt)
        v1 = _magnitudes(ax, s0 + 1, fmt)
        # squared errors in units of 4^s0 (the candidates' scales are 2^s0 and 2^(s0+1))
        axs = ax * torch.exp2(-s0)
        err0 = (v0 - axs).square_().sum(-1, keepdim=True)
        err1 = v1.mul(2).sub_(axs).square_().sum(-1, keepdim=True)
        better = (err1 < err0).to(torch.float32)
        mag = v1.sub_(v0).mul_(better).add_(v0)  # v0 + better * (v1 - v0): exact on grid values
        s = s0 + better
    else:
        s = shared_exponent(amax, fmt, rule)
        mag = _magnitudes(ax, s, fmt)
    v = mag.mul_(torch.sign(xb)).add_(0.0)  # sign(0) = 0; + 0.0 turns -0.0 into +0.0
    byte = _byte(s)
    deq = None
    if want_deq:  # exact: grid value times the stored power of two
        deq = (v * torch.exp2(byte.to(torch.float32) - 127)).reshape(r, k)
    return _codes(v, fmt).reshape(r, k), byte.reshape(r, k // BLOCK), deq


def quantize_rule_2d(x: torch.Tensor, fmt: str, rule: str, want_deq: bool):
    """2-D ``x`` -> (codes uint8 [N, K], scale bytes uint8 [N, K/32], dequantized fp32 [N, K] or None)."""
    if fmt not in FORMAT_RULES:
        raise ValueError(f"unknown element format {fmt!r}")
    if rule not in FORMAT_RULES[fmt]:
        raise ValueError(f"weight rule {rule!r} does not apply to {fmt}; valid: {list(FORMAT_RULES[fmt])}")
    if x.dim() != 2 or x.shape[1] % BLOCK:
        raise ValueError(f"expected a 2-D weight with K a multiple of {BLOCK}, got shape {tuple(x.shape)}")
    n, k = x.shape
    codes = torch.empty(n, k, dtype=torch.uint8, device=x.device)
    scale = torch.empty(n, k // BLOCK, dtype=torch.uint8, device=x.device)
    deq = torch.empty(n, k, dtype=torch.float32, device=x.device) if want_deq else None
    for r0, r1 in row_chunks(n, k):
        c, s, d = _quantize_chunk(x[r0:r1].to(torch.float32), fmt, rule, want_deq)
        codes[r0:r1] = c
        scale[r0:r1] = s
        if want_deq:
            deq[r0:r1] = d
    return codes, scale, deq


def quantize_mx_rule(x: torch.Tensor, fmt: str, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D ``x`` (any float dtype; computed in fp32) -> (codes uint8 [N, K], scale uint8 [N, K/32]).

    Rows are processed in chunks, so temporaries stay small whatever the size of ``x``.
    """
    codes, scale, _ = quantize_rule_2d(x, fmt, rule, False)
    return codes, scale


def pack_codes(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    return pack_fp4(codes) if fmt == "fp4_e2m1" else codes.view(torch.float8_e4m3fn)


def dual_level0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L0 float32 [N, K/512], W' = fp32(W) / L0 float32 [N, K])  (msmodelslim dualscale)."""
    n, k = w.shape
    wb = w.to(torch.float32).reshape(n, k // DUAL_BLOCK, DUAL_BLOCK)
    l0 = wb.abs().amax(dim=-1, keepdim=True) / FP4_MAX
    wp = torch.where(l0 > 0, wb / torch.where(l0 > 0, l0, 1.0), 0.0)
    return l0.reshape(n, k // DUAL_BLOCK), wp.reshape(n, k)
