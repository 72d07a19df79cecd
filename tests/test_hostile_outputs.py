"""Hostile outputs, signals, non-finite values and failing environments, through the CLI.

Every case asserts the exit status, a one-line message, no partial output, and the input's
bytes (hashed before and after)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mxdit.cli import main as cli_main
from mxdit.fsutil import MARKER, atomic_output_dir


def _tree_hash(root) -> dict[str, str]:
    out = {}
    for dp, dn, fn in os.walk(root):
        for f in fn:
            p = os.path.join(dp, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _leftovers(parent) -> list[str]:
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n or ".lock" in n]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny diffusers WanTransformer3DModel (diffusers' own writer), K = 512 everywhere."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hostile")
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=128, in_channels=16,
                              out_channels=16, text_dim=64, freq_dim=256, ffn_dim=512, num_layers=1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    m.save_pretrained(str(root / "tiny"))
    return root / "tiny"


def _quantize(model_path, output, *extra, capsys=None):
    rc = cli_main(["quantize", "--model-path", str(model_path), "--output", str(output), "--recipe", "all-mxfp8",
                   "--no-plot", "--device", "cpu", "--no-progress", *map(str, extra)])
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def _one_line_error(rc, err, code, *needles, progress_ok=False):
    assert rc == code, err
    lines = [l for l in err.splitlines() if l.strip()]
    if progress_ok:  # generate prints what it loads before failing: exactly one error line, the last
        assert sum("error:" in l for l in lines) == 1 and "error:" in lines[-1], err
        lines = lines[-1:]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


# ---- outputs that would hurt an input -------------------------------------------------------
def test_symlinked_input_and_real_output_refused(model, tmp_path, capsys):
    before = _tree_hash(model)
    link = tmp_path / "LINK"
    os.symlink(model, link)
    for out, extra in ((os.path.realpath(model), ["--overwrite"]), (link / "out", []), (model.parent, ["--overwrite"]),
                       (tmp_path / "LINK", ["--overwrite"])):
        rc, err = _quantize(link, out, *extra, capsys=capsys)
        _one_line_error(rc, err, 2, "--output")
    assert _tree_hash(model) == before and not (model / "out").exists()


def test_overwrite_refuses_foreign_directory(model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    rc, err = _quantize(model, out, "--overwrite", capsys=capsys)
    _one_line_error(rc, err, 2, "not written by mxdit")
    assert (out / "precious.txt").read_text() == "user data" and sorted(os.listdir(out)) == ["precious.txt"]
    assert not _leftovers(tmp_path)


def test_output_written_and_overwritten_input_unchanged(model, tmp_path, capsys):
    before = _tree_hash(model)
    out = tmp_path / "out"
    assert _quantize(model, out, capsys=capsys)[0] == 0
    assert (out / MARKER).is_file()
    rc, err = _quantize(model, out, capsys=capsys)
    _one_line_error(rc, err, 2, "already exists")
    assert _quantize(model, out, "--overwrite", capsys=capsys)[0] == 0
    assert _tree_hash(model) == before and not _leftovers(tmp_path)


# ---- concurrency, interrupted replace, stale temps -------------------------------------------
def test_concurrent_writer_gets_clear_error(model, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".out.lock").write_text(json.dumps({"pid": holder.pid}))
        rc, err = _quantize(model, out, capsys=capsys)
        _one_line_error(rc, err, 2, "already exists or is being written", str(holder.pid))
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the writer is gone: its lock is stale and taken over
    assert _quantize(model, out, capsys=capsys)[0] == 0
    assert not _leftovers(tmp_path)


def test_two_real_concurrent_runs_one_wins(model, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mxdit", "quantize", "--model-path", str(model), "--output", str(out),
           "--recipe", "all-mxfp8", "--no-plot", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    res = [p.communicate(timeout=120) + (p.returncode,) for p in ps]
    codes = sorted(r[2] for r in res)
    assert codes == [0, 2], res
    loser = next(r for r in res if r[2] == 2)
    assert "already exists" in loser[1] and loser[1].strip().count("\n") == 0, loser[1]
    assert not _leftovers(tmp_path)


def test_interrupted_replace_is_recovered(tmp_path):
    out = tmp_path / "o"
    with atomic_output_dir(str(out)) as t:
        Path(t, "v").write_text("old")
    # a run killed between "rename old aside" and "rename new in" left only the old one aside
    aside = tmp_path / ".o.old-dead"
    aside.mkdir()
    os.rename(out, aside / "x")
    stale = tmp_path / ".o.tmp-dead"
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"pid": 2**22 + 12345}))  # a pid that is not running
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_output_dir(str(out)) as t:
            pass
    assert (out / "v").read_text() == "old" and not _leftovers(tmp_path)


_SIGNAL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import mxdit.loader.safetensors_io as sio
    real = sio.check_finite_tensor
    state = {"n": 0}
    def slow(*a, **k):
        state["n"] += 1
        if state["n"] == int(os.environ["MXDIT_TEST_PAUSE_AT"]):
            open(os.environ["MXDIT_TEST_READY"], "w").close()
            time.sleep(60)
        return real(*a, **k)
    sio.check_finite_tensor = slow
    from mxdit.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig,pause_at", [(signal.SIGTERM, 3), (signal.SIGINT, 3), (signal.SIGTERM, 12), (signal.SIGKILL, 3)])
def test_signals_mid_write(model, tmp_path, sig, pause_at):
    before = _tree_hash(model)
    out = tmp_path / "out"
    ready = tmp_path / "ready"
    env = dict(os.environ, MXDIT_TEST_PAUSE_AT=str(pause_at), MXDIT_TEST_READY=str(ready), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", _SIGNAL_SCRIPT, "quantize", "--model-path", str(model), "--output",
                          str(out), "--recipe", "all-mxfp8", "--no-plot", "--device", "cpu", "--no-progress"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), p.communicate()
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert p.returncode == -9
        assert _leftovers(tmp_path)  # a killed writer cannot clean up ...
        assert cli_main(["quantize", "--model-path", str(model), "--output", str(out), "--recipe", "all-mxfp8",
                         "--no-plot", "--device", "cpu", "--no-progress"]) == 0
        assert not _leftovers(tmp_path)  # ... the next run removes its stale temp output and lock
    else:
        assert p.returncode == (143 if sig == signal.SIGTERM else 130), err
        assert "Traceback" not in err and not _leftovers(tmp_path), (err, os.listdir(tmp_path))
    assert _tree_hash(model) == before


# ---- non-finite values -------------------------------------------------------------------------
@pytest.mark.parametrize("tensor", ["blocks.0.attn1.to_q.weight", "blocks.0.norm2.weight", "scale_shift_table"])
def test_nan_weight_into_quantize(model, tmp_path, capsys, tensor):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(model):
        if f != "diffusion_pytorch_model.safetensors":
            (bad / f).write_bytes((model / f).read_bytes())
    sd = load_file(str(model / "diffusion_pytorch_model.safetensors"))
    if tensor not in sd:
        pytest.skip(f"{tensor} not in this diffusers version's model")
    sd[tensor].view(-1)[1] = float("nan")
    save_file(sd, str(bad / "diffusion_pytorch_model.safetensors"))
    before = _tree_hash(bad)
    rc, err = _quantize(bad, tmp_path / "out", capsys=capsys)
    _one_line_error(rc, err, 2, tensor, "non-finite")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path) and _tree_hash(bad) == before
    # and into online quantization / plain loading
    from mxdit.loader import CheckpointError, load_transformer

    with pytest.raises(CheckpointError, match=tensor.replace(".", r"\.") + ".*non-finite"):
        load_transformer(str(bad), quantization="mxfp8", progress=False)


def test_bad_stored_scales_rejected(model, tmp_path, capsys):
    from mxdit.loader import CheckpointError, load_transformer

    q = tmp_path / "q"
    assert cli_main(["quantize", "--model-path", str(model), "--output", str(q), "--recipe", "all-mxfp4-dual",
                     "--no-plot", "--device", "cpu", "--no-progress", "--layout", "diffusers"]) == 0
    capsys.readouterr()
    load_transformer(str(q), progress=False)  # the good one loads
    wf = sorted(f for f in os.listdir(q) if f.endswith(".safetensors"))
    assert len(wf) == 1
    sd = load_file(str(q / wf[0]))
    dual = next(k for k in sd if k.endswith("weight_dual_scale"))
    e8 = next(k for k in sd if k.endswith("weight_scale") and sd[k].dtype in (torch.uint8, torch.float8_e8m0fnu))
    for key, value in [(dual, float("nan")), (dual, float("inf")), (dual, -1.0), (dual, 0.0), (e8, 255)]:
        bad = dict(sd)
        t = bad[key].clone()
        if t.dtype == torch.float8_e8m0fnu:
            t.view(torch.uint8).view(-1)[0] = value
        elif t.dtype == torch.uint8:
            t.view(-1)[0] = value
        else:
            t.view(-1)[0] = value
        bad[key] = t
        d = tmp_path / f"bad{len(os.listdir(tmp_path))}"
        d.mkdir()
        for f in os.listdir(q):
            if not f.endswith(".safetensors"):
                (d / f).write_bytes((q / f).read_bytes())
        save_file(bad, str(d / wf[0]), metadata=None)
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
            load_transformer(str(d), progress=False)


@pytest.mark.parametrize("flag,value", [("--guidance-scale", "inf"), ("--flow-shift", "nan"), ("--boundary-ratio", "nan"),
                                        ("--guidance-scale-2", "-inf")])
def test_non_finite_cli_floats(tmp_path, capsys, flag, value):
    rc = cli_main(["generate", "--model-path", str(tmp_path), "--prompt", "x", f"{flag}={value}", "--output", str(tmp_path / "o.mp4")])
    _one_line_error(rc, capsys.readouterr().err, 2, flag, "finite")
    assert not (tmp_path / "o.mp4").exists()


# ---- failing environments ------------------------------------------------------------------------
def _mount_tmpfs(where: Path, size="1m") -> bool:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def _umount(where: Path):
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_disk_full_is_one_line_exit_1(model, tmp_path, capsys):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "256k"):
        pytest.skip("mounting a tmpfs is not permitted here (needs root / CAP_SYS_ADMIN)")
    try:
        before = _tree_hash(model)
        rc, err = _quantize(model, mnt / "out", capsys=capsys)
        _one_line_error(rc, err, 1, "no space left")
        assert os.listdir(mnt) == [] and _tree_hash(model) == before
    finally:
        _umount(mnt)


def test_read_only_output_is_one_line_exit_1(model, tmp_path, capsys):
    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt):
        pytest.skip("mounting a tmpfs is not permitted here (needs root / CAP_SYS_ADMIN)")
    try:
        if subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True).returncode:
            pytest.skip("remounting read-only is not permitted here")
        rc, err = _quantize(model, mnt / "out", capsys=capsys)
        _one_line_error(rc, err, 1, "read-only")
    finally:
        _umount(mnt)


def test_debug_shows_traceback(model, tmp_path, capsys, monkeypatch):
    mnt = tmp_path / "ro"
    monkeypatch.setenv("MXDIT_DEBUG", "1")
    import mxdit.tools.quantize as qt

    def boom(*a, **k):
        raise RuntimeError("internal failure")

    monkeypatch.setattr(qt, "quantize_model", boom)
    rc, err = _quantize(model, tmp_path / "o", capsys=capsys)
    assert rc == 1 and "Traceback" in err and err.strip().endswith("RuntimeError: internal failure")
    monkeypatch.delenv("MXDIT_DEBUG")
    rc, err = _quantize(model, tmp_path / "o", capsys=capsys)
    _one_line_error(rc, err, 1, "RuntimeError: internal failure")


def test_demo_cache_never_deletes_user_files(tmp_path, capsys):
    (tmp_path / "demo-model").mkdir()
    (tmp_path / "demo-model" / "mine.txt").write_text("keep")
    for extra in ([], ["--rebuild"]):
        rc = cli_main(["demo", "--cache-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"), *extra])
        _one_line_error(rc, capsys.readouterr().err, 2, "not written by mxdit demo")
        assert (tmp_path / "demo-model" / "mine.txt").read_text() == "keep"


# ---- layers ----------------------------------------------------------------------------------
def test_quantlinear_rejects_0d_and_integer_input():
    from mxdit.layers.linear import QuantLinear
    from mxdit.quant import get_quant_config

    layer = QuantLinear(512, 8, bias=False, quant_config=get_quant_config("mxfp8"), prefix="blocks.0.x", params_dtype=torch.float32)
    layer.weight = torch.nn.Parameter(torch.randn(8, 512), requires_grad=False)
    layer.process_weights_after_loading()
    with pytest.raises(ValueError, match="blocks.0.x.*0-d"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="blocks.0.x.*torch.int64"):
        layer(torch.ones(2, 512, dtype=torch.int64))


def test_dual_weight_row_that_flushes_is_a_zero_column():
    """A weight row of 1e-39: L0 = amax * fp32(1/6) < 2^-126 flushes to 0 (ascend-npu-mx.md §1.2);
    the block then takes the op's all-zero rule (L1 0, outputs 0) — the output column is 0,
    as plain float math gives (|x . w| < 1e-35), not NaN."""
    from mxdit.formats import quantize_mx_dual
    from mxdit.layers.linear import QuantLinear
    from mxdit.quant import get_quant_config

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 512, generator=g)
    w[2] = 1e-39
    q = quantize_mx_dual(w[2:3].to(torch.bfloat16))
    assert float(q.scale_l0[0, 0]) == 0.0 and int(q.scale_l1.max()) == 255  # what the documented op does
    layer = QuantLinear(512, 4, bias=False, quant_config=get_quant_config("mxfp4_dual"), prefix="blocks.0.x",
                        params_dtype=torch.bfloat16)
    layer.weight = torch.nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
    layer.process_weights_after_loading()
    x = torch.randn(3, 512, generator=g).to(torch.bfloat16)
    y = layer(x).float()
    ref = x.double() @ w.to(torch.bfloat16).double().t()
    assert torch.isfinite(y).all()
    assert float(y[:, 2].abs().max()) == 0.0 and float(ref[:, 2].abs().max()) < 1e-35
    # the other columns are exactly what the same layer gives them when row 2 is ordinary
    w2 = w.clone()
    w2[2] = 0.5
    other = QuantLinear(512, 4, bias=False, quant_config=get_quant_config("mxfp4_dual"), prefix="blocks.0.x",
                        params_dtype=torch.bfloat16)
    other.weight = torch.nn.Parameter(w2.to(torch.bfloat16), requires_grad=False)
    other.process_weights_after_loading()
    assert torch.equal(y[:, [0, 1, 3]], other(x).float()[:, [0, 1, 3]])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_before_anything_is_written(model, tmp_path, capsys):
    rc, err = _quantize(model, tmp_path / "out", "--device", "cuda", capsys=capsys)
    _one_line_error(rc, err, 2, "--device cuda", "no cuda device")
    assert os.listdir(tmp_path) == []


# ---- generate: broken components, bad scheduler config, NaN latents ----------------------------
GEN_SMALL = ["--height", "32", "--width", "32", "--num-frames", "5", "--num-inference-steps", "2", "--dtype", "fp32",
             "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    from _tiny_wan import tiny_model_dir

    return tiny_model_dir(tmp_path_factory, "t2v-a14b")


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_component_the_library_cannot_load(pipe_dir, tmp_path, capsys):
    d = _copy_model(pipe_dir, tmp_path / "m")
    (d / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKLWan", "z_dim": "sixteen"}')
    before = _tree_hash(d)
    rc = cli_main(["generate", "--model-path", str(d), "--prompt", "x", *GEN_SMALL, "--output", str(tmp_path / "o.mp4")])
    _one_line_error(rc, capsys.readouterr().err, 2, "vae", "config.json")  # found by the up-front check
    # a config only the library rejects: named by component, with the library's reason
    (d / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKLWan", "z_dim": 16, "dim_mult": "abc"}')
    before = _tree_hash(d)
    rc = cli_main(["generate", "--model-path", str(d), "--prompt", "x", *GEN_SMALL, "--output", str(tmp_path / "o.mp4")])
    _one_line_error(rc, capsys.readouterr().err, 1, "cannot load the vae", progress_ok=True)
    assert not (tmp_path / "o.mp4").exists() and _tree_hash(d) == before


@pytest.mark.parametrize("shift", [-1, "NaN", None, "3", "absent"])
def test_scheduler_flow_shift_must_be_finite_positive(pipe_dir, tmp_path, capsys, shift):
    d = _copy_model(pipe_dir, tmp_path / "m")
    p = d / "scheduler" / "scheduler_config.json"
    cfg = json.loads(p.read_text())
    cfg["flow_shift"] = shift
    if shift == "absent":
        del cfg["flow_shift"]
    p.write_text(json.dumps(cfg) if shift != "NaN" else json.dumps(cfg).replace('"NaN"', "NaN"))
    rc = cli_main(["generate", "--model-path", str(d), "--prompt", "x", *GEN_SMALL, "--output", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    if shift == "absent":  # no flow_shift: the scheduler's own default; runs
        assert rc == 0, err
        return
    _one_line_error(rc, err, 2, "flow_shift")
    assert not (tmp_path / "o.mp4").exists()


def test_nan_latents_write_no_video(pipe_dir, tmp_path, capsys, monkeypatch):
    from mxdit.pipelines.wan import WanVideoPipeline

    real = WanVideoPipeline.__call__

    def nan_call(self, *a, **k):
        out = real(self, *a, **k)
        out.latents[0, 0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(WanVideoPipeline, "__call__", nan_call)
    out = tmp_path / "o.mp4"
    rc = cli_main(["generate", "--model-path", str(pipe_dir), "--prompt", "x", *GEN_SMALL, "--output", str(out)])
    _one_line_error(rc, capsys.readouterr().err, 1, "non-finite", "no video", progress_ok=True)
    assert not out.exists() and os.listdir(tmp_path) == []
