"""Head ablation sweeps on the embedded model: exact batched sweep vs a per-head loop, and
attribution patching vs the exact sweep (time ratio and top-10 overlap).

Naive: one forward per head under `model.ablate_heads([(layer, head)])` (270 forwards).
Exact: per layer, every head in one batch, starting from the clean residual entering the layer;
timed once unembedding every position and once with `positions=[-1]` (the only one the metric reads).
Attribution: one forward and one backward.

    python benchmarks/heads.py [--backend nnsight] [--tokens 64]
"""

from __future__ import annotations

import argparse

import torch
from common import best_time, report

import mechlens as ml
from mechlens.ops.heads import head_ablation_effects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="transformer_lens")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ml.load_model(backend=args.backend)
    toks = torch.randint(100, 40000, (1, args.tokens))
    target = int(model(toks)[0, -1].argmax())

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, target]  # [batch]

    @torch.no_grad()
    def naive():
        clean = metric(model(toks))
        out = torch.zeros(model.n_layers, model.n_heads)
        for layer in range(model.n_layers):
            for head in range(model.n_heads):
                with model.ablate_heads([(layer, head)]):
                    out[layer, head] = (metric(model(toks)) - clean).mean()
        return out

    t_naive, slow = best_time(naive, 1)
    t_exact, fast = best_time(lambda: head_ablation_effects(model, toks, metric, progress=False), 1)
    t_last, last = best_time(
        lambda: head_ablation_effects(model, toks, metric, positions=[-1], progress=False), 1
    )
    t_attr, attr = best_time(
        lambda: head_ablation_effects(model, toks, metric, "attribution", progress=False), 1
    )
    diff = float((fast - slow).abs().max())
    diff_last = float((last - slow).abs().max())
    assert max(diff, diff_last) < 1e-4, f"exact sweep differs from the loop by {max(diff, diff_last)}"

    def top(effects):
        return set(effects.abs().flatten().topk(10).indices.tolist())

    report(
        "heads",
        {"backend": args.backend, "tokens": args.tokens, "heads": model.n_layers * model.n_heads,
         "naive_s": round(t_naive, 2), "exact_s": round(t_exact, 2),
         "exact_last_position_s": round(t_last, 2), "attribution_s": round(t_attr, 2),
         "max_abs_diff_exact_vs_naive": diff, "max_abs_diff_exact_last_position_vs_naive": diff_last,
         "top10_overlap_attribution_vs_exact": len(top(attr) & top(fast)),
         "exact_vs_naive_time_ratio": t_exact / t_naive,
         "exact_last_position_vs_naive_time_ratio": t_last / t_naive,
         "attribution_vs_exact_time_ratio": t_attr / t_exact},
    )  # fmt: skip


if __name__ == "__main__":
    main()
