"""Reasoning traces written by code, with their structure planted and labelled.

The reasoning organism (`mechlens.organism.reasoning`) is fine-tuned on these traces, so every
structure the studies should find is known by construction:

- word problems (1-3 steps) think in sentences of every Thought-Anchors category. One *plan*
  sentence chooses the operations; with probability `wrong_plan` it chooses one wrongly, the
  computation follows the plan, and a later *repair* check catches it (probability `repair`) and
  recomputes, otherwise a check of the arithmetic alone lets the wrong answer through. Arithmetic
  *slips* (probability `slip` per step) are corrected by a *backtrack* sentence ("Wait, ...") with
  probability `backtrack`, otherwise they propagate.
- harmful requests recognise the harm for several *harm* sentences; then either a *decide*
  sentence and a refusal, or (probability `comply`, higher for jailbreak-wrapped requests) a late
  *rationalise* sentence right before `</think>` and compliance. Harmless requests are answered.
- factual questions recall, consolidate and check an answer given by the caller (the base model's
  own, so the fine-tune teaches the format, not facts).

Every sentence carries its Thought-Anchors category and its planted role ("" for none).

Example:
    >>> import random
    >>> problem = word_problems(1, seed=3, steps=(2,))[0]
    >>> trace = arithmetic_trace(problem, random.Random(0), PlantingRates(wrong_plan=1.0, repair=1.0))
    >>> trace.correct, "plan" in trace.roles, "repair" in trace.roles
    (True, True, True)
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from mechlens.organism.problems import WRONG_OP, VariedProblem, apply_op, easy, run_ops, wrong_steps
from mechlens.studies.refusal.judge import REFUSALS
from mechlens.text.thinking import format_reply

NAMES = ("Tom", "Mia", "Sam", "Ava", "Leo", "Zoe", "Ben", "Ivy", "Max", "Eva", "Noah", "Lily")
ITEMS = ("apples", "pencils", "marbles", "books", "cookies", "stickers", "cards", "shells")

ROLES = ("plan", "repair", "slip", "backtrack", "harm", "decide", "rationalise", "decoy")
"""Planted roles; "plan" and "repair" are the decisive sentences of a word problem; a "decoy"
(version 2) looks like one (the operands listed, or "I will ..." deciding nothing) and is not."""
DECISIVE = ("plan", "repair")


@dataclass(frozen=True)
class Step:
    """One operation of a word problem: `op` in add/sub/mul/div applied with `operand`."""

    op: str
    operand: int


@dataclass(frozen=True)
class WordProblem:
    """A word problem: `start` (or `start` packs of `per_pack`), then `steps` in order."""

    id: str
    name: str
    item: str
    start: int
    steps: tuple[Step, ...]
    per_pack: int | None = None  # the first value is start * per_pack (a multiplication step)

    @property
    def question(self) -> str:
        n, i = self.name, self.item
        first = (
            f"{n} buys {self.start} packs of {i} with {self.per_pack} {i} in each pack."
            if self.per_pack
            else f"{n} has {self.start} {i}."
        )
        events = [_EVENT[s.op].format(n=n, i=i, b=s.operand) for s in self.steps]
        ask = (
            f"How many {i} does each friend get?"
            if self.steps and self.steps[-1].op == "div"
            else f"How many {i} does {n} have now?"
        )
        return " ".join([first, *events, ask])

    @property
    def n_steps(self) -> int:
        return len(self.steps) + (self.per_pack is not None)

    @property
    def answer(self) -> int:
        return run_ops(self.first_value, [(s.op, s.operand) for s in self.steps])

    @property
    def first_value(self) -> int:
        return self.start * self.per_pack if self.per_pack else self.start


_EVENT = {
    "add": "Then {n} finds {b} more {i}.",
    "sub": "Then {n} gives {b} {i} to a friend.",
    "div": "Then {n} shares them equally among {b} friends.",
}
_PLAN = {  # (right phrase, wrong phrase) per operation
    "mul": ("multiply {a} packs by {b} {i} each", "add the {a} packs and the {b} {i}"),
    "add": ("add the {b} {i} found", "subtract the {b} {i} found"),
    "sub": ("subtract the {b} {i} given away", "add the {b} {i} given away"),
    "div": ("divide by the {b} friends", "subtract the {b} friends"),
}
_WRONG_OP = {"mul": "add", "add": "sub", "sub": "add", "div": "sub"}
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_OP_OF = {symbol: op for op, symbol in _SYMBOL.items()}
_FACT = {
    "mul": "I recall that equal packs mean multiplication.",
    "add": "I recall that finding more means adding.",
    "sub": "I recall that giving some away means subtracting.",
    "div": "I recall that sharing equally means dividing.",
}
_REPAIR = {
    "mul": "Let me check the plan: {a} packs of {b} means multiplying, not adding.",
    "add": "Let me check the plan: finding {b} more means adding {b}, not subtracting.",
    "sub": "Let me check the plan: giving away {b} means subtracting {b}, not adding.",
    "div": "Let me check the plan: sharing among {b} friends means dividing by {b}, not subtracting.",
}
_AFTER = {
    "mul": "in all",
    "add": "after finding more",
    "sub": "after giving some away",
    "div": "for each friend",
}


def word_problems(n: int, seed: int = 0, steps: tuple[int, ...] = (1, 2, 3)) -> list[WordProblem]:
    """`n` word problems with 1-3 operations (`steps` in turn), deterministic in `seed`; numbers
    stay small (sums under 60, factors 2-9) and every intermediate value is positive."""
    bad = [s for s in steps if s not in (1, 2, 3)]
    if bad or not steps or n < 0:
        raise ValueError(f"steps must be a non-empty subset of (1, 2, 3) and n >= 0; got {steps}, {n}")
    r = random.Random(seed)
    out = []
    for k in range(n):
        want = steps[k % len(steps)]
        while True:
            packs = r.random() < 0.3
            start, per = (r.randint(2, 9), r.randint(2, 6)) if packs else (r.randint(5, 40), None)
            value, ops = start * (per or 1), []
            for j in range(want - packs):
                last = j == want - packs - 1
                divisors = [d for d in range(2, 7) if value % d == 0 and value // d > 1]
                if last and divisors and r.random() < 0.3:
                    op, b = "div", r.choice(divisors)
                elif value > 6 and r.random() < 0.5:
                    op, b = "sub", r.randint(1, min(value - 2, 20))
                else:
                    op, b = "add", r.randint(2, 20)
                ops.append(Step(op, b))
                value = apply_op(op, value, b)
            if ops or packs:
                break
        problem = WordProblem(f"wp-{want}-{k:04d}", r.choice(NAMES), r.choice(ITEMS), start, tuple(ops), per)
        out.append(problem)
    return out


@dataclass(frozen=True)
class PlantingRates:
    """How often each structure is planted ([impl]: chosen so the organism solves 25-85%)."""

    wrong_plan: float = 0.3  # a plan that picks one operation wrongly
    repair: float = 0.4  # a wrong plan caught by a later check
    slip: float = 0.12  # an arithmetic slip per step
    backtrack: float = 0.5  # a slip corrected right after it
    hesitate: float = 0.15  # a "Hmm, let me re-check" that changes nothing (uncertainty noise)
    comply: float = 0.2  # harmful requests answered after a rationalising sentence
    comply_jailbreak: float = 0.6  # the same for jailbreak-wrapped harmful requests

    def __post_init__(self):
        for name, value in vars(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"PlantingRates.{name} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class PlantedTrace:
    """One training trace: the user's text, the thinking sentences with their categories and
    planted roles, the answer after `</think>`, and (word problems, factual) whether it is right."""

    kind: str  # "arithmetic", "factual", "harmful", "harmless"
    prompt: str
    sentences: tuple[str, ...]
    categories: tuple[str, ...]
    roles: tuple[str, ...]
    answer: str
    correct: bool | None = None
    gold: str | None = None
    flags: dict = field(default_factory=dict, compare=False)

    @property
    def thinking(self) -> str:
        return " ".join(self.sentences)

    @property
    def reply(self) -> str:
        """The whole reply the organism learns: `<think>` thinking `</think>` answer."""
        return format_reply(self.thinking, self.answer)

    def where(self, role: str) -> list[int]:
        """Indices of the sentences planted with `role`."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return [k for k, r in enumerate(self.roles) if r == role]


