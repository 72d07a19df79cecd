"""MXFP8 flash attention (Triton): online softmax over pre-quantized MXFP8 operands.

The operands come from :mod:`mxdit.formats.attention` (the one MX rounding rule):
Q, K FP8 E4M3 codes [BH, L, D] with one E8M0 byte per 32 along head_dim
([BH, L, D/32]); V codes [B*S, H, D] with one byte per 32 *packed* tokens
([ceil(B*S/32), H, D]).  Per (batch*head, BLOCK_M query rows) program:

* ``S = sum_c dot(Q_c, K_c^T) * (sq_c x sk_c)`` over the D/32 chunks of 32 —
  FP8 tensor-core dots (fp8 products are exact, accumulated in fp32), each
  chunk's result scaled by its pair of E8M0 scales (exact powers of two);
* online softmax (running max and sum in fp32, ``exp2`` with log2(e) folded in);
* ``O += dot(P, V_deq)`` with P in fp32, unquantized (:data:`P_HANDLING`
  ``p_fp32_unquantized``) and V dequantized exactly per 32-token chunk and
  channel, an IEEE fp32 dot (no TF32).

It therefore matches the reference backend up to fp32 summation order (the
reference sums D in one matmul and normalises the softmax once; here D is summed
per 32-chunk and the softmax is rescaled per key tile).  Not handled: E8M0 byte
0 (2^-127, an fp32 subnormal the GPU flushes), NaN blocks (byte 0xFF).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxdit.formats import attention as FA

LOG2E = 1.4426950408889634
#: (BLOCK_M, BLOCK_N, num_warps) the backend launches on a GPU; aot_check compiles each for sm_90a
COMPILE_CONFIGS = ((64, 64, 4), (128, 64, 8))


@triton.jit
def _e8m0(b):
    return ((b.to(tl.int32) & 0xFF) << 23).to(tl.float32, bitcast=True)


@triton.jit
def mxfp8_attention_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, o_ptr,
                           H, Lq, Lk, qk_scale,
                           D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    NC: tl.constexpr = D // 32
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, 32)
    offs_d = tl.arange(0, D)
    mask_m = offs_m < Lq
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    q_base = q_ptr + bh * Lq * D
    k_base = k_ptr + bh * Lk * D
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Lk
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for c in tl.static_range(NC):
            qc = tl.load(q_base + offs_m[:, None] * D + c * 32 + offs_c[None, :], mask=mask_m[:, None], other=0)
            kc = tl.load(k_base + offs_n[:, None] * D + c * 32 + offs_c[None, :], mask=mask_n[:, None], other=0)
            sq = _e8m0(tl.load(qs_ptr + (bh * Lq + offs_m) * NC + c, mask=mask_m, other=127))
            sk = _e8m0(tl.load(ks_ptr + (bh * Lk + offs_n) * NC + c, mask=mask_n, other=127))
            part = tl.dot(qc.to(tl.float8e4nv, bitcast=True), tl.trans(kc.to(tl.float8e4nv, bitcast=True)),
                          out_dtype=tl.float32)
            s += part * (sq[:, None] * sk[None, :])
        s = s * qk_scale  # qk_scale = softmax_scale * log2(e)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # V rows of this tile: packed token b*Lk + n; its scale block (b*Lk + n) // 32 per channel
        tok = b * Lk + offs_n
        vq = tl.load(v_ptr + (tok[:, None] * H + h) * D + offs_d[None, :], mask=mask_n[:, None], other=0)
        vsc = _e8m0(tl.load(vs_ptr + ((tok // 32)[:, None] * H + h) * D + offs_d[None, :], mask=mask_n[:, None],
                            other=127))
        vd = vq.to(tl.float8e4nv, bitcast=True).to(tl.float32) * vsc
        acc = acc * alpha[:, None] + tl.dot(p, vd, input_precision="ieee", out_dtype=tl.float32)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + (bh * Lq + offs_m[:, None]) * D + offs_d[None, :], out, mask=mask_m[:, None])


def mxfp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale=None,
                    block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """q [B, Lq, H, D], k = v [B, Lk, H, D] (same Lk for k and v) -> fp32 [B, Lq, H, D]."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if d % 32 or d & (d - 1):
        raise ValueError(f"mxfp8_attention: head_dim must be a power of two >= 32, got {d}")
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    qq, qs = FA.quantize_qk_mxfp8(q.transpose(1, 2).contiguous())  # [B, H, L, D]
    kq, ks = FA.quantize_qk_mxfp8(k.transpose(1, 2).contiguous())
    vq, vs = FA.quantize_v_mxfp8(v.reshape(b * lk, h, d))
    out = torch.empty(b, h, lq, d, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(lq, block_m), b * h)
    mxfp8_attention_kernel[grid](
        qq.view(torch.uint8), qs, kq.view(torch.uint8), ks, vq.view(torch.uint8), vs, out,
        h, lq, lk, scale * LOG2E, D=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out.transpose(1, 2)
