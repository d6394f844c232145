"""Memory bounded by a chunk, not by the trace: each analysis of a 4000-token trace of the
embedded model, run in a fresh process as `benchmarks/long_trace.py` runs it, stays under its
bound (the previous release's logit lens grew by 5.6 GB at 8k tokens, its suppression matrix by
4.7 GB at 2k). Peaks are live memory: the children fix glibc's mmap threshold (`MEMORY_ENV`),
without which the same run measures up to 2.5x more from allocator fragmentation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from long_trace import run_child  # noqa: E402

TOKENS = 4000
BOUNDS_MB = {  # peak resident growth above the loaded model
    "lens": 600,  # KV cache 188 MB + one chunk's attention, captures and unembedding blocks
    "score": 2000,
    "attention": 2000,
    "suppression-one-source": 2000,
}


@pytest.mark.slow
@pytest.mark.parametrize("analysis", list(BOUNDS_MB))
def test_peak_memory_of_a_long_trace(analysis):
    row = run_child(analysis, TOKENS, None, limit_gb=8.0, memory=True)  # a fresh process, capped
    assert "error" not in row, row
    assert TOKENS - 200 < row["tokens"] <= TOKENS and row["sentences"] == 8
    assert row["peak_growth_mb"] < BOUNDS_MB[analysis], row