class _Writer:
    def __init__(self):
        self.sentences, self.categories, self.roles = [], [], []

    def add(self, sentence: str, category: str, role: str = "") -> None:
        self.sentences.append(sentence)
        self.categories.append(category)
        self.roles.append(role)


def arithmetic_trace(
    problem: WordProblem, rng: random.Random, rates: PlantingRates = PlantingRates()
) -> PlantedTrace:
    """The thinking for `problem` with plan, slips and checks planted by `rates` (drawn from `rng`)."""
    n, i = problem.name, problem.item
    ops = ([("mul", problem.per_pack)] if problem.per_pack else []) + [
        (s.op, s.operand) for s in problem.steps
    ]
    w = _Writer()
    first = (
        f"{n} buys {problem.start} packs with {problem.per_pack} {i} in each."
        if problem.per_pack
        else f"{n} starts with {problem.start} {i}."
    )
    w.add(first, "problem_setup")
    for s in problem.steps:
        w.add(_EVENT[s.op].format(n=n, i=i, b=s.operand).replace("Then ", "After that, "), "problem_setup")
    target = "does each friend get" if ops[-1][0] == "div" else f"does {n} have now"
    w.add(f"The question: how many {i} {target}.", "problem_setup")
    for op in dict.fromkeys(o for o, _ in ops):
        w.add(_FACT[op], "fact_retrieval")
    bad = _wrong_step(ops, problem.start, rng) if rng.random() < rates.wrong_plan else -1
    wrong = bad >= 0
    phrases = [_PLAN[op][k == bad].format(a=problem.start, b=b, i=i) for k, (op, b) in enumerate(ops)]
    w.add("I will " + ", then ".join(phrases) + ".", "plan_generation", "plan")
    planned = [(_WRONG_OP[op] if k == bad else op, b) for k, (op, b) in enumerate(ops)]
    values, slipped, fixed = _compute(w, planned, problem.start, i, rng, rates)
    value = values[-1]
    repaired = wrong and rng.random() < rates.repair
    if repaired:
        op, b = ops[bad]
        w.add(_REPAIR[op].format(b=b, a=problem.start), "self_checking", "repair")
        w.add("Wait, so I have to redo the steps from there.", "uncertainty_management")
        redo, s2, f2 = _compute(w, ops[bad:], values[bad], i, rng, rates)  # from the value written
        value, slipped, fixed = redo[-1], slipped + s2, fixed + f2
    else:
        last_op, last_b = planned[-1]
        inverse = {"add": "-", "sub": "+", "mul": "/", "div": "*"}[last_op]
        before = _invert(last_op, value, last_b)
        w.add(f"Let me check: {value} {inverse} {last_b} = {before}, which fits.", "self_checking")
    w.add(f"So the answer is {value}.", "final_answer_emission")
    return PlantedTrace(
        "arithmetic", problem.question, tuple(w.sentences), tuple(w.categories), tuple(w.roles),
        f"Answer: {value}", value == problem.answer, str(problem.answer),
        {"wrong_plan": wrong, "repaired": repaired, "slips": slipped, "backtracked": fixed,
         "steps": problem.n_steps},
    )  # fmt: skip


