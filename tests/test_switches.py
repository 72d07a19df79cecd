"""The switches beside quantization: torch.compile (custom ops), expert / layerwise offload,
VAE tiling / slicing, cache-dit block caching."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from _tiny_wan import tiny_model_dir
from mxdit.kernels import ops
from mxdit.models.wan.transformer import WanTransformer3DModel
from mxdit.pipelines import switches as S
from mxdit.pipelines.wan import WanVideoPipeline, psnr, relative_error
from mxdit.tools.sglang_args import add_switch_arguments
from mxdit.layers.quantize import quantize_module

PROMPT, NEG = "a red fox runs through the snow", "blurry"
KW = dict(height=32, width=32, num_frames=1, num_inference_steps=4, seed=0, max_sequence_length=16,
          boundary_ratio=0.875)  # timesteps 999, 900 | 750, 500: 2 high-noise, 2 low-noise steps
METHODS = ["bf16", "mxfp8", "mxfp4", "mxfp4_dual", "fp8"]
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=512, freq_dim=256, ffn_dim=1024, num_layers=2, cross_attn_norm=True, eps=1e-6,
            rope_max_seq_len=1024)


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "t2v-a14b")


def _pipe(t2v_dir, quantization="mxfp8"):
    return WanVideoPipeline.from_pretrained(t2v_dir, quantization=quantization, dtype=torch.bfloat16,
                                            text_encoder_dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def baseline(t2v_dir):
    """The plain mxfp8 run every switch is compared with."""
    return _pipe(t2v_dir)(PROMPT, NEG, **KW)


# ----------------------------------------------------------------------------- compile
def _tiny_model(method: str) -> WanTransformer3DModel:
    torch.manual_seed(0)
    m = WanTransformer3DModel(TINY, params_dtype=torch.bfloat16).init_random_weights_(std=0.05)
    if method != "bf16":
        quantize_module(m, method, include=["blocks.*"])  # K = 512 / 1024: every method's K multiple
    return m


@pytest.mark.parametrize("method", METHODS)
def test_compiled_blocks_equal_eager_without_graph_breaks(method):
    """Regional compile, fullgraph=True (a graph break would raise), one graph for every block.
    Backend aot_eager (the FX graph run by eager aten ops): the outputs are bit-identical."""
    from torch._dynamo.utils import counters

    m = _tiny_model(method)
    x = torch.randn(1, 16, 2, 8, 8, dtype=torch.bfloat16)
    t, e = torch.tensor([500.0]), torch.randn(1, 12, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = m(x, t, e, return_dict=False)[0]
        torch._dynamo.reset()
        counters.clear()
        assert S.compile_repeated_blocks(m, backend="aot_eager", fullgraph=True) == TINY["num_layers"]
        compiled = m(x, t, e, return_dict=False)[0]
    assert counters["stats"]["unique_graphs"] == 1  # both blocks share one compiled graph
    assert not counters["graph_break"]
    assert torch.equal(compiled, eager)


def test_custom_op_fakes_match_real():
    x = torch.randn(6, 512, dtype=torch.bfloat16)
    for fmt in ("fp8_e4m3", "fp4_e2m1"):
        torch.library.opcheck(ops.quantize_mx, (x, fmt), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.quantize_mx_dual, (x,), test_utils=("test_schema", "test_faketensor"))
    q = torch.randn(1, 64, 2, 32, dtype=torch.bfloat16)
    torch.library.opcheck(ops.quantized_attention, (q, q, q, "mxfp8"), test_utils=("test_schema", "test_faketensor"))
    m = _tiny_model("mxfp4")
    lin = m.blocks[0].attn1.to_q
    ops.register_quantized_linears(m)
    real = ops.quant_linear(x, lin.weight, x.dtype)
    assert torch.equal(real, lin(x))  # the op is the layer's own forward
    # opcheck clones its inputs (a clone is no layer's weight), so the fake is checked by hand
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = ops.quant_linear(mode.from_tensor(x), mode.from_tensor(lin.weight), x.dtype)
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())


def test_quant_linear_unregistered_weight_is_a_clear_error():
    w = torch.zeros(4, 32)
    with pytest.raises(RuntimeError, match="no quantized layer is registered"):
        ops.quant_linear(torch.zeros(2, 32), w, torch.float32)


def test_compile_switch_in_pipeline_with_warmup(t2v_dir, baseline):
    pipe = _pipe(t2v_dir)
    torch._dynamo.reset()
    S.apply_switches(pipe, S.SwitchConfig(enable_torch_compile=True, torch_compile_backend="aot_eager"))
    S.warmup(pipe, prompt=PROMPT, negative_prompt=NEG, **{k: v for k, v in KW.items() if k != "num_inference_steps"})
    out = pipe(PROMPT, NEG, **KW)
    assert torch.equal(out.latents, baseline.latents)
    rep = out.perf["switches"]
    assert rep["enable_torch_compile"] and rep["torch_compile"]["compiled_blocks"] == 4  # 2 experts x 2 blocks


# ----------------------------------------------------------------------------- offload
def test_expert_cpu_offload_identical_and_idle_expert_offloaded(t2v_dir, baseline):
    pipe = _pipe(t2v_dir)
    sw = S.apply_switches(pipe, S.SwitchConfig(dit_cpu_offload=True))
    seen = []

    def where(done, total):  # after each step: where does each expert's storage live?
        seen.append({n: {p.device.type for p in m.parameters()} for n, m in sw.experts()})

    for name, m in sw.experts():
        m.register_forward_pre_hook(lambda mod, a, name=name: seen.append({"running": name}))
    out = pipe(PROMPT, NEG, step_callback=where, **KW)
    assert torch.equal(out.latents, baseline.latents)
    moves = out.perf["switches"]["expert_moves"]
    assert moves == [{"to_device": "transformer_2", "to_offload": ["transformer"], "warmup": False}]
    assert all(s == {"transformer": {"cpu"}, "transformer_2": {"cpu"}} for s in seen if "running" not in s)
    # quantized storage moved as it is (fp8 weights + e8m0 scales, not dequantized)
    assert pipe.transformer_2.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn


def test_layerwise_offload_identical(t2v_dir, baseline):
    pipe = _pipe(t2v_dir)
    S.apply_switches(pipe, S.SwitchConfig(dit_layerwise_offload=True))
    out = pipe(PROMPT, NEG, **KW)
    assert torch.equal(out.latents, baseline.latents)
    # 4 steps x 2 CFG branches x 2 blocks streamed
    assert out.perf["switches"]["block_moves"] == 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak device memory needs a CUDA device")
def test_offload_lowers_peak_device_memory(t2v_dir):
    def run(cfg):
        pipe = WanVideoPipeline.from_pretrained(t2v_dir, quantization="mxfp8", dtype=torch.bfloat16, device="cuda",
                                                text_encoder_dtype=torch.float32, progress=False)
        S.apply_switches(pipe, cfg)
        return pipe(PROMPT, NEG, **KW)

    base = run(S.SwitchConfig())
    for cfg in (S.SwitchConfig(dit_cpu_offload=True), S.SwitchConfig(dit_layerwise_offload=True)):
        out = run(cfg)
        assert torch.equal(out.latents.cpu(), base.latents.cpu())
        assert (out.perf["peak_memory"]["device_max_allocated_bytes"]
                < base.perf["peak_memory"]["device_max_allocated_bytes"])


# ----------------------------------------------------------------------------- VAE
def test_vae_tiling_and_slicing_run_and_are_reported(t2v_dir, baseline):
    pipe = _pipe(t2v_dir)
    S.apply_switches(pipe, S.SwitchConfig(vae_tiling=True, vae_slicing=True))
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    # tiles smaller than the 32x32 frames, so tiling really splits this decode
    pipe.vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16,
                           tile_sample_stride_height=8, tile_sample_stride_width=8)
    out = pipe(PROMPT, NEG, **KW)
    rep = out.perf["switches"]
    assert rep["vae_tiling"] and rep["vae_slicing"]
    assert torch.equal(out.latents, baseline.latents)
    assert out.frames.shape == baseline.frames.shape
    assert not (out.frames == baseline.frames).all()  # the tiled path really ran
    # blended 16-px tiles of a tiny random VAE: the same video, seams visible (measured 19.2 dB)
    assert psnr(out.frames, baseline.frames) > 15


# ----------------------------------------------------------------------------- cache-dit
cache_dit = pytest.importorskip("cache_dit")


def test_cache_dit_on_quantized_model_skips_blocks(t2v_dir):
    kw = dict(KW, num_inference_steps=8, boundary_ratio=0.9)  # 2 high-noise steps, 6 low-noise
    cfg = dict(S.CACHE_DIT_DEFAULTS, max_warmup_steps=1, residual_diff_threshold=0.5, max_continuous_cached_steps=2)
    plain = _pipe(t2v_dir)(PROMPT, NEG, **kw)
    pipe = _pipe(t2v_dir)
    S.apply_switches(pipe, S.SwitchConfig(enable_cache_dit=True, cache_dit=cfg))
    out = pipe(PROMPT, NEG, **kw)
    cd = out.perf["switches"]["cache_dit"]
    assert cd["skipped_block_computations"] > 0
    assert cd["block_computations"] == 8 * 2 * 2  # steps x CFG branches x blocks, cached or not
    low = cd["experts"]["transformer_2"]
    # cache-dit's documented rule: a step is cached only when the relative L1 diff of the first Fn
    # blocks' residual is below residual_diff_threshold
    cached = set(map(str, low["cached_steps"]))
    assert cached and all(low["residual_diffs"][s] < 0.5 for s in cached)
    err = relative_error(out.latents, plain.latents)
    assert 0 < err < 0.5, err  # approximate (blocks were skipped), still the same video
    # threshold 0: nothing may be cached -> exactly the uncached run, per request (context refreshed)
    pipe2 = _pipe(t2v_dir)
    S.apply_switches(pipe2, S.SwitchConfig(enable_cache_dit=True, cache_dit=dict(cfg, residual_diff_threshold=0.0)))
    for _ in range(2):
        exact = pipe2(PROMPT, NEG, **kw)
        assert exact.perf["switches"]["cache_dit"]["skipped_block_computations"] == 0
        assert torch.equal(exact.latents, plain.latents)


# ----------------------------------------------------------------------------- flags
def _args(argv):
    p = argparse.ArgumentParser()
    add_switch_arguments(p)
    return p.parse_args(argv)


def test_flags_env_and_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SGLANG_CACHE_DIT_ENABLED", raising=False)
    c = S.switch_config_from_args(_args(["--dit-cpu-offload", "--vae-tiling", "false", "--enable-torch-compile"]))
    assert c.dit_cpu_offload and not c.vae_tiling and c.enable_torch_compile and not c.enable_cache_dit
    monkeypatch.setenv("SGLANG_CACHE_DIT_ENABLED", "true")
    monkeypatch.setenv("SGLANG_CACHE_DIT_FN", "2")
    f = tmp_path / "cd.json"
    f.write_text(json.dumps({"residual_diff_threshold": 0.1}))
    c = S.switch_config_from_args(_args(["--cache-dit-config", str(f)]))
    assert c.enable_cache_dit and c.cache_dit["Fn_compute_blocks"] == 2 and c.cache_dit["residual_diff_threshold"] == 0.1
    f.write_text(json.dumps({"Fn_blocks": 1}))
    with pytest.raises(ValueError, match=r"unknown DBCacheConfig field\(s\) \['Fn_blocks'\]"):
        S.switch_config_from_args(_args(["--cache-dit-config", str(f)]))
    with pytest.raises(ValueError, match="cannot be combined"):
        S.switch_config_from_args(_args(["--enable-cache-dit", "--dit-layerwise-offload"]))


def test_generate_cli_switches_in_perf_json(t2v_dir, tmp_path, capsys, monkeypatch):
    from mxdit.cli import main

    monkeypatch.delenv("SGLANG_CACHE_DIT_ENABLED", raising=False)
    out, perf = tmp_path / "fox.mp4", tmp_path / "perf.json"
    rc = main(["generate", "--model-path", str(t2v_dir), "--prompt", "a red fox", "--height", "32", "--width", "32",
               "--num-frames", "1", "--num-inference-steps", "2", "--quantization", "mxfp8", "--device", "cpu",
               "--dit-cpu-offload", "--vae-tiling", "--vae-slicing", "false", "--output", str(out),
               "--perf-dump-path", str(perf), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads(perf.read_text())["switches"]
    assert rep["dit_cpu_offload"] and rep["vae_tiling"] and not rep["vae_slicing"] and not rep["enable_torch_compile"]
    assert [m["to_device"] for m in rep["expert_moves"]] == ["transformer_2"]
    rc = main(["generate", "--model-path", str(t2v_dir), "--prompt", "x", "--dit-cpu-offload",
               "--dit-layerwise-offload", "--output", str(tmp_path / "y.mp4")])
    assert rc == 2 and "alternatives" in capsys.readouterr().err
