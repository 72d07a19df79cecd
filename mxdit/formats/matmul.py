"""Reference matmuls with fp32 accumulation: the CPU backend and the oracle
that accelerated kernels are tested against.

* :func:`mx_matmul` — MX x MX, blocks of 32 along K:
  out[m, n] = sum_j dot32_j(a, b) * 2^(sa_j-127) * 2^(sb_j-127) + bias[n].
  Each element times its power-of-two scale is exact in fp32 (the smallest
  product, 2^-16 * 2^-127 for E5M2, is above fp32's 2^-149), so this equals an
  fp32 GEMM of the dequantized operands; only the summation order is free.
* :func:`dual_mx_matmul` — dual-level MXFP4, the golden formula of
  ``npu_dual_level_quant_matmul`` (../shared/reference/ascend-npu-mx.md §1.3):
  out[m, n] = sum_g0 l0a[m,g0] * l0b[g0,n] * (sum over the 16 32-blocks of g0 of
  2^(ea-127) * 2^(eb-127) * dot32) + bias[n].  The inner sums are exact-scaled
  fp32 GEMMs per 512-group, each multiplied by its two L0 scales.
"""
from __future__ import annotations

from typing import Optional

import torch

from mxdit.formats.dual import L0_BLOCK, DualMXTensor
from mxdit.formats.mx import MXTensor


def _finish(out: torch.Tensor, bias: Optional[torch.Tensor], lead, out_dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.reshape(*lead, out.shape[-1]).to(out_dtype)


def mx_matmul(
    a: MXTensor,
    b: MXTensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """a [..., K] (activations) x b [N, K] (weights)^T -> [..., N]."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"mx_matmul: K mismatch, a has {a.shape[-1]}, b has {b.shape[-1]}")
    if a.block_size != b.block_size:
        raise ValueError(f"mx_matmul: block sizes differ ({a.block_size} vs {b.block_size})")
    if len(b.shape) != 2:
        raise ValueError(f"mx_matmul: b must be 2-D [N, K], got shape {tuple(b.shape)}")
    lead = a.shape[:-1]
    af = a.dequantize(torch.float32).reshape(-1, a.shape[-1])
    bf = b.dequantize(torch.float32)
    return _finish(af @ bf.t(), bias, lead, out_dtype)


def dual_mx_matmul(
    a: DualMXTensor,
    b: DualMXTensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """a [..., K] x b [N, K]^T -> [..., N], dual-level golden formula."""
    k = a.shape[-1]
    if k != b.shape[-1]:
        raise ValueError(f"dual_mx_matmul: K mismatch, a has {k}, b has {b.shape[-1]}")
    if len(b.shape) != 2:
        raise ValueError(f"dual_mx_matmul: b must be 2-D [N, K], got shape {tuple(b.shape)}")
    lead = a.shape[:-1]
    a1 = a.dequantize_l1().reshape(-1, k)
    b1 = b.dequantize_l1()
    l0a = a.scale_l0.reshape(-1, k // L0_BLOCK)
    l0b = b.scale_l0
    out = torch.zeros(a1.shape[0], b1.shape[0], dtype=torch.float32, device=a1.device)
    for g in range(k // L0_BLOCK):  # one fp32 GEMM per 512-group (K/512 <= 28 for Wan)
        sl = slice(g * L0_BLOCK, (g + 1) * L0_BLOCK)
        partial = a1[:, sl] @ b1[:, sl].t()
        out += (l0a[:, g : g + 1] * l0b[:, g].unsqueeze(0)) * partial
    return _finish(out, bias, lead, out_dtype)
