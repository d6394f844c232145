"""Word problems of many kinds and wordings, with carry-free arithmetic, for the second version
of the reasoning organism (`ReasoningRecipe(version=2)`).

Every problem is a start value and 1-3 operations. Its question is written from one *template*: a
choice of wording for each slot of its kind (the opening, each event, the question). Five kinds:
"items" (one person's things found, given away, shared, or packs of them), "comparison" (people
with more, fewer or times as many), "rate" (so many per hour or per box), "group" (two people
together or apart) and "units" (lengths, weights and money, cut, added or split). Each slot has 4-6
wordings; wording 0 of every opening and question is never trained on, and the "units" kind is held
out whole, so held-out sets differ from training in sentences the organism never saw.

Arithmetic stays where a 135M model is reliable: single-digit operands, sums and differences
without a carry or a borrow, products up to 20 and exact divisions. The wrong operation that a
wrong plan would choose is checked the same way, so a wrong answer comes from the plan and not
from the model's arithmetic.

Example:
    >>> problem = varied_problems(1, seed=3, split="train")[0]
    >>> problem.kind, problem.answer == problem.run(problem.ops)
    ('items', True)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "held_out_templates", "held_out_kinds"]
SPLITS: tuple[Split, ...] = ("train", "held_out_templates", "held_out_kinds")
KINDS = ("items", "comparison", "rate", "group", "units")
HELD_OUT_KINDS = ("units",)
"""Kinds never trained on (the "held_out_kinds" split draws only these)."""

NAMES = ("Tom", "Mia", "Sam", "Ava", "Leo", "Zoe", "Ben", "Ivy", "Max", "Eva", "Noah", "Lily", "Omar", "Rosa")
ITEMS = ("apples", "pencils", "marbles", "books", "cookies", "stickers", "cards", "shells", "coins", "beads")
GOODS = ("cups", "toys", "bottles", "shirts", "boxes", "chairs")
UNITS = (("rope", "metres", "long"), ("bag of flour", "kilograms", "heavy"), ("ribbon", "metres", "long"))

# Each slot: its wordings. `{n}` a name, `{m}` a second name, `{u}` the unit noun, `{a}` the value
# before the step, `{b}` the operand. Wording 0 of "open" and "ask" is held out.
TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "items": {
        "open": (
            "{n} keeps a jar of {a} {u}.",
            "{n} has {a} {u}.",
            "{n} owns {a} {u}.",
            "There are {a} {u} on {n}'s desk.",
            "{n} starts the day with {a} {u}.",
            "{n} collected {a} {u}.",
        ),
        "packs": (
            "{n} orders {a} crates of {u}, {b} {u} per crate.",
            "{n} buys {a} packs of {u} with {b} {u} in each pack.",
            "{n} has {a} boxes, each holding {b} {u}.",
            "There are {a} bags with {b} {u} in every bag.",
            "{n} gets {a} sets of {u}, and each set has {b} {u}.",
        ),
        "add": (
            "A neighbour hands {n} {b} more {u}.",
            "Then {n} finds {b} more {u}.",
            "{n} gets {b} more {u} from a friend.",
            "Later, {n} picks up {b} more {u}.",
            "{n}'s aunt gives {n} another {b} {u}.",
        ),
        "sub": (
            "{n} drops {b} of the {u} and cannot find them.",
            "Then {n} gives {b} {u} to a friend.",
            "{n} loses {b} of the {u}.",
            "{n} uses up {b} {u}.",
            "Then {n} sells {b} of the {u}.",
        ),
        "div": (
            "{n} deals them out evenly to {b} cousins.",
            "Then {n} shares them equally among {b} friends.",
            "{n} splits them into {b} equal groups.",
            "{n} puts them into {b} bags with the same number in each.",
        ),
        "ask": (
            "What count of {u} is {n} holding at the end?",
            "How many {u} does {n} have now?",
            "How many {u} are left?",
            "How many {u} does {n} end up with?",
            "What is the number of {u} now?",
        ),
        "ask_div": (
            "What share of {u} lands in each part?",
            "How many {u} does each one get?",
            "How many {u} are in each part?",
            "How many {u} go to each?",
        ),
    },
    "comparison": {
        "open": (
            "{n} counted {a} {u} this morning.",
            "{n} has {a} {u}.",
            "{n} owns {a} {u}.",
            "{n} collects {u} and has {a} of them.",
            "{n} keeps {a} {u} in a box.",
        ),
        "add": (
            "{m}'s pile is {b} {u} bigger than that.",
            "{m} has {b} more {u} than that.",
            "{m} owns {b} {u} more than that.",
            "{m}'s count is that plus {b}.",
            "{m} has that many {u} and {b} extra.",
        ),
        "sub": (
            "{m}'s pile is {b} {u} smaller than that.",
            "{m} has {b} fewer {u} than that.",
            "{m} owns {b} {u} less than that.",
            "{m}'s count is that minus {b}.",
            "{m} has that many {u} but {b} fewer.",
        ),
        "mul": (
            "{m}'s pile is {b} times the size of that.",
            "{m} has {b} times as many {u} as that.",
            "{m} owns {b} times that many {u}.",
            "{m}'s count is {b} times that.",
            "{m} has that many {u} {b} times over.",
        ),
        "ask": (
            "What size is {m}'s pile of {u}?",
            "How many {u} does {m} have?",
            "How many {u} does {m} own?",
            "What is {m}'s count of {u}?",
            "How many {u} are in {m}'s box?",
        ),
    },
    "rate": {
        "open": (
            "A printer turns out {b} {u} per hour for {a} hours.",
            "A machine makes {b} {u} every hour for {a} hours.",
            "A shop sells {b} {u} each day for {a} days.",
            "A worker packs {b} {u} a minute for {a} minutes.",
            "A baker fills {a} trays with {b} {u} on each tray.",
        ),
        "add": (
            "On top of that, {b} {u} arrive from storage.",
            "Then {b} more {u} are added.",
            "After that, {b} extra {u} come in.",
            "Another {b} {u} are delivered.",
            "Later, {b} more {u} are made by hand.",
        ),
        "sub": (
            "Of these, {b} {u} turn out faulty and go.",
            "Then {b} {u} are thrown away.",
            "After that, {b} {u} are sent back.",
            "{b} of the {u} turn out broken.",
            "Later, {b} {u} are given away.",
        ),
        "div": (
            "All of them go out evenly on {b} vans.",
            "They are packed equally into {b} crates.",
            "They are split equally among {b} stores.",
            "They go equally onto {b} shelves.",
        ),
        "ask": (
            "What total of {u} is there at the finish?",
            "How many {u} are there?",
            "How many {u} are there now?",
            "How many {u} are left at the end?",
            "What is the total number of {u}?",
        ),
        "ask_div": (
            "What number of {u} does each part hold?",
            "How many {u} are in each?",
            "How many {u} does each one get?",
            "How many {u} go into each?",
        ),
    },
    "group": {
        "open": (
            "{n} and {m} pool their {u}: {n} brings {a}.",
            "{n} has {a} {u}.",
            "{n} owns {a} {u}.",
            "{n} has a box of {a} {u}.",
            "{n} picked {a} {u}.",
        ),
        "add": (
            "{m} brings {b} {u} to the pool.",
            "{m} has {b} {u}, and they put them together.",
            "{m} adds {b} {u} of their own.",
            "They join them with {m}'s {b} {u}.",
            "{m} pours in {b} more {u}.",
        ),
        "sub": (
            "{m} takes {b} {u} out of the pool.",
            "{m} borrows {b} of the {u}.",
            "{m} takes {b} {u} from the box.",
            "{b} of the {u} go to {m}.",
            "{m} eats {b} of the {u}.",
        ),
        "div": (
            "They divide them evenly among {b} children.",
            "They share them equally among {b} people.",
            "They split them into {b} equal piles.",
            "They hand them out equally to {b} friends.",
        ),
        "ask": (
            "What is the size of the pool of {u} at the end?",
            "How many {u} do they have together?",
            "How many {u} are there in all?",
            "How many {u} are left in the box?",
            "How many {u} remain?",
        ),
        "ask_div": (
            "What share of {u} does each receive?",
            "How many {u} does each get?",
            "How many {u} are in each pile?",
            "How many {u} does each friend get?",
        ),
    },
    "units": {
        "open": (
            "A {t} is {a} {u} {adj}.",
            "{n} has a {t} that is {a} {u} {adj}.",
            "The {t} measures {a} {u}.",
            "{n} buys a {t} of {a} {u}.",
            "There is a {t} of {a} {u}.",
        ),
        "add": (
            "{n} adds {b} more {u} to it.",
            "Another {b} {u} are joined on.",
            "It gains {b} {u}.",
            "{n} puts {b} {u} more on.",
            "Then {b} {u} are added.",
        ),
        "sub": (
            "{n} cuts {b} {u} off it.",
            "Then {b} {u} are taken off.",
            "It loses {b} {u}.",
            "{n} uses {b} {u} of it.",
            "{b} {u} are removed.",
        ),
        "div": (
            "{n} cuts it into {b} equal pieces.",
            "It is split into {b} equal parts.",
            "It is shared equally among {b} people.",
            "It is divided into {b} same-size parts.",
        ),
        "ask": (
            "How many {u} are there now?",
            "How many {u} are left?",
            "What is its size in {u} now?",
            "How many {u} does it measure now?",
            "How many {u} remain?",
        ),
        "ask_div": (
            "How many {u} is each piece?",
            "How many {u} does each part have?",
            "How many {u} does each get?",
            "What is each part in {u}?",
        ),
    },
}
HELD_OUT_WORDING = 0
"""The wording index of every "open", "packs" and "ask" slot that training never uses."""

OPS = ("add", "sub", "mul", "div")
WRONG_OP = {"mul": "add", "add": "sub", "sub": "add", "div": "sub"}
"""The operation a wrong plan chooses instead of each right one."""


@dataclass(frozen=True)
class VariedProblem:
    """A word problem: `start`, then `ops` in order (`(op, operand)` pairs), worded by `template`
    (one wording index per slot) in its `kind`; `unit` is the noun counted."""

    id: str
    kind: str
    question: str
    start: int
    ops: tuple[tuple[str, int], ...]
    unit: str
    name: str
    template: tuple[int, ...]

    @property
    def answer(self) -> int:
        return self.run(self.ops)

    @property
    def n_steps(self) -> int:
        return len(self.ops)

    def run(self, ops: tuple[tuple[str, int], ...] | list[tuple[str, int]]) -> int:
        """The value after `ops` from `start` (exact arithmetic; a division must be exact)."""
        return run_ops(self.start, ops)

    def values(self, ops: tuple[tuple[str, int], ...] | list[tuple[str, int]]) -> list[int]:
        """The value before each operation of `ops` and after the last."""
        out = [self.start]
        for op, b in ops:
            out.append(apply_op(op, out[-1], b))
        return out


def apply_op(op: str, a: int, b: int) -> int:
    """`a op b` for op in add/sub/mul/div (division exact or floored)."""
    return {"add": a + b, "sub": a - b, "mul": a * b, "div": a // b if b else 0}[op]


def run_ops(value: int, ops) -> int:
    for op, b in ops:
        value = apply_op(op, value, b)
    return value


def easy(op: str, a: int, b: int) -> bool:
    """Whether `a op b` is arithmetic a small model does reliably: an operand of 2-9, no
    carry or borrow, a product up to 20, an exact division with a quotient above 1, and a
    positive result."""
    if not 2 <= b <= 9 or a <= 0:
        return False
    if op == "add":
        return a % 10 + b <= 9
    if op == "sub":
        return a % 10 >= b and a - b > 0
    if op == "mul":
        return a <= 9 and a * b <= 20
    return b >= 2 and a % b == 0 and a // b > 1


def _wordings(slot: tuple[str, ...], split: Split, held: bool) -> list[int]:
    """The wording indices a split may use for one slot (`held`: a slot whose wording 0 is held out)."""
    every = list(range(len(slot)))
    if not held:
        return every
    return [HELD_OUT_WORDING] if split == "held_out_templates" else every[1:]


def varied_problems(
    n: int, seed: int = 0, split: Split = "train", steps: tuple[int, ...] = (1, 2, 3)
) -> list[VariedProblem]:
    """`n` problems of `split`, deterministic in `seed`, with 1-3 operations (`steps` in turn).

    "train" uses the trained kinds and wordings; "held_out_templates" the trained kinds worded
    with the held-out opening and question (never trained on); "held_out_kinds" the held-out
    kinds. Every operation is `easy`, and so is the path a wrong plan of at least one step takes.

        >>> [p.kind for p in varied_problems(3, split="held_out_kinds")]
        ['units', 'units', 'units']
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not steps or any(s not in (1, 2, 3) for s in steps) or n < 0:
        raise ValueError(f"steps must be a non-empty subset of (1, 2, 3) and n >= 0; got {steps}, {n}")
    kinds = (
        HELD_OUT_KINDS if split == "held_out_kinds" else tuple(k for k in KINDS if k not in HELD_OUT_KINDS)
    )
    r = random.Random(f"{split}-{seed}")
    out = []
    for k in range(n):
        kind = kinds[k % len(kinds)]
        while True:
            problem = _draw(r, kind, steps[k % len(steps)], split, f"{split[0]}{seed}-{k:04d}")
            if problem is not None:
                break
        out.append(problem)
    return out


