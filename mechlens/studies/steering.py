"""Steering vectors for reasoning behaviours (Venhoff et al. 2025, "Understanding Reasoning in
Thinking Language Models via Steering Vectors", arXiv 2506.18167), and their controls.

A behaviour's direction at layer l is the mean residual stream (`resid_post`) at the tokens just
before the sentences labelled with it, minus that mean over all labelled traces' sentences
(difference of means). The layer is chosen by attribution patching: the first-order change of the
log-probability of the behaviour's own sentences when the direction is added before them,
`d/d alpha sum_s log p(s | prefix, +alpha * direction)` at alpha = 0, per sentence. Steering adds
`scale * direction` at every position while the model generates, and the behaviour's rate is read
from the generated sentences.

The paper's code is not public; from its abstract and third-party notes (`shared/METHODS.md`
section 10): the mean over all sentences as the baseline, the preceding tokens as the site, and
attribution patching for the layer. `window` (how many tokens before the sentence, default 1) and
the per-reply rate with its Wilson interval are ours [impl], as is the random-direction control
(`random_directions`: the same norm, a distribution of draws).

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> reply = "First we add the two. Wait, that is wrong. Then we add them again. So it is 5.\\n"
    >>> traces = [ml.ReasoningTrace.from_text(model, "What is 2+3?", reply)]
    >>> labels = [["wait" if s.text.startswith("Wait") else "" for s in traces[0].sentences]]
    >>> found = behaviour_directions(model, traces, labels, layers=[0, 1])
    >>> found.directions.shape == (1, 2, model.d_model), found.counts
    (True, {'wait': 1})
    >>> found.best_layer("wait") in (0, 1)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechlens.models.interventions import DirectionAddition
from mechlens.models.sampling import Sampling, check_int
from mechlens.ops.stats import wilson
from mechlens.rollouts.engines import Engine, sample_texts
from mechlens.text.thinking import as_reply, split_thinking
from mechlens.text.trace import ReasoningTrace, split_sentences

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel


@dataclass
class BehaviourDirections:
    """Difference-of-means directions per behaviour label and layer.

    directions: `[n_labels, n_layers, d_model]` (float32), mean before the label's sentences minus
        the mean before all sentences; counts: sentences per label; n_sentences: all sentences;
    attribution: `[n_labels, n_layers]` attribution-patching effect of each direction on the log
        probability of its own sentences, per sentence (NaN when not computed).
    """

    labels: list[str]
    layers: list[int]
    directions: Tensor
    counts: dict[str, int]
    n_sentences: int
    attribution: Tensor

    def best_layer(self, label: str) -> int:
        """The layer whose direction raises the label's sentences most (attribution patching)."""
        row = self.attribution[self._index(label)]
        if torch.isnan(row).all():
            raise ValueError("attribution was not computed (attribution=False): give the layer yourself")
        return self.layers[int(torch.nan_to_num(row, nan=-torch.inf).argmax())]

    def direction(self, label: str, layer: int | None = None) -> Tensor:
        """`[d_model]`: the label's direction at `layer` (default: `best_layer`)."""
        layer = self.best_layer(label) if layer is None else layer
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not computed; layers are {self.layers}")
        return self.directions[self._index(label), self.layers.index(layer)]

    def _index(self, label: str) -> int:
        if label not in self.labels:
            raise ValueError(f"label {label!r} has no direction; labels are {self.labels}")
        return self.labels.index(label)


def _spans(trace: ReasoningTrace, window: int) -> list[tuple[int, int]]:
    """`[start - window, start)` token positions before each sentence (clipped at 0)."""
    return [(max(0, s.start - window), s.start) for s in trace.sentences]


