"""MXFP8 attention on the NPU backend: SGLang's torch_npu call under the emulated torch_npu.

The call (TND, modes 6/6/8, E8M0 scale pairs, head chunks, the (B*S) % 64 gate
and the BF16 fallback) against the reference backend, and one test per
argument check of the emulated npu_fused_infer_attention_score_v2.
"""
from __future__ import annotations


import pytest
import torch

import fake_torch_npu as fake
import mxdit.kernels as K
from mxdit.kernels.npu import MXFP8_FA_HEAD_CHUNK_ENV

BF16 = torch.bfloat16


@pytest.fixture
def npu(npu, monkeypatch):
    """The shared emulated-torch_npu fixture (conftest.py), default head chunks; yields the NPUBackend."""
    monkeypatch.delenv(MXFP8_FA_HEAD_CHUNK_ENV, raising=False)
    return K.get_backend("npu")


def qkv(b, s, n, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, s, n, d, generator=g) * (1 + 3 * (torch.arange(d) == 5))).to(BF16) for _ in range(3)]


def calls(name):
    return [kw for op, kw in fake.CALLS if op == name]


@pytest.mark.parametrize("b,s,n", [(1, 64, 10), (4, 48, 5), (4, 16, 4)])
def test_mxfp8_call_matches_reference(npu, b, s, n):
    q, k, v = qkv(b, s, n)
    out = npu.quantized_attention(q, k, v, mode="mxfp8")
    ref = K.get_backend("reference").quantized_attention(q, k, v, mode="mxfp8")
    assert out.shape == q.shape and out.dtype == BF16
    assert torch.equal(out, ref)  # same dequantized operands, same fp32 P choice
    fia = calls("npu_fused_infer_attention_score_v2")
    assert [c["query"].shape[1] for c in fia] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    c = fia[0]
    assert c["input_layout"] == "TND" and c["query"].shape == (b * s, 4 if n >= 4 else n, 64)
    assert c["actual_seq_qlen"].tolist() == [s * (i + 1) for i in range(b)]
    assert c["dequant_scale_value"].shape == (-(-b * s // 64), c["query"].shape[1], 64, 2)
    axes = [kw["axis"] for op, kw in fake.CALLS if op == "npu_dynamic_mx_quant"]
    assert axes[:3] == [-1, -1, 0]
    assert not calls("npu_fused_infer_attention_score")


def test_head_chunk_env(npu, monkeypatch):
    q, k, v = qkv(1, 64, 7)
    monkeypatch.setenv(MXFP8_FA_HEAD_CHUNK_ENV, "3")
    npu.quantized_attention(q, k, v)
    assert [c["query"].shape[1] for c in calls("npu_fused_infer_attention_score_v2")] == [3, 3, 1]
    monkeypatch.setenv(MXFP8_FA_HEAD_CHUNK_ENV, "zero")
    with pytest.raises(ValueError, match=MXFP8_FA_HEAD_CHUNK_ENV):
        npu.quantized_attention(q, k, v)


def test_bf16_fallback_where_sglang_falls_back(npu):
    q, k, v = qkv(1, 40, 2)  # B*S = 40, not a multiple of 64
    with pytest.warns(RuntimeWarning, match="not a multiple of 64"):
        out = npu.quantized_attention(q, k, v)
    assert not calls("npu_fused_infer_attention_score_v2")
    assert calls("npu_fused_infer_attention_score")[0]["input_layout"] == "BNSD"
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
    assert torch.allclose(out.float(), sdpa, atol=2e-2)


def _valid_call(npu):
    q, k, v = qkv(1, 64, 2)
    npu.quantized_attention(q, k, v)
    return dict(calls("npu_fused_infer_attention_score_v2")[0])


def _u8(shape):
    return torch.zeros(shape, dtype=torch.uint8)


BAD = {
    "input_layout": ("BSND", "input_layout"),
    "num_query_heads": (3, "num_query_heads"),
    "num_key_value_heads": (1, "num_query_heads/num_key_value_heads"),
    "softmax_scale": (1, "softmax_scale"),
    "sparse_mode": (3, "sparse_mode"),
    "query_quant_mode": (3, "query_quant_mode must be 6"),
    "key_quant_mode": (8, "key_quant_mode must be 6"),
    "value_quant_mode": (6, "value_quant_mode must be 8"),
    "query_dtype": (torch.bfloat16, "query_dtype"),
    "key_dtype": (fake.float8_e5m2, "key_dtype"),
    "value_dtype": (fake.float8_e8m0fnu, "value_dtype"),
    "dequant_scale_query_dtype": (torch.float32, "dequant_scale_query_dtype"),
    "dequant_scale_key_dtype": (fake.float8_e4m3fn, "dequant_scale_key_dtype"),
    "dequant_scale_value_dtype": (torch.uint8, "dequant_scale_value_dtype"),
    "out_dtype": (torch.float32, "out_dtype"),
    "dequant_scale_query": (_u8((64, 2, 2)), "dequant_scale_query must be uint8"),
    "dequant_scale_key": (torch.zeros(64, 2, 1, 2), "dequant_scale_key must be uint8"),
    "dequant_scale_value": (_u8((2, 2, 64, 2)), "dequant_scale_value must be uint8"),  # V scales along D, not T
    "actual_seq_qlen": (torch.tensor([64], dtype=torch.int32), "actual_seq_qlen must be a 1-D int64"),
    "actual_seq_kvlen": (torch.tensor([32], dtype=torch.int64), "actual_seq_kvlen must be strictly increasing"),
    "query": (torch.zeros(64, 2, 64, dtype=BF16), "query dtype must be float8_e4m3fn"),
    "key": (torch.zeros(1, 64, 2, 64, dtype=torch.float8_e4m3fn), "key must be \\[T, N, D\\]"),
    "value": (torch.zeros(64, 64, 2, dtype=torch.float8_e4m3fn).transpose(1, 2), "value must be contiguous"),
}


def test_valid_call_passes(npu):
    kw = _valid_call(npu)
    fake.npu_fused_infer_attention_score_v2(**kw)


@pytest.mark.parametrize("arg", sorted(BAD))
def test_fia_v2_argument_check(npu, arg):
    kw = _valid_call(npu)
    value, msg = BAD[arg]
    kw[arg] = value
    with pytest.raises(fake.NPUOpError, match=msg):
        fake.npu_fused_infer_attention_score_v2(**kw)


def test_fia_v2_rejects_unknown_and_missing_arguments(npu):
    kw = _valid_call(npu)
    with pytest.raises(TypeError):
        fake.npu_fused_infer_attention_score_v2(**kw, quant_scale_p=torch.ones(1))
    kw.pop("actual_seq_kvlen")
    with pytest.raises(TypeError):
        fake.npu_fused_infer_attention_score_v2(**kw)


def test_dynamic_mx_quant_v_axis_layout(npu):
    v = qkv(1, 96, 2)[0].reshape(96, 2, 64)
    y, s = fake.npu_dynamic_mx_quant(v, dst_type=torch.float8_e4m3fn, axis=0)
    assert y.shape == v.shape and s.shape == (2, 2, 64, 2)  # ceil(ceil(96/32)/2) pairs, interleaved
    assert torch.equal(s[1, :, :, 1], torch.zeros(2, 64, dtype=torch.uint8))  # padding block 3
