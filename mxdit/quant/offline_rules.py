"""Offline weight quantization rules for MX checkpoints (``mxdit quantize``).

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

Dual-scale (W4A4_MXFP4_DUALSCALE, msmodelslim ``dualscale.py``): per 512
elements L0 = amax / 6.0 (a true fp32 division), W' = fp32(W) / L0 kept in
fp32, then per-32 MXFP4 on W' with the chosen rule; stored as
``weight_dual_scale`` float32 [N, K/512, 1].  An all-zero 512-block gets L0 = 0
and zero elements (msmodelslim would divide 0 by 0).

Measured weight error (``benchmarks/bench_weight_rules.py``: SQNR in dB of
the dequantized weight, higher is better; 1024 x 5120 fp32 matrices, seed 0):

====================  ============  =====  =====  ======  ======  =====
scheme                distribution  floor  rceil  minmax  ceil_x  mse
====================  ============  =====  =====  ======  ======  =====
W8A8_MXFP8            gaussian      30.67  31.54  30.67   n/a     31.54
W8A8_MXFP8            heavy-tailed  29.46  31.55  29.46   n/a     31.55
W4A4_MXFP4            gaussian      18.86  18.52  19.01   19.05   19.06
W4A4_MXFP4            heavy-tailed  16.96  16.38  17.10   17.20   17.23
W4A4_MXFP4_DUALSCALE  gaussian      18.77  18.96  19.06   19.08   19.08
W4A4_MXFP4_DUALSCALE  heavy-tailed  17.58  17.21  17.70   17.77   17.78
====================  ============  =====  =====  ======  ======  =====

(gaussian: N(0, 0.02), Wan-like; heavy-tailed: Student-t with 4 degrees of
freedom times a log-normal per-input-channel scale (sigma 0.5) times 0.02.)
``mse`` is the best rule for every scheme and distribution -- by construction,
see above -- at twice the quantization cost, so it is the default
(:data:`DEFAULT_RULES`).  What the measurement adds: for MXFP8 the floor rule
(OCP, and msmodelslim's minmax, identical up to ties) loses 0.9-2.1 dB
because E4M3 saturates scaled block maxima in [448, 512) to 448; the
per-block choice recovers it (rceil gets the same result for MXFP8 but is the
worst rule for MXFP4).  For MXFP4, msmodelslim's ceil_x (c = 7.25) is the best
fixed rule, 0.2-0.3 dB above OCP floor and within 0.03 dB of ``mse``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from mxdit import formats as F
from mxdit.formats.elements import FP4_E2M1, FP8_E4M3, encode_elements
from mxdit.formats.packing import pack_fp4

BLOCK = 32
DUAL_BLOCK = F.L0_BLOCK  # 512
FP4_MAX = 6.0
CEIL_X_VALUE = 7.25
_EPS = 9.6e-7  # msmodelslim's "numerical stability" term
_FP32_MIN_NORMAL = 2.0**-126

#: scheme label -> element format
SCHEME_FORMAT = {
    "W8A8_MXFP8": "fp8_e4m3",
    "W4A4_MXFP4": "fp4_e2m1",
    "W4A4_MXFP4_DUALSCALE": "fp4_e2m1",
    "W4A4_DYNAMIC": "int4",  # int4 per output channel (not MX): see quantize_int4_weight
}
#: K must be a multiple of this for the scheme
SCHEME_K_MULTIPLE = {"W8A8_MXFP8": BLOCK, "W4A4_MXFP4": BLOCK, "W4A4_MXFP4_DUALSCALE": DUAL_BLOCK,
                     "W4A4_DYNAMIC": 8}  # the NPU's int4 packing holds 8 values per int32

RULES = ("floor", "rceil", "minmax", "ceil_x", "mse")
#: rules each element format supports (ceil_x is an MXFP4 method in msmodelslim)
FORMAT_RULES = {"fp8_e4m3": ("floor", "rceil", "minmax", "mse"), "fp4_e2m1": RULES, "int4": ("minmax",)}
#: the measured winner per scheme (module docstring)
DEFAULT_RULES = {"W8A8_MXFP8": "mse", "W4A4_MXFP4": "mse", "W4A4_MXFP4_DUALSCALE": "mse", "W4A4_DYNAMIC": "minmax"}

#: rows per chunk are chosen so that a chunk holds about this many elements
_CHUNK_ELEMENTS = 1 << 18


def check_rule(scheme: str, rule: str) -> None:
    if scheme not in SCHEME_FORMAT:
        raise ValueError(f"unknown scheme {scheme!r}; valid: {sorted(SCHEME_FORMAT)}")
    if rule not in FORMAT_RULES[SCHEME_FORMAT[scheme]]:
        raise ValueError(
            f"weight rule {rule!r} does not apply to {scheme}; valid: {list(FORMAT_RULES[SCHEME_FORMAT[scheme]])}"
        )


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
        q = F.quantize_mx(x, fmt, scale_mode=rule, round_mode="rint")
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


def _rows_per_chunk(k: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(k, 1))


# ---------------------------------------------------------------------------- public API
@dataclass
class QuantizedWeight:
    """One quantized weight in msmodelslim storage.

    qdata: FP8 -> float8_e4m3fn [N, K]; FP4 -> packed uint8 [N, K/2] (even k in the low nibble).
    scale: uint8 E8M0 bytes [N, K/32].  dual_scale: float32 [N, K/512] (dual-scale only).
    """

    scheme: str
    qdata: torch.Tensor
    scale: torch.Tensor
    dual_scale: Optional[torch.Tensor] = None
    #: the dequantized weight, fp32 [N, K], when the quantizer was asked to keep it
    deq: Optional[torch.Tensor] = None

    @property
    def fmt(self) -> str:
        return SCHEME_FORMAT[self.scheme]

    def mx(self) -> F.MXTensor:
        return F.MXTensor(self.qdata, self.scale, self.fmt, BLOCK)

    def dual(self) -> F.DualMXTensor:
        return F.DualMXTensor(self.qdata, self.dual_scale, self.scale)

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]."""
        if self.deq is not None:
            return self.deq
        if self.fmt == "int4":
            return self.qdata.to(torch.float32) * self.scale
        if self.dual_scale is not None:
            return self.dual().dequantize(torch.float32)
        return self.mx().dequantize(torch.float32)


