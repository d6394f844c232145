"""The refusal probe's score at every position of a reply: final-normed residual stream features,
probe scores, and where the thinking lies in the probe's input.

The probe reads the final-normed residual stream (for the last layer: HF's last `hidden_states`);
it is trained at the last token of the thinking close marker, right before the answer, and then
applied everywhere ("Refusal Falls off a Cliff").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechlens.ops.probes import LinearProbe, collect_activations
from mechlens.studies.refusal.replies import Reply
from mechlens.text.thinking import REPLY_OPEN
from mechlens.text.trace import split_sentences

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel


def refusal_features(
    model: HookedModel,
    texts: str | Sequence[str],
    layers: Sequence[int] | None = None,
    positions: str = "last",
    batch_size: int = 8,
    cache=None,
    progress: bool = True,
) -> Tensor | list[Tensor]:
    """Final-normed residual stream (`resid_post`, then the model's final norm) of `texts`.

    `layers` defaults to the last layer; `positions` as in `collect_activations`: "last" ->
    `[layers, n, d]`, "all" -> a list of `[layers, pos_i, d]`.
    """
    layers = [model.n_layers - 1] if layers is None else list(layers)
    acts = collect_activations(model, texts, "resid_post", layers, positions, batch_size, cache, progress)
    with torch.no_grad():
        if isinstance(acts, list):
            return [model.final_norm(a.to(model.device)).float().cpu() for a in acts]
        return model.final_norm(acts.to(model.device)).float().cpu()


def refusal_scores(
    model: HookedModel,
    probe: LinearProbe,
    texts: str | Sequence[str],
    layer: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[Tensor]:
    """The probe's refusal score (probability) at every position of each text: a list of `[pos_i]`."""
    layer = model.n_layers - 1 if layer is None else model.check_layer(layer)
    feats = refusal_features(model, texts, [layer], "all", batch_size, progress=progress)
    return [probe.predict_proba(f[0]) for f in feats]


def _n_tokens(tokenizer, text: str) -> int:
    """Tokens in `text` (no special tokens): where a prefix of a probe text ends."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def thinking_span(tokenizer, reply: Reply) -> tuple[int, int]:
    """Token span `(start, end)` of the thinking text inside `reply.probe_text`."""
    start = _n_tokens(tokenizer, reply.prompt + REPLY_OPEN)
    end = _n_tokens(tokenizer, reply.prompt + REPLY_OPEN + reply.thinking.strip("\n"))
    return start, max(end, start + 1)


def sentence_scores(tokenizer, reply: Reply, curve: Tensor) -> tuple[list[str], list[float]]:
    """The thinking's sentences and the mean refusal score over each one's tokens; `curve` is
    `refusal_scores` of `reply.probe_text` (token boundaries from tokenising each prefix)."""
    thinking = reply.thinking.strip("\n")
    head = reply.prompt + REPLY_OPEN
    sentences, scores = [], []
    for a, b in split_sentences(thinking, rule="thought-branches"):
        start, end = _n_tokens(tokenizer, head + thinking[:a]), _n_tokens(tokenizer, head + thinking[:b])
        sentences.append(thinking[a:b])
        scores.append(float(curve[start : max(end, start + 1)].float().mean()))
    return sentences, scores
