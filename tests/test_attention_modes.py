"""Quantized self-attention switched on: mxdit.layers.attention modes, WanAttention self vs cross,
rotations, load_transformer / env var."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mxdit.formats.rotation import online_rotation, random_hadamard
from mxdit.kernels import get_backend
from mxdit.kernels.base import KernelBackend
from mxdit.layers.attention import (
    QUANTIZED_ATTENTION_MODES, SGLANG_MXFP8_ATTENTION_ENV, attention, resolve_attention_quantization,
)
from mxdit.models.wan.config import WanTransformerConfig
from mxdit.models.wan.transformer import WanTransformer3DModel

REF = get_backend("reference")
CFG = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, text_dim=16,
           freq_dim=16, ffn_dim=64, num_layers=2)


def qkv(seed=0, b=1, s=24, h=2, d=32):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(b, s, h, d, generator=g) for _ in range(3)]
    x[0][..., 7] *= 20  # an outlier channel in q and k
    x[1][..., 7] *= 20
    return [t.to(torch.bfloat16) for t in x]


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


@pytest.mark.parametrize("name", sorted(QUANTIZED_ATTENTION_MODES))
def test_quantized_backends_self_only(name):
    q, k, v = qkv()
    assert torch.equal(attention(q, k, v, backend=name), sdpa(q, k, v))  # cross / unspecified: BF16 SDPA
    mode, rotate = QUANTIZED_ATTENTION_MODES[name]
    out = attention(q, k, v, backend=name, self_attention=True)
    if rotate:
        r = online_rotation(32, torch.bfloat16)
        want = REF.quantized_attention(q @ r, k @ r, v, mode=mode)
    else:
        want = REF.quantized_attention(q, k, v, mode=mode)
    assert torch.equal(out, want)
    assert not torch.equal(out, sdpa(q, k, v))


def test_offline_rotation_replaces_online():
    q, k, v = qkv(1)
    r = random_hadamard(32)
    out = attention(q, k, v, backend="mxfp8_rotated", self_attention=True, q_rot=r, k_rot=r)
    assert torch.equal(out, REF.quantized_attention(q @ r, k @ r, v, mode="mxfp8"))
    assert not torch.equal(out, attention(q, k, v, backend="mxfp8_rotated", self_attention=True))
    with pytest.raises(ValueError, match="together"):
        attention(q, k, v, backend="mxfp8", self_attention=True, q_rot=r)


def test_rotation_helps_with_outlier_channels():
    q, k, v = qkv(2, s=64, h=4)
    ref = sdpa(q.double(), k.double(), v.double())

    def err(name):
        o = attention(q, k, v, backend=name, self_attention=True).double()
        return float((o - ref).norm() / ref.norm())
    assert err("mxfp8_rotated") < err("mxfp8")


def test_resolve_attention_quantization(monkeypatch):
    monkeypatch.delenv(SGLANG_MXFP8_ATTENTION_ENV, raising=False)
    assert resolve_attention_quantization(None) is None
    assert resolve_attention_quantization("none") is None
    assert resolve_attention_quantization("fp8_block") == "fp8_block"
    monkeypatch.setenv(SGLANG_MXFP8_ATTENTION_ENV, "true")
    assert resolve_attention_quantization(None) == "mxfp8_rotated"
    assert resolve_attention_quantization("none") is None  # an explicit value wins
    monkeypatch.setenv(SGLANG_MXFP8_ATTENTION_ENV, "maybe")
    with pytest.raises(ValueError, match=SGLANG_MXFP8_ATTENTION_ENV):
        resolve_attention_quantization(None)
    with pytest.raises(ValueError, match="unknown attention quantization 'int4'"):
        resolve_attention_quantization("int4")


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 2, 8, 8, generator=g)  # 2*4*4 = 32 tokens after patching
    return x, torch.tensor([500.0]), torch.randn(1, 7, 16, generator=g)


def test_wan_model_quantizes_self_attention_only(monkeypatch):
    model = WanTransformer3DModel(WanTransformerConfig(**CFG)).init_random_weights_(std=0.1)
    x, t, text = _inputs()
    base = model(x, t, text).sample
    seen = []
    orig = KernelBackend.quantized_attention

    def spy(self, q, k, v, **kw):
        seen.append((q.shape, k.shape))
        return orig(self, q, k, v, **kw)
    monkeypatch.setattr(KernelBackend, "quantized_attention", spy)
    model.set_attention_quantization("mxfp8")
    out = model(x, t, text).sample
    assert len(seen) == CFG["num_layers"] and all(qs == ks for qs, ks in seen)  # attn1 only; attn2 BF16
    assert not torch.equal(out, base)
    cos = F.cosine_similarity(out.flatten(), base.flatten(), dim=0)
    assert cos > 0.99
    model.set_attention_quantization(None)
    assert torch.equal(model(x, t, text).sample, base)
    with pytest.raises(ValueError, match="unknown attention quantization"):
        model.set_attention_quantization("bogus")


def _write_dir(path):
    os.makedirs(path, exist_ok=True)
    m = WanTransformer3DModel(WanTransformerConfig(**CFG), params_dtype=torch.float32).init_random_weights_(0.1)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()},
              os.path.join(path, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "WanTransformer3DModel", **WanTransformerConfig(**CFG).to_dict()}, f)


def test_load_transformer_attention_quantization(tmp_path, monkeypatch):
    from mxdit import load_transformer

    monkeypatch.delenv(SGLANG_MXFP8_ATTENTION_ENV, raising=False)
    _write_dir(tmp_path / "t")
    m = load_transformer(str(tmp_path / "t"), attention_quantization="fp8_block", progress=False)
    assert [b.attn1.attention_quantization for b in m.blocks] == ["fp8_block"] * 2
    assert all(b.attn2.attention_quantization is None for b in m.blocks)
    monkeypatch.setenv(SGLANG_MXFP8_ATTENTION_ENV, "1")
    m = load_transformer(str(tmp_path / "t"), progress=False)
    assert m.blocks[0].attn1.attention_quantization == "mxfp8_rotated"
    with pytest.raises(ValueError, match="unknown attention quantization"):
        load_transformer(str(tmp_path / "t"), attention_quantization="mx", progress=False)