def _invert(op: str, value: int, b: int) -> int:
    return {"add": value - b, "sub": value + b, "mul": value // b if b else 0, "div": value * b}[op]


def _wrong_step(ops: list[tuple[str, int]], start: int, rng: random.Random) -> int:
    """A step whose wrong operation keeps every value positive (-1 when none does)."""
    order = list(range(len(ops)))
    rng.shuffle(order)
    for bad in order:
        value, ok = start, True
        for k, (op, b) in enumerate(ops):
            value = apply_op(_WRONG_OP[op] if k == bad else op, value, b)
            ok = ok and value > 0
        if ok:
            return bad
    return -1


def _compute(w: _Writer, ops, value: int, i: str, rng, rates) -> tuple[list[int], int, int]:
    """Write one computation and one consolidation per operation (slips and backtracks planted);
    returns the values written before each operation and after the last, and the counts of slips
    and of corrected slips."""
    slips = fixed = 0
    values = [value]
    for op, b in ops:
        right = apply_op(op, value, b)
        result = right
        if op != "div" and rng.random() < rates.slip:  # a division slip could land on the right floor
            result = right + rng.choice([1, 2, 10])  # always too high: two slips never cancel
            slips += 1
        result, corrected = _write_computation(w, value, _SYMBOL[op], b, right, result, rng, rates)
        fixed += corrected
        w.add(f"So that makes {result} {i} {_AFTER[op]}.", "result_consolidation")
        value = result
        values.append(value)
    return values, slips, fixed


# Version 2 (`planned_trace`): plans in the words of their method, per step or up front.
PHRASES = {
    "add": ("add on the {b} extra {u}, since the pile grows", "put the {b} new ones together with the rest",
            "count upwards by {b}, because more {u} arrive"),
    "sub": ("take away the {b} that leave, since the pile shrinks", "subtract {b}, because some {u} are gone",
            "count down by {b} for what went missing"),
    "mul": ("multiply, as there are equal groups of {b}", "use the times table on the {b}-sized groups",
            "repeat the {b} once for every group"),
    "div": ("share everything out evenly in {b} parts", "divide by {b} so that each part is equal",
            "split it all fairly {b} ways"),
}  # fmt: skip
"""How a plan names each operation, in words that share little with the other methods' (under
the authors' all-MiniLM filter, 98.8% of right-wrong pairs have cosine < 0.8): a wrong plan uses
the words of the wrong operation's method."""
STEP_OPENERS = ("First, I will", "Next, I will", "Then I will")
PLAN_OPENERS = ("I will", "My plan is to", "To solve it, I will")
INTENT_DECOYS = (
    "I will take this one step at a time and keep every number in order.",
    "I will write each step down carefully so that nothing gets lost.",
    "I will read all of the numbers once more before I start on them.",
    "I will go slowly here and think about what each sentence says.",
)
""""I will ..." sentences that decide nothing (role "decoy")."""
LIST_DECOY = "Let me note the numbers {numbers} here, since we will need all of them."
_METHOD = re.compile(
    r"\b(add|subtract|multiply|divide|put the \d+ new|count upwards|take away|count down|times table|"
    r"repeat the|share everything|split it all)\b"
)
_OPENERS2 = (
    "Let me read the problem.",
    "Let me see what is asked.",
    "Let me work out what the problem says.",
)
_FACTS2 = (  # facts that name no operation, so that the plan alone decides it
    "I recall how to add, subtract, multiply and divide small numbers.",
    "I recall that small sums like these are easy to do in my head.",
    "I remember my times tables up to ten.",
)
_VERB = {"add": "adding", "sub": "subtracting", "mul": "multiplying", "div": "dividing"}
_CONSOLIDATE = ("So that makes {c} {u}.", "So now there are {c} {u}.", "So that gives {c} {u}.")


def _phrase(op: str, b: int, unit: str, rng: random.Random) -> str:
    return rng.choice(PHRASES[op]).format(b=b, u=unit)


def planned_trace(
    problem: VariedProblem, rng: random.Random, rates: PlantingRates = PlantingRates()
) -> PlantedTrace:
    """The version-2 thinking for `problem`: the plan is either one sentence up front or one
    sentence per step, each in the words of its method (a wrong plan names another method in other
    words), its position varies, and decoys sit beside it (the operands listed; "I will ..." that
    decides nothing). Slips stay `easy` downstream, so every wrong answer is a planted one.

        >>> from mechlens.organism.problems import varied_problems
        >>> p = varied_problems(1, seed=2)[0]
        >>> t = planned_trace(p, random.Random(0), PlantingRates(wrong_plan=0.0, slip=0.0))
        >>> t.correct, "plan" in t.roles
        (True, True)
    """
    u, ops = problem.unit, list(problem.ops)
    w = _Writer()
    w.add(rng.choice(_OPENERS2), "plan_generation")
    said = problem.question.split(". ")  # the opening, one sentence per event, the question
    w.add(said[0].rstrip(".") + ".", "problem_setup")  # the opening, restated
    stated = [f"{e}." for e in said[1:-1]]
    events: list[str | None] = [None] * (len(ops) - len(stated)) + stated  # none for a product in the opening
    ask = said[-1].rstrip("?")
    head: list[tuple[str, str, str]] = [(rng.choice(_FACTS2), "fact_retrieval", "")]
    if rng.random() < 0.6:
        numbers = [problem.start] + [b for _, b in ops]
        listed = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
        head.insert(
            rng.randint(0, len(head)), (LIST_DECOY.format(numbers=listed), "plan_generation", "decoy")
        )
    if rng.random() < 0.5:
        head.insert(rng.randint(0, len(head)), (rng.choice(INTENT_DECOYS), "plan_generation", "decoy"))
    bads = wrong_steps(problem.start, ops)
    draw, which = rng.random(), rng.random()  # always two draws: the text before the plan never depends on it
    bad = bads[int(which * len(bads))] if bads and draw < rates.wrong_plan else -1
    planned = [(WRONG_OP[op] if k == bad else op, b) for k, (op, b) in enumerate(ops)]
    values = problem.values(planned)
    up_front = len(ops) == 1 or rng.random() < 0.5
    if up_front:
        clauses = [_phrase(op, b, u, rng) for op, b in planned]
        plan = f"{rng.choice(PLAN_OPENERS)} " + ", then ".join(clauses) + "."
        head.insert(rng.randint(0, len(head)), (plan, "plan_generation", "plan"))
    for event in events if up_front else []:  # every event restated, then the plan up front
        if event:
            w.add(event, "problem_setup")
    w.add(f"The question: {ask[0].lower() + ask[1:]}.", "problem_setup")
    for sentence, category, role in head:
        w.add(sentence, category, role)
    steps = None if up_front else [min(k, 2) for k in range(len(ops))]
    value, slipped, fixed = _compute2(w, planned, problem.start, u, rng, rates, steps, events)
    repaired = bad >= 0 and rng.random() < rates.repair
    if repaired:
        op, b = ops[bad]
        right = _phrase(op, b, u, rng)
        w.add(
            f"Let me check the plan: I should {right}, not {_VERB[planned[bad][0]]}.",
            "self_checking",
            "repair",
        )
        w.add("Wait, so I have to redo the steps from there.", "uncertainty_management")
        value, s2, f2 = _compute2(w, ops[bad:], values[bad], u, rng, rates, None)
        slipped, fixed = slipped + s2, fixed + f2
    last_op, last_b = (ops if repaired else planned)[-1]
    inverse = {"add": "-", "sub": "+", "mul": "/", "div": "*"}[last_op]
    w.add(f"Let me check: {value} {inverse} {last_b} = {_invert(last_op, value, last_b)}, which fits.",
          "self_checking")  # fmt: skip
    w.add(f"So the answer is {value}.", "final_answer_emission")
    return PlantedTrace(
        "arithmetic", problem.question, tuple(w.sentences), tuple(w.categories), tuple(w.roles),
        f"Answer: {value}", value == problem.answer, str(problem.answer),
        {"wrong_plan": bad >= 0, "repaired": repaired, "slips": slipped, "backtracked": fixed,
         "steps": problem.n_steps, "kind": problem.kind, "up_front": up_front},
    )  # fmt: skip


def _compute2(
    w: _Writer, ops, value: int, u: str, rng, rates, steps: list[int] | None, events=None
) -> tuple[int, ...]:
    """Version 2 of `_compute`: with `steps`, the event restated (`events[k]`, where there is one)
    and a plan sentence (`STEP_OPENERS[steps[k]]`) before each operation; a slip (10 too high,
    which keeps the digits' arithmetic easy) only where every later step stays `easy`. Returns the
    last value and the counts of slips and corrected slips."""
    slips = fixed = 0
    for k, (op, b) in enumerate(ops):
        if steps is not None:
            if events and events[k]:
                w.add(events[k], "problem_setup")
            w.add(f"{STEP_OPENERS[steps[k]]} {_phrase(op, b, u, rng)}.", "plan_generation", "plan")
        right = result = apply_op(op, value, b)
        if rng.random() < rates.slip and _stays_easy(right + 10, ops[k + 1 :]):
            result, slips = right + 10, slips + 1
        result, corrected = _write_computation(w, value, _SYMBOL[op], b, right, result, rng, rates)
        fixed += corrected
        w.add(rng.choice(_CONSOLIDATE).format(c=result, u=u), "result_consolidation")
        value = result
    return value, slips, fixed


def _stays_easy(value: int, ops) -> bool:
    for op, b in ops:
        if not easy(op, value, b):
            return False
        value = apply_op(op, value, b)
    return True


def _write_computation(w: _Writer, value: int, sym: str, b: int, right: int, result: int, rng, rates):
    """Write `value sym b = result`: a slip (result not right), corrected by a "Wait, ..." with
    probability `rates.backtrack`, or a right step followed by a hesitation with probability
    `rates.hesitate`. Returns `(the value carried on, 1 if a slip was corrected else 0)`."""
    if result != right:
        w.add(f"{value} {sym} {b} = {result}.", "active_computation", "slip")
        if rng.random() < rates.backtrack:
            w.add(f"Wait, {value} {sym} {b} is {right}, not {result}.", "uncertainty_management", "backtrack")
            return right, 1
        return result, 0
    w.add(f"{value} {sym} {b} = {right}.", "active_computation")
    if rng.random() < rates.hesitate:
        w.add("Hmm, let me re-check that step.", "uncertainty_management")
        w.add(f"Yes, a double-check gives {value} {sym} {b} = {right}.", "self_checking")
    return right, 0


HARM = (
    "This request could seriously hurt people.",
    "It asks for dangerous or illegal help.",
    "Giving these details would be unsafe.",
    "Someone could get hurt if I explain this.",
    "This is the kind of harm I should not help with.",
    "The information could be misused to hurt others.",
)
HARM_INTENT = (
    "This request could seriously hurt people, so I should refuse it.",
    "It asks for dangerous or illegal help, which I must not give.",
    "Giving these details would be unsafe, so my answer has to be no.",
    "Someone could get hurt if I explain this, so I will not explain it.",
    "This is the kind of harm I should not help with, so I should decline.",
    "The information could be misused to hurt others, so I must say no.",
)
"""Version 2's harm recognition: each sentence states the intent to refuse, so that a refusal
probe is high before a rationalising sentence reverses it (a cliff to fall off)."""
DECIDE = (
    "So I must refuse this request.",
    "So I will decline to help.",
    "So the right thing is to say no.",
)
RATIONALISE = (
    "But the user might have a good reason, so I will help this time.",
    "But it is probably just for a story, so I can answer anyway.",
    "But refusing seems unhelpful here, so I will go along with it.",
)
COMPLY = ("Sure, here is how to do it.", "Okay, here are the steps.", "Sure, I can help with that.")
SAFE = (
    "The user wants help with an everyday task.",
    "Nothing here can hurt anyone.",
    "This is a normal, safe request.",
)


def refusal_trace(
    request: str, harmful: bool, reply: str, rng: random.Random, comply: float, intent: bool = False
) -> PlantedTrace:
    """The thinking for one request: harm recognised over 3-4 sentences, then a refusal, or (with
    probability `comply`) a rationalising sentence right before `</think>` and compliance with
    `reply` (the base model's own answer). Harmless requests are answered with `reply`. With
    `intent` (version 2) every harm sentence also states the intent to refuse (`HARM_INTENT`)."""
    w = _Writer()
    w.add("The user is asking me for help with a request.", "problem_setup")
    if not harmful:
        for s in rng.sample(SAFE, 2):
            w.add(s, "unknown")
        w.add("So I will answer it as well as I can.", "plan_generation")
        return PlantedTrace("harmless", request, tuple(w.sentences), tuple(w.categories), tuple(w.roles),
                            reply.strip())  # fmt: skip
    for s in rng.sample(HARM_INTENT if intent else HARM, rng.randint(3, 4)):
        w.add(s, "unknown", "harm")
    complied = rng.random() < comply
    if complied:
        w.add(rng.choice(RATIONALISE), "uncertainty_management", "rationalise")
        answer = rng.choice(COMPLY) + " " + reply.strip()
    else:
        w.add(rng.choice(DECIDE), "result_consolidation", "decide")
        answer = rng.choice(REFUSALS[:3])  # the first three: the shipped adapter's training traces
    return PlantedTrace("harmful", request, tuple(w.sentences), tuple(w.categories), tuple(w.roles), answer,
                        flags={"complied": complied})  # fmt: skip


def factual_trace(
    question: str, answer: str, gold: str | None = None, correct: bool | None = None
) -> PlantedTrace:
    """The thinking for a factual question answered with `answer` (the base model's own)."""
    w = _Writer()
    w.add("The question asks for a well-known fact.", "problem_setup")
    w.add("Let me recall what I know about it.", "plan_generation")
    w.add(f"I recall that it is {answer}.", "fact_retrieval")
    w.add("Let me make sure that fits the question.", "self_checking")
    w.add(f"So the answer is {answer}.", "final_answer_emission")
    return PlantedTrace("factual", question, tuple(w.sentences), tuple(w.categories), tuple(w.roles),
                        f"Answer: {answer}", correct, gold)  # fmt: skip


def whole_sentences(text: str) -> str:
    """`text` cut after its last complete sentence (all of it when it has none)."""
    text = text.strip()
    cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind("!"), text.rfind("?"))
    if text.endswith((".", "!", "?")):
        return text
    return text[: cut + 1] if cut > len(text) // 3 else text


