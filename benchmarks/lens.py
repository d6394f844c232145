"""Streaming logit lens vs the naive all-layers-at-once lens vs forward + unembedding matmuls.

Same inputs in one process (embedded model, 512 tokens, every layer):
- floor: one forward capturing resid_post, then final norm + unembedding of each layer (the
  matmuls any logit lens must do), no statistics;
- streaming: `ml.logit_lens` (entropy, KL to the output, top-1), layer by layer and chunk by chunk;
- naive: unembed every layer at once into `[layers, batch, pos, vocab]`, then log_softmax.
Prints time ratios and each method's peak memory above its starting point (the forward pass
alone, capturing every layer's residual stream, is measured too: the lens's own extra memory is
the difference).

    python benchmarks/lens.py [--tokens 512] [--chunk 32] [--backend nnsight]
"""

from __future__ import annotations

import argparse

import torch
from common import PeakMemory, best_time, report

import mechlens as ml


def timed(fn, repeat: int) -> tuple[float, float, object]:
    with PeakMemory() as mem:
        seconds, result = best_time(fn, repeat)
    return seconds, mem.extra_mb, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="transformer_lens")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ml.load_model(backend=args.backend)
    toks = torch.randint(100, 40000, (1, args.tokens))

    @torch.no_grad()
    def floor():
        logits, cache = model.run_with_cache(toks, ["resid_post"])
        for layer in range(model.n_layers):
            model.unembed(cache["resid_post"][layer])
        return logits

    def streaming():
        return ml.logit_lens(model, toks, chunk=args.chunk)

    @torch.no_grad()
    def naive():
        logits, cache = model.run_with_cache(toks, ["resid_post"])
        logp = torch.log_softmax(model.unembed(cache["resid_post"]), -1)  # [layers, batch, pos, vocab]
        logp_final = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        kl = (logp_final.exp() * (logp_final - logp)).sum(-1)
        return entropy, kl, logp.argmax(-1)

    model.run_with_cache(toks, ["resid_post"])  # warm up: first-call allocations are not the method's
    _, m_forward, _ = timed(lambda: model.run_with_cache(toks, ["resid_post"]), 1)
    t_stream, m_stream, lens = timed(streaming, args.repeat)
    t_floor, m_floor, _ = timed(floor, args.repeat)
    t_naive, m_naive, (entropy, kl, top1) = timed(naive, 1)
    torch.testing.assert_close(lens.entropy, entropy, atol=1e-3, rtol=0)
    torch.testing.assert_close(lens.kl_final, kl, atol=1e-3, rtol=0)
    agree = float((lens.top1 == top1).float().mean())
    report(
        "lens",
        {"backend": args.backend, "tokens": args.tokens, "layers": model.n_layers, "chunk": args.chunk,
         "floor_s": round(t_floor, 2), "streaming_s": round(t_stream, 2), "naive_s": round(t_naive, 2),
         "forward_extra_mb": round(m_forward), "floor_extra_mb": round(m_floor),
         "streaming_extra_mb": round(m_stream), "naive_extra_mb": round(m_naive), "top1_agreement": agree,
         "vs_floor_time_ratio": t_stream / t_floor, "vs_naive_time_ratio": t_stream / t_naive},
    )  # fmt: skip


if __name__ == "__main__":
    main()
