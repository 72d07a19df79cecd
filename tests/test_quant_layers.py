"""Online quantized linear layers (issue 3): QuantLinear + the registry +
quantize_module, against an independent computation (tests/_quant_oracles.py).

For every online method ("mxfp8", "mxfp4", "mxfp4_dual" and its alias
"mxfp4_npu", "fp8"):

* the stored weight bytes equal ``mxdit.formats`` quantization of the bf16
  weight, bit for bit (fp8: our own amax/448 per-channel scale and e4m3 cast);
* the layer output equals float64 math on weights dequantized *from those
  stored bytes* by our own decoders and activations quantized as documented,
  for 2-D [M, K] and 3-D [B, L, K] inputs in bf16 / fp16 / fp32; the output
  has the input's dtype and the bias is added in fp32.
"""
from __future__ import annotations

import copy
import fnmatch
import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import numpy as np
import pytest
import torch
from torch import nn

import mxdit.formats as F
import mxdit.quant as Q
from mxdit.layers.linear import QuantLinear
from mxdit.layers.quantize import quantize_module

from _quant_oracles import (
    act_2d,
    act_dual,
    act_fp8,
    act_mx,
    as_u8,
    check_output,
    dequant_dual,
    dequant_mx,
    E4M3_LUT,
    f64,
    fp8_per_row,
    reference,
    varied_input,
    varied_weight,
)

METHODS = ("mxfp8", "mxfp4", "mxfp4_dual", "mxfp4_npu", "fp8")
CANON = {"mxfp4_npu": "mxfp4_dual"}
MX_FMT = {"mxfp8": "fp8_e4m3", "mxfp4": "fp4_e2m1"}
K, N = 1024, 48  # K a multiple of 512 (two L0 groups for the dual-level method)
PREFIX = "blocks.0.attn1.to_q"


def build(method, k=K, n=N, *, bias=True, dtype=torch.bfloat16, seed=0, prefix=PREFIX, **options):
    """QuantLinear from the registry, real weight/bias params, then process_weights_after_loading."""
    g = torch.Generator().manual_seed(seed)
    cfg = Q.get_quant_config(method, **options)
    layer = QuantLinear(k, n, bias=bias, quant_config=cfg, prefix=prefix, params_dtype=dtype)
    w = varied_weight(g, n, k, dtype)
    b = (torch.randn(n, generator=g) * 0.5).to(dtype) if bias else None
    layer.weight = nn.Parameter(w.clone(), requires_grad=False)
    if bias:
        layer.bias = nn.Parameter(b.clone(), requires_grad=False)
    layer.process_weights_after_loading()
    return layer, w, b


def weight_f64(method: str, layer) -> np.ndarray:
    """Dequantize the layer's *stored* weight bytes with our own decoders."""
    m = CANON.get(method, method)
    if m in MX_FMT:
        return dequant_mx(layer.weight, layer.weight_scale, MX_FMT[m])
    if m == "mxfp4_dual":
        return dequant_dual(layer.weight, layer.weight_scale, layer.weight_dual_scale)
    assert m == "fp8"
    return E4M3_LUT[as_u8(layer.weight)] * f64(layer.weight_scale.reshape(-1, 1))


def act_f64(method: str, x: torch.Tensor, round_mode: str = "rint") -> np.ndarray:
    m = CANON.get(method, method)
    x2 = act_2d(x)
    if m in MX_FMT:
        return act_mx(x2, MX_FMT[m], round_mode)
    if m == "mxfp4_dual":
        return act_dual(x2, round_mode)
    return act_fp8(x2)


def expected(method, layer, x, bias, round_mode="rint"):
    return reference(act_f64(method, x, round_mode), weight_f64(method, layer), bias)


