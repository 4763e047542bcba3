"""Timing statistics and memory readings for the benchmark."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says why."""



def summary_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """p50/p95/mean in milliseconds of timed samples (None when there are none)."""
    if not seconds:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "mean_ms": None}
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "n": int(values.size),
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p95_ms": round(float(np.percentile(values, 95)), 3),
        "mean_ms": round(float(values.mean()), 3),
    }


def ratio(baseline: dict[str, Any], optimised: dict[str, Any], key: str = "p50_ms") -> float | None:
    """How many times faster ``optimised`` is than ``baseline`` (None when either is missing)."""
    if not baseline.get(key) or not optimised.get(key):
        return None
    return round(float(baseline[key]) / float(optimised[key]), 3)


Result = TypeVar("Result")


def timed(call: Callable[[], Result], repeats: int) -> tuple[list[float], Result]:
    """One untimed warm-up call (allocators, autotuning), then ``repeats`` timed calls."""
    result = call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        samples.append(time.perf_counter() - started)
    return samples, result


def peak_rss_mib() -> float:
    """This process's peak resident set size so far."""
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kilobytes / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


