"""Depth scoring of reasoning traces with the logit lens: the Reasoning Score, hallucination
features and the RHD detector (Sun et al., "Detection and Mitigation of Hallucination in Large
Reasoning Models: A Mechanistic Perspective").

The Reasoning Score of step k averages, over the step's tokens and a set of late layers J, the
divergence between layer j's logit-lens distribution and the model's output distribution:
`R_k = mean_{t in step k} mean_{j in J} JSD(p_final(t), p_j(t))`. High means the late layers
still change the prediction (deep processing); low means the answer was fixed early (shallow).

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> trace = ml.ReasoningTrace.from_text(model, "What is 2+3?",
    ...     "First, add 2 and 3.\\n\\nThat gives 5.\\n\\nSo the answer is 5.")
    >>> rs = reasoning_score(model, trace)
    >>> rs.step_scores.shape, rs.layers
    (torch.Size([3]), [1])
    >>> analysis = analyze_trace(model, trace)
    >>> sorted(analysis.features) == sorted([*FEATURES, "backtrack_attn"])
    True
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from mechlens.models.hooked import ActivationCache
from mechlens.ops.attention import SpanAttention
from mechlens.ops.lens import lens_from_cache
from mechlens.ops.probes import LinearProbe
from mechlens.ops.signals import SignalRows, TokenSignals
from mechlens.text.trace import ReasoningTrace, Sentence

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

FEATURES = ("mean_score", "fluctuation", "attn_score", "score_ppl_corr")
"""The RHD detector's inputs: mean Reasoning Score, early-stage fluctuation (CV), attention of
late steps to anomalous early steps, and the correlation of step score with step perplexity."""

BACKTRACK_CUES = (
    "wait", "actually", "hmm", "however", "let me check", "let me recheck", "let me re-check",
    "double-check", "double check", "on second thought", "i made a mistake", "that's not right",
    "that is not right", "correction", "reconsider", "re-evaluate", "let me try again",
)  # fmt: skip
DIVERGENCES = ("jsd", "kl")


def late_layers(n_layers: int, fraction: float = 0.5) -> list[int]:
    """The last `fraction` of the layers, without the final layer (whose lens is the output).

    >>> late_layers(30)
    [15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28]
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    first = min(n_layers - 2, int(n_layers * (1 - fraction)))
    return list(range(max(0, first), n_layers - 1)) or [0]


@dataclass
class ReasoningScore:
    """Reasoning Score of one trace.

    token_scores: `[pos]`, each token's score (of the distribution that predicted it), NaN
        outside the steps; step_scores: `[n_steps]`, mean over each step's tokens.
    """

    layers: list[int]
    divergence: str
    steps: list[Sentence]
    token_scores: Tensor
    step_scores: Tensor


def step_means(token_values: Tensor, steps: Sequence[Sentence]) -> Tensor:
    """Mean of `token_values [pos]` over each step's token span, `[n_steps]`.

    >>> from mechlens.text.trace import Sentence
    >>> step_means(torch.arange(6.0), [Sentence(0, "a", 1, 3, 0, 1), Sentence(1, "b", 3, 6, 1, 2)])
    tensor([1.5000, 4.0000])
    """
    if not steps:
        raise ValueError("no steps: the trace has nothing to score")
    return torch.stack([token_values[s.start : s.end].mean() for s in steps])


def _token_scores(per_position: Tensor) -> Tensor:
    """Per-position values (the distribution at t predicts token t+1) -> per-token, `[pos]`."""
    return torch.cat([torch.full((1,), float("nan")), per_position[:-1]])


def _check(divergence: str, unit: str) -> str:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if unit not in ("sentence", "paragraph", "line"):
        raise ValueError(f"unit must be 'sentence', 'paragraph' or 'line', got {unit!r}")
    return "jsd_final" if divergence == "jsd" else "kl_final"


