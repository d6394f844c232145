"""The engine interface (`Engine`), its shared checks, and the in-process engine (`LocalEngine`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from mechlens.models.generation import PATHS
from mechlens.models.sampling import Sampling, check_int, check_seeds, is_int

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel


@runtime_checkable
class Engine(Protocol):
    """Samples continuations of token-id prompts.

    `sample(prompts, sampling, seeds, stop)` returns one list per prompt holding `sampling.n`
    continuations, each a list of new token ids (without the end-of-sequence token), in a
    deterministic order. `seeds` gives each prompt its own seed, so a prompt's samples do not
    depend on which other prompts share the call (without it, each engine seeds its own way:
    `prompt_seeds` over the prompts' order, or `sampling.seed` for every prompt, as `generate`
    does, in `LocalEngine`); a continuation ends
    with the token that completes any string of `stop` (that token kept). `describe()` is a
    JSON-able dict naming the engine and its settings; `prompts_per_call` is how many prompts it
    works on at once (callers that cache per prompt send that many per call).
    """

    name: str
    prompts_per_call: int

    def describe(self) -> dict[str, Any]:
        """The engine and its settings, for provenance and cache keys."""
        ...

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        seeds: Sequence[int] | None = None,
        stop: Sequence[str] = (),
    ) -> list[list[list[int]]]:
        """`sampling.n` continuations (token ids) of each prompt (token ids)."""
        ...


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int | None = None) -> list[list[int]]:
    """Prompts as lists of token ids (ints, not bools, in `0..vocab_size-1` when given); a
    `TypeError`/`ValueError` naming the first bad one."""
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence | torch.Tensor):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        ids = p.tolist() if isinstance(p, torch.Tensor | np.ndarray) else p
        if isinstance(ids, str) or not isinstance(ids, Sequence):
            raise TypeError(f"prompts[{i}] must be a list of token ids (ints), got {type(p).__name__}")
        bad_type = next((t for t in ids if not is_int(t)), None)
        if bad_type is not None:
            raise TypeError(
                f"prompts[{i}] must be a list of token ids (ints), got the entry {bad_type!r} "
                f"({type(bad_type).__name__})"
            )
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"prompts[{i}] is empty")
        bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            top = "" if vocab_size is None else f"..{vocab_size - 1}"
            raise ValueError(f"prompts[{i}] holds token ids outside 0{top}: {bad[:5]}")
        out.append(list(ids))
    return out


def token_prompts(model: HookedModel, prompts: Sequence[str]) -> list[list[int]]:
    """Each text prompt's token ids, as `model.tokenize` makes them (no padding)."""
    tokens, mask = model.tokenize(list(prompts))  # [prompts, pos], left-padded
    return [row[m.bool()].tolist() for row, m in zip(tokens, mask, strict=True)]


def check_engine(engine: Engine, model: HookedModel) -> Engine:
    """`engine`, or a `ValueError` when `model` has an intervention in force that `engine` would
    not apply (a `LocalEngine` of that very model samples through its hooks; an engine with an
    `applies(model)` method says which it applies itself)."""
    own = getattr(engine, "applies", None)
    if own is not None and own(model):
        return engine
    if model.active_interventions and not (isinstance(engine, LocalEngine) and engine.model is model):
        raise ValueError(
            f"an intervention is active on the model, but engine {engine.name!r} samples without it: "
            "sample with LocalEngine(model) inside the context, or leave the context"
        )
    return engine


def sample_texts(engine: Engine, model: HookedModel, prompts: Sequence[str], sampling: Sampling) -> list[str]:
    """`engine`'s continuations of text prompts, decoded: `sampling.n` per prompt, prompt-major."""
    rows = check_engine(engine, model).sample(token_prompts(model, prompts), sampling)
    return [model.tokenizer.decode(row) for per_prompt in rows for row in per_prompt]


def prompt_seeds(sampling: Sampling, count: int, seeds: Sequence[int] | None = None) -> list[int]:
    """Each prompt's seed: `seeds` checked (ints in 0..MAX_SEED, one per prompt), or by default
    `(sampling.seed * 1_000_003 + i) mod 2**63` for prompt i."""
    if seeds is None:
        return [(sampling.seed * 1_000_003 + i) % 2**63 for i in range(count)]
    return check_seeds(seeds, count)


def check_stop(stop: Sequence[str]) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings (a single string is one stop string)."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    return stop


def check_request(
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    seeds: Sequence[int] | None,
    stop: Sequence[str],
    vocab_size: int | None = None,
) -> tuple[list[list[int]], list[int], tuple[str, ...]]:
    """A `sample` call's arguments checked: prompt ids (in the vocabulary when its size is given),
    one seed per prompt (`prompt_seeds`), stop strings."""
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
    ids = check_prompts(prompts, vocab_size)
    return ids, prompt_seeds(sampling, len(ids), seeds), check_stop(stop)


def cut_at_stop(ids: list[int], decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> list[int]:
    """`ids` up to and including the token that completes the first stop string of its text."""
    if not stop or not any(s in decode(ids) for s in stop):
        return ids
    lo, hi = 1, len(ids)  # the shortest prefix whose text holds a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(ids[:mid]) for s in stop):
            hi = mid
        else:
            lo = mid + 1
    return ids[:lo]


class LocalEngine:
    """`HookedModel.generate` as an engine: the plain model when no context is active, the hooked
    forward otherwise (so interventions apply). Prompts of different lengths are left-padded into
    batches of `batch_size` rows, in one `generate` call whose sample j of prompt i is seeded from
    `(seeds[i], j)`; without `seeds`, every prompt's seed is `sampling.seed`, as in `generate`.
    Stop strings cut each row after generation. `path` is `generate`'s (`"auto"`,
    `"plain"` or `"hooked"`: the same samples, at different speeds).
    """

    name = "mechlens"
    prompts_per_call = 1

    def __init__(self, model: HookedModel, batch_size: int = 16, progress: bool = False, path: str = "auto"):
        batch_size = check_int("batch_size", batch_size, 1)
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.model, self.batch_size, self.progress, self.path = model, batch_size, progress, path

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "model": self.model.name, "backend": self.model.backend.name}

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        seeds: Sequence[int] | None = None,
        stop: Sequence[str] = (),
    ) -> list[list[list[int]]]:
        ids, checked, stop = check_request(prompts, sampling, seeds, stop, self.model.d_vocab)
        out = self._generate(ids, sampling, [sampling.seed] * len(ids) if seeds is None else checked)
        decode = self.model.tokenizer.decode
        return [[cut_at_stop(row, decode, stop) for row in rows] for rows in out]

    def _generate(self, ids: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[list[int]]]:
        width = max(len(p) for p in ids)
        pad = self.model.tokenizer.pad_token_id
        tokens = torch.tensor([[pad] * (width - len(p)) + p for p in ids])  # [prompts, width], left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
        gen = self.model.generate(
            tokens,
            sampling,
            attention_mask=mask,
            seeds=seeds,
            batch_size=self.batch_size,
            progress=self.progress,
            path=self.path,
        )
        rows = [t.tolist() for t in gen.tokens]
        return [rows[i * sampling.n : (i + 1) * sampling.n] for i in range(len(ids))]
