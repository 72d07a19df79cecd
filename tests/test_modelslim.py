"""msmodelslim checkpoints through QuantLinear (issue 3), per-layer contract.

The checkpoints are written by this test with its own small writer, straight
from the reference tables (ascend-npu-mx.md §3.1-§3.3, sglang-diffusion-mx.md
§5.6), in both savers' layouts:

* ascendv1: ``quant_model_description.json`` (labels + "version",
  "model_quant_type", "metadata", "group_size", "optional") and
  ``quant_model_weights.safetensors``, or the sharded variant
  ``quant_model_weights-0000i-of-00002.safetensors`` + index json;
* mindie format: ``quant_model_description_w4a4_mxfp4_dualscale.json`` and
  ``quant_model_weight_w4a4_mxfp4_dualscale.safetensors`` (labels +
  "model_quant_type" only).

One mixed export holds every supported type: W8A8_MXFP8, W4A4_MXFP4
(single-level, no weight_dual_scale; packed uint8 and float8-value
containers), W4A4_MXFP4_DUALSCALE (weight_dual_scale float32 [N, K/512, 1];
both containers), W8A8 static (deq_scale float32 and int64-held float32 bits),
W8A8_DYNAMIC, FLOAT, with and without smooth quant (``<p>.div.mul_scale`` +
``<p>.linear.*``), written with original Wan names and loaded into diffusers
names through ``original_to_diffusers`` (also via an explicit "modelslim"
registry choice), or written with diffusers names and loaded without a map.

Each layer is loaded the way the full loader will (``load_layer`` below) and
its output is compared with an independent computation from the tensors we
wrote (tests/_quant_oracles.py): MX / dual-level weights dequantized by our
decoders, int8 layers by our own integer math per the reference formulas,
FLOAT layers by plain float math.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import mxdit.quant as Q
from mxdit.layers.linear import QuantLinear
from mxdit.models.wan.names import original_to_diffusers
from mxdit.quant import ModelSlimConfig, get_weight_loader, strip_modelslim_wrappers

from _quant_oracles import (
    E4M3_LUT,
    FP4_LUT,
    act_2d,
    act_dual,
    act_mx,
    as_u8,
    check_output,
    dequant_block32,
    fp4_codes_to_e4m3_bytes,
    int8_per_token,
    int8_static,
    pack_fp4_codes,
    reference,
    unpack_fp4_codes,
    varied_input,
)

N = 40  # output features of every test layer (small; the format does not care)

# ============================================================================
# Our own msmodelslim writer (layouts from ascend-npu-mx.md §3.1/§3.2)
# ============================================================================


def write_export(directory: Path, tensors: dict, labels: dict, *, saver: str, model_quant_type: str,
                 shards: int = 1) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if saver == "ascendv1":
        desc = dict(labels)
        desc.update({"version": "1.0.0", "model_quant_type": model_quant_type, "metadata": {},
                     "group_size": 32, "optional": {}})
        (directory / "quant_model_description.json").write_text(json.dumps(desc, indent=2))
        if shards == 1:
            save_file(tensors, str(directory / "quant_model_weights.safetensors"))
        else:
            names = sorted(tensors)
            parts = [names[i::shards] for i in range(shards)]
            weight_map, total = {}, 0
            for i, part in enumerate(parts):
                fname = f"quant_model_weights-{i + 1:05d}-of-{shards:05d}.safetensors"
                save_file({k: tensors[k] for k in part}, str(directory / fname))
                for k in part:
                    weight_map[k] = fname
                    total += tensors[k].numel() * tensors[k].element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (directory / "quant_model_weights.safetensors.index.json").write_text(json.dumps(index, indent=2))
    elif saver == "mindie":
        assert shards == 1
        desc = dict(labels)
        desc["model_quant_type"] = model_quant_type
        t = model_quant_type.lower()
        (directory / f"quant_model_description_{t}.json").write_text(json.dumps(desc, indent=2))
        save_file(tensors, str(directory / f"quant_model_weight_{t}.safetensors"))
    else:
        raise ValueError(saver)


def read_export(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an export (our own reader: the index if there is one, else every file)."""
    index = list(directory.glob("*.safetensors.index.json"))
    if index:
        files = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        paths = [directory / f for f in files]
    else:
        paths = sorted(directory.glob("*.safetensors"))
    out = {}
    for p in paths:
        with safe_open(str(p), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


# ============================================================================
# The per-layer loading contract
# ============================================================================


class MissingTensorError(ValueError):
    pass


def load_layer(cfg, ckpt: dict, prefix: str, in_features: int, out_features: int, *, bias: bool = True,
               name_map=None, params_dtype=torch.bfloat16) -> QuantLinear:
    """Build on "meta", stream each checkpoint tensor of ``prefix`` through its
    parameter's loader, fill ``missing_init`` params, process."""
    layer = QuantLinear(in_features, out_features, bias=bias, quant_config=cfg, prefix=prefix,
                        params_dtype=params_dtype, device="meta")
    params = dict(layer.named_parameters())
    loaded = set()
    for key, tensor in ckpt.items():
        name = strip_modelslim_wrappers(key)
        if name_map is not None:
            name = name_map(name)
        if not name.startswith(prefix + "."):
            continue
        pname = name[len(prefix) + 1:]
        if "." in pname:
            continue  # belongs to a child module (e.g. to_out.0 vs to_out)
        if pname not in params:
            raise KeyError(f"checkpoint tensor '{key}' has no parameter '{pname}' in layer '{prefix}'")
        param = params[pname]
        value = get_weight_loader(param)(param, tensor, name=key)
        assert value.device.type == "cpu"
        setattr(layer, pname, nn.Parameter(value, requires_grad=False))
        loaded.add(pname)
    for pname, param in params.items():
        if pname in loaded:
            continue
        init = getattr(param, "missing_init", None)
        if init == "ones":
            value = torch.ones(param.shape, dtype=param.dtype)
        elif init == "zeros":
            value = torch.zeros(param.shape, dtype=param.dtype)
        else:
            raise MissingTensorError(f"layer '{prefix}': the checkpoint has no tensor for required parameter '{pname}'")
        setattr(layer, pname, nn.Parameter(value, requires_grad=False))
    assert all(p.device.type == "cpu" for p in layer.parameters())
    layer.process_weights_after_loading()
    return layer


# ============================================================================
# Layer content generators (tensor suffix -> tensor, plus what the oracle needs)
# ============================================================================


def gen_layer(rng: np.random.Generator, label: str, k: int, n: int = N, *, container: str = "packed",
              deq: str = "f32", smooth: bool = False):
    """Returns (tensors: suffix -> torch tensor, tensor labels: suffix -> label, truth: dict for the oracle).
    Suffixes are relative to the linear: 'weight', 'bias', ...; 'mul_scale' for the smooth wrapper."""
    t, lab, truth = {}, {}, {"label": label, "k": k, "n": n}
    bias = (rng.standard_normal(n) * 0.5).astype(np.float32)
    if label == "W8A8_MXFP8":
        mag = rng.integers(0, 0x7F, size=(n, k), dtype=np.uint8)  # 0x7F would be NaN
        codes = mag | np.where(rng.random((n, k)) < 0.5, 0x80, 0).astype(np.uint8)
        scale = rng.integers(112, 124, size=(n, k // 32), dtype=np.uint8)
        t["weight"] = torch.from_numpy(codes).view(torch.float8_e4m3fn)
        t["weight_scale"] = torch.from_numpy(scale)
        truth["w"] = dequant_block32(E4M3_LUT[codes], scale)
    elif label in ("W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE"):
        codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
        scale = rng.integers(118, 128, size=(n, k // 32), dtype=np.uint8)
        if container == "packed":
            t["weight"] = torch.from_numpy(pack_fp4_codes(codes))
        else:
            t["weight"] = torch.from_numpy(fp4_codes_to_e4m3_bytes(codes)).view(torch.float8_e4m3fn)
        t["weight_scale"] = torch.from_numpy(scale)
        w = dequant_block32(FP4_LUT[codes], scale)
        truth["codes"] = codes
        if label == "W4A4_MXFP4_DUALSCALE":
            dual = rng.uniform(0.01, 0.1, size=(n, k // 512, 1)).astype(np.float32)
            t["weight_dual_scale"] = torch.from_numpy(dual)
            w = w * np.repeat(dual[..., 0].astype(np.float64), 512, axis=-1)
        truth["w"] = w
    elif label == "W8A8":
        wq = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
        weight_scale = rng.uniform(1e-4, 1e-3, size=n).astype(np.float32)
        input_scale = np.array([0.0371], dtype=np.float32)
        input_offset = np.array([-3.0], dtype=np.float32)
        deq_scale = (input_scale * weight_scale).astype(np.float32)
        correction = wq.astype(np.float32).sum(axis=1) * input_offset
        quant_bias = np.round(bias / deq_scale - correction).astype(np.int32)
        t["weight"] = torch.from_numpy(wq)
        t["quant_bias"] = torch.from_numpy(quant_bias)
        t["input_scale"] = torch.from_numpy(input_scale)
        t["input_offset"] = torch.from_numpy(input_offset)
        if deq == "i64":  # ascendv1 (non-bf16 model): float32 bits as int32, widened to int64
            t["deq_scale"] = torch.from_numpy(np.frombuffer(deq_scale.tobytes(), dtype=np.int32).astype(np.int64))
        else:
            t["deq_scale"] = torch.from_numpy(deq_scale)
        truth.update(wq=wq, quant_bias=quant_bias, deq_scale=deq_scale, input_scale=float(input_scale[0]),
                     input_offset=float(input_offset[0]))
    elif label == "W8A8_DYNAMIC":
        wq = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
        weight_scale = rng.uniform(1e-4, 1e-3, size=(n, 1)).astype(np.float32)
        t["weight"] = torch.from_numpy(wq)
        t["weight_scale"] = torch.from_numpy(weight_scale)
        t["weight_offset"] = torch.zeros(n, 1, dtype=torch.float32)
        truth.update(wq=wq, weight_scale=weight_scale)
    elif label == "FLOAT":
        w = torch.from_numpy((rng.standard_normal((n, k)) * 0.05).astype(np.float32)).to(torch.bfloat16)
        t["weight"] = w
        t["bias"] = torch.from_numpy(bias).to(torch.bfloat16)  # on_float_module: the model's dtype
        lab = {s: "FLOAT" for s in t}
        truth["w"] = w.double().numpy()
        truth["bias"] = t["bias"].float()
        return t, lab, truth
    else:
        raise ValueError(label)
    for s in t:
        lab[s] = label
    t["bias"] = torch.from_numpy(bias)
    lab["bias"] = "FLOAT"
    truth["bias"] = t["bias"]
    if smooth:
        ms = rng.uniform(0.5, 2.0, size=k).astype(np.float32)
        t["mul_scale"] = torch.from_numpy(ms)
        lab["mul_scale"] = "FLOAT"
        truth["mul_scale"] = t["mul_scale"]
    return t, lab, truth


def full_names(prefix: str, tensors: dict, labels: dict, smooth: bool):
    """Checkpoint names: ``<p>.div.mul_scale`` + ``<p>.linear.*`` when smoothed (§3.2)."""
    out_t, out_l = {}, {}
    for s, v in tensors.items():
        if s == "mul_scale":
            name = f"{prefix}.div.mul_scale"
        else:
            name = f"{prefix}.linear.{s}" if smooth else f"{prefix}.{s}"
        out_t[name] = v
        out_l[name] = labels[s]
    return out_t, out_l


def expected_output(truth: dict, x: torch.Tensor, round_mode: str = "rint"):
    """Independent float64 / integer computation of the layer output."""
    label = truth["label"]
    ms = truth.get("mul_scale")
    if label == "FLOAT":
        xd = x.to(torch.bfloat16).reshape(-1, x.shape[-1]).double().numpy()
        return reference(xd, truth["w"], truth["bias"])
    x2 = act_2d(x, ms)
    if label == "W8A8_MXFP8":
        return reference(act_mx(x2, "fp8_e4m3", round_mode), truth["w"], truth["bias"])
    if label == "W4A4_MXFP4":
        return reference(act_mx(x2, "fp4_e2m1", round_mode), truth["w"], truth["bias"])
    if label == "W4A4_MXFP4_DUALSCALE":
        return reference(act_dual(x2, round_mode), truth["w"], truth["bias"])
    wq = truth["wq"].astype(np.int64)
    if label == "W8A8":
        # quant_act = rint(x / input_scale + input_offset); out = (quant_act . W_q + quant_bias) * deq_scale.
        # The float bias is folded into quant_bias by the exporter and is NOT added again (§2.5, §3.2).
        q = int8_static(x2, truth["input_scale"], truth["input_offset"])
        acc = q @ wq.T
        deq = truth["deq_scale"].astype(np.float64)
        ref = (acc + truth["quant_bias"]).astype(np.float64) * deq
        absdot = (np.abs(q) @ np.abs(wq).T + np.abs(truth["quant_bias"])) * deq
        return ref, absdot
    if label == "W8A8_DYNAMIC":
        q, s = int8_per_token(x2)
        acc = (q @ wq.T).astype(np.float64)
        ws = truth["weight_scale"].reshape(1, -1).astype(np.float64)
        b = truth["bias"].double().numpy()
        ref = acc * s.astype(np.float64) * ws + b
        absdot = (np.abs(q) @ np.abs(wq).T) * s.astype(np.float64) * ws + np.abs(b)
        return ref, absdot
    raise ValueError(label)


# ============================================================================
# The mixed export
# ============================================================================

#: (original prefix, diffusers prefix, K, label, options)
LAYERS = [
    ("blocks.0.self_attn.q", "blocks.0.attn1.to_q", 512, "W8A8_MXFP8", {}),
    ("blocks.0.self_attn.k", "blocks.0.attn1.to_k", 512, "W8A8_MXFP8", {"smooth": True}),
    ("blocks.0.self_attn.v", "blocks.0.attn1.to_v", 512, "W4A4_MXFP4", {"container": "packed"}),
    ("blocks.0.self_attn.o", "blocks.0.attn1.to_out.0", 512, "W4A4_MXFP4", {"container": "fp8", "smooth": True}),
    ("blocks.0.cross_attn.q", "blocks.0.attn2.to_q", 1024, "W4A4_MXFP4_DUALSCALE", {"container": "packed", "smooth": True}),
    ("blocks.0.cross_attn.k", "blocks.0.attn2.to_k", 1024, "W4A4_MXFP4_DUALSCALE", {"container": "fp8"}),
    ("blocks.0.cross_attn.v", "blocks.0.attn2.to_v", 512, "W8A8", {"deq": "f32"}),
    ("blocks.0.cross_attn.o", "blocks.0.attn2.to_out.0", 512, "W8A8", {"deq": "i64", "smooth": True}),
    ("blocks.0.ffn.0", "blocks.0.ffn.net.0.proj", 512, "W8A8_DYNAMIC", {"smooth": True}),
    ("blocks.0.ffn.2", "blocks.0.ffn.net.2", 1024, "W8A8_DYNAMIC", {}),
    ("head.head", "proj_out", 512, "FLOAT", {}),
]
#: non-linear FLOAT tensors every export carries (original name, diffusers name, shape)
FLOAT_EXTRAS = [
    ("blocks.0.norm3.weight", "blocks.0.norm2.weight", (512,)),
    ("blocks.0.modulation", "blocks.0.scale_shift_table", (1, 6, 512)),
    ("blocks.0.self_attn.norm_q.weight", "blocks.0.attn1.norm_q.weight", (512,)),
    ("patch_embedding.weight", "patch_embedding.weight", (16, 4, 1, 2, 2)),
    ("head.modulation", "scale_shift_table", (1, 2, 512)),
]
MQT = "W4A4_MXFP4_DUALSCALE"  # the highest-priority type present (ascendv1) / the dual-scale mindie export


def build_mixed_export(directory: Path, *, saver: str, names: str, shards: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    tensors, labels, truths = {}, {}, {}
    for orig, diff, k, label, opts in LAYERS:
        opts = dict(opts)
        if saver == "mindie" and opts.get("deq") == "i64":
            opts["deq"] = "f32"  # mindie format always writes float32 deq_scale
        t, lab, truth = gen_layer(rng, label, k, **opts)
        if saver == "ascendv1" and label == "W4A4_MXFP4_DUALSCALE":
            lab["bias"] = label  # ascendv1 labels the dual-scale bias with the layer type
        prefix = orig if names == "original" else diff
        ft, fl = full_names(prefix, t, lab, opts.get("smooth", False))
        tensors.update(ft)
        labels.update(fl)
        truths[diff] = truth
    for orig, diff, shape in FLOAT_EXTRAS:
        name = orig if names == "original" else diff
        tensors[name] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(torch.bfloat16)
        labels[name] = "FLOAT"
    write_export(directory, tensors, labels, saver=saver, model_quant_type=MQT, shards=shards)
    return truths


SCENARIOS = [
    pytest.param("ascendv1", 1, "original", "registry", id="ascendv1-wan_names-registry"),
    pytest.param("ascendv1", 2, "original", "from_dir", id="ascendv1-sharded-wan_names-from_dir"),
    pytest.param("mindie", 1, "original", "registry", id="mindie-wan_names-registry"),
    pytest.param("mindie", 1, "diffusers", "from_dir", id="mindie-diffusers_names-no_map"),
]


@pytest.mark.parametrize("saver, shards, names, via", SCENARIOS)
def test_mixed_export_every_layer_matches_independent(tmp_path, saver, shards, names, via):
    truths = build_mixed_export(tmp_path, saver=saver, names=names, shards=shards)
    files = sorted(os.path.basename(f) for f in Q.find_weight_files(str(tmp_path)))
    if saver == "ascendv1":
        assert os.path.basename(Q.find_description_file(str(tmp_path))) == "quant_model_description.json"
        assert files == (["quant_model_weights.safetensors"] if shards == 1 else
                         ["quant_model_weights-00001-of-00002.safetensors", "quant_model_weights-00002-of-00002.safetensors"])
    else:
        assert os.path.basename(Q.find_description_file(str(tmp_path))) == "quant_model_description_w4a4_mxfp4_dualscale.json"
        assert files == ["quant_model_weight_w4a4_mxfp4_dualscale.safetensors"]
    name_map = original_to_diffusers if names == "original" else None
    if via == "registry":  # an explicit "modelslim" choice still applies the name map (SGLang defect #3)
        cfg = Q.get_quant_config("modelslim", path=str(tmp_path), name_map=name_map)
    else:
        cfg = ModelSlimConfig.from_dir(str(tmp_path), name_map=name_map)
    assert isinstance(cfg, ModelSlimConfig) and cfg.model_quant_type == MQT
    ckpt = read_export(tmp_path)
    g = torch.Generator().manual_seed(1)
    failures = []
    for orig, diff, k, label, opts in LAYERS:
        truth = truths[diff]
        layer = load_layer(cfg, ckpt, diff, k, N, name_map=name_map)
        pnames = {n for n, _ in layer.named_parameters()}
        # the layer's storage is what the label says
        want = {"W8A8_MXFP8": {"weight", "weight_scale", "bias"},
                "W4A4_MXFP4": {"weight", "weight_scale", "bias"},  # no weight_dual_scale (SGLang defect #1)
                "W4A4_MXFP4_DUALSCALE": {"weight", "weight_scale", "weight_dual_scale", "bias"},
                "W8A8": {"weight", "input_scale", "input_offset", "quant_bias", "deq_scale", "bias"},
                "W8A8_DYNAMIC": {"weight", "weight_scale", "weight_offset", "bias"},
                "FLOAT": {"weight", "bias"}}[label]
        if opts.get("smooth"):
            want = want | {"mul_scale"}
        assert pnames == want, (diff, label, pnames)
        if label in ("W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE"):
            # either container ends up as packed FP4 holding the same values
            assert layer.weight.dtype == torch.uint8 and tuple(layer.weight.shape) == (N, k // 2)
            assert np.array_equal(FP4_LUT[unpack_fp4_codes(as_u8(layer.weight))], FP4_LUT[truth["codes"]]), diff
        inputs = [varied_input(g, (2, 3, k), torch.bfloat16)]
        if label != "FLOAT":
            inputs.append(varied_input(g, (5, k), torch.float32))
        for x in inputs:
            try:
                out = layer(x)
                assert out.dtype == x.dtype, (out.dtype, x.dtype)
                assert tuple(out.shape) == (*x.shape[:-1], N)
                ref, absdot = expected_output(truth, x)
                check_output(out, ref, absdot, what=f"{diff} ({label}, {opts}, input {tuple(x.shape)} {x.dtype})")
            except AssertionError as e:
                failures.append(str(e))
    assert not failures, "\n".join(failures)


def test_w8a8_static_bias_is_folded_into_quant_bias(tmp_path):
    """Both savers write quant_bias = round(bias/deq_scale - sum_k W_q * input_offset) AND the
    float bias (label FLOAT).  The layer output must be (x_q . W_q + quant_bias) * deq_scale,
    i.e. ~ x W^T + bias once -- not bias twice."""
    rng = np.random.default_rng(3)
    t, lab, truth = gen_layer(rng, "W8A8", 512)
    ft, fl = full_names("blocks.0.attn2.to_v", t, lab, False)
    write_export(tmp_path, ft, fl, saver="mindie", model_quant_type="W8A8")
    cfg = ModelSlimConfig.from_dir(str(tmp_path))
    layer = load_layer(cfg, read_export(tmp_path), "blocks.0.attn2.to_v", 512, N)
    x = varied_input(torch.Generator().manual_seed(4), (6, 512), torch.float32)
    ref, absdot = expected_output(truth, x)
    out = layer(x)
    check_output(out, ref, absdot, what="W8A8 static with bias")


def test_w8a8_dynamic_without_weight_offset_uses_zeros(tmp_path):
    rng = np.random.default_rng(5)
    t, lab, truth = gen_layer(rng, "W8A8_DYNAMIC", 512)
    del t["weight_offset"], lab["weight_offset"]
    write_export(tmp_path, *full_names("blocks.1.ffn.net.2", t, lab, False), saver="mindie", model_quant_type="W8A8_DYNAMIC")
    cfg = ModelSlimConfig.from_dir(str(tmp_path))
    layer = load_layer(cfg, read_export(tmp_path), "blocks.1.ffn.net.2", 512, N)
    assert getattr(QuantLinear(512, N, quant_config=cfg, prefix="blocks.1.ffn.net.2", device="meta").weight_offset,
                   "missing_init", None) == "zeros"
    assert torch.equal(layer.weight_offset.reshape(-1), torch.zeros(N))
    x = varied_input(torch.Generator().manual_seed(6), (2, 4, 512), torch.bfloat16)
    check_output(layer(x), *expected_output(truth, x), what="W8A8_DYNAMIC without weight_offset")


def test_single_level_mxfp4_description_without_dual_scale(tmp_path):
    """SGLang defect #1: a plain W4A4_MXFP4 export has no weight_dual_scale and must load
    as single-level MXFP4 (per-32 E8M0 only), in both containers."""
    rng = np.random.default_rng(7)
    tensors, labels, truths = {}, {}, {}
    for i, container in enumerate(("packed", "fp8")):
        t, lab, truth = gen_layer(rng, "W4A4_MXFP4", 512, container=container)
        p = f"blocks.{i}.attn1.to_q"
        ft, fl = full_names(p, t, lab, False)
        tensors.update(ft)
        labels.update(fl)
        truths[p] = truth
    assert not any("dual" in k for k in tensors)
    write_export(tmp_path, tensors, labels, saver="ascendv1", model_quant_type="W4A4_MXFP4")
    cfg = Q.get_quant_config("modelslim", path=str(tmp_path))
    ckpt = read_export(tmp_path)
    x = varied_input(torch.Generator().manual_seed(8), (3, 3, 512), torch.bfloat16)
    for p, truth in truths.items():
        layer = load_layer(cfg, ckpt, p, 512, N)
        assert not hasattr(layer, "weight_dual_scale") or layer.weight_dual_scale is None
        check_output(layer(x), *expected_output(truth, x), what=f"single-level {p}")
    # vllm-ascend quantizes W4A4_MXFP4 activations with round_mode="round"
    cfg = Q.get_quant_config("modelslim", path=str(tmp_path), act_round_mode="round")
    for p, truth in truths.items():
        layer = load_layer(cfg, ckpt, p, 512, N)
        ref, absdot = expected_output(truth, x, round_mode="round")
        assert np.abs(ref - expected_output(truth, x)[0]).max() > 0, "inputs should contain rounding ties"
        check_output(layer(x), ref, absdot, what=f"single-level {p} act_round_mode=round")


def test_name_map_required_for_original_names(tmp_path):
    """Without the name map, the diffusers-named layer has no entry: a clear error naming it."""
    build_mixed_export(tmp_path, saver="mindie", names="original")
    cfg = Q.get_quant_config("modelslim", path=str(tmp_path))
    with pytest.raises(ValueError) as ei:
        QuantLinear(512, N, quant_config=cfg, prefix="blocks.0.attn1.to_q", device="meta")
    assert "blocks.0.attn1.to_q" in str(ei.value)
    # with the map the same prefix resolves to the W8A8_MXFP8 scheme
    cfg = Q.get_quant_config("modelslim", path=str(tmp_path), name_map=original_to_diffusers)
    layer = QuantLinear(512, N, quant_config=cfg, prefix="blocks.0.attn1.to_q", device="meta")
    assert layer.weight.dtype == torch.float8_e4m3fn


def test_ignore_option_keeps_layer_float(tmp_path):
    build_mixed_export(tmp_path, saver="mindie", names="diffusers")
    cfg = ModelSlimConfig.from_dir(str(tmp_path), ignore=["blocks.*.attn1.*"])
    assert QuantLinear(512, N, quant_config=cfg, prefix="blocks.0.attn1.to_q", device="meta").quant_method.name == "unquantized"
    assert QuantLinear(1024, N, quant_config=cfg, prefix="blocks.0.attn2.to_q", device="meta").quant_method.name != "unquantized"


# ============================================================================
# Bad input: each a clear error naming the layer or tensor and what was expected
# ============================================================================


def test_no_description_file(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "quant_model_weights.safetensors"))
    for make in (lambda: ModelSlimConfig.from_dir(str(tmp_path)),
                 lambda: Q.get_quant_config("modelslim", path=str(tmp_path))):
        with pytest.raises(FileNotFoundError) as ei:
            make()
        msg = str(ei.value)
        assert str(tmp_path) in msg and "quant_model_description" in msg, msg


@pytest.mark.parametrize("label", ["W4A4_MXFP4_SVD", "W4A8_MXFP", "W8A16"])
def test_unknown_label(tmp_path, label):
    desc = {"blocks.3.self_attn.q.weight": label, "blocks.3.self_attn.q.weight_scale": label,
            "blocks.3.self_attn.q.bias": "FLOAT", "model_quant_type": label}
    (tmp_path / f"quant_model_description_{label.lower()}.json").write_text(json.dumps(desc))
    cfg = Q.get_quant_config("modelslim", path=str(tmp_path), name_map=original_to_diffusers)
    with pytest.raises(NotImplementedError) as ei:
        QuantLinear(512, N, quant_config=cfg, prefix="blocks.3.attn1.to_q", device="meta")
    msg = str(ei.value)
    assert "blocks.3.attn1.to_q" in msg and label in msg, msg


def _one_layer(tmp_path, label, k=512, *, container="packed", deq="f32", edit=None, drop=(), prefix="blocks.0.attn1.to_q"):
    rng = np.random.default_rng(11)
    t, lab, truth = gen_layer(rng, label, k, container=container, deq=deq)
    for s in drop:
        del t[s], lab[s]
    for s, v in (edit or {}).items():
        t[s] = v
    ft, fl = full_names(prefix, t, lab, False)
    write_export(tmp_path, ft, fl, saver="mindie", model_quant_type=label)
    cfg = ModelSlimConfig.from_dir(str(tmp_path))
    return cfg, read_export(tmp_path), truth


BAD_TENSORS = [
    # (label, suffix, bad tensor, substrings the error must contain)
    ("W8A8_MXFP8", "weight_scale", torch.zeros(N, 512 // 16, dtype=torch.uint8), ["weight_scale", "(40, 16)"]),
    ("W8A8_MXFP8", "weight", torch.zeros(N, 512, dtype=torch.bfloat16), ["weight", "bfloat16", "float8_e4m3fn"]),
    ("W8A8_MXFP8", "weight_scale", torch.zeros(N, 512 // 32, dtype=torch.int8), ["weight_scale", "int8", "uint8"]),
    ("W4A4_MXFP4", "weight", torch.zeros(N, 512 // 4, dtype=torch.uint8), ["weight", "(40, 128)", "(40, 256)"]),
    ("W4A4_MXFP4", "weight", torch.zeros(N, 512 // 2, dtype=torch.int8), ["weight", "int8"]),
    ("W4A4_MXFP4", "weight", torch.zeros(N, 256, dtype=torch.float8_e4m3fn), ["weight", "(40, 256)", "(40, 512)"]),
    ("W4A4_MXFP4_DUALSCALE", "weight_dual_scale", torch.ones(N, 3, 1), ["weight_dual_scale", "(40, 3, 1)", "(40, 2, 1)"]),
    ("W4A4_MXFP4_DUALSCALE", "weight_dual_scale", torch.ones(N, 2, 1, dtype=torch.int32), ["weight_dual_scale", "int32", "float32"]),
    ("W8A8", "deq_scale", torch.ones(N + 1), ["deq_scale", "(41,)", "(40,)"]),
    ("W8A8", "quant_bias", torch.zeros(N, dtype=torch.float32), ["quant_bias", "float32", "int32"]),
    ("W8A8_DYNAMIC", "weight", torch.zeros(N, 512, dtype=torch.float16), ["weight", "float16", "int8"]),
    ("W8A8_DYNAMIC", "weight_scale", torch.ones(N, 2), ["weight_scale", "(40, 2)", "(40, 1)"]),
]


@pytest.mark.parametrize("label, suffix, bad, needles", BAD_TENSORS,
                         ids=[f"{b[0]}-{b[1]}-{b[2].dtype}-{tuple(b[2].shape)}" for b in BAD_TENSORS])
def test_shape_or_dtype_mismatch_names_the_tensor(tmp_path, label, suffix, bad, needles):
    k = 1024 if label == "W4A4_MXFP4_DUALSCALE" else 512
    cfg, ckpt, _ = _one_layer(tmp_path, label, k, edit={suffix: bad})
    with pytest.raises(ValueError) as ei:
        load_layer(cfg, ckpt, "blocks.0.attn1.to_q", k, N)
    msg = str(ei.value)
    assert f"blocks.0.attn1.to_q.{suffix}" in msg, msg
    for s in needles:
        assert s in msg, (s, msg)


@pytest.mark.parametrize("label, required", [
    ("W4A4_MXFP4_DUALSCALE", ("weight", "weight_scale", "weight_dual_scale")),
    ("W4A4_MXFP4", ("weight", "weight_scale")),
    ("W8A8_MXFP8", ("weight", "weight_scale")),
    ("W8A8", ("weight", "quant_bias", "deq_scale", "input_scale", "input_offset")),
    ("W8A8_DYNAMIC", ("weight", "weight_scale")),
])
def test_required_tensors_have_no_missing_init(tmp_path, label, required):
    """A DUALSCALE export without weight_dual_scale must not load: the method declares it
    required (no ``missing_init``), so the loader refuses instead of inventing scales."""
    k = 1024 if label == "W4A4_MXFP4_DUALSCALE" else 512
    missing = required[-1] if label == "W4A4_MXFP4_DUALSCALE" else required[1]
    cfg, ckpt, _ = _one_layer(tmp_path, label, k, drop=(missing,))
    layer = QuantLinear(k, N, quant_config=cfg, prefix="blocks.0.attn1.to_q", device="meta")
    for pname in required:
        assert hasattr(layer, pname), pname
        assert getattr(getattr(layer, pname), "missing_init", None) is None, pname
    with pytest.raises(MissingTensorError) as ei:
        load_layer(cfg, ckpt, "blocks.0.attn1.to_q", k, N)
    assert "blocks.0.attn1.to_q" in str(ei.value) and missing in str(ei.value)


@pytest.mark.parametrize("label, k", [("W8A8_MXFP8", 48), ("W4A4_MXFP4", 80), ("W4A4_MXFP4_DUALSCALE", 768),
                                      ("W4A4_MXFP4_DUALSCALE", 256)])
def test_k_not_multiple_of_block_size(label, k):
    desc = {"blocks.5.ffn.2.weight": label, "blocks.5.ffn.2.weight_scale": label, "model_quant_type": label}
    cfg = ModelSlimConfig(desc, name_map=original_to_diffusers)
    with pytest.raises(ValueError) as ei:
        QuantLinear(k, N, quant_config=cfg, prefix="blocks.5.ffn.net.2", device="meta")
    msg = str(ei.value)
    assert "blocks.5.ffn.net.2" in msg and str(k) in msg, msg


@pytest.mark.parametrize("label", ["W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE"])
@pytest.mark.parametrize("off_grid", [0.75, 5.0, 448.0, -2.5, 0.25])
def test_fp4_fp8_container_off_grid_values(tmp_path, label, off_grid):
    k = 1024 if label == "W4A4_MXFP4_DUALSCALE" else 512
    rng = np.random.default_rng(13)
    codes = rng.integers(0, 16, size=(N, k), dtype=np.uint8)
    vals = torch.from_numpy(fp4_codes_to_e4m3_bytes(codes)).view(torch.float8_e4m3fn).float()
    vals[7, 33] = off_grid
    cfg, ckpt, _ = _one_layer(tmp_path, label, k, container="fp8", edit={"weight": vals.to(torch.float8_e4m3fn)})
    with pytest.raises(ValueError) as ei:
        load_layer(cfg, ckpt, "blocks.0.attn1.to_q", k, N)
    msg = str(ei.value)
    assert "blocks.0.attn1.to_q.weight" in msg and "FP4" in msg, msg


def test_float_label_with_smoothing_is_an_error():
    desc = {"blocks.0.self_attn.q.div.mul_scale": "FLOAT", "blocks.0.self_attn.q.linear.weight": "FLOAT",
            "model_quant_type": "FLOAT"}
    cfg = ModelSlimConfig(desc, name_map=original_to_diffusers)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn1\.to_q"):
        QuantLinear(512, N, quant_config=cfg, prefix="blocks.0.attn1.to_q", device="meta")


def test_strip_modelslim_wrappers():
    assert strip_modelslim_wrappers("blocks.7.self_attn.q.linear.weight_dual_scale") == "blocks.7.self_attn.q.weight_dual_scale"
    assert strip_modelslim_wrappers("blocks.7.self_attn.q.div.mul_scale") == "blocks.7.self_attn.q.mul_scale"
    assert strip_modelslim_wrappers("blocks.7.linear_1.weight") == "blocks.7.linear_1.weight"
    assert strip_modelslim_wrappers("condition_embedder.time_embedder.linear_1.weight") == \
        "condition_embedder.time_embedder.linear_1.weight"
    assert strip_modelslim_wrappers("blocks.0.divx.weight") == "blocks.0.divx.weight"
