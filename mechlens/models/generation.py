"""Sampled continuations (`Generation`) and the KV-cached sampling loop behind
`HookedModel.generate` (its settings: `mechlens.models.sampling.Sampling`). With an intervention
active every step runs through `HookedModel.forward` (the hooked path), so that it applies during
generation too; with none, the steps run on the plain Hugging Face model sharing the same weights
(the fast path: no hooks, and only the last position is unembedded), with the same per-row
generators, so both paths give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechlens.models.sampling import Sampling, row_seed

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel


@dataclass
class Generation:
    """Sampled continuations, prompt-major: rows `i*n ... i*n+n-1` continue prompt i."""

    prompts: list[str]
    texts: list[str]  # decoded new tokens, up to (not including) end-of-sequence
    tokens: list[Tensor]  # new token ids per row, [new_pos]
    n: int
    sampling: Sampling | None = None


def sample_next(logits: Tensor, temperature: float, top_p: float, gens: list[torch.Generator]) -> Tensor:
    """One token per row of `logits [rows, vocab]`: greedy, or temperature + nucleus sampling.

    The logits are shifted by their maximum before the division, so that any temperature > 0
    (1e-40 included) gives a proper distribution."""
    if not torch.isfinite(logits).all():
        raise ValueError("the next-token logits are not finite: nothing can be sampled from them")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    probs = torch.softmax((logits - logits.max(-1, keepdim=True).values) / temperature, -1).cpu()
    if top_p < 1:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.stack([torch.multinomial(probs[r], 1, generator=g)[0] for r, g in enumerate(gens)])


PATHS = ("auto", "hooked", "plain")
"""`generate(path=)`: "auto" takes the plain model when no intervention is active."""

Step = Callable[[Tensor, Tensor, Any, Tensor], tuple[Tensor, Any]]
"""`step(ids [rows, q], mask [rows, k], past, prompts [rows]) -> (last-position logits [rows,
vocab], past)`; `prompts` is each row's prompt index in the call (for per-row settings)."""


def hooked_step(model: HookedModel) -> Step:
    """One step through `model.forward`: the active interventions apply, per-row ones by prompt."""

    def step(ids: Tensor, mask: Tensor, past: Any, prompts: Tensor) -> tuple[Tensor, Any]:
        out = model.forward(
            ids, mask, past_key_values=past, use_cache=True, rows=prompts, per_step_statistics=True
        )
        assert out.logits is not None  # ran to the end
        return out.logits[:, -1], out.past_key_values

    return step


def plain_step(model: HookedModel) -> Step:
    """One step on `model.plain_model` (no hooks), unembedding the last position only."""
    plain = model.plain_model

    def step(ids: Tensor, mask: Tensor, past: Any, prompts: Tensor) -> tuple[Tensor, Any]:
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]  # each row's own
        out = plain(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=past,
                    use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1], out.past_key_values

    return step


@torch.no_grad()
def sample_batch(
    model: HookedModel,
    tokens: Tensor,
    mask: Tensor,
    sampling: Sampling,
    seeds: list[int],
    first_prompt: int = 0,
    step: Step | None = None,
    later: Step | None = None,
) -> list[Tensor]:
    """New token ids for each of the `sampling.n` samples of every row of `tokens [batch, pos]`
    (left-padded, `mask [batch, pos]`): rows `b*n ... b*n+n-1` continue row b, sample j drawing
    from a generator seeded from `row_seed(seeds[b], j)`. The prompt runs once and its KV cache is
    shared by its samples; finished rows leave the batch. Row b is prompt `first_prompt + b` of
    the call for per-row interventions. `step` (default: `hooked_step(model)`) runs the model;
    `later` (default: `step`) runs every step after the prompt's (the plain model, when the active
    interventions touch the prompt only)."""
    n, max_new = sampling.n, sampling.max_new_tokens
    if tokens.shape[1] + max_new > model.n_ctx:
        raise ValueError(
            f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({max_new}) exceeds "
            f"the context window ({model.n_ctx})"
        )
    if len(seeds) != len(tokens):
        raise ValueError(f"{len(seeds)} seeds for {len(tokens)} prompts")
    step = step or hooked_step(model)
    later = later or step
    prompts = torch.arange(first_prompt, first_prompt + len(tokens), device=model.device)
    last, past = step(tokens, mask, None, prompts)
    prompts = prompts.repeat_interleave(n)
    if n > 1:  # share the prompt's KV cache across its n samples
        past.batch_repeat_interleave(n)
        mask = mask.repeat_interleave(n, 0)
    logits = last.float().repeat_interleave(n, 0)  # [rows, vocab]
    rows = logits.shape[0]
    gens = [torch.Generator().manual_seed(row_seed(seeds[r // n], r % n)) for r in range(rows)]
    eos = model.tokenizer.eos_token_id if sampling.stop_at_eos else None
    generated = torch.full((rows, max_new), model.tokenizer.pad_token_id)  # [rows, new]
    lengths = torch.full((rows,), max_new)
    active = torch.arange(rows)  # rows still sampling
    for t in range(max_new):
        nxt = sample_next(logits, sampling.temperature, sampling.top_p, [gens[r] for r in active.tolist()])
        generated[active, t] = nxt.cpu()
        finished = (nxt == eos).cpu() if eos is not None else torch.zeros(len(active), dtype=torch.bool)
        lengths[active[finished]] = t  # a row ends before its end-of-sequence token
        if finished.all() or t == max_new - 1:
            break
        if finished.any():
            keep = (~finished).nonzero()[:, 0]
            active, nxt, mask = active[keep], nxt[keep.to(nxt.device)], mask[keep.to(mask.device)]
            past.batch_select_indices(keep.to(model.device))
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        last, past = later(nxt[:, None].to(model.device), mask, past, prompts[active.to(prompts.device)])
        logits = last.float()
    return [generated[r, : lengths[r]] for r in range(rows)]
