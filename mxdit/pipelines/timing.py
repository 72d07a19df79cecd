"""Stage / step timing and the performance JSON.

:class:`PerfRecorder` times the pipeline's stages and denoising steps (synchronizing
the accelerator around each, so asynchronous kernels are charged to the right
stage) and turns them into a JSON record that is a superset of SGLang-Diffusion's
``--perf-dump-path`` report::

    {
      "timestamp", "request_id", "tag", "commit", "commit_hash",
      "model", "prompt", "meta": {"model", "prompt"},
      "quantization", "device", "dtype", "settings": {...},
      "total_duration_ms",
      "stages": {name: ms},                              # mxdit
      "steps": [{"name", "duration_ms"}],                # SGLang: the stages, in order
      "denoise_steps_ms": [{"step", "duration_ms", "expert", "timestep"}],
      "peak_memory": {"rss_bytes", "device_max_allocated_bytes"},
      "versions": {"mxdit", "torch", "diffusers", "transformers", "python"},
    }

So ``compare_perf`` from SGLang can read ours, and ``mxdit compare-perf`` reads both.
``peak_memory.rss_bytes`` is the process's peak RSS so far (loading included);
``device_max_allocated_bytes`` is the accelerator's peak allocation during the
generation (reset when it starts; None on CPU).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

#: the pipeline stages, in execution order (image_encoding only for image conditioning)
STAGES = (
    "input_validation",
    "text_encoding",
    "image_encoding",
    "latent_preparation",
    "timestep_preparation",
    "denoising",
    "decoding",
)


def _device_module(device: torch.device | None):
    """The torch submodule (torch.cuda, torch.npu, ...) of an accelerator device, or None for CPU."""
    if device is None or device.type in ("cpu", "meta"):
        return None
    mod = getattr(torch, device.type, None)
    if mod is None or not hasattr(mod, "synchronize"):
        return None
    return mod


def synchronize(device: torch.device | None) -> None:
    """Wait for the accelerator of ``device`` (no-op on CPU)."""
    mod = _device_module(device)
    if mod is not None:
        try:
            if mod.is_available():
                mod.synchronize(device)
        except Exception:  # a profiler must never break the run
            pass


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process, in bytes (None if unknown)."""
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except Exception:
        pass
    try:
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    except Exception:
        return None


def reset_device_peak(device: torch.device | None) -> None:
    mod = _device_module(device)
    if mod is not None and hasattr(mod, "reset_peak_memory_stats"):
        try:
            mod.reset_peak_memory_stats(device)
        except Exception:
            pass


def device_peak_bytes(device: torch.device | None) -> int | None:
    mod = _device_module(device)
    if mod is not None and hasattr(mod, "max_memory_allocated"):
        try:
            return int(mod.max_memory_allocated(device))
        except Exception:
            return None
    return None


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The git commit of the mxdit checkout (or ``$MXDIT_GIT_COMMIT``); None when unknown."""
    env = os.environ.get("MXDIT_GIT_COMMIT")
    if env:
        return env
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=str(where), capture_output=True, text=True, timeout=5
        )
    except Exception:
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    from importlib import metadata

    for name in ("mxdit", "torch", "diffusers", "transformers"):
        version = None
        try:
            version = metadata.version(name)
        except Exception:
            mod = sys.modules.get(name)
            version = getattr(mod, "__version__", None) if mod is not None else None
        out[name] = version
    return out


class PerfRecorder:
    """Times stages and denoising steps of one generation.

    >>> rec = PerfRecorder(device=torch.device("cpu"))
    >>> with rec.stage("text_encoding"):
    ...     pass
    >>> with rec.step(0, expert="transformer", timestep=999):
    ...     pass
    """

    def __init__(self, device: torch.device | str | None = None, *, sync: bool = True):
        self.device = torch.device(device) if device is not None else None
        self.sync = sync
        self.stages: dict[str, float] = {}
        self.steps: list[dict[str, Any]] = []
        self._t0: float | None = None
        self._t1: float | None = None
        self.timestamp = datetime.now(timezone.utc).isoformat()
        self.request_id = uuid.uuid4().hex

    def _sync(self) -> None:
        if self.sync:
            synchronize(self.device)

    def start(self) -> None:
        reset_device_peak(self.device)
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._sync()
        self._t1 = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._t0 is None:
            self.start()
        self._sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.stages[name] = self.stages.get(name, 0.0) + (time.perf_counter() - t) * 1e3

    @contextmanager
    def step(self, index: int, *, expert: str | None = None, timestep: float | None = None) -> Iterator[None]:
        self._sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.steps.append(
                {
                    "step": int(index),
                    "duration_ms": (time.perf_counter() - t) * 1e3,
                    "expert": expert,
                    "timestep": None if timestep is None else float(timestep),
                }
            )

    @property
    def total_ms(self) -> float:
        if self._t0 is None:
            return 0.0
        end = self._t1 if self._t1 is not None else time.perf_counter()
        return (end - self._t0) * 1e3

    def to_dict(self, **meta: Any) -> dict[str, Any]:
        """The perf record.  ``meta`` keys (model, prompt, quantization, device, dtype,
        settings, model_load_ms, ...) are stored at the top level."""
        commit = git_commit()
        model = meta.get("model")
        prompt = meta.get("prompt")
        record: dict[str, Any] = {
            "timestamp": self.timestamp,
            "request_id": self.request_id,
            "tag": meta.pop("tag", "mxdit_generate"),
            "commit": commit,
            "commit_hash": commit or "N/A",
        }
        record.update(meta)
        record.update(
            {
                "meta": {"model": model, "prompt": prompt},
                "total_duration_ms": self.total_ms,
                "stages": dict(self.stages),
                "steps": [{"name": k, "duration_ms": v} for k, v in self.stages.items()],
                "denoise_steps_ms": [dict(s) for s in self.steps],
                "peak_memory": {
                    "rss_bytes": peak_rss_bytes(),
                    "device_max_allocated_bytes": device_peak_bytes(self.device),
                },
                "versions": versions(),
            }
        )
        return record


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` via a temporary file and a rename."""
    from mxdit.fsutil import atomic_file

    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
    return path
