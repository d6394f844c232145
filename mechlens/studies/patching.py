"""Activation patching between traces at sentence spans: copy what one trace's sentence wrote into
the residual stream (or its heads' outputs) over the aligned sentence of another trace, then let
the patched trace continue. A causal, sentence-level counterpart to Thought Anchors' resampling:
instead of asking what happens when a sentence is resampled, it asks what happens when the target
reads the source's version of it.

Alignment of spans of different lengths ([impl]): "last" writes the source sentence's last token
over the target's last token (where a sentence's content is gathered for what follows), "mean"
writes the source span's mean over every target position, "position" copies position by position
(equal lengths only).

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> a = ml.ReasoningTrace.from_text(model, "Q?", "I will add the two numbers. So the sum is 5. Done.\\n")
    >>> b = ml.ReasoningTrace.from_text(model, "Q?", "I will take one from another. So it is 1. Done.\\n")
    >>> out = patch_sentences(model, a, b, [(0, 0)], layers=[1], sampling=Sampling(max_new_tokens=4))
    >>> len(out.texts[1]), len(out.baseline)
    (1, 1)
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from mechlens.models.sampling import Sampling
from mechlens.studies.anchors.resampling import answer_kl
from mechlens.text.trace import ReasoningTrace

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

Align = Literal["last", "mean", "position"]
ALIGNS = ("last", "mean", "position")
Site = Literal["resid_post", "z"]


@dataclass
class SentencePatch:
    """The target's continuations with each layer patched, and without.

    texts: layer -> the `sampling.n` continuations of the target, cut after sentence `cut` and
        patched at that layer; baseline: the same without a patch (the same seeds: paired);
    positions: the target positions written.
    """

    layers: list[int]
    site: str
    align: str
    pairs: list[tuple[int, int]]
    cut: int
    positions: list[int]
    texts: dict[int, list[str]] = field(default_factory=dict)
    baseline: list[str] = field(default_factory=list)

    def answer_kl(self, answer: Callable[[str], str | None], alpha: float = 1.0) -> dict[int, float]:
        """Per layer, KL(patched || unpatched) of the answers (`answer(text)`, None: no answer
        and left out) as Thought Anchors computes it (`answer_kl`, Laplace smoothing by default)."""
        base = Counter(a for a in map(answer, self.baseline) if a is not None)
        return {
            layer: answer_kl(Counter(a for a in map(answer, texts) if a is not None), base, alpha)
            for layer, texts in self.texts.items()
        }


def _write(
    source: ReasoningTrace, target: ReasoningTrace, pairs: Sequence[tuple[int, int]], align: Align
) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """Target positions and, for each, the source positions whose mean it receives."""
    writes: dict[int, list[int]] = {}
    if len({j for _, j in pairs}) != len(pairs):
        raise ValueError(f"pairs write a target sentence twice: {list(pairs)}")
    for i, j in pairs:
        s, t = source.sentences[i], target.sentences[j]
        if align == "last":
            writes[t.end - 1] = [s.end - 1]
        elif align == "mean":
            for p in range(t.start, t.end):
                writes[p] = list(range(s.start, s.end))
        else:
            if s.end - s.start != t.end - t.start:
                raise ValueError(
                    f'align="position" needs spans of equal length: source sentence {i} has '
                    f"{s.end - s.start} tokens, target sentence {j} has {t.end - t.start}"
                )
            for k in range(t.end - t.start):
                writes[t.start + k] = [s.start + k]
    positions = sorted(writes)
    return positions, [(p, writes[p]) for p in positions]


def patch_sentences(
    model: HookedModel,
    source: ReasoningTrace,
    target: ReasoningTrace,
    pairs: Sequence[tuple[int, int]],
    layers: Sequence[int],
    site: Site = "resid_post",
    align: Align = "last",
    cut: int | None = None,
    sampling: Sampling | None = None,
    batch_size: int = 16,
) -> SentencePatch:
    """Patch `source`'s sentences into `target`'s and continue the target.

    Args:
        pairs: `(source sentence, target sentence)` indices.
        layers: each layer is patched on its own (one continuation set per layer).
        site: "resid_post" (the residual stream leaving the block) or "z" (the heads' outputs).
        align: "last", "mean" or "position" (module docstring).
        cut: the target keeps its tokens up to the end of this sentence, then continues
            (default: the last target sentence in `pairs`).
        sampling: default greedy (`Sampling(temperature=0, max_new_tokens=256)`); the patched
            and unpatched continuations use the same seeds.
        batch_size: rows per forward: the unpatched target and one row per layer run in one
            `generate` (each layer's patch limited to its row).
    """
    for name, trace in (("source", source), ("target", target)):
        if not isinstance(trace, ReasoningTrace):
            raise TypeError(f"{name} must be a ReasoningTrace, got {type(trace).__name__}")
    if align not in ALIGNS:
        raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
    if site not in ("resid_post", "z"):
        raise ValueError(f"site must be 'resid_post' or 'z', got {site!r}")
    if not pairs:
        raise ValueError("pairs must list at least one (source sentence, target sentence)")
    for i, j in pairs:
        if not 0 <= i < len(source.sentences) or not 0 <= j < len(target.sentences):
            raise ValueError(
                f"pair ({i}, {j}) is out of range: the source has {len(source.sentences)} sentences, "
                f"the target {len(target.sentences)}"
            )
    layers = model.check_layers(layers)
    if not layers:
        raise ValueError("layers must list at least one layer")
    cut = max(j for _, j in pairs) if cut is None else cut
    if not 0 <= cut < len(target.sentences) or cut < max(j for _, j in pairs):
        raise ValueError(f"cut must be a target sentence at or after every patched one, got {cut}")
    sampling = sampling or Sampling(temperature=0.0, max_new_tokens=256)
    positions, writes = _write(source, target, pairs, align)
    with torch.no_grad():
        _, cache = model.run_with_cache(source.tokens, [site], layers=layers, return_logits=False)
    prompt = target.tokens[:, : target.sentences[cut].end]
    out = SentencePatch(layers, site, align, [(int(i), int(j)) for i, j in pairs], cut, positions)
    # one batch: row 0 unpatched, row k + 1 patched at layers[k] (each patch limited to its row)
    with contextlib.ExitStack() as stack:
        for k, layer in enumerate(layers):
            acts = cache.at(site, layer)[0].float()  # [pos, d_model] or [pos, heads, d_head]
            values: Tensor = torch.stack([acts[src].mean(0) for _, src in writes])
            stack.enter_context(model.patch(layer, positions, values, site, rows=[k + 1]))
        seeds = [sampling.seed] * (len(layers) + 1)  # every row the same draws: paired
        texts = model.generate(prompt.expand(len(layers) + 1, -1), sampling, seeds=seeds,
                               batch_size=batch_size).texts  # fmt: skip
    n = sampling.n
    out.baseline = texts[:n]
    for k, layer in enumerate(layers):
        out.texts[layer] = texts[(k + 1) * n : (k + 2) * n]
    return out
