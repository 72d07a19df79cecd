"""The checkpoint loader: parity with diffusers through ``mxdit.load_transformer``
(diffusers single/sharded, original Wan names with either config style, no
config.json), one quantized model reached three ways (online, msmodelslim
export, repacked), quant-config resolution order, bad inputs, and the
streaming safetensors reader/writer.

Everything is tiny; the quantized model uses width 512 (4 heads x 128) and
ffn 1024 because dual-level MXFP4 needs K to be a multiple of 512.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mxdit
from mxdit import formats as F
from mxdit.cli import main as cli_main
from mxdit.layers.linear import QuantLinear
from mxdit.loader import (
    DEFAULT_ONLINE_INCLUDE,
    CheckpointMismatchError,
    SafetensorsError,
    SafetensorsFile,
    open_checkpoint,
)
from mxdit.loader.safetensors_io import DTYPES, write_safetensors
from mxdit.models.wan.config import WanTransformerConfig
from mxdit.models.wan.names import LINEAR_SUFFIXES_DIFFUSERS, diffusers_to_original
from mxdit.models.wan.transformer import WanTransformer3DModel

# ============================================================================= helpers
# Tiny configs of each Wan2.2 family (head_dim 16: uneven RoPE split 8/4/4).
TINY = dict(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=16, ffn_dim=48, num_layers=2)
FAMILIES = {
    "t2v": dict(TINY, in_channels=16, out_channels=16),
    "i2v": dict(TINY, in_channels=36, out_channels=16),
    "ti2v": dict(TINY, in_channels=48, out_channels=48),
}
LATENT = (3, 4, 6)  # F, H, W -> patch grid (3, 2, 3) = 18 tokens
TEXT_LEN = 7

#: the quantized test model: every block linear has K % 512 == 0
QCFG = dict(num_attention_heads=4, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=32,
            freq_dim=32, ffn_dim=1024, num_layers=1)
QLATENT = (2, 4, 4)  # 8 tokens
DUAL = "W4A4_MXFP4_DUALSCALE"
MS_DESC = "quant_model_description_w4a4_mxfp4_dualscale.json"
MS_WEIGHTS = "quant_model_weight_w4a4_mxfp4_dualscale.safetensors"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def diffusers_wan():
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel as DiffusersWan

    return DiffusersWan


@torch.no_grad()
def randomize_(model, seed: int = 0, std: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        if "norm" in name and name.endswith("weight"):
            noise += 1.0
        p.copy_(noise)
    return model


def make_inputs(cfg: dict, latent=LATENT, batch: int = 2, per_token: bool = False, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], *latent, generator=g).to(dtype)
    text = torch.randn(batch, TEXT_LEN, cfg["text_dim"], generator=g).to(dtype)
    if per_token:  # TI2V: [B, seq] with t = 0 on the first latent frame
        per_frame = (latent[1] // 2) * (latent[2] // 2)
        t = torch.tensor([700.0, 250.0])[:batch, None].expand(batch, latent[0] * per_frame).clone()
        t[:, :per_frame] = 0.0
    else:
        t = torch.tensor([999, 321])[:batch]
    return x, t, text


@torch.no_grad()
def run(model, inputs):
    x, t, text = inputs
    return model(x, t, text).sample


def diffusers_config_json(cfg: dict) -> dict:
    return {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1",
            **WanTransformerConfig(**cfg).to_dict()}


def write_bf16_diffusers_dir(path, cfg: dict = QCFG, seed: int = 0, std: float = 0.05) -> dict:
    """A diffusers-layout BF16 transformer dir (config.json + diffusion_pytorch_model.safetensors)."""
    os.makedirs(path, exist_ok=True)
    m = WanTransformer3DModel(WanTransformerConfig(**cfg), params_dtype=torch.float32).init_random_weights_(std, seed)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()}
    save_file(sd, os.path.join(path, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(diffusers_config_json(cfg), f)
    return sd


def is_block_linear_weight(name: str) -> bool:
    parts = name.split(".")
    return (parts[0] == "blocks" and name.endswith(".weight")
            and ".".join(parts[2:-1]) in LINEAR_SUFFIXES_DIFFUSERS)


def write_modelslim_export(src_dir, out_dir, *, container: str = "uint8", smooth: dict | None = None,
                           original_config: dict | None = None) -> dict:
    """An msmodelslim W4A4_MXFP4_DUALSCALE export (mindie saver) of the BF16 checkpoint in ``src_dir``,
    straight from the reference format (ascend-npu-mx.md §3.1-3.3): original Wan names, every tensor
    labelled (FLOAT for non-quantized), weight packed uint8 [N, K/2] (or float8_e4m3fn [N, K] value
    container), weight_scale uint8 [N, K/32], weight_dual_scale float32 [N, K/512, 1], fp32 bias.

    ``smooth``: diffusers layer prefix -> mul_scale [K]; the layer is written as ``<p>.div.mul_scale``
    + ``<p>.linear.*`` with the quantized weight of W / mul_scale (what the wrapper's inner linear holds).
    Returns diffusers layer prefix -> the DualMXTensor stored for it.
    """
    smooth = smooth or {}
    os.makedirs(out_dir, exist_ok=True)
    sd = load_file(os.path.join(src_dir, "diffusion_pytorch_model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    desc: dict[str, str] = {}
    stored: dict[str, F.DualMXTensor] = {}
    quantized_layers = {k[: -len(".weight")] for k in sd if is_block_linear_weight(k)}
    for k, v in sd.items():
        p, _, leaf = k.rpartition(".")
        if p not in quantized_layers:
            tensors[diffusers_to_original(k)] = v
            desc[diffusers_to_original(k)] = "FLOAT"
            continue
        orig = diffusers_to_original(p)
        if p in smooth:
            m = smooth[p].to(torch.float32)
            tensors[f"{orig}.div.mul_scale"] = m
            desc[f"{orig}.div.mul_scale"] = "FLOAT"
            orig = f"{orig}.linear"
        if leaf == "bias":
            tensors[f"{orig}.bias"] = v.to(torch.float32)
            desc[f"{orig}.bias"] = "FLOAT"
            continue
        w = v if p not in smooth else (v.float() / smooth[p].float()).to(torch.bfloat16)
        q = F.quantize_mx_dual(w)
        stored[p] = q
        tensors[f"{orig}.weight"] = q.qdata if container == "uint8" else F.fp4_to_fp8_container(q.qdata)
        tensors[f"{orig}.weight_scale"] = q.scale_l1
        tensors[f"{orig}.weight_dual_scale"] = q.scale_l0.unsqueeze(-1).contiguous()
        for leaf_name in ("weight", "weight_scale", "weight_dual_scale"):
            desc[f"{orig}.{leaf_name}"] = DUAL
    desc["model_quant_type"] = DUAL
    save_file(tensors, os.path.join(out_dir, MS_WEIGHTS))
    with open(os.path.join(out_dir, MS_DESC), "w") as f:
        json.dump(desc, f, indent=2)
    if original_config is not None:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(original_config, f)
    return stored


def write_a14b_model_dir(root, seeds=(0, 1), cfg: dict = QCFG) -> dict:
    """A tiny diffusers Wan2.2-T2V-A14B pipeline directory (two experts + dummy components)."""
    os.makedirs(root)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "boundary_ratio": 0.875,
                   "transformer": ["diffusers", "WanTransformer3DModel"],
                   "transformer_2": ["diffusers", "WanTransformer3DModel"],
                   "vae": ["diffusers", "AutoencoderKLWan"]}, f)
    for sub, files in {"vae": {"config.json": '{"z_dim": 16}'}, "scheduler": {"scheduler_config.json": "{}"},
                       "tokenizer": {"tokenizer_config.json": "{}"}}.items():
        os.makedirs(os.path.join(root, sub))
        for name, text in files.items():
            with open(os.path.join(root, sub, name), "w") as f:
                f.write(text)
    return {t: write_bf16_diffusers_dir(os.path.join(root, t), cfg, seed=s)
            for t, s in zip(("transformer", "transformer_2"), seeds)}


def tree_state(root) -> dict:
    """relpath -> (bytes, mtime_ns) for every file under ``root``."""
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = (f.read(), os.stat(p).st_mtime_ns)
    return out


def quantized_layer_names(model) -> dict[str, str]:
    return {n: m.quant_method.name for n, m in model.quant_linears() if m.quant_method.name != "unquantized"}


def block_linear_names(num_layers: int) -> set[str]:
    return {f"blocks.{i}.{s}" for i in range(num_layers) for s in LINEAR_SUFFIXES_DIFFUSERS}


# ============================================================================= parity through the loader
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_diffusers_checkpoint_parity(diffusers_wan, tmp_path, family, sharded):
    cfg = FAMILIES[family]
    ref = randomize_(diffusers_wan(**cfg).eval(), seed=3)
    if sharded:
        ref.save_pretrained(tmp_path, max_shard_size="40KB")
        assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    else:
        ref.save_pretrained(tmp_path)
        assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    model = mxdit.load_transformer(str(tmp_path), dtype=torch.float32, progress=False)
    assert model.load_report.layout == "diffusers"
    assert model.load_report.tensors == len(ref.state_dict())
    inputs = make_inputs(cfg, per_token=family == "ti2v")
    expected, got = run(ref, inputs), run(model, inputs)
    assert got.shape == expected.shape and expected.std() > 1e-3
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("config_style", ["diffusers", "original"])
def test_original_named_checkpoint_parity(diffusers_wan, tmp_path, config_style):
    cfg = FAMILIES["i2v"]
    ref = randomize_(diffusers_wan(**cfg).eval(), seed=4)
    sd = {diffusers_to_original(k): v.contiguous() for k, v in ref.state_dict().items()}
    assert "blocks.0.self_attn.q.weight" in sd and "head.modulation" in sd
    if config_style == "diffusers":
        save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
        config = diffusers_config_json(cfg)
    else:  # an original Wan dir: original config.json, any *.safetensors name
        save_file(sd, str(tmp_path / "wan2.2_i2v.safetensors"))
        config = WanTransformerConfig(**cfg).to_original_dict(model_type="i2v")
        assert "dim" in config and "num_attention_heads" not in config
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = mxdit.load_transformer(str(tmp_path), dtype=torch.float32, progress=False)
    assert model.load_report.layout == "original"
    assert model.config == WanTransformerConfig(**cfg)
    inputs = make_inputs(cfg)
    assert rel_err(run(model, inputs), run(ref, inputs)) < 1e-5


@pytest.mark.parametrize("names", ["original", "diffusers"])
def test_no_config_json_infers_config_from_shapes(diffusers_wan, tmp_path, names):
    # head_dim 128: every Wan2.x model has it, and the inference assumes it
    cfg = dict(num_attention_heads=1, attention_head_dim=128, text_dim=24, freq_dim=16, ffn_dim=64, num_layers=3,
               in_channels=36, out_channels=16)
    ref = randomize_(diffusers_wan(**cfg).eval(), seed=5, std=0.05)
    rename = diffusers_to_original if names == "original" else (lambda k: k)
    save_file({rename(k): v.contiguous() for k, v in ref.state_dict().items()},
              str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert open_checkpoint(str(tmp_path)).config == WanTransformerConfig(**cfg)
    model = mxdit.load_transformer(str(tmp_path), dtype=torch.float32, progress=False)
    assert model.config == WanTransformerConfig(**cfg)
    inputs = make_inputs(cfg, batch=1)
    assert rel_err(run(model, inputs), run(ref, inputs)) < 1e-5


# ============================================================================= one quantized model, three ways
def _load_bf16(path, **kw):
    return mxdit.load_transformer(str(path), dtype=torch.bfloat16, progress=False, **kw)


LOW_SMOOTHED = ["blocks.0.attn1.to_q", "blocks.0.attn2.to_out.0", "blocks.0.ffn.net.0.proj"]


def low_smooth_scale(i: int) -> torch.Tensor:
    return torch.empty(512).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(i))


@pytest.fixture(scope="module")
def qdirs(tmp_path_factory):
    """BF16 A14B model dir, its msmodelslim exports (plain, fp8 container, smoothed x2) and the repack."""
    root = tmp_path_factory.mktemp("quant")
    model = str(root / "model")
    sds = write_a14b_model_dir(model)
    export = root / "export"
    t1, t2 = os.path.join(model, "transformer"), os.path.join(model, "transformer_2")
    stored = {
        "high": write_modelslim_export(t1, export / "high_noise_model"),
        # low-noise expert: smoothed per input channel (arbitrary values) on three layers
        "low": write_modelslim_export(t2, export / "low_noise_model",
                                      smooth={p: low_smooth_scale(i) for i, p in enumerate(LOW_SMOOTHED)}),
        "fp8": write_modelslim_export(t1, root / "export_fp8", container="fp8",
                                      original_config=WanTransformerConfig(**QCFG).to_original_dict()),
        # smoothing by a power of two is exact: the same model as the plain export
        "pow2": write_modelslim_export(t1, root / "export_pow2", smooth={
            "blocks.0.attn1.to_q": torch.full((512,), 8.0), "blocks.0.attn2.to_v": torch.full((512,), 0.25),
            "blocks.0.ffn.net.2": torch.full((1024,), 2.0)}),
    }
    before = tree_state(root)
    out = root / "repacked"
    rc = cli_main(["repack", "--model-type", "Wan2.2-T2V-A14B", "--original-model-path", model,
                   "--quant-path", str(export), "--output-path", str(out)])
    assert rc == 0
    after = tree_state(root)
    inputs_unchanged = {k: v for k, v in after.items() if not k.startswith("repacked")} == before
    return dict(root=root, model=model, t1=t1, t2=t2, export=export, out=out, stored=stored, sds=sds,
                inputs_unchanged=inputs_unchanged)


@pytest.fixture(scope="module")
def qmodels(qdirs):
    return {
        "online": _load_bf16(qdirs["t1"], quantization="mxfp4_dual"),
        "auto": _load_bf16(qdirs["export"] / "high_noise_model"),
        "explicit": _load_bf16(qdirs["export"] / "high_noise_model", quantization="modelslim"),
        "repacked": _load_bf16(qdirs["out"] / "transformer"),
        "fp8": _load_bf16(qdirs["root"] / "export_fp8"),
        "pow2": _load_bf16(qdirs["root"] / "export_pow2"),
        "low": _load_bf16(qdirs["export"] / "low_noise_model"),
    }


@pytest.fixture(scope="module")
def qinputs():
    return make_inputs(QCFG, latent=QLATENT, batch=1, dtype=torch.bfloat16, seed=7)


def test_quantized_three_ways_identical(qdirs, qmodels, qinputs):
    online, auto, explicit, repacked = (qmodels[k] for k in ("online", "auto", "explicit", "repacked"))
    n = 10 * QCFG["num_layers"]
    assert online.load_report.layout == "diffusers" and online.load_report.layers_quantized == {"mxfp4_dual": n}
    for k in ("auto", "explicit", "fp8", "pow2"):
        assert qmodels[k].load_report.layout == "modelslim", k
        assert qmodels[k].load_report.layers_quantized == {"mxfp4_dual(modelslim)": n}, k
    assert repacked.load_report.layout == "repacked"
    assert repacked.load_report.layers_quantized == {"mxfp4_dual(modelslim)": n}
    assert "description" in auto.load_report.quantization and "explicit modelslim" in explicit.load_report.quantization
    assert "description" in repacked.load_report.quantization
    # only block linears are quantized; proj_out and the embedders are not
    for m in (online, auto, repacked):
        assert set(quantized_layer_names(m)) == block_linear_names(QCFG["num_layers"])

    # identical storage (names, dtypes, bytes)
    sd_online = online.state_dict()
    assert sd_online["blocks.0.attn1.to_q.weight"].dtype == torch.uint8
    assert sd_online["blocks.0.attn1.to_q.weight"].shape == (512, 256)
    assert sd_online["blocks.0.ffn.net.2.weight_dual_scale"].shape == (512, 2)
    assert sd_online["blocks.0.attn1.to_q.bias"].dtype == torch.float32
    assert sd_online["proj_out.weight"].dtype == torch.bfloat16
    for k in ("auto", "explicit", "repacked", "fp8"):
        sd = qmodels[k].state_dict()
        assert sd.keys() == sd_online.keys(), k
        for name, v in sd_online.items():
            assert sd[name].dtype == v.dtype and sd[name].shape == v.shape, (k, name)
            if k == "fp8" and name.endswith(".weight") and v.dtype == torch.uint8:
                # the float8 value container cannot tell FP4 -0 (code 8) from +0: compare values
                assert torch.equal(F.unpack_fp4(sd[name]) & 7, F.unpack_fp4(v) & 7), name
                continue
            assert _bytes(sd[name]) == _bytes(v), (k, name)

    expected = run(online, qinputs)
    assert torch.isfinite(expected).all() and expected.float().std() > 1e-3
    for k in ("auto", "repacked", "fp8", "pow2"):
        assert torch.equal(run(qmodels[k], qinputs), expected), k
    # the power-of-two smoothing is really applied (mul_scale kept and used, weights differ)
    q = qmodels["pow2"].blocks[0].attn1.to_q
    assert q.use_mul_scale and torch.equal(q.mul_scale, torch.full((512,), 8.0))
    assert not torch.equal(q.weight_dual_scale, online.blocks[0].attn1.to_q.weight_dual_scale)
    # quantized for real: near the BF16 model, not equal to it
    ref = run(_load_bf16(qdirs["t1"]), qinputs)
    assert 1e-3 < rel_err(expected, ref) < 0.3


def _dual_reference(x: torch.Tensor, stored: F.DualMXTensor, bias: torch.Tensor, smooth=None):
    xq = F.quantize_mx_dual(x, smooth_scale=smooth)
    return F.dual_mx_matmul(xq, stored, bias.float(), out_dtype=x.dtype)


def test_quantized_linear_matches_reference_matmul(qdirs, qmodels):
    g = torch.Generator().manual_seed(11)
    for layer in ["blocks.0.attn1.to_q", "blocks.0.ffn.net.2", "blocks.0.attn2.to_k"]:
        stored = qdirs["stored"]["high"][layer]
        bias = qdirs["sds"]["transformer"][f"{layer}.bias"]
        x = (torch.randn(5, stored.shape[-1], generator=g) * 3).to(torch.bfloat16)
        expected = _dual_reference(x, stored, bias)
        for k in ("online", "auto", "repacked"):
            lin = qmodels[k].get_submodule(layer)
            assert isinstance(lin, QuantLinear)
            assert torch.equal(lin(x), expected), (k, layer)
            assert torch.equal(lin(x.reshape(1, 5, -1)), expected.reshape(1, 5, -1))  # leading dims kept


def _check_smoothed_layers(model, sds):
    g = torch.Generator().manual_seed(12)
    for i, layer in enumerate(LOW_SMOOTHED):
        smooth = low_smooth_scale(i)
        lin = model.get_submodule(layer)
        assert lin.use_mul_scale and torch.equal(lin.mul_scale, smooth)
        x = torch.randn(4, 512, generator=g).to(torch.bfloat16)
        expected = _dual_reference(x, _stored_of(lin), sds[f"{layer}.bias"], smooth=smooth)
        assert torch.equal(lin(x), expected), layer


def _stored_of(lin) -> F.DualMXTensor:
    return F.DualMXTensor(lin.weight.data, lin.weight_dual_scale.data, lin.weight_scale.data)


def test_smoothed_export_matches_reference(qdirs, qmodels, qinputs):
    low = qmodels["low"]
    for i, layer in enumerate(LOW_SMOOTHED):  # the loaded storage is what the export holds
        s = qdirs["stored"]["low"][layer]
        assert _bytes(_stored_of(low.get_submodule(layer)).qdata) == _bytes(s.qdata)
    _check_smoothed_layers(low, qdirs["sds"]["transformer_2"])
    # an unsmoothed layer of the same export has no active mul_scale
    assert getattr(low.blocks[0].attn1.to_k, "use_mul_scale", False) is False
    # the smoothed expert stays close to its BF16 counterpart
    assert rel_err(run(low, qinputs), run(_load_bf16(qdirs["t2"]), qinputs)) < 0.3


def test_repacked_smoothed_export_loads(qdirs, qmodels, qinputs):
    repacked = _load_bf16(qdirs["out"] / "transformer_2")
    _check_smoothed_layers(repacked, qdirs["sds"]["transformer_2"])
    assert torch.equal(run(repacked, qinputs), run(qmodels["low"], qinputs))


def test_repack_output_layout(qdirs):
    out = qdirs["out"]
    assert qdirs["inputs_unchanged"], "repack modified its inputs"
    assert (out / "model_index.json").read_text() == (qdirs["root"] / "model" / "model_index.json").read_text()
    assert (out / "vae" / "config.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    for t, sub in (("transformer", "high_noise_model"), ("transformer_2", "low_noise_model")):
        files = sorted(p.name for p in (out / t).iterdir())
        assert files == ["config.json", "diffusion_pytorch_model.safetensors", "quant_model_description.json"]
        assert json.loads((out / t / "config.json").read_text()) == diffusers_config_json(QCFG)
        src = load_file(str(qdirs["export"] / sub / MS_WEIGHTS))
        got = load_file(str(out / t / "diffusion_pytorch_model.safetensors"))
        desc = json.loads((out / t / "quant_model_description.json").read_text())
        assert len(got) == len(src)
        assert "blocks.0.attn1.to_q.weight_dual_scale" in got and "proj_out.weight" in got
        assert not any(".linear." in k or ".div." in k or "self_attn" in k for k in got)
        assert set(desc) == set(got) | {"model_quant_type"}
        assert desc["model_quant_type"] == DUAL and desc["blocks.0.attn1.to_q.weight"] == DUAL
        assert desc["proj_out.weight"] == "FLOAT" and desc["blocks.0.attn1.to_q.bias"] == "FLOAT"
    smoothed = load_file(str(out / "transformer_2" / "diffusion_pytorch_model.safetensors"))
    assert "blocks.0.attn1.to_q.mul_scale" in smoothed
    orig = load_file(str(qdirs["export"] / "low_noise_model" / MS_WEIGHTS))
    assert torch.equal(smoothed["blocks.0.attn1.to_q.weight"], orig["blocks.0.self_attn.q.linear.weight"])
    assert torch.equal(smoothed["blocks.0.attn1.to_q.mul_scale"], orig["blocks.0.self_attn.q.div.mul_scale"])
    # no temp dirs left next to the output
    assert not [p for p in os.listdir(qdirs["root"]) if ".tmp-" in p or ".old-" in p]


# ============================================================================= quant-config resolution order
SMALL = dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32,
             freq_dim=32, ffn_dim=64, num_layers=2)


def _small_dir(path, *, description=False, config_qc=None, metadata_qc=None):
    os.makedirs(path, exist_ok=True)
    m = WanTransformer3DModel(WanTransformerConfig(**SMALL), params_dtype=torch.float32).init_random_weights_(0.05, 0)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()}
    md = {"format": "pt"}
    if metadata_qc is not None:
        md["quantization_config"] = json.dumps(metadata_qc)
    save_file(sd, os.path.join(path, "diffusion_pytorch_model.safetensors"), metadata=md)
    cfg = diffusers_config_json(SMALL)
    if config_qc is not None:
        cfg["quantization_config"] = config_qc
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if description:  # every tensor FLOAT: a modelslim config that quantizes nothing
        with open(os.path.join(path, "quant_model_description.json"), "w") as f:
            json.dump({**{k: "FLOAT" for k in sd}, "model_quant_type": "FLOAT"}, f)
    return path


def test_quant_config_resolution_order(tmp_path):
    d = _small_dir(str(tmp_path / "m"), description=True, config_qc={"quant_method": "mxfp8"},
                   metadata_qc={"quant_method": "mxfp4"})
    ck = open_checkpoint(d)
    qc, src = ck.quant_config("fp8", {})  # 1. explicit wins over everything
    assert qc.name == "fp8" and src.startswith("explicit")
    qc, src = ck.quant_config("mxfp4_npu", {})  # alias
    assert qc.name == "mxfp4_dual"
    qc, src = ck.quant_config(None, {})  # 2. description
    assert qc.name == "modelslim" and src.startswith("description")
    os.remove(os.path.join(d, "quant_model_description.json"))
    qc, src = open_checkpoint(d).quant_config(None, {})  # 3. config.json
    assert (qc.name, src) == ("mxfp8", "config.json quantization_config")
    cfg = json.load(open(os.path.join(d, "config.json")))
    del cfg["quantization_config"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    qc, src = open_checkpoint(d).quant_config(None, {})  # 4. safetensors metadata
    assert (qc.name, src) == ("mxfp4", "safetensors metadata")
    qc, src = open_checkpoint(d).quant_config(None, {"ignore": ["blocks.1.*"]})  # options pass through
    assert qc.ignore == ("blocks.1.*",)
    # 5. none
    plain = _small_dir(str(tmp_path / "plain"))
    qc, src = open_checkpoint(plain).quant_config(None, {})
    assert qc is None and src.startswith("none")
    with pytest.raises(ValueError, match="no quantization was requested or found"):
        open_checkpoint(plain).quant_config(None, {"ignore": ["x"]})
    with pytest.raises(ValueError, match="unknown quantization method 'mxfp5'"):
        open_checkpoint(plain).quant_config("mxfp5", {})
    with pytest.raises(FileNotFoundError, match="quant_model_description"):
        open_checkpoint(plain).quant_config("modelslim", {})


def test_quant_config_resolution_end_to_end(tmp_path):
    d = _small_dir(str(tmp_path / "m"), description=True, config_qc={"quant_method": "mxfp8"},
                   metadata_qc={"quant_method": "mxfp4", "ignore": ["blocks.1.*"]})
    blocks = block_linear_names(2)

    def methods(**kw):
        m = _load_bf16(d, **kw)
        return quantized_layer_names(m), m.load_report.quantization

    q, src = methods(quantization="fp8")
    assert set(q) == blocks and set(q.values()) == {"fp8"} and "explicit" in src
    q, src = methods()
    assert q == {} and "description" in src  # the all-FLOAT description wins over config.json
    os.remove(os.path.join(d, "quant_model_description.json"))
    q, src = methods()
    assert set(q) == blocks and set(q.values()) == {"mxfp8"} and "config.json" in src
    cfg = json.load(open(os.path.join(d, "config.json")))
    del cfg["quantization_config"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    q, src = methods()
    assert set(q) == {n for n in blocks if n.startswith("blocks.0.")} and set(q.values()) == {"mxfp4"}
    assert "metadata" in src


def test_online_default_include_is_block_linears(tmp_path):
    d = _small_dir(str(tmp_path / "m"))
    assert DEFAULT_ONLINE_INCLUDE == ("blocks.*",)
    m = _load_bf16(d, quantization="mxfp8")
    assert set(quantized_layer_names(m)) == block_linear_names(2)
    assert m.proj_out.quant_method.name == "unquantized" and m.proj_out.weight.dtype == torch.bfloat16
    assert m.condition_embedder.time_proj.quant_method.name == "unquantized"
    m = _load_bf16(d, quantization="mxfp8", quantize_proj_out=True)
    assert set(quantized_layer_names(m)) == block_linear_names(2) | {"proj_out"}
    assert m.proj_out.weight.dtype == torch.float8_e4m3fn
    m = _load_bf16(d, quantization="mxfp8", ignore=["*.ffn.*"])
    assert set(quantized_layer_names(m)) == {n for n in block_linear_names(2) if ".ffn." not in n}


# ============================================================================= bad input
def test_truncated_safetensors_names_the_file(tmp_path):
    d = _small_dir(str(tmp_path / "m"))
    path = os.path.join(d, "diffusion_pytorch_model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(SafetensorsError) as e:
        mxdit.load_transformer(d, progress=False)
    assert path in str(e.value) and "truncated" in str(e.value)
    with open(path, "r+b") as f:  # cut inside the header length
        f.truncate(5)
    with pytest.raises(SafetensorsError, match="shorter than its 8-byte header"):
        mxdit.load_transformer(d, progress=False)
    with open(path, "wb") as f:  # header length pointing past the end
        f.write((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(SafetensorsError, match="header length 1000000 exceeds"):
        SafetensorsFile(path)


def test_truncated_shard_names_the_shard(diffusers_wan, tmp_path):
    randomize_(diffusers_wan(**FAMILIES["t2v"])).save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 8)
    with pytest.raises(SafetensorsError) as e:
        mxdit.load_transformer(str(tmp_path), progress=False)
    assert str(shard) in str(e.value)
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=shard.name):
        mxdit.load_transformer(str(tmp_path), progress=False)


def test_config_not_matching_tensors(tmp_path):
    d = _small_dir(str(tmp_path / "m"))
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["ffn_dim"] = 96  # tensors have 64
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointMismatchError) as e:
        mxdit.load_transformer(d, progress=False)
    err = e.value
    assert not err.missing and not err.unexpected
    bad = {"blocks.0.ffn.net.0.proj.weight", "blocks.0.ffn.net.0.proj.bias", "blocks.0.ffn.net.2.weight",
           "blocks.1.ffn.net.0.proj.weight", "blocks.1.ffn.net.0.proj.bias", "blocks.1.ffn.net.2.weight"}
    assert len(err.mismatched) == len(bad)
    for name in bad:
        assert f"'{name}'" in str(err)
    assert "(64, 32)" in str(err) and "(96, 32)" in str(err)  # what it is and what was expected
    assert "6 mismatched tensors" in str(err)


def test_missing_and_unexpected_reported_together(tmp_path):
    d = _small_dir(str(tmp_path / "m"))
    path = os.path.join(d, "diffusion_pytorch_model.safetensors")
    sd = load_file(path)
    del sd["blocks.1.attn2.to_k.bias"]
    del sd["proj_out.weight"]
    sd["blocks.1.attn2.to_k.lora_A"] = torch.zeros(2, 32)
    sd["blocks.5.attn1.to_q.weight"] = torch.zeros(32, 32)
    save_file(sd, path)
    with pytest.raises(CheckpointMismatchError) as e:
        mxdit.load_transformer(d, progress=False)
    err = e.value
    assert err.missing == ["blocks.1.attn2.to_k.bias", "proj_out.weight"]
    assert err.unexpected == ["blocks.1.attn2.to_k.lora_A", "blocks.5.attn1.to_q.weight"]
    msg = str(err)
    assert "2 missing tensors" in msg and "2 unexpected tensors" in msg
    for n in err.missing + err.unexpected:
        assert n in msg


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """One BF16 dir and its dual-scale export (cheaper than qdirs, for the error tests)."""
    root = tmp_path_factory.mktemp("small_export")
    write_bf16_diffusers_dir(str(root / "bf16"), seed=3)
    write_modelslim_export(str(root / "bf16"), str(root / "export"))
    return root / "export"


def test_quantized_checkpoint_bad_storage(small_export, tmp_path):
    """A dual-scale export whose weight has the wrong dtype / scale the wrong shape: one error for all."""
    d = tmp_path / "bad"
    shutil.copytree(small_export, d)
    sd = load_file(str(d / MS_WEIGHTS))
    sd["blocks.0.self_attn.q.weight"] = sd["blocks.0.self_attn.q.weight"].view(torch.int8)
    sd["blocks.0.ffn.2.weight_scale"] = sd["blocks.0.ffn.2.weight_scale"][:, :-1].contiguous()
    save_file(sd, str(d / MS_WEIGHTS))
    with pytest.raises(CheckpointMismatchError) as e:
        _load_bf16(d)
    msg = str(e.value)
    assert "blocks.0.self_attn.q.weight" in msg and "int8" in msg
    assert "blocks.0.ffn.2.weight_scale" in msg and "(512, 31)" in msg


def test_description_naming_missing_tensors_fails_load(small_export, tmp_path):
    d = tmp_path / "ghost"
    shutil.copytree(small_export, d)
    desc = json.loads((d / MS_DESC).read_text())
    sd = load_file(str(d / MS_WEIGHTS))
    for leaf in ("weight", "weight_scale", "weight_dual_scale", "bias"):
        del sd[f"blocks.0.cross_attn.o.{leaf}"]
    save_file(sd, str(d / MS_WEIGHTS))
    assert "blocks.0.cross_attn.o.weight" in desc
    with pytest.raises(CheckpointMismatchError) as e:
        _load_bf16(d)
    assert "blocks.0.attn2.to_out.0.weight" in str(e.value) and len(e.value.missing) == 4


def test_not_a_transformer_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mxdit.load_transformer(str(tmp_path / "nope"))
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="pipeline directory.*transformer"):
        mxdit.load_transformer(str(tmp_path))
    os.remove(tmp_path / "model_index.json")
    with pytest.raises(FileNotFoundError, match="no weights"):
        mxdit.load_transformer(str(tmp_path))


# ============================================================================= streaming reader / writer
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16,
              torch.uint32, torch.uint64]


def _sample(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw & 1
    elif dtype.is_floating_point:  # keep NaN/Inf bit patterns out so value comparisons stay simple
        return (torch.randn(n, generator=g) * 3).to(dtype).reshape(shape)
    return raw.view(dtype).reshape(shape)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _tensors():
    out = {}
    for i, dt in enumerate(ALL_DTYPES):
        name = str(dt).replace("torch.", "")
        out[f"{name}.mat"] = _sample(dt, (3, 5), i)
        out[f"{name}.scalar"] = _sample(dt, (), i + 100)
        out[f"{name}.empty"] = _sample(dt, (0, 4), i)
    out["bf16.big"] = _sample(torch.bfloat16, (70, 333), 7)  # spans pages
    return out


def test_safetensors_file_reads_like_safetensors(tmp_path):
    tensors = _tensors()
    path = str(tmp_path / "all.safetensors")
    save_file(tensors, path, metadata={"k": "v"})
    ref = load_file(path)
    with SafetensorsFile(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.metadata == {"k": "v"}
        for k in tensors:
            got = f.read(k)
            assert got.dtype == ref[k].dtype and got.shape == ref[k].shape, k
            assert _bytes(got) == _bytes(ref[k]) == _bytes(tensors[k]), k
        again = f.read("bf16.big")  # reading twice (pages were released) still works
        assert _bytes(again) == _bytes(tensors["bf16.big"])


def test_write_safetensors_round_trip(tmp_path):
    tensors = _tensors()
    path = str(tmp_path / "w.safetensors")
    calls = []

    def producer(k):
        def produce():
            calls.append(k)
            return tensors[k]
        return produce

    entries = [(k, v.dtype, tuple(v.shape), producer(k)) for k, v in tensors.items()]
    write_safetensors(path, entries, metadata={"format": "pt", "n": 3})
    assert calls == list(tensors)  # each produced once, in order
    ref = load_file(path)
    assert sorted(ref) == sorted(tensors)
    for k, v in tensors.items():
        assert ref[k].dtype == v.dtype and ref[k].shape == v.shape and _bytes(ref[k]) == _bytes(v), k
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "n": "3"}
    with SafetensorsFile(path) as f:
        for k, v in tensors.items():
            assert _bytes(f.read(k)) == _bytes(v)
    with open(path, "rb") as f:  # header padded to 8 bytes, like save_file
        n = int.from_bytes(f.read(8), "little")
    assert n % 8 == 0


def test_write_safetensors_rejects_wrong_tensor(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    entries = [("a", torch.float32, (2, 3), lambda: torch.zeros(2, 3)),
               ("b", torch.bfloat16, (4,), lambda: torch.zeros(5, dtype=torch.bfloat16))]
    with pytest.raises(SafetensorsError, match=r"tensor 'b' is torch.bfloat16 \(5,\), the header says torch.bfloat16 \(4,\)"):
        write_safetensors(path, entries)


def test_write_safetensors_leaves_nothing_on_error(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    entries = [("a", torch.float32, (2, 3), lambda: torch.zeros(2, 3)),
               ("b", torch.bfloat16, (4,), lambda: torch.zeros(5, dtype=torch.bfloat16))]
    with pytest.raises(SafetensorsError):
        write_safetensors(path, entries)
    assert not os.path.exists(path)


def test_safetensors_file_reads_e8m0(tmp_path):
    path = str(tmp_path / "e8m0.safetensors")
    t = torch.arange(120, 136, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    save_file({"scale": t}, path)
    with SafetensorsFile(path) as f:
        assert _bytes(f.read("scale")) == _bytes(t)


def test_safetensors_header_errors(tmp_path):
    path = str(tmp_path / "h.safetensors")
    save_file({"a": torch.zeros(4)}, path)
    data = bytearray(open(path, "rb").read())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["a"]["shape"] = [5]  # 20 bytes claimed, 16 stored
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little") + hb + bytes(data[8 + n:]))
    with pytest.raises(SafetensorsError, match=r"tensor 'a' spans 16 bytes but shape \(5,\)"):
        SafetensorsFile(path)
    with open(path, "wb") as f:
        f.write((4).to_bytes(8, "little") + b"nope")
    with pytest.raises(SafetensorsError, match="header is not (a )?JSON"):
        SafetensorsFile(path)