def reasoning_score(
    model: HookedModel,
    trace: ReasoningTrace,
    layers: Sequence[int] | None = None,
    divergence: str = "jsd",
    unit: str = "paragraph",
) -> ReasoningScore:
    """Reasoning Score per token and per step of `trace`.

    Args:
        layers: the late layers J (default: `late_layers(model.n_layers)`, the last half).
        divergence: "jsd" (Jensen-Shannon, default) or "kl" (KL(p_final || p_layer)).
        unit: how steps are cut: "paragraph" (blank lines), "line" or "sentence".

    In bfloat16 on the embedded model (`benchmarks/bf16.py`: a 266-token trace of 7 paragraphs),
    step scores differ from float32 by at most 9.2e-4 (mean 5.3e-4, 0.17% relative) and token
    scores by at most 0.020 (mean 0.0028, 1.1%); the step ranking agrees (Spearman 1.0): bfloat16
    does not change the score.
    """
    return analyze_trace(model, trace, layers, divergence=divergence, unit=unit, attention=False).score


def fluctuation(step_scores: Tensor, early_fraction: float = 0.5) -> float:
    """Early-stage fluctuation: coefficient of variation (std / mean, population std) of the
    scores of the first `max(2, ceil(early_fraction * n))` steps; NaN with fewer than 2 steps.

    >>> fluctuation(torch.tensor([1.0, 3.0, 100.0, 100.0]))
    0.5
    """
    n = len(step_scores)
    r = min(n, max(2, math.ceil(early_fraction * n)))
    if r < 2:
        return float("nan")
    early = step_scores[:r].double()
    return float(early.std(correction=0) / early.mean())


def anomalous_steps(step_scores: Tensor, quantile: float = 0.25, tau: float = math.inf) -> Tensor:
    """Steps whose score is below the trace's `quantile` (shallow) or above `tau` (overthinking)."""
    low = torch.quantile(step_scores.double(), quantile)
    return (step_scores.double() < low) | (step_scores.double() > tau)


def backtrack_steps(steps: Sequence[Sentence], cues: Sequence[str] = BACKTRACK_CUES) -> list[int]:
    """Indices of steps that contain a backtracking cue ("wait", "actually", ...)."""
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(c) for c in cues) + r")\b", re.IGNORECASE)
    return [s.index for s in steps if pattern.search(s.text)]


