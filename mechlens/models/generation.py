"""Sampling settings (`Sampling`), sampled continuations (`Generation`) and the KV-cached sampling
loop behind `HookedModel.generate`. With an intervention active every step runs through
`HookedModel.forward` (the hooked path), so that it applies during generation too; with none, the
steps run on the plain Hugging Face model sharing the same weights (the fast path: no hooks, and
only the last position is unembedded), with the same per-row generators, so both paths give the
same tokens.

Example:
    >>> s = Sampling(max_new_tokens=32, temperature=0.6, top_p=0.95, n=16, seed=44)
    >>> s.replace(n=4).n, s.n
    (4, 16)
    >>> Sampling(temperature=-1)
    Traceback (most recent call last):
    ...
    ValueError: temperature must be a finite number >= 0 (0 = greedy), got -1
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

MAX_SEED = 2**63 - 1
"""Seeds are 0..MAX_SEED; sample j of a prompt draws from a generator seeded from (seed, j)."""


def row_seed(seed: int, sample: int) -> int:
    """The generator seed of sample `sample` (0..n-1) of a prompt whose seed is `seed`: it does not
    depend on the batch size, nor on which other prompts share the call."""
    return (seed * 1_000_003 + sample) % 2**63


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int (NumPy integers too) in `low..high`; `TypeError`/`ValueError` naming it."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_seeds(seeds: Any, count: int) -> list[int]:
    """`seeds` as `count` ints in 0..MAX_SEED (one per prompt); `ValueError`/`TypeError` naming it."""
    if isinstance(seeds, str) or not isinstance(seeds, Sequence | Tensor | np.ndarray):
        raise TypeError(f"seeds must be a list of ints, one per prompt, got {type(seeds).__name__}")
    seeds = seeds.tolist() if isinstance(seeds, Tensor | np.ndarray) else list(seeds)
    if len(seeds) != count:
        raise ValueError(f"seeds must hold one seed per prompt ({count}), got {len(seeds)}")
    for i, s in enumerate(seeds):
        if not is_int(s) or not 0 <= int(s) <= MAX_SEED:
            raise ValueError(f"seeds[{i}] must be an int in 0..{MAX_SEED}, got {s!r}")
    return [int(s) for s in seeds]


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


@dataclass(frozen=True)
class Sampling:
    """How to sample: one definition shared by `generate` and every method that samples.

    Attributes:
        max_new_tokens: tokens to generate at most per row.
        temperature: softmax temperature; 0 is greedy.
        top_p: nucleus sampling mass in (0, 1].
        n: samples per prompt (they share the prompt's KV cache).
        seed: sample j of a prompt draws from its own generator seeded from (seed, j), so a prompt
            gets the same continuations alone or in any batch, whatever precedes it (the same
            prompt twice gets the same samples twice: ask for `n` samples, or give `generate`
            one seed per prompt with `seeds=`).
        stop_at_eos: end a row at the end-of-sequence token.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:  # checked, and stored as plain Python numbers
        set_field = object.__setattr__  # frozen
        set_field(self, "max_new_tokens", check_int("max_new_tokens", self.max_new_tokens, 1))
        set_field(self, "n", check_int("n", self.n, 1))
        set_field(self, "seed", check_int("seed", self.seed, 0, MAX_SEED))
        temperature = _check_float("temperature", self.temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        set_field(self, "temperature", temperature)
        top_p = _check_float("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        set_field(self, "top_p", top_p)
        if not isinstance(self.stop_at_eos, bool):
            raise TypeError(f"stop_at_eos must be True or False, got {self.stop_at_eos!r}")

    def replace(self, **changes: Any) -> Sampling:
        """A copy with some fields changed (validated); unknown names raise `TypeError`."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            valid = [f.name for f in dataclasses.fields(self)]
            raise TypeError(f"unknown sampling setting(s) {unknown}: valid settings are {valid}")
        return dataclasses.replace(self, **changes)


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
) -> list[Tensor]:
    """New token ids for each of the `sampling.n` samples of every row of `tokens [batch, pos]`
    (left-padded, `mask [batch, pos]`): rows `b*n ... b*n+n-1` continue row b, sample j drawing
    from a generator seeded from `row_seed(seeds[b], j)`. The prompt runs once and its KV cache is
    shared by its samples; finished rows leave the batch. Row b is prompt `first_prompt + b` of
    the call for per-row interventions. `step` (default: `hooked_step(model)`) runs the model."""
    n, max_new = sampling.n, sampling.max_new_tokens
    if tokens.shape[1] + max_new > model.n_ctx:
        raise ValueError(
            f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({max_new}) exceeds "
            f"the context window ({model.n_ctx})"
        )
    if len(seeds) != len(tokens):
        raise ValueError(f"{len(seeds)} seeds for {len(tokens)} prompts")
    step = step or hooked_step(model)
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
        last, past = step(nxt[:, None].to(model.device), mask, past, prompts[active.to(prompts.device)])
        logits = last.float()
    return [generated[r, : lengths[r]] for r in range(rows)]
