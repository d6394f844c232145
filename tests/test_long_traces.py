"""Memory bounded by a chunk, not by the trace: peak memory growth of each analysis of a
2000-token trace of the embedded model stays under its bound (benchmarks/long_trace.py measures
512 to 8k tokens)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import mechlens as ml
from mechlens.studies import anchors, depth

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import PeakMemory  # noqa: E402
from long_trace import build_trace  # noqa: E402

TOKENS = 2000


@pytest.fixture(scope="module")
def long_trace(embedded_tl):
    trace = build_trace(embedded_tl, TOKENS)
    assert TOKENS - 100 < trace.n_tokens <= TOKENS and len(trace.sentences) == 8
    return trace


def residual_stream_mb(model, n_tokens: int) -> float:
    return model.n_layers * n_tokens * model.d_model * 4 / 2**20


@pytest.mark.slow
def test_lens_memory_grows_like_the_residual_stream(embedded_tl, long_trace):
    model = embedded_tl
    model(long_trace.tokens[:, :64])  # first-call allocations are not the lens's
    with PeakMemory() as mem:
        lens = ml.logit_lens(model, long_trace.tokens, stats=("entropy", "kl_final", "top1"))
    # 300 MB at 512 tokens, then no faster than the residual stream (30 x pos x 576 floats)
    bound = 300 + residual_stream_mb(model, long_trace.n_tokens)
    assert mem.extra_mb < bound, f"logit lens grew by {mem.extra_mb:.0f} MB (bound {bound:.0f} MB)"
    assert lens.entropy.shape == (model.n_layers, 1, long_trace.n_tokens)
    assert float(lens.kl_final[-1].abs().max()) < 1e-3  # the last layer is the output


@pytest.mark.slow
def test_score_attention_and_suppression_stay_small(embedded_tl, long_trace):
    model = embedded_tl
    for name, call in {
        "reasoning score + signals + step attention": lambda: depth.analyze_trace(
            model, long_trace, unit="sentence"
        ),
        "sentence attention": lambda: anchors.sentence_attention(model, long_trace),
        "suppression (one source)": lambda: anchors.suppression_matrix(model, long_trace, sources=[0]),
    }.items():
        with torch.no_grad(), PeakMemory() as mem:
            call()
        assert mem.extra_mb < 1500, f"{name} grew by {mem.extra_mb:.0f} MB at {long_trace.n_tokens} tokens"