def behaviour_directions(
    model: HookedModel,
    traces: Sequence[ReasoningTrace],
    labels: Sequence[Sequence[str]],
    layers: Sequence[int] | None = None,
    window: int = 1,
    attribution: bool = True,
) -> BehaviourDirections:
    """One direction per behaviour label and layer from labelled traces.

    Args:
        traces: the traces (`ReasoningTrace`, with their sentences).
        labels: per trace, one label per sentence ("" for none); every other label gets a direction.
        layers: blocks whose `resid_post` is read (default: all).
        window: tokens before each sentence whose residuals are averaged (1: the token whose
            prediction starts the sentence).
        attribution: also score each layer by attribution patching (one forward and backward
            per trace that holds the label); False leaves `attribution` NaN.
    """
    if len(traces) != len(labels):
        raise ValueError(f"labels has {len(labels)} entries for {len(traces)} traces")
    window = check_int("window", window, 1)
    layers = list(range(model.n_layers)) if layers is None else model.check_layers(layers)
    for k, (trace, row) in enumerate(zip(traces, labels, strict=True)):
        if not isinstance(trace, ReasoningTrace):
            raise TypeError(f"traces[{k}] must be a ReasoningTrace, got {type(trace).__name__}")
        if isinstance(row, str) or len(row) != len(trace.sentences):
            raise ValueError(f"labels[{k}] must hold one label per sentence ({len(trace.sentences)})")
    names = sorted({x for row in labels for x in row if x})
    if not names:
        raise ValueError("labels hold no behaviour: every entry is empty")
    total = torch.zeros(len(layers), model.d_model, dtype=torch.float64)
    sums = torch.zeros(len(names), len(layers), model.d_model, dtype=torch.float64)
    counts = dict.fromkeys(names, 0)
    n = 0
    with torch.no_grad():
        for trace, row in zip(traces, labels, strict=True):
            _, cache = model.run_with_cache(trace.tokens, ["resid_post"], layers=layers, return_logits=False)
            resid = torch.stack([cache.at("resid_post", l)[0] for l in layers]).double()  # [layers, pos, d]
            for (a, b), label in zip(_spans(trace, window), row, strict=True):
                if b <= a:
                    continue
                mean = resid[:, a:b].mean(1)  # [layers, d]
                total += mean
                n += 1
                if label:
                    sums[names.index(label)] += mean
                    counts[label] += 1
    directions = (sums / torch.tensor([counts[x] for x in names])[:, None, None] - total / n).float()
    scores = torch.full((len(names), len(layers)), float("nan"))
    if attribution:
        scores = _attribution(model, traces, labels, names, layers, directions, window, counts)
    return BehaviourDirections(names, layers, directions, counts, n, scores)


def _attribution(model, traces, labels, names, layers, directions, window, counts) -> Tensor:
    """`[labels, layers]`: d/d alpha of the summed log-probability of each label's sentences with
    `alpha * direction` added at the tokens before them, at alpha = 0, divided by their count."""
    out = torch.zeros(len(names), len(layers))
    for trace, row in zip(traces, labels, strict=True):
        spans = _spans(trace, window)
        ids = trace.tokens.to(model.device)
        for i, label in enumerate(names):
            mine = [k for k, x in enumerate(row) if x == label and spans[k][1] > spans[k][0]]
            if not mine:
                continue
            positions = sorted({p for k in mine for p in range(*spans[k])})
            alphas = [torch.zeros((), requires_grad=True) for _ in layers]
            items = [
                DirectionAddition(l, directions[i, j], alpha, positions)  # type: ignore[arg-type]
                for j, (l, alpha) in enumerate(zip(layers, alphas, strict=True))
            ]
            with torch.enable_grad(), contextlib.ExitStack() as stack:
                for it in items:
                    stack.enter_context(model.intervene(it))
                logits = model.forward(ids).logits  # [1, pos, vocab]
                assert logits is not None  # a forward to the end
                logp = logits[0].float().log_softmax(-1)  # [pos, vocab]
                targets = [
                    (p, int(ids[0, p + 1])) for k in mine for p in range(trace.sentences[k].start - 1,
                                                                            trace.sentences[k].end - 1)
                ]  # fmt: skip
                total = sum(logp[p, t] for p, t in targets)
                grads = torch.autograd.grad(total, alphas)
            out[i] += torch.stack([g.detach() for g in grads])
    return out / torch.tensor([counts[x] for x in names], dtype=torch.float32)[:, None]


def random_directions(direction: Tensor, n: int, seed: int = 0) -> Tensor:
    """`[n, d_model]` random directions with `direction`'s norm (Gaussian, seeded): the control
    distribution of a steering result.

        >>> random_directions(torch.ones(4), 3).norm(dim=1).tolist()
        [2.0, 2.0, 2.0]
    """
    n = check_int("n", n, 1)
    gen = torch.Generator().manual_seed(check_int("seed", seed, 0))
    draws = torch.randn(n, direction.numel(), generator=gen)
    return draws / draws.norm(dim=1, keepdim=True) * direction.float().norm()


