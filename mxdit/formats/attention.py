"""MXFP8 attention semantics: how Q, K and V are quantized, the NPU scale
layouts, and the one documented choice for P.

Sources: ../shared/reference/mx-attention.md §1, §3 (SGLang v0.5.23
``ascend_fa.py``; torch_npu ``npu_dynamic_mx_quant``) and ascend-npu-mx.md §1.1.

**Operands** (SGLang's MXFP8 FA, quant modes 6/6/8), exactly specified:

* Q and K: FP8 E4M3 with one E8M0 scale per 32 elements along head_dim, for
  each token and head (``npu_dynamic_mx_quant(x, dst_type=float8_e4m3fn,
  axis=-1)``) — :func:`quantize_qk_mxfp8`;
* V: FP8 E4M3 with one E8M0 scale per 32 *tokens* along the packed token axis
  T of the TND layout ``[B*S, N, D]`` (``axis=0``), for each head and channel
  — :func:`quantize_v_mxfp8`.  The blocks run over the packed axis, so with
  ``B > 1`` and ``S % 32 != 0`` a block spans two sequences, exactly as the
  NPU op sees it; a short tail block is quantized on its own (its padding is
  zero, which changes no amax).

Both use :func:`mxdit.formats.quantize_mx` (OCP floor scale, rint elements):
the one MX rounding rule of mxdit.  :func:`quantize_mx_along` moves the
quantized axis last, pads it to a whole block with zeros, and moves it back.

**Layouts**: per-block scales are kept with the block index at the quantized
axis (``[..., ceil(L/32), ...]``); :func:`npu_scale_layout` gives torch_npu's
layout — the axis becomes ``ceil(ceil(L/32)/2)`` with a trailing 2 (pairs of
consecutive blocks, the odd count padded with byte 0); for a non-last axis the
pair index stays at the axis and the pair member goes last
(``scale[..., j // 2, <other dims>, j % 2]`` holds block j).  For D=128, T
tokens: Q/K ``[T, N, 2, 2]``, V ``[ceil(T/64), N, 128, 2]``.

**P, the part no source specifies** (``quant_scale_p`` is documented as
reserved; modes 6/7/8 are undocumented): mxdit's emulation uses
:data:`P_HANDLING` = ``"p_fp32_unquantized"`` — S = (Q̂ K̂ᵀ)·scale in fp32,
softmax in fp32, P kept in fp32 (not quantized), O = P V̂ accumulated in
fp32, cast to the output dtype once.  :func:`attention_fp32` is that choice;
it is what the reference backend, the NPU emulation and the tests assume.  The
real Ascend kernel may quantize P (e.g. to FP8) and accumulate differently:
unverified, see the README.
"""
from __future__ import annotations

from typing import Optional

import torch

from mxdit.formats.e8m0 import e8m0_to_float
from mxdit.formats.elements import decode_elements
from mxdit.formats.mx import quantize_mx
from mxdit.formats.packing import pairs_to_scales, scales_to_pairs

MX_ATTENTION_BLOCK = 32
MX_ATTENTION_FMT = "fp8_e4m3"
#: the named choice for softmax P inside the quantized attention (see the module docstring)
P_HANDLING = "p_fp32_unquantized"


def _axis(x: torch.Tensor, axis: int) -> int:
    ax = axis + x.dim() if axis < 0 else axis
    if not 0 <= ax < x.dim():
        raise ValueError(f"axis {axis} out of range for a {x.dim()}-D tensor")
    return ax


