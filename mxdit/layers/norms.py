"""Normalisation layers with diffusers' numerics.

* :class:`FP32LayerNorm`: LayerNorm computed in float32 whatever the input
  dtype, result cast back to the input dtype (diffusers ``FP32LayerNorm``).
  Wan uses it for every LayerNorm (block norm1/norm2/norm3, ``norm_out``).
* :class:`RMSNorm`: ``x / rms(x) * weight`` over the last dimension, the Wan
  qk-norm over all heads (``heads * head_dim`` features, applied before the head
  split).  Same op as ``torch.nn.RMSNorm`` (``F.rms_norm``), which diffusers uses.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class FP32LayerNorm(nn.Module):
    """LayerNorm over the last ``dim`` features, computed in float32.

    Parameters (``weight``, ``bias``; only with ``elementwise_affine``) are kept in
    ``dtype`` (default float32) and upcast for the computation.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        dtype: Optional[torch.dtype] = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        dtype = dtype or torch.float32
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
            self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x.float(),
            (self.dim,),
            None if self.weight is None else self.weight.float(),
            None if self.bias is None else self.bias.float(),
            self.eps,
        ).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class RMSNorm(nn.Module):
    """RMSNorm over the last ``dim`` features with a learned scale (``torch.nn.RMSNorm`` numerics)."""

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        dtype: Optional[torch.dtype] = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm({self.dim}): input has {x.shape[-1]} features")
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
