"""`mxdit quantize` writing msmodelslim W8A8F8 / W4A4F8 exports (recipes with attention directives).

* the built-in recipes reproduce msmodelslim's published Wan2.2 w8a8f8 / w4a4f8 layer and attention split;
* the export holds ``<attn>.q_rot`` / ``<attn>.k_rot`` (label FLOAT, bf16 [D, D]) equal to a random
  Hadamard built here from plain math (signs from torch.manual_seed(1234), Sylvester H / sqrt(D)),
  orthogonal, the same for q and k and every block, byte-identical across runs; and
  ``<attn>.quant_type = "FP8_DYNAMIC"`` description entries exactly where the recipe asks;
* the diffusers layout names them on ``blocks.N.attn1``; cross-attention directives are refused;
* ``load_transformer`` on the export: see test_load_transformer.
"""
from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch

from mxdit.tools.quantize import QuantizeError, QuantizeOptions, quantize_model
from mxdit.tools.recipes import Recipe, RecipeError
from test_quantize_tool import HEADS, DIM, _diffusers_tiny

D = DIM // HEADS  # 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("f8")
    _diffusers_tiny(root / "tiny", layers=2)
    yield root
    torch.set_num_threads(n)


def export(root, name, recipe, layout="mindie"):
    out = root / name
    if not out.exists():
        quantize_model(str(root / "tiny"), str(out), QuantizeOptions(
            recipe=recipe, layout=layout, progress=False, report_plot=False), log=lambda m: None)
    (desc_path,) = glob.glob(str(out / "quant_model_description*.json"))
    with open(desc_path) as f:
        desc = json.load(f)
    from safetensors.torch import load_file

    tensors = {}
    for p in sorted(glob.glob(str(out / "*.safetensors"))):
        tensors.update(load_file(p))
    return out, desc, tensors


def hadamard_oracle(n: int, seed: int = 1234) -> torch.Tensor:
    """diag(s) @ H_n / sqrt(n): s = 2 * randint(0, 2, (n,)) - 1 after torch.manual_seed(seed); H_n Sylvester."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (s.unsqueeze(1) * h / math.sqrt(n)).to(torch.bfloat16)


def test_builtin_recipes_match_msmodelslim_split():
    linears = [f"blocks.{b}.{s}" for b in range(8) for s in ("self_attn.q", "cross_attn.o", "ffn.0")]
    attn = [f"blocks.{b}.{a}" for b in range(8) for a in ("self_attn", "cross_attn")]
    w8 = Recipe.load("msmodelslim-wan2.2-w8a8f8")
    assert set(w8.assign(linears).schemes.values()) == {"W8A8_MXFP8"}
    p = w8.attention_plan(attn)
    assert set(p.rotation) == set(p.quant_type) == {f"blocks.{b}.self_attn" for b in range(8)}
    assert all(p.rotation.values()) and set(p.quant_type.values()) == {"FP8_DYNAMIC"}
    w4 = Recipe.load("msmodelslim-wan2.2-w4a4f8")
    sch = w4.assign(linears).schemes
    assert all(sch[l] == ("W8A8_MXFP8" if int(l.split(".")[1]) <= 4 else "W4A4_MXFP4") for l in linears)
    p = w4.attention_plan(attn)
    assert all(p.rotation.values())
    assert p.quant_type == {f"blocks.{b}.self_attn": (None if b == 0 else "FP8_DYNAMIC") for b in range(8)}


def test_w4a4f8_export_rotations_and_descriptions(tiny):
    out, desc, t = export(tiny, "w4a4f8", "msmodelslim-wan2.2-w4a4f8")
    want = hadamard_oracle(D)
    for b in (0, 1):
        for r in ("q_rot", "k_rot"):
            name = f"blocks.{b}.self_attn.{r}"
            assert desc[name] == "FLOAT"
            assert t[name].dtype == torch.bfloat16 and t[name].shape == (D, D)
            assert torch.equal(t[name], want), name
    r = t["blocks.0.self_attn.q_rot"].double()
    assert torch.allclose(r @ r.T, torch.eye(D, dtype=torch.float64), atol=1e-2)  # orthogonal up to bf16
    qt = {k: v for k, v in desc.items() if k.endswith(".quant_type")}
    assert qt == {"blocks.1.self_attn.quant_type": "FP8_DYNAMIC"}  # FA3 excludes blocks.0
    assert not any("cross_attn" in k and ("rot" in k or "quant_type" in k) for k in desc)
    assert not any(k not in t for k, v in desc.items() if v == "FLOAT"), "every FLOAT label has its tensor"
    # the q / k weights are not touched by the rotation (online_quarot: nothing folded)
    assert desc["blocks.0.self_attn.q.weight"] == "W8A8_MXFP8"
    # deterministic: a second export writes the same bytes
    _, _, t2 = export(tiny, "w4a4f8-again", "msmodelslim-wan2.2-w4a4f8")
    assert torch.equal(t2["blocks.1.self_attn.k_rot"].view(torch.int16), t["blocks.1.self_attn.k_rot"].view(torch.int16))


def test_w8a8f8_diffusers_layout_names(tiny):
    _, desc, t = export(tiny, "w8a8f8-df", "msmodelslim-wan2.2-w8a8f8", layout="diffusers")
    rots = sorted(k for k in t if k.endswith("_rot"))
    assert rots == [f"blocks.{b}.attn1.{r}" for b in (0, 1) for r in ("k_rot", "q_rot")]
    assert {k: v for k, v in desc.items() if k.endswith(".quant_type")} == {
        "blocks.0.attn1.quant_type": "FP8_DYNAMIC", "blocks.1.attn1.quant_type": "FP8_DYNAMIC"}


def test_recipe_errors(tiny, tmp_path):
    with pytest.raises(RecipeError, match=r"line 2: 'rotation' takes one of FLOAT, HADAMARD, got 'QR'"):
        Recipe.parse("blocks.* mxfp8\nrotation blocks.*.self_attn QR\n", name="r")
    bad = tmp_path / "cross.recipe"
    bad.write_text("blocks.* mxfp8\nattention blocks.*_attn FP8_DYNAMIC\n")
    with pytest.raises(QuantizeError, match=r"line 2.*blocks.0.cross_attn.*self-attention"):
        quantize_model(str(tiny / "tiny"), str(tmp_path / "o"), QuantizeOptions(recipe=str(bad), progress=False),
                       log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_load_transformer(tiny):
    """The export loads through load_transformer with its rotations applied where the loader knows
    q_rot / k_rot (the attention work), else it is refused naming exactly the rotation tensors:
    nothing else in the export (labels, quant_type entries, weights) is a mismatch."""
    from mxdit import load_transformer
    from mxdit.loader.load import CheckpointMismatchError

    out, _, t = export(tiny, "w4a4f8", "msmodelslim-wan2.2-w4a4f8")
    try:
        model = load_transformer(str(out), progress=False)
    except CheckpointMismatchError as e:
        msg = str(e)
        assert "4 unexpected tensors" in msg and "missing" not in msg and "mismatch" not in msg.split(":", 1)[1], msg
        for b in (0, 1):
            assert f"blocks.{b}.self_attn.q_rot" in msg and f"blocks.{b}.self_attn.k_rot" in msg
        return
    for b in (0, 1):
        attn = model.blocks[b].attn1
        assert torch.equal(attn.q_rot.to(torch.bfloat16), t[f"blocks.{b}.self_attn.q_rot"])
        assert torch.equal(attn.k_rot.to(torch.bfloat16), t[f"blocks.{b}.self_attn.k_rot"])
