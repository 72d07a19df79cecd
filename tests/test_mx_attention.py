"""MX attention semantics (mxdit.formats.attention) and the reference backend, against plain float math."""
import math

import pytest
import torch

from mxdit.formats import attention as FA
from mxdit.kernels import get_backend
from mxdit.kernels.base import FP8_BLOCK_TOKENS, attention_operands


def _e4m3_rint(y: float) -> float:
    """Plain-math OCP E4M3 (max 448, min normal 2^-6, 3 mantissa bits), round half to even, saturating."""
    if y == 0:
        return 0.0
    a = abs(y)
    e = max(math.floor(math.log2(a)), -6)
    quantum = 2.0 ** (e - 3)
    m = a / quantum
    r = math.floor(m)
    if m - r > 0.5 or (m - r == 0.5 and r % 2 == 1):
        r += 1
    return math.copysign(min(r * quantum, 448.0), y)


def _mx_block(vals: list[float]) -> tuple[int, list[float]]:
    """One MX block: (scale byte, dequantized values) by the OCP floor rule, plain math."""
    amax = max(abs(v) for v in vals)
    if amax == 0 or amax < 2.0 ** -126:
        e = -127
    else:
        e = max(min(math.floor(math.log2(amax)) - 8, 127), -127)
    s = 2.0 ** e
    return e + 127, [_e4m3_rint(v / s) * s for v in vals]


def _outlier_qk(shape, seed, outlier_channels=(3, 77), gain=30.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    for c in outlier_channels:
        if c < shape[-1]:
            x[..., c] *= gain
    return x.to(torch.bfloat16)


def test_qk_quantization_bit_exact_against_plain_math():
    x = _outlier_qk((3, 2, 64), 0)
    x[0, 0, :32] = 0  # an all-zero block
    qd, sc = FA.quantize_qk_mxfp8(x)
    assert qd.dtype == torch.float8_e4m3fn and sc.shape == (3, 2, 2)
    deq = FA.dequantize_mx_along(qd, sc, -1, dtype=torch.float64)
    xs = x.double()
    for t in range(3):
        for h in range(2):
            for j in range(2):
                byte, vals = _mx_block(xs[t, h, 32 * j:32 * j + 32].tolist())
                assert int(sc[t, h, j]) == byte
                assert deq[t, h, 32 * j:32 * j + 32].tolist() == vals


def test_v_quantization_along_packed_tokens_with_tail_block():
    v = _outlier_qk((70, 2, 4), 1)  # 70 tokens: two full blocks and a 6-token tail
    qd, sc = FA.quantize_v_mxfp8(v)
    assert qd.shape == v.shape and sc.shape == (3, 2, 4)
    deq = FA.dequantize_mx_along(qd, sc, 0, dtype=torch.float64)
    vs = v.double()
    for j, (lo, hi) in enumerate([(0, 32), (32, 64), (64, 70)]):
        for h in range(2):
            for c in range(4):
                byte, vals = _mx_block(vs[lo:hi, h, c].tolist())
                assert int(sc[j, h, c]) == byte
                assert deq[lo:hi, h, c].tolist() == vals


def test_npu_scale_layouts():
    q = _outlier_qk((130, 3, 128), 2)
    _, qs = FA.quantize_qk_mxfp8(q)
    qp = FA.npu_scale_layout(qs, -1)
    assert qp.shape == (130, 3, 2, 2)  # [T, N, ceil(ceil(128/32)/2), 2]
    assert torch.equal(qp.reshape(130, 3, 4), qs)
    _, vs = FA.quantize_v_mxfp8(q)
    vp = FA.npu_scale_layout(vs, 0)
    assert vs.shape == (5, 3, 128) and vp.shape == (3, 3, 128, 2)  # ceil(130/64) pairs, interleaved
    for j in range(6):
        want = vs[j] if j < 5 else torch.zeros_like(vs[0])  # block 5 is the zero padding byte
        assert torch.equal(vp[j // 2, :, :, j % 2], want)
    assert torch.equal(FA.npu_scale_unlayout(vp, 0, 5), vs)
    assert torch.equal(FA.npu_scale_unlayout(qp, -1, 4), qs)


def _float64_attention(q, k, v):
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    p = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return (p @ v).transpose(1, 2)


def _bsnd(b, s, h, d, seed):
    # moderate outliers: fp32 score rounding stays far below the tolerance (huge logits would amplify it)
    return [_outlier_qk((b, s, h, d), seed + i, gain=4.0) for i in range(3)]


@pytest.mark.parametrize("mode", ["mxfp8", "fp8_block"])
def test_reference_attention_against_float64_of_dequantized_operands(mode):
    q, k, v = _bsnd(2, 40, 2, 64, 10)
    out = get_backend("reference").quantized_attention(q, k, v, mode=mode, out_dtype=torch.float32)
    # operands rebuilt here: MXFP8 from the plain-math blocks, fp8_block from plain per-block math
    if mode == "mxfp8":
        qd, kd = (FA.dequantize_mx_along(*FA.quantize_qk_mxfp8(t), -1, dtype=torch.float64) for t in (q, k))
        vd = FA.dequantize_mx_along(*FA.quantize_v_mxfp8(v.reshape(80, 2, 64)), 0, dtype=torch.float64).reshape(v.shape)
    else:
        ops = []
        for name, t in (("q", q), ("k", k), ("v", v)):
            n = FP8_BLOCK_TOKENS[name]
            deq = torch.empty(t.shape, dtype=torch.float64)
            for b in range(2):
                for h in range(2):
                    for lo in range(0, 40, n):
                        blk = t[b, lo:lo + n, h].float()
                        s = blk.abs().max() / torch.tensor(448.0)
                        deq[b, lo:lo + n, h] = (blk / s).to(torch.float8_e4m3fn).float() * s  # fp32 dequant
            ops.append(deq)
        qd, kd, vd = ops
        ref_ops = attention_operands(q, k, v, mode)
        for a, b_ in zip(ref_ops, ops):
            assert torch.equal(a.double(), b_)
    want = _float64_attention(qd, kd, vd)
    tol = 1e-5 * float(want.abs().max())  # fp32 accumulation against float64
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=tol)
    # quantization is real: the result differs from attention of the unquantized inputs
    assert not torch.allclose(out.double(), _float64_attention(q, k, v), rtol=1e-5, atol=1e-6)
    assert out.dtype == torch.float32
    assert get_backend("reference").quantized_attention(q, k, v, mode=mode).dtype == torch.bfloat16


def test_p_handling_is_the_named_fp32_choice():
    assert FA.P_HANDLING == "p_fp32_unquantized"
    q, k, v = (torch.randn(1, 33, 1, 32, dtype=torch.float64) for _ in range(3))
    # attention_fp32 keeps P in fp32 (not FP8): equals float64 attention to fp32 precision
    assert torch.allclose(FA.attention_fp32(q, k, v).double(), _float64_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="head_dim 48"):
        FA.quantize_qk_mxfp8(torch.randn(2, 48))
    with pytest.raises(ValueError, match="unknown quantized attention mode"):
        get_backend("reference").quantized_attention(*(torch.randn(1, 4, 1, 32),) * 3, mode="int8")
