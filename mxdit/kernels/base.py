"""The kernel interface: quantize activations and run the quantized matmul,
one method per scheme, behind a backend chosen from the weights' device.

Every backend takes the *canonical* quantized weights the quant methods hold
(``mxdit.formats`` tensors: MXTensor, DualMXTensor; plain tensors for FP8 and
int8), may convert them once at load into its own layout (``prepare_*``:
transposes, NZ format, swizzled scales), and computes ``y = x W^T + b`` from a
2-D activation ``x`` [M, K].  Bias arrives in fp32 and is added in fp32; the
output is cast to ``out_dtype``.

Backends: ``reference`` (``mxdit.formats`` numerics on any torch device — the
oracle), ``npu`` (torch_npu ops), ``triton`` (CUDA kernels).  The reference
backend defines the semantics; the others must match it bit-exactly for
quantization and up to fp32 accumulation order for matmuls.
"""
from __future__ import annotations

from abc import ABC
from typing import Any, Optional

import torch

from mxdit import formats as F
from mxdit.formats import attention as FA


class KernelBackend(ABC):
    """Default implementations are the reference numerics (any device)."""

    name = "reference"

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        return True

    # ---- activations ------------------------------------------------------
    def quantize_mx(self, x: torch.Tensor, fmt: str, *, scale_mode: str = "floor", round_mode: str = "rint") -> F.MXTensor:
        return F.quantize_mx(x, fmt, scale_mode=scale_mode, round_mode=round_mode)

    def quantize_mx_dual(
        self, x: torch.Tensor, *, smooth_scale: Optional[torch.Tensor] = None, round_mode: str = "rint"
    ) -> F.DualMXTensor:
        return F.quantize_mx_dual(x, smooth_scale=smooth_scale, round_mode=round_mode)

    # ---- weights, once at load -------------------------------------------
    def prepare_mx_weight(self, w: F.MXTensor) -> Any:
        return w

    def prepare_dual_weight(self, w: F.DualMXTensor) -> Any:
        return w

    def prepare_fp8_weight(self, w: torch.Tensor, w_scale: torch.Tensor) -> Any:
        return (w, w_scale)

    def prepare_int8_weight(self, w: torch.Tensor) -> Any:
        return w

    def prepare_int4_weight(self, w: torch.Tensor) -> Any:
        """W4A4_DYNAMIC: ``w`` is int8 [N, K] holding int4 values in [-8, 7] (one per byte)."""
        return w

    # ---- matmuls ----------------------------------------------------------
    def mx_linear(
        self,
        x: torch.Tensor,
        w: Any,
        bias: Optional[torch.Tensor],
        *,
        act_fmt: str,
        scale_mode: str = "floor",
        round_mode: str = "rint",
        smooth_scale: Optional[torch.Tensor] = None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """MXFP8 / single-level MXFP4 (W8A8_MXFP8, W4A4_MXFP4): x [M, K] -> [M, N]."""
        if smooth_scale is not None:
            x = x * smooth_scale.to(x.dtype)
        xq = self.quantize_mx(x, act_fmt, scale_mode=scale_mode, round_mode=round_mode)
        return F.mx_matmul(xq, w, bias, out_dtype)

    def dual_linear(
        self,
        x: torch.Tensor,
        w: Any,
        bias: Optional[torch.Tensor],
        *,
        round_mode: str = "rint",
        smooth_scale: Optional[torch.Tensor] = None,
        out_dtype: torch.dtype = torch.bfloat16,
        smooth_in_quant: bool = False,
    ) -> torch.Tensor:
        """Dual-level MXFP4 (W4A4_MXFP4_DUALSCALE): x [M, K] -> [M, N].

        ``smooth_in_quant``: where the quant op can apply ``smooth_scale`` itself
        (torch_npu ``smooth_scale=``, MindIE-SD), do so instead of multiplying
        first (SGLang); numerically identical, so the reference ignores it.
        """
        xq = self.quantize_mx_dual(x, smooth_scale=smooth_scale, round_mode=round_mode)
        return F.dual_mx_matmul(xq, w, bias, out_dtype)

    def fp8_linear(
        self, x: torch.Tensor, w: Any, bias: Optional[torch.Tensor], *, out_dtype: torch.dtype = torch.bfloat16
    ) -> torch.Tensor:
        """FP8 E4M3, per-output-channel weight scales, per-token dynamic activation scales."""
        wq, w_scale = w
        xq, x_scale = quantize_fp8_per_token(x)
        out = (xq.to(torch.float32) @ wq.to(torch.float32).t()) * x_scale * w_scale.unsqueeze(0)
        if bias is not None:
            out = out + bias
        return out.to(out_dtype)

    def int8_linear(
        self,
        x: torch.Tensor,
        w: Any,
        bias: Optional[torch.Tensor],
        *,
        input_scale: Optional[torch.Tensor] = None,
        input_offset: Optional[torch.Tensor] = None,
        quant_bias: Optional[torch.Tensor] = None,
        deq_scale: Optional[torch.Tensor] = None,
        weight_scale: Optional[torch.Tensor] = None,
        smooth_scale: Optional[torch.Tensor] = None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """msmodelslim W8A8 (static: input_scale/offset, quant_bias, deq_scale) or
        W8A8_DYNAMIC (per-token int8 activations, per-channel weight_scale)."""
        if smooth_scale is not None:
            x = x * smooth_scale.to(x.dtype)
        if deq_scale is not None:  # static
            xq = quantize_int8_static(x, input_scale, input_offset)
            acc = int8_gemm(xq, w)
            out = (acc + quant_bias.to(torch.float64)).to(torch.float32) * deq_scale.unsqueeze(0)
        else:
            xq, x_scale = quantize_int8_per_token(x)
            acc = int8_gemm(xq, w).to(torch.float32)
            out = acc * x_scale * weight_scale.reshape(1, -1)
        if bias is not None:
            out = out + bias
        return out.to(out_dtype)

    # ---- quantized attention (self-attention only; see mxdit.formats.attention) ----
    def quantized_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mode: str = "mxfp8",
        softmax_scale: Optional[float] = None,
        out_dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        """Full attention from quantized operands: q, k, v [B, L, H, D] -> [B, Lq, H, D].

        ``mode``: ``"mxfp8"`` (SGLang's MXFP8 FA, modes 6/6/8) or ``"fp8_block"``
        (MindIE-SD's FP8 with fp32 per-block scales, modes 7/7/7).  The
        reference computes it exactly from the dequantized operands with
        :data:`mxdit.formats.attention.P_HANDLING` (fp32 P, fp32 accumulation).
        """
        qd, kd, vd = attention_operands(q, k, v, mode)
        return FA.attention_fp32(qd, kd, vd, softmax_scale).to(out_dtype or q.dtype)

    def int4_linear(
        self,
        x: torch.Tensor,
        w: Any,
        bias: Optional[torch.Tensor],
        *,
        weight_scale: torch.Tensor,
        smooth_scale: Optional[torch.Tensor] = None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """msmodelslim W4A4_DYNAMIC: per-token int4 activations (:func:`quantize_int4_per_token`),
        symmetric per-channel int4 weights: y = (x_q W_q^T) * x_scale * weight_scale + bias (fp32)."""
        if smooth_scale is not None:
            x = x * smooth_scale.to(x.dtype)
        xq, x_scale = quantize_int4_per_token(x)
        acc = int8_gemm(xq, w).to(torch.float32)  # exact: |sum| <= 64 K < 2^24
        out = acc * x_scale * weight_scale.reshape(1, -1).to(torch.float32)
        if bias is not None:
            out = out + bias
        return out.to(out_dtype)


FP8_MAX = 448.0
_TINY = torch.finfo(torch.float32).tiny


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row E4M3: scale = max(amax, tiny) / 448 (fp32), q = rint(x / scale) saturated.

    Returns (q float8_e4m3fn [M, K], scale float32 [M, 1]).  The same rule makes
    the per-output-channel weight scales of the "fp8" method (rows of W).
    """
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY)
    # a true division by a tensor: CUDA turns division by a Python scalar into a
    # multiply by its rounded reciprocal, which would make GPU scales differ by an ulp
    scale = amax / torch.full_like(amax, FP8_MAX)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_int8_static(x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
    """npu_quantize semantics: q = clamp(rint(x / input_scale + input_offset), -128, 127)."""
    xf = x.to(torch.float32)
    q = torch.round(xf / input_scale.to(torch.float32) + input_offset.to(torch.float32))
    return q.clamp(-128, 127).to(torch.int8)


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_dynamic_quant semantics: per-row scale = amax / 127, q = clamp(rint(x / scale))."""
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY)
    scale = amax / torch.full_like(amax, 127.0)  # true division on every device
    q = torch.round(xf / scale).clamp(-128, 127).to(torch.int8)
    return q, scale


INT4_MAX = 7.0


def quantize_int4_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``npu_dynamic_quant(x, dst_type=torch.quint4x2)`` semantics, per row (token):
    scale = rowMax(|x|) / DTYPE_MAX with DTYPE_MAX = 7 (int4), q = round(x / scale).

    Source: the torch_npu API doc of npu_dynamic_quant (Ascend/op-plugin
    docs/context/torch_npu-npu_dynamic_quant.md: "scale = rowMax(abs(x)) / DTYPE_MAX,
    y = round(x / scale)") and CANN's kernel doc (hicann/ops-nn quant/dynamic_quant/README.md:
    "dtypeMax为输出数据类型的最大值").  Exactly, as mxdit defines it: the row amax and the
    division in fp32 (a true division, as the int8 rule above), ``round`` = round half to even
    (``torch.round``, the same rint the int8 per-token rule uses), so |q| <= 7; the clamp to
    [-8, 7] only guards the int4 range.  Rows of zeros get scale = fp32 tiny and q = 0.

    Returns (q int8 [M, K] holding int4 values, scale float32 [M, 1]).
    """
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY)
    scale = amax / torch.full_like(amax, INT4_MAX)
    q = torch.round(xf / scale).clamp(-8, 7).to(torch.int8)
    return q, scale


def int8_gemm(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int8 x int8 -> int32-valued GEMM (float64 accumulation is exact here: |sum| < 2^53)."""
    return xq.to(torch.float64) @ w.to(torch.float64).t()


#: quantized attention modes (see KernelBackend.quantized_attention)
ATTENTION_MODES = ("mxfp8", "fp8_block")
#: MindIE-SD block_quant.py: tokens per fp32 scale for Q, K, V (each block spans all of head_dim)
FP8_BLOCK_TOKENS = {"q": 128, "k": 256, "v": 256}


def quantize_fp8_token_blocks(x: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> (fp8 [B, L, H, D], fp32 scale [B, H, ceil(L/tokens)]).

    One scale per (b, h, ``tokens`` tokens x D): each block is one row for
    :func:`quantize_fp8_per_token` (amax / 448); a short tail block is padded
    with zeros, which changes no amax.
    """
    b, length, h, d = x.shape
    xt = x.transpose(1, 2)  # [B, H, L, D]
    pad = (-length) % tokens
    if pad:
        xt = torch.nn.functional.pad(xt, (0, 0, 0, pad))
    nb = xt.shape[2] // tokens
    q, scale = quantize_fp8_per_token(xt.reshape(b * h * nb, tokens * d))
    q = q.reshape(b, h, nb * tokens, d)[:, :, :length].transpose(1, 2).contiguous()
    return q, scale.reshape(b, h, nb)


def dequantize_fp8_token_blocks(q: torch.Tensor, scale: torch.Tensor, tokens: int) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_token_blocks` in fp32."""
    length = q.shape[1]
    s = scale.repeat_interleave(tokens, dim=2)[:, :, :length]  # [B, H, L]
    return q.to(torch.float32) * s.transpose(1, 2).unsqueeze(-1)


def attention_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str):
    """The dequantized fp32 operands the quantized attention ``mode`` computes with."""
    if mode == "mxfp8":
        return FA.mxfp8_attention_operands(q, k, v)
    if mode == "fp8_block":
        out = []
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(f"fp8_block attention expects {name} as [B, L, H, D], got {list(t.shape)}")
            tq, ts = quantize_fp8_token_blocks(t, FP8_BLOCK_TOKENS[name])
            out.append(dequantize_fp8_token_blocks(tq, ts, FP8_BLOCK_TOKENS[name]))
        return tuple(out)
    raise ValueError(f"unknown quantized attention mode {mode!r}; valid: {list(ATTENTION_MODES)}")
