"""Dual-level MXFP4, the Ascend A5 scheme: an fp32 scale per 512 elements (L0)
and an E8M0 scale per 32 (L1) on FP4 E2M1 elements.

Exactly the documented semantics of ``torch_npu.npu_dynamic_dual_level_mx_quant``
(../shared/reference/ascend-npu-mx.md §1.2), step by step:

1. optional smoothing, ``x * smooth_scale`` in x's dtype;
2. per 512 elements: amax of |x| with Inf/NaN counted as 0;
   L0 = fp32(amax) * fp32(1/6) (the constant 0x3E2AAAAB: a multiply by the
   rounded reciprocal, not a division by 6); L0 < 2^-126 is flushed to 0;
3. temp = fp32(x) / L0 (fp32 division), rounded to nearest-even into x's
   dtype; an element equal to 0 keeps its value (avoids 0/0). A non-zero
   element of a flushed group divides by 0 and becomes +-Inf, exactly as the
   kernel's formula does; its 32-block then gets the NaN scale (step 4);
4. per 32 elements of temp: E = the largest biased exponent field (the bf16
   and fp32 exponent fields coincide; fp16 temp is truncated to bf16 for this
   step, which keeps the exponent): E = 255 -> L1 = 0xFF; E = 0 -> L1 = 0 and
   the block's outputs are 0; E <= 2 -> L1 = 0; otherwise L1 = E - 2
   (= floor(log2 max|temp|) - emax(FP4) + 127);
5. y = FP4(temp * 2^-(L1-127)), saturating, with ``round_mode``.  The kernel
   multiplies in bf16 for bf16 input; the product is an exact power-of-two
   scaling, so fp32 gives the same value except below bf16's normal range,
   where FP4 rounds to 0 either way.

Dequantize: x' = fp4 * 2^(L1-127) * L0 (the smoothed x when smoothing was used).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mxdit.formats.e8m0 import NAN_BYTE, e8m0_reciprocal, e8m0_to_float
from mxdit.formats.elements import FP4_E2M1, check_round_mode, decode_fp4_packed, encode_elements
from mxdit.formats.packing import pack_fp4, unpack_fp4

L0_BLOCK = 512
L1_BLOCK = 32
FP32_ONE_SIXTH = torch.tensor(1.0 / 6.0, dtype=torch.float32)  # 0x3E2AAAAB
_FLUSH = 2.0**-126


@dataclass
class DualMXTensor:
    """qdata uint8 [..., K/2] (packed FP4), scale_l0 float32 [..., K/512], scale_l1 uint8 [..., K/32]."""

    qdata: torch.Tensor
    scale_l0: torch.Tensor
    scale_l1: torch.Tensor

    fmt = "fp4_e2m1"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.qdata.shape[:-1], self.qdata.shape[-1] * 2))

    def codes(self) -> torch.Tensor:
        return unpack_fp4(self.qdata)

    def dequantize_l1(self) -> torch.Tensor:
        """fp4 * 2^(L1-127) in fp32 [..., K] (exact), without the L0 factor."""
        v = decode_fp4_packed(self.qdata)
        k = v.shape[-1]
        v = v.reshape(*v.shape[:-1], k // L1_BLOCK, L1_BLOCK) * e8m0_to_float(self.scale_l1).unsqueeze(-1)
        return v.reshape(*v.shape[:-2], k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        v = self.dequantize_l1()
        k = v.shape[-1]
        v = v.reshape(*v.shape[:-1], k // L0_BLOCK, L0_BLOCK) * self.scale_l0.unsqueeze(-1)
        return v.reshape(*v.shape[:-2], k).to(dtype)

    def to(self, device) -> "DualMXTensor":
        return DualMXTensor(self.qdata.to(device), self.scale_l0.to(device), self.scale_l1.to(device))

    @property
    def nbytes(self) -> int:
        return self.qdata.numel() + self.scale_l0.numel() * 4 + self.scale_l1.numel()


def quantize_mx_dual(
    x: torch.Tensor,
    *,
    smooth_scale: Optional[torch.Tensor] = None,
    round_mode: str = "rint",
) -> DualMXTensor:
    """Dual-level MXFP4 along the last axis (K a multiple of 512). See the module docstring."""
    check_round_mode(round_mode)
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"quantize_mx_dual: input dtype must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % L0_BLOCK:
        raise ValueError(
            f"quantize_mx_dual: the last dimension must be a multiple of {L0_BLOCK} "
            f"(dual-level MXFP4 has one fp32 scale per {L0_BLOCK} elements); shape {tuple(x.shape)}"
        )
    dtype = x.dtype
    if smooth_scale is not None:
        if smooth_scale.shape != (x.shape[-1],):
            raise ValueError(
                f"quantize_mx_dual: smooth_scale must have shape ({x.shape[-1]},), got {tuple(smooth_scale.shape)}"
            )
        x = x * smooth_scale.to(dtype)  # in x's dtype, as the kernel does
    k = x.shape[-1]
    lead = x.shape[:-1]
    xf = x.to(torch.float32).reshape(*lead, k // L0_BLOCK, L0_BLOCK)

    amax = xf.abs().amax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(amax).all()):  # rare: recompute with Inf/NaN counted as 0
        a = xf.abs()
        amax = torch.where(torch.isfinite(a), a, 0.0).amax(dim=-1, keepdim=True)
    l0 = amax * FP32_ONE_SIXTH.to(x.device)
    l0 = torch.where(l0 < _FLUSH, 0.0, l0)

    temp = xf / l0  # x == 0 gives a signed 0 here unless L0 == 0
    if bool((l0 == 0).any()):
        temp = torch.where(xf == 0, xf, temp)
    temp = temp.to(dtype).reshape(*lead, k // L1_BLOCK, L1_BLOCK)  # RNE into the input dtype
    tmax = temp.abs().amax(dim=-1, keepdim=True).to(torch.float32)  # NaN propagates -> exponent 255
    e = (tmax.view(torch.int32) >> 23) & 0xFF
    l1 = torch.where(e == 255, NAN_BYTE, torch.where(e <= 2, 0, e - 2)).to(torch.uint8)

    recip = e8m0_reciprocal(l1)
    if dtype == torch.bfloat16:
        y = temp * recip.to(torch.bfloat16)  # exact (elements.py, "bfloat16 fast path")
    else:
        y = temp.to(torch.float32) * recip
    codes = encode_elements(y, FP4_E2M1, round_mode)
    zero = (e == 0) | (e == 255)  # E = 0: outputs are 0 (documented); 0xFF blocks: no FP4 NaN, write 0
    if bool(zero.any()):
        codes = codes.masked_fill(zero, 0)
    codes = codes.reshape(*lead, k)
    return DualMXTensor(
        qdata=pack_fp4(codes),
        scale_l0=l0.reshape(*lead, k // L0_BLOCK),
        scale_l1=l1.reshape(*lead, k // L1_BLOCK),
    )