def quantize_mx_along(
    x: torch.Tensor, axis: int, fmt: str = MX_ATTENTION_FMT, block_size: int = MX_ATTENTION_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """MX-quantize ``x`` in blocks of ``block_size`` along ``axis`` (a short tail block allowed).

    Returns ``(qdata, scale)``: qdata FP8 with x's shape; scale uint8 E8M0 with
    x's shape except ``ceil(L / block_size)`` at ``axis``.
    """
    if fmt not in ("fp8_e4m3", "fp8_e5m2"):
        raise ValueError(f"quantize_mx_along: fmt must be an FP8 format, got {fmt!r}")
    ax = _axis(x, axis)
    xt = x.movedim(ax, -1)
    n = xt.shape[-1]
    if n == 0:
        raise ValueError("quantize_mx_along: the quantized axis is empty")
    pad = (-n) % block_size
    if pad:
        xt = torch.nn.functional.pad(xt, (0, pad))
    q = quantize_mx(xt.contiguous(), fmt, block_size=block_size, scale_mode="floor", round_mode="rint")
    qdata = q.qdata[..., :n].movedim(-1, ax).contiguous()
    scale = q.scale.movedim(-1, ax).contiguous()
    return qdata, scale


def dequantize_mx_along(
    qdata: torch.Tensor, scale: torch.Tensor, axis: int, fmt: str = MX_ATTENTION_FMT,
    block_size: int = MX_ATTENTION_BLOCK, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_mx_along` (values * 2^(byte-127)), exact in fp32."""
    ax = _axis(qdata, axis)
    n = qdata.shape[ax]
    vals = decode_elements(qdata.view(torch.uint8), fmt)
    s = e8m0_to_float(scale).repeat_interleave(block_size, dim=ax).narrow(ax, 0, n)
    return (vals * s).to(dtype)


def quantize_qk_mxfp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q or K [..., D]: one scale per 32 along head_dim -> (fp8 [..., D], scale [..., D/32])."""
    if x.shape[-1] % MX_ATTENTION_BLOCK:
        raise ValueError(f"MXFP8 attention: head_dim {x.shape[-1]} must be a multiple of {MX_ATTENTION_BLOCK}")
    return quantize_mx_along(x, -1)


def quantize_v_mxfp8(v_tnd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V [T, N, D] (packed tokens): one scale per 32 tokens -> (fp8 [T, N, D], scale [ceil(T/32), N, D])."""
    if v_tnd.dim() != 3:
        raise ValueError(f"MXFP8 attention: V must be [T, N, D], got shape {list(v_tnd.shape)}")
    return quantize_mx_along(v_tnd, 0)


def npu_scale_layout(scale: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-block scales (block index at ``axis``) -> torch_npu's paired layout (see the module docstring)."""
    ax = _axis(scale, axis)
    if ax == scale.dim() - 1:
        return scales_to_pairs(scale)
    s = scale.movedim(ax, -1)
    pairs = scales_to_pairs(s)  # [..., m, 2]
    return pairs.movedim(-2, ax).contiguous()


def npu_scale_unlayout(pairs: torch.Tensor, axis: int, nblocks: int) -> torch.Tensor:
    """Inverse of :func:`npu_scale_layout`; ``axis`` is the quantized axis of the original tensor."""
    if pairs.shape[-1] != 2:
        raise ValueError(f"NPU MX scales need a trailing dimension of 2, got shape {list(pairs.shape)}")
    ax = _axis(pairs.select(-1, 0), axis)
    if ax == pairs.dim() - 2:
        return pairs_to_scales(pairs, nblocks)
    p = pairs.movedim(ax, -2)
    return pairs_to_scales(p, nblocks).movedim(-1, ax).contiguous()


def attention_fp32(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: Optional[float] = None
) -> torch.Tensor:
    """The :data:`P_HANDLING` choice: fp32 scores, fp32 softmax, fp32 P (unquantized), fp32 P@V.

    q [B, Lq, H, D], k/v [B, Lk, H, D] (already dequantized) -> fp32 [B, Lq, H, D].
    """
    d = q.shape[-1]
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    qf, kf, vf = (t.to(torch.float32).transpose(1, 2) for t in (q, k, v))
    s = (qf @ kf.transpose(-1, -2)) * scale
    p = torch.softmax(s, dim=-1)
    return (p @ vf).transpose(1, 2)


def mxfp8_attention_operands(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dequantized MXFP8 operands (fp32) of BSND q, k, v — what the kernel computes with."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("MXFP8 attention expects q, k, v as [B, L, H, D]")
    qq, qs = quantize_qk_mxfp8(q)
    kq, ks = quantize_qk_mxfp8(k)
    b, lk, h, d = v.shape
    vq, vs = quantize_v_mxfp8(v.reshape(b * lk, h, d))
    qd = dequantize_mx_along(qq, qs, -1)
    kd = dequantize_mx_along(kq, ks, -1)
    vd = dequantize_mx_along(vq, vs, 0).reshape(b, lk, h, d)
    return qd, kd, vd


__all__ = [
    "MX_ATTENTION_BLOCK", "MX_ATTENTION_FMT", "P_HANDLING",
    "quantize_mx_along", "dequantize_mx_along", "quantize_qk_mxfp8", "quantize_v_mxfp8",
    "npu_scale_layout", "npu_scale_unlayout", "attention_fp32", "mxfp8_attention_operands",
]
