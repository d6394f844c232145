"""Timing and memory helpers shared by the benchmarks: best-of-n wall time, peak RSS growth."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import sys
import threading
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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak resident memory above the level at entry (MB), sampled every `interval` seconds.

    Returns freed heap memory to the system first, so that methods measured one after another
    in one process each start from a fair baseline.

        >>> with PeakMemory() as mem:
        ...     x = bytearray(50 * 2**20)
        >>> mem.extra_mb > 40
        True
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.extra_mb = interval, 0.0

    def __enter__(self) -> PeakMemory:
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._start, self._peak, self._stop = _rss_mb(), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_mb())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_mb())
        self.extra_mb = self._peak - self._start


def report(name: str, results: dict) -> None:
    """Print `name: ratio` lines and one JSON line with everything."""
    for key, value in results.items():
        if key.endswith("ratio"):
            print(f"{name}.{key}: {value:.3f}")
    print(json.dumps({"benchmark": name, **results}), file=sys.stdout)


def is_oom(text: str) -> bool:
    """Whether an error's text (an exception's type and message, or a child's stderr) says that
    memory ran out."""
    text = text.lower()
    return "memoryerror" in text or "can't allocate" in text or "out of memory" in text
