"""Long reasoning traces: time and peak memory of each analysis of one trace at 512, 2k and 8k
tokens (8000: the embedded model's window is 8192).

For each length and analysis, a fresh process loads the embedded model, builds a trace of that
many tokens (8 sentences of equal length, so the suppression matrix has 8 sources at every
length), and measures the analysis's wall time and its peak resident memory above the loaded
model. The floor is the work any logit lens must do: the forward (in 512-position chunks) and the
final norm + unembedding of every layer's residual stream, no statistics. Reported: time / floor
time and peak growth in MB, for

- lens: `ml.logit_lens` of all 30 layers (entropy, KL to the output, top-1);
- score: the Reasoning Score (`depth.reasoning_score`, late layers, JSD);
- attention: sentence x sentence attention of every head (`anchors.sentence_attention`);
- suppression: the attention-suppression matrix (`anchors.suppression_matrix`, 8 sources).

    python benchmarks/long_trace.py [--lengths 512 2048 8192] [--analyses lens score attention suppression]
    python benchmarks/long_trace.py --pythonpath /path/to/an/older/checkout   # the same on other code

`--limit-gb` caps each child's address space (an analysis that needs more reports "out of memory").
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

ANALYSES = ("lens", "score", "attention", "suppression")
SENTENCES = 8


WORDS = [
    "we",
    "add",
    "the",
    "next",
    "number",
    "to",
    "the",
    "total",
    "and",
    "then",
    "check",
    "that",
    "the",
    "sum",
    "is",
    "still",
    "right",
]


def build_trace(model, n_tokens: int):
    """A chat-templated trace of about `n_tokens` tokens whose response is 8 equal sentences."""
    import mechlens as ml

    prompt = "Add the numbers step by step."

    def make(words: int):
        text = " ".join(
            f"Step {s} is that " + " ".join(WORDS[(s + w) % len(WORDS)] for w in range(words)) + "."
            for s in range(SENTENCES)
        )
        return ml.ReasoningTrace.from_text(model, prompt, text, keep_last=True)  # all 8 sentences count

    words = max(4, n_tokens // SENTENCES)
    trace = make(words)
    words = max(4, round(words * (words * SENTENCES) / max(trace.n_tokens - 40, 1)))  # one rescale
    trace = make(words)
    while trace.n_tokens > n_tokens:
        words -= max(1, (trace.n_tokens - n_tokens) // SENTENCES)
        trace = make(words)
    return trace


def child(analysis: str, n_tokens: int) -> dict:
    import torch
    from common import PeakMemory

    import mechlens as ml
    from mechlens import anchors, depth

    torch.set_grad_enabled(False)
    model = ml.load_model()
    trace = build_trace(model, n_tokens)
    calls = {
        "lens": lambda: ml.logit_lens(model, trace.tokens),
        "score": lambda: depth.reasoning_score(model, trace, unit="sentence"),
        "attention": lambda: anchors.sentence_attention(model, trace),
        "suppression": lambda: anchors.suppression_matrix(model, trace),
        "suppression-one-source": lambda: anchors.suppression_matrix(model, trace, sources=[0]),
    }
    if analysis == "floor":

        def run():
            layers = list(range(model.n_layers))
            for _, out in model.forward_chunks(trace.tokens, None, 512, capture={"resid_post": layers}):
                for layer in range(model.n_layers):
                    model.unembed(out.acts["resid_post"][layer])

        calls["floor"] = run
    model(trace.tokens[:, :64])  # first-call allocations are not the analysis's
    with PeakMemory() as mem:
        start = time.perf_counter()
        calls[analysis]()
        seconds = time.perf_counter() - start
    return {"analysis": analysis, "tokens": trace.n_tokens, "seconds": round(seconds, 2),
            "peak_growth_mb": round(mem.extra_mb), "sentences": len(trace.sentences)}  # fmt: skip


def run_child(analysis: str, n_tokens: int, pythonpath: str | None, limit_gb: float) -> dict:
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, here, env.get("PYTHONPATH")) if p)

    def limit() -> None:
        cap = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    done = subprocess.run(
        [sys.executable, __file__, "--child", analysis, "--tokens", str(n_tokens)],
        capture_output=True, text=True, env=env, preexec_fn=limit, timeout=3600,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        oom = "MemoryError" in done.stderr or "out of memory" in done.stderr.lower() or done.returncode == -9
        return {
            "analysis": analysis,
            "tokens": n_tokens,
            "error": "out of memory" if oom else done.stderr[-400:],
        }
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8000])
    parser.add_argument("--analyses", nargs="+", default=list(ANALYSES), choices=ANALYSES)
    parser.add_argument("--pythonpath", default=None, help="run the analyses on the mechlens found here")
    parser.add_argument("--limit-gb", type=float, default=16.0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=512, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens)))
        return
    rows = []
    for n in args.lengths:
        floor = run_child("floor", n, None, args.limit_gb)
        for analysis in args.analyses:
            row = run_child(analysis, n, args.pythonpath, args.limit_gb)
            if "seconds" in row and "seconds" in floor:
                row["time_ratio"] = round(row["seconds"] / floor["seconds"], 3)
                # the residual stream itself: 30 layers x pos x 576 float32
                row["residual_stream_mb"] = round(30 * row["tokens"] * 576 * 4 / 2**20)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if "time_ratio" in row:
                print(f"long_trace.{analysis}.{n}.time_ratio: {row['time_ratio']:.3f}", flush=True)
    print(json.dumps({"benchmark": "long_trace", "pythonpath": args.pythonpath, "rows": rows}))


if __name__ == "__main__":
    main()
