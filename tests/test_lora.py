"""LoRA on QuantLinear (mxdit.layers.lora) and LoRA files (mxdit.loader.lora).

Oracles: plain float math for the low-rank branch and the merged weight; the quantized
layer's base output against the independent oracle of tests/_quant_oracles.py; diffusers'
own ``load_lora_weights`` (peft) on the same diffusers pipeline for a BF16-base run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from safetensors.torch import load_file, save_file
from torch import nn

from _quant_oracles import check_output
from _tiny_wan import diffusers_loader, tiny_model_dir
from test_quant_layers import K, N, build, expected

import mxdit
from mxdit.layers import lora as L
from mxdit.loader import lora as LL
from mxdit.pipelines.tiny import TINY_DIM, TINY_FFN, TINY_LAYERS
from mxdit.pipelines.wan import WanVideoPipeline, relative_error

R = 4


def _ab(seed, k=K, n=N, r=R, dtype=torch.bfloat16, amp=0.05):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, k, generator=g) * amp).to(dtype), (torch.randn(n, r, generator=g) * amp).to(dtype)


def _bits(module: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() if v.element_size() == 1
            else v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ the branch, per method
@pytest.mark.parametrize("method", ["mxfp8", "mxfp4", "mxfp4_dual", "fp8"])
def test_unmerged_lora_equals_base_plus_low_rank_branch(method):
    layer, _, b = build(method)
    before = _bits(layer)
    A1, B1 = _ab(1)
    A2, B2 = _ab(2, r=2)
    bias2 = torch.randn(N, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16) * 0.1
    L.add_adapter(layer, "one", L.LoRAWeights(A1, B1))
    L.add_adapter(layer, "two", L.LoRAWeights(A2, B2, bias2))
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    base = layer(x)  # nothing active yet: the base alone
    ref64, absdot = expected(method, layer, x, layer.bias)
    check_output(base, ref64, absdot, what=method)
    L.set_active(layer, [("one", 0.7), ("two", -1.5)])
    y = layer(x)
    want = base + Fn.linear(Fn.linear(x, A1), B1) * 0.7
    want = want + Fn.linear(Fn.linear(x, A2), B2, bias2) * -1.5
    assert torch.equal(y, want)  # bit-exact: the branch is outside the method, in this order
    # and against float64: dequantized-base reference + the low-rank branch
    ref = torch.from_numpy(ref64).reshape(y.shape) + 0.7 * (x.double() @ A1.double().T @ B1.double().T) \
        - 1.5 * (x.double() @ A2.double().T @ B2.double().T + bias2.double())
    assert float((y.double() - ref).abs().max()) < 0.05 * float(ref.abs().max())
    L.set_active(layer, [])
    assert torch.equal(layer(x), base) and _bits(layer) == before


# ------------------------------------------------------------------ key styles
@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "t2v-a14b")


@pytest.fixture(scope="module")
def model(t2v_dir):
    return mxdit.load_transformer(str(t2v_dir / "transformer"), dtype=torch.float32, progress=False)


ORIG = {"attn1.to_q": "self_attn.q", "attn2.to_v": "cross_attn.v", "ffn.net.0.proj": "ffn.0"}
SHAPES = {"attn1.to_q": (TINY_DIM, TINY_DIM), "attn2.to_v": (TINY_DIM, TINY_DIM), "ffn.net.0.proj": (TINY_FFN, TINY_DIM)}


def _pairs(seed=0, r=R):
    g = torch.Generator().manual_seed(seed)
    return {s: (torch.randn(r, k, generator=g) * 0.02, torch.randn(n, r, generator=g) * 0.02)
            for s, (n, k) in SHAPES.items()}


def test_every_key_style_loads(tmp_path, model):
    p = _pairs()
    styles = {}
    styles["diffusers"] = {f"transformer.blocks.1.{s}.lora_{x}.weight": t for s, (a, b) in p.items()
                           for x, t in (("A", a), ("B", b))}
    styles["wan"] = {}
    for s, (a, b) in p.items():
        o = ORIG[s]
        styles["wan"].update({f"diffusion_model.blocks.1.{o}.lora_down.weight": a,
                              f"diffusion_model.blocks.1.{o}.lora_up.weight": b,
                              f"diffusion_model.blocks.1.{o}.alpha": torch.tensor(float(2 * R))})
    styles["wan"]["diffusion_model.blocks.1.self_attn.q.diff_b"] = torch.full((TINY_DIM,), 0.25)
    styles["wan"]["diffusion_model.blocks.1.norm3.diff"] = torch.zeros(TINY_DIM)  # zeroed norm diff: dropped
    styles["comfyui"] = {"model." + k: v for k, v in styles["wan"].items()}
    styles["lightx2v"] = {f"blocks.1.{ORIG[s]}.lora_{x}.weight": t for s, (a, b) in p.items()
                          for x, t in (("A", a), ("B", b))}
    # kohya / musubi: diffusers' converter wants every layer of every block
    kohya = {}
    g = torch.Generator().manual_seed(9)
    for i in range(TINY_LAYERS):
        for o, (n, k) in {"self_attn_q": (TINY_DIM, TINY_DIM), "self_attn_k": (TINY_DIM, TINY_DIM),
                          "self_attn_v": (TINY_DIM, TINY_DIM), "self_attn_o": (TINY_DIM, TINY_DIM),
                          "cross_attn_q": (TINY_DIM, TINY_DIM), "cross_attn_k": (TINY_DIM, TINY_DIM),
                          "cross_attn_v": (TINY_DIM, TINY_DIM), "cross_attn_o": (TINY_DIM, TINY_DIM),
                          "ffn_0": (TINY_FFN, TINY_DIM), "ffn_2": (TINY_DIM, TINY_FFN)}.items():
            kohya[f"lora_unet_blocks_{i}_{o}.lora_down.weight"] = torch.randn(R, k, generator=g) * 0.02
            kohya[f"lora_unet_blocks_{i}_{o}.lora_up.weight"] = torch.randn(n, R, generator=g) * 0.02
            kohya[f"lora_unet_blocks_{i}_{o}.alpha"] = torch.tensor(float(R))
    styles["kohya"] = kohya
    for name, sd in styles.items():
        f = tmp_path / f"{name}.safetensors"
        save_file(sd, str(f))
        ad = LL.to_module_adapters(LL.read_lora_file(str(f)), name)
        LL.match_model(model, ad, name)
        if name == "kohya":
            assert len(ad) == 10 * TINY_LAYERS
            w = ad["blocks.1.ffn.net.2"]
            want = kohya["lora_unet_blocks_1_ffn_2.lora_up.weight"] @ kohya["lora_unet_blocks_1_ffn_2.lora_down.weight"]
            torch.testing.assert_close(w.delta(1.0), want, rtol=1e-5, atol=1e-7)
            continue
        assert sorted(ad) == sorted(f"blocks.1.{s}" for s in p), name
        scale = 2.0 if name in ("wan", "comfyui") else 1.0  # alpha / rank
        for s, (a, b) in p.items():
            torch.testing.assert_close(ad[f"blocks.1.{s}"].delta(1.0), scale * (b @ a), rtol=1e-5, atol=1e-7)
        if name in ("wan", "comfyui"):
            assert torch.equal(ad["blocks.1.attn1.to_q"].bias, torch.full((TINY_DIM,), 0.25))


def test_unmatched_and_unsupported_keys_are_one_line_errors(tmp_path, model):
    a, b = torch.zeros(R, TINY_DIM), torch.zeros(TINY_DIM, R)
    f = tmp_path / "bad.safetensors"
    save_file({"transformer.blocks.7.attn1.to_q.lora_A.weight": a, "transformer.blocks.7.attn1.to_q.lora_B.weight": b,
               "transformer.blocks.0.attn1.to_q.lora_A.weight": a.clone(),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": b.clone()}, str(f))
    ad = LL.to_module_adapters(LL.read_lora_file(str(f)), "bad")
    with pytest.raises(LL.LoRAError, match=r"1 of 2 LoRA layers match no linear layer of the model: blocks\.7\.attn1\.to_q$"):
        LL.match_model(model, ad, "bad")
    save_file({"diffusion_model.blocks.0.self_attn.q.diff": torch.ones(TINY_DIM, TINY_DIM)}, str(f))
    with pytest.raises(LL.LoRAError, match="full weight difference"):
        LL.to_module_adapters(LL.read_lora_file(str(f)), "bad")
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(R, 3),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": b}, str(f))
    with pytest.raises(LL.LoRAError, match=r"blocks\.0\.attn1\.to_q.*\[r, 512\]"):
        LL.match_model(model, LL.to_module_adapters(LL.read_lora_file(str(f))), "bad")
    (tmp_path / "x.bin").write_bytes(b"\0" * 16)
    with pytest.raises(LL.LoRAError, match="not a .safetensors"):
        LL.read_lora_file(str(tmp_path / "x.bin"))


# ------------------------------------------------------------------ merge before quantization
def _lora_file(path, seed=0, block=0):
    sd = {}
    for s, (a, b) in _pairs(seed).items():
        sd[f"transformer.blocks.{block}.{s}.lora_A.weight"] = a
        sd[f"transformer.blocks.{block}.{s}.lora_B.weight"] = b
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("method", ["mxfp8", "fp8"])
def test_merged_then_quantized_equals_quantizing_the_merged_weight(tmp_path, t2v_dir, method):
    lf = _lora_file(tmp_path / "l.safetensors", seed=5)
    scale = 0.8
    ad = LL.to_module_adapters(LL.read_lora_file(str(lf)))
    merged = mxdit.load_transformer(str(t2v_dir / "transformer"), quantization=method, progress=False,
                                    lora_merge=LL.LoadTimeMerge([("l", ad, scale)], "merge"))
    # independently: merge into the BF16 checkpoint with plain float math, then quantize it
    src = t2v_dir / "transformer"
    d = tmp_path / "merged"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    lsd = load_file(str(lf))
    for s in SHAPES:
        k = f"blocks.0.{s}.weight"
        w = sd[k].to(torch.bfloat16).float()
        w += scale * (lsd[f"transformer.blocks.0.{s}.lora_B.weight"].float() @ lsd[f"transformer.blocks.0.{s}.lora_A.weight"].float())
        sd[k] = w.to(torch.bfloat16)
    save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
    want = mxdit.load_transformer(str(d), quantization=method, progress=False)
    got_bits, want_bits = _bits(merged), _bits(want)
    assert got_bits.keys() == want_bits.keys() and all(got_bits[k] == want_bits[k] for k in got_bits)
    plain = mxdit.load_transformer(str(src), quantization=method, progress=False)
    assert _bits(plain)["blocks.0.attn1.to_q.weight"] != got_bits["blocks.0.attn1.to_q.weight"]  # it did merge


def test_merge_refused_on_a_prequantized_layer_auto_falls_back():
    layer, _, _ = build("mxfp8")
    holder = nn.Module()
    holder.add_module("proj", layer)
    ad = {"proj": L.LoRAWeights(*_ab(0))}
    with pytest.raises(LL.LoRAError, match=r"cannot merge into layer 'proj': the base is pre-quantized .*dynamic"):
        LL.LoadTimeMerge([("f", ad, 1.0)], "merge").prepare(holder)
    m = LL.LoadTimeMerge([("f", ad, 1.0)], "auto")
    m.prepare(holder)
    assert m.merged is False


# ------------------------------------------------------------------ switching leaves the base untouched
def test_switching_loras_between_requests_keeps_base_bits(tmp_path, t2v_dir):
    model = mxdit.load_transformer(str(t2v_dir / "transformer"), quantization="mxfp4", progress=False)
    ctl = LL.PipelineLoRA({"transformer": model})
    before = _bits(model)
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g).to(torch.bfloat16),
              timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 8, 512, generator=g).to(torch.bfloat16),
              return_dict=False)
    base = model(**kw)[0]
    ctl.set_lora("a", str(_lora_file(tmp_path / "a.safetensors", 1)))
    ya = model(**kw)[0]
    ctl.set_lora("b", str(_lora_file(tmp_path / "b.safetensors", 2, block=1)), strength=2.0)
    yb = model(**kw)[0]
    ctl.set_lora(["a", "b"], [None, None], strength=[1.0, 2.0])
    yab = model(**kw)[0]
    ctl.set_lora("a")
    assert torch.equal(model(**kw)[0], ya)
    ctl.disable()
    assert torch.equal(model(**kw)[0], base)
    assert not torch.equal(ya, base) and not torch.equal(yb, base) and not torch.equal(yab, ya)
    assert _bits(model) == before
    assert [a["nickname"] for a in ctl.list()["loaded_adapters"]] == ["a", "b"]
    ctl.set_lora("a", str(tmp_path / "b.safetensors"), strength=2.0)  # a new file under a known nickname
    assert "a" not in L.layer_lora(model.get_submodule("blocks.0.attn1.to_q")).adapters  # the old file is gone
    assert torch.equal(model(**kw)[0], yb)
    with pytest.raises(LL.LoRAError, match="quantized"):
        ctl.set_lora("a")
        ctl.merge()
    with pytest.raises(LL.LoRAError, match="not loaded"):
        ctl.set_lora("zzz")


def test_runtime_merge_unmerge_on_unquantized_is_exact(tmp_path, model):
    ctl = LL.PipelineLoRA({"transformer": model})
    before = _bits(model)
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([500.0]),
              encoder_hidden_states=torch.randn(1, 8, 512, generator=g), return_dict=False)
    ctl.set_lora("a", str(_lora_file(tmp_path / "a.safetensors", 1)), strength=1.5)
    dyn = model(**kw)[0]
    ctl.merge()
    assert _bits(model) != before
    assert relative_error(model(**kw)[0], dyn) < 1e-5
    ctl.unmerge()
    assert _bits(model) == before and torch.equal(model(**kw)[0], dyn)
    ctl.disable()


# ------------------------------------------------------------------ against diffusers (peft), both experts
def test_bf16_base_matches_diffusers_load_lora_weights(tmp_path, t2v_dir):
    import diffusers

    pytest.importorskip("peft")
    high = _lora_file(tmp_path / "high_noise_model.safetensors", seed=11)
    sd = {}  # the low-noise file in original Wan (lightx2v / ComfyUI) keys, with alpha
    for s, (a, b) in _pairs(12).items():
        sd[f"diffusion_model.blocks.1.{ORIG[s]}.lora_down.weight"] = a * 3
        sd[f"diffusion_model.blocks.1.{ORIG[s]}.lora_up.weight"] = b * 3
        sd[f"diffusion_model.blocks.1.{ORIG[s]}.alpha"] = torch.tensor(float(R))
    low = tmp_path / "low_noise_model.safetensors"
    save_file(sd, str(low))
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=3, guidance_scale=4.0, guidance_scale_2=3.0,
              output_type="latent", max_sequence_length=32)
    specs = LL.parse_lora_paths([f"transformer={high}", f"transformer_2={low}"], ["lightning"], [1.0])
    ours = WanVideoPipeline.from_pretrained(t2v_dir, dtype=torch.float32, text_encoder_dtype=torch.float32,
                                            loras=specs, lora_merge_mode="dynamic", progress=False)
    ref_parts = WanVideoPipeline.from_pretrained(t2v_dir, dtype=torch.float32, text_encoder_dtype=torch.float32,
                                                 transformer_loader=diffusers_loader)
    ref = diffusers.WanPipeline(tokenizer=ref_parts.tokenizer, text_encoder=ref_parts.text_encoder, vae=ref_parts.vae,
                                scheduler=ref_parts.scheduler, transformer=ref_parts.transformer,
                                transformer_2=ref_parts.transformer_2, boundary_ratio=ref_parts.boundary_ratio)
    ref.set_progress_bar_config(disable=True)
    g = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    no_lora = ref("a fox", "blurry", generator=g(), **kw).frames
    ref.load_lora_weights(str(high), adapter_name="lightning")
    ref.load_lora_weights(str(low), adapter_name="lightning", load_into_transformer_2=True)
    want = ref("a fox", "blurry", generator=g(), **kw).frames
    got = ours("a fox", "blurry", generator=g(), **{k: v for k, v in kw.items()}).latents
    err = relative_error(got, want)
    assert err < 1e-4, err
    assert relative_error(no_lora, want) > 100 * max(err, 1e-7)  # the LoRAs change the result
    assert ours.lora.list()["active"] == {"transformer": [{"nickname": "lightning", "strength": 1.0}],
                                          "transformer_2": [{"nickname": "lightning", "strength": 1.0}]}


# ------------------------------------------------------------------ mxdit serve: SGLang's LoRA routes
def test_serve_lora_routes(tmp_path, t2v_dir):
    from fastapi.testclient import TestClient

    from mxdit.pipelines.model_dir import inspect_model_dir
    from mxdit.serve.app import Server, create_app
    from mxdit.serve.engine import Engine
    from mxdit.serve.store import JobStore

    pipe = WanVideoPipeline.from_pretrained(t2v_dir, quantization="mxfp8", progress=False)
    before = _bits(pipe.transformer)
    srv = Server(Engine(pipe, inspect_model_dir(t2v_dir)), JobStore(str(tmp_path / "j.sqlite")), tmp_path)
    http = TestClient(create_app(srv))
    lf = str(_lora_file(tmp_path / "style.safetensors", 3))
    r = http.post("/v1/set_lora", json={"lora_nickname": "style", "lora_path": lf, "target": "transformer",
                                         "strength": 0.5})
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    listed = http.get("/v1/list_loras").json()
    assert listed["active"] == {"transformer": [{"nickname": "style", "strength": 0.5}], "transformer_2": []}
    layer = pipe.transformer.get_submodule("blocks.0.attn1.to_q")
    assert L.layer_lora(layer).active == (("style", 0.5),)
    for body, field in [({}, "lora_nickname"), ({"lora_nickname": 3}, "lora_nickname"),
                        ({"lora_nickname": "s", "strength": "x"}, "strength"),
                        ({"lora_nickname": "s", "strength": float("1e9")}, "strength"),
                        ({"lora_nickname": ["s"] * 17}, "lora_nickname"),
                        ({"lora_nickname": "s", "lora_path": str(tmp_path / "missing.safetensors")}, "lora_path"),
                        ({"lora_nickname": "s", "merge_mode": "fused"}, "merge_mode"),
                        ({"lora_nickname": "never"}, "lora_nickname")]:
        r = http.post("/v1/set_lora", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (body, r.text)
    r = http.post("/v1/merge_lora_weights", json={})
    assert r.status_code == 400 and "quantized" in r.json()["error"]["message"]
    assert http.post("/v1/unmerge_lora_weights", json={"target": 5}).json()["error"]["param"] == "target"
    assert http.post("/v1/set_lora", json={"lora_nickname": "style", "strength": 0.0}).status_code == 200
    assert _bits(pipe.transformer) == before  # switching never wrote the base


# ------------------------------------------------------------------ mxdit generate --lora-*
def test_generate_with_one_lora_per_expert(tmp_path, t2v_dir, capsys):
    from mxdit.cli import main

    small = ["--height", "32", "--width", "32", "--num-frames", "5", "--num-inference-steps", "2", "--no-progress",
             "--quantization", "mxfp8"]
    hi, lo = _lora_file(tmp_path / "high.safetensors", 1), _lora_file(tmp_path / "low.safetensors", 2, block=1)
    out = tmp_path / "o.mp4"
    rc = main(["generate", "--model-path", str(t2v_dir), "--prompt", "a fox", *small, "--output", str(out),
               "--lora-path", f"transformer={hi}", f"transformer_2={lo}", "--lora-nickname", "lightning",
               "--lora-scale", "1.0", "--lora-merge-mode", "merge"])
    assert rc == 0 and out.is_file()
    bad = tmp_path / "bad.safetensors"
    save_file({"transformer.blocks.5.attn1.to_k.lora_A.weight": torch.zeros(R, TINY_DIM),
               "transformer.blocks.5.attn1.to_k.lora_B.weight": torch.zeros(TINY_DIM, R)}, str(bad))
    capsys.readouterr()
    rc = main(["generate", "--model-path", str(t2v_dir), "--prompt", "a fox", *small, "--output", str(out),
               "--lora-path", str(bad)])
    errs = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert rc == 2 and len(errs) == 1 and errs[0].endswith("match no linear layer of the model: blocks.5.attn1.to_k")


@pytest.mark.parametrize("label", ["W8A8_MXFP8", "W4A4_MXFP4_DUALSCALE", "W8A8_DYNAMIC"])
def test_unmerged_lora_on_msmodelslim_layers(tmp_path, label):
    from test_modelslim import N as MN, _one_layer, load_layer

    cfg, ckpt, _ = _one_layer(tmp_path, label)
    layer = load_layer(cfg, ckpt, "blocks.0.attn1.to_q", 512, MN)
    before = _bits(layer)
    A, B = _ab(7, k=512, n=MN)
    x = torch.randn(6, 512, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    base = layer(x)
    L.add_adapter(layer, "s", L.LoRAWeights(A, B))
    L.set_active(layer, [("s", 1.25)])
    assert torch.equal(layer(x), base + Fn.linear(Fn.linear(x, A), B) * 1.25)
    assert _bits(layer) == before
    with pytest.raises(ValueError, match="quantized"):
        L.merge_active(layer)
