"""Wan transformer: parity with diffusers, name map, config, dtype, meta device, quant dispatch."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from mxdit.layers.attention import (
    attention, attention_backend, available_attention_backends, get_attention_backend,
    register_attention_backend, set_attention_backend,
)
from mxdit.layers.linear import QuantLinear
from mxdit.layers.rope import WanRotaryPosEmbed, wan_rope_split
from mxdit.models.wan import names
from mxdit.models.wan.config import MODEL_FACTS, PRESETS, WanTransformerConfig, get_preset
from mxdit.models.wan.transformer import KEEP_IN_FP32_MODULES, WanTransformer3DModel
from mxdit.quant.base import UnquantizedLinearMethod

# Tiny configs of each family.  head_dim 16 gives an uneven RoPE split (8, 4, 4).
TINY = dict(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=16, ffn_dim=48, num_layers=2)
FAMILIES = {
    "t2v": dict(TINY, in_channels=16, out_channels=16),
    "i2v": dict(TINY, in_channels=36, out_channels=16),
    "ti2v": dict(TINY, in_channels=48, out_channels=48),
    # Wan2.1 I2V / FLF2V CLIP image branch (not used by Wan2.2; kept for name-map coverage).
    "wan21_i2v": dict(TINY, in_channels=36, out_channels=16, image_dim=20, added_kv_proj_dim=32),
    "wan21_flf2v": dict(TINY, in_channels=36, out_channels=16, image_dim=20, added_kv_proj_dim=32,
                        pos_embed_seq_len=2 * 5),
}
LATENT = (3, 4, 6)  # F, H, W -> patch grid (3, 2, 3) = 18 tokens
TEXT_LEN = 7
IMAGE_TOKENS = 5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def diffusers_wan():
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel as DiffusersWan
    return DiffusersWan


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Nothing trivially zero or one: weights, biases, norms and modulation tables all random."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        if "norm" in name and name.endswith("weight"):
            noise += 1.0
        p.copy_(noise)
    return model


def make_pair(diffusers_wan, family: str, seed: int = 0):
    kw = FAMILIES[family]
    ref = randomize_(diffusers_wan(**kw).eval(), seed)
    ours = WanTransformer3DModel(WanTransformerConfig(**kw)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def make_inputs(family: str, batch: int = 2, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    kw = FAMILIES[family]
    x = torch.randn(batch, kw["in_channels"], *LATENT, generator=g).to(dtype)
    text_len = 512 if kw.get("added_kv_proj_dim") else TEXT_LEN  # diffusers hardcodes 512 text tokens here
    text = torch.randn(batch, text_len, kw["text_dim"], generator=g).to(dtype)
    if family == "ti2v":
        # Per-token timesteps as TI2V I2V mode uses them: t = 0 on the first latent frame.
        tokens_per_frame = (LATENT[1] // 2) * (LATENT[2] // 2)
        seq_len = LATENT[0] * tokens_per_frame
        t = torch.tensor([700.0, 250.0])[:batch, None].expand(batch, seq_len).clone()
        t[:, :tokens_per_frame] = 0.0
    else:
        t = torch.tensor([999, 321])[:batch]
    image = None
    if kw.get("image_dim"):
        n_img = batch * (2 if kw.get("pos_embed_seq_len") else 1)
        image = torch.randn(n_img, IMAGE_TOKENS, kw["image_dim"], generator=g).to(dtype)
    return x, t, text, image


def run(model, inputs):
    x, t, text, image = inputs
    with torch.no_grad():
        return model(x, t, text, encoder_hidden_states_image=image).sample


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_diffusers_fp32(diffusers_wan, family):
    ref, ours = make_pair(diffusers_wan, family)
    inputs = make_inputs(family)
    expected, got = run(ref, inputs), run(ours, inputs)
    assert got.shape == expected.shape == (2, FAMILIES[family]["out_channels"], *LATENT)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert expected.std() > 1e-3  # not a degenerate output
    assert rel_err(got, expected) < 1e-5
    assert (got - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())


def test_return_dict_false_and_tuple_access(diffusers_wan):
    _, ours = make_pair(diffusers_wan, "t2v")
    x, t, text, _ = make_inputs("t2v")
    with torch.no_grad():
        out = ours(x, t, text)
        tup = ours(x, t, text, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1
    torch.testing.assert_close(tup[0], out.sample, rtol=0, atol=0)
    torch.testing.assert_close(out[0], out.sample, rtol=0, atol=0)


def test_per_token_constant_timestep_equals_scalar(diffusers_wan):
    _, ours = make_pair(diffusers_wan, "ti2v")
    x, _, text, _ = make_inputs("ti2v")
    seq_len = LATENT[0] * (LATENT[1] // 2) * (LATENT[2] // 2)
    t = torch.tensor([600, 30])
    with torch.no_grad():
        a = ours(x, t, text).sample
        b = ours(x, t[:, None].expand(2, seq_len), text).sample
    assert rel_err(b, a) < 1e-6


def test_original_named_checkpoint_gives_same_output(diffusers_wan):
    ref, ours = make_pair(diffusers_wan, "i2v")
    original_sd = {names.diffusers_to_original(k): v for k, v in ref.state_dict().items()}
    assert names.is_original_layout(original_sd)
    assert any(k.startswith("blocks.0.self_attn.q.") for k in original_sd)
    assert "blocks.0.norm3.weight" in original_sd and "blocks.0.norm2.weight" not in original_sd
    # Loaded through the one name map, also with a ComfyUI prefix.
    comfy = {f"model.diffusion_model.{k}": v for k, v in original_sd.items()}
    for sd in (original_sd, comfy):
        model = WanTransformer3DModel(WanTransformerConfig(**FAMILIES["i2v"])).eval()
        model.load_state_dict(names.to_diffusers_state_dict(sd), strict=True)
        inputs = make_inputs("i2v")
        torch.testing.assert_close(run(model, inputs), run(ref, inputs), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- name map
# The reference: diffusers' / SGLang's ordered str.replace table (original -> diffusers).
DIFFUSERS_STR_REPLACE = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
    "modulation": "scale_shift_table",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "norm2": "norm__placeholder",
    "norm3": "norm2",
    "norm__placeholder": "norm3",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "attn2.to_k_img": "attn2.add_k_proj",
    "attn2.to_v_img": "attn2.add_v_proj",
    "attn2.norm_k_img": "attn2.norm_added_k",
}


def str_replace_convert(key: str) -> str:
    for old, new in DIFFUSERS_STR_REPLACE.items():
        key = key.replace(old, new)
    return key


@pytest.mark.parametrize("family", ["t2v", "ti2v", "wan21_flf2v"])
def test_name_map_round_trips_every_key(family):
    model = WanTransformer3DModel(WanTransformerConfig(**FAMILIES[family]), device="meta")
    keys = list(model.state_dict())
    module_names = [n for n, _ in model.named_modules() if n]
    originals = [names.diffusers_to_original(k) for k in keys]
    assert len(set(originals)) == len(keys)
    for key, orig in zip(keys, originals):
        assert names.original_to_diffusers(orig) == key
        # agrees with diffusers' own conversion table
        assert str_replace_convert(orig) == key, orig
    for name in module_names:  # module paths (e.g. quantized-parameter owners) round-trip too
        assert names.original_to_diffusers(names.diffusers_to_original(name)) == name
    assert names.is_original_layout(originals) and not names.is_original_layout(keys)


def test_name_map_specific_names():
    o2d, d2o = names.original_to_diffusers, names.diffusers_to_original
    assert o2d("blocks.7.norm3.weight") == "blocks.7.norm2.weight"  # cross-attn norm swap
    assert o2d("blocks.7.norm2") == "blocks.7.norm3"
    assert d2o("blocks.7.norm2.bias") == "blocks.7.norm3.bias"
    assert d2o("scale_shift_table") == "head.modulation"
    assert d2o("blocks.12.scale_shift_table") == "blocks.12.modulation"
    assert o2d("blocks.3.self_attn.o.weight_scale") == "blocks.3.attn1.to_out.0.weight_scale"
    assert o2d("blocks.3.cross_attn.k_img.weight") == "blocks.3.attn2.add_k_proj.weight"
    assert o2d("blocks.3.cross_attn.k.bias") == "blocks.3.attn2.to_k.bias"
    assert o2d("patch_embedding.weight") == d2o("patch_embedding.weight") == "patch_embedding.weight"
    assert names.strip_prefix("model.diffusion_model.head.head.weight") == "head.head.weight"
    for o, d in zip(names.LINEAR_SUFFIXES_ORIGINAL, names.LINEAR_SUFFIXES_DIFFUSERS):
        assert o2d(f"blocks.0.{o}") == f"blocks.0.{d}"


def test_is_original_layout_edge_cases():
    assert names.is_original_layout(["model.diffusion_model.blocks.0.ffn.0.weight"])
    assert not names.is_original_layout(["patch_embedding.weight"])  # undecidable -> no renaming
    assert not names.is_original_layout(["blocks.0.norm2.weight"])  # in both layouts
    with pytest.raises(ValueError, match="mixes"):
        names.is_original_layout(["blocks.0.self_attn.q.weight", "blocks.0.attn1.to_k.weight"])
    with pytest.raises(ValueError, match="both map to"):
        names.rename_state_dict({"head.head.weight": 1, "proj_out.weight": 2}, names.original_to_diffusers)


# ----------------------------------------------------------------------------- dtype
def test_bf16_matches_diffusers_bf16_and_is_close_to_fp32(diffusers_wan, tmp_path):
    ref, ours32 = make_pair(diffusers_wan, "ti2v")
    ref.save_pretrained(tmp_path)
    ref16 = diffusers_wan.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    ours16 = WanTransformer3DModel(WanTransformerConfig(**FAMILIES["ti2v"]), params_dtype=torch.bfloat16).eval()
    ours16.load_state_dict(ref16.state_dict(), strict=True)

    # Same per-parameter dtypes as diffusers' keep-in-fp32 loading.
    ref_dtypes = {k: v.dtype for k, v in ref16.state_dict().items()}
    our_dtypes = {k: v.dtype for k, v in ours16.state_dict().items()}
    assert our_dtypes == ref_dtypes
    assert our_dtypes["blocks.0.norm2.weight"] == torch.float32
    assert our_dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert our_dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert set(KEEP_IN_FP32_MODULES) == set(diffusers_wan._keep_in_fp32_modules)

    x, t, text, _ = make_inputs("ti2v")
    inputs16 = (x.bfloat16(), t, text.bfloat16(), None)
    out16 = run(ours16, inputs16)
    assert out16.dtype == torch.bfloat16
    assert rel_err(out16, run(ref16, inputs16)) < 1e-3
    out32 = run(ours32, (x, t, text, None))
    assert rel_err(out16, out32) < 3e-2


# ----------------------------------------------------------------------------- meta / presets
def test_meta_build_allocates_nothing_and_matches_diffusers_shapes(diffusers_wan):
    cfg = PRESETS["Wan2.2-TI2V-5B"]
    model = WanTransformer3DModel(cfg, params_dtype=torch.bfloat16, device="meta")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(5.0e9, rel=1e-3)
    with torch.device("meta"):
        ref = diffusers_wan(**cfg.to_dict())
    ours_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_a14b_meta_param_count():
    model = WanTransformer3DModel(PRESETS["Wan2.2-T2V-A14B"], params_dtype=torch.bfloat16, device="meta")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(14.288e9, rel=1e-3)
    assert len(list(model.quant_linears())) == 40 * 10 + 6  # block linears + embedders/time_proj/proj_out


# ----------------------------------------------------------------------------- quant dispatch
class _FakeMethod(UnquantizedLinearMethod):
    name = "fake"


class RecordingQuantConfig:
    """Test double: records every prefix; quantizes (fakes) block linears only."""

    def __init__(self):
        self.calls: list[tuple[nn.Module, str]] = []

    def get_quant_method(self, layer, prefix):
        self.calls.append((layer, prefix))
        return _FakeMethod() if prefix.startswith("blocks.") else None


@pytest.mark.parametrize("family", ["t2v", "wan21_i2v"])
def test_quant_config_sees_every_linear_with_its_diffusers_name(diffusers_wan, family):
    qc = RecordingQuantConfig()
    model = WanTransformer3DModel(WanTransformerConfig(**FAMILIES[family]), quant_config=qc)
    prefixes = [p for _, p in qc.calls]
    assert len(prefixes) == len(set(prefixes))

    ref = diffusers_wan(**FAMILIES[family])
    ref_linears = {n for n, m in ref.named_modules() if isinstance(m, nn.Linear)}
    assert set(prefixes) == ref_linears
    assert set(prefixes) == {k[: -len(".weight")] for k in ref.state_dict()
                             if k[: -len(".weight")] in ref_linears and k.endswith(".weight")}

    ours = dict(model.quant_linears())
    assert set(ours) == set(prefixes)
    for layer, prefix in qc.calls:
        assert ours[prefix] is layer and layer.prefix == prefix
        assert isinstance(layer.quant_method, _FakeMethod) == prefix.startswith("blocks.")
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # every linear is a QuantLinear
    assert all(isinstance(m, QuantLinear) for _, m in model.quant_linears())


# ----------------------------------------------------------------------------- config
def test_config_from_diffusers_dict_and_json(tmp_path):
    d = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.35.0", "some_new_key": 1,
         **PRESETS["Wan2.2-I2V-A14B"].to_dict()}
    cfg = WanTransformerConfig.from_dict(d)
    assert cfg == PRESETS["Wan2.2-I2V-A14B"] and cfg.patch_size == (1, 2, 2)
    assert cfg.inner_dim == 5120 and cfg.in_channels == 36 and cfg.out_channels == 16
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    assert WanTransformerConfig.from_json_file(path) == cfg
    assert WanTransformerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("key,value", [("num_layers", "40"), ("cross_attn_norm", 1), ("patch_size", [1, 2]),
                                       ("eps", "1e-6"), ("num_attention_heads", True), ("image_dim", 1.5)])
def test_config_wrong_types_raise_naming_the_key(key, value):
    with pytest.raises(TypeError, match=key.split("[")[0]):
        WanTransformerConfig.from_dict({key: value})


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="qk_norm"):
        WanTransformerConfig(qk_norm="layer_norm")
    with pytest.raises(ValueError, match="attention_head_dim"):
        WanTransformerConfig(attention_head_dim=15)
    with pytest.raises(ValueError, match="from_original_dict"):
        WanTransformerConfig.from_dict({"dim": 5120, "num_heads": 40})


def test_config_from_original_dict(tmp_path):
    # Wan2.2 high_noise_model/config.json
    orig = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "dim": 5120, "eps": 1e-06,
            "ffn_dim": 13824, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 40,
            "num_layers": 40, "out_dim": 16, "text_len": 512}
    assert WanTransformerConfig.from_original_dict(orig) == PRESETS["Wan2.2-T2V-A14B"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(orig))
    assert WanTransformerConfig.from_json_file(path) == PRESETS["Wan2.2-T2V-A14B"]
    ti2v = PRESETS["Wan2.2-TI2V-5B"]
    assert WanTransformerConfig.from_original_dict(ti2v.to_original_dict("ti2v")) == ti2v
    wan21 = WanTransformerConfig.from_original_dict(dict(orig, in_dim=36, model_type="i2v"), clip_image_branch=True)
    assert wan21.image_dim == 1280 and wan21.added_kv_proj_dim == 5120 and wan21.pos_embed_seq_len is None
    with pytest.raises(ValueError, match="window_size"):
        WanTransformerConfig.from_original_dict(dict(orig, window_size=[128, 128]))


def test_presets_and_facts():
    assert PRESETS["Wan2.2-TI2V-5B"].inner_dim == 3072 and PRESETS["Wan2.2-TI2V-5B"].num_layers == 30
    assert get_preset("Wan2.2-T2V-A14B").ffn_dim == 13824
    with pytest.raises(ValueError, match="known"):
        get_preset("Wan2.1-T2V-14B")
    assert set(MODEL_FACTS) == set(PRESETS)
    t2v = MODEL_FACTS["Wan2.2-T2V-A14B"]
    assert t2v.boundary_timestep == 875.0 and (t2v.guidance_scale, t2v.guidance_scale_2) == (4.0, 3.0)
    assert MODEL_FACTS["Wan2.2-TI2V-5B"].expand_timesteps and not MODEL_FACTS["Wan2.2-TI2V-5B"].two_experts
    assert MODEL_FACTS["Wan2.2-TI2V-5B"].z_dim == 48 == PRESETS["Wan2.2-TI2V-5B"].in_channels
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["Wan2.2-T2V-A14B"].num_layers = 1  # type: ignore[misc]


# ----------------------------------------------------------------------------- layers
def test_rope_split_and_tables_match_diffusers(diffusers_wan):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed as RefRope
    assert wan_rope_split(128) == (44, 42, 42)
    x = torch.zeros(1, 4, 5, 6, 8)
    ref_cos, ref_sin = RefRope(16, (1, 2, 2), 1024)(x)
    cos, sin = WanRotaryPosEmbed(16, (1, 2, 2), 1024)(x)
    assert cos.shape == (1, 5 * 3 * 4, 1, 8)
    torch.testing.assert_close(cos, ref_cos[..., 0::2], rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin[..., 1::2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        WanRotaryPosEmbed(16, (1, 2, 2), 4)(x)


def test_attention_registry():
    q, k = torch.randn(2, 5, 3, 8), torch.randn(2, 7, 3, 8)
    v = torch.randn(2, 7, 3, 8)
    ref = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 8 ** 0.5, -1)
    ref = torch.einsum("bhqk,bkhd->bqhd", ref, v)
    torch.testing.assert_close(attention(q, k, v), ref, rtol=1e-5, atol=1e-6)

    calls = []

    def recording(q, k, v):
        calls.append(q.shape)
        return torch.zeros_like(q)

    register_attention_backend("test_recording", recording, overwrite=True)
    assert "test_recording" in available_attention_backends()
    with pytest.raises(ValueError, match="already registered"):
        register_attention_backend("test_recording", recording)
    assert attention(q, k, v, backend="test_recording").abs().sum() == 0
    with attention_backend("test_recording"):
        assert get_attention_backend() == "test_recording"
        attention(q, k, v)
    assert get_attention_backend() == "sdpa" and len(calls) == 2
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        set_attention_backend("nope")
    with pytest.raises(ValueError, match="shapes disagree"):
        attention(q, k, v[:, :3])


def test_forward_errors_name_the_problem():
    model = WanTransformer3DModel(WanTransformerConfig(**FAMILIES["t2v"])).init_random_weights_()
    x, t, text, _ = make_inputs("t2v")
    with pytest.raises(ValueError, match="hidden_states must be"):
        model(x[:, :4], t, text)
    with pytest.raises(ValueError, match="per-token timestep"):
        model(x, torch.zeros(2, 5), text)
    with pytest.raises(ValueError, match="image embedder"):
        model(x, t, text, encoder_hidden_states_image=torch.zeros(2, 5, 20))
    with pytest.raises(ValueError, match="attention_kwargs"):
        model(x, t, text, attention_kwargs={"scale": 0.5})
    assert torch.isfinite(model(x, t, text).sample).all()
