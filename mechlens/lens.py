"""Streaming logit lens: each layer's residual stream read through the final norm and unembedding.

Statistics are computed one layer and one position chunk at a time, so memory holds at most
`[batch, chunk, vocab]` logits, never `[layers, pos, vocab]`.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> lens = ml.logit_lens(model, model.to_tokens("one two three"))
    >>> lens.entropy.shape == (model.n_layers, 1, 13)
    True
    >>> float(lens.kl_final[-1].abs().max()) < 1e-5   # the last layer is the model's output
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LensResult:
    """Per-layer logit-lens statistics, each `[layers, batch, pos]`.

    entropy: entropy of the layer's distribution (nats).
    kl_final: KL(p_final || p_layer) (nats), p_final the model's output distribution.
    top1: the layer's most likely next token; top1_prob its probability.
    """

    layers: list[int]
    entropy: Tensor
    kl_final: Tensor
    top1: Tensor
    top1_prob: Tensor


@torch.no_grad()
def logit_lens(
    model,
    tokens: Tensor | str,
    layers: Sequence[int] | None = None,
    chunk: int = 128,
    attention_mask: Tensor | None = None,
) -> LensResult:
    """Logit-lens statistics of `tokens` at every layer in `layers` (default: all)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    logits, cache = model.run_with_cache(tokens, ["resid_post"], layers=layers, attention_mask=attention_mask)
    resid = cache["resid_post"]  # [layers, batch, pos, d_model]
    n_layers, batch, n_pos, _ = resid.shape
    shape = (n_layers, batch, n_pos)
    entropy, kl_final, top1_prob = (torch.empty(shape) for _ in range(3))
    top1 = torch.empty(shape, dtype=torch.long)
    for start in range(0, n_pos, chunk):
        sl = slice(start, start + chunk)
        logp_final = torch.log_softmax(logits[:, sl].float(), -1)  # [batch, chunk, vocab]
        p_final = logp_final.exp()
        for i in range(n_layers):
            logp = torch.log_softmax(model.unembed(resid[i, :, sl]).float(), -1)  # [batch, chunk, vocab]
            p = logp.exp()
            entropy[i, :, sl] = -(p * logp).sum(-1).cpu()
            kl_final[i, :, sl] = (p_final * (logp_final - logp)).sum(-1).cpu()
            best = logp.max(-1)
            top1[i, :, sl] = best.indices.cpu()
            top1_prob[i, :, sl] = best.values.exp().cpu()
    return LensResult(cache.layers["resid_post"], entropy, kl_final, top1, top1_prob)