def _draw(r: random.Random, kind: str, n_ops: int, split: Split, pid: str) -> VariedProblem | None:
    """One problem of `kind` with `n_ops` operations, or None when the draw breaks a rule."""
    t = TEMPLATES[kind]
    first_mul = kind == "rate" or (kind == "items" and r.random() < 0.3)
    if first_mul:
        start, per = r.randint(2, 4), r.randint(2, 5)
        ops: list[tuple[str, int]] = [("mul", per)]
    else:
        small = kind == "comparison" and r.random() < 0.3  # a start that "times as many" can scale
        start, ops = (r.randint(2, 6) if small else r.randint(11, 58)), []
    value = run_ops(start, ops)
    while len(ops) < n_ops:
        last = len(ops) == n_ops - 1
        choices = ["add", "sub"] + (["mul"] if kind == "comparison" and value <= 9 else [])
        choices += ["div"] if last and kind != "comparison" else []
        op = r.choice(choices)
        b = r.choice([d for d in range(2, 10) if easy(op, value, d)] or [0])
        if not easy(op, value, b):
            return None
        ops.append((op, b))
        value = apply_op(op, value, b)
    if wrong_steps(start, ops) == []:
        return None
    people = r.sample(NAMES, 2 + len(ops))  # comparisons name a new person at every step
    unit = {"items": ITEMS, "comparison": ITEMS, "group": ITEMS, "rate": GOODS}.get(kind)
    thing, noun, adj = r.choice(UNITS)
    noun = r.choice(unit) if unit else noun
    template, words = [], []
    fields = {"n": people[0], "m": people[1], "u": noun, "t": thing, "adj": adj}

    def pick(slot: str, a: int, b: int) -> None:
        wordings = t[slot]
        idx = r.choice(_wordings(wordings, split, slot in ("open", "packs", "ask", "ask_div")))
        template.append(idx)
        words.append(wordings[idx].format(a=a, b=b, **fields))

    rest = ops
    if first_mul:
        pick("open" if kind == "rate" else "packs", start, ops[0][1])
        rest = ops[1:]
    else:
        pick("open", start, 0)
    value = run_ops(start, ops[: len(ops) - len(rest)])
    for k, (op, b) in enumerate(rest):
        fields["m"] = people[1 + k] if kind == "comparison" else people[1]
        pick(op, value, b)
        value = apply_op(op, value, b)
    pick("ask_div" if ops[-1][0] == "div" and "ask_div" in t else "ask", value, 0)
    question = " ".join(w[0].upper() + w[1:] for w in words)
    return VariedProblem(f"{kind}-{pid}", kind, question, start, tuple(ops), noun, people[0], tuple(template))


def wrong_steps(start: int, ops) -> list[int]:
    """The steps whose wrong operation (`WRONG_OP`) keeps every later step `easy` and changes the
    answer (2 * 2 and 2 + 2 would not)."""
    out = []
    for bad in range(len(ops)):
        value, ok = start, True
        for k, (op, b) in enumerate(ops):
            op = WRONG_OP[op] if k == bad else op
            ok = ok and easy(op, value, b)
            value = apply_op(op, value, b)
        if ok and value != run_ops(start, ops):
            out.append(bad)
    return out
