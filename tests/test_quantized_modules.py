"""Quantized modules as diffusers users use them (issue 15 item 3): ``mxdit.quantize_module`` on a diffusers
``WanPipeline``'s transformer with the default scope runs diffusers' pipeline end to end; dtype casts keep
the quantized storage (dtypes and bytes), device moves move it; ``state_dict`` and ``mxdit.save_quantized``
-> ``load_transformer`` round-trip bit-identically.  Models are built here with diffusers' and
transformers' own classes (and a tokenizer built in the test), not mxdit's helpers."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import mxdit
from mxdit.layers.linear import QuantLinear
from mxdit.layers.quantize import DEFAULT_ONLINE_INCLUDE, HIGH_PRECISION

METHODS = ("mxfp8", "mxfp4", "mxfp4_dual", "fp8")
#: storage dtypes of a quantized layer (weight, then its scales), per method
STORAGE = {
    "mxfp8": {"weight": torch.float8_e4m3fn, "weight_scale": torch.uint8},
    "mxfp4": {"weight": torch.uint8, "weight_scale": torch.uint8},
    "mxfp4_dual": {"weight": torch.uint8, "weight_scale": torch.uint8, "weight_dual_scale": torch.float32},
    "fp8": {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32},
}
BLOCK_LINEARS = {f"blocks.0.{n}" for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                                           "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + "a cat dog surfing on the wave red fox in snow".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _transformer(seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    # block K = 512 everywhere (dim 512, ffn 512): every online method, dual-level MXFP4 included
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=512, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).to(torch.bfloat16)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tok = _tokenizer()
    torch.manual_seed(1)
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                     relative_attention_num_buckets=8, dropout_rate=0.0,
                                     feed_forward_proj="gated-gelu")).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True])
    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sch, transformer=_transformer())


def _run(p):
    return p(prompt="a cat surfing", negative_prompt="", height=16, width=16, num_frames=5, num_inference_steps=2,
             guidance_scale=3.0, max_sequence_length=8, generator=torch.Generator().manual_seed(0), output_type="np").frames


def _storage(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("method", METHODS)
def test_default_scope_runs_the_diffusers_pipeline(pipe, method):
    """The issue's repro: quantize_module(pipe.transformer, method) with the defaults, then diffusers'
    WanPipeline end to end (text encoder, CFG, UniPC, VAE decode)."""
    ref = _run(pipe)
    p = copy.copy(pipe)
    p.transformer = copy.deepcopy(pipe.transformer)
    summary = mxdit.quantize_module(p.transformer, method)
    assert set(summary.layers) == BLOCK_LINEARS
    assert set(summary.skipped) == {"condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
                                    "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1",
                                    "condition_embedder.text_embedder.linear_2", "proj_out"}
    assert all(any(s.startswith(k) for k in HIGH_PRECISION) for s in summary.skipped)
    assert p.transformer.condition_embedder.time_embedder.linear_1.weight.dtype == torch.bfloat16
    for name in BLOCK_LINEARS:
        layer = p.transformer.get_submodule(name)
        assert isinstance(layer, QuantLinear) and {n: getattr(layer, n).dtype for n in STORAGE[method]} == STORAGE[method]
    out = _run(p)
    assert out.shape == ref.shape and bool((abs(out) < 10).all()) and not (out != out).any()
    assert 0 < abs(out - ref).max() < 0.25  # quantized, and still the same video
    # the unsafe scope is what broke diffusers (SiLU on float8): refused by diffusers, not by mxdit
    if method == "mxfp8":
        p2 = copy.copy(pipe)
        p2.transformer = copy.deepcopy(pipe.transformer)
        mxdit.quantize_module(p2.transformer, method, include=["*"])
        with pytest.raises((RuntimeError, NotImplementedError)):
            _run(p2)


def test_scope_that_selects_nothing_is_an_error():
    m = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"blocks\.\*.*include=\['\*'\]"):
        mxdit.quantize_module(m, "mxfp8")
    assert DEFAULT_ONLINE_INCLUDE == ("blocks.*",)
    s = mxdit.quantize_module(m, "mxfp8", include=["*"])
    assert s.layers == ["0"]


def _nbytes(model):
    return {k: (v.dtype, v.numel() * v.element_size()) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
def test_dtype_casts_keep_quantized_storage(method):
    model = _transformer()
    mxdit.quantize_module(model, method)
    before = _storage(model)
    quant_keys = {k for k in before if k.rpartition(".")[0] in BLOCK_LINEARS}
    layer = model.get_submodule("blocks.0.ffn.net.2")
    xl = torch.randn(3, 512).bfloat16()
    ref = layer(xl)
    for cast in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.float(),
                 lambda m: m.to("cpu", torch.float32), lambda m: m.to(torch.bfloat16), lambda m: m.bfloat16()):
        cast(model)
        after = model.state_dict()
        for k in quant_keys:  # weights, scales, fp32 biases: same dtype, bytes and bits
            assert _bits_equal(after[k], before[k]), k
        for k in set(before) - quant_keys:  # everything else is cast as torch casts it
            assert after[k].dtype == next(model.patch_embedding.parameters()).dtype or "norm" in k or k.endswith("scale_shift_table")
    # storage bytes of the quantized layers did not grow (the issue: .to(bfloat16) doubled them)
    q_bytes = sum(before[k].numel() * before[k].element_size() for k in quant_keys)
    assert q_bytes == sum(model.state_dict()[k].numel() * model.state_dict()[k].element_size() for k in quant_keys)
    assert layer.params_dtype == torch.bfloat16 and model.dtype == torch.bfloat16
    assert torch.equal(layer(xl), ref)  # the same numbers as before the casts
    x, enc, t = torch.randn(1, 16, 1, 4, 4).bfloat16(), torch.randn(1, 3, 32).bfloat16(), torch.tensor([500])
    assert bool(torch.isfinite(model(x, t, enc).sample).all())
    # a device move moves everything (meta: a second device available everywhere)
    model.to("meta")
    assert all(v.device.type == "meta" for v in model.state_dict().values())
    assert {k: v.dtype for k, v in model.state_dict().items() if k in quant_keys} == {k: before[k].dtype for k in quant_keys}


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip(method):
    a = _transformer(seed=0)
    mxdit.quantize_module(a, method)
    b = _transformer(seed=5)  # other weights, quantized the same way
    mxdit.quantize_module(b, method)
    x, enc, t = torch.randn(1, 16, 1, 4, 4).bfloat16(), torch.randn(1, 3, 32).bfloat16(), torch.tensor([300])
    b(x, t, enc)  # the backend prepares (caches) b's own weights; loading must drop that cache
    sd = a.state_dict()
    b.load_state_dict(sd)
    for k, v in sd.items():
        assert _bits_equal(b.state_dict()[k], v), k
    assert torch.equal(b(x, t, enc).sample, a(x, t, enc).sample)
    # a BF16 state dict into quantized storage is refused (torch would cast it into float8 silently)
    plain = _transformer(seed=0).state_dict()
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn1\.to_q.*quantized storage"):
        b.load_state_dict(plain)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A transformer directory written by diffusers' save_pretrained."""
    d = tmp_path_factory.mktemp("diffusers-wan") / "transformer"
    _transformer(seed=3).save_pretrained(str(d), safe_serialization=True)
    return str(d)


