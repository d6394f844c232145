"""Activation collection for probes: batched, one hook, early stop vs one prompt at a time with a
full cache (embedded model, chat-templated instructions of the `refusal` dataset).

Naive: per prompt, one forward to the logits capturing resid_post at every layer, then the
last token of the wanted layers. Optimised: `collect_activations` (batches, only the requested
layers of one hook, the forward stops after the last of them).

    python benchmarks/collect.py [--backend nnsight] [--prompts 64] [--layers 10 20]
"""

from __future__ import annotations

import argparse

import torch
from common import best_time, report

import mechlens as ml
from mechlens import datasets
from mechlens.ops.probes import collect_activations
from mechlens.text.thinking import format_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="transformer_lens")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model = ml.load_model(backend=args.backend)
    texts = [format_prompt(model.tokenizer, i.text) for i in datasets.load("refusal")][: args.prompts]

    @torch.no_grad()
    def naive() -> torch.Tensor:
        rows = []
        for text in texts:
            _, cache = model.run_with_cache(text, ["resid_post"])  # every layer, logits too
            rows.append(cache["resid_post"][args.layers, 0, -1])  # [layers, d]
        return torch.stack(rows, 1)  # [layers, n, d]

    def batched() -> torch.Tensor:
        return collect_activations(model, texts, "resid_post", args.layers, batch_size=args.batch_size,
                                   progress=False)  # fmt: skip

    t_naive, slow = best_time(naive, 1)
    t_fast, fast = best_time(batched, 1)
    diff = float((fast - slow).abs().max())
    assert diff < 1e-3, f"batched collection differs from the per-prompt loop by {diff}"
    report(
        "collect",
        {"backend": args.backend, "prompts": len(texts), "layers": args.layers, "batch_size": args.batch_size,
         "naive_s": round(t_naive, 2), "batched_s": round(t_fast, 2), "max_abs_diff": diff,
         "batched_vs_naive_time_ratio": t_fast / t_naive},
    )  # fmt: skip


if __name__ == "__main__":
    main()