@dataclass
class SteeringCurve:
    """A behaviour's rate and the accuracy at each steering scale.

    Per scale: `replies` (n), `with_behaviour` (replies with at least one behaviour sentence) and
    its Wilson interval `rate` `(rate, low, high)`; `sentences` / `behaviour_sentences` over all
    thinking sentences; `correct` of `graded` replies and its interval `accuracy`; `texts`.
    """

    scales: list[float]
    replies: list[int] = field(default_factory=list)
    with_behaviour: list[int] = field(default_factory=list)
    rate: list[tuple[float, float, float]] = field(default_factory=list)
    sentences: list[int] = field(default_factory=list)
    behaviour_sentences: list[int] = field(default_factory=list)
    graded: list[int] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    accuracy: list[tuple[float, float, float]] = field(default_factory=list)
    texts: list[list[str]] = field(default_factory=list)

    def sentence_rate(self) -> list[float]:
        """Behaviour sentences per thinking sentence at each scale (NaN without sentences)."""
        return [
            b / s if s else float("nan")
            for b, s in zip(self.behaviour_sentences, self.sentences, strict=True)
        ]


def steering_curve(
    model: HookedModel,
    prompts: Sequence[str],
    direction: Tensor,
    layer: int,
    scales: Sequence[float],
    is_behaviour: Callable[[str], bool],
    grade: Callable[[int, str], bool] | None = None,
    sampling: Sampling | None = None,
    batch_size: int = 16,
    engine: Engine | None = None,
) -> SteeringCurve:
    """Generate from `prompts` with `scale * direction` added after block `layer` at every
    position, for each scale, and count the behaviour.

    Args:
        prompts: chat-formatted prompts (`format_prompt`); the reply's thinking is split into
            sentences (`split_sentences`) and each is tested with `is_behaviour(sentence)`.
        grade: `grade(prompt_index, reply) -> correct`, for the accuracy (None: not graded).
        sampling: default `Sampling(temperature=0.6, top_p=0.95, max_new_tokens=256)`; each
            scale samples with the same seeds, so the curve is paired across scales.
        engine: what samples inside the steering context (default: `model.generate`, hooked);
            `SharedPrefixEngine(model)` applies the direction itself, several times faster
            (`mechlens.rollouts`).

        >>> import mechlens as ml
        >>> model = ml.load_model("tiny-llama")
        >>> curve = steering_curve(model, ["ab"], torch.ones(model.d_model), 1, [0.0, 2.0],
        ...                        lambda s: "a" in s, sampling=Sampling(max_new_tokens=8))
        >>> curve.replies
        [1, 1]
    """
    if not prompts or isinstance(prompts, str):
        raise ValueError("prompts must be a non-empty list of prompts")
    if not callable(is_behaviour):
        raise TypeError("is_behaviour must be callable (sentence -> bool)")
    scales = [float(s) for s in scales]
    if not scales:
        raise ValueError("scales must list at least one scale")
    sampling = sampling or Sampling(temperature=0.6, top_p=0.95, max_new_tokens=256)
    curve = SteeringCurve(scales)

    def sample() -> list[str]:
        if engine is None:
            return model.generate(list(prompts), sampling, batch_size=batch_size).texts
        return sample_texts(engine, model, list(prompts), sampling)

    for scale in scales:
        if scale == 0.0:
            texts = sample()
        else:
            with model.add_direction(layer, direction, scale):
                texts = sample()
        per_reply = []
        n_sent = 0
        for k, text in enumerate(texts):  # an unclosed thinking (the prompt opened it) stays thinking
            thinking = split_thinking(as_reply(prompts[k // sampling.n], text))[0]
            sents = [thinking[a:b] for a, b in split_sentences(thinking, rule="thought-branches")]
            hits = sum(bool(is_behaviour(s)) for s in sents)
            per_reply.append(hits)
            n_sent += len(sents)
        with_b = sum(h > 0 for h in per_reply)
        curve.replies.append(len(texts))
        curve.with_behaviour.append(with_b)
        curve.rate.append(wilson(with_b, len(texts)))
        curve.sentences.append(n_sent)
        curve.behaviour_sentences.append(sum(per_reply))
        if grade is not None:
            ok = sum(bool(grade(k // sampling.n, t)) for k, t in enumerate(texts))
            curve.graded.append(len(texts))
            curve.correct.append(ok)
            curve.accuracy.append(wilson(ok, len(texts)))
        curve.texts.append(texts)
    return curve
