"""Helpers the benchmark scripts share: a median wall-clock timer and the CPU's name."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], reps: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
