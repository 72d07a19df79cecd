"""E8M0 scale bytes: value 2^(b-127); byte 0 is 2^-127 exactly; 255 is NaN.

Scales are computed from the exponent bits of fp32 values, never with a float
log2 and never with torch's ``.to(torch.float8_e8m0fnu)``, which rounds the
exponent (1.5 * 2^k goes up) and is neither the floor nor the rceil rule
(../shared/reference/mx-numerics.md §2.10).
"""
from __future__ import annotations

import torch

NAN_BYTE = 255
_F32_NAN_BITS = 0x7FC00000
_F32_2_POW_M127_BITS = 0x00400000  # 2^-127 is an fp32 subnormal


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """uint8 scale bytes -> float32 2^(b-127) (byte 0 -> 2^-127 exactly, 255 -> NaN)."""
    if scale.dtype != torch.uint8:
        raise TypeError(f"e8m0 scales must be uint8, got {scale.dtype}")
    b = scale.to(torch.int32)
    bits = torch.where(b == 0, _F32_2_POW_M127_BITS, b << 23)
    bits = torch.where(b == NAN_BYTE, _F32_NAN_BITS, bits)
    return bits.view(torch.float32)


def e8m0_reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """uint8 scale bytes -> float32 2^(127-b) exactly (254 -> 2^-127 subnormal, 255 -> NaN)."""
    b = scale.to(torch.int32)
    biased = 254 - b  # exponent field of 2^(127-b)
    bits = torch.where(biased == 0, _F32_2_POW_M127_BITS, biased << 23)
    bits = torch.where(b == NAN_BYTE, _F32_NAN_BITS, bits)
    return bits.view(torch.float32)


def _exponent_field(x_f32: torch.Tensor) -> torch.Tensor:
    return (x_f32.view(torch.int32) >> 23) & 0xFF


def scale_floor(amax: torch.Tensor, emax: int) -> torch.Tensor:
    """OCP rule: floor(log2(amax)) - emax from the exponent field, clamped to [-127, 127].

    Zero and fp32-subnormal amax have exponent field 0 and give byte 0
    (torchao FLOOR, mx-numerics.md §2.2).  A non-finite amax (the block holds
    Inf or NaN) gives 0xFF, as torchao main does (§2.6).
    """
    amax = amax.to(torch.float32)
    unbiased = _exponent_field(amax) - 127 - emax
    biased = unbiased.clamp(-127, 127) + 127
    return torch.where(torch.isfinite(amax), biased, NAN_BYTE).to(torch.uint8)


def scale_rceil(amax: torch.Tensor, max_value: float) -> torch.Tensor:
    """NVIDIA/cuBLAS rule as torchao main computes it (mx-numerics.md §2.2):

    descale = fp32(amax) * fp32(1/max_value); the byte is the exact ceiling of
    log2(descale) from its bits: normal values round up when any mantissa bit
    is set; fp32 subnormals round up to byte 1 only above 2^-127.
    """
    descale = amax.to(torch.float32) * torch.tensor(1.0 / max_value, dtype=torch.float32, device=amax.device)
    bits = descale.view(torch.int32)
    e = (bits >> 23) & 0xFF
    m = bits & 0x7FFFFF
    up = torch.where(e == 0, m > 0x400000, m != 0)
    biased = e + up.to(torch.int32)
    return torch.where(torch.isfinite(descale), biased, NAN_BYTE).to(torch.uint8)
