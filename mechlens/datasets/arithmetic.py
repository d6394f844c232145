"""Arithmetic word problems generated from templates, with their exact answers.

Level 1: one addition or subtraction under 20. Level 2: one multiplication or division
(factors 2-12), or addition/subtraction under 100. Level 3: two steps.
"""

from __future__ import annotations

import random

NAMES = ["Tom", "Mia", "Sam", "Ava", "Leo", "Zoe", "Ben", "Ivy", "Max", "Eva", "Noah", "Lily"]
ITEMS = ["apples", "pencils", "marbles", "books", "cookies", "stickers", "cards", "shells"]


def _add(r: random.Random, hi: int) -> tuple[str, str, int]:
    a, b = r.randint(2, hi), r.randint(2, hi)
    q = "{n} has {a} {i}. {n} buys {b} more {i}. How many {i} does {n} have now?"
    return q.format(n="{n}", i="{i}", a=a, b=b), f"{a} + {b}", a + b


def _sub(r: random.Random, hi: int) -> tuple[str, str, int]:
    a = r.randint(5, hi)
    b = r.randint(1, a - 1)
    q = "{n} has {a} {i}. {n} gives {b} {i} to a friend. How many {i} does {n} have left?"
    return q.format(n="{n}", i="{i}", a=a, b=b), f"{a} - {b}", a - b


def _mul(r: random.Random, hi: int) -> tuple[str, str, int]:
    a, b = r.randint(2, 12), r.randint(2, 12)
    q = "{n} buys {a} boxes of {i}. Each box holds {b} {i}. How many {i} does {n} buy in total?"
    return q.format(n="{n}", i="{i}", a=a, b=b), f"{a} * {b}", a * b


def _div(r: random.Random, hi: int) -> tuple[str, str, int]:
    a, b = r.randint(2, 12), r.randint(2, 12)
    q = "{n} shares {t} {i} equally among {b} friends. How many {i} does each friend get?"
    return q.format(n="{n}", i="{i}", t=a * b, b=b), f"{a * b} / {b}", a


def _two_step(r: random.Random, hi: int) -> tuple[str, str, int]:
    if r.random() < 0.5:
        a, b = r.randint(5, 30), r.randint(2, 20)
        c = r.randint(1, a + b - 1)
        q = "{n} has {a} {i}. {n} buys {b} more and then gives away {c}. How many {i} does {n} have now?"
        return q.format(n="{n}", i="{i}", a=a, b=b, c=c), f"{a} + {b} - {c}", a + b - c
    a, b, c = r.randint(2, 9), r.randint(2, 9), r.randint(1, 20)
    q = "{n} buys {a} packs of {i} with {b} {i} in each pack and already had {c}. How many {i} does {n} have?"
    return q.format(n="{n}", i="{i}", a=a, b=b, c=c), f"{a} * {b} + {c}", a * b + c


_LEVELS = {1: ((_add, _sub), 20), 2: ((_mul, _div, _add, _sub), 99), 3: ((_two_step,), 30)}


def arithmetic_problems(n: int, seed: int = 0, levels: tuple[int, ...] = (1, 2, 3)) -> list[dict]:
    """`n` problems as dicts (id, question, answer, level, expression), levels in turn."""
    bad = [l for l in levels if l not in _LEVELS]
    if bad or not levels or n < 0:
        raise ValueError(
            f"levels must be a non-empty subset of {sorted(_LEVELS)} and n >= 0; got {levels}, {n}"
        )
    r = random.Random(seed)
    rows, counts = [], dict.fromkeys(levels, 0)
    for k in range(n):
        level = levels[k % len(levels)]
        makers, hi = _LEVELS[level]
        template, expression, value = r.choice(makers)(r, hi)
        question = template.format(n=r.choice(NAMES), i=r.choice(ITEMS))
        answer = str(value)
        rows.append({"id": f"arith-{level}-{counts[level]:03d}", "question": question, "answer": answer,
                     "level": level, "expression": expression})  # fmt: skip
        counts[level] += 1
    return rows
