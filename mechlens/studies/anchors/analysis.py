"""The thought-anchors study of a set of traces, as the CLI and the experiment run it.

`analyze` computes every per-trace attribution of one trace (categories, sentence attention and
vertical scores, the suppression matrix, and, given the problem, resampling and forced answers);
`assign_receivers` picks receiver heads from the kurtosis averaged over the traces (as the paper
does over its problems) and scores each trace's sentences with them; `method_correlations`
compares the three attributions per sentence.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> trace = ml.ReasoningTrace.from_text(model, "Q?", "One step here. Two steps here. Three here. Four.")
    >>> a = analyze(model, trace, proximity=1, cache=None)
    >>> a.categories[:1], tuple(a.suppression.shape)
    (['unknown'], (3, 3))
    >>> kurt, heads = assign_receivers([a], top_k=2)
    >>> a.receiver.shape
    (3,)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from mechlens.cache import DiskCache, model_fingerprint
from mechlens.models.sampling import Sampling
from mechlens.rollouts import Engine
from mechlens.studies.anchors.compare import spearman
from mechlens.studies.anchors.receivers import (
    kurtosis,
    receiver_heads,
    receiver_scores,
    sentence_attention,
    vertical_scores,
)
from mechlens.studies.anchors.resampling import (
    ANCHORS_SAMPLING,
    FORCED_SAMPLING,
    Embedder,
    ForcedAnswers,
    Resampling,
    forced_answers,
    resample,
    resampling_matrix,
)
from mechlens.studies.anchors.suppression import outgoing_effect, suppression_matrix
from mechlens.studies.anchors.taxonomy import Labeller, label_sentences
from mechlens.text.trace import ReasoningTrace

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

METHODS = {
    "counterfactual KL": "counterfactual",
    "receiver score": "receiver",
    "suppression effect": "outgoing",
}
"""The three attributions compared per sentence, by display name -> `TraceAnchors` attribute."""


@dataclass
class TraceAnchors:
    """Every attribution of one trace's sentences (`S` of them)."""

    trace: ReasoningTrace
    problem: object | None
    sentences: list[str]
    categories: list[str]
    attention: Tensor  # [layers, heads, S, S] sentence x sentence attention
    vertical: Tensor  # [layers, heads, S]
    suppression: Tensor  # [S target, S source]
    resampling: Resampling | None = None
    forced: ForcedAnswers | None = None
    resampling_matrix: np.ndarray | None = None  # [S target, S source]
    receiver: np.ndarray | None = field(default=None)  # [S], set by `assign_receivers`

    @property
    def outgoing(self) -> np.ndarray:
        """[S]: each sentence's mean suppression effect on the sentences after it."""
        return outgoing_effect(self.suppression).numpy()

    @property
    def counterfactual(self) -> np.ndarray:
        """[S]: counterfactual importance (KL); NaN without resampling."""
        if self.resampling is None:
            return np.full(len(self.sentences), np.nan)
        return self.resampling.counterfactual_kl


