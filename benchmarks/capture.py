"""Selective capture with early stop vs capturing everything (embedded model, 512 tokens).

Naive: cache every name at every layer and run to the logits, then take one layer.
Optimised: `run_with_cache(names=["resid_post"], layers=[L], return_logits=False)`.

    python benchmarks/capture.py [--backend nnsight] [--layer 10]
"""

from __future__ import annotations

import argparse

import torch
from common import best_time, report

import mechlens as ml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="transformer_lens")
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ml.load_model(backend=args.backend)
    toks = torch.randint(100, 40000, (1, args.tokens))
    names = ["resid_pre", "resid_post", "pattern", "z"]

    def naive():
        return model.run_with_cache(toks, names)[1].at("resid_post", args.layer)

    def selective():
        return model.run_with_cache(toks, ["resid_post"], layers=[args.layer], return_logits=False)[1][
            "resid_post"
        ][0]

    t_naive, a = best_time(naive)
    t_sel, b = best_time(selective)
    assert torch.equal(a, b), "selective capture changed the activations"
    report(
        "capture",
        {"backend": args.backend, "layer": args.layer, "tokens": args.tokens,
         "naive_s": round(t_naive, 3), "selective_s": round(t_sel, 3), "time_ratio": t_sel / t_naive},
    )  # fmt: skip


if __name__ == "__main__":
    main()
