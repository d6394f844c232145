"""The papers' model size: every analysis on DeepSeek-R1-Distill-Qwen-7B's architecture at full size
(28 blocks of 3584, 28 query and 4 key-value heads, 152,064-token vocabulary; seeded random bf16
weights, the real tokenizer: `load_model("r1-distill-qwen-7b-random")`, `make r1-header`), on
traces of 1k, 4k and 16k tokens.

    python benchmarks/scale.py --lengths 1024 4096 [--rows forward lens ...] [--device cuda]

For each trace length one process loads the model (once) and measures each row's wall time and
its peak resident memory above the loaded model (sampled every 5 ms, glibc's mmap threshold fixed
at 64 KB so that freed blocks leave at once: the peak is the live memory; `benchmarks/long_trace.py`
explains why). `--limit-gb` caps the process's address space so that a row that needs more reports
"out of memory" instead of meeting the kernel's OOM killer; off by default, because oneDNN's bf16
matmuls reserve address space far beyond what they touch and, refused it, fall back to a path
several times slower.

Rows (trace: 8 equal sentences, chat-templated, as in `long_trace.py`):
- forward: one forward of the trace in chunks (`model.forward_chunks`), logits of every
  position; its time is the bound each other row's ratio divides by;
- cache_one_layer: `run_with_cache` of the middle layer's residual stream, no logits;
- lens: `ml.logit_lens` of all 28 layers, entropy and KL to the output (bf16 unembedding);
- reasoning_score: `depth.reasoning_score` (late layers, JSD, sentences);
- receiver_attention: `anchors.sentence_attention` of every head (sentence x sentence);
- suppression: `anchors.suppression_matrix` for `--sources` source sentences (default 8);
- head_sweep_last_layer: the exact head sweep (`head_ablation_effects`, `positions=[-1]`) of the
  last layer's 28 heads: the clean forward plus 28 rows of one layer (the full sweep reruns each
  layer's 28 heads from that layer on: the clean forward plus 28 x 406 one-row layer runs);
- attribution: attribution patching of every head (one forward and backward, `method="attribution"`);
- probe: a linear probe's score at every position (`refusal_scores`, last layer);
- sampling_B_plain / sampling_B_context: `model.generate` of B prompts x 8 new tokens without and
  inside a context (`add_direction` on the middle layer), tokens/s; their bound is one forward of
  the same [B, prompt + 8] tokens (`--lengths 0` runs only these).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import is_oom

TRACE_ROWS = ("forward", "cache_one_layer", "lens", "reasoning_score", "receiver_attention", "suppression",
              "head_sweep_last_layer", "attribution", "probe")  # fmt: skip
SAMPLING_BATCHES = (1, 16, 64)
SAMPLING_ROWS = tuple(f"sampling_{b}_{kind}" for b in SAMPLING_BATCHES for kind in ("plain", "context"))
ROWS = TRACE_ROWS + SAMPLING_ROWS
NEW_TOKENS = 8
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def child(name: str, n_tokens: int, rows: list[str], device: str, sources: int) -> None:
    """Measure `rows` on one trace of `n_tokens`, printing one JSON line per row as it finishes."""
    import torch
    from common import PeakMemory
    from long_trace import build_trace

    import mechlens as ml
    from mechlens import anchors, depth
    from mechlens.ops.heads import head_ablation_effects
    from mechlens.ops.probes import LinearProbe
    from mechlens.studies.refusal.scores import refusal_scores

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    with PeakMemory() as load_mem:
        model = ml.load_model(name, dtype="bfloat16", device=device)
    model.memory_budget = 5 * 2**30  # of 24 GB, 15.5 for the weights: what one pass may hold
    print(json.dumps({"row": "load", "seconds": round(time.perf_counter() - start, 1),
                      "resident_gb": round(load_mem.extra_mb / 1024, 2)}), flush=True)  # fmt: skip
    last, middle = model.n_layers - 1, model.n_layers // 2
    trace = build_trace(model, n_tokens) if n_tokens else None
    toks = trace.tokens if trace is not None else None
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(model.d_model, generator=gen)
    probe = LinearProbe(max_epochs=20).fit(
        torch.randn(64, model.d_model, generator=gen), torch.arange(64) % 2
    )
    prompt = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May."

    def sampling(batch: int, context: bool):
        def run():
            prompts = [prompt] * batch
            if context:
                with model.add_direction(middle, direction, scale=1.0):
                    return model.generate(
                        prompts, max_new_tokens=NEW_TOKENS, temperature=0.6, batch_size=batch
                    )
            return model.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0.6, batch_size=batch)

        return run

    def lens():
        return ml.logit_lens(model, toks, stats=("entropy", "kl_final"), unembed_dtype="auto")

    def forward():
        for _ in model.forward_chunks(toks):
            pass

    calls = {
        "forward": forward,
        "cache_one_layer": lambda: model.run_with_cache(toks, ["resid_post"], [middle], return_logits=False),
        "lens": lens,
        "reasoning_score": lambda: depth.reasoning_score(model, trace, unit="sentence"),
        "receiver_attention": lambda: anchors.sentence_attention(model, trace),
        "suppression": lambda: anchors.suppression_matrix(model, trace, sources=list(range(sources))),
        "head_sweep_last_layer": lambda: head_ablation_effects(
            model,
            toks,
            lambda logits: logits[:, -1].float().logsumexp(-1),
            positions=[-1],
            layers=[last],
            progress=False,
        ),  # fmt: skip
        "attribution": lambda: head_ablation_effects(
            model,
            toks,
            lambda logits: logits[:, -1].float().logsumexp(-1),
            method="attribution",
            positions=[-1],
        ),
        "probe": lambda: refusal_scores(model, probe, [model.to_string(toks[0])], progress=False),
    }
    for b in SAMPLING_BATCHES:
        calls[f"sampling_{b}_plain"], calls[f"sampling_{b}_context"] = sampling(b, False), sampling(b, True)
    model(model.to_tokens(prompt))  # first-call allocations are not a row's
    bound_seconds: dict[int, float] = {}
    for row in rows:
        record: dict = {"row": row, "tokens": n_tokens}
        try:
            if row.startswith("sampling_"):
                batch = int(row.split("_")[1])
                if batch not in bound_seconds:  # one forward of the same [batch, prompt + new] tokens
                    ids = model.to_tokens([prompt] * batch)
                    ids = torch.cat([ids, ids[:, -NEW_TOKENS:]], 1)
                    t0 = time.perf_counter()
                    for _ in model.forward_chunks(ids):
                        pass
                    bound_seconds[batch] = time.perf_counter() - t0
                record["bound_seconds"] = round(bound_seconds[batch], 2)
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                out = calls[row]()
                seconds = time.perf_counter() - t0
            record |= {"seconds": round(seconds, 2), "peak_growth_mb": round(mem.extra_mb)}
            if row.startswith("sampling_"):
                new = sum(len(t) for t in out.tokens)
                record |= {"new_tokens": new, "tokens_per_s": round(new / seconds, 2)}
        except Exception as err:  # a row that fails is reported, the others still run
            text = f"{type(err).__name__}: {err}"
            record["error"] = "out of memory" if is_oom(text) else text[:300]
        print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--sources", type=int, default=8, help="source sentences of the suppression row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="r1-distill-qwen-7b-random", help="another model: a smoke test")
    parser.add_argument("--limit-gb", type=float, default=None, help="address-space cap (off by default)")
    parser.add_argument("--out", type=Path, default=None, help="append every row as a JSON line here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.model, args.child, args.rows, args.device, args.sources)
        return
    here = str(Path(__file__).resolve().parent)
    env = dict(os.environ) | MEMORY_ENV
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)

    def limit() -> None:
        if args.limit_gb and args.device == "cpu":
            cap = int(args.limit_gb * 1e9)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    for n in args.lengths:
        # sampling rows run once, with the first length; `0` runs only them
        rows = [
            r for r in args.rows if (r in SAMPLING_ROWS and n == args.lengths[0]) or (r in TRACE_ROWS and n)
        ]
        cmd = [sys.executable, __file__, "--child", str(n), "--device", args.device,
               "--sources", str(args.sources), "--model", args.model, "--rows", *rows]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=limit)
        forward = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            row = json.loads(line)
            if row["row"] == "forward" and "seconds" in row:
                forward = row["seconds"]
            bound = row.get("bound_seconds", forward if row["row"] != "load" else None)
            if bound and "seconds" in row:
                row["ratio_to_bound"] = round(row["seconds"] / bound, 2)
            row["device"] = args.device
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if proc.wait():
            print(
                json.dumps({"tokens": n, "error": f"the process ended with {proc.returncode} (killed?)"}),
                flush=True,
            )


if __name__ == "__main__":
    main()
