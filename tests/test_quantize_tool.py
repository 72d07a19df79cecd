"""``mxdit quantize``: msmodelslim-compatible exports, weight-scale rules, calibration, bad inputs.

Expectations are written from the reference documents, not from the tool:
tensor names / dtypes / shapes / labels from ascend-npu-mx.md §3.2 (and the
savers of §3.1), scale rules from §3.4 (msmodelslim ``calculate_mxfp4_qparam``,
``ceil_x``, ``calculate_mx_qparam``, ``dualscale``), and each loaded layer is
checked against plain dequantized-weight math on the checkpoint bytes
(FP4 nibbles decoded here, E8M0 as 2^(b-127)) with mxdit.formats activations.
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import glob
import json
import shutil

import pytest
import torch

import mxdit.formats as F
from mxdit.cli import main as cli_main
from mxdit.models.wan.names import LINEAR_SUFFIXES_DIFFUSERS, LINEAR_SUFFIXES_ORIGINAL, original_to_diffusers
from mxdit.formats import rules as FR
from mxdit.formats.metrics import sqnr_db
from mxdit.quant import offline_rules as R
from mxdit.tools.calibrate import CalibrationSettings
from mxdit.tools.quantize import QuantizeOptions, quantize_model

DIM, FFN, HEADS = 512, 1024, 4
FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
MIXED = (
    "# every scheme in one export; blocks.1.ffn.2 stays FLOAT\n"
    "blocks.0.*               W8A8_MXFP8\n"
    "blocks.1.self_attn.*     W4A4_MXFP4_DUALSCALE\n"
    "blocks.1.cross_attn.[qk] mxfp4\n"
    "blocks.1.cross_attn.*    mxfp4_dual\n"
    "blocks.1.ffn.0           W4A4_MXFP4\n"
)
MIXED_SCHEMES = {
    0: {s: "W8A8_MXFP8" for s in LINEAR_SUFFIXES_ORIGINAL},
    1: {"self_attn.q": "W4A4_MXFP4_DUALSCALE", "self_attn.k": "W4A4_MXFP4_DUALSCALE",
        "self_attn.v": "W4A4_MXFP4_DUALSCALE", "self_attn.o": "W4A4_MXFP4_DUALSCALE",
        "cross_attn.q": "W4A4_MXFP4", "cross_attn.k": "W4A4_MXFP4",
        "cross_attn.v": "W4A4_MXFP4_DUALSCALE", "cross_attn.o": "W4A4_MXFP4_DUALSCALE",
        "ffn.0": "W4A4_MXFP4", "ffn.2": "FLOAT"},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The CI machine is small and shared: one intra-op thread is much faster than oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _diffusers_tiny(path, *, ffn=FFN, layers=2, seed=0):
    """A tiny diffusers WanTransformer3DModel (block-linear K in {512, ffn}), randomised so that the
    input columns of every weight have different maxima (data-free smoothing is not the identity)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=DIM // HEADS,
                              in_channels=16, out_channels=16, text_dim=64, freq_dim=256, ffn_dim=ffn,
                              num_layers=layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            v = torch.randn(p.shape, generator=g) * 0.05
            if p.dim() == 2:
                v *= torch.exp(torch.randn(1, p.shape[1], generator=g))  # per-input-channel spread
            if "norm" in name and name.endswith("weight"):
                v += 1.0
            p.copy_(v)
    m.save_pretrained(str(path))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    sd = _diffusers_tiny(root / "tiny")
    return {"root": root, "path": root / "tiny", "sd": sd}


# ------------------------------------------------------------------------------------------ helpers
def _leftovers(parent) -> list[str]:
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


def _read_export(d) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        part = load_file(f)
        assert not set(part) & set(out)
        out.update(part)
    return out


def _description(d) -> dict:
    found = glob.glob(os.path.join(d, "quant_model_description*.json"))
    assert len(found) == 1, found
    with open(found[0]) as f:
        return json.load(f)


def _unpack_fp4_values(packed: torch.Tensor) -> torch.Tensor:
    """Packed nibbles (even k in the low nibble, sign in bit 3) -> float values [N, K]."""
    lo, hi = (packed & 0xF).long(), (packed >> 4).long()
    codes = torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)
    table = torch.tensor(FP4_VALUES + [-v for v in FP4_VALUES])
    return table[codes]


