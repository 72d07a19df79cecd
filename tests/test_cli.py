"""The mxdit CLI: generate (input checks before any load, atomic outputs), demo, dispatch."""
from __future__ import annotations

import json
import shutil
import sys
import types

import numpy as np
import pytest

from _tiny_wan import loader_available, tiny_model_dir

import mxdit
from mxdit import cli
from mxdit.cli import main
from mxdit.pipelines.wan import WanVideoPipeline

SMALL = ["--height", "32", "--width", "32", "--num-frames", "5", "--num-inference-steps", "2"]


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "t2v-a14b")


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "i2v-a14b")


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "ti2v-5b")


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(WanVideoPipeline, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(mxdit, "load_transformer", boom, raising=False)


def _png(path, h=40, w=56):
    from PIL import Image

    Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype(np.uint8)).save(path)
    return path


def _bad_cases(t2v, i2v, ti2v, tmp):
    png = str(_png(tmp / "in.png"))
    return [
        ([*SMALL[:4], "--num-frames", "8"], t2v, "--num-frames must be 4n+1"),
        (["--height", "40", "--width", "32"], t2v, "--height must be a positive multiple of 16"),
        (["--width", "0"], t2v, "--width must be a positive multiple of 16"),
        (["--quantization", "int3"], t2v, "unknown --quantization 'int3'"),
        ([], tmp / "no-such-model", "does not exist"),
        ([], tmp, "model_index.json"),
        (["--image", png], t2v, "text-to-video model"),
        ([], i2v, "pass --image"),
        (["--image", str(tmp / "missing.png")], i2v, "--image"),
        (["--height", "48"], ti2v, "--height must be a positive multiple of 32"),
        (["--guidance-scale-2", "2"], ti2v, "--guidance-scale-2 applies to two-expert"),
        (["--boundary-ratio", "1.5"], t2v, "--boundary-ratio must be in [0, 1]"),
        (["--num-inference-steps", "0"], t2v, "--num-inference-steps must be >= 1"),
        (["--transformer-weights-path", str(tmp / "nope")], t2v, "--transformer-weights-path"),
        (["--dtype", "int8"], t2v, "unknown precision"),
        (["--device", "cuda:99"], t2v, "--device"),
        (["--device", "npu"], t2v, "needs torch_npu (pip install torch-npu"),
        (["--quantization", "modelslim"], t2v, "--quantization modelslim"),
        (["--output", str(tmp / "out.avi")], t2v, "must end in .mp4"),
        (["--output", str(tmp)], t2v, "is a directory"),
        (["--num-frames", "abc"], t2v, "invalid int value"),
        (["--fps", "0"], t2v, "--fps must be >= 1"),
    ]


def test_generate_rejects_bad_input_before_loading(t2v_dir, i2v_dir, ti2v_dir, tmp_path, capsys, no_model_load):
    for extra, model, needle in _bad_cases(t2v_dir, i2v_dir, ti2v_dir, tmp_path):
        out = tmp_path / "o.mp4"
        args = ["generate", "--model-path", str(model), "--prompt", "a fox", "--output", str(out), *extra]
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2, (extra, err)
        assert err.count("\n") == 1 and err.startswith("mxdit generate: error: "), (extra, err)
        assert needle in err, (needle, err)
        assert not out.exists()


def test_quantization_names_come_from_one_place():
    from mxdit.quant.schemes import available_quant_methods

    names = available_quant_methods()
    assert {"mxfp8", "mxfp4_dual", "mxfp4_npu"} <= set(names)
    assert set(names) >= {"mxfp8", "mxfp4", "mxfp4_dual", "mxfp4_npu", "fp8", "modelslim"}
    assert not hasattr(cli, "FALLBACK_QUANT_METHODS") and not hasattr(cli, "available_quant_methods")


