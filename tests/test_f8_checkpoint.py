"""msmodelslim W8A8F8 / W4A4F8 attention entries: q_rot / k_rot loaded as buffers, FP8_DYNAMIC
attentions quantized, through load_transformer and through repack (checkpoint built here)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mxdit import load_transformer
from mxdit.formats.rotation import random_hadamard
from mxdit.layers.attention import SGLANG_MXFP8_ATTENTION_ENV
from mxdit.models.wan.config import WanTransformerConfig
from mxdit.models.wan.names import diffusers_to_original
from mxdit.models.wan.transformer import WanTransformer3DModel
from mxdit.tools.repack import repack

CFG = dict(num_attention_heads=2, attention_head_dim=32, in_channels=48, out_channels=48, text_dim=16,
           freq_dim=16, ffn_dim=64, num_layers=2)
DESC = "quant_model_description_w8a8f8.json"


def build(tmp_path, *, quant_type_blocks=(1,), rot_dtype=torch.bfloat16):
    model = tmp_path / "model"
    tdir = model / "transformer"
    os.makedirs(tdir)
    (model / "model_index.json").write_text("{}")
    m = WanTransformer3DModel(WanTransformerConfig(**CFG), params_dtype=torch.float32).init_random_weights_(0.1)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(tdir / "diffusion_pytorch_model.safetensors"))
    (tdir / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel",
                                                  **WanTransformerConfig(**CFG).to_dict()}))
    quant = tmp_path / "quant"
    os.makedirs(quant)
    tensors = {diffusers_to_original(k): v for k, v in sd.items()}
    rot = random_hadamard(32).to(rot_dtype)  # msmodelslim: seed 1234 shared by q_rot and k_rot
    for i in range(CFG["num_layers"]):
        tensors[f"blocks.{i}.self_attn.q_rot"] = rot.clone()
        tensors[f"blocks.{i}.self_attn.k_rot"] = rot.clone()
    desc = {k: "FLOAT" for k in tensors}
    for i in quant_type_blocks:
        desc[f"blocks.{i}.self_attn.quant_type"] = "FP8_DYNAMIC"
    desc["model_quant_type"] = "W8A8F8"
    save_file(tensors, str(quant / "quant_model_weight_w8a8f8.safetensors"))
    (quant / DESC).write_text(json.dumps(desc))
    (quant / "config.json").write_text((tdir / "config.json").read_text())  # the width is below inference's
    return model, quant, rot


def inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(1, 48, 2, 8, 8, generator=g), torch.tensor([400.0]), torch.randn(1, 7, 16, generator=g)


def run(model):
    with torch.no_grad():
        return model(*inputs()).sample


def test_f8_checkpoint_load_and_repack(tmp_path, monkeypatch):
    monkeypatch.delenv(SGLANG_MXFP8_ATTENTION_ENV, raising=False)
    model_dir, quant, rot = build(tmp_path)
    m = load_transformer(str(quant), progress=False)
    assert [b.attn1.attention_quantization for b in m.blocks] == [None, "mxfp8"]  # blocks.0 not labelled
    assert all(b.attn2.attention_quantization is None for b in m.blocks)
    assert torch.equal(m.blocks[1].attn1.q_rot, rot) and torch.equal(m.blocks[0].attn1.k_rot, rot)
    out = run(m)

    # the reference: the BF16 model with the same attention set by hand
    ref = load_transformer(str(model_dir / "transformer"), progress=False)
    ref.blocks[1].attn1.attention_quantization = "mxfp8"
    unrotated = run(ref)
    ref.blocks[1].attn1.q_rot, ref.blocks[1].attn1.k_rot = rot, rot
    assert torch.equal(out, run(ref))
    assert not torch.equal(out, unrotated)

    # repack: the names the model looks up (attn1.q_rot, attn1.quant_type; never attn1.to_q_rot)
    repack("Wan2.2-TI2V-5B", str(model_dir), str(quant), str(tmp_path / "out"))
    rdir = tmp_path / "out" / "transformer"
    desc = json.loads((rdir / "quant_model_description.json").read_text())
    assert desc["blocks.1.attn1.quant_type"] == "FP8_DYNAMIC" and desc["blocks.0.attn1.q_rot"] == "FLOAT"
    assert not any("to_q_rot" in k for k in desc)
    assert "blocks.1.attn1.k_rot" in load_file(str(rdir / "diffusion_pytorch_model.safetensors"))
    r = load_transformer(str(rdir), progress=False)
    assert [b.attn1.attention_quantization for b in r.blocks] == [None, "mxfp8"]
    assert torch.equal(run(r), out)

    # an explicit mode (or SGLang's env var) applies to every self-attention, with the checkpoint rotations
    e = load_transformer(str(quant), progress=False, attention_quantization="mxfp8_rotated")
    assert [b.attn1.attention_quantization for b in e.blocks] == ["mxfp8_rotated"] * 2
    n = load_transformer(str(quant), progress=False, attention_quantization="none")
    assert all(b.attn1.attention_quantization is None for b in n.blocks)


def test_bad_rotations(tmp_path):
    model_dir, quant, _ = build(tmp_path)
    f = quant / "quant_model_weight_w8a8f8.safetensors"
    t = load_file(str(f))
    t["blocks.0.self_attn.q_rot"] = torch.eye(16)
    save_file(t, str(f))
    with pytest.raises(ValueError, match=r"q_rot' must be a float \[32, 32\]"):
        load_transformer(str(quant), progress=False)
    del t["blocks.0.self_attn.q_rot"]
    save_file(t, str(f))
    desc = json.loads((quant / DESC).read_text())
    del desc["blocks.0.self_attn.q_rot"]
    (quant / DESC).write_text(json.dumps(desc))
    with pytest.raises(ValueError, match="has no matching 'q_rot'"):
        load_transformer(str(quant), progress=False)
