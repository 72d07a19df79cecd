"""Serving overhead: N concurrent clients against `mxdit serve` (tiny model) beside `mxdit generate` N times.

Prints p50/p99 latency (submit -> completed), queue wait (submit -> in_progress, as polled), throughput,
and the ratio of the server's per-job time (wall / N) to one `mxdit generate` denoise+decode run measured
in the same run (its perf JSON's total_duration_ms, i.e. without the model load the server does once).
Run: PYTHONPATH=$PWD python benchmarks/bench_serve.py --clients 4
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

BODY = {"prompt": "a red fox", "size": "32x32", "num_frames": 5, "num_inference_steps": 2, "seed": 7, "fps": 8}


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--model-path", default=None, help="default: a tiny random T2V-A14B model built here")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = a.model_path
    if model is None:
        from mxdit.pipelines.tiny import build_tiny_wan_model_dir

        model = str(build_tiny_wan_model_dir(tmp / "model", "t2v-a14b"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "mxdit", "serve", "--model-path", model, "--dtype", "fp32",
                             "--device", "cpu", "--port", str(port), "--output-path", str(tmp / "out"),
                             "--max-queue-size", str(max(16, a.clients))], stderr=subprocess.DEVNULL)
    lat, wait = [], []
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit("server did not start")

        def client():
            t0 = time.perf_counter()
            vid = httpx.post(f"{base}/v1/videos", json=BODY, timeout=30).json()["id"]
            started = None
            for _ in range(20000):
                st = httpx.get(f"{base}/v1/videos/{vid}", timeout=30).json()["status"]
                if st != "queued" and started is None:
                    started = time.perf_counter()
                if st in ("completed", "failed"):
                    break
                time.sleep(0.01)
            lat.append(time.perf_counter() - t0)
            wait.append((started or time.perf_counter()) - t0)

        t0 = time.perf_counter()
        th = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in th:
            t.start()
        for t in th:
            t.join(600)
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(60)
    gen_total, gen_wall = [], []
    for i in range(a.clients):
        perf = tmp / f"gen{i}.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mxdit", "generate", "--model-path", model, "--prompt", BODY["prompt"],
                        "--height", "32", "--width", "32", "--num-frames", "5", "--num-inference-steps", "2",
                        "--seed", "7", "--fps", "8", "--dtype", "fp32", "--device", "cpu", "--no-progress",
                        "--output", str(tmp / f"gen{i}.mp4"), "--perf-dump-path", str(perf)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gen_wall.append(time.perf_counter() - t0)
        gen_total.append(json.loads(perf.read_text())["total_duration_ms"] / 1e3)
    per_job = wall / a.clients
    g = sum(gen_total) / len(gen_total)
    print(f"| clients | p50 latency s | p99 latency s | p50 queue wait s | throughput jobs/s | server s/job "
          f"| generate pipeline s/run | generate process s/run | ratio server/pipeline |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {a.clients} | {_pct(lat, .5):.3f} | {_pct(lat, .99):.3f} | {_pct(wait, .5):.3f} | "
          f"{a.clients / wall:.3f} | {per_job:.3f} | {g:.3f} | {sum(gen_wall) / len(gen_wall):.3f} | {per_job / g:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
