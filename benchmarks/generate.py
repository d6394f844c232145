"""Batched sampling with a shared prompt KV cache vs one batch-1 generate per sample.

Naive: `n` separate `generate(prompt, n=1)` calls. Optimised: one `generate(prompt, n=n)`, which
computes the prompt once, shares its KV cache across the samples and decodes them as one batch.
Reports generated tokens per second of each and their ratio.

    python benchmarks/generate.py [--n 16] [--new 32]
"""

from __future__ import annotations

import argparse

from common import best_time, report

import mechlens as ml
from mechlens.text.thinking import format_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="transformer_lens")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    model = ml.load_model(backend=args.backend)
    prompt = format_prompt(model.tokenizer, "Tom has 3 apples and buys 4 more. How many apples does he have?")
    prompt += "Let me think step by step. " * 8  # a prefix of ~130 tokens, as a reasoning prefix would be
    kw = dict(max_new_tokens=args.new, temperature=0.6, top_p=0.95, stop_at_eos=False)

    def naive():
        return [model.generate(prompt, seed=s, **kw).tokens[0] for s in range(args.n)]

    def batched():
        return model.generate(prompt, n=args.n, batch_size=args.n, **kw).tokens

    t_naive, a = best_time(naive, repeat=1)
    t_batch, b = best_time(batched, repeat=1)
    tokens = args.n * args.new
    assert sum(len(x) for x in a) == sum(len(x) for x in b) == tokens
    results = {"backend": args.backend, "n": args.n, "new_tokens": args.new}
    results["prompt_tokens"] = model.to_tokens(prompt).shape[1]
    results["naive_tok_per_s"] = round(tokens / t_naive, 1)
    results["batched_tok_per_s"] = round(tokens / t_batch, 1)
    results["speedup_ratio"] = t_naive / t_batch
    report("generate", results)


if __name__ == "__main__":
    main()
