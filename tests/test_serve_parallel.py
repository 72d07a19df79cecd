"""`mxdit serve --num-gpus 2 --ulysses-degree 2` (spawned gloo ranks): rank 0 serves, the peer runs each job too."""
from __future__ import annotations

import os
import signal
import time

import httpx
import numpy as np
import pytest
import torch

from _tiny_wan import tiny_model_dir
from test_serve import REQ, _frames, _free_port, _start, _stop, _wait_done, _wait_health

from mxdit.cli import main


def _children(pid: int) -> dict[int, str]:
    """Live child processes of ``pid`` (from /proc): pid -> command line."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    out[int(d)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    return out


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_two_rank_server_matches_one_process_generate(tmp_path_factory, tmp_path):
    model = tiny_model_dir(tmp_path_factory, "t2v-a14b")
    ref = tmp_path / "ref.mp4"
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        assert main(["generate", "--model-path", str(model), "--prompt", "a red fox", "--height", "32", "--width",
                     "32", "--num-frames", "5", "--num-inference-steps", "2", "--seed", "7", "--fps", "8",
                     "--dtype", "fp32", "--device", "cpu", "--quantization", "mxfp8", "--num-gpus", "1",
                     "--output", str(ref), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)

    out = tmp_path / "served"
    port = _free_port()
    proc = _start(model, out, port, "--num-gpus", "2", "--ulysses-degree", "2", "--quantization", "mxfp8",
                  "--dist-timeout", "60")
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_health(base, proc, timeout=60)
        ranks = [p for p, cmd in _children(proc.pid).items() if "multiprocessing" in cmd and "spawn_main" in cmd]
        assert len(ranks) == 2, _children(proc.pid)
        m = httpx.get(f"{base}/v1/models", timeout=5).json()
        assert m["data"][0]["quantization"] == "mxfp8"
        # 1 latent frame of 2x2 patches... 16x16 and 1 frame -> 1 token: not divisible by SP 2 -> 400, no job
        r = httpx.post(f"{base}/v1/videos", json={"prompt": "x", "size": "16x16", "num_frames": 1}, timeout=10)
        assert r.status_code == 400 and "sequence-parallel degree 2" in r.json()["error"]["message"], r.text
        vid = httpx.post(f"{base}/v1/videos", json={"prompt": "a red fox", "size": "32x32", **REQ},
                         timeout=10).json()["id"]
        obj = _wait_done(base, vid, timeout=60)
        assert obj["status"] == "completed", obj
        r = httpx.get(f"{base}/v1/videos/{vid}/content", timeout=10)
        assert r.status_code == 200
        got = tmp_path / "got.mp4"
        got.write_bytes(r.content)
        np.testing.assert_array_equal(_frames(got), _frames(ref))
        assert sorted(p.name for p in out.glob("*.mp4")) == [f"{vid}.mp4"]  # rank 0 alone wrote
    finally:
        rc = _stop(proc, signal.SIGTERM)
    assert rc == 0, proc.stderr.read().decode()[-3000:]
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in ranks), "a rank process outlived the server"


def test_taken_port_fails_before_any_rank_starts(tmp_path_factory, tmp_path):
    import socket
    import subprocess
    import sys

    model = tiny_model_dir(tmp_path_factory, "t2v-a14b")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "mxdit", "serve", "--model-path", str(model), "--device", "cpu",
                            "--port", str(port), "--output-path", str(tmp_path), "--num-gpus", "2",
                            "--ulysses-degree", "2"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    err = p.stderr.strip()
    assert err.startswith(f"mxdit serve: error: cannot listen on 127.0.0.1:{port}") and "\n" not in err, err
    assert not list(tmp_path.glob("*.mp4"))


def test_distributed_engine_failures(tmp_path):
    """Without a process group (broadcast is the identity): which pipeline failures leave the ranks in step."""
    from types import SimpleNamespace

    from mxdit.serve.engine import DistributedEngine

    calls = []

    def pipe(*a, **k):
        calls.append(a[0])
        raise (ValueError if a[0] == "bad input" else RuntimeError)("boom")

    broken = []
    eng = DistributedEngine(pipe, SimpleNamespace(), group=None, on_broken=lambda: broken.append(True))
    with pytest.raises(ValueError):  # an input error: every rank meets it, they stay in step
        eng.generate({"prompt": "bad input", "fps": 8}, tmp_path / "a.mp4")
    assert not eng.broken and not broken
    with pytest.raises(RuntimeError):  # anything else: out of step, the server is told to stop
        eng.generate({"prompt": "oom", "fps": 8}, tmp_path / "b.mp4")
    assert eng.broken and broken == [True]
    with pytest.raises(RuntimeError, match="out of step"):  # no further job is handed out
        eng.generate({"prompt": "next", "fps": 8}, tmp_path / "c.mp4")
    assert calls == ["bad input", "oom"] and not list(tmp_path.iterdir())


def test_distributed_engine_sends_the_decoded_image(tmp_path):
    """An uploaded image travels to the peers as pixels (a peer on another host cannot read rank 0's uploads/)."""
    from types import SimpleNamespace

    from PIL import Image

    from mxdit.serve.engine import DistributedEngine

    rgba = np.random.default_rng(0).integers(0, 256, (8, 12, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "in.png")
    seen = []

    def pipe(*a, **k):
        seen.append(k["image"])
        raise ValueError("stop here")

    eng = DistributedEngine(pipe, SimpleNamespace(), group=None)
    with pytest.raises(ValueError, match="stop here"):
        eng.generate({"prompt": "x", "image": str(tmp_path / "in.png"), "fps": 8}, tmp_path / "o.mp4")
    assert isinstance(seen[0], Image.Image) and seen[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(seen[0]), rgba[..., :3])
