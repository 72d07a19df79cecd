"""``mxdit repack``: layouts (A14B two experts, TI2V-5B, sharded / ascendv1 exports), and bad input:
each a clear error, no output and no temporary directory left behind, inputs never modified.

The quantized round trip (online == export == repacked) lives in test_loader.py; here the exports
hold FLOAT tensors (repack only renames and re-files tensors) on a very small model, so the tests
are fast.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mxdit.cli import main as cli_main
from mxdit.loader import SafetensorsError
from mxdit.models.wan.names import diffusers_to_original
from mxdit.tools.repack import MODEL_TYPES, repack
from test_loader import diffusers_config_json, tree_state, write_a14b_model_dir, write_bf16_diffusers_dir

CFG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32,
           freq_dim=16, ffn_dim=48, num_layers=2)
DESC = "quant_model_description_w8a8_mxfp8.json"
WEIGHTS = "quant_model_weight_w8a8_mxfp8.safetensors"
SMOOTHED = "blocks.0.self_attn.q"  # written as <p>.div.mul_scale + <p>.linear.{weight,bias}


def smoothed_fp8(w):
    return w.float().clamp(-448, 448).to(torch.float8_e4m3fn)


def smoothed_scale(w):
    return torch.full((w.shape[0], w.shape[1] // 32), 127, dtype=torch.uint8)


def write_float_export(src_dir, out_dir, *, shards: int = 1, saver: str = "mindie") -> dict:
    """An msmodelslim-style export of ``src_dir`` in original names, one layer smooth-wrapped."""
    os.makedirs(out_dir, exist_ok=True)
    sd = load_file(os.path.join(src_dir, "diffusion_pytorch_model.safetensors"))
    tensors = {}
    for k, v in sd.items():
        o = diffusers_to_original(k)
        if o.startswith(SMOOTHED + "."):
            o = f"{SMOOTHED}.linear.{o[len(SMOOTHED) + 1:]}"
        tensors[o] = v
    tensors[f"{SMOOTHED}.div.mul_scale"] = torch.full((32,), 2.0)
    # the smoothed layer is W8A8_MXFP8 (a FLOAT layer with a mul_scale does not load)
    w = tensors[f"{SMOOTHED}.linear.weight"]
    tensors[f"{SMOOTHED}.linear.weight"] = smoothed_fp8(w)
    tensors[f"{SMOOTHED}.linear.weight_scale"] = smoothed_scale(w)
    desc = {k: ("W8A8_MXFP8" if k.startswith(SMOOTHED + ".") else "FLOAT") for k in tensors}
    desc["model_quant_type"] = "W8A8_MXFP8"
    names = sorted(tensors)
    if saver == "ascendv1":
        desc_name, stem = "quant_model_description.json", "quant_model_weights"
        desc["version"] = "1.0.0"
    else:
        desc_name, stem = DESC, WEIGHTS[: -len(".safetensors")]
    for i in range(shards):
        part = {k: tensors[k] for k in names[i::shards]}
        fname = f"{stem}.safetensors" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, os.path.join(out_dir, fname))
    with open(os.path.join(out_dir, desc_name), "w") as f:
        json.dump(desc, f)
    return tensors


@pytest.fixture()
def a14b(tmp_path):
    model = tmp_path / "Wan2.2-T2V-A14B-Diffusers"
    sds = write_a14b_model_dir(str(model), cfg=CFG)
    quant = tmp_path / "quant"
    write_float_export(model / "transformer", quant / "high_noise_model")
    write_float_export(model / "transformer_2", quant / "low_noise_model", shards=3)
    return dict(tmp=tmp_path, model=model, quant=quant, sds=sds)


def _cli(a14b, out, *extra, model_type="Wan2.2-T2V-A14B"):
    return cli_main(["repack", "--model-type", model_type, "--original-model-path", str(a14b["model"]),
                     "--quant-path", str(a14b["quant"]), "--output-path", str(out), *extra])


def _leftovers(parent) -> list[str]:
    return [p for p in os.listdir(parent) if ".tmp-" in p or ".old-" in p]


def test_repack_a14b_layout_and_names(a14b, capsys):
    before = tree_state(a14b["tmp"])
    out = a14b["tmp"] / "out"
    assert _cli(a14b, out) == 0
    assert "transformer: " in capsys.readouterr().out
    # inputs untouched (bytes and mtimes), nothing else created next to the output
    assert {k: v for k, v in tree_state(a14b["tmp"]).items() if not k.startswith("out" + os.sep)} == before
    assert sorted(os.listdir(a14b["tmp"])) == ["Wan2.2-T2V-A14B-Diffusers", "out", "quant"]
    assert sorted(os.listdir(out)) == [".mxdit-output.json", "model_index.json", "scheduler", "tokenizer", "transformer", "transformer_2",
                                       "vae"]
    for t in ("transformer", "transformer_2"):
        assert sorted(os.listdir(out / t)) == ["config.json", "diffusion_pytorch_model.safetensors",
                                               "quant_model_description.json"]
        got = load_file(str(out / t / "diffusion_pytorch_model.safetensors"))
        w = a14b["sds"][t]["blocks.0.attn1.to_q.weight"]
        want = {**a14b["sds"][t], "blocks.0.attn1.to_q.mul_scale": torch.full((32,), 2.0),
                "blocks.0.attn1.to_q.weight": smoothed_fp8(w), "blocks.0.attn1.to_q.weight_scale": smoothed_scale(w)}
        assert sorted(got) == sorted(want)  # diffusers names, wrappers stripped, shards merged
        for k, v in want.items():
            assert torch.equal(got[k], v), (t, k)
        desc = json.loads((out / t / "quant_model_description.json").read_text())
        assert set(desc) == set(want) | {"model_quant_type"} and desc["model_quant_type"] == "W8A8_MXFP8"
        assert json.loads((out / t / "config.json").read_text()) == diffusers_config_json(CFG)


def test_repack_ti2v_and_ascendv1_export(tmp_path):
    cfg = dict(CFG, in_channels=48, out_channels=48)
    model = tmp_path / "ti2v"
    os.makedirs(model)
    (model / "model_index.json").write_text("{}")
    sd = write_bf16_diffusers_dir(str(model / "transformer"), cfg)
    quant = tmp_path / "quant"  # TI2V-5B: the export is the quant path itself
    write_float_export(model / "transformer", quant, saver="ascendv1", shards=2)
    counts = repack("Wan2.2-TI2V-5B", str(model), str(quant), str(tmp_path / "out"))
    assert counts == {"transformer": len(sd) + 2}
    assert sorted(os.listdir(tmp_path / "out")) == [".mxdit-output.json", "model_index.json", "transformer"]
    got = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert "blocks.1.ffn.net.2.weight" in got and "scale_shift_table" in got and "head.modulation" not in got
    desc = json.loads((tmp_path / "out" / "transformer" / "quant_model_description.json").read_text())
    assert desc["version"] == "1.0.0" and "blocks.0.attn1.to_q.mul_scale" in desc


def test_unknown_model_type_cli(a14b, capsys):
    out = a14b["tmp"] / "out"
    assert _cli(a14b, out, model_type="Wan2.1-T2V-14B") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mxdit repack: error: ")
    assert "'Wan2.1-T2V-14B'" in err and all(m in err for m in MODEL_TYPES)
    assert not out.exists() and not _leftovers(a14b["tmp"])
    # argparse errors are one line and exit 2 too
    assert cli_main(["repack", "--model-type", "Wan2.2-T2V-A14B"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "required" in err


def test_existing_output_refused_then_overwritten(a14b, capsys):
    out = a14b["tmp"] / "out"
    os.makedirs(out)
    (out / "sentinel.txt").write_text("old")
    before = tree_state(out)
    assert _cli(a14b, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert tree_state(out) == before and not _leftovers(a14b["tmp"])
    # --overwrite never replaces a directory mxdit did not write
    assert _cli(a14b, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not written by mxdit" in err
    assert tree_state(out) == before and not _leftovers(a14b["tmp"])
    os.remove(out / "sentinel.txt")
    os.rmdir(out)
    assert _cli(a14b, out) == 0
    (out / "sentinel.txt").write_text("mine")  # inside an output mxdit wrote
    assert _cli(a14b, out, "--overwrite") == 0
    assert not (out / "sentinel.txt").exists() and not _leftovers(a14b["tmp"])
    assert (out / "transformer_2" / "diffusion_pytorch_model.safetensors").is_file()
    assert not _leftovers(a14b["tmp"])


def test_description_naming_absent_tensors(a14b):
    p = a14b["quant"] / "low_noise_model" / DESC
    desc = json.loads(p.read_text())
    desc["blocks.7.self_attn.q.weight"] = "W8A8_MXFP8"
    desc["blocks.7.self_attn.q.weight_scale"] = "W8A8_MXFP8"
    p.write_text(json.dumps(desc))
    before = tree_state(a14b["tmp"])
    out = a14b["tmp"] / "out"
    with pytest.raises(ValueError) as e:
        repack("Wan2.2-T2V-A14B", str(a14b["model"]), str(a14b["quant"]), str(out))
    msg = str(e.value)
    assert "not in the weight files" in msg and str(p) in msg
    assert "blocks.7.self_attn.q.weight" in msg and "blocks.7.self_attn.q.weight_scale" in msg
    assert not out.exists() and not _leftovers(a14b["tmp"])
    assert tree_state(a14b["tmp"]) == before


def test_description_missing_a_label(a14b):
    p = a14b["quant"] / "high_noise_model" / DESC
    desc = json.loads(p.read_text())
    del desc["blocks.1.ffn.0.bias"]
    p.write_text(json.dumps(desc))
    out = a14b["tmp"] / "out"
    with pytest.raises(ValueError, match=r"has no label for tensors \['blocks.1.ffn.net.0.proj.bias'\]"):
        repack("Wan2.2-T2V-A14B", str(a14b["model"]), str(a14b["quant"]), str(out))
    assert not out.exists() and not _leftovers(a14b["tmp"])


def test_truncated_export_names_the_file(a14b):
    shard = sorted((a14b["quant"] / "low_noise_model").glob("*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 16)
    out = a14b["tmp"] / "out"
    with pytest.raises(SafetensorsError, match="truncated") as e:
        repack("Wan2.2-T2V-A14B", str(a14b["model"]), str(a14b["quant"]), str(out))
    assert str(shard) in str(e.value)
    assert not out.exists() and not _leftovers(a14b["tmp"])


def test_missing_inputs_are_named(a14b):
    out = a14b["tmp"] / "out"
    os.rename(a14b["quant"] / "low_noise_model", a14b["tmp"] / "elsewhere")
    with pytest.raises(FileNotFoundError, match="low_noise_model"):
        repack("Wan2.2-T2V-A14B", str(a14b["model"]), str(a14b["quant"]), str(out))
    os.rename(a14b["tmp"] / "elsewhere", a14b["quant"] / "low_noise_model")
    os.remove(a14b["model"] / "transformer_2" / "config.json")
    with pytest.raises(FileNotFoundError, match="transformer_2/config.json"):
        repack("Wan2.2-T2V-A14B", str(a14b["model"]), str(a14b["quant"]), str(out))
    with pytest.raises(FileNotFoundError, match="--quant-path"):
        repack("Wan2.2-T2V-A14B", str(a14b["model"]), str(a14b["tmp"] / "nope"), str(out))
    assert not out.exists() and not _leftovers(a14b["tmp"])


def test_output_inside_an_input_refused(a14b):
    for out in (a14b["model"] / "repacked", a14b["quant"] / "high_noise_model" / "x", a14b["tmp"]):
        with pytest.raises(ValueError, match="is inside|contains"):
            repack("Wan2.2-T2V-A14B", str(a14b["model"]), str(a14b["quant"]), str(out), overwrite=True)
    assert not (a14b["model"] / "repacked").exists() and (a14b["model"] / "transformer").is_dir()


def test_failed_repack_leaves_no_new_parent_dirs(a14b):
    p = a14b["quant"] / "high_noise_model" / DESC
    desc = json.loads(p.read_text())
    desc["blocks.9.ffn.0.weight"] = "FLOAT"
    p.write_text(json.dumps(desc))
    with pytest.raises(ValueError, match="blocks.9.ffn.0.weight"):
        repack("Wan2.2-T2V-A14B", str(a14b["model"]), str(a14b["quant"]), str(a14b["tmp"] / "new" / "deep" / "out"))
    assert not (a14b["tmp"] / "new").exists()


def test_repack_output_loads_and_bad_exports_write_nothing(a14b, capsys):
    """An output repack wrote always loads; an export the loader would reject (unknown label,
    wrong dtype, wrong shape) is refused before anything is written (one line, exit 2)."""
    from mxdit.loader import load_transformer

    out = a14b["tmp"] / "out"
    assert _cli(a14b, out) == 0
    capsys.readouterr()
    for t in ("transformer", "transformer_2"):
        m = load_transformer(str(out / t), progress=False)
        assert m.load_report.layers_quantized.get("w8a8_mxfp8", 0) + sum(m.load_report.layers_quantized.values()) >= 1
    import shutil

    shutil.rmtree(out)
    src = a14b["quant"] / "high_noise_model"
    desc_p, w_p = src / DESC, src / WEIGHTS
    desc0, w0 = desc_p.read_text(), w_p.read_bytes()
    sd0 = load_file(str(w_p))
    q = f"{SMOOTHED}.linear.weight"
    for case in ("label", "dtype", "shape"):
        desc, sd = json.loads(desc0), dict(sd0)
        if case == "label":
            desc[q] = "W3A3_MADEUP"
        elif case == "dtype":
            sd[f"{SMOOTHED}.linear.weight_scale"] = sd[f"{SMOOTHED}.linear.weight_scale"].to(torch.int32)
        else:
            sd[q] = sd[q][:, :16].contiguous()
        desc_p.write_text(json.dumps(desc))
        save_file(sd, str(w_p))
        before = tree_state(a14b["quant"])
        assert _cli(a14b, out) == 2, case
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert ("W3A3_MADEUP" if case == "label" else "self_attn.q") in err, err
        assert not out.exists() and tree_state(a14b["quant"]) == before
    desc_p.write_text(desc0)
    w_p.write_bytes(w0)
