"""msmodelslim W4A4_DYNAMIC (int4 weights per channel, int4 activations per token).

* the activation quantization against the npu_dynamic_quant(dst_type=quint4x2) formula written
  here in plain numpy (scale = rowMax|x| / 7, round half to even), ties included;
* a W4A4_DYNAMIC layer (reference backend, plain and smoothed) against a plain-math int4 oracle:
  quantize W and x, integer matmul, dequantize;
* the NPU backend under the emulated torch_npu: SGLang's calls (npu_convert_weight_to_int4pack of
  W^T as int32, npu_dynamic_quant(dst_type=quint4x2), npu_quant_matmul) with their layouts, equal
  to the reference bit for bit; each emulated argument check; the reference fallback;
* loader errors (dtype, int4 range, asymmetric weight_offset).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import fake_torch_npu as fake
from mxdit.kernels.base import quantize_int4_per_token
from mxdit.layers.linear import QuantLinear
from mxdit.quant.schemes import int4_weight_loader
from mxdit.quant.registry import get_quant_config

BF16 = torch.bfloat16
PREFIX = "blocks.0.attn1.to_q"




def oracle_act(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """npu_dynamic_quant int4: scale = rowMax(|x|) / 7 (fp32), q = round(x / scale) (half to even)."""
    x = x.astype(np.float32)
    scale = (np.abs(x).max(axis=-1, keepdims=True) / np.float32(7.0)).astype(np.float32)
    return np.rint(x / scale).astype(np.int64), scale


def int4_weights(n, k, seed=0):
    """A float weight quantized symmetric per channel to int4 (ws = amax / 7): (w_q int8, ws fp32 [N, 1])."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    ws = w.abs().amax(dim=1, keepdim=True) / 7
    wq = torch.round(w / ws).clamp(-8, 7).to(torch.int8)
    return wq, ws


def make_layer(n, k, *, backend="reference", bias=True, smoothed=False, seed=0, **edit):
    desc = {"model_quant_type": "W4A4_DYNAMIC", (PREFIX + (".linear" if smoothed else "")) + ".weight": "W4A4_DYNAMIC"}
    if smoothed:
        desc[PREFIX + ".div.mul_scale"] = "FLOAT"
    wq, ws = int4_weights(n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    params = dict(weight=wq, weight_scale=ws, weight_offset=torch.zeros(n, 1))
    if bias:
        params["bias"] = torch.randn(n, generator=g)
    if smoothed:
        params["mul_scale"] = torch.rand(k, generator=g) * 1.5 + 0.25
    params.update(edit)
    cfg = get_quant_config("modelslim", description=desc, backend=backend)
    ql = QuantLinear(k, n, bias=bias, quant_config=cfg, prefix=PREFIX, params_dtype=BF16, device="cpu")
    for name, t in params.items():
        assert tuple(getattr(ql, name).shape) == tuple(t.shape), name
        setattr(ql, name, nn.Parameter(t.clone(), requires_grad=False))
    ql.process_weights_after_loading()
    return ql, params


def test_activation_quant_formula_and_ties():
    # scale = 7/7 = 1: 3.5 -> 4, 2.5 -> 2, -0.5 -> -0, 1.5 -> 2 (half to even); a zero row stays 0
    x = torch.tensor([[7.0, 3.5, 2.5, -0.5, 1.5, -7.0, 0.25, 6.5], [0.0] * 8])
    q, s = quantize_int4_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (2, 1)
    assert q[0].tolist() == [7, 4, 2, 0, 2, -7, 0, 6] and q[1].tolist() == [0] * 8
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 96, generator=g) * torch.logspace(-3, 2, 64).unsqueeze(1)).to(BF16)
    q, s = quantize_int4_per_token(x)
    oq, os_ = oracle_act(x.float().numpy())
    assert np.array_equal(q.numpy().astype(np.int64), oq) and np.array_equal(s.numpy(), os_)
    assert int(q.abs().max()) == 7


def oracle_linear(params, x: torch.Tensor, smoothed: bool) -> np.ndarray:
    xs = x.to(BF16)
    if smoothed:
        xs = xs * params["mul_scale"].to(BF16)  # multiplied in the activation dtype, then quantized
    q, s = oracle_act(xs.float().numpy())
    acc = q @ params["weight"].numpy().astype(np.int64).T  # exact integer matmul
    out = acc.astype(np.float64) * s.astype(np.float64) * params["weight_scale"].numpy().astype(np.float64).T
    if "bias" in params:
        out = out + params["bias"].numpy().astype(np.float64)
    return out


