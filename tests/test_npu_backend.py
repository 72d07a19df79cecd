"""The Ascend NPU backend under an emulated torch_npu (tests/fake_torch_npu.py).

* every online method and msmodelslim scheme through the NPU backend equals the
  reference backend bit for bit (quantized weights / activations and outputs);
* a tiny Wan transformer end to end (mxfp4_dual on blocks.*) equals the reference;
* each argument check of the emulation rejects the mistake it guards against;
* without torch_npu the backend and ``check_npu_available`` fail with the install hint.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys

import pytest
import torch
from torch import nn

import fake_torch_npu as fake
import mxdit.kernels as K
import mxdit.formats as F
from mxdit.kernels.base import KernelBackend
from mxdit.layers.linear import QuantLinear
from mxdit.quant.registry import get_quant_config

BF16 = torch.bfloat16




def called(name: str) -> int:
    return sum(1 for n, _ in fake.CALLS if n == name)


def calls(name: str) -> list[dict]:
    return [kw for n, kw in fake.CALLS if n == name]


def rand(*shape, dtype=BF16, seed=0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * std).to(dtype)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a, b.view(torch.uint8) if b.dtype.itemsize == 1 else b)


# ---- layers --------------------------------------------------------------------------

def online_pair(method: str, k: int, n: int, *, bias=True, dtype=BF16, **opts):
    """The same BF16 weights in a QuantLinear through the npu backend and through the reference."""
    w, b = rand(n, k, seed=1, std=0.05, dtype=dtype), rand(n, seed=2, dtype=dtype)
    layers = []
    for backend in ("npu", "reference"):
        cfg = get_quant_config(method, backend=backend, **opts)
        ql = QuantLinear(k, n, bias=bias, quant_config=cfg, prefix="blocks.0.attn1.to_q", params_dtype=dtype, device="cpu")
        ql.weight = nn.Parameter(w.clone(), requires_grad=False)
        if bias:
            ql.bias = nn.Parameter(b.clone(), requires_grad=False)
        ql.process_weights_after_loading()
        layers.append(ql)
    return layers


def check_pair(npu_layer, ref_layer, x):
    for name in ("weight", "weight_scale", "weight_dual_scale"):
        if getattr(ref_layer, name, None) is not None:
            assert_same(getattr(npu_layer, name).data, getattr(ref_layer, name).data)
    y_npu, y_ref = npu_layer(x), ref_layer(x)
    assert_same(y_npu, y_ref)
    return y_npu


MX_CASES = [
    ("mxfp8", {}, 160, 48),  # K/32 = 5 blocks: an odd count, pair padding
    ("mxfp8", {"scale_mode": "rceil"}, 128, 48),  # rceil weights: reference fallback, activations on the op
    ("mxfp4", {}, 160, 48),
    ("mxfp4", {"act_round_mode": "round"}, 128, 40),  # vllm-ascend's activation rounding
    ("mxfp4", {"act_round_mode": "floor"}, 128, 40),
    ("mxfp4_dual", {}, 1024, 40),
    ("mxfp4_dual", {"act_round_mode": "round"}, 512, 24),
]


@pytest.mark.parametrize("method,opts,k,n", MX_CASES)
@pytest.mark.parametrize("xshape", [(7,), (2, 5)], ids=["2d", "3d"])
def test_online_methods_equal_reference(npu, method, opts, k, n, xshape):
    npu_layer, ref_layer = online_pair(method, k, n, **opts)
    fake.reset_calls()
    x = rand(*xshape, k, seed=3)
    y = check_pair(npu_layer, ref_layer, x)
    assert y.shape == (*xshape, n)
    if method == "mxfp4_dual":
        assert called("npu_dual_level_quant_matmul") == 1 and called("npu_dynamic_dual_level_mx_quant") == 1
        (q,) = calls("npu_dynamic_dual_level_mx_quant")
        assert q["shape"] == (x.numel() // k, k)  # flattened to 2-D
    else:
        assert called("npu_quant_matmul") == 1 and called("npu_dynamic_mx_quant") == 1
        (q,) = calls("npu_dynamic_mx_quant")
        assert q["shape"] == (x.numel() // k, k)
        if method == "mxfp8":
            assert q["dst_type"] == fake.float8_e4m3fn and q["round_mode"] == "rint"
        else:
            assert q["dst_type"] == fake.float4_e2m1fn_x2 and q["round_mode"] == opts.get("act_round_mode", "rint")


def test_online_weights_quantized_by_the_ops(npu):
    online_pair("mxfp4", 128, 8)
    online_pair("mxfp4_dual", 512, 8)
    assert called("npu_dynamic_mx_quant") == 1 and called("npu_dynamic_dual_level_mx_quant") == 1
    assert called("npu_format_cast") == 0  # NZ cast happens at the first forward (prepare)


@pytest.mark.parametrize("method", ["mxfp8", "mxfp4"])
def test_fp32_and_fp16_activations(npu, method):
    for dtype in (torch.float32, torch.float16):
        npu_layer, ref_layer = online_pair(method, 128, 16, dtype=dtype)
        check_pair(npu_layer, ref_layer, rand(3, 128, dtype=dtype, seed=4))


def test_dual_fp16_and_fp32_outputs(npu):
    npu_layer, ref_layer = online_pair("mxfp4_dual", 512, 16, dtype=torch.float16)
    fake.reset_calls()
    check_pair(npu_layer, ref_layer, rand(3, 512, dtype=torch.float16, seed=4))
    assert called("npu_dual_level_quant_matmul") == 1
    # fp32 output: the op has none; the backend quantizes on the op and uses the reference matmul
    npu_layer, ref_layer = online_pair("mxfp4_dual", 512, 16, dtype=torch.float32)
    fake.reset_calls()
    check_pair(npu_layer, ref_layer, rand(3, 512, dtype=torch.float32, seed=4))
    assert called("npu_dual_level_quant_matmul") == 0 and called("npu_dynamic_dual_level_mx_quant") == 1


def test_fp8_per_channel_falls_back_to_reference(npu):
    npu_layer, ref_layer = online_pair("fp8", 64, 16)
    fake.reset_calls()
    check_pair(npu_layer, ref_layer, rand(4, 64))
    assert fake.CALLS == []


def test_mxfp8_round_mode_round_is_rejected(npu):
    npu_layer, _ = online_pair("mxfp8", 128, 16, act_round_mode="round")
    with pytest.raises(ValueError, match="only round_mode='rint' for FP8"):
        npu_layer(rand(2, 128))


def test_small_k_falls_back(npu):
    """K <= 64: the MX op rejects an ND weight; the backend computes the reference instead."""
    npu_layer, ref_layer = online_pair("mxfp4", 64, 16)
    fake.reset_calls()
    check_pair(npu_layer, ref_layer, rand(2, 64))
    assert called("npu_quant_matmul") == 0


# ---- backend-level: quantize entry points and smoothing modes ---------------------------

@pytest.mark.parametrize("fmt,round_mode", [("fp8_e4m3", "rint"), ("fp8_e5m2", "rint"), ("fp4_e2m1", "rint"),
                                            ("fp4_e2m1", "round"), ("fp4_e2m1", "floor")])
def test_quantize_mx_equals_reference(npu, fmt, round_mode):
    be, ref = K.get_backend("npu"), K.get_backend("reference")
    for x in (rand(3, 96, seed=5) * 10, rand(2, 3, 64, dtype=torch.float16, seed=6), rand(4, 32, dtype=torch.float32)):
        a = be.quantize_mx(x, fmt, round_mode=round_mode)
        b = ref.quantize_mx(x, fmt, round_mode=round_mode)
        assert_same(a.qdata, b.qdata)
        assert_same(a.scale, b.scale)
    assert called("npu_dynamic_mx_quant") == 3


def test_quantize_mx_dual_equals_reference(npu):
    be, ref = K.get_backend("npu"), K.get_backend("reference")
    x = rand(2, 3, 1024, seed=7)
    smooth = torch.rand(1024, generator=torch.Generator().manual_seed(8)) + 0.5
    for kw in ({}, {"round_mode": "round"}, {"smooth_scale": smooth}):
        a, b = be.quantize_mx_dual(x, **kw), ref.quantize_mx_dual(x, **kw)
        for name in ("qdata", "scale_l0", "scale_l1"):
            assert_same(getattr(a, name), getattr(b, name))
    a = be.quantize_mx_dual(x, smooth_scale=smooth, smooth_in_quant=True)
    assert_same(a.qdata, ref.quantize_mx_dual(x, smooth_scale=smooth).qdata)
    assert called("npu_dynamic_dual_level_mx_quant") == 4


@pytest.mark.parametrize("smooth_in_quant", [False, True])
def test_dual_linear_smoothing_modes(npu, smooth_in_quant):
    be, ref = K.get_backend("npu"), K.get_backend("reference")
    w = F.quantize_mx_dual(rand(24, 512, seed=9, std=0.05))
    x = rand(5, 512, seed=10)
    smooth = (torch.rand(512, generator=torch.Generator().manual_seed(11)) + 0.5).float()
    bias = rand(24, dtype=torch.float32, seed=12)
    out = be.dual_linear(x, be.prepare_dual_weight(w), bias, smooth_scale=smooth, smooth_in_quant=smooth_in_quant)
    assert_same(out, ref.dual_linear(x, w, bias, smooth_scale=smooth))
    (q,) = calls("npu_dynamic_dual_level_mx_quant")
    if smooth_in_quant:  # MindIE-SD: mul_scale to the op, cast to x's dtype
        assert q["smooth_scale"] is not None and q["smooth_scale"].dtype == BF16
    else:  # SGLang: explicit multiply, smooth_scale=None
        assert q["smooth_scale"] is None
    (mm,) = calls("npu_dual_level_quant_matmul")
    assert mm["x2_nz"] and mm["x2_level0_scale"] == ((1, 24), torch.float32)
    assert mm["x2_level1_scale"] == ((24, 8, 2), torch.uint8) and mm["bias"] == ((24,), torch.float32)


# ---- msmodelslim schemes ------------------------------------------------------------

def modelslim_pair(label: str, k: int, n: int, *, smoothed=False, bias=True, smooth_in_quant=False, dtype=BF16):
    """Two identical msmodelslim layers (npu / reference), parameters set from constructed tensors."""
    prefix = "blocks.0.ffn.net.0.proj"
    desc = {"model_quant_type": label}
    inner = prefix + (".linear" if smoothed else "")
    desc[inner + ".weight"] = label
    if smoothed:
        desc[prefix + ".div.mul_scale"] = "FLOAT"
    g = torch.Generator().manual_seed(13)
    w = torch.randn(n, k, generator=g) * 0.05
    params: dict[str, torch.Tensor] = {}
    if label == "W8A8_MXFP8":
        q = F.quantize_mx(w.to(BF16), "fp8_e4m3")
        params.update(weight=q.qdata, weight_scale=q.scale)
    elif label == "W4A4_MXFP4":
        q = F.quantize_mx(w.to(BF16), "fp4_e2m1")
        params.update(weight=q.qdata, weight_scale=q.scale)
    elif label == "W4A4_MXFP4_DUALSCALE":
        q = F.quantize_mx_dual(w.to(BF16))
        params.update(weight=q.qdata, weight_scale=q.scale_l1, weight_dual_scale=q.scale_l0)
    elif label == "W8A8":
        params.update(weight=torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                      input_scale=torch.tensor([0.02]), input_offset=torch.tensor([3.0]),
                      quant_bias=torch.randint(-5000, 5000, (n,), generator=g, dtype=torch.int32),
                      deq_scale=torch.rand(n, generator=g) * 1e-4 + 1e-5)
    elif label == "W8A8_DYNAMIC":
        params.update(weight=torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                      weight_scale=torch.rand(n, 1, generator=g) * 1e-3 + 1e-4, weight_offset=torch.zeros(n, 1))
    if bias:
        params["bias"] = torch.randn(n, generator=g)
    if smoothed:
        params["mul_scale"] = torch.rand(k, generator=g) * 1.5 + 0.25
    layers = []
    for backend in ("npu", "reference"):
        cfg = get_quant_config("modelslim", description=desc, backend=backend, smooth_in_quant=smooth_in_quant)
        ql = QuantLinear(k, n, bias=bias, quant_config=cfg, prefix=prefix, params_dtype=dtype, device="cpu")
        for name, t in params.items():
            assert tuple(getattr(ql, name).shape) == tuple(t.shape), name
            setattr(ql, name, nn.Parameter(t.clone(), requires_grad=False))
        ql.process_weights_after_loading()
        layers.append(ql)
    return layers


MS_CASES = [
    ("W8A8_MXFP8", False, False), ("W8A8_MXFP8", True, False),
    ("W4A4_MXFP4", False, False), ("W4A4_MXFP4", True, False),
    ("W4A4_MXFP4_DUALSCALE", False, False), ("W4A4_MXFP4_DUALSCALE", True, False),
    ("W4A4_MXFP4_DUALSCALE", True, True),
    ("W8A8_DYNAMIC", False, False), ("W8A8_DYNAMIC", True, False),
]
_OP = {"W8A8_MXFP8": "npu_quant_matmul", "W4A4_MXFP4": "npu_quant_matmul",
       "W4A4_MXFP4_DUALSCALE": "npu_dual_level_quant_matmul", "W8A8_DYNAMIC": "npu_quant_matmul", "W8A8": "npu_quant_matmul"}


@pytest.mark.parametrize("label,smoothed,smooth_in_quant", MS_CASES)
@pytest.mark.parametrize("xshape", [(6,), (2, 3)], ids=["2d", "3d"])
def test_modelslim_schemes_equal_reference(npu, label, smoothed, smooth_in_quant, xshape):
    k, n = (1024, 40) if label == "W4A4_MXFP4_DUALSCALE" else (160, 48)
    npu_layer, ref_layer = modelslim_pair(label, k, n, smoothed=smoothed, smooth_in_quant=smooth_in_quant)
    assert npu_layer.use_mul_scale == smoothed
    fake.reset_calls()
    y = check_pair(npu_layer, ref_layer, rand(*xshape, k, seed=14))
    assert y.shape == (*xshape, n)
    assert called(_OP[label]) == 1
    if label == "W4A4_MXFP4_DUALSCALE" and smoothed:
        (q,) = calls("npu_dynamic_dual_level_mx_quant")
        wired = "smooth_in_quant" in inspect.signature(KernelBackend.dual_linear).parameters
        if smooth_in_quant and not wired:
            pytest.skip("DualMXLinearMethod does not pass smooth_in_quant to the backend yet (see mxdit/kernels/npu.py)")
        assert (q["smooth_scale"] is not None) == smooth_in_quant


@pytest.mark.parametrize("xshape", [(6,), (2, 3)], ids=["2d", "3d"])
def test_w8a8_static_equals_reference(npu, xshape):
    npu_layer, ref_layer = modelslim_pair("W8A8", 128, 32, bias=False)
    fake.reset_calls()
    check_pair(npu_layer, ref_layer, rand(*xshape, 128, seed=15))
    (q,) = calls("npu_quantize")
    assert q["zero_points"] == ((1,), torch.int8) and q["div_mode"] is True and q["out_dtype"] == torch.qint8
    (mm,) = calls("npu_quant_matmul")
    assert mm["bias"] == ((32,), torch.int32) and mm["x2"][0] == (128, 32)
    # smoothed, fp16
    npu_layer, ref_layer = modelslim_pair("W8A8", 128, 32, bias=False, smoothed=True, dtype=torch.float16)
    check_pair(npu_layer, ref_layer, rand(4, 128, seed=16, dtype=torch.float16))


def test_w8a8_static_float_bias_is_folded_into_quant_bias(npu):
    # msmodelslim folds the float bias into quant_bias; the stored bias is not added again,
    # so the NPU op path runs and changing the stored bias changes nothing.
    npu_layer, ref_layer = modelslim_pair("W8A8", 128, 32, bias=True)
    x = rand(3, 128, seed=17)
    fake.reset_calls()
    check_pair(npu_layer, ref_layer, x)
    assert called("npu_quant_matmul") == 1
    before = ref_layer(x)
    with torch.no_grad():
        ref_layer.bias.add_(100.0)
    assert torch.equal(ref_layer(x), before)


# ---- tiny Wan transformer end to end --------------------------------------------------

def test_tiny_wan_mxfp4_dual_end_to_end(npu):
    from mxdit.models.wan.transformer import WanTransformer3DModel

    cfg = dict(num_attention_heads=4, attention_head_dim=128, in_channels=4, out_channels=4, text_dim=64,
               freq_dim=32, ffn_dim=1024, num_layers=1)
    outs = []
    for backend in ("npu", "reference"):
        qc = get_quant_config("mxfp4_dual", include=["blocks.*"], backend=backend)
        model = WanTransformer3DModel(cfg, quant_config=qc, params_dtype=BF16, device="cpu")
        model.init_random_weights_(seed=0)
        quantized = 0
        for name, lin in model.quant_linears():
            lin.process_weights_after_loading()
            quantized += lin.quant_method.name != "unquantized"
        assert quantized == 10  # attn1 q/k/v/o, attn2 q/k/v/o, ffn in/out
        g = torch.Generator().manual_seed(1)
        latent = torch.randn(1, 4, 2, 4, 4, generator=g).to(BF16)
        text = torch.randn(1, 6, 64, generator=g).to(BF16)
        fake.reset_calls()
        with torch.no_grad():
            outs.append(model(latent, torch.tensor([500.0]), text).sample)
        if backend == "npu":
            assert called("npu_dual_level_quant_matmul") == 10 and called("npu_format_cast") == 10
    assert_same(outs[0], outs[1])
    assert torch.isfinite(outs[0].float()).all()


# ---- emulation: documented test vectors ----------------------------------------------

def test_emulated_dual_quant_test_vector(npu):
    """op-plugin test: bf16 all 8.0 [1, 512] -> y all 119, level0 8 * fp32(1/6), level1 all 127 [1, 8, 2]."""
    y, l0, l1 = fake.npu_dynamic_dual_level_mx_quant(torch.full((1, 512), 8.0, dtype=BF16))
    assert y.dtype == torch.uint8 and y.shape == (1, 256) and bool((y == 119).all())
    assert l0.dtype == torch.float32 and l0.shape == (1, 1)
    assert l0.item() == (torch.tensor(8.0) * torch.tensor(1 / 6, dtype=torch.float32)).item()
    assert l1.dtype == torch.uint8 and l1.shape == (1, 8, 2) and bool((l1 == 127).all())


def test_emulated_mx_quant_layouts(npu):
    y, s = fake.npu_dynamic_mx_quant(rand(4, 96), dst_type=fake.float4_e2m1fn_x2)
    assert y.dtype == torch.uint8 and y.shape == (4, 48)
    assert s.dtype == torch.uint8 and s.shape == (4, 2, 2) and bool((s[:, 1, 1] == 0).all())  # 3 blocks + pad
    y, s = fake.npu_dynamic_mx_quant(rand(2, 3, 64), dst_type=torch.float8_e4m3fn)  # a torch dtype works too
    assert y.dtype == torch.float8_e4m3fn and y.shape == (2, 3, 64) and s.shape == (2, 3, 1, 2)


def test_emulated_dtype_cast_fp8_container(npu):
    packed = F.quantize_mx(rand(8, 64), "fp4_e2m1").qdata
    container = F.fp4_to_fp8_container(packed)
    assert_same(fake.npu_dtype_cast(container, fake.float4_e2m1fn_x2), packed)
    assert torch.equal(fake.npu_dtype_cast(packed, torch.float32, input_dtype=fake.float4_e2m1fn_x2),
                       container.float())


# ---- emulation: each argument check rejects its mistake ----------------------------------

def _mx_args(fp4: bool, m=4, k=128, n=48):
    """A correct MX matmul call (SGLang / vllm-ascend), as kwargs to tweak."""
    fmt = "fp4_e2m1" if fp4 else "fp8_e4m3"
    w = F.quantize_mx(rand(n, k, seed=20), fmt)
    dst = fake.float4_e2m1fn_x2 if fp4 else fake.float8_e4m3fn
    x1, s1 = fake.npu_dynamic_mx_quant(rand(m, k, seed=21), dst_type=dst)
    pairs = F.scales_to_pairs(w.scale)
    kw = dict(x1=x1, x2=w.qdata.transpose(0, 1), scale=pairs.transpose(0, 1), scale_dtype=fake.float8_e8m0fnu,
              pertoken_scale=s1, pertoken_scale_dtype=fake.float8_e8m0fnu, bias=torch.zeros(n),
              output_dtype=BF16, group_sizes=[1, 1, 32])
    if fp4:
        kw.update(x1_dtype=fake.float4_e2m1fn_x2, x2_dtype=fake.float4_e2m1fn_x2)
    return kw, w, pairs


def _mm(kw):
    kw = dict(kw)
    return fake.npu_quant_matmul(kw.pop("x1"), kw.pop("x2"), kw.pop("scale"), **kw)


@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
def test_mx_matmul_checks(npu, fp4):
    kw, w, pairs = _mx_args(fp4)
    _mm(kw)  # the correct call passes
    bad = {
        "untransposed scale": dict(scale=pairs),
        "scale transposed but copied (layout differs from x2)": dict(scale=pairs.transpose(0, 1).contiguous()),
        "pertoken_scale flattened to [M, K/32]": dict(pertoken_scale=kw["pertoken_scale"].reshape(4, -1)),
        "scale_dtype is the fp8 id": dict(scale_dtype=fake.float8_e4m3fn),
        "pertoken_scale_dtype missing": dict(pertoken_scale_dtype=None),
        "group_sizes missing": dict(group_sizes=None),
        "group_sizes wrong": dict(group_sizes=[0, 0, 32]),
        "bf16 bias": dict(bias=torch.zeros(48, dtype=BF16)),
        "int8 output": dict(output_dtype=torch.int8),
        "3-D x1": dict(x1=kw["x1"].unsqueeze(0)),
    }
    if fp4:
        bad["x1_dtype missing"] = dict(x1_dtype=None, x2_dtype=None)
        bad["x1_dtype is the e8m0 id"] = dict(x1_dtype=fake.float8_e8m0fnu)
        bad["x2 contiguous, not the transposed view"] = dict(x2=w.qdata.transpose(0, 1).contiguous())
    else:
        bad["x2 untransposed [N, K]"] = dict(x2=w.qdata)
        bad["x1/x2 swapped"] = dict(x1=w.qdata, x2=kw["x1"].transpose(0, 1))
    for what, change in bad.items():
        with pytest.raises(fake.NPUOpError):
            _mm({**kw, **change})
            pytest.fail(f"the emulation accepted: {what}")


def test_mx_matmul_small_k_rejected(npu):
    kw, _, _ = _mx_args(False, k=64)
    with pytest.raises(fake.NPUOpError, match="K must be > 64"):
        _mm(kw)


def _dual_args(m=4, k=1024, n=40):
    w = F.quantize_mx_dual(rand(n, k, seed=30))
    x1, l0, l1 = fake.npu_dynamic_dual_level_mx_quant(rand(m, k, seed=31))
    w_nz = fake.npu_format_cast(w.qdata.view(torch.int8), 29, customize_dtype=torch.int8)
    args = [x1, w_nz, l0, w.scale_l0.transpose(0, 1).contiguous(), l1, F.scales_to_pairs(w.scale_l1)]
    return args, dict(bias=torch.zeros(n), output_dtype=BF16), w


def test_dual_matmul_checks(npu):
    args, kw, w = _dual_args()
    fake.npu_dual_level_quant_matmul(*args, **kw)  # the correct call passes

    def bad(i=None, value=None, **kwchange):
        a = list(args)
        if i is not None:
            a[i] = value
        with pytest.raises(fake.NPUOpError):
            fake.npu_dual_level_quant_matmul(*a, **{**kw, **kwchange})

    bad(0, args[0].unsqueeze(0))  # 3-D activations
    bad(1, w.qdata.view(torch.int8))  # weight not FRACTAL_NZ
    bad(1, w.qdata)  # the packed uint8 weight without the NZ cast
    bad(3, w.scale_l0)  # L0 as [N, K/512] instead of [K/512, N]
    bad(5, w.scale_l1)  # L1 flat [N, K/32] instead of pairs [N, K/64, 2]
    bad(5, F.scales_to_pairs(w.scale_l1).transpose(0, 1))  # L1 transposed like the MX matmul's scale
    a = list(args)
    a[2], a[4] = args[4], args[2]  # level0 / level1 swapped (argument order)
    with pytest.raises(fake.NPUOpError):
        fake.npu_dual_level_quant_matmul(*a, **kw)
    a = list(args)
    a[2], a[3] = args[3], args[2]  # x1 / x2 level0 swapped
    with pytest.raises(fake.NPUOpError):
        fake.npu_dual_level_quant_matmul(*a, **kw)
    bad(bias=torch.zeros(40, dtype=BF16))  # non-fp32 bias
    bad(output_dtype=torch.float32)  # fp16/bf16 only


def test_quant_op_checks(npu):
    x = rand(4, 128)
    with pytest.raises(fake.NPUOpError, match="'rint' for FP8"):
        fake.npu_dynamic_mx_quant(x, dst_type=fake.float8_e4m3fn, round_mode="round")
    with pytest.raises(fake.NPUOpError, match="round_mode"):
        fake.npu_dynamic_mx_quant(x, round_mode="nearest")
    with pytest.raises(fake.NPUOpError, match="dst_type"):
        fake.npu_dynamic_mx_quant(x, dst_type=fake.float8_e8m0fnu)
    with pytest.raises(fake.NPUOpError, match="torch_npu dtype id"):
        fake.npu_dynamic_mx_quant(x, dst_type=295)
    for bs in (48, 2048):
        with pytest.raises(fake.NPUOpError, match="block_size"):
            fake.npu_dynamic_mx_quant(x, block_size=bs)
    with pytest.raises(fake.NPUOpError, match="block_size 32"):
        fake.npu_dynamic_mx_quant(x.float(), block_size=64)
    with pytest.raises(fake.NPUOpError, match="even"):
        fake.npu_dynamic_mx_quant(rand(4, 33))
    xd = rand(2, 512)
    with pytest.raises(fake.NPUOpError, match="bfloat16 or float16"):
        fake.npu_dynamic_dual_level_mx_quant(xd.float())
    with pytest.raises(fake.NPUOpError, match="smooth_scale dtype"):
        fake.npu_dynamic_dual_level_mx_quant(xd, smooth_scale=torch.ones(512))  # fp32 mul_scale not cast
    with pytest.raises(fake.NPUOpError, match="smooth_scale must be 1-D"):
        fake.npu_dynamic_dual_level_mx_quant(xd, smooth_scale=torch.ones(1, 512, dtype=BF16))
    with pytest.raises(TypeError):  # customize_dtype is keyword-only (MindIE-SD 288f02d)
        fake.npu_format_cast(xd, 29, torch.int8)


def test_int8_op_checks(npu):
    x = rand(4, 64)
    with pytest.raises(fake.NPUOpError, match="zero_points dtype"):  # div_mode=True takes integer zero points
        fake.npu_quantize(x, torch.tensor([0.02]), torch.tensor([3.0]), torch.qint8, -1)
    with pytest.raises(fake.NPUOpError, match="zero_points dtype"):  # div_mode=False: same dtype as scales
        fake.npu_quantize(x, torch.tensor([50.0]), torch.tensor([3], dtype=torch.int8), torch.qint8, -1, False)
    with pytest.raises(fake.NPUOpError, match="last axis"):
        fake.npu_quantize(x, torch.tensor([0.02]), None, torch.qint8, 0)
    xq, xs = fake.npu_dynamic_quant(x)
    assert xq.dtype == torch.int8 and xs.shape == (4,) and xs.dtype == torch.float32
    w = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    ws = torch.rand(16)
    fake.npu_quant_matmul(xq, w.t(), ws, pertoken_scale=xs, bias=torch.zeros(16), output_dtype=BF16)
    bad = [
        dict(x2=w),  # untransposed weight [N, K]
        dict(scale=ws.reshape(16, 1)),  # weight_scale left as [N, 1]
        dict(pertoken_scale=xs.reshape(4, 1)),
        dict(output_dtype=torch.float32),
        dict(output_dtype=torch.float16, pertoken_scale=None, bias=torch.zeros(16)),  # fp16 w/o pertoken: int32 bias
        dict(scale=ws.to(BF16), output_dtype=torch.float16),
        dict(group_sizes=[1, 1, 32]),
    ]
    for change in bad:
        kw = dict(x1=xq, x2=w.t(), scale=ws, pertoken_scale=xs, bias=torch.zeros(16), output_dtype=BF16)
        kw.update(change)
        with pytest.raises(fake.NPUOpError):
            _mm(kw)


# ---- without torch_npu ------------------------------------------------------------------

@pytest.fixture
def no_torch_npu(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    if importlib.util.find_spec("torch_npu") is not None:  # a real install: hide it for this test
        monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.delitem(K._INSTANCES, "npu", raising=False)
    yield
    K._INSTANCES.pop("npu", None)


def test_without_torch_npu_clear_errors(no_torch_npu, monkeypatch):
    monkeypatch.delitem(sys.modules, "mxdit.kernels.npu", raising=False)
    npu_mod = importlib.import_module("mxdit.kernels.npu")  # imports fine without torch_npu
    with pytest.raises(RuntimeError, match=r"needs torch_npu \(pip install torch-npu"):
        npu_mod.check_npu_available()
    with pytest.raises(ImportError, match="pip install torch-npu"):
        npu_mod.NPUBackend()
    with pytest.raises(RuntimeError, match="pip install torch-npu"):
        K.get_backend("npu")
    with pytest.raises(RuntimeError, match="pip install torch-npu"):
        K.select_backend("cpu", override="npu")
    assert not npu_mod.NPUBackend.is_available(torch.device("cpu"))


def test_backend_used_after_torch_npu_went_away(npu, monkeypatch):
    be = K.get_backend("npu")
    monkeypatch.delitem(sys.modules, "torch_npu")
    if importlib.util.find_spec("torch_npu") is not None:
        monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(RuntimeError, match="pip install torch-npu"):
        be.quantize_mx(rand(2, 64), "fp4_e2m1")


def test_is_npu_device():
    from mxdit.kernels.npu import is_npu_device

    assert is_npu_device("npu") and is_npu_device("npu:3") and is_npu_device(" NPU:0")
    assert not is_npu_device("cpu") and not is_npu_device(torch.device("cpu")) and not is_npu_device(None)
    assert not is_npu_device(torch.zeros(1)) and not is_npu_device("cuda:0")
