"""Attention-suppression matrix of one trace: prefix KV reuse with batched sentences vs one full
forward per suppressed sentence.

Naive: for each sentence j, a forward over the whole trace with attention to j suppressed.
Optimised: the clean trace's KV cache is computed once; each batch of sentences re-runs only the
tokens from its first sentence on, one row per suppressed sentence.

    python benchmarks/suppression.py [--backend nnsight] [--sentences 24] [--batch 4]
"""

from __future__ import annotations

import argparse

import torch
from common import best_time, report

import mechlens as ml
from mechlens.datasets import STEP_BY_STEP
from mechlens.studies.anchors import suppression_matrix

STEPS = [
    "First, I need to find how many apples Tom has at the start.",
    "He has 12 apples in his basket.",
    "Then he buys 7 more apples at the market.",
    "So 12 + 7 = 19 apples.",
    "Wait, he also gives 4 apples to his sister.",
    "Let me subtract those: 19 - 4 = 15.",
    "Let me check the subtraction again to be sure.",
    "Yes, 15 + 4 = 19, so the subtraction is right.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="transformer_lens")
    parser.add_argument("--sentences", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    model = ml.load_model(backend=args.backend)
    body = " ".join(STEPS[i % len(STEPS)] for i in range(args.sentences - 1)) + " The answer is 15."
    question = "Tom has 12 apples, buys 7 and gives 4 away. How many are left?" + STEP_BY_STEP
    trace = ml.ReasoningTrace.from_text(model, question, body)

    t_naive, naive = best_time(lambda: suppression_matrix(model, trace, reuse_prefix=False), repeat=1)
    t_fast, fast = best_time(lambda: suppression_matrix(model, trace, batch_size=args.batch), repeat=1)
    below = torch.tril(torch.ones_like(fast, dtype=torch.bool), -1)
    diff = (fast[below] - naive[below]).abs().max().item()
    results = {
        "backend": args.backend,
        "tokens": trace.n_tokens,
        "sentences": len(trace.sentences),
        "batch": args.batch,
        "naive_s": round(t_naive, 2),
        "fast_s": round(t_fast, 2),
        "max_abs_diff": diff,
        "time_ratio": t_fast / t_naive,
    }
    report("suppression", results)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
