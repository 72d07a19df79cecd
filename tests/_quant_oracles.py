"""Independent oracles for the quantized-linear test-suite (test_quant_layers.py,
test_modelslim.py).

Written from the reference documents (/work/shared/reference/ascend-npu-mx.md
§0.2, §0.3, §1.2, §2.5, §3.2, §3.3) and plain float64 numpy -- never from the
layer's internals:

* weights are dequantized *from the stored bytes* with our own decoders: the
  FP4 E2M1 table {0, .5, 1, 1.5, 2, 3, 4, 6} (sign in bit 3, even K index in
  the low nibble), the FP8 E4M3 bit layout (bias 7, subnormals, 0x7F = NaN),
  E8M0 = 2^(b-127), the dual-level L0 float32 per 512;
* MX activations are quantized by the numerics core (``mxdit.formats``), as
  the issue allows, after the documented activation handling (per token,
  flattened to 2-D, cast to bf16 unless bf16/fp16, smoothing ``x * mul_scale``
  in the activation dtype); their bytes are then decoded by our decoders too;
* FP8 per-token and int8 activations are quantized by our own numpy code
  (amax / 448 resp. amax / 127, round half to even, saturate);
* the matmul is float64; the bias is added as its float32 value.

Tolerance (``check_output``): the layer accumulates in fp32, so it may differ
from the float64 reference by a few fp32 ulps of the *absolute* dot product
sum|x_k w_k| (``absdot``), plus rtol 1e-5 on fp32 outputs or one ulp of the
output format (bf16 / fp16) after the final cast.  A wrong scale, element,
nibble order or bias in any 32-block is orders of magnitude above this.
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import ml_dtypes
import numpy as np
import torch

import mxdit.formats as F

U32 = 2.0**-24  # fp32 unit roundoff

# ---- element / scale decoders (ascend-npu-mx.md §0.2, §0.3, §3.3) ------------

FP4_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)
FP4_LUT = np.concatenate([FP4_MAGNITUDES, -FP4_MAGNITUDES])  # code 8..15 = negatives (8 = -0)


def _e4m3_value(byte: int) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    e = (byte >> 3) & 0xF
    m = byte & 0x7
    if e == 0xF and m == 0x7:
        return float("nan")
    if e == 0:
        return sign * (m / 8.0) * 2.0**-6
    return sign * (1.0 + m / 8.0) * 2.0 ** (e - 7)


E4M3_LUT = np.array([_e4m3_value(b) for b in range(256)], dtype=np.float64)
assert E4M3_LUT[0x7E] == 448.0 and E4M3_LUT[0x01] == 2.0**-9 and np.isnan(E4M3_LUT[0xFF])

#: §3.3: the e4m3fn byte of each FP4 magnitude (value container of msmodelslim <= 26.0.0)
FP4_TO_E4M3_BYTE = {0.0: 0x00, 0.5: 0x30, 1.0: 0x38, 1.5: 0x3C, 2.0: 0x40, 3.0: 0x44, 4.0: 0x48, 6.0: 0x4C}


def as_u8(t: torch.Tensor) -> np.ndarray:
    """Raw bytes of a 1-byte torch tensor (uint8 / int8 / float8) as numpy uint8."""
    assert t.element_size() == 1, t.dtype
    return t.detach().contiguous().view(torch.uint8).cpu().numpy()


def unpack_fp4_codes(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., K/2] -> codes [..., K]: even K index = low nibble."""
    p = np.asarray(packed, dtype=np.uint8)
    out = np.empty((*p.shape[:-1], p.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def pack_fp4_codes(codes: np.ndarray) -> np.ndarray:
    c = np.asarray(codes, dtype=np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def fp4_codes_to_e4m3_bytes(codes: np.ndarray) -> np.ndarray:
    """FP4 codes -> the e4m3fn bytes of their values (table of §3.3, sign in bit 7)."""
    table = np.array([FP4_TO_E4M3_BYTE[m] for m in FP4_MAGNITUDES], dtype=np.uint8)
    c = np.asarray(codes, dtype=np.uint8)
    return (table[c & 7] | np.where(c & 8, 0x80, 0)).astype(np.uint8)


def e8m0(scale_bytes: np.ndarray) -> np.ndarray:
    b = np.asarray(scale_bytes, dtype=np.int64)
    v = np.ldexp(1.0, b - 127)
    return np.where(b == 255, np.nan, v)


def dequant_block32(values: np.ndarray, scale_bytes: np.ndarray) -> np.ndarray:
    """values [..., K] float64 times 2^(s-127) per 32 consecutive K elements."""
    s = np.repeat(e8m0(scale_bytes), 32, axis=-1)
    assert s.shape == values.shape, (s.shape, values.shape)
    return values * s


def dequant_mx(qdata, scale, fmt: str) -> np.ndarray:
    """MX bytes (torch or numpy) -> float64. fp4: packed uint8 [.., K/2]; fp8: e4m3 bytes [.., K]."""
    q = as_u8(qdata) if isinstance(qdata, torch.Tensor) else np.asarray(qdata, np.uint8)
    s = as_u8(scale) if isinstance(scale, torch.Tensor) else np.asarray(scale, np.uint8)
    if fmt == "fp4_e2m1":
        vals = FP4_LUT[unpack_fp4_codes(q)]
    elif fmt == "fp8_e4m3":
        vals = E4M3_LUT[q]
    else:
        raise ValueError(fmt)
    return dequant_block32(vals, s)


def dequant_dual(qdata, l1, l0) -> np.ndarray:
    """Dual-level: fp4 (packed) * 2^(l1-127) per 32 * l0 (float32) per 512 -> float64."""
    q = as_u8(qdata) if isinstance(qdata, torch.Tensor) else np.asarray(qdata, np.uint8)
    s = as_u8(l1) if isinstance(l1, torch.Tensor) else np.asarray(l1, np.uint8)
    g = l0.detach().cpu().numpy() if isinstance(l0, torch.Tensor) else np.asarray(l0)
    g = np.asarray(g, dtype=np.float32).astype(np.float64)
    g = g.reshape(*g.shape[:2]) if g.ndim == 3 else g  # [N, K/512, 1] -> [N, K/512]
    v = dequant_block32(FP4_LUT[unpack_fp4_codes(q)], s)
    return v * np.repeat(g, 512, axis=-1)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


# ---- activations -----------------------------------------------------------

def act_2d(x: torch.Tensor, mul_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Documented activation handling: flatten to [M, K]; bf16 unless bf16/fp16;
    smoothing x * mul_scale in that dtype (MindIE-SD casts mul_scale to it)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype not in (torch.bfloat16, torch.float16):
        x2 = x2.to(torch.bfloat16)
    if mul_scale is not None:
        x2 = x2 * mul_scale.to(x2.dtype)
    return x2


def act_mx(x2: torch.Tensor, fmt: str, round_mode: str = "rint") -> np.ndarray:
    q = F.quantize_mx(x2, fmt, scale_mode="floor", round_mode=round_mode)
    return dequant_mx(q.qdata, q.scale, fmt)


def act_dual(x2: torch.Tensor, round_mode: str = "rint") -> np.ndarray:
    q = F.quantize_mx_dual(x2, round_mode=round_mode)
    return dequant_dual(q.qdata, q.scale_l1, q.scale_l0)


def fp8_e4m3_rne(v32: np.ndarray) -> np.ndarray:
    """float32 -> e4m3fn value (float64), round half to even, saturating at 448 (ml_dtypes cast)."""
    v = np.clip(np.asarray(v32, np.float32), -448.0, 448.0)
    return v.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def fp8_per_row(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row FP8: scale = fp32(amax) / 448 in fp32 (amax 0 -> fp32 tiny), q = rne(v / scale).
    Returns (q values float64, scale float32 [rows, 1], q bytes)."""
    v = np.asarray(v, np.float32)
    amax = np.abs(v).max(axis=-1, keepdims=True)
    amax = np.maximum(amax, np.finfo(np.float32).tiny)
    scale = (amax / np.float32(448.0)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        r = (v / scale).astype(np.float32)
    q = np.clip(r, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)
    return q.astype(np.float64), scale, q.view(np.uint8)


def act_fp8(x2: torch.Tensor) -> np.ndarray:
    q, s, _ = fp8_per_row(x2.float().numpy())
    return q * s.astype(np.float64)


def int8_static(x2: torch.Tensor, input_scale: float, input_offset: float) -> np.ndarray:
    """quant_act = clamp(rint(act / input_scale + input_offset), -128, 127) in fp32 (§2.5, §3.2)."""
    v = x2.float().numpy()
    r = (v / np.float32(input_scale)).astype(np.float32) + np.float32(input_offset)
    return np.clip(np.rint(r.astype(np.float32)), -128, 127).astype(np.int64)


def int8_per_token(x2: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """npu_dynamic_quant: per-row scale = fp32(amax) / 127, q = clamp(rint(x / scale))."""
    v = x2.float().numpy()
    amax = np.maximum(np.abs(v).max(axis=-1, keepdims=True), np.finfo(np.float32).tiny)
    scale = (amax / np.float32(127.0)).astype(np.float32)
    q = np.clip(np.rint((v / scale).astype(np.float32)), -128, 127).astype(np.int64)
    return q, scale


# ---- comparison ------------------------------------------------------------

def ulp(v: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    mbits, emin = {torch.bfloat16: (7, -126), torch.float16: (10, -14), torch.float32: (23, -126)}[dtype]
    a = np.abs(v)
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.maximum(np.where(a > 0, e, emin), emin)
    return np.ldexp(1.0, (e - mbits).astype(np.int64))


def reference(xd: np.ndarray, wd: np.ndarray, bias: torch.Tensor | None):
    """float64 x @ w^T + fp32 bias; also the absolute sum used for the fp32 tolerance."""
    ref = xd @ wd.T
    absdot = np.abs(xd) @ np.abs(wd).T
    if bias is not None:
        b = bias.detach().to(torch.float32).to(torch.float64).numpy()
        ref = ref + b
        absdot = absdot + np.abs(b)
    return ref, absdot


def check_output(out: torch.Tensor, ref: np.ndarray, absdot: np.ndarray, *, what: str = "", k_ulps: float = 8.0) -> None:
    """out (any float dtype) against the float64 reference (see the module docstring)."""
    assert out.shape[-1] == ref.shape[-1]
    o = out.detach().reshape(-1, out.shape[-1]).to(torch.float64).numpy()
    assert np.all(np.isfinite(o)), f"{what}: non-finite outputs"
    acc = k_ulps * U32 * absdot
    if out.dtype == torch.float32:
        tol = 1e-5 * np.abs(ref) + acc
    else:
        tol = ulp(ref, out.dtype) + acc * 1.01
    err = np.abs(o - ref)
    bad = err > tol
    if bad.any():
        i = np.unravel_index(np.argmax(err - tol), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.size} outputs off; worst at {tuple(int(j) for j in i)}: "
            f"got {o[i]!r}, expected {ref[i]!r} (tol {tol[i]:.3g}, |err| {err[i]:.3g}, max|ref| {np.abs(ref).max():.3g})"
        )


def varied_weight(g: torch.Generator, n: int, k: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Gaussian weights whose 32-blocks span several binades (so scales differ per block)."""
    w = torch.randn(n, k, generator=g, dtype=torch.float32) * 0.05
    spread = torch.randint(-4, 4, (n, k // 32, 1), generator=g).to(torch.float32)
    w = (w.reshape(n, k // 32, 32) * torch.exp2(spread)).reshape(n, k)
    return w.to(dtype)


def varied_input(g: torch.Generator, shape, dtype=torch.bfloat16, zero_row: bool = True) -> torch.Tensor:
    """Activations with per-token magnitudes from 2^-6 to 2^5 and one all-zero token."""
    x = torch.randn(*shape, generator=g, dtype=torch.float32)
    lead = int(np.prod(shape[:-1]))
    mag = torch.exp2(torch.randint(-6, 6, (lead, 1), generator=g).to(torch.float32))
    x = (x.reshape(lead, shape[-1]) * mag)
    if zero_row and lead > 2:
        x[1] = 0.0
    return x.reshape(*shape).to(dtype)
