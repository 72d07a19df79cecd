"""``mxdit compare-perf BASE.json NEW.json [MORE.json ...]``: a markdown performance report.

The report has the structure of SGLang-Diffusion's ``benchmarks/compare_perf.py``
(``### Performance Comparison Report``, ``#### 1. High-level Summary``,
``#### 2. Stage Breakdown``, a ``<details>`` metadata block) and reads both
mxdit's perf JSON and SGLang's (``steps`` = stages, ``denoise_steps_ms``).

Status rules (SGLang's):

* E2E latency / denoising / peak memory: ``✅`` if the change is below -2 %,
  ``❌`` above +2 %, ``⚪️`` otherwise.
* Stages: ``🔴`` if new > max(base x 1.1, base + 120 ms), ``🟢`` if
  new < min(base x 0.9, base - 120 ms), ``⚪️`` otherwise.

Stage names go through :data:`mxdit.pipelines.timing.SGLANG_STAGE_NAMES`, so older mxdit
files (``denoising`` ...) line up row for row with SGLang's and new mxdit files
(``DenoisingStage`` ...).

``denoising_step_N`` entries of a ``steps`` list and the ``denoise_steps_ms``
list are grouped into one ``Denoising Loop (n steps)`` row, with one sub-row
per expert for two-expert models.  The first file is the baseline; with three
or more files every table gets one column per file.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from mxdit.errors import UsageError
from mxdit.pipelines.timing import sglang_stage_name

LOOP = "Denoising Loop"
_STEP_RE = re.compile(r"^denoising_step_(\d+)$")
DENOISE_STAGE = sglang_stage_name("denoising")


@dataclass
class PerfRun:
    """One perf JSON, normalized."""

    label: str
    total_ms: float
    stages: dict[str, float]  # execution order; denoising_step_N grouped into LOOP
    loop_ms: float | None  # sum of the denoising steps (None when unknown)
    loop_steps: int
    experts: dict[str, tuple[int, float]] = field(default_factory=dict)  # expert -> (steps, ms)
    denoise_ms: float | None = None
    peak_bytes: int | None = None
    peak_kind: str | None = None  # "device" or "rss"
    weight_bytes: int | None = None  # transformer (+ transformer_2) weights, mxdit records only
    meta: dict[str, Any] = field(default_factory=dict)


def _num(value: Any, what: str, path: Path) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{path}: {what} is not a number ({value!r})") from None
    if math.isnan(v):
        raise UsageError(f"{path}: {what} is NaN")
    return v


def load_perf(path: str | Path) -> PerfRun:
    """Read an mxdit or SGLang perf JSON (raises :class:`UsageError` naming the file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "total_duration_ms" not in data:
        raise UsageError(f"{path} is not a perf JSON (no total_duration_ms)")
    total = _num(data["total_duration_ms"], "total_duration_ms", path)

    stages: dict[str, float] = {}
    loop_from_steps = 0.0
    loop_count = 0
    steps = data.get("steps")
    if isinstance(steps, list) and steps and isinstance(steps[0], dict):
        for i, s in enumerate(steps):
            name = sglang_stage_name(str(s.get("name", f"stage_{i}")))
            ms = _num(s.get("duration_ms", s.get("execution_time_ms", 0.0)), f"steps[{i}].duration_ms", path)
            if _STEP_RE.match(name):
                loop_from_steps += ms
                loop_count += 1
                stages.setdefault(LOOP, 0.0)
                stages[LOOP] += ms
            else:
                stages[name] = stages.get(name, 0.0) + ms
    elif isinstance(data.get("stages"), dict):
        for name, ms in data["stages"].items():  # old mxdit files (no "steps" list of dicts)
            stages[sglang_stage_name(str(name))] = _num(ms, f"stages[{name!r}]", path)
    elif isinstance(data.get("stages"), list):  # SGLang performance.log records
        for i, s in enumerate(data["stages"]):
            stages[sglang_stage_name(str(s.get("name")))] = _num(s.get("execution_time_ms", s.get("duration_ms")), f"stages[{i}]", path)

    experts: dict[str, tuple[int, float]] = {}
    loop_ms: float | None = None
    n_loop = 0
    dsteps = data.get("denoise_steps_ms")
    if isinstance(dsteps, list) and dsteps:
        loop_ms = 0.0
        for i, s in enumerate(dsteps):
            ms = _num(s.get("duration_ms") if isinstance(s, dict) else s, f"denoise_steps_ms[{i}]", path)
            loop_ms += ms
            n_loop += 1
            expert = s.get("expert") if isinstance(s, dict) else None
            if expert:
                n, t = experts.get(expert, (0, 0.0))
                experts[expert] = (n + 1, t + ms)
        stages.pop(LOOP, None)  # the per-step list is the better source
    elif loop_count:
        loop_ms, n_loop = loop_from_steps, loop_count
        stages.pop(LOOP, None)

    denoise_ms = stages.get(DENOISE_STAGE)
    if denoise_ms is None:
        denoise_ms = loop_ms

    peak_bytes, peak_kind = None, None
    pm = data.get("peak_memory")
    if isinstance(pm, dict):
        if pm.get("device_max_allocated_bytes") is not None:
            peak_bytes, peak_kind = int(pm["device_max_allocated_bytes"]), "device"
        elif pm.get("rss_bytes") is not None:
            peak_bytes, peak_kind = int(pm["rss_bytes"]), "rss"
    elif isinstance(pm, (int, float)):
        peak_bytes, peak_kind = int(pm), "rss"

    weight_bytes = None
    mm = data.get("model_memory_bytes")
    if isinstance(mm, dict) and mm.get("transformer") is not None:
        weight_bytes = int(mm["transformer"]) + int(mm.get("transformer_2") or 0)

    meta = {
        "commit": data.get("commit") or data.get("commit_hash") or "N/A",
        "timestamp": data.get("timestamp"),
        "model": data.get("model") or (data.get("meta") or {}).get("model"),
        "quantization": data.get("quantization"),
        "device": data.get("device"),
        "tag": data.get("tag"),
    }
    return PerfRun(
        label=path.name, total_ms=total, stages=stages, loop_ms=loop_ms, loop_steps=n_loop, experts=experts,
        denoise_ms=denoise_ms, peak_bytes=peak_bytes, peak_kind=peak_kind, weight_bytes=weight_bytes, meta=meta,
    )


# ------------------------------------------------------------------ formatting
def pct(base: float, new: float) -> float:
    return 0.0 if base == 0 else (new - base) / base * 100.0


def summary_status(base: float, new: float, better: str = "Faster", worse: str = "Slower") -> str:
    p = pct(base, new)
    if p < -2.0:
        return f"✅ ({better})"
    if p > 2.0:
        return f"❌ ({worse})"
    return "⚪️ (Similar)"


def stage_status(base: float, new: float, rel_tol: float = 0.1, min_abs_ms: float = 120.0) -> str:
    if new > max(base * (1 + rel_tol), base + min_abs_ms):
        return "🔴"
    if new < min(base * (1 - rel_tol), base - min_abs_ms):
        return "🟢"
    return "⚪️"


def fmt_bytes(n: float) -> str:
    a = abs(n)
    if a >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    return f"{n / 1024**2:.1f} MiB"


def _rows(runs: Sequence[PerfRun]) -> list[tuple[str, list[float | None]]]:
    """Stage rows in execution order (new runs' order first, as SGLang), with the loop after denoising."""
    order: list[str] = []
    for r in list(runs[1:]) + [runs[0]]:
        for name in r.stages:
            if name not in order:
                order.append(name)
    rows: list[tuple[str, list[float | None]]] = []
    loop_rows = _loop_rows(runs)
    placed = False
    for name in order:
        rows.append((name, [r.stages.get(name) for r in runs]))
        if not placed and name == DENOISE_STAGE:
            rows.extend(loop_rows)
            placed = True
    if not placed:
        rows.extend(loop_rows)
    return rows


def _loop_rows(runs: Sequence[PerfRun]) -> list[tuple[str, list[float | None]]]:
    if all(r.loop_ms is None for r in runs):
        return []
    counts = [r.loop_steps for r in runs if r.loop_ms is not None]
    n = (f"{counts[0]} steps" if len(set(counts)) == 1 else "->".join(str(c) for c in counts) + " steps")
    rows = [(f"{LOOP} ({n})", [r.loop_ms for r in runs])]
    experts: list[str] = []
    for r in runs:
        for e in r.experts:
            if e not in experts:
                experts.append(e)
    if len(experts) > 1:
        for e in experts:
            ecounts = [r.experts.get(e, (0, 0.0))[0] for r in runs]
            en = (f"{ecounts[0]}" if len(set(ecounts)) == 1 else "->".join(map(str, ecounts)))
            rows.append((f"↳ {e} ({en} steps)", [r.experts[e][1] if e in r.experts else None for r in runs]))
    return rows


def render_report(runs: Sequence[PerfRun], *, now: str | None = None) -> str:
    """The markdown report; ``runs[0]`` is the baseline."""
    if len(runs) < 2:
        raise ValueError("need a baseline and at least one other run")
    now = now or datetime.now(timezone.utc).isoformat(timespec="seconds")
    out: list[str] = ["### Performance Comparison Report", ""]
    base = runs[0]
    two = len(runs) == 2

    # ---------------------------------------------------------------- summary
    out.append("#### 1. High-level Summary")
    metrics: list[tuple[str, list[float | None], str]] = [
        ("E2E Latency", [r.total_ms for r in runs], "ms"),
        ("Denoising", [r.denoise_ms for r in runs], "ms"),
    ]
    peak_kinds = {r.peak_kind for r in runs}
    if None not in peak_kinds:
        label = "Peak Memory (device)" if peak_kinds == {"device"} else "Peak Memory (RSS)"
        if len(peak_kinds) > 1:
            label = "Peak Memory (mixed: device/RSS)"
        metrics.append((label, [r.peak_bytes for r in runs], "bytes"))
    else:
        metrics.append(("Peak Memory", [r.peak_bytes for r in runs], "bytes"))
    if any(r.weight_bytes is not None for r in runs):
        metrics.append(("Transformer Weights", [r.weight_bytes for r in runs], "bytes"))

    def fmt(v: float | None, unit: str) -> str:
        if v is None:
            return "n/a"
        return fmt_bytes(v) if unit == "bytes" else f"{v:.2f} ms"

    def fmt_diff(b: float, n: float, unit: str) -> str:
        d = n - b
        ds = (("+" if d >= 0 else "-") + fmt_bytes(abs(d))) if unit == "bytes" else f"{d:+.2f} ms"
        return f"{ds} ({pct(b, n):+.1f}%)"

    def status(b: float, n: float, unit: str) -> str:
        if unit == "bytes":
            return summary_status(b, n, "Lower", "Higher")
        return summary_status(b, n)

    if two:
        new = runs[1]
        out += ["| Metric | Baseline | New | Diff | Status |", "| :--- | :--- | :--- | :--- | :--- |"]
        for name, vals, unit in metrics:
            b, n = vals
            if b is None or n is None:
                out.append(f"| **{name}** | {fmt(b, unit)} | {fmt(n, unit)} | - | - |")
            else:
                out.append(f"| **{name}** | {fmt(b, unit)} | {fmt(n, unit)} | **{fmt_diff(b, n, unit)}** | "
                           f"{status(b, n, unit)} |")
        tb = 1000 / base.total_ms if base.total_ms else 0.0
        tn = 1000 / new.total_ms if new.total_ms else 0.0
        out.append(f"| **Throughput** | {tb:.2f} req/s | {tn:.2f} req/s | - | - |")
    else:
        out.append("| Metric | " + " | ".join(f"{r.label}" for r in runs) + " |")
        out.append("| :--- |" + " :--- |" * len(runs))
        for name, vals, unit in metrics:
            cells = [fmt(vals[0], unit) + (" (baseline)" if vals[0] is not None else "")]
            for v in vals[1:]:
                if v is None or vals[0] is None:
                    cells.append(fmt(v, unit))
                else:
                    cells.append(f"{fmt(v, unit)} ({pct(vals[0], v):+.1f}%) {status(vals[0], v, unit).split()[0]}")
            out.append(f"| **{name}** | " + " | ".join(cells) + " |")
        out.append("| **Throughput** | " + " | ".join(
            f"{1000 / r.total_ms if r.total_ms else 0.0:.2f} req/s" for r in runs) + " |")
    out += ["", ""]

    # ---------------------------------------------------------------- stages
    out.append("#### 2. Stage Breakdown")
    rows = _rows(runs)
    if not rows:
        out.append("*No stage timings in these files.*")
    elif two:
        out += ["| Stage Name | Baseline (ms) | New (ms) | Diff (ms) | Diff (%) | Status |",
                "| :--- | :--- | :--- | :--- | :--- | :--- |"]
        for name, (b, n) in rows:
            if b is None or n is None:
                out.append(f"| {name} | {_f(b)} | {_f(n)} | - | - | - |")
            else:
                out.append(f"| {name} | {b:.2f} | {n:.2f} | {n - b:+.2f} | {pct(b, n):+.1f}% | {stage_status(b, n)} |")
    else:
        out.append("| Stage Name | " + " | ".join(f"{r.label} (ms)" for r in runs) + " |")
        out.append("| :--- |" + " :--- |" * len(runs))
        for name, vals in rows:
            b = vals[0]
            cells = [_f(b)]
            for v in vals[1:]:
                if v is None or b is None:
                    cells.append(_f(v))
                else:
                    cells.append(f"{v:.2f} ({pct(b, v):+.1f}%) {stage_status(b, v)}")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", ""]

    # ---------------------------------------------------------------- metadata
    out += ["<details>", "<summary>Metadata</summary>", ""]
    for i, r in enumerate(runs):
        role = "Baseline" if i == 0 else ("New" if two else f"Run {i}")
        extras = ", ".join(f"{k}: {r.meta[k]}" for k in ("model", "quantization", "device", "timestamp")
                           if r.meta.get(k) is not None)
        out.append(f"- {role} (`{r.label}`) Commit: `{r.meta.get('commit', 'N/A')}`" + (f"; {extras}" if extras else ""))
    out.append(f"- Timestamp: {now}")
    out.append("</details>")
    return "\n".join(out) + "\n"


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def compare_files(paths: Sequence[str | Path], *, now: str | None = None) -> str:
    return render_report([load_perf(p) for p in paths], now=now)


# ------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("baseline", help="baseline perf JSON (mxdit or SGLang --perf-dump-path)")
    p.add_argument("new", nargs="+", help="perf JSON(s) to compare with the baseline")


def run(args: argparse.Namespace) -> int:
    print(compare_files([args.baseline, *args.new]), end="")
    return 0
