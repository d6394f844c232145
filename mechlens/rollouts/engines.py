"""The engine interface (`Engine`) and the in-process engine (`LocalEngine`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from mechlens.models.generation import Sampling


@runtime_checkable
class Engine(Protocol):
    """Samples continuations of token-id prompts.

    `sample(prompts, sampling)` returns one list per prompt holding `sampling.n` continuations,
    each a list of new token ids (without the end-of-sequence token), in a deterministic order;
    `describe()` is a JSON-able dict naming the engine and its settings.
    """

    name: str

    def describe(self) -> dict[str, Any]:
        """The engine and its settings, for provenance and cache keys."""
        ...

    def sample(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[list[int]]]:
        """`sampling.n` continuations (token ids) of each prompt (token ids)."""
        ...


def check_prompts(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Prompts as lists of ints; a `TypeError`/`ValueError` naming the first bad one."""
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence | torch.Tensor):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        ids = p.tolist() if isinstance(p, torch.Tensor) else p
        if isinstance(ids, str) or not isinstance(ids, Sequence) or not all(isinstance(t, int) for t in ids):
            raise TypeError(f"prompts[{i}] must be a list of token ids (ints), got {type(p).__name__}")
        if not ids:
            raise ValueError(f"prompts[{i}] is empty")
        out.append(list(ids))
    return out


class LocalEngine:
    """`HookedModel.generate` as an engine: the plain model when no context is active, the hooked
    forward otherwise (so interventions apply); row r of a call is seeded from `(seed, r)`.

    Prompts of different lengths are left-padded into batches of `batch_size` rows.
    """

    name = "mechlens"

    def __init__(self, model, batch_size: int = 16, progress: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.model, self.batch_size, self.progress = model, batch_size, progress

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "model": self.model.name, "backend": self.model.backend}

    def sample(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[list[int]]]:
        ids = check_prompts(prompts)
        width = max(len(p) for p in ids)
        pad = self.model.tokenizer.pad_token_id
        tokens = torch.tensor([[pad] * (width - len(p)) + p for p in ids])  # [prompts, width], left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
        gen = self.model.generate(
            tokens, sampling, attention_mask=mask, batch_size=self.batch_size, progress=self.progress
        )
        rows = [t.tolist() for t in gen.tokens]
        return [rows[i * sampling.n : (i + 1) * sampling.n] for i in range(len(ids))]