def analyze(
    model: HookedModel,
    trace: ReasoningTrace,
    problem=None,
    sampling: Sampling = ANCHORS_SAMPLING,
    forced_sampling: Sampling | None = FORCED_SAMPLING,
    proximity: int = 4,
    alpha: float = 1e-9,
    labeller: Labeller | None = None,
    embed: Embedder | None = None,
    cache: DiskCache | str | Path | bool | None = True,
    progress: bool = True,
    kl: str = "full",
    engine: Engine | None = None,
) -> TraceAnchors:
    """All attributions of `trace`: categories, sentence attention, vertical scores and the
    suppression matrix always; with a `problem` (a `datasets.Problem`), resampling with `sampling`,
    the resampling matrix, and forced answers with `forced_sampling` (None skips them).

    `kl` picks the suppression KL (`suppression_matrix`: "full", ours, or "authors"); `engine`
    samples the rollouts and forced answers (default `LocalEngine(model)`, `mechlens.rollouts`).

    `cache` stores rollouts, attention and suppression under the trace's tokens, its sentence
    spans and the model's weights (True: the mechlens cache folder; a folder or `DiskCache`; None:
    nothing stored)."""
    store = DiskCache.of(cache, "anchors")
    spans = [(s.start, s.end) for s in trace.sentences]
    key = {"tokens": trace.tokens[0].tolist(), "sentences": spans, "model": model_fingerprint(model)}

    def cached(step: str, compute, **more):
        return store.cached(step, compute, **key, **more) if store else compute()

    sentences = [s.text for s in trace.sentences]
    question = getattr(problem, "question", trace.prompt)
    attention = cached("sentence attention", lambda: sentence_attention(model, trace))
    suppression = cached(
        "suppression", lambda: suppression_matrix(model, trace, progress=progress, kl=kl), kl=kl
    )
    result = TraceAnchors(
        trace=trace,
        problem=problem,
        sentences=sentences,
        categories=label_sentences(sentences, question, labeller),
        attention=attention,
        vertical=vertical_scores(attention, proximity),
        suppression=suppression,
    )
    if problem is not None:
        result.resampling = resample(
            model,
            trace,
            problem,
            sampling,
            alpha=alpha,
            embed=embed,
            cache=store,
            progress=progress,
            engine=engine,
        )
        result.resampling_matrix = resampling_matrix(result.resampling, embed)
        if forced_sampling is not None:
            result.forced = forced_answers(
                model,
                trace,
                problem,
                forced_sampling,
                alpha=alpha,
                cache=store,
                progress=progress,
                engine=engine,
            )
    return result


def assign_receivers(
    analyses: Sequence[TraceAnchors], top_k: int = 20, min_scores: int = 10
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Receiver heads from the kurtosis of vertical scores averaged over `analyses` (layer 0
    excluded; at most as many as have a finite kurtosis), and each analysis's `receiver` scores.
    Returns `(kurtosis [layers, heads], heads)`.

    A kurtosis over fewer than `min_scores` finite vertical scores (sentences outside the
    proximity window) is noise: such traces are named in a warning."""
    if not analyses:
        raise ValueError("no analyses: give at least one TraceAnchors")
    counts = [int(torch.isfinite(a.vertical[0, 0]).sum()) for a in analyses]
    short = [i for i, n in enumerate(counts) if n < min_scores]
    if short:
        warnings.warn(
            f"receiver-head kurtosis over fewer than {min_scores} finite vertical scores is noise: "
            f"traces {short} have {[counts[i] for i in short]}; use traces with more sentences or a "
            "smaller proximity",
            stacklevel=2,
        )
    kurt = torch.stack([kurtosis(a.vertical) for a in analyses]).nanmean(0)  # [layers, heads]
    finite = int(torch.isfinite(kurt[1:]).sum())
    if finite == 0:
        raise ValueError(
            "no head has a finite kurtosis of its vertical scores: the traces are too short for the "
            "proximity used (give longer traces or a smaller proximity)"
        )
    heads = receiver_heads(kurt, top_k=min(top_k, finite))
    for a in analyses:
        a.receiver = receiver_scores(a.vertical, heads).numpy()
    return kurt, heads


def method_correlations(analyses: Sequence[TraceAnchors]) -> dict:
    """Spearman correlations of the three attributions per sentence: pooled over traces
    (`{"a ~ b": (rho, n)}`) and per trace (`[{"a ~ b": rho}]`). Needs `assign_receivers` first."""
    if any(a.receiver is None for a in analyses):
        raise ValueError("receiver scores missing: call assign_receivers(analyses) first")
    names = list(METHODS)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]

    def vector(a: TraceAnchors, name: str) -> np.ndarray:
        return np.asarray(getattr(a, METHODS[name]), dtype=float)

    pooled = {
        f"{x} ~ {y}": spearman(
            np.concatenate([vector(a, x) for a in analyses]), np.concatenate([vector(a, y) for a in analyses])
        )
        for x, y in pairs
    }
    per_trace = [{f"{x} ~ {y}": spearman(vector(a, x), vector(a, y))[0] for x, y in pairs} for a in analyses]
    return {"pooled": pooled, "per_trace": per_trace}