def check_weight_bytes(method, layer, w_bf16, *, scale_mode="floor"):
    """Stored bytes == mxdit.formats quantization of the bf16 weight (fp8: our own)."""
    m = CANON.get(method, method)
    if m in MX_FMT:
        q = F.quantize_mx(w_bf16, MX_FMT[m], scale_mode=scale_mode, round_mode="rint")
        want_dtype = torch.float8_e4m3fn if m == "mxfp8" else torch.uint8
        assert layer.weight.dtype == want_dtype
        assert tuple(layer.weight.shape) == ((N, K) if m == "mxfp8" else (N, K // 2))
        assert layer.weight_scale.dtype == torch.uint8 and tuple(layer.weight_scale.shape) == (N, K // 32)
        assert np.array_equal(as_u8(layer.weight), as_u8(q.qdata))
        assert np.array_equal(as_u8(layer.weight_scale), as_u8(q.scale))
    elif m == "mxfp4_dual":
        q = F.quantize_mx_dual(w_bf16, round_mode="rint")
        assert layer.weight.dtype == torch.uint8 and tuple(layer.weight.shape) == (N, K // 2)
        assert layer.weight_scale.dtype == torch.uint8 and tuple(layer.weight_scale.shape) == (N, K // 32)
        assert layer.weight_dual_scale.dtype == torch.float32
        assert tuple(layer.weight_dual_scale.shape) == (N, K // 512)
        assert np.array_equal(as_u8(layer.weight), as_u8(q.qdata))
        assert np.array_equal(as_u8(layer.weight_scale), as_u8(q.scale_l1))
        assert np.array_equal(layer.weight_dual_scale.numpy().view(np.uint32), q.scale_l0.numpy().view(np.uint32))
    else:  # fp8: per-output-channel scale = amax / 448, elements RNE e4m3
        _, scale, qbytes = fp8_per_row(w_bf16.float().numpy())
        assert layer.weight.dtype == torch.float8_e4m3fn and tuple(layer.weight.shape) == (N, K)
        assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.numel() == N
        assert np.array_equal(layer.weight_scale.reshape(-1).numpy().view(np.uint32), scale.reshape(-1).view(np.uint32))
        assert np.array_equal(as_u8(layer.weight), qbytes)


def sanity_dequant_close(method, layer, w):
    """The stored weight represents the original (guards the decoders too)."""
    wd = weight_f64(method, layer)
    w64 = w.double().numpy()
    rel = np.linalg.norm(wd - w64) / np.linalg.norm(w64)
    assert rel < {"mxfp8": 0.05, "fp8": 0.05}.get(CANON.get(method, method), 0.15), rel


# ---- outputs ---------------------------------------------------------------

INPUTS = [
    ("2d-bf16", (12, K), torch.bfloat16),
    ("3d-bf16", (2, 5, K), torch.bfloat16),
    ("3d-fp32", (2, 4, K), torch.float32),
    ("2d-fp16", (7, K), torch.float16),
]


@pytest.mark.parametrize("method", METHODS)
def test_online_layer_matches_independent(method):
    layer, w, b = build(method)
    check_weight_bytes(method, layer, w)
    sanity_dequant_close(method, layer, w)
    assert layer.bias.dtype == torch.float32, "bias must be kept in fp32"
    assert torch.equal(layer.bias, b.float())
    g = torch.Generator().manual_seed(1)
    for label, shape, dtype in INPUTS:
        x = varied_input(g, shape, dtype)
        out = layer(x)
        assert out.dtype == dtype, (label, out.dtype)
        assert tuple(out.shape) == (*shape[:-1], N), (label, out.shape)
        ref, absdot = expected(method, layer, x, layer.bias)
        check_output(out, ref, absdot, what=f"{method} {label}")


@pytest.mark.parametrize("method", METHODS)
def test_online_via_quantize_module(method):
    """quantize_module on an nn.Linear gives the same storage and output."""
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(K, N, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(varied_weight(g, N, K))
        lin.bias.copy_(torch.randn(N, generator=g).to(torch.bfloat16))
    w = lin.weight.detach().clone()
    b = lin.bias.detach().clone()
    holder = nn.Sequential(lin)
    summary = quantize_module(holder, method, include=["*"])
    layer = holder[0]
    assert isinstance(layer, QuantLinear) and summary.layers == ["0"]
    check_weight_bytes(method, layer, w)
    assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, b.float())
    for shape, dtype in (((9, K), torch.bfloat16), ((3, 3, K), torch.float32)):
        x = varied_input(g, shape, dtype)
        out = layer(x)
        assert out.dtype == dtype and tuple(out.shape) == (*shape[:-1], N)
        ref, absdot = expected(method, layer, x, layer.bias)
        check_output(out, ref, absdot, what=f"quantize_module {method} {shape} {dtype}")


@pytest.mark.parametrize("method", ("mxfp8", "mxfp4", "mxfp4_dual", "fp8"))
def test_fp32_params_quantize_the_bf16_weight(method):
    """With fp32 parameters, MX methods quantize the bf16-rounded weight (the NPU ops take bf16)."""
    layer, w, b = build(method, dtype=torch.float32, seed=5)
    if method == "fp8":
        # the fp8 method's per-channel rule is applied to the weight as given
        _, scale, qbytes = fp8_per_row(w.numpy())
        assert np.array_equal(layer.weight_scale.reshape(-1).numpy().view(np.uint32), scale.reshape(-1).view(np.uint32))
        assert np.array_equal(as_u8(layer.weight), qbytes)
    else:
        check_weight_bytes(method, layer, w.to(torch.bfloat16))
    x = varied_input(torch.Generator().manual_seed(6), (2, 3, K), torch.float32)
    out = layer(x)
    assert out.dtype == torch.float32
    ref, absdot = expected(method, layer, x, layer.bias)
    check_output(out, ref, absdot, what=f"{method} fp32 params")


def test_fp8_weight_scale_is_amax_over_448():
    layer, w, _ = build("fp8")
    amax = w.float().abs().amax(dim=1)
    assert torch.equal(layer.weight_scale.reshape(-1), amax / 448.0)
    # each row's largest element maps to exactly +-448
    q = layer.weight.float().abs().amax(dim=1)
    assert torch.all(q == 448.0)


@pytest.mark.parametrize("method", METHODS)
def test_no_bias(method):
    layer, _, _ = build(method, bias=False, seed=7)
    assert layer.bias is None
    x = varied_input(torch.Generator().manual_seed(8), (6, K), torch.bfloat16)
    out = layer(x)
    ref, absdot = expected(method, layer, x, None)
    check_output(out, ref, absdot, what=f"{method} no bias")


@pytest.mark.parametrize("method", METHODS)
def test_bias_added_in_fp32(method):
    """A zero input gives exactly the fp32 bias: a bias rounded to bf16 (or added in
    bf16) would lose the 2^-20 part of every element."""
    g = torch.Generator().manual_seed(9)
    cfg = Q.get_quant_config(method)
    layer = QuantLinear(K, N, bias=True, quant_config=cfg, prefix=PREFIX, params_dtype=torch.float32)
    layer.weight = nn.Parameter(varied_weight(g, N, K, torch.float32), requires_grad=False)
    b = (torch.randn(N, generator=g).sign() * (1.0 + 2.0**-20)) * torch.exp2(torch.randint(-3, 4, (N,), generator=g).float())
    layer.bias = nn.Parameter(b.clone(), requires_grad=False)
    layer.process_weights_after_loading()
    assert layer.bias.dtype == torch.float32
    for x in (torch.zeros(3, K), torch.zeros(2, 2, K)):
        out = layer(x)
        assert out.dtype == torch.float32
        assert torch.equal(out.reshape(-1, N), b.expand(out.reshape(-1, N).shape)), method
    # and in a bf16 model the bias is still added before the one final rounding
    out = layer(torch.zeros(4, K, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.equal(out, b.to(torch.bfloat16).expand(4, N))


# ---- registry options --------------------------------------------------------

@pytest.mark.parametrize("method", ("mxfp8", "mxfp4", "mxfp4_dual", "mxfp4_npu"))
def test_act_round_mode_round(method):
    """act_round_mode="round" rounds activation elements half away from zero
    (mxdit.formats with round_mode="round"); ties are frequent with bf16 inputs,
    so the output differs from the default "rint" layer."""
    rint_layer, _, _ = build(method, seed=11)
    round_layer, _, _ = build(method, seed=11, act_round_mode="round")
    assert np.array_equal(as_u8(rint_layer.weight), as_u8(round_layer.weight)), "weights are always rint"
    x = varied_input(torch.Generator().manual_seed(12), (2, 8, K), torch.bfloat16)
    out = round_layer(x)
    ref, absdot = expected(method, round_layer, x, round_layer.bias, round_mode="round")
    check_output(out, ref, absdot, what=f"{method} act_round_mode=round")
    ref_rint, _ = expected(method, round_layer, x, round_layer.bias, round_mode="rint")
    assert np.abs(ref - ref_rint).max() > 0, "test inputs should contain rounding ties"
    assert not torch.equal(out, rint_layer(x)), "act_round_mode='round' had no effect"


@pytest.mark.parametrize("method", ("mxfp8", "mxfp4"))
def test_scale_mode_rceil_for_weights(method):
    layer, w, _ = build(method, seed=13, scale_mode="rceil")
    check_weight_bytes(method, layer, w, scale_mode="rceil")
    x = varied_input(torch.Generator().manual_seed(14), (5, K), torch.bfloat16)
    ref, absdot = expected(method, layer, x, layer.bias)  # activations keep the floor rule
    check_output(layer(x), ref, absdot, what=f"{method} rceil weights")


def test_alias_mxfp4_npu_is_mxfp4_dual():
    assert Q.canonical_name("mxfp4_npu") == "mxfp4_dual"
    assert Q.get_quant_config("mxfp4_npu").name == "mxfp4_dual"
    a, _, _ = build("mxfp4_npu", seed=15)
    b, _, _ = build("mxfp4_dual", seed=15)
    for n in ("weight", "weight_scale", "weight_dual_scale", "bias"):
        pa, pb = getattr(a, n), getattr(b, n)
        assert pa.dtype == pb.dtype and torch.equal(pa, pb), n
    x = varied_input(torch.Generator().manual_seed(16), (4, K))
    assert torch.equal(a(x), b(x))


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError) as ei:
        Q.get_quant_config("mxfp6")
    msg = str(ei.value)
    assert "mxfp6" in msg
    for name in ("mxfp8", "mxfp4", "mxfp4_dual", "mxfp4_npu", "fp8", "modelslim"):
        assert f"'{name}'" in msg, (name, msg)
    assert set(Q.available_quant_methods()) >= {"mxfp8", "mxfp4", "mxfp4_dual", "mxfp4_npu", "fp8", "modelslim"}


@pytest.mark.parametrize(
    "options, quantized",
    [
        (dict(include=["blocks.*.attn1.*"]), lambda p: ".attn1." in p),
        (dict(ignore=["*.attn2.*", "*.ffn.net.2"]), lambda p: ".attn2." not in p and not p.endswith("ffn.net.2")),
        (dict(include=["blocks.0.*"], ignore=["*to_out*"]), lambda p: p.startswith("blocks.0.") and "to_out" not in p),
    ],
)
def test_include_ignore_globs_on_prefixes(options, quantized):
    cfg = Q.get_quant_config("mxfp8", **options)
    for p in [f"blocks.{i}.{s}" for i in (0, 1) for s in BLOCK_LINEARS]:
        layer = QuantLinear(512, 64, bias=True, quant_config=cfg, prefix=p, device="meta")
        want = quantized(p)
        assert (layer.quant_method.name != "unquantized") == want, (options, p)
        if not want:
            assert layer.weight.dtype == torch.get_default_dtype()


# ---- errors ------------------------------------------------------------------

@pytest.mark.parametrize("method, k", [("mxfp8", 48), ("mxfp4", 80), ("mxfp4_dual", 768), ("mxfp4_npu", 256)])
def test_k_not_multiple_of_block_size(method, k):
    prefix = "blocks.3.ffn.net.2"
    with pytest.raises(ValueError) as ei:
        QuantLinear(k, 64, quant_config=Q.get_quant_config(method), prefix=prefix, device="meta")
    msg = str(ei.value)
    assert prefix in msg and str(k) in msg, msg


@pytest.mark.parametrize("method", ("mxfp8", "mxfp4", "mxfp4_dual", "fp8"))
@pytest.mark.parametrize("bad", (float("inf"), float("nan")))
def test_non_finite_weight_names_the_layer(method, bad):
    prefix = "blocks.7.attn2.to_v"
    layer = QuantLinear(512, 32, quant_config=Q.get_quant_config(method), prefix=prefix, params_dtype=torch.bfloat16)
    w = torch.randn(32, 512, dtype=torch.bfloat16)
    w[5, 100] = bad
    layer.weight = nn.Parameter(w, requires_grad=False)
    layer.bias = nn.Parameter(torch.zeros(32, dtype=torch.bfloat16), requires_grad=False)
    with pytest.raises(ValueError) as ei:
        layer.process_weights_after_loading()
    assert prefix in str(ei.value) and ("finite" in str(ei.value)), str(ei.value)


def test_quantize_module_non_finite_names_the_layer():
    m = nn.Module()
    m.ffn = _FFN(64, 128).to(torch.bfloat16)
    with torch.no_grad():
        m.ffn.net[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"ffn\.net\.2"):
        quantize_module(m, "mxfp4", include=["*"])


# ---- quantize_module on a Wan-block-shaped module ------------------------------

BLOCK_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
)


#: layers whose bytes and outputs test_quantize_module_wan_block recomputes (the summary covers all)
FORWARD_CHECKED = ("attn1.to_q", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


class _Attn(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim)


class _Proj(nn.Module):
    def __init__(self, dim, ffn):
        super().__init__()
        self.proj = nn.Linear(dim, ffn)


class _FFN(nn.Module):
    def __init__(self, dim, ffn):
        super().__init__()
        self.net = nn.ModuleList([_Proj(dim, ffn), nn.Identity(), nn.Linear(ffn, dim)])


class WanBlockLike(nn.Module):
    """The linear layout of a diffusers WanTransformerBlock at a small width (bf16)."""

    def __init__(self, dim=512, ffn=1024):
        super().__init__()
        self.attn1 = _Attn(dim)
        self.attn2 = _Attn(dim)
        self.ffn = _FFN(dim, ffn)
        self.norm2 = nn.LayerNorm(dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim))
        g = torch.Generator().manual_seed(21)
        with torch.no_grad():
            for _, lin in self.named_linears():
                lin.weight.copy_(varied_weight(g, lin.out_features, lin.in_features, torch.float32))
                lin.bias.copy_(torch.randn(lin.out_features, generator=g) * 0.1)
        self.to(torch.bfloat16)

    _cache = None

    @classmethod
    def fresh(cls) -> "WanBlockLike":
        """A copy of one block built once per session (building it is the slow part)."""
        if cls._cache is None:
            cls._cache = cls(dim=512, ffn=1024)
        return copy.deepcopy(cls._cache)

    def named_linears(self):
        return [(n, m) for n, m in self.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize(
    "method, bits",
    [("mxfp4", 4.25), ("mxfp4_dual", 4.3125), ("mxfp8", 8.25), ("fp8", None)],
)
def test_quantize_module_wan_block(method, bits):
    m = WanBlockLike.fresh()
    originals = {n: (lin.weight.detach().clone(), lin.bias.detach().clone()) for n, lin in m.named_linears()}
    assert sorted(originals) == sorted(BLOCK_LINEARS)
    summary = quantize_module(m, method, include=["*"])
    assert sorted(summary.layers) == sorted(BLOCK_LINEARS) and summary.skipped == []
    assert summary.method == CANON.get(method, method)
    n_weights = sum(w.numel() for w, _ in originals.values())
    assert summary.weight_elements == n_weights
    assert summary.bytes_before == 2 * n_weights  # bf16
    # bytes after = weights + scales of the quantized layers (bias excluded), from the shapes
    want_after = 0
    for w, _ in originals.values():
        n, k = w.shape
        m_ = CANON.get(method, method)
        want_after += {
            "mxfp8": n * k + n * k // 32,
            "mxfp4": n * k // 2 + n * k // 32,
            "mxfp4_dual": n * k // 2 + n * k // 32 + 4 * n * k // 512,
            "fp8": n * k + 4 * n,
        }[m_]
    assert summary.bytes_after == want_after
    if bits is not None:
        assert summary.bits_per_weight == pytest.approx(bits, abs=1e-9)
    else:  # fp8: 8 bits + one fp32 scale per output channel
        assert 8.0 < summary.bits_per_weight < 8.1
    assert f"{summary.bits_per_weight:.3f}" in str(summary)
    # every linear was replaced in place; non-linear parameters untouched
    g = torch.Generator().manual_seed(22)
    for name in BLOCK_LINEARS:
        layer = m.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.prefix == name
        assert layer.weight.dtype == {"mxfp8": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn}.get(
            CANON.get(method, method), torch.uint8)
        if name not in FORWARD_CHECKED:
            continue
        w, b = originals[name]
        wq = layer.weight
        # bytes of the stored weight == formats quantization of the original bf16 weight
        if CANON.get(method, method) in MX_FMT:
            q = F.quantize_mx(w, MX_FMT[CANON.get(method, method)])
            assert np.array_equal(as_u8(wq), as_u8(q.qdata)) and np.array_equal(as_u8(layer.weight_scale), as_u8(q.scale))
        elif CANON.get(method, method) == "mxfp4_dual":
            q = F.quantize_mx_dual(w)
            assert np.array_equal(as_u8(wq), as_u8(q.qdata)) and torch.equal(layer.weight_dual_scale, q.scale_l0)
        else:
            _, _, qbytes = fp8_per_row(w.float().numpy())
            assert np.array_equal(as_u8(wq), qbytes)
        x = varied_input(g, (2, 3, layer.in_features), torch.bfloat16)
        out = layer(x)
        ref, absdot = expected(method, layer, x, b.float())
        check_output(out, ref, absdot, what=f"quantize_module {method} {name}")
    assert isinstance(m.attn1.norm_q, nn.RMSNorm) and m.scale_shift_table.dtype == torch.bfloat16


def test_quantize_module_include_ignore_and_idempotent():
    m = WanBlockLike.fresh()
    s = quantize_module(m, "mxfp8", ignore=["attn2.*"], include=["attn*", "ffn.*"])
    assert sorted(s.skipped) == sorted(n for n in BLOCK_LINEARS if n.startswith("attn2."))
    assert sorted(s.layers) == sorted(n for n in BLOCK_LINEARS if not n.startswith("attn2."))
    for n in BLOCK_LINEARS:
        assert isinstance(m.get_submodule(n), QuantLinear if not n.startswith("attn2.") else nn.Linear), n
    # a second call does not re-quantize what is already quantized
    s2 = quantize_module(m, "mxfp8", ignore=["attn2.*"], include=["*"])
    assert s2.layers == [] and s2.bytes_after == 0
    # include alone
    m2 = WanBlockLike.fresh()
    s3 = quantize_module(m2, "mxfp4", include=["ffn.*"])
    assert sorted(s3.layers) == ["ffn.net.0.proj", "ffn.net.2"]
    assert all(fnmatch.fnmatchcase(n, "attn*") for n in s3.skipped) and len(s3.skipped) == 8
