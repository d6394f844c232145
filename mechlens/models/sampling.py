"""Sampling settings (`Sampling`), shared by `HookedModel.generate`, the engines and every method
that samples, and the checks of the numbers they take (counts, seeds).

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

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


def check_real(name: str, value: Any, finite: bool = True) -> float:
    """`value` as a float (Python or NumPy reals, a one-element floating tensor); `TypeError` for
    bools and anything else, `ValueError` when `finite` and it is NaN or infinite, naming it."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        value = float(value)
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if finite and not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
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
        temperature = check_real("temperature", self.temperature, finite=False)
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        set_field(self, "temperature", temperature)
        top_p = check_real("top_p", self.top_p, finite=False)
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
