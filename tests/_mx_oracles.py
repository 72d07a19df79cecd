"""Independent oracles for the mxdit.formats test-suite.

Everything here is written from the reference documents
(/work/shared/reference/mx-numerics.md, ascend-npu-mx.md) and plain float
math -- never from mxdit's implementation.  float64 numpy is used as the
"exact" arithmetic: every product ``x * 2**k`` of an fp32/bf16/fp16 value with
a power of two that we form here is exact in float64, so rounding happens only
where we round explicitly.

Conventions
-----------
* element codes are the unpacked bit patterns: fp4 code 0..15 (sign = bit 3),
  fp8 code = the float8 byte.
* magnitude codes are monotone in magnitude for all three formats, so "the
  grid index" and "the magnitude code" are the same thing; "even" (for ties)
  means an even magnitude code (mantissa LSB 0).
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch

FMTS = ("fp4_e2m1", "fp8_e4m3", "fp8_e5m2")
SCALE_MODES = ("floor", "rceil")
ROUND_MODES = ("rint", "round", "floor")


@dataclass(frozen=True)
class Spec:
    name: str
    ebits: int
    mbits: int
    bias: int
    emax: int  # floor(log2(max normal)) -- the OCP "emax_elem"
    max: float
    max_code: int  # magnitude code of +max
    sign_bit: int
    ml_dtype: object
    torch_dtype: object  # torch storage dtype of MXTensor.qdata (fp4: uint8 packed)
    torchao_elem: object  # elem_dtype argument of torchao to_mx

    @property
    def emin(self) -> int:  # exponent of the smallest normal
        return 1 - self.bias


SPECS = {
    "fp4_e2m1": Spec("fp4_e2m1", 2, 1, 1, 2, 6.0, 0x7, 0x8, ml_dtypes.float4_e2m1fn,
                     torch.uint8, torch.float4_e2m1fn_x2),
    "fp8_e4m3": Spec("fp8_e4m3", 4, 3, 7, 8, 448.0, 0x7E, 0x80, ml_dtypes.float8_e4m3fn,
                     torch.float8_e4m3fn, torch.float8_e4m3fn),
    "fp8_e5m2": Spec("fp8_e5m2", 5, 2, 15, 15, 57344.0, 0x7B, 0x80, ml_dtypes.float8_e5m2,
                     torch.float8_e5m2, torch.float8_e5m2),
}


def code_magnitude(code: int, spec: Spec) -> float:
    """Value of a non-negative magnitude code, from the IEEE-style definition."""
    e = code >> spec.mbits
    m = code & ((1 << spec.mbits) - 1)
    if e == 0:
        return m * 2.0 ** (spec.emin - spec.mbits)
    return (1.0 + m / 2.0 ** spec.mbits) * 2.0 ** (e - spec.bias)


GRID = {f: np.array([code_magnitude(c, s) for c in range(s.max_code + 1)], dtype=np.float64)
        for f, s in SPECS.items()}
assert GRID["fp4_e2m1"].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
assert GRID["fp8_e4m3"][-1] == 448.0 and GRID["fp8_e5m2"][-1] == 57344.0


def ref_round(v, fmt: str, mode: str = "rint") -> np.ndarray:
    """Round real values ``v`` (float64, finite) onto the element grid, saturating.

    rint  = nearest, ties to the even code; round = nearest, ties away from 0;
    floor = toward zero (largest grid magnitude <= |v|).  |v| >= max -> max.
    The sign is kept, so a negative value that rounds to 0 gives -0 (sign bit).
    """
    spec = SPECS[fmt]
    g = GRID[fmt]
    v = np.asarray(v, dtype=np.float64)
    assert np.all(np.isfinite(v)), "ref_round takes finite values only"
    a = np.abs(v)
    i = np.searchsorted(g, a, side="right") - 1  # g[i] <= a
    top = i >= len(g) - 1
    ic = np.minimum(i, len(g) - 2)
    lo, hi = g[ic], g[ic + 1]
    twice = 2.0 * a  # exact
    mid2 = lo + hi  # exact (grid values)
    if mode == "floor":
        idx = ic
    elif mode == "rint":
        idx = np.where(twice < mid2, ic, np.where(twice > mid2, ic + 1, np.where(ic % 2 == 0, ic, ic + 1)))
    elif mode == "round":
        idx = np.where(twice < mid2, ic, ic + 1)
    else:
        raise ValueError(mode)
    idx = np.where(a == lo, ic, idx)
    idx = np.where(top, len(g) - 1, idx)
    return (idx.astype(np.uint8) | np.where(np.signbit(v), spec.sign_bit, 0).astype(np.uint8)).astype(np.uint8)


def ref_decode(codes, fmt: str) -> np.ndarray:
    """float64 values of element codes (fp8 NaN codes -> NaN, e5m2 Inf -> Inf)."""
    spec = SPECS[fmt]
    c = np.asarray(codes, dtype=np.int64)
    mag = c & (spec.sign_bit - 1)
    out = np.empty(c.shape, dtype=np.float64)
    full = np.array([code_magnitude(k, spec) for k in range(spec.sign_bit)], dtype=np.float64)
    if fmt == "fp8_e4m3":
        full[0x7F] = np.nan
    if fmt == "fp8_e5m2":
        full[0x7C] = np.inf
        full[0x7D:0x80] = np.nan
    out[...] = full[mag]
    return np.where(c & spec.sign_bit, -out, out)


def f32_bits(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def exp_field(x) -> np.ndarray:
    """Biased fp32 exponent field (0 for zero/subnormal, 255 for Inf/NaN)."""
    return ((f32_bits(x) >> 23) & 0xFF).astype(np.int64)


F32_RECIP = {f: np.float32(1.0) / np.float32(s.max) for f, s in SPECS.items()}


def ref_scale_floor(amax, fmt: str) -> np.ndarray:
    """OCP FLOOR from the exponent bits: clamp(E(amax) - emax, -127, 127) + 127.
    Non-finite amax -> 255."""
    amax = np.asarray(amax, dtype=np.float32)
    s = np.clip(exp_field(amax) - 127 - SPECS[fmt].emax, -127, 127) + 127
    return np.where(np.isfinite(amax), s, 255).astype(np.uint8)


def exact_ceil_log2(d) -> np.ndarray:
    """ceil(log2(d)) exactly (d > 0 finite float64), via frexp: d = m * 2**e, m in [0.5, 1)."""
    m, e = np.frexp(np.asarray(d, dtype=np.float64))
    return np.where(m == 0.5, e - 1, e).astype(np.int64)


def ref_scale_rceil(amax, fmt: str) -> np.ndarray:
    """RCEIL (torchao main): descale = fp32(amax) * fp32(1/max) in fp32, then the exact
    power-of-two ceiling; clamp below to 2^-127; > 2^127 or non-finite -> 255."""
    amax = np.asarray(amax, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        d = amax * F32_RECIP[fmt]  # fp32 x fp32 -> fp32, RNE
    pos = np.isfinite(d) & (d > 0)
    c = exact_ceil_log2(np.where(pos, d, 1.0))
    s = np.where(pos, np.clip(c, -127, None) + 127, 0)
    s = np.where(pos & (c > 127), 255, s)
    return np.where(np.isfinite(d), s, 255).astype(np.uint8)


def to_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def ref_quantize_mx(x, fmt: str, scale_mode: str = "floor", round_mode: str = "rint", block_size: int = 32):
    """Reference MX quantization along the last axis (torchao *main* semantics).

    Returns (scale uint8 [..., K/bs], codes uint8 [..., K] (unpacked), special bool [..., K/bs]).
    ``special`` marks blocks with Inf/NaN (scale 255); their codes are left 0 here
    (callers check them separately).
    """
    xf = to_f64(x)
    *lead, K = xf.shape
    assert K % block_size == 0
    xb = xf.reshape(*lead, K // block_size, block_size)
    special = ~np.all(np.isfinite(xb), axis=-1)
    with np.errstate(invalid="ignore"):
        amax = np.max(np.where(np.isfinite(xb), np.abs(xb), 0.0), axis=-1).astype(np.float32)
    scale = ref_scale_floor(amax, fmt) if scale_mode == "floor" else ref_scale_rceil(amax, fmt)
    scale = np.where(special, 255, scale).astype(np.uint8)
    k = 127 - scale.astype(np.int64)
    v = np.ldexp(np.where(np.isfinite(xb), xb, 0.0), np.where(special, 0, k)[..., None])
    codes = ref_round(v, fmt, round_mode)
    codes = np.where(special[..., None], 0, codes).astype(np.uint8)
    return scale, codes.reshape(*lead, K), special


def pack_nibbles(codes) -> np.ndarray:
    c = np.asarray(codes, dtype=np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed) -> np.ndarray:
    p = np.asarray(packed, dtype=np.uint8)
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = p & 0xF
    out[..., 1::2] = p >> 4
    return out


def qdata_bytes(mx) -> np.ndarray:
    """MXTensor.qdata as a uint8 numpy array (packed for fp4, one byte per element for fp8)."""
    return mx.qdata.view(torch.uint8).cpu().numpy()


def qdata_codes(mx) -> np.ndarray:
    b = qdata_bytes(mx)
    return unpack_nibbles(b) if mx.fmt == "fp4_e2m1" else b


def e8m0_f64(scale) -> np.ndarray:
    s = np.asarray(scale, dtype=np.int64)
    return np.where(s == 255, np.nan, np.ldexp(1.0, s - 127))


def ref_dequant(scale, codes, fmt: str, block_size: int = 32) -> np.ndarray:
    vals = ref_decode(codes, fmt)
    *lead, K = vals.shape
    vb = vals.reshape(*lead, K // block_size, block_size) * e8m0_f64(scale)[..., None]
    return vb.reshape(*lead, K)


# --------------------------------------------------------------------------------------
# torchao 0.18.0 wrapper
# --------------------------------------------------------------------------------------

def torchao_to_mx(x: torch.Tensor, fmt: str, scale_mode: str, block_size: int = 32):
    """torchao 0.18.0 to_mx -> (scale uint8 numpy, qdata bytes numpy (fp4 packed))."""
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    mode = {"floor": ScaleCalculationMode.FLOOR, "rceil": ScaleCalculationMode.RCEIL}[scale_mode]
    s, d = to_mx(x.contiguous(), SPECS[fmt].torchao_elem, block_size, mode)
    return s.view(torch.uint8).numpy(), d.view(torch.uint8).numpy()


# --------------------------------------------------------------------------------------
# test data
# --------------------------------------------------------------------------------------

def tie_values(fmt: str) -> np.ndarray:
    """All exact midpoints between adjacent grid magnitudes (in element units)."""
    g = GRID[fmt]
    return (g[:-1] + g[1:]) / 2.0


def make_blocks(rng: np.random.Generator, nblocks: int, fmt: str | None = None,
                exp_lo: int = -60, exp_hi: int = 60) -> np.ndarray:
    """fp32 test blocks [nblocks, 32], amax always normal and well inside fp32 range.

    A mix of: randn * 2**k per block (k in [exp_lo, exp_hi]); per-element wide dynamic
    range inside a block (element underflow / subnormal element codes); exact element-grid
    ties at a random block scale; amax in the FLOOR saturation band [max, 2**(emax+1));
    random sign zeros sprinkled in; blocks with amax right at / next to max*2**k
    (RCEIL boundaries).
    """
    n = nblocks
    kinds = rng.integers(0, 6, size=n)
    k = rng.integers(exp_lo, exp_hi + 1, size=n).astype(np.float64)
    x = rng.standard_normal((n, 32))
    # kind 1: wide per-element dynamic range
    wide = kinds == 1
    x[wide] *= np.exp2(rng.integers(-40, 1, size=(int(wide.sum()), 32)))
    fmts = [fmt] if fmt else list(FMTS)
    # kind 2: ties on the element grid of a (random) format at block scale 2^k
    ties = np.where(kinds == 2)[0]
    for j, b in enumerate(ties):
        f = fmts[j % len(fmts)]
        t = tie_values(f)
        vals = rng.choice(t, size=32) * rng.choice([-1.0, 1.0], size=32)
        vals[0] = SPECS[f].max  # pins the FLOOR scale to 2^0 in element units
        x[b] = vals * 2.0 ** (-SPECS[f].emax)  # amax = max / 2**emax in [1, 2)
    # kind 3: amax in the saturation band [max, 2**(emax+1)) of some format
    sat = np.where(kinds == 3)[0]
    for j, b in enumerate(sat):
        f = fmts[j % len(fmts)]
        top = 2.0 ** (SPECS[f].emax + 1)
        x[b] = rng.uniform(-1, 1, size=32) * SPECS[f].max
        x[b, rng.integers(0, 32)] = rng.uniform(SPECS[f].max, top) * rng.choice([-1.0, 1.0])
        x[b] *= 2.0 ** (-SPECS[f].emax)
    # kind 4: amax = max * 2**j * (1 + d*ulp), d in {-1, 0, 1}  (RCEIL power-of-two boundary)
    bnd = np.where(kinds == 4)[0]
    for j, b in enumerate(bnd):
        f = fmts[j % len(fmts)]
        a = np.float32(SPECS[f].max * 2.0 ** (-SPECS[f].emax))
        d = rng.integers(-2, 3)
        a = np.nextafter(a, np.float32(np.inf if d > 0 else 0)) if d else a
        if abs(d) == 2:
            a = np.nextafter(a, np.float32(np.inf if d > 0 else 0))
        x[b] = rng.uniform(-1, 1, size=32) * float(a)
        x[b, rng.integers(0, 32)] = float(a) * rng.choice([-1.0, 1.0])
    # kind 5: some exact zeros (both signs)
    zs = kinds == 5
    mask = rng.random((int(zs.sum()), 32)) < 0.3
    sub = x[zs]
    sub[mask] = rng.choice([0.0, -0.0], size=int(mask.sum()))
    x[zs] = sub
    x *= np.exp2(k)[:, None]
    return x.astype(np.float32)


# --------------------------------------------------------------------------------------
# dual-level reference (ascend-npu-mx.md §1.2, CANN dynamic_dual_level_mx_quant kernel)
# --------------------------------------------------------------------------------------

L0_RECIP = np.array([0x3E2AAAAB], dtype=np.uint32).view(np.float32)[0]  # fp32(1/6)
F32_MIN_NORMAL = np.float32(2.0 ** -126)


def _round_to_dtype(x32: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """RNE of fp32 values into bf16/fp16, returned as exact float32."""
    if dtype == torch.bfloat16:
        return x32.astype(ml_dtypes.bfloat16).astype(np.float32)
    if dtype == torch.float16:
        with np.errstate(over="ignore"):
            return x32.astype(np.float16).astype(np.float32)
    raise ValueError(dtype)


def ref_quantize_dual(x: torch.Tensor, smooth: torch.Tensor | None = None, round_mode: str = "rint"):
    """Returns (codes uint8 [..., K] unpacked, l0 float32 [..., K/512], l1 uint8 [..., K/32],
    zero_l1 bool [..., K/32] (E == 0: outputs are signed zeros), nan_l1 bool (byte 255))."""
    dt = x.dtype
    x32 = x.detach().to(torch.float32).numpy()
    if smooth is not None:
        assert smooth.dtype == dt
        s32 = smooth.detach().to(torch.float32).numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            x32 = _round_to_dtype(x32 * s32, dt)  # product exact in fp32, one rounding to dt
    *lead, K = x32.shape
    assert K % 512 == 0
    b0 = x32.reshape(*lead, K // 512, 512)
    fin = np.isfinite(b0)
    amax = np.max(np.where(fin, np.abs(b0), np.float32(0)), axis=-1).astype(np.float32)
    l0 = (amax * L0_RECIP).astype(np.float32)  # fp32 multiply, RNE
    l0 = np.where(l0 < F32_MIN_NORMAL, np.float32(0), l0).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = (b0 / l0[..., None]).astype(np.float32)  # IEEE fp32 division
    temp = _round_to_dtype(q, dt)
    temp = np.where(b0 == 0, b0, temp).astype(np.float32)
    t1 = temp.reshape(*lead, K // 32, 32)
    E = exp_field(t1).max(axis=-1)
    l1 = np.where(E == 255, 255, np.where(E <= 2, 0, E - 2)).astype(np.uint8)
    zero_blk = E == 0
    nan_blk = E == 255
    ok = ~(zero_blk | nan_blk)
    kexp = np.where(ok, 127 - l1.astype(np.int64), 0)
    v = np.ldexp(np.where(ok[..., None], t1.astype(np.float64), 0.0), kexp[..., None])
    codes = ref_round(v, "fp4_e2m1", round_mode)
    # E == 0: the kernel multiplies by a zero reciprocal -> signed zeros
    zsign = np.where(np.signbit(t1), 8, 0).astype(np.uint8)
    codes = np.where(zero_blk[..., None], zsign, codes)
    codes = np.where(nan_blk[..., None], 0, codes).astype(np.uint8)
    return codes.reshape(*lead, K), l0, l1, zero_blk, nan_blk


def ref_dual_dequant(codes, l0, l1) -> np.ndarray:
    vals = ref_decode(codes, "fp4_e2m1")
    *lead, K = vals.shape
    v1 = vals.reshape(*lead, K // 32, 32) * e8m0_f64(l1)[..., None]
    v0 = v1.reshape(*lead, K // 512, 512) * np.asarray(l0, dtype=np.float64)[..., None]
    return v0.reshape(*lead, K)