@pytest.mark.parametrize("smoothed", [False, True], ids=["plain", "smoothed"])
def test_layer_against_int4_oracle(smoothed):
    n, k = 48, 160
    layer, params = make_layer(n, k, smoothed=smoothed)
    assert layer.quant_method.name == "W4A4_DYNAMIC"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, k, generator=g).to(BF16).float()  # fp32 in: fp32 out, bf16-exact activations
    y = layer(x)
    assert y.shape == (2, 3, n) and y.dtype == torch.float32
    want = oracle_linear(params, x.reshape(-1, k), smoothed).reshape(2, 3, n)
    np.testing.assert_allclose(y.double().numpy(), want, rtol=2e-6, atol=1e-6 * np.abs(want).max())
    # and it approximates the float layer (int4 error, not garbage)
    wf = params["weight"].float() * params["weight_scale"]
    xf = x * params["mul_scale"] if smoothed else x
    ref = xf @ wf.T + params["bias"]
    rel = float((y - ref).norm() / ref.norm())
    assert rel < 0.2, rel


def test_npu_calls_and_equality(npu):
    n, k = 48, 160
    fake.reset_calls()
    npu_layer, params = make_layer(n, k, backend="npu")
    ref_layer, _ = make_layer(n, k, backend="reference")
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(9)).to(BF16)
    y = npu_layer(x)
    assert torch.equal(y, ref_layer(x)) and y.dtype == BF16
    calls = {}
    for name, kw in fake.CALLS:
        calls.setdefault(name, []).append(kw)
    (pack,) = calls["npu_convert_weight_to_int4pack"]
    assert pack == dict(shape=(k, n), dtype=torch.int32, contiguous=True, inner_k_tiles=0)  # W^T as int32
    (dq,) = calls["npu_dynamic_quant"]
    assert dq["dst_type"] == torch.quint4x2 and dq["shape"] == (7, k)
    (mm,) = calls["npu_quant_matmul"]
    assert mm["x1"] == ((7, k // 8), torch.int32)
    assert mm["x2"][:2] == ((k, n // 8), torch.int32)
    assert mm["scale"] == ((n,), torch.float32) and mm["pertoken_scale"] == ((7,), torch.float32)
    assert mm["bias"] == ((n,), torch.float32) and mm["output_dtype"] == BF16
    assert mm["x1_dtype"] is None and mm["group_sizes"] is None


def test_npu_fallback_when_not_8_aligned(npu):
    n, k = 44, 160  # N % 8 != 0: the int4 pack cannot take W^T [K, N]
    npu_layer, _ = make_layer(n, k, backend="npu")
    ref_layer, _ = make_layer(n, k, backend="reference")
    fake.reset_calls()
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2)).to(BF16)
    assert torch.equal(npu_layer(x), ref_layer(x))
    assert not [c for c, _ in fake.CALLS if c == "npu_quant_matmul"]


def test_pack_roundtrip():
    v = torch.arange(-8, 8, dtype=torch.int32).repeat(3, 2)
    p = fake.npu_convert_weight_to_int4pack(v.contiguous())
    assert p.dtype == torch.int32 and p.shape == (3, 4)
    assert torch.equal(fake._unpack_int4(p).to(torch.int32), v)


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.zeros(16, 8, dtype=torch.int8), "must be int32"),
    (lambda: torch.zeros(8, 16, dtype=torch.int32).t(), "contiguous"),
    (lambda: torch.zeros(8, 12, dtype=torch.int32), "multiple of 8"),
    (lambda: torch.full((8, 8), 9, dtype=torch.int32), r"\[-8, 7\]"),
    (lambda: torch.zeros(8, dtype=torch.int32), "2-D"),
])
def test_pack_checks(bad, match):
    with pytest.raises(fake.NPUOpError, match=match):
        fake.npu_convert_weight_to_int4pack(bad())


def test_dynamic_quant_int4_checks():
    with pytest.raises(fake.NPUOpError, match="multiple of 8"):
        fake.npu_dynamic_quant(torch.zeros(2, 12, dtype=BF16), dst_type=torch.quint4x2)
    with pytest.raises(fake.NPUOpError, match="float16 or bfloat16"):
        fake.npu_dynamic_quant(torch.zeros(2, 16), dst_type=torch.quint4x2)


