"""WanVideoPipeline on tiny random Wan2.2 models: parity with diffusers, expert switch, CFG, perf record."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from _tiny_wan import RecordingTransformer, diffusers_loader, load_fp32, loader_available, tiny_model_dir

from mxdit.pipelines.timing import SGLANG_STAGE_NAMES, STAGES
from mxdit.pipelines.wan import WanVideoPipeline, psnr, relative_error

H = W = 32
FRAMES = 5
STEPS = 6
PROMPT = "a red fox runs through the snow"
NEG = "blurry, static"
L = 32  # max_sequence_length: Wan uses 512; 32 keeps the tiny runs fast and changes no code path


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "t2v-a14b")


@pytest.fixture(scope="module")
def t2v(t2v_dir):
    return load_fp32(t2v_dir)


def _image(h=48, w=80, seed=0):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def _gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


# ------------------------------------------------------------------ parity with diffusers
def _diffusers_pipe(cls, ours):
    ref = cls(
        tokenizer=ours.tokenizer, text_encoder=ours.text_encoder, vae=ours.vae, scheduler=ours.scheduler,
        transformer=ours.transformer, transformer_2=ours.transformer_2, boundary_ratio=ours.boundary_ratio,
        expand_timesteps=ours.expand_timesteps,
    )
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize(
    "kind,ref_cls,with_image",
    [
        ("t2v-a14b", "WanPipeline", False),
        ("i2v-a14b", "WanImageToVideoPipeline", True),
        ("ti2v-5b", "WanPipeline", False),
        ("ti2v-5b", "WanImageToVideoPipeline", True),
    ],
)
def test_parity_with_diffusers_fp32(tmp_path_factory, monkeypatch, kind, ref_cls, with_image):
    import diffusers
    from diffusers.pipelines.wan import pipeline_wan_i2v

    # diffusers 0.42.1's I2V module calls ftfy.fix_text unconditionally although ftfy is an
    # optional dependency (not installed here); our pipeline skips ftfy when it is missing, as
    # diffusers' T2V module does.  Give the reference the same identity cleaning.
    monkeypatch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda s: s), raising=False)

    ours = load_fp32(tiny_model_dir(tmp_path_factory, kind))
    ref = _diffusers_pipe(getattr(diffusers, ref_cls), ours)
    kw = dict(prompt=PROMPT, negative_prompt=NEG, height=H, width=W, num_frames=FRAMES,
              num_inference_steps=STEPS, guidance_scale=4.0, max_sequence_length=L)
    if ours.boundary_ratio is not None:
        kw["guidance_scale_2"] = 3.0
    if with_image:
        kw["image"] = _image()
    expected = ref(**kw, generator=_gen(), output_type="latent").frames
    got = ours(**kw, generator=_gen(), output_type="latent")
    assert got.frames is None
    assert got.latents.shape == expected.shape
    assert torch.isfinite(got.latents).all()
    assert relative_error(got.latents, expected) < 1e-4
    if ours.boundary_ratio is not None:  # both experts really ran
        assert {s["expert"] for s in got.perf["denoise_steps_ms"]} == {"transformer", "transformer_2"}


# ------------------------------------------------------------------ expert switch
def _expected_experts(pipe, steps, ratio):
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    boundary = ratio * sched.config.num_train_timesteps
    return ["transformer" if t >= boundary else "transformer_2" for t in sched.timesteps], sched.timesteps


@pytest.mark.parametrize("steps,ratio", [(6, None), (8, None), (6, 0.5), (6, 1.0), (6, 0.0)])
def test_expert_switch_follows_boundary(t2v, steps, ratio):
    log: list = []
    pipe = WanVideoPipeline(
        t2v.tokenizer, t2v.text_encoder, t2v.vae, t2v.scheduler,
        RecordingTransformer(t2v.transformer, "transformer", log),
        RecordingTransformer(t2v.transformer_2, "transformer_2", log),
        boundary_ratio=t2v.boundary_ratio,
    )
    out = pipe(PROMPT, NEG, height=H, width=W, num_frames=FRAMES, num_inference_steps=steps,
               boundary_ratio=ratio, seed=0, output_type="latent", max_sequence_length=L)
    expected, timesteps = _expected_experts(t2v, steps, 0.875 if ratio is None else ratio)
    recorded = [s["expert"] for s in out.perf["denoise_steps_ms"]]
    assert recorded == expected
    # two calls (cond, uncond) per step, by the expert the step says, at that step's timestep
    assert [name for name, *_ in log] == [e for e in expected for _ in range(2)]
    assert [int(ts[0]) for _, ts, *_ in log] == [int(t) for t in timesteps for _ in range(2)]
    assert out.perf["settings"]["num_high_noise_steps"] == expected.count("transformer")
    if ratio is None:
        assert 0 < expected.count("transformer") < steps  # both experts at the default boundary


def test_guidance_scales_per_expert_and_cfg_formula(t2v, monkeypatch):
    from diffusers import UniPCMultistepScheduler

    log: list = []
    fed: list = []
    orig_step = UniPCMultistepScheduler.step

    def recording_step(self, model_output, timestep, sample, *a, **k):
        fed.append(model_output.clone())
        return orig_step(self, model_output, timestep, sample, *a, **k)

    monkeypatch.setattr(UniPCMultistepScheduler, "step", recording_step)
    pipe = WanVideoPipeline(
        t2v.tokenizer, t2v.text_encoder, t2v.vae, t2v.scheduler,
        RecordingTransformer(t2v.transformer, "transformer", log),
        RecordingTransformer(t2v.transformer_2, "transformer_2", log),
        boundary_ratio=t2v.boundary_ratio,
    )
    g_high, g_low = 5.0, 2.0
    out = pipe(PROMPT, NEG, height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS,
               guidance_scale=g_high, guidance_scale_2=g_low, seed=0, output_type="latent", max_sequence_length=L)
    assert len(fed) == STEPS and len(log) == 2 * STEPS
    with torch.no_grad():
        pos = pipe._encode_text([PROMPT], L)
        neg = pipe._encode_text([NEG], L)
    for i, step in enumerate(out.perf["denoise_steps_ms"]):
        (n_c, _, emb_c, cond), (n_u, _, emb_u, uncond) = log[2 * i], log[2 * i + 1]
        assert n_c == n_u == step["expert"]
        torch.testing.assert_close(emb_c, pos, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(emb_u, neg, rtol=1e-6, atol=1e-6)
        g = g_high if step["expert"] == "transformer" else g_low
        torch.testing.assert_close(fed[i], uncond + g * (cond - uncond), rtol=0, atol=0)


def test_guidance_changes_output_and_scale_one_skips_uncond(t2v):
    log: list = []
    pipe = WanVideoPipeline(
        t2v.tokenizer, t2v.text_encoder, t2v.vae, t2v.scheduler,
        RecordingTransformer(t2v.transformer, "transformer", log),
        RecordingTransformer(t2v.transformer_2, "transformer_2", log),
        boundary_ratio=t2v.boundary_ratio,
    )
    kw = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS, seed=0, output_type="latent",
              max_sequence_length=L)
    a = pipe(PROMPT, NEG, guidance_scale=1.0, guidance_scale_2=1.0, **kw).latents
    assert len(log) == STEPS  # no unconditional pass at scale 1
    b = pipe(PROMPT, NEG, guidance_scale=5.0, guidance_scale_2=5.0, **kw).latents
    assert relative_error(a, b) > 1e-4
    c = pipe(PROMPT, NEG, guidance_scale=5.0, guidance_scale_2=5.0, **kw).latents
    assert torch.equal(b, c)  # same seed, same result


def test_model_defaults_for_a14b(t2v):
    assert t2v.kind == "t2v-a14b"
    assert (t2v.defaults["guidance_scale"], t2v.defaults["guidance_scale_2"]) == (4.0, 3.0)
    out = t2v(PROMPT, height=H, width=W, num_frames=FRAMES, num_inference_steps=2, seed=0, output_type="latent",
              max_sequence_length=L)
    s = out.perf["settings"]
    assert (s["guidance_scale"], s["guidance_scale_2"], s["boundary_ratio"]) == (4.0, 3.0, 0.875)


# ------------------------------------------------------------------ outputs and perf record
def test_frames_and_perf_record(t2v):
    out = t2v(PROMPT, NEG, height=H, width=W, num_frames=FRAMES, num_inference_steps=4, seed=0)
    assert isinstance(out.frames, np.ndarray)
    assert out.frames.shape == (FRAMES, H, W, 3) and out.frames.dtype == np.uint8
    assert out.frames.std() > 1.0  # not a constant video
    perf = json.loads(json.dumps(out.perf))  # JSON-serializable
    t2v_stages = [SGLANG_STAGE_NAMES[s] for s in STAGES if s != "image_encoding"]
    assert [s["name"] for s in perf["steps"]] == t2v_stages  # SGLang's stage names
    stages = {s["name"]: s["duration_ms"] for s in perf["steps"]}
    assert all(v >= 0 for v in stages.values())
    assert [s["step"] for s in perf["denoise_steps_ms"]] == list(range(4))
    assert {s["expert"] for s in perf["denoise_steps_ms"]} == {"transformer", "transformer_2"}
    assert sum(stages.values()) <= perf["total_duration_ms"] * 1.001
    assert sum(s["duration_ms"] for s in perf["denoise_steps_ms"]) <= stages["DenoisingStage"] * 1.001
    assert perf["peak_memory"]["rss_bytes"] > 0
    assert perf["peak_memory"]["device_max_allocated_bytes"] is None  # CPU
    assert set(perf["versions"]) >= {"mxdit", "torch", "diffusers", "transformers", "python"}
    assert perf["meta"] == {"model": "model", "prompt": PROMPT} and perf["device"] == "cpu"
    assert perf["quantization"] is None and perf["model_load_ms"] > 0
    assert "commit_hash" in perf and "timestamp" in perf
    assert set(perf["memory_checkpoints"]) == {"before_forward", "after_forward"}
    mm = perf["model_memory_bytes"]
    assert mm["transformer"] > 0 and mm["transformer_2"] > 0 and mm["vae"] > 0 and mm["text_encoder"] > 0


def test_pt_output_batch_and_scheduler_untouched(t2v):
    before = t2v.scheduler.timesteps.clone() if t2v.scheduler.timesteps is not None else None
    out = t2v([PROMPT, "a blue car"], [NEG, NEG], height=H, width=W, num_frames=FRAMES, num_inference_steps=2,
              generator=[_gen(0), _gen(1)], output_type="pt", max_sequence_length=L)
    assert isinstance(out.frames, torch.Tensor) and out.frames.shape == (2, FRAMES, H, W, 3)
    after = t2v.scheduler.timesteps
    assert (before is None and after is None) or torch.equal(before, after)


def test_i2v_needs_image_and_sizes_from_aspect(tmp_path_factory):
    pipe = load_fp32(tiny_model_dir(tmp_path_factory, "i2v-a14b"))
    with pytest.raises(ValueError, match="image is required"):
        pipe(PROMPT, height=H, width=W, num_frames=FRAMES, num_inference_steps=1)
    assert pipe.resolve_size_for_image((720, 1280)) == (720, 1280)  # the I2V-A14B default area
    h, w = pipe.resolve_size_for_image((100, 200))
    assert h % 16 == 0 and w % 16 == 0 and w > h


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_frames=8), "4n\\+1"),
        (dict(height=40), "multiples of 16"),
        (dict(width=24), "multiples of 16"),
        (dict(num_inference_steps=0), ">= 1"),
        (dict(image="unused.png"), "text-to-video"),
        (dict(boundary_ratio=1.5), "\\[0, 1\\]"),
        (dict(output_type="pil"), "output_type"),
    ],
)
def test_pipeline_rejects_bad_input(t2v, kwargs, match):
    base = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=1, max_sequence_length=L)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        t2v(PROMPT, **base)


def test_dense_model_rejects_moe_arguments(tmp_path_factory):
    pipe = load_fp32(tiny_model_dir(tmp_path_factory, "ti2v-5b"))
    assert pipe.kind == "ti2v-5b" and pipe.size_multiple == (32, 32)
    with pytest.raises(ValueError, match="guidance_scale_2"):
        pipe(PROMPT, height=32, width=32, num_frames=FRAMES, num_inference_steps=1, guidance_scale_2=2.0)
    with pytest.raises(ValueError, match="multiples of 32"):
        pipe(PROMPT, height=48, width=32, num_frames=FRAMES, num_inference_steps=1)


# ------------------------------------------------------------------ loading
def test_from_pretrained_loads_both_experts_with_quantization(t2v_dir):
    calls = []

    def recording_loader(path, **kw):
        calls.append((path, kw["quantization"], kw["dtype"], kw.get("ignore")))
        return diffusers_loader(path, dtype=kw["dtype"], device=kw["device"])

    pipe = WanVideoPipeline.from_pretrained(
        t2v_dir, quantization="mxfp8", dtype=torch.float32, transformer_loader=recording_loader, ignore=["x"]
    )
    assert calls == [
        (str(t2v_dir / "transformer"), "mxfp8", torch.float32, ["x"]),
        (str(t2v_dir / "transformer_2"), "mxfp8", torch.float32, ["x"]),
    ]
    assert pipe.quantization == "mxfp8" and pipe.boundary_ratio == 0.875


def test_transformer_weights_path_only_replaces_transformer(t2v_dir, tmp_path):
    import shutil

    override = tmp_path / "weights"
    shutil.copytree(t2v_dir / "transformer", override)
    calls = []

    def recording_loader(path, **kw):
        calls.append(path)
        return diffusers_loader(path, dtype=kw["dtype"], device=kw["device"])

    WanVideoPipeline.from_pretrained(t2v_dir, transformer_weights_path=override, dtype=torch.float32,
                                     transformer_loader=recording_loader)
    assert calls == [str(override), str(t2v_dir / "transformer_2")]
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        WanVideoPipeline.from_pretrained(t2v_dir, transformer_weights_path=tmp_path / "does-not-exist",
                                         transformer_loader=recording_loader)


def test_from_pretrained_missing_component_names_the_file(t2v_dir, tmp_path):
    from mxdit.pipelines.model_dir import ModelDirError

    with pytest.raises(ModelDirError, match="does not exist"):
        WanVideoPipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelDirError, match="model_index.json"):
        WanVideoPipeline.from_pretrained(tmp_path / "m")


def test_constructor_checks_experts(t2v):
    with pytest.raises(ValueError, match="transformer_2"):
        WanVideoPipeline(t2v.tokenizer, t2v.text_encoder, t2v.vae, t2v.scheduler, t2v.transformer,
                         None, boundary_ratio=0.875)


def test_config_access_for_attribute_configs():
    from dataclasses import dataclass

    from mxdit.pipelines.wan import config_get

    @dataclass
    class Cfg:
        in_channels: int = 16
        patch_size: tuple = (1, 2, 2)

    assert config_get(Cfg(), "in_channels") == 16
    assert config_get({"in_channels": 36}, "in_channels") == 36
    assert config_get(Cfg(), "missing", 7) == 7


def test_psnr_and_relative_error():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert psnr(a, a) == float("inf")
    b = a.copy()
    b[0, 0, 0, 0] = 255
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / (255**2 / a.size)))
    x = torch.ones(10)
    assert relative_error(x * 1.01, x) == pytest.approx(0.01)


# ------------------------------------------------------------------ quantized (needs mxdit.load_transformer)
needs_loader = pytest.mark.skipif(
    not loader_available(), reason="needs mxdit.load_transformer (the quantized loader) which is not importable"
)


QKW = dict(height=H, width=W, num_frames=1, num_inference_steps=3, seed=0, max_sequence_length=L)  # 1 high + 2 low steps


@pytest.fixture(scope="module")
def bf16_reference(t2v_dir):
    ref = WanVideoPipeline.from_pretrained(t2v_dir, dtype=torch.bfloat16, text_encoder_dtype=torch.float32,
                                           progress=False)
    return ref(PROMPT, NEG, **QKW)


@needs_loader
@pytest.mark.parametrize("method,max_rel", [("mxfp8", 0.1), ("mxfp4_dual", 0.25)])
def test_quantized_generation_close_to_bf16(t2v_dir, bf16_reference, method, max_rel):
    q = WanVideoPipeline.from_pretrained(t2v_dir, quantization=method, dtype=torch.bfloat16,
                                         text_encoder_dtype=torch.float32, progress=False)
    a = bf16_reference
    b = q(PROMPT, NEG, **QKW)
    assert b.perf["quantization"] == method
    assert [s["expert"] for s in b.perf["denoise_steps_ms"]] == ["transformer", "transformer_2", "transformer_2"]
    assert torch.isfinite(b.latents).all()
    err = relative_error(b.latents, a.latents)
    assert 0 < err < max_rel, err  # quantized (differs from BF16) but close
    assert psnr(b.frames, a.frames) > 20
    for expert in ("transformer", "transformer_2"):  # both experts hold quantized (smaller) weights
        assert b.perf["model_memory_bytes"][expert] < 0.8 * a.perf["model_memory_bytes"][expert]


@needs_loader
def test_default_loader_bf16_matches_diffusers_loader(t2v_dir):
    kw = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=2, seed=0, output_type="latent",
              max_sequence_length=L)
    ours = WanVideoPipeline.from_pretrained(t2v_dir, dtype=torch.float32, text_encoder_dtype=torch.float32)
    ref = load_fp32(t2v_dir)
    assert relative_error(ours(PROMPT, NEG, **kw).latents, ref(PROMPT, NEG, **kw).latents) < 1e-4


def test_step_callback_reports_each_denoising_step(t2v):
    seen: list = []
    kw = dict(height=H, width=W, num_frames=FRAMES, seed=0, output_type="latent", max_sequence_length=L)
    a = t2v(PROMPT, num_inference_steps=3, step_callback=lambda i, n: seen.append((i, n)), **kw).latents
    assert seen == [(1, 3), (2, 3), (3, 3)]
    b = t2v(PROMPT, num_inference_steps=3, **kw).latents
    assert torch.equal(a, b)  # observing the steps changes nothing