@pytest.mark.parametrize("method", ("mxfp8", "mxfp4", "mxfp4_dual"))
def test_save_quantized_round_trip(bf16_dir, tmp_path, method):
    # mxdit's own model: load online -> save -> load: every tensor and the output bit-identical
    m = mxdit.load_transformer(bf16_dir, quantization=method, progress=False)
    out = str(tmp_path / "q")
    mxdit.save_quantized(m, out)
    assert sorted(os.listdir(out)) == [".mxdit-output.json", "config.json", "diffusion_pytorch_model.safetensors",
                                       "quant_model_description.json"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["quantization_config"]["quant_method"] == "modelslim" and cfg["_class_name"] == "WanTransformer3DModel"
    m2 = mxdit.load_transformer(out, progress=False)
    assert m2.load_report.layout == "repacked"
    s1, s2 = m.state_dict(), m2.state_dict()
    assert sorted(s1) == sorted(s2)
    for k in s1:
        assert _bits_equal(s2[k], s1[k]), k
    x, enc, t = torch.randn(1, 16, 1, 4, 4).bfloat16(), torch.randn(1, 3, 32).bfloat16(), torch.tensor([700])
    assert torch.equal(m2(x, t, enc).sample, m(x, t, enc).sample)
    # diffusers' model quantized with quantize_module: the loaded mxdit model holds its exact bytes
    d = _transformer(seed=3)
    mxdit.quantize_module(d, method)
    out2 = str(tmp_path / "q2")
    mxdit.save_quantized(d, out2)
    m3 = mxdit.load_transformer(out2, progress=False)
    ds = d.state_dict()
    for k, v in m3.state_dict().items():
        if k.rpartition(".")[0] in BLOCK_LINEARS:
            assert _bits_equal(v, ds[k]), k
    for k in s1:  # and the same model as the online load of diffusers' own directory
        assert _bits_equal(m3.state_dict()[k], s1[k]), k
    # the output is never replaced silently; diffusers refuses it instead of loading float8 into BF16
    with pytest.raises(FileExistsError):
        mxdit.save_quantized(d, out2)
    from diffusers import WanTransformer3DModel

    with pytest.raises(ValueError, match="Unknown quantization type"):
        WanTransformer3DModel.from_pretrained(out2)


def test_save_quantized_refuses_fp8(tmp_path):
    d = _transformer()
    mxdit.quantize_module(d, "fp8")
    with pytest.raises(ValueError, match="fp8"):
        mxdit.save_quantized(d, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


def test_prompt_clean_is_diffusers_own(monkeypatch):
    """mxdit's pipeline cleans prompts with diffusers' function itself, not a retyped copy."""
    import diffusers.pipelines.wan.pipeline_wan as dw

    from mxdit.pipelines.wan import prompt_clean

    text = "  a &amp;amp; cat\n\t surfing  "
    assert prompt_clean(text) == dw.prompt_clean(text) == "a & cat surfing"
    monkeypatch.setattr(dw, "prompt_clean", lambda t: "from diffusers")
    assert prompt_clean(text) == "from diffusers"


def test_saved_transformer_in_a_pipeline_dir_generates_identically(pipe, tmp_path):
    """A diffusers pipeline directory (save_pretrained) whose transformer/ is replaced by save_quantized's
    output: mxdit's pipeline (what ``mxdit generate --model-path`` runs) detects the quantization and gives
    the same final latents as quantizing the BF16 directory online."""
    import shutil

    from mxdit.pipelines.wan import WanVideoPipeline

    src = tmp_path / "bf16"
    pipe.save_pretrained(str(src), safe_serialization=True)
    kw = dict(prompt="a cat surfing", height=16, width=16, num_frames=5, num_inference_steps=2, guidance_scale=3.0,
              seed=0, max_sequence_length=8, output_type="latent")
    online = WanVideoPipeline.from_pretrained(str(src), quantization="mxfp4_dual", dtype=torch.bfloat16)
    ref = online(**kw).latents
    q = tmp_path / "q"
    shutil.copytree(src, q, ignore=shutil.ignore_patterns("transformer"))
    mxdit.save_quantized(online.transformer, str(q / "transformer"))
    saved = WanVideoPipeline.from_pretrained(str(q), dtype=torch.bfloat16)
    assert saved.transformer.load_report.layout == "repacked"
    assert torch.equal(saved(**kw).latents, ref)
