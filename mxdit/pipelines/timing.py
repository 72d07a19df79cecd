"""Stage / step timing and the performance JSON.

:class:`PerfRecorder` times the pipeline's stages and denoising steps (synchronizing
the accelerator around each, so asynchronous kernels are charged to the right
stage) and turns them into SGLang-Diffusion's ``--perf-dump-path`` report
(v0.5.23 ``runtime/utils/perf_logger.py::PerformanceLogger.dump_benchmark_report``),
with mxdit's extras beside SGLang's keys::

    {
      # SGLang's keys
      "timestamp", "request_id", "commit_hash", "tag", "total_duration_ms",
      "steps": [{"name", "duration_ms"}],            # stages, SGLang's names (DenoisingStage ...)
      "denoise_steps_ms": [{"step", "duration_ms",   # SGLang
                            "expert", "timestep"}],  # mxdit
      "memory_checkpoints": {name: {"allocated_mb", "reserved_mb", "peak_allocated_mb",
                                    "peak_reserved_mb", "peak_host_anon_mb"}},
      "meta": {"prompt", "model"},
      # mxdit's extras
      "quantization", "device", "dtype", "settings": {...}, "model_load_ms", "model_memory_bytes",
      "peak_memory": {"rss_bytes", "device_max_allocated_bytes"},
      "versions": {"mxdit", "torch", "diffusers", "transformers", "python"},
    }

Stage names: :data:`SGLANG_STAGE_NAMES` maps mxdit's internal names (``denoising`` ...)
to SGLang's stage classes; it is the one table, also used to read older mxdit files
(:func:`sglang_stage_name`).  ``peak_memory.rss_bytes`` is the process's peak RSS so far
(loading included); ``device_max_allocated_bytes`` is the accelerator's peak allocation
during the generation (reset when it starts; None on CPU).  ``memory_checkpoints``
``before_forward`` / ``after_forward`` (SGLang's names) hold the accelerator's allocator
figures (zeros on CPU, and ``peak_host_anon_mb`` is 0.0: no sampler runs, as SGLang's
records where none ran).
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

#: mxdit's pipeline stage -> SGLang's stage class name (what its perf JSON lists in ``steps``).
#: Wan2.2 has no CLIP image encoder: its image goes through the VAE (SGLang's ImageVAEEncodingStage).
SGLANG_STAGE_NAMES = {
    "input_validation": "InputValidationStage",
    "text_encoding": "TextEncodingStage",
    "image_encoding": "ImageVAEEncodingStage",
    "latent_preparation": "LatentPreparationStage",
    "timestep_preparation": "TimestepPreparationStage",
    "denoising": "DenoisingStage",
    "decoding": "DecodingStage",
}


def sglang_stage_name(name: str) -> str:
    """SGLang's name of a stage (mxdit's old names mapped; anything else unchanged)."""
    return SGLANG_STAGE_NAMES.get(name, name)


def stage_ms(perf: dict[str, Any], stage: str) -> float | None:
    """A stage's duration in a perf record (new or old mxdit, or SGLang), by either name."""
    want = sglang_stage_name(stage)
    for s in perf.get("steps") or ():
        if isinstance(s, dict) and sglang_stage_name(str(s.get("name"))) == want:
            return float(s.get("duration_ms", 0.0))
    old = perf.get("stages")
    if isinstance(old, dict):
        for k, v in old.items():
            if sglang_stage_name(str(k)) == want:
                return float(v)
    return None


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


def memory_snapshot(device: torch.device | None) -> dict[str, float]:
    """SGLang's ``MemorySnapshot.to_dict()`` for ``device`` (MiB, 2 decimals; zeros on CPU)."""
    mod = _device_module(device)
    vals = {"allocated_mb": 0.0, "reserved_mb": 0.0, "peak_allocated_mb": 0.0, "peak_reserved_mb": 0.0}
    if mod is not None:
        for key, fn in (("allocated_mb", "memory_allocated"), ("reserved_mb", "memory_reserved"),
                        ("peak_allocated_mb", "max_memory_allocated"), ("peak_reserved_mb", "max_memory_reserved")):
            try:
                vals[key] = round(float(getattr(mod, fn)(device)) / 2**20, 2)
            except Exception:  # a profiler must never break the run
                pass
    vals["peak_host_anon_mb"] = 0.0
    return vals


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
        self.memory_checkpoints: dict[str, dict[str, float]] = {}
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
        self.memory_checkpoints["before_forward"] = memory_snapshot(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._sync()
        self._t1 = time.perf_counter()
        self.memory_checkpoints["after_forward"] = memory_snapshot(self.device)

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
        """The perf record: SGLang's keys, then ``meta`` (quantization, device, dtype, settings,
        model_load_ms, ...; ``model`` and ``prompt`` go into SGLang's ``meta``)."""
        if self._t1 is None:
            self.stop()
        model = meta.pop("model", None)
        prompt = meta.pop("prompt", None)
        record: dict[str, Any] = {
            "timestamp": self.timestamp,
            "request_id": self.request_id,
            "commit_hash": git_commit() or "N/A",
            "tag": meta.pop("tag", "mxdit_generate"),
            "total_duration_ms": self.total_ms,
            "steps": [{"name": sglang_stage_name(k), "duration_ms": v} for k, v in self.stages.items()],
            "denoise_steps_ms": [dict(s) for s in self.steps],
            "memory_checkpoints": {k: dict(v) for k, v in self.memory_checkpoints.items()},
            "meta": {"prompt": prompt, "model": model},
        }
        record.update(meta)
        record["peak_memory"] = {
            "rss_bytes": peak_rss_bytes(),
            "device_max_allocated_bytes": device_peak_bytes(self.device),
        }
        record["versions"] = versions()
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