def _quantize_2d(x: torch.Tensor, fmt: str, rule: str, want_deq: bool):
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
    step = _rows_per_chunk(k)
    for r0 in range(0, n, step):
        c, s, d = _quantize_chunk(x[r0 : r0 + step].to(torch.float32), fmt, rule, want_deq)
        codes[r0 : r0 + step] = c
        scale[r0 : r0 + step] = s
        if want_deq:
            deq[r0 : r0 + step] = d
    return codes, scale, deq


def quantize_mx_rule(x: torch.Tensor, fmt: str, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D ``x`` (any float dtype; computed in fp32) -> (codes uint8 [N, K], scale uint8 [N, K/32]).

    Rows are processed in chunks, so temporaries stay small whatever the size of ``x``.
    """
    codes, scale, _ = _quantize_2d(x, fmt, rule, False)
    return codes, scale


def _pack(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    return pack_fp4(codes) if fmt == "fp4_e2m1" else codes.view(torch.float8_e4m3fn)


def dual_level0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L0 float32 [N, K/512], W' = fp32(W) / L0 float32 [N, K])  (msmodelslim dualscale)."""
    n, k = w.shape
    wb = w.to(torch.float32).reshape(n, k // DUAL_BLOCK, DUAL_BLOCK)
    l0 = wb.abs().amax(dim=-1, keepdim=True) / FP4_MAX
    wp = torch.where(l0 > 0, wb / torch.where(l0 > 0, l0, 1.0), 0.0)
    return l0.reshape(n, k // DUAL_BLOCK), wp.reshape(n, k)


def quantize_weight(w: torch.Tensor, scheme: str, rule: Optional[str] = None, *,
                    keep_dequantized: bool = False) -> QuantizedWeight:
    """Quantize a 2-D weight [N, K] (bf16/fp16/fp32) for ``scheme`` with ``rule`` (default: DEFAULT_RULES).

    ``keep_dequantized``: also return the dequantized weight (``.deq``, fp32), computed from the
    quantizer's own values (cheaper than decoding the stored bytes; the same numbers).
    """
    rule = rule or DEFAULT_RULES[scheme]
    check_rule(scheme, rule)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    mult = SCHEME_K_MULTIPLE[scheme]
    if w.shape[1] % mult:
        raise ValueError(f"{scheme} needs K (in_features) to be a multiple of {mult}, got {w.shape[1]}")
    fmt = SCHEME_FORMAT[scheme]
    n, k = w.shape
    if fmt == "int4":
        q, scale = quantize_int4_weight(w)
        return QuantizedWeight(scheme, q, scale, None, q.to(torch.float32) * scale if keep_dequantized else None)
    if scheme == "W4A4_MXFP4_DUALSCALE":
        l0 = torch.empty(n, k // DUAL_BLOCK, dtype=torch.float32, device=w.device)
        codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
        scale = torch.empty(n, k // BLOCK, dtype=torch.uint8, device=w.device)
        deq = torch.empty(n, k, dtype=torch.float32, device=w.device) if keep_dequantized else None
        step = _rows_per_chunk(k)
        for r0 in range(0, n, step):
            l0c, wp = dual_level0(w[r0 : r0 + step])
            c, s, d = _quantize_2d(wp, fmt, rule, keep_dequantized)
            l0[r0 : r0 + step], codes[r0 : r0 + step], scale[r0 : r0 + step] = l0c, c, s
            if keep_dequantized:
                rows = d.shape[0]
                deq[r0 : r0 + step] = (d.reshape(rows, k // DUAL_BLOCK, DUAL_BLOCK) * l0c.unsqueeze(-1)).reshape(rows, k)
        return QuantizedWeight(scheme, _pack(codes, fmt), scale, l0, deq)
    codes, scale, deq = _quantize_2d(w, fmt, rule, keep_dequantized)
    return QuantizedWeight(scheme, _pack(codes, fmt), scale, None, deq)


INT4_MAX = 7.0


def quantize_int4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W4A4_DYNAMIC weights, symmetric min-max per output channel (the "minmax" rule):
    scale = max_k |w| / 7 (fp32; all-zero rows get fp32 tiny), q = round(w / scale) (half to even),
    clamped to [-8, 7].  Returns (q int8 [N, K], scale float32 [N, 1]); weight_offset is zero.

    msmodelslim's W4A4_DYNAMIC processor (ir/w4a4_dynamic.py, mx-attention.md §5) also offers
    asymmetric weights; SGLang's NPU kernel ignores weight_offset, so mxdit writes symmetric ones only.
    That msmodelslim's symmetric observer is exactly this min-max rule is our reading, not verified
    against its code here.
    """
    wf = w.to(torch.float32)
    amax = wf.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    scale = amax / torch.full_like(amax, INT4_MAX)
    q = torch.round(wf / scale).clamp(-8, 7).to(torch.int8)
    return q, scale


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(sum ref^2 / sum (ref - approx)^2), float64; inf when exact."""
    ref = ref.to(torch.float64)
    err = float(((ref - approx.to(torch.float64)) ** 2).sum())
    sig = float((ref**2).sum())
    if err == 0:
        return math.inf
    if sig == 0:
        return -math.inf
    return 10.0 * math.log10(sig / err)


# ---------------------------------------------------------------------------- measurement
def synthetic_weight(kind: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Test weights for the rule measurement: ``gaussian`` N(0, 0.02) (Wan-like init) or
    ``heavy-tailed`` (Student-t, 4 dof, times a log-normal per-input-channel scale, x0.02)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, k, generator=g) * 0.02
    if kind == "heavy-tailed":
        nu = 4.0
        z = torch.randn(n, k, generator=g)
        chi2 = torch.distributions.Chi2(torch.tensor(nu))
        torch.manual_seed(seed)
        t = z / torch.sqrt(chi2.sample((n, k)) / nu)
        col = torch.exp(torch.randn(1, k, generator=g) * 0.5)
        return t * col * 0.02
    raise ValueError(f"unknown distribution {kind!r}")


def measure_rules(n: int = 1024, k: int = 5120, seed: int = 0,
                  distributions=("gaussian", "heavy-tailed")) -> list[dict]:
    """Weight SQNR (dB) of every rule for every scheme and distribution (rows of a table)."""
    rows = []
    for dist in distributions:
        w = synthetic_weight(dist, n, k, seed)
        for scheme, fmt in SCHEME_FORMAT.items():
            row = {"scheme": scheme, "distribution": dist}
            for rule in RULES:
                if rule in FORMAT_RULES[fmt]:
                    row[rule] = sqnr_db(w, quantize_weight(w, scheme, rule).dequantize())
                else:
                    row[rule] = None
            rows.append(row)
    return rows
