"""Output-level signals of a response: perplexity, entropy, self-certainty, dynamic instability,
conditional entropy of the answer per step, and P(True).

These are the baselines and step signals beside the logit-lens Reasoning Score. Token-level
signals read the distribution that predicted each response token (position t-1 for token t).

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> trace = ml.ReasoningTrace.from_text(model, "What is 2+3?", "First, 2+3 is 5. So the answer is 5.")
    >>> sig = token_signals(model, trace)
    >>> sig.logprob.shape == (trace.n_tokens - trace.prompt_len,)
    True
    >>> bool(sig.perplexity > 1)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechlens.models.sampling import check_int
from mechlens.ops.distributions import BLOCK_ROWS, Distributions, jsd_probs
from mechlens.text.inputs import as_texts
from mechlens.text.trace import ReasoningTrace, Sentence, format_prompt

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel


@dataclass
class TokenSignals:
    """Per response token, each `[n]` (n = response tokens; `positions` their indices).

    logprob: log p(token | everything before it); entropy: entropy of that distribution (nats);
    self_certainty: KL(uniform || p) (high = confident); instability: JSD between this token's
    distribution and the previous one (the first entry compares with the last prompt position).
    """

    positions: Tensor
    logprob: Tensor
    entropy: Tensor
    self_certainty: Tensor
    instability: Tensor

    @property
    def perplexity(self) -> float:
        return math.exp(-float(self.logprob.mean()))

    @property
    def mean_entropy(self) -> float:
        return float(self.entropy.mean())

    @property
    def mean_self_certainty(self) -> float:
        return float(self.self_certainty.mean())


@torch.no_grad()
def token_signals(
    model: HookedModel, trace: ReasoningTrace, logits: Tensor | None = None, chunk: int | None = None
) -> TokenSignals:
    """Signals of every response token of `trace`; pass the trace's `logits [1, pos, vocab]` to
    reuse a forward pass you already ran. Without them the forward runs `chunk` positions at a
    time (default: `model.chunk_size_for` the trace) and the output distribution is read from the
    last layer a block of 64 positions at a time, so no `[pos, vocab]` tensor is ever held."""
    tokens = trace.tokens
    start, end = trace.prompt_len, trace.n_tokens
    acc = SignalRows.for_response(trace)
    # rows start-2 .. end-2 predict tokens start-1 .. end-1; the first row only feeds instability
    if logits is not None:
        acc.add(logits[0, start - 2 : end - 1])
    else:
        last = model.n_layers - 1
        for a, out in model.forward_chunks(
            tokens, None, chunk, capture={"resid_post": [last]}, stop_after=last
        ):
            resid = out.acts["resid_post"][last][0]  # [chunk, d_model]
            acc.add_residual(model, resid, a, end - 1)
    return acc.result(start, end)


class SignalRows:
    """Per-token signals of next-token logits fed in order, block by block (row r predicts token
    r + 1 of `tokens`; `first` is the first row fed). `result` gives the `TokenSignals`."""

    def __init__(self, tokens: Tensor, first: int):
        if first < 0:
            raise ValueError(f"the first row fed must be a position >= 0, got {first}")
        self.tokens, self.row = tokens, first
        self.parts: dict[str, list[Tensor]] = {"logprob": [], "entropy": [], "certainty": [], "unstable": []}
        self.prev: Tensor | None = None  # the last row's probabilities, for the next block's instability

    @classmethod
    def for_response(cls, trace: ReasoningTrace) -> SignalRows:
        """The rows of `trace`'s response (and the row before, for instability); `ValueError` when
        the trace has fewer than 2 prompt tokens or no response token."""
        start, end = trace.prompt_len, trace.n_tokens
        if start < 2 or end <= start:
            raise ValueError(
                f"need >= 2 prompt tokens and >= 1 response token, got {start} and {end - start}"
            )
        return cls(trace.tokens[0], first=start - 2)

    def add_residual(self, model: HookedModel, resid: Tensor, start: int, stop: int) -> None:
        """Feed the rows of `resid [n, d_model]` (positions `start ..`) that are due, up to row
        `stop` (exclusive), through the final norm and unembedding, a block of rows at a time."""
        lo, hi = max(start, self.row), min(start + len(resid), stop)
        for a in range(lo, hi, BLOCK_ROWS):
            self.add(model.unembed(resid[a - start : min(a + BLOCK_ROWS, hi) - start]))

    def add(self, z: Tensor) -> None:
        """`z [rows, vocab]`: logits of the next rows."""
        z = z.float()
        for a in range(0, len(z), BLOCK_ROWS):
            dist = Distributions(z[a : a + BLOCK_ROWS])
            ids = self.tokens[self.row + 1 : self.row + 1 + len(dist.p)].to(z.device)
            self.parts["logprob"].append(dist.logprob(ids)[0])
            self.parts["entropy"].append(dist.entropy)
            # mean_v log p_v = mean_v (z_v - max) + log p_max
            self.parts["certainty"].append(-math.log(z.shape[-1]) - dist.zs.mean(-1) - dist.log_top_p)
            p = dist.p if self.prev is None else torch.cat([self.prev, dist.p])
            self.parts["unstable"].append(jsd_probs(p[1:], p[:-1]))
            self.prev = dist.p[-1:]
            self.row += len(dist.p)

    def result(self, start: int, end: int) -> TokenSignals:
        lp, ent, cert = (torch.cat(self.parts[k])[1:].cpu() for k in ("logprob", "entropy", "certainty"))
        return TokenSignals(torch.arange(start, end), lp, ent, cert, torch.cat(self.parts["unstable"]).cpu())


@dataclass
class Instability:
    """Dynamic instability: per-token score, its peak and where the peak falls (0 = start, 1 = end)."""

    score: Tensor  # [n]
    peak: float
    peak_index: int
    peak_fraction: float


def dynamic_instability(signals: TokenSignals, combine: str = "product") -> Instability:
    """I_t = JSD(p_t, p_{t-1}) combined with the entropy H(p_t): their product (default) or the sum
    of their z-scores (`combine="zsum"`). The trace's score is the peak; an early peak reads as
    corrective, a late one as destructive."""
    jsd_t, h_t = signals.instability, signals.entropy
    if combine == "product":
        score = jsd_t * h_t
    elif combine == "zsum":
        score = _z(jsd_t) + _z(h_t)
    else:
        raise ValueError(f"combine must be 'product' or 'zsum', got {combine!r}")
    i = int(score.argmax())
    return Instability(score, float(score[i]), i, i / max(1, len(score) - 1))


def _z(x: Tensor) -> Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12) if len(x) > 1 else torch.zeros_like(x)


@torch.no_grad()
def conditional_entropy_per_step(
    model: HookedModel,
    trace: ReasoningTrace,
    answer: str,
    steps: Sequence[Sentence] | None = None,
    answer_prefix: str = "\nThe answer is ",
) -> Tensor:
    """H_k for k = 0..n_steps: mean entropy over the answer's tokens, teacher-forced as
    `answer_prefix + answer` right after the prompt and the first k steps.

    A falling H_k means the steps make the answer more certain. The trace runs once; each k
    reuses its KV cache up to the end of step k and runs only the appended answer.
    """
    steps = trace.sentences if steps is None else list(steps)
    if not answer.strip():
        raise ValueError("answer is empty")

    def encode(text: str) -> list[int]:
        return model.tokenizer(text, add_special_tokens=False)["input_ids"]

    suffix = encode(answer_prefix + answer)
    # a trailing space usually joins the answer's first token ("is" + " 5"): cut before it then
    heads = [encode(h) for h in (answer_prefix, answer_prefix.rstrip())]
    head = next((h for h in heads if suffix[: len(h)] == h and len(h) < len(suffix)), None)
    if head is None:
        raise ValueError(f"answer_prefix {answer_prefix!r} and the answer {answer!r} do not tokenise apart")
    suffix_ids = torch.tensor([suffix], device=model.device)  # [1, S]
    prefix = model.cache_prefix(trace.tokens)
    ends = [trace.prompt_len] + [s.end for s in steps]
    values = []
    for upto in ends:
        logits = model.continue_prefix(prefix, suffix_ids, upto=upto)  # [1, S, vocab]
        rows = logits[0, len(head) - 1 : -1].float()  # the distributions that predict the answer
        values.append(float(Distributions(rows).entropy.mean()))
    return torch.tensor(values)


P_TRUE_TEMPLATE = (
    "Question: {question}\nProposed answer: {answer}\n"
    "Is the proposed answer true or false? Reply with one word: True or False."
)


@torch.no_grad()
def p_true(
    model: HookedModel,
    questions: Sequence[str],
    answers: Sequence[str],
    template: str = P_TRUE_TEMPLATE,
    batch_size: int = 8,
) -> Tensor:
    """P(True) per (question, proposed answer): the model's next-token probability of "True",
    renormalised over {"True", "False"}, after the chat-templated `template`."""
    questions, answers = as_texts(questions, "questions"), as_texts(answers, "answers")
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    ids = [model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("True", "False")]
    prompts = [
        format_prompt(model.tokenizer, template.format(question=q, answer=a))
        for q, a in zip(questions, answers, strict=True)
    ]
    out = []
    batch_size = check_int("batch_size", batch_size, 1)
    for i in range(0, len(prompts), batch_size):
        tokens, mask = model.tokenize(prompts[i : i + batch_size])
        last = model(tokens, attention_mask=mask)[:, -1, ids].float()  # [batch, 2], left-padded
        out.append(torch.softmax(last, -1)[:, 0].cpu())
    return torch.cat(out) if out else torch.empty(0)