def _dequant(t: dict, prefix: str, scheme: str) -> torch.Tensor:
    """The dequantized weight from the checkpoint tensors, in plain float math."""
    w = t[prefix + ".weight"]
    if w.dtype == torch.uint8:
        vals = _unpack_fp4_values(w)
    else:
        vals = w.to(torch.float32)  # MXFP8 values, or FP4 values in the float8 container
    n, k = vals.shape
    sc = torch.exp2(t[prefix + ".weight_scale"].to(torch.float32) - 127).repeat_interleave(32, dim=1)
    deq = vals * sc
    if scheme == "W4A4_MXFP4_DUALSCALE":
        deq = deq * t[prefix + ".weight_dual_scale"].reshape(n, k // 512).repeat_interleave(512, dim=1)
    return deq


def _sqnr(ref, approx) -> float:
    return sqnr_db(ref, approx)


def _expected_block(b: int, schemes: dict[str, str], *, layout: str, smoothed: bool, container: str) -> dict:
    """{name: (dtype, shape, label)} of block b's tensors in an msmodelslim export (original names),
    per ascend-npu-mx.md §3.2 (bias FLOAT, except W4A4_MXFP4_DUALSCALE in ascendv1 (§3.2 table);
    mul_scale FLOAT; everything else FLOAT in its source dtype)."""
    shapes = {s: (DIM, DIM) for s in LINEAR_SUFFIXES_ORIGINAL}
    shapes["ffn.0"], shapes["ffn.2"] = (FFN, DIM), (DIM, FFN)
    exp = {}
    p = f"blocks.{b}"
    for suffix, (n, k) in shapes.items():
        scheme = schemes[suffix]
        layer = f"{p}.{suffix}"
        if scheme == "FLOAT":
            exp[layer + ".weight"] = (torch.float32, (n, k), "FLOAT")
            exp[layer + ".bias"] = (torch.float32, (n,), "FLOAT")
            continue
        pre = layer + ".linear" if smoothed else layer
        if smoothed:
            exp[layer + ".div.mul_scale"] = (torch.float32, (k,), "FLOAT")
        if scheme == "W8A8_MXFP8" or container == "fp8":
            exp[pre + ".weight"] = (torch.float8_e4m3fn, (n, k), scheme)
        else:
            exp[pre + ".weight"] = (torch.uint8, (n, k // 2), scheme)
        exp[pre + ".weight_scale"] = (torch.uint8, (n, k // 32), scheme)
        if scheme == "W4A4_MXFP4_DUALSCALE":
            exp[pre + ".weight_dual_scale"] = (torch.float32, (n, k // 512, 1), scheme)
        bias_label = scheme if (layout == "ascendv1" and scheme == "W4A4_MXFP4_DUALSCALE") else "FLOAT"
        exp[pre + ".bias"] = (torch.float32, (n,), bias_label)
    exp[f"{p}.modulation"] = (torch.float32, (1, 6, DIM), "FLOAT")
    exp[f"{p}.norm3.weight"] = (torch.float32, (DIM,), "FLOAT")
    exp[f"{p}.norm3.bias"] = (torch.float32, (DIM,), "FLOAT")
    for a in ("self_attn", "cross_attn"):
        for q in ("norm_q", "norm_k"):
            exp[f"{p}.{a}.{q}.weight"] = (torch.float32, (DIM,), "FLOAT")
    return exp


def _to_diffusers(name: str) -> str:
    """The diffusers layout's name: diffusers names, smooth-quant wrappers stripped (as mxdit repack)."""
    for wrap in (".linear.", ".div."):
        if wrap in name:
            mod, rest = name.split(wrap, 1)
            return original_to_diffusers(mod) + "." + rest
    return original_to_diffusers(name)


# ------------------------------------------------------------------------------------------ round trips
CASES = {
    # id: (layout, recipe, smooth, fp4 container, shard GB, via CLI)
    "mindie-mxfp8-cli": ("mindie", "all-mxfp8", "none", "uint8", 4.0, True),
    "mindie-mixed-fp8container-smooth": ("mindie", MIXED, "data-free", "fp8", 4.0, False),
    "ascendv1-mixed-sharded": ("ascendv1", MIXED, "none", "uint8", 0.0003, False),
    "ascendv1-dual-smooth-single": ("ascendv1", "all-mxfp4-dual", "data-free", "uint8", 0.0, False),
    "diffusers-mixed-smooth": ("diffusers", MIXED, "data-free", "uint8", 4.0, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_round_trip(tiny, case):
    from mxdit import load_transformer
    from mxdit.layers.linear import QuantLinear

    layout, recipe, smooth, container, shard, via_cli = CASES[case]
    out = tiny["root"] / f"out-{case}"
    if recipe == MIXED:
        rpath = tiny["root"] / "mixed.recipe"
        rpath.write_text(MIXED)
        recipe = str(rpath)
    if via_cli:
        rc = cli_main(["quantize", "--model-path", str(tiny["path"]), "--output", str(out), "--recipe", recipe,
                       "--layout", layout, "--fp4-container", container, "--shard-size", str(shard),
                       "--device", "cpu", "--no-progress"] + ([] if smooth == "none" else ["--smooth", smooth]))
        assert rc == 0
    else:
        quantize_model(str(tiny["path"]), str(out), QuantizeOptions(
            recipe=recipe, layout=layout, smooth=smooth, fp4_container=container, shard_size_gb=shard,
            progress=False, report_plot=(case == "diffusers-mixed-smooth")), log=lambda m: None)
    assert os.path.isfile(out / ".mxdit-output.json")
    files = sorted(f for f in os.listdir(out) if f != ".mxdit-output.json")
    reports = ["quality_report.json", "quality_report.md"] + (["quality_report.png"] if "png" in str(files) else [])
    desc = _description(out)
    tensors = _read_export(out)
    smoothed = smooth != "none"
    schemes = ({b: {s: "W8A8_MXFP8" for s in LINEAR_SUFFIXES_ORIGINAL} for b in (0, 1)} if recipe == "all-mxfp8" else
               {b: {s: "W4A4_MXFP4_DUALSCALE" for s in LINEAR_SUFFIXES_ORIGINAL} for b in (0, 1)}
               if recipe == "all-mxfp4-dual" else MIXED_SCHEMES)
    present = {s for b in schemes.values() for s in b.values() if s != "FLOAT"}
    mqt = max(present, key=["W8A8_MXFP8", "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE"].index)

    # ---- files and description header, per saver (§3.1)
    if layout == "mindie":
        t = mqt.lower()
        assert files == sorted(["config.json", f"quant_model_description_{t}.json",
                                f"quant_model_weight_{t}.safetensors"] + reports)
        assert desc["model_quant_type"] == mqt
        assert not {"version", "group_size", "metadata", "optional"} & set(desc)
    elif layout == "ascendv1":
        if shard > 0:
            shards = [f for f in files if f.startswith("quant_model_weights-")]
            assert len(shards) > 2 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
            with open(out / "quant_model_weights.safetensors.index.json") as f:
                index = json.load(f)
            assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
            assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
        else:
            assert files == sorted(["config.json", "quant_model_description.json",
                                    "quant_model_weights.safetensors"] + reports)
        assert desc["version"] == "1.0.0" and desc["model_quant_type"] == mqt
        assert desc["group_size"] == 32 and desc["metadata"] == {} and desc["optional"] == {}
    else:
        assert files == sorted(["config.json", "quant_model_description.json",
                                "diffusion_pytorch_model.safetensors"] + reports)
        assert "quality_report.png" in files
        with open(out / "config.json") as f:
            assert json.load(f)["num_attention_heads"] == HEADS
    header = {"model_quant_type", "version", "metadata", "group_size", "optional"}
    assert set(desc) - header == set(tensors), "every tensor labelled, no label without a tensor"

    # ---- one full block, exactly (names, dtypes, shapes, labels: §3.2)
    for b in (0, 1):
        want = _expected_block(b, schemes[b], layout=layout, smoothed=smoothed, container=container)
        if layout == "diffusers":
            want = {_to_diffusers(k): v for k, v in want.items()}
        pre = "blocks.%d." % b
        got = {k: (v.dtype, tuple(v.shape), desc[k]) for k, v in tensors.items() if k.startswith(pre)}
        assert got == want, sorted(set(got) ^ set(want))
    # everything outside the blocks is the source tensor, FLOAT, unchanged
    for k, v in tiny["sd"].items():
        if not k.startswith("blocks."):
            name = k if layout == "diffusers" else _orig(k)
            assert desc[name] == "FLOAT" and torch.equal(tensors[name], v), k

    # ---- the export loads through mxdit.load_transformer, every layer reproduces the reference math
    model = load_transformer(str(out), progress=False, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    n_smoothed = 0
    for b in (0, 1):
        for so, sd_ in zip(LINEAR_SUFFIXES_ORIGINAL, LINEAR_SUFFIXES_DIFFUSERS):
            scheme = schemes[b][so]
            dname = f"blocks.{b}.{sd_}"
            layer = model.get_submodule(dname)
            assert isinstance(layer, QuantLinear)
            w_src = tiny["sd"][dname + ".weight"]
            if scheme == "FLOAT":
                assert layer.quant_method.name == "unquantized"
                assert torch.equal(layer.weight.float(), w_src.to(torch.bfloat16).float())
                continue
            if layout == "diffusers":
                pre, ms_name = dname, dname + ".mul_scale"
            else:
                base = f"blocks.{b}.{so}"
                pre, ms_name = (base + ".linear" if smoothed else base), base + ".div.mul_scale"
            ms = tensors[ms_name] if smoothed else torch.ones(w_src.shape[1])
            n_smoothed += int(bool((ms != 1).any()))
            deq = _dequant(tensors, pre, scheme)
            # the stored weight is W * s with mul_scale = 1/s: deq * mul_scale approximates W
            min_db = 28.0 if scheme == "W8A8_MXFP8" else 15.0
            assert _sqnr(w_src, deq * ms) > min_db, (dname, _sqnr(w_src, deq * ms))
            x = (torch.randn(6, w_src.shape[1], generator=g) * 2).to(torch.bfloat16)
            y = layer(x)
            if scheme == "W4A4_MXFP4_DUALSCALE":
                xq = F.quantize_mx_dual(x, smooth_scale=ms if smoothed else None).dequantize()
            else:
                fmt = "fp8_e4m3" if scheme == "W8A8_MXFP8" else "fp4_e2m1"
                xs = x * ms.to(torch.bfloat16) if smoothed else x
                xq = F.quantize_mx(xs, fmt, scale_mode="floor", round_mode="rint").dequantize()
            ref = xq.double() @ deq.double().t() + tensors[pre + ".bias"].double()
            err = (y.double() - ref).abs().max().item()
            assert err <= 8e-3 * ref.abs().max().item() + 1e-6, (dname, err)
    if smoothed:
        assert n_smoothed > 0, "data-free smoothing was the identity everywhere: the test checks nothing"


def _orig(name: str) -> str:
    from mxdit.models.wan.names import diffusers_to_original

    return diffusers_to_original(name)


def test_model_dir_layouts_and_whole_model_accuracy(tiny, tmp_path):
    """A model directory with two experts: msmodelslim layouts get high_noise_model / low_noise_model;
    the diffusers layout is a whole model directory.  The MXFP8 model stays close to the BF16 one."""
    from mxdit import load_transformer

    md = tmp_path / "Wan-tiny"
    os.makedirs(md)
    shutil.copytree(tiny["path"], md / "transformer")
    shutil.copytree(tiny["path"], md / "transformer_2")
    os.makedirs(md / "vae")
    (md / "vae" / "config.json").write_text("{}")
    (md / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "WanTransformer3DModel"],
                                                     "transformer_2": ["diffusers", "WanTransformer3DModel"],
                                                     "vae": ["diffusers", "AutoencoderKLWan"]}))
    before = {p: os.path.getmtime(p) for p in glob.glob(str(md / "**"), recursive=True)}
    opts = dict(recipe="all-mxfp8", progress=False, report_plot=False)
    quantize_model(str(md), str(tmp_path / "ms"), QuantizeOptions(**opts), log=lambda m: None)
    assert sorted(os.listdir(tmp_path / "ms")) == [".mxdit-output.json", "high_noise_model", "low_noise_model"]
    assert "quant_model_weight_w8a8_mxfp8.safetensors" in os.listdir(tmp_path / "ms" / "low_noise_model")
    quantize_model(str(md), str(tmp_path / "df"), QuantizeOptions(layout="diffusers", **opts), log=lambda m: None)
    assert sorted(os.listdir(tmp_path / "df")) == [".mxdit-output.json", "model_index.json", "transformer", "transformer_2", "vae"]
    assert {p: os.path.getmtime(p) for p in glob.glob(str(md / "**"), recursive=True)} == before
    assert not _leftovers(tmp_path)

    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel.from_pretrained(str(tiny["path"])).eval()
    q = load_transformer(str(tmp_path / "df" / "transformer_2"), progress=False, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    t = torch.tensor([500.0])
    text = torch.randn(1, 7, 64, generator=g)
    with torch.no_grad():
        y_ref = ref(x, t, text, return_dict=False)[0]
        y = q(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    rel = ((y.float() - y_ref).norm() / y_ref.norm()).item()
    assert rel < 0.05, rel


# ------------------------------------------------------------------------------------------ weight rules
def _q(x, fmt, rule):
    codes, scale = FR.quantize_mx_rule(x, fmt, rule)
    if fmt == "fp4_e2m1":
        vals = _unpack_fp4_values(F.pack_fp4(codes))
    else:
        vals = codes.view(torch.float8_e4m3fn).float()
    return vals * torch.exp2(scale.float() - 127).repeat_interleave(32, dim=1), scale


def _block(amax: float, *rest: float) -> torch.Tensor:
    v = torch.zeros(1, 32)
    v[0, 0] = amax
    v[0, 1 : 1 + len(rest)] = torch.tensor(rest)
    return v


def test_minmax_fp4_8_7_boundary_and_half_away():
    # amax mantissa >= 1.75 moves the block to the next exponent (floor(log2(amax*8/7)) - 2) ...
    for e in (-6, 0, 6):
        at = 1.75 * 2.0**e
        below = at * (1 - 2.0**-10)
        _, s_at = _q(_block(at), "fp4_e2m1", "minmax")
        _, s_below = _q(_block(below), "fp4_e2m1", "minmax")
        assert s_at.tolist()[0][0] == 127 + e - 1 and s_below.tolist()[0][0] == 127 + e - 2, e
        # ... while the OCP floor rule keeps exponent(amax) - 2 for both
        assert _q(_block(at), "fp4_e2m1", "floor")[1][0, 0] == 127 + e - 2
    # the literal fp32 formula: one ulp below the boundary, log2(amax / 0.875) rounds to the power of
    # two and the block moves up as well (msmodelslim's export does the same)
    below = torch.nextafter(torch.tensor(1.75 * 2.0**6), torch.tensor(0.0)).item()
    assert _q(_block(below), "fp4_e2m1", "minmax")[1][0, 0] == 127 + 6 - 1
    # msmodelslim's "+ 9.6e-7" is absolute: for small blocks it moves the boundary down by
    # 0.875 * 9.6e-7 = 8.4e-7 (kept, to match msmodelslim's exports)
    at = 1.75 * 2.0**-6
    assert _q(_block(at - 5e-7), "fp4_e2m1", "minmax")[1][0, 0] == 127 - 6 - 1
    assert _q(_block(at - 1.2e-6), "fp4_e2m1", "minmax")[1][0, 0] == 127 - 6 - 2
    # amax 1.75 -> scale 2^-1: 1.75 / 0.5 = 3.5 rounds away from zero to 4 (not saturated to 6 * 0.25)
    deq, _ = _q(_block(1.75), "fp4_e2m1", "minmax")
    assert deq[0, 0] == 2.0
    # round half away from zero: 0.625 / 0.25 = 2.5 -> 3 (rint would give 2), also for negatives
    # and 0.3125 / 0.25 = 1.25 -> 1.5 (rint: 1.0, the even code)
    deq, s = _q(_block(1.5, 0.625, -0.625, 0.3125), "fp4_e2m1", "minmax")
    assert s[0, 0] == 125 and deq[0, :4].tolist() == [1.5, 0.75, -0.75, 0.375]
    rint, _ = _q(_block(1.5, 0.625, -0.625, 0.3125), "fp4_e2m1", "floor")
    assert rint[0, 1:4].tolist() == [0.5, -0.5, 0.25]
    # clips: shared exponent in [-129, 125]; an all-zero block gets floor(log2(9.6e-7)) - 2 = -22 (ceil_x: ceil(log2(9.6e-7)) = -19)
    big = torch.tensor([[3.0e38], [0.0]])
    assert FR.shared_exponent(big, "fp4_e2m1", "minmax").flatten().tolist() == [125.0, -22.0]
    assert FR.shared_exponent(big, "fp4_e2m1", "ceil_x").flatten().tolist() == [125.0, -19.0]


def test_ceil_x_boundaries():
    c = 7.25
    cases = [  # amax -> shared exponent (scale 2^s): the scaled block max lands in (c/2, c]
        (c * (1 - 4e-6), 0), (c, 1), (c / 2 * (1 + 4e-6), 0), (c / 2 * (1 - 4e-6), -1),
        (c * 4 * (1 - 4e-6), 2), (c * 4, 3), (3.0, -1), (0.01, -9),
    ]
    for amax, s in cases:
        got = FR.shared_exponent(torch.tensor([amax]), "fp4_e2m1", "ceil_x").item()
        assert got == s, (amax, got, s)
        # (at exactly c * 2^k the +9.6e-7 term moves the block up: the scaled max is then c / 2)
        assert c / 2 < amax / 2.0**s <= c or amax / 2.0**s == c / 2
        _, byte = _q(_block(amax), "fp4_e2m1", "ceil_x")
        assert byte[0, 0] == s + 127
    # the block max above 6 saturates to 6 (6 < 7.1 <= 7.25): the ceil_x trade-off
    deq, _ = _q(_block(7.1), "fp4_e2m1", "ceil_x")
    assert deq[0, 0] == 6.0


def test_mxfp8_rules():
    # msmodelslim MXFP8: scale floor(log2 amax) - 8, elements round half away from zero;
    # OCP floor: the same scale, elements round half to even.  1.0625 is halfway 1.0 / 1.125.
    x = _block(256.0 * 1.5, 256.0 * 1.0625, -256.0 * 1.0625, 256.0 * 1.1875)
    mm, s = _q(x, "fp8_e4m3", "minmax")
    fl, s2 = _q(x, "fp8_e4m3", "floor")
    assert s[0, 0] == s2[0, 0] == 127 + 8 - 8
    assert mm[0, 1:4].tolist() == [288.0, -288.0, 320.0]
    assert fl[0, 1:4].tolist() == [256.0, -256.0, 320.0]  # 1.1875 is halfway too: even mantissa 1.25
    # a block max in [448, 512) x 2^s saturates to 448 under floor; mse picks the next exponent
    y = _block(500.0, 3.0)
    assert _q(y, "fp8_e4m3", "floor")[0][0, 0] == 448.0
    deq, s = _q(y, "fp8_e4m3", "mse")
    assert s[0, 0] == 128 and deq[0, 0] == 512.0  # 500 -> 250 * 2 -> 256 * 2 (half away)


def _msmodelslim_oracle(x: torch.Tensor, fmt: str, rule: str):
    """A literal transcription of msmodelslim's code (ir/api/impl/mx_quantization.py
    ``calculate_mxfp4_qparam`` + ``mxfp4_quantize``; core/quantizer/impl/ceil_x.py ``ceil_x_qparam``;
    ``calculate_mx_qparam`` + ``mxfp_per_block_quantize``/``_quant`` for MXFP8), blocks of 32 on the
    last axis.  Returns (dequantized values, shared exponents)."""
    xb = x.reshape(*x.shape[:-1], -1, 32).to(torch.float32)
    max_val = xb.abs().amax(-1, keepdim=True)
    if fmt == "fp4_e2m1":
        if rule == "minmax":
            s = torch.floor(torch.log2(max_val / (1 - 0.5 ** (3 - 2 + 2)) + 9.6e-7)) - 2
        else:
            s = torch.ceil(torch.log2((max_val / 7.25).clamp(min=0) + 9.6e-7))
        s = torch.clip(s, -127 - 2, 127 - 2)
        sign = torch.sign(xb)
        x_biased = xb.abs() / torch.exp2(s)
        pe = torch.clip(torch.floor(torch.log2(x_biased + 9.6e-7)), 0, 2)
        mant = torch.floor(x_biased / (2**pe) * (2**1) + 0.5)
        fp = torch.clip(mant / (2**1) * (2**pe), -6.0, 6.0)
        fp[torch.broadcast_to(s < -127, fp.shape)] = 0
        vals = sign * fp
    else:
        s = torch.floor(torch.log2(max_val + 2.0**-126 * (max_val == 0).to(max_val.dtype))) - 8
        s[s > 127] = float("nan")
        s[s < -127] = -127
        inp = torch.ldexp(xb, (-s).to(torch.int32))
        inp = torch.where(xb == 0, torch.zeros(()), inp)
        pe = torch.floor(torch.log2(torch.abs(inp) + (inp == 0).to(inp.dtype))).clip(min=-6)
        a = inp / (2**pe) * (2**3)
        a = torch.sign(a) * torch.floor(torch.abs(a) + 0.5)
        vals = torch.clamp(a / (2**3) * (2**pe), min=-448.0, max=448.0)
    return (vals * torch.exp2(s)).reshape(x.shape), s.reshape(*x.shape[:-1], -1)


def test_minmax_and_ceil_x_bit_exact_with_msmodelslim_code():
    g = torch.Generator().manual_seed(7)
    t = torch.randn(96, 256, generator=g) * torch.exp(torch.randn(96, 256, generator=g)) * 0.02
    # block maxima a few ulps around the 8/7 (1.75 * 2^e) and ceil_x (7.25 * 2^e) boundaries,
    # elements near rounding ties, all-zero blocks, tiny blocks
    e = torch.exp2(torch.randint(-12, 4, (96, 8), generator=g).float())
    ulps = 1 + torch.randint(-3, 4, (96, 8), generator=g) * 2.0**-23
    t[:, ::32] = 1.75 * e * ulps
    t[:48, 1::32] = 7.25 * e[:48] * ulps[:48]
    t[:, 2::32] = t[:, ::32] * (torch.randint(1, 24, (96, 8), generator=g) / 16 + 2.0**-24)
    t[:8, :32] = 0.0
    t[8:16, 32:64] *= 1e-9
    for fmt, rules in (("fp4_e2m1", ("minmax", "ceil_x")), ("fp8_e4m3", ("minmax",))):
        for rule in rules:
            want, s = _msmodelslim_oracle(t, fmt, rule)
            got, byte = _q(t, fmt, rule)
            assert torch.equal(byte.to(torch.float32) - 127, s.clamp(min=-127)), (fmt, rule)
            assert torch.equal(got, want), (fmt, rule, (got != want).sum())


def test_rules_match_formats_and_mse_is_blockwise_best():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 512, generator=g) * torch.exp(torch.randn(1, 512, generator=g))
    for fmt in ("fp8_e4m3", "fp4_e2m1"):
        codes, scale = FR.quantize_mx_rule(w, fmt, "floor")
        q = F.quantize_mx(w, fmt, scale_mode="floor", round_mode="rint")
        assert torch.equal(codes, q.codes()) and torch.equal(scale, q.scale)
        errs = {}
        for rule in R.FORMAT_RULES[fmt]:
            deq, _ = _q(w, fmt, rule)
            errs[rule] = ((deq - w) ** 2).reshape(64, 16, 32).sum(-1)
        for rule, e in errs.items():
            assert bool((errs["mse"] <= e * (1 + 1e-6) + 1e-30).all()), (fmt, rule)
    # the quantizer's own dequantized weight is exactly the stored bytes decoded
    for scheme in R.SCHEME_FORMAT:
        for rule in R.FORMAT_RULES[R.SCHEME_FORMAT[scheme]]:
            q = R.quantize_weight(w, scheme, rule, keep_dequantized=True)
            stored = R.QuantizedWeight(q.scheme, q.qdata, q.scale, q.dual_scale)
            assert torch.equal(q.deq, stored.dequantize()), (scheme, rule)


def test_dualscale_level0_is_true_division_and_wprime_stays_fp32():
    # pick amax values where amax / 6 (true division) != amax * fp32(1/6) (the NPU's constant)
    cand = torch.linspace(1.0, 2.0, 4097)
    true_div = cand / 6.0
    by_recip = cand * torch.tensor(1.0 / 6.0, dtype=torch.float32)
    amax = cand[true_div != by_recip][:4]
    assert amax.numel() == 4
    w = torch.randn(4, 512, generator=torch.Generator().manual_seed(0)) * 0.1
    w[:, 7] = amax
    q = R.quantize_weight(w, "W4A4_MXFP4_DUALSCALE", "minmax")
    assert q.dual_scale.shape == (4, 1) and torch.equal(q.dual_scale[:, 0], amax / 6.0)
    wp = w / (amax / 6.0)[:, None]  # fp32, no bf16 rounding in between
    codes, scale = FR.quantize_mx_rule(wp, "fp4_e2m1", "minmax")
    assert torch.equal(q.qdata, F.pack_fp4(codes)) and torch.equal(q.scale, scale)
    assert FR.dual_level0(torch.zeros(1, 512))[0].item() == 0.0  # all-zero block: L0 0, no NaN
    assert torch.equal(R.quantize_weight(torch.zeros(2, 512), "W4A4_MXFP4_DUALSCALE").dequantize(), torch.zeros(2, 512))


# ------------------------------------------------------------------------------------------ calibration
def test_smoothing_factor_rules():
    from mxdit.tools.calibrate import data_free_smooth_factors, smooth_factors

    # SmoothQuant s = a^alpha / c^(1 - alpha), rounded to a power of two; zero statistics -> 1
    a = torch.tensor([4.0, 16.0, 1.0, 0.0, 3.0, 1e30])
    c = torch.tensor([1.0, 4.0, 16.0, 1.0, 1.0, 1e-30])
    assert smooth_factors(a, c, 0.5).tolist() == [2.0, 2.0, 0.25, 1.0, 2.0, 2.0**20]  # sqrt(3) -> 2; clamp 2^20
    assert smooth_factors(a, c, 1.0)[:3].tolist() == [4.0, 16.0, 1.0]
    # data-free: s = (g / c)^(1 - alpha), g = geometric mean of the non-zero c; power of two in [1/16, 16]
    c = torch.tensor([1.0, 4.0, 16.0, 0.0])
    assert data_free_smooth_factors(c, 0.5).tolist() == [2.0, 1.0, 0.5, 1.0]
    assert data_free_smooth_factors(torch.tensor([1.0, 2.0**20]), 0.0).tolist() == [16.0, 1 / 16]


def _add_outliers(tdir, factor=32.0, n=8, seed=0):
    """Outlier input channels for the q/k/v and ffn.0 layers (modulation scale x factor), with the
    matching weight columns / factor: the BF16 model's outputs stay O(1), but MX activation blocks
    holding an outlier lose the other channels -- what SmoothQuant is for."""
    from safetensors.torch import load_file, save_file

    p = os.path.join(tdir, "diffusion_pytorch_model.safetensors")
    sd = load_file(p)
    g = torch.Generator().manual_seed(seed)
    chans = {}
    for b in range(2):
        for idx, layers in ((1, ("attn1.to_q", "attn1.to_k", "attn1.to_v")), (4, ("ffn.net.0.proj",))):
            ch = torch.randperm(DIM, generator=g)[:n]
            sd[f"blocks.{b}.scale_shift_table"][0, idx, ch] = factor - 1.0  # (1 + scale) = factor
            for lname in layers:
                sd[f"blocks.{b}.{lname}.weight"][:, ch] /= factor
                chans[f"blocks.{b}.{lname}"] = ch
    save_file(sd, p, metadata={"format": "pt"})
    return chans


def test_calibration_smoothing_improves_output_sqnr(tmp_path_factory):
    from _tiny_wan import tiny_model_dir

    from mxdit import load_transformer
    from mxdit.models.wan.names import diffusers_to_original

    root = tmp_path_factory.mktemp("calib")
    src = root / "model"
    shutil.copytree(tiny_model_dir(tmp_path_factory, "t2v-a14b"), src)
    chans = _add_outliers(src / "transformer")
    _add_outliers(src / "transformer_2")
    prompts = root / "prompts.txt"
    prompts.write_text("a red fox in the snow\n\nwaves on a beach at sunset\n")
    cs = CalibrationSettings(steps=3, height=32, width=48, frames=5, samples=32, max_sequence_length=32)
    common = dict(recipe="all-mxfp4", progress=False, report_plot=False, calib=cs)
    smooth = quantize_model(str(src), str(root / "smooth"),
                            QuantizeOptions(calib_prompts=str(prompts), **common), log=lambda m: None)
    plain = quantize_model(str(src), str(root / "plain"),
                           QuantizeOptions(calib_stats=smooth.calib_stats, smooth="none", **common), log=lambda m: None)
    assert set(smooth.calib_stats) == {"transformer", "transformer_2"}  # both experts ran
    assert sorted(os.listdir(root / "smooth")) == [".mxdit-output.json", "high_noise_model", "low_noise_model"]
    outlier_layers = {diffusers_to_original(k) for k in chans}
    for sub in ("high_noise_model", "low_noise_model"):
        with open(root / "smooth" / sub / "quality_report.json") as f:
            rs = {l["name"]: l for l in json.load(f)["layers"]}
        with open(root / "plain" / sub / "quality_report.json") as f:
            rp = {l["name"]: l for l in json.load(f)["layers"]}
        assert set(rs) == set(rp) and len(rs) == 20
        assert all(l["act_rows"] == 32 for l in rs.values())

        def mean(r, names):
            return sum(r[n]["output_sqnr_db"] for n in names) / len(names)

        gain = mean(rs, outlier_layers) - mean(rp, outlier_layers)
        assert gain > 3.0, (sub, gain)
        assert mean(rs, rs) > mean(rp, rp), sub
        assert "calib" in open(root / "smooth" / sub / "quality_report.md").read()
    # the smoothing factors target the outlier channels: their mul_scale (1/s) is the smallest
    t = _read_export(root / "smooth" / "high_noise_model")
    ms = t["blocks.0.self_attn.q.div.mul_scale"]
    ch = chans["blocks.0.attn1.to_q"]
    others = torch.ones(DIM, dtype=torch.bool)
    others[ch] = False
    assert ms[ch].max() < ms[others].min()
    # and the smoothed export loads (mul_scale applied) and runs
    m = load_transformer(str(root / "smooth" / "high_noise_model"), progress=False)
    assert m.get_submodule("blocks.0.attn1.to_q").use_mul_scale


# ------------------------------------------------------------------------------------------ bad inputs
def _cli_error(capsys, args) -> str:
    rc = cli_main(["quantize"] + [str(a) for a in args] + ["--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("mxdit quantize: error: ") and err.count("\n") == 1, err
    return err


def test_bad_inputs_are_one_line_errors_and_write_nothing(tiny, tmp_path, capsys):
    model = tiny["path"]
    out = tmp_path / "out"
    recipe = tmp_path / "r.recipe"

    recipe.write_text("nothing.* W8A8_MXFP8\n")
    err = _cli_error(capsys, ["--model-path", model, "--output", out, "--recipe", recipe])
    assert "names no layer" in err
    recipe.write_text("# header\nblocks.[0-1].* W8A8_MXFP8\nblocks.* W4A16_MXFP\n")
    err = _cli_error(capsys, ["--model-path", model, "--output", out, "--recipe", recipe])
    assert "line 3" in err and "unknown scheme 'W4A16_MXFP'" in err
    err = _cli_error(capsys, ["--model-path", model, "--output", out, "--recipe", "no-such-recipe"])
    assert "no-such-recipe" in err and "all-mxfp8" in err
    recipe.write_text("* W8A8_MXFP8\n")
    err = _cli_error(capsys, ["--model-path", model, "--output", out, "--recipe", recipe])
    assert "non-block" in err and "head.head" in err and "--allow-non-block" in err
    err = _cli_error(capsys, ["--model-path", model, "--output", out, "--recipe", "all-mxfp8", "--smooth-alpha", 0.7])
    assert "--smooth-alpha" in err and "--calib-prompts" in err
    err = _cli_error(capsys, ["--model-path", model, "--output", out, "--recipe", "all-mxfp8",
                              "--calib-prompts", tmp_path / "p.txt"])
    assert "model_index.json" in err
    # calibration settings the pipeline would reject are found before anything loads
    mdir = tmp_path / "mdir"
    os.makedirs(mdir)
    shutil.copytree(model, mdir / "transformer")
    for comp in ("vae", "scheduler", "tokenizer", "text_encoder"):
        os.makedirs(mdir / comp)
    (mdir / "vae" / "config.json").write_text(json.dumps({"z_dim": 16}))
    (mdir / "scheduler" / "scheduler_config.json").write_text("{}")
    (mdir / "model_index.json").write_text(json.dumps({c: ["x", "y"] for c in
                                                       ("transformer", "vae", "scheduler", "tokenizer", "text_encoder")}))
    (tmp_path / "p.txt").write_text("a prompt\n")
    err = _cli_error(capsys, ["--model-path", mdir, "--output", out, "--recipe", "all-mxfp8",
                              "--calib-prompts", tmp_path / "p.txt", "--calib-height", 40])
    assert "--calib-height" in err and "16x16" in err
    # dual-scale needs K % 512 == 0: ffn.2 has K = 1056 here (a multiple of 32: MXFP8 would be fine)
    odd = tmp_path / "odd"
    _diffusers_tiny(odd, ffn=1056, layers=1)
    err = _cli_error(capsys, ["--model-path", odd, "--output", out, "--recipe", "all-mxfp4-dual"])
    assert "blocks.0.ffn.2 (K=1056)" in err and "512" in err and "W4A4_MXFP4_DUALSCALE" in err
    # an already-quantized input
    done = tmp_path / "done"
    quantize_model(str(odd), str(done), QuantizeOptions(recipe="all-mxfp8", progress=False, report_plot=False),
                   log=lambda m: None)
    err = _cli_error(capsys, ["--model-path", done, "--output", out, "--recipe", "all-mxfp8"])
    assert "already quantized" in err
    assert not out.exists() and not _leftovers(tmp_path)
    # an existing output without --overwrite: refused and untouched; with --overwrite: replaced
    before = sorted(os.listdir(done))
    stamp = os.path.getmtime(done / "config.json")
    err = _cli_error(capsys, ["--model-path", odd, "--output", done, "--recipe", "all-mxfp4"])
    assert "already exists" in err and "--overwrite" in err
    assert sorted(os.listdir(done)) == before and os.path.getmtime(done / "config.json") == stamp
    rc = cli_main(["quantize", "--model-path", str(odd), "--output", str(done), "--recipe", "all-mxfp4",
                   "--overwrite", "--no-plot", "--device", "cpu", "--no-progress"])
    assert rc == 0
    assert "quant_model_weight_w4a4_mxfp4.safetensors" in os.listdir(done)
    assert "quant_model_weight_w8a8_mxfp8.safetensors" not in os.listdir(done)
    assert not _leftovers(tmp_path)