def backtrack_attention(
    step_attention: Tensor,
    anomalous: Tensor,
    queries: Sequence[int],
    early_end: int | None = None,
) -> float:
    """Share of the attention that query steps pay to anomalous earlier steps.

    For each query step i: attention to anomalous steps j < min(i, early_end) divided by
    attention to all steps j < i; averaged over the query steps. NaN without query steps.

    Args:
        step_attention: `[n_steps, n_steps]`, entry (i, j) the attention step i pays to step j.
        anomalous: `[n_steps]` bool; queries: query step indices; early_end: anomalous steps
            count only before this index (default: before each query).

    >>> A = torch.tensor([[1.0, 0, 0], [0.6, 0.4, 0], [0.2, 0.6, 0.2]])
    >>> backtrack_attention(A, torch.tensor([True, False, False]), queries=[2])
    0.25
    """
    shares = []
    for i in queries:
        before = step_attention[i, :i]
        limit = i if early_end is None else min(i, early_end)
        total = float(before.sum())
        if i == 0 or total == 0:
            continue
        shares.append(float(before[:limit][anomalous[:limit]].sum()) / total)
    return float(np.mean(shares)) if shares else float("nan")


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation; 0 when either side is constant or has fewer than 3 values."""
    x, y = x.double(), y.double()
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


@dataclass
class TraceAnalysis:
    """Everything the depth experiment reads from one trace (one forward pass).

    step_attention: `[n_steps, n_steps]` mean attention (over the attention layers' heads and each
    step's query tokens) from step i to the tokens of step j; step_perplexity: `[n_steps]`.
    features: `FEATURES` plus "backtrack_attn" (the attention share of steps with a
    backtracking cue instead of the late steps; NaN when no step has a cue).
    """

    score: ReasoningScore
    step_attention: Tensor | None
    step_perplexity: Tensor
    features: dict[str, float]
    signals: TokenSignals


@torch.no_grad()
def analyze_trace(
    model: HookedModel,
    trace: ReasoningTrace,
    layers: Sequence[int] | None = None,
    attention_layers: Sequence[int] | None = None,
    divergence: str = "jsd",
    unit: str = "paragraph",
    early_fraction: float = 0.5,
    late_fraction: float = 0.3,
    quantile: float = 0.25,
    tau: float = math.inf,
    attention: bool = True,
    chunk: int | None = None,
) -> TraceAnalysis:
    """Reasoning Score, hallucination features and token signals of one trace, in one forward.

    Args:
        layers: late layers J of the score (default: last half, without the final layer).
        attention_layers: layers whose heads are averaged for the step attention (default: the
            last half of the layers).
        early_fraction: share of the first steps for the fluctuation.
        late_fraction: share of the last steps that act as queries for the attention feature.
        quantile, tau: a step is anomalous when its score is below the trace's `quantile` or
            above `tau`.
        attention: False skips the attention capture (then the attention features are NaN).
        chunk: positions run at once (default: `model.chunk_size_for` the trace): memory depends
            on it, not on the trace's length (the forward runs over a KV cache, attention is
            pooled per query chunk, the unembedding goes by blocks of 64 positions).

    In bfloat16 on the embedded model (`benchmarks/bf16.py`: 20 templated arithmetic traces,
    `unit="line"`), the features differ from float32 by at most 0.0023 for `mean_score` (0.3%
    relative), 0.0044 for `fluctuation`, 0.10 for `score_ppl_corr` (mean 0.032) and 0.22 for
    `attn_score` (mean 0.011): the attention features move far more than the score, so compute
    them in float32 when their AUROC is the result (`evaluate`).
    """
    stat = _check(divergence, unit)
    layers = late_layers(model.n_layers) if layers is None else model.check_layers(layers)
    if attention_layers is None:
        attention_layers = list(range(model.n_layers // 2, model.n_layers))
    steps = trace.segments(unit)
    if not steps:
        raise ValueError("empty trace: no steps to score")
    last = model.n_layers - 1
    first = steps[0].start - 1  # the lens is only needed where the steps are predicted
    spans = [(s.start, s.end) for s in steps]
    pooled = SpanAttention(spans) if attention else None  # step x step attention, by query chunks
    needed = sorted({*layers, last})
    capture = {"resid_post": needed, **({"pattern": list(attention_layers)} if attention else {})}

    def pool(name: str, layer: int, t: Tensor) -> Tensor:  # each layer's pattern, head-averaged
        return t.float().mean(1) if name == "pattern" else t  # [1, heads, q, k] -> [1, q, k]

    per_position = torch.full((trace.n_tokens,), float("nan"))
    signals = SignalRows.for_response(trace)
    for start, out in model.forward_chunks(trace.tokens, None, chunk, capture=capture, stop_after=last,
                                           reduce=pool):  # fmt: skip
        resid = out.acts["resid_post"]
        end = start + resid[last].shape[1]
        if end > first:  # the lens of the late layers where steps are predicted
            lo = max(first, start)
            cache = ActivationCache({"resid_post": torch.stack([resid[l][:, lo - start :] for l in needed])},
                                    {"resid_post": needed})  # fmt: skip
            lens = lens_from_cache(model, None, cache, layers=layers, stats=[stat])
            per_position[lo:end] = getattr(lens, stat)[:, 0].mean(0)
        signals.add_residual(model, resid[last][0], start, trace.n_tokens - 1)
        if pooled is not None:
            pooled.add(torch.stack([out.acts["pattern"][l][0] for l in attention_layers]).mean(0), start)
    token_scores = _token_scores(per_position)  # [pos]
    step_scores = step_means(token_scores, steps)
    score = ReasoningScore(layers, divergence, steps, token_scores, step_scores)

    token_sig = signals.result(trace.prompt_len, trace.n_tokens)
    nll = torch.full((trace.n_tokens,), float("nan"))
    nll[token_sig.positions] = -token_sig.logprob
    step_ppl = step_means(nll, steps).exp()

    n = len(steps)
    step_attention, attn_score, backtrack = None, float("nan"), float("nan")
    if pooled is not None:
        step_attention = pooled.result()  # [n_steps, n_steps], mean over the layers' heads
        anomalous = anomalous_steps(step_scores, quantile, tau)
        first_late = n - max(1, math.ceil(late_fraction * n))
        attn_score = backtrack_attention(step_attention, anomalous, range(first_late, n), first_late)
        backtrack = backtrack_attention(step_attention, anomalous, [i for i in backtrack_steps(steps) if i])
    features = {
        "mean_score": float(step_scores.mean()),
        "fluctuation": fluctuation(step_scores, early_fraction),
        "attn_score": attn_score,
        "score_ppl_corr": pearson(step_scores, step_ppl),
        "backtrack_attn": backtrack,
    }
    return TraceAnalysis(score, step_attention, step_ppl, features, token_sig)


def feature_matrix(rows: Sequence[Mapping[str, float]], features: Sequence[str] = FEATURES) -> Tensor:
    """`[n, len(features)]` from per-trace feature dicts; NaN is an error that names the culprit."""
    X = torch.tensor([[float(r[f]) for f in features] for r in rows], dtype=torch.float64)
    bad = torch.isnan(X).nonzero()
    if len(bad):
        i, j = bad[0].tolist()
        raise ValueError(f"feature {features[j]!r} is NaN for trace {i} (too few steps?); drop or fill it")
    return X.float()


class RHDDetector:
    """Reasoning-hallucination detector: logistic regression over depth features.

    `H = sigmoid(a . standardise(features) + b)`, the probability that a trace is hallucinated
    (label 1). Deterministic under `seed`.

        >>> rows = [{"a": float(i), "b": float(i % 3)} for i in range(20)]
        >>> det = RHDDetector(features=("a", "b")).fit(rows, [int(i >= 10) for i in range(20)])
        >>> bool(det.score(rows)[15] > det.score(rows)[2])
        True
    """

    def __init__(
        self, features: Sequence[str] = FEATURES, l2: float = 1e-2, seed: int = 0, max_epochs: int = 300
    ):
        self.features = tuple(features)
        self.probe = LinearProbe(l2=l2, lr=0.05, max_epochs=max_epochs, val_fraction=0.0, seed=seed)

    def fit(self, rows: Sequence[Mapping[str, float]], labels: Sequence[int]) -> RHDDetector:
        self.probe.fit(feature_matrix(rows, self.features), torch.as_tensor(labels))
        return self

    def score(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        return self.probe.predict_proba(feature_matrix(rows, self.features)).numpy()

    @property
    def weights(self) -> dict[str, float]:
        """Weights on the standardised features (positive: pushes toward "hallucinated")."""
        assert self.probe.linear is not None, "fit the detector first"
        w = self.probe.linear.weight[0].detach()
        return {f: float(v) for f, v in zip(self.features, w, strict=True)}


def cross_validated_scores(
    rows: Sequence[Mapping[str, float]],
    labels: ArrayLike,
    folds: int = 5,
    seed: int = 0,
    strata: Sequence | None = None,
    **detector_kwargs,
) -> np.ndarray:
    """Out-of-fold detector scores: each trace scored by a detector that never saw it (folds
    stratified by label, and by `strata`, e.g. the dataset, when given; seeded)."""
    y = np.asarray(labels).astype(int)
    if min(y.sum(), (1 - y).sum()) < folds:
        raise ValueError(f"need at least {folds} traces of each label for {folds}-fold cross-validation")
    groups = (
        np.zeros(len(y), dtype=int) if strata is None else np.unique(list(strata), return_inverse=True)[1]
    )
    if len(groups) != len(y):
        raise ValueError(f"strata has {len(groups)} entries for {len(y)} traces")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    for label in (0, 1):
        start = 0  # each stratum deals its traces of this label round the folds, continuing the count
        for g in np.unique(groups):
            idx = rng.permutation(np.flatnonzero((y == label) & (groups == g)))
            fold[idx] = (start + np.arange(len(idx))) % folds
            start += len(idx)
    out = np.empty(len(y))
    for k in range(folds):
        train, test = fold != k, fold == k
        det = RHDDetector(seed=seed, **detector_kwargs)
        det.fit([rows[int(i)] for i in np.flatnonzero(train)], y[train])
        out[test] = det.score([rows[int(i)] for i in np.flatnonzero(test)])
    return out