def test_quant_matmul_int4_checks():
    x1 = fake._pack_int4(torch.zeros(4, 32, dtype=torch.int8))
    w = fake._pack_int4(torch.zeros(32, 16, dtype=torch.int8))  # [K, N/8]
    ok = dict(pertoken_scale=torch.ones(4), output_dtype=BF16)
    assert fake.npu_quant_matmul(x1, w, torch.ones(16), **ok).shape == (4, 16)
    with pytest.raises(fake.NPUOpError, match=r"\[K, N/8\]"):  # W itself packed [N, K/8]: forgot the transpose
        fake.npu_quant_matmul(x1, fake._pack_int4(torch.zeros(16, 32, dtype=torch.int8)), torch.ones(16), **ok)
    with pytest.raises(fake.NPUOpError, match="both be int32"):
        fake.npu_quant_matmul(torch.zeros(4, 32, dtype=torch.int8), w, torch.ones(16), **ok)
    with pytest.raises(fake.NPUOpError, match="pertoken_scale"):
        fake.npu_quant_matmul(x1, w, torch.ones(16), pertoken_scale=torch.ones(4, 1), output_dtype=BF16)
    with pytest.raises(fake.NPUOpError, match="scale must be 1-D"):
        fake.npu_quant_matmul(x1, w, torch.ones(16, 1), **ok)


def test_loader_errors():
    p = torch.empty(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"'L.weight'.*must be int8"):
        int4_weight_loader(p, torch.zeros(4, 8, dtype=torch.float16), name="L.weight")
    with pytest.raises(ValueError, match=r"'L.weight'.*\[-8, 7\].*\[-9, -9\]"):
        int4_weight_loader(p, torch.full((4, 8), -9, dtype=torch.int8), name="L.weight")
    with pytest.raises(ValueError, match=r"'L.weight'.*shape"):
        int4_weight_loader(p, torch.zeros(4, 9, dtype=torch.int8), name="L.weight")
    with pytest.raises(ValueError, match=f"'{PREFIX}'.*weight_offset"):
        make_layer(8, 16, weight_offset=torch.full((8, 1), 1.0))


# ---- the exporter: mxdit quantize --recipe all-int4, loaded back ---------------------------------
def test_export_and_load(tmp_path):
    from safetensors.torch import load_file

    from mxdit import load_transformer
    from mxdit.tools.quantize import QuantizeOptions, quantize_model
    from test_quantize_tool import _diffusers_tiny

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sd = _diffusers_tiny(tmp_path / "tiny", layers=1)
        out = tmp_path / "int4"
        quantize_model(str(tmp_path / "tiny"), str(out), QuantizeOptions(
            recipe="all-int4", layout="mindie", progress=False, report_plot=False), log=lambda m: None)
        with open(out / "quant_model_description_w4a4_dynamic.json") as f:
            desc = json.load(f)
        t = load_file(str(out / "quant_model_weight_w4a4_dynamic.safetensors"))
        assert desc["model_quant_type"] == "W4A4_DYNAMIC"
        report = (out / "quality_report.md").read_text()
        assert "| W4A4_DYNAMIC | 10 |" in report  # the summary row of the 10 block linears
        p = "blocks.0.self_attn.q"
        w_src = sd["blocks.0.attn1.to_q.weight"]
        n, k = w_src.shape
        got = {s: (t[f"{p}.{s}"].dtype, tuple(t[f"{p}.{s}"].shape), desc[f"{p}.{s}"])
               for s in ("weight", "weight_scale", "weight_offset", "bias")}
        assert got == {"weight": (torch.int8, (n, k), "W4A4_DYNAMIC"),
                       "weight_scale": (torch.float32, (n, 1), "W4A4_DYNAMIC"),
                       "weight_offset": (torch.float32, (n, 1), "W4A4_DYNAMIC"),
                       "bias": (torch.float32, (n,), "FLOAT")}
        # symmetric min-max per channel, in plain numpy
        wf = w_src.float().numpy()
        ws = (np.abs(wf).max(axis=1, keepdims=True) / np.float32(7)).astype(np.float32)
        assert np.array_equal(t[p + ".weight"].numpy(), np.clip(np.rint(wf / ws), -8, 7).astype(np.int8))
        assert np.array_equal(t[p + ".weight_scale"].numpy(), ws) and not t[p + ".weight_offset"].any()

        model = load_transformer(str(out), progress=False, dtype=torch.bfloat16)
        layer = model.get_submodule("blocks.0.attn1.to_q")
        assert layer.quant_method.name == "W4A4_DYNAMIC"
        x = torch.randn(5, k, generator=torch.Generator().manual_seed(4)).to(BF16).float()
        params = {"weight": t[p + ".weight"], "weight_scale": t[p + ".weight_scale"], "bias": t[p + ".bias"]}
        want = oracle_linear(params, x, False)
        np.testing.assert_allclose(layer(x).double().numpy(), want, rtol=2e-6, atol=1e-6 * np.abs(want).max())
    finally:
        torch.set_num_threads(n_threads)