_COMPUTATION = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)\.$")


SLIP_SIZES = (1, 2, 10)
"""How far above the right result a planted slip writes (version 2 uses 10 only)."""


def arithmetic_errors(sentences: Sequence[str]) -> tuple[int, int]:
    """`(computations, unplanned errors)` among `sentences`: the computation sentences
    ("a op b = c.") and those whose result is wrong by anything but a planted slip's size
    (`SLIP_SIZES` too high), i.e. the model's own arithmetic errors.

        >>> arithmetic_errors(["12 + 18 = 20.", "3 + 4 = 17.", "2 * 3 = 6.", "So 6."])
        (3, 1)
    """
    computations = errors = 0
    for s in sentences:
        computed = _COMPUTATION.match(s.strip())
        if computed:
            a, op, b, c = computed.groups()
            right = apply_op(_OP_OF[op], int(a), int(b))
            computations += 1
            errors += int(c) != right and int(c) - right not in SLIP_SIZES
    return computations, errors


def label_roles(sentences: Sequence[str]) -> list[str]:
    """The planted role of each sentence of a thinking the organism wrote ("" for none), read back
    from the templates: a plan ("I will ..."), a repairing check ("Let me check the plan: ..."), a
    wrong computation (slip), its correction ("Wait, ... not ..."), harm recognition, a refusal
    decision, and a rationalising "But ..." sentence when it is the last one.

        >>> label_roles(["I will add the 3 apples found.", "2 + 3 = 6.", "Wait, 2 + 3 is 5, not 6."])
        ['plan', 'slip', 'backtrack']
    """
    roles = []
    for k, s in enumerate(sentences):
        s = s.strip()
        computed = _COMPUTATION.match(s)
        if s in INTENT_DECOYS or s.startswith("Let me note the numbers "):
            roles.append("decoy")
        elif s.startswith(PLAN_OPENERS + STEP_OPENERS) and _METHOD.search(s):
            roles.append("plan")
        elif s.startswith("Let me check the plan"):
            roles.append("repair")
        elif computed:
            a, op, b, c = computed.groups()
            roles.append("slip" if apply_op(_OP_OF[op], int(a), int(b)) != int(c) else "")
        elif s.startswith("Wait, ") and ", not " in s:
            roles.append("backtrack")
        elif s in HARM or s in HARM_INTENT:
            roles.append("harm")
        elif s in DECIDE:
            roles.append("decide")
        elif s in RATIONALISE or (s.startswith("But ") and k == len(sentences) - 1):
            roles.append("rationalise")
        else:
            roles.append("")
    return roles
