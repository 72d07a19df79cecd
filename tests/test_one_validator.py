"""One validator, one defaults table, one config reader (issue 13 item 3): the same bad setting gives
the same one-line error through `mxdit generate` (exit 2, before any load), `mxdit serve` (400 naming
the field), `mxdit quantize`'s calibration settings and `WanVideoPipeline.check_inputs`."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from _tiny_wan import diffusers_loader, tiny_model_dir

import mxdit
from mxdit.cli import main
from mxdit.models.wan.config import MODEL_FACTS, SAMPLING_DEFAULTS, WanTransformerConfig, read_config_json
from mxdit.pipelines.inputs import InputError
from mxdit.pipelines.model_dir import ModelDirError, inspect_model_dir
from mxdit.pipelines.wan import WanVideoPipeline

#: (pipeline / HTTP field, value, CLI flag, calibration flag or None)
BAD = [
    ("num_frames", 8, "--num-frames", "--calib-frames"),
    ("height", 40, "--height", "--calib-height"),
    ("num_inference_steps", 0, "--num-inference-steps", None),  # quantize checks steps >= 1 itself first
]


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "t2v-a14b")


@pytest.fixture(scope="module")
def pipe(t2v_dir):
    return WanVideoPipeline.from_pretrained(t2v_dir, dtype=torch.float32, transformer_loader=diffusers_loader)


@pytest.fixture(scope="module")
def http(t2v_dir, tmp_path_factory):
    from fastapi.testclient import TestClient

    from mxdit.serve.app import Server, create_app
    from mxdit.serve.store import JobStore

    class Unloaded:  # an engine with the model directory's configs and no weights
        info = inspect_model_dir(t2v_dir)

        def generate(self, *a, **k):
            raise AssertionError("nothing may run")

    out = tmp_path_factory.mktemp("serve")
    with TestClient(create_app(Server(Unloaded(), JobStore(str(out / "jobs.sqlite")), out))) as client:
        yield client


@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(WanVideoPipeline, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(mxdit, "load_transformer", boom, raising=False)


@pytest.mark.parametrize("field,value,flag,calib_flag", BAD)
def test_same_bad_setting_same_error_everywhere(field, value, flag, calib_flag, pipe, http, t2v_dir, tmp_path,
                                                capsys, no_model_load):
    with pytest.raises(InputError) as ei:
        pipe.check_inputs("a fox", **{field: value})
    assert ei.value.field == field
    msg = str(ei.value)  # e.g. "num_frames must be 4n+1 (e.g. 81), got 8"
    assert msg.startswith(f"{field} ") and str(value) in msg
    with pytest.raises(InputError, match=re.escape(msg)):
        pipe("a fox", **{field: value}, output_type="latent")

    r = http.post("/v1/videos", json={"prompt": "a fox", field: value})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == field and err["message"] == msg

    out = tmp_path / "o.mp4"
    rc = main(["generate", "--model-path", str(t2v_dir), "--prompt", "a fox", "--output", str(out), flag, str(value)])
    line = capsys.readouterr().err
    assert rc == 2 and line == f"mxdit generate: error: {msg.replace(field, flag, 1)}\n" and not out.exists()

    if calib_flag is not None:
        (tmp_path / "p.txt").write_text("a fox\n")
        rc = main(["quantize", "--model-path", str(t2v_dir), "--output", str(tmp_path / "q"), "--recipe", "all-mxfp8",
                   "--calib-prompts", str(tmp_path / "p.txt"), calib_flag, str(value)])
        line = capsys.readouterr().err
        assert rc == 2 and msg.replace(field, calib_flag, 1) in line and line.count("\n") == 1
        assert not (tmp_path / "q").exists()


def test_pipeline_checks_what_the_cli_checks(pipe):
    for kw, fld in [(dict(guidance_scale=math.nan), "guidance_scale"), (dict(guidance_scale=-1.0), "guidance_scale"),
                    (dict(boundary_ratio=math.nan), "boundary_ratio"), (dict(prompt="  "), "prompt"),
                    (dict(prompt="x", negative_prompt=["a", "b"]), "negative_prompt"),
                    (dict(prompt="x", image="unused.png"), "image"), (dict(prompt="x", output_type="pil"), "output_type")]:
        kw.setdefault("prompt", "a fox")
        with pytest.raises(InputError) as ei:
            pipe.check_inputs(**kw)
        assert ei.value.field == fld, kw
    pipe.check_inputs("a fox")  # the defaults are valid
    pipe.check_inputs("a fox", height=32, width=48, num_frames=5, guidance_scale=0.0, boundary_ratio=1.0)


def test_defaults_come_from_the_one_table(pipe, t2v_dir, tmp_path_factory):
    # the cited values (Wan2.2 wan/configs + generate.py --size 1280*720; SGLang Wan2_2_*_SamplingParam)
    cited = {
        "t2v-a14b": dict(num_frames=81, num_inference_steps=40, guidance_scale=4.0, guidance_scale_2=3.0, fps=16),
        "i2v-a14b": dict(height=720, width=1280, num_frames=81, num_inference_steps=40, guidance_scale=3.5,
                         guidance_scale_2=3.5, fps=16),
        "ti2v-5b": dict(height=704, width=1280, num_frames=121, num_inference_steps=50, guidance_scale=5.0,
                        guidance_scale_2=None, fps=24),
    }
    for kind, want in cited.items():
        table = SAMPLING_DEFAULTS[kind].as_dict()
        assert {k: table[k] for k in want} == want, kind
        assert inspect_model_dir(tiny_model_dir(tmp_path_factory, kind)).defaults == table
    assert pipe.defaults == SAMPLING_DEFAULTS["t2v-a14b"].as_dict() == inspect_model_dir(t2v_dir).defaults
    for facts in MODEL_FACTS.values():  # the facts read the table, they hold no second copy
        d = SAMPLING_DEFAULTS[facts.kind]
        assert (facts.height, facts.width, facts.num_inference_steps, facts.guidance_scale) == \
               (d.height, d.width, d.num_inference_steps, d.guidance_scale)
    assert MODEL_FACTS["Wan2.2-I2V-A14B"].height * MODEL_FACTS["Wan2.2-I2V-A14B"].width == 720 * 1280


def test_one_config_reader(tmp_path):
    from mxdit.loader.checkpoint import read_config_json as loader_read
    from mxdit.loader.safetensors_io import CheckpointError

    for raw, needle in [('{"a": 1, "a": 2}', "duplicate key 'a'"), ('{"flow_shift": NaN}', "not valid JSON"),
                        ("[1]", "must be a JSON object")]:
        p = tmp_path / "model_index.json"
        p.write_text(raw)
        for reader, err in [(lambda q: read_config_json(q, error=ModelDirError), ModelDirError),
                            (loader_read, CheckpointError)]:
            with pytest.raises(err, match=needle) as ei:
                reader(str(p))
            assert str(p) in str(ei.value)
    orig = WanTransformerConfig(num_attention_heads=2, attention_head_dim=8, ffn_dim=32, num_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(orig.to_original_dict()))
    assert WanTransformerConfig.from_json_file(tmp_path / "config.json") == orig
    assert WanTransformerConfig.from_config(orig.to_original_dict()) == WanTransformerConfig.from_config(orig.to_dict())
