"""Every scheme record (mxdit.quant.schemes.SCHEMES) round-trips, and README's method table is the records'.

Parametrized from the records, so a new scheme is covered by adding its record:

* exportable schemes: a tiny layer exported with ``mxdit quantize`` (the CLI, as a user runs it) in
  the msmodelslim (mindie) and diffusers layouts; the files hold exactly the record's tensors (names,
  dtypes, on-disk shapes); ``load_transformer`` loads them into exactly the record's parameters
  (dtypes, shapes), with the values the files hold;
* online schemes: a BF16 model loaded with ``quantization=<name>`` holds exactly the record's tensors.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
import torch

from mxdit.cli import main as cli_main
from mxdit.quant.schemes import COMMON_TENSORS, SCHEMES, readme_table

DIM, FFN, HEADS = 512, 1024, 4
LAYER = "blocks.0.ffn.net.0.proj"  # diffusers name of original blocks.0.ffn.0: K = DIM, N = FFN
ORIG_LAYER = "blocks.0.ffn.0"
N, K = FFN, DIM


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=DIM // HEADS,
                              in_channels=16, out_channels=16, text_dim=64, freq_dim=256, ffn_dim=FFN, num_layers=1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("schemes") / "bf16"
    m.to(torch.bfloat16).save_pretrained(str(path))
    return path


def _read_all(d) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


def _layer(model, name):
    return model.get_submodule(name)


EXPORTABLE = [pytest.param(s, id=s.label) for s in SCHEMES if s.exportable]
ONLINE = [pytest.param(s, id=s.online) for s in SCHEMES if s.online]


@pytest.mark.parametrize("layout", ["mindie", "diffusers"])
@pytest.mark.parametrize("scheme", EXPORTABLE)
def test_export_and_load_hold_the_records_tensors(bf16_dir, tmp_path, scheme, layout):
    import mxdit

    recipe = tmp_path / "recipe.txt"
    recipe.write_text(f"{ORIG_LAYER} {scheme.label}\n")
    out = tmp_path / "out"
    rc = cli_main(["quantize", "--model-path", str(bf16_dir), "--output", str(out), "--recipe", str(recipe),
                   "--layout", layout, "--no-plot", "--no-progress"])
    assert rc == 0
    files = _read_all(out)
    prefix = LAYER if layout == "diffusers" else ORIG_LAYER
    stored = {k[len(prefix) + 1:]: v for k, v in files.items() if k.startswith(prefix + ".")}
    want = {**scheme.tensor_shapes(N, K, disk=True), "bias": (torch.float32, (N,))}
    assert {s: (t.dtype, tuple(t.shape)) for s, t in stored.items()} == want
    desc = json.loads(Path(glob.glob(str(out / "quant_model_description*.json"))[0]).read_text())
    assert all(desc[f"{prefix}.{s}"] == scheme.label for s in scheme.tensors)

    model = mxdit.load_transformer(str(out), dtype=torch.float32)
    layer = _layer(model, LAYER)
    assert layer.quant_method.scheme is scheme
    params = {s: (t.dtype, tuple(t.shape)) for s, t in layer.named_parameters(recurse=False)}
    assert params == {**scheme.tensor_shapes(N, K, disk=False), "bias": (torch.float32, (N,))}
    for s, spec in scheme.tensors.items():  # the values the files hold, in the parameter's shape
        assert torch.equal(getattr(layer, s).data.view(torch.uint8),
                           stored[s].reshape(spec.shape_for(N, K)).view(torch.uint8)), s
    others = [n for n, m in model.quant_linears() if n != LAYER and m.quant_method.name != "unquantized"]
    assert others == []


@pytest.mark.parametrize("scheme", ONLINE)
def test_online_layers_hold_the_records_tensors(bf16_dir, scheme):
    import mxdit

    model = mxdit.load_transformer(str(bf16_dir), quantization=scheme.online, dtype=torch.bfloat16,
                                   include=[LAYER])
    layer = _layer(model, LAYER)
    assert layer.quant_method.scheme is scheme and layer.quant_method.name == scheme.online
    params = {s: (t.dtype, tuple(t.shape)) for s, t in layer.named_parameters(recurse=False)}
    assert params == {**scheme.tensor_shapes(N, K, disk=False), "bias": (torch.float32, (N,))}


def test_every_record_is_reachable_and_consistent():
    """Each record is loadable by a name (online or label), its tensors' shapes are whole for a layer
    whose K is its K multiple, and the common tensors are not redefined by a scheme."""
    for s in SCHEMES:
        assert s.online or s.label, s
        k = max(s.k_multiple, 32)
        for sfx, spec in s.tensors.items():
            assert sfx not in COMMON_TENSORS
            assert all(d > 0 for d in spec.shape_for(8, k)), (s.name, sfx)
        if s.exportable:
            assert s.label and s.default_rule


def test_readme_method_table_is_the_records():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Quantization methods", 1)[1]
    first = []
    for line in section.strip().splitlines():  # the first table after the heading
        if line.startswith("|"):
            first.append(line)
        elif first:
            break
    assert "\n".join(first) + "\n" == readme_table(), \
        "README's method table differs from mxdit.quant.schemes.readme_table(); paste its output"


CHECKPOINT_ONLY = [pytest.param(s, id=s.label) for s in SCHEMES if s.label and not s.exportable]


@pytest.mark.parametrize("scheme", CHECKPOINT_ONLY)
def test_checkpoint_only_schemes_load_the_records_tensors(bf16_dir, tmp_path, scheme):
    """Schemes mxdit cannot export (msmodelslim's int8 ones): an msmodelslim export whose layer holds
    the record's tensors (written from the record, on-disk shapes) loads into the record's parameters."""
    import mxdit
    from safetensors.torch import save_file

    recipe = tmp_path / "recipe.txt"
    recipe.write_text(f"{ORIG_LAYER} W8A8_MXFP8\n")
    src = tmp_path / "src"
    assert cli_main(["quantize", "--model-path", str(bf16_dir), "--output", str(src), "--recipe", str(recipe),
                     "--no-plot", "--no-progress"]) == 0
    tensors = {k: v for k, v in _read_all(src).items() if not k.startswith(ORIG_LAYER + ".weight")}
    desc = json.loads(Path(glob.glob(str(src / "quant_model_description*.json"))[0]).read_text())
    desc = {k: v for k, v in desc.items() if not k.startswith(ORIG_LAYER + ".weight")}
    for sfx, spec in scheme.tensors.items():
        zero = spec.missing_init == "zeros" or not spec.dtype.is_floating_point
        t = (torch.zeros if zero else torch.ones)(spec.disk_shape_for(N, K), dtype=spec.dtype)
        tensors[f"{ORIG_LAYER}.{sfx}"] = t
        desc[f"{ORIG_LAYER}.{sfx}"] = scheme.label
    out = tmp_path / "out"
    out.mkdir()
    save_file(tensors, str(out / "quant_model_weights.safetensors"), metadata={"format": "pt"})
    desc["model_quant_type"] = scheme.label
    (out / "quant_model_description.json").write_text(json.dumps(desc))
    (out / "config.json").write_bytes((src / "config.json").read_bytes())

    layer = _layer(mxdit.load_transformer(str(out), dtype=torch.float32), LAYER)
    assert layer.quant_method.scheme is scheme
    params = {s: (t.dtype, tuple(t.shape)) for s, t in layer.named_parameters(recurse=False)}
    assert params == {**scheme.tensor_shapes(N, K, disk=False), "bias": (torch.float32, (N,))}