def test_generate_writes_mp4_and_perf_json(t2v_dir, tmp_path, capsys):
    import imageio.v3 as iio

    out = tmp_path / "sub" / "fox.mp4"
    perf = tmp_path / "perf.json"
    rc = main(["generate", "--model-path", str(t2v_dir), "--prompt", "a red fox", "--negative-prompt", "blurry",
               *SMALL, "--dtype", "fp32", "--device", "cpu", "--seed", "3", "--fps", "8",
               "--output", str(out), "--perf-dump-path", str(perf), "--no-progress"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    frames = iio.imread(out, index=None)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    rec = json.loads(perf.read_text())
    assert [s["name"] for s in rec["steps"]] == ["InputValidationStage", "TextEncodingStage", "LatentPreparationStage",
                                                 "TimestepPreparationStage", "DenoisingStage", "DecodingStage"]
    assert len(rec["denoise_steps_ms"]) == 2 and rec["settings"]["seed"] == 3
    assert rec["total_duration_ms"] > 0 and rec["fps"] == 8 and rec["output"] == str(out)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["fox.mp4", "perf.json", "sub"]  # no temp leftovers


def test_generate_failure_leaves_no_outputs(t2v_dir, tmp_path, monkeypatch):
    def fail(self, *a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(WanVideoPipeline, "__call__", fail)
    out, perf = tmp_path / "o.mp4", tmp_path / "p.json"
    rc = main(["generate", "--model-path", str(t2v_dir), "--prompt", "x", *SMALL, "--dtype", "fp32",
               "--output", str(out), "--perf-dump-path", str(perf), "--no-progress"])
    assert rc == 1  # a failure while running: one line (see test_hostile_*), exit 1
    assert list(tmp_path.iterdir()) == []


def test_write_mp4_is_atomic(tmp_path, monkeypatch):
    import imageio_ffmpeg

    from mxdit.pipelines.video import read_video, write_mp4

    frames = np.zeros((3, 16, 16, 3), np.uint8)
    frames[1] = 128
    target = tmp_path / "v.mp4"
    write_mp4(frames, target, fps=4)
    assert read_video(target).shape == (3, 16, 16, 3)
    good = target.read_bytes()

    real = imageio_ffmpeg.write_frames

    def broken(*a, **k):  # ffmpeg accepts one frame, then the "disk" fails
        gen = real(*a, **k)

        def writer():
            gen.send(None)
            try:
                n = 0
                while True:
                    frame = yield
                    n += 1
                    if n == 2:
                        raise OSError("disk full")
                    gen.send(frame)
            finally:
                gen.close()

        return writer()

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", broken)
    with pytest.raises(OSError, match="disk full"):
        write_mp4(frames, target, fps=4)
    assert target.read_bytes() == good  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # no temp file left
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(frames.astype(np.float32), tmp_path / "w.mp4")
    assert not (tmp_path / "w.mp4").exists()


# ------------------------------------------------------------------ dispatch
def test_main_dispatch(monkeypatch, capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, _, _ in cli.SUBCOMMANDS:
        assert name in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mxdit {mxdit.__version__}"
    assert main(["frobnicate"]) == 2
    assert capsys.readouterr().err.startswith("mxdit: error: unknown command 'frobnicate'")
    assert main(["generate", "--help"]) == 0
    assert "--perf-dump-path" in capsys.readouterr().out
    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, ("ghost", "mxdit.tools._no_such_tool", "x")])
    assert main(["ghost"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not available" in err


def test_registered_slots_for_other_tools():
    modules = {name: mod for name, mod, _ in cli.SUBCOMMANDS}
    assert modules["repack"] == "mxdit.tools.repack" and modules["quantize"] == "mxdit.tools.quantize"
    assert modules["generate"] == "mxdit.tools.generate"


def test_demo_numerics_dispatches(monkeypatch):
    calls = []
    fake = types.ModuleType("mxdit.tools.numerics_demo")
    fake.main = lambda: calls.append(1) or 0
    monkeypatch.setitem(sys.modules, "mxdit.tools.numerics_demo", fake)
    import mxdit.tools as tools_pkg

    monkeypatch.setattr(tools_pkg, "numerics_demo", fake, raising=False)
    assert main(["demo", "--numerics"]) == 0
    assert calls == [1]


def _seed_demo_cache(t2v_dir, cache):
    # the demo model is exactly the tiny T2V-A14B recipe: reuse it instead of building again
    shutil.copytree(t2v_dir, cache / "demo-model")


def test_demo_bf16_only(t2v_dir, tmp_path, capsys):
    _seed_demo_cache(t2v_dir, tmp_path / "cache")
    out = tmp_path / "out"
    rc = main(["demo", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out), "--quantizations", "",
               "--height", "32", "--width", "32", "--num-frames", "5", "--num-inference-steps", "2"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "using cached" in text
    assert sorted(p.name for p in out.iterdir()) == ["demo_bf16.mp4", "perf_bf16.json"]


@pytest.mark.skipif(not loader_available(), reason="needs mxdit.load_transformer (quantized loading) to be importable")
def test_demo_with_quantization_prints_report_and_quality(t2v_dir, tmp_path, capsys):
    _seed_demo_cache(t2v_dir, tmp_path / "cache")
    rc = main(["demo", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out"),
               "--quantizations", "mxfp8", "--height", "32", "--width", "32", "--num-frames", "1",
               "--num-inference-steps", "3"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "### Performance Comparison Report" in text and "#### 2. Stage Breakdown" in text
    assert "#### 3. Quality vs BF16" in text
    assert any(l.startswith("| **Transformer Weights** |") and "✅ (Lower)" in l for l in text.splitlines())
    row = next(l for l in text.splitlines() if l.startswith("| mxfp8 |"))
    psnr_db, rel = (float(c) for c in row.strip("|").split("|")[1:3])
    assert psnr_db > 20 and 0 < rel < 0.2


def test_demo_rejects_unknown_quantization(tmp_path, capsys):
    assert main(["demo", "--quantizations", "mxfp8,int2", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "int2" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("module", ["mxdit", "mxdit.cli"])
def test_python_dash_m_entry_points(module, tmp_path):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", module, "generate", "--model-path", str(tmp_path / "none"), "--prompt", "x"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("mxdit generate: error: --model-path:")
    assert "Traceback" not in proc.stderr


def test_generate_checkpoint_problem_found_while_loading_is_one_clean_error(t2v_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(t2v_dir, model)
    cfg_path = model / "transformer_2" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["ffn_dim"] = cfg["ffn_dim"] * 2  # the config no longer matches the tensors
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "o.mp4"
    rc = main(["generate", "--model-path", str(model), "--prompt", "x", *SMALL, "--dtype", "fp32",
               "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "mxdit generate: error: checkpoint" in err and "does not match the model" in err and "ffn" in err
    assert "Traceback" not in err and not out.exists()


def test_generate_sglang_output_flags_and_prompt_file(t2v_dir, tmp_path, capsys):
    import imageio.v3 as iio

    pf = tmp_path / "prompts.txt"
    pf.write_text("a red fox\n\na blue bird\n")
    base = ["generate", "--model-path", str(t2v_dir), *SMALL, "--dtype", "fp32", "--device", "cpu", "--no-progress"]
    assert main([*base, "--prompt-file-path", str(pf), "--output-path", str(tmp_path / "o"),
                 "--output-file-name", "fox"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["fox_0.mp4", "fox_1.mp4"]
    assert main([*base, "--prompt", "a red fox", "--output-path", str(tmp_path / "o"),
                 "--output-file-name", "one.mp4"]) == 0
    np.testing.assert_array_equal(iio.imread(tmp_path / "o" / "one.mp4", index=None),
                                  iio.imread(tmp_path / "o" / "fox_0.mp4", index=None))
    capsys.readouterr()
    assert main([*base, "--prompt", "x", "--attention-backend", "nope"]) == 2
    assert "--attention-backend" in capsys.readouterr().err
    assert main([*base, "--prompt", "x", "--output-file-name", "../x"]) == 2
