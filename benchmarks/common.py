"""Timing helpers shared by the benchmarks: best-of-n wall time and peak RSS growth."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], repeat: int = 3) -> tuple[float, object]:
    """Fastest of `repeat` runs (seconds) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(name: str, results: dict) -> None:
    """Print `name: ratio` lines and one JSON line with everything."""
    for key, value in results.items():
        if key.endswith("ratio"):
            print(f"{name}.{key}: {value:.3f}")
    print(json.dumps({"benchmark": name, **results}), file=sys.stdout)
