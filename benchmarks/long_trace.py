"""Long reasoning traces: time and peak memory of each analysis of one trace at 512, 2k, 4k and 8k
tokens (8000: the embedded model's window is 8192).

For each length and analysis, a fresh process loads the embedded model, builds a trace of that
many tokens (8 sentences of equal length, so the suppression matrix has 8 sources at every
length), and measures the analysis's wall time and its peak resident memory above the loaded
model. The floor is the work any logit lens of the float32 model must do: the forward (in
512-position chunks) and the final norm + float32 unembedding of every layer's residual stream,
no statistics; the bf16 floor is the same with the unembedding matmuls in bf16 (256-row blocks),
the work left to a lens with bf16 blocks. Reported: time / floor time (and / bf16 floor time for
the lens) and peak growth in MB, for

- lens: `ml.logit_lens` of all 30 layers (entropy, KL to the output, top-1), with bf16
  unembedding blocks where the CPU multiplies bf16 fast (`unembed_dtype="auto"`; float32
  statistics);
- score: the Reasoning Score (`depth.reasoning_score`, late layers, JSD);
- attention: sentence x sentence attention of every head (`anchors.sentence_attention`);
- suppression: the attention-suppression matrix (`anchors.suppression_matrix`, 8 sources).

    python benchmarks/long_trace.py [--lengths 512 2048 8192] [--analyses lens score attention suppression]
    python benchmarks/long_trace.py --pythonpath /path/to/an/older/checkout   # the same on other code

Each analysis runs in two children: one timed under the default allocator, one measuring peak
memory with glibc's mmap threshold fixed at 64 KB (`MALLOC_MMAP_THRESHOLD_`). glibc's default
threshold rises with each large free, after which blocks of up to 32 MB come from heap arenas
that fragment and keep freed memory resident: the same 4000-token forward then measured 460-1120
MB from run to run. The fixed threshold returns freed blocks at once, so the peak is the live
memory (to within 1% from run to run) at about twice the time; both peaks are printed.

`--limit-gb` caps each child's address space (an analysis that needs more reports "out of memory").
With the lens among the analyses, the last lines state issue 26's bars and whether each is met:
the 512-token lens at most 1.15x the floor, and its peak growth at 4096 tokens under 600 MB.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import is_oom

ANALYSES = ("lens", "score", "attention", "suppression")
SENTENCES = 8
BARS = {  # issue 26, point 4: (length, row key, comparison, goal, unit)
    "lens time": (512, "time_ratio", "<=", 1.15, "x the float32 floor"),
    "lens memory": (4096, "peak_growth_mb", "<", 600, "MB peak growth"),
}


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
        return ml.ReasoningTrace.from_text(model, prompt, text, rule="thought-branches")  # all 8 count

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
    # bf16 unembedding blocks where the CPU multiplies bf16 fast (older code, --pythonpath: no such option)
    has_dtype = "unembed_dtype" in inspect.signature(ml.logit_lens).parameters
    lens_kw = {"unembed_dtype": "auto"} if has_dtype else {}
    calls = {
        "lens": lambda: ml.logit_lens(model, trace.tokens, **lens_kw),
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
    if analysis == "floor-bf16":
        from mechlens.models.architecture import require_submodule

        weight = require_submodule(model.hf_model, model.arch.head_path).weight.detach().bfloat16()

        def run_bf16():
            layers = list(range(model.n_layers))
            for _, out in model.forward_chunks(trace.tokens, None, 512, capture={"resid_post": layers}):
                for layer in range(model.n_layers):
                    x = model.final_norm(out.acts["resid_post"][layer]).reshape(-1, model.d_model).bfloat16()
                    for a in range(0, len(x), 256):
                        torch.nn.functional.linear(x[a : a + 256], weight)

        calls["floor-bf16"] = run_bf16
    model(trace.tokens[:, :64])  # first-call allocations are not the analysis's
    with PeakMemory() as mem:
        start = time.perf_counter()
        calls[analysis]()
        seconds = time.perf_counter() - start
    row = {"analysis": analysis, "tokens": trace.n_tokens, "seconds": round(seconds, 2),
           "peak_growth_mb": round(mem.extra_mb), "sentences": len(trace.sentences)}  # fmt: skip
    if analysis == "lens":
        row["unembed_dtype"] = lens_kw.get("unembed_dtype", "model")
    return row


MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""The allocator setting of the memory children (see the module docstring)."""


def run_child(
    analysis: str, n_tokens: int, pythonpath: str | None, limit_gb: float, memory: bool = False
) -> dict:
    """One analysis in a fresh process; with `memory`, under `MEMORY_ENV` (peak = live memory)."""
    env = dict(os.environ) | (MEMORY_ENV if memory else {})
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
        oom = is_oom(done.stderr) or done.returncode == -9
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
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8000])
    parser.add_argument("--analyses", nargs="+", default=list(ANALYSES), choices=ANALYSES)
    parser.add_argument("--pythonpath", default=None, help="run the analyses on the mechlens found here")
    parser.add_argument("--limit-gb", type=float, default=16.0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=512, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens)))
        return
    rows, lens_rows = [], {}
    for n in args.lengths:
        floor = run_child("floor", n, None, args.limit_gb)
        floor_bf16 = run_child("floor-bf16", n, None, args.limit_gb) if "lens" in args.analyses else {}
        print(json.dumps(floor), json.dumps(floor_bf16) if floor_bf16 else "", flush=True)
        for analysis in args.analyses:
            row = run_child(analysis, n, args.pythonpath, args.limit_gb)
            live = run_child(analysis, n, args.pythonpath, args.limit_gb, memory=True)
            if "peak_growth_mb" in row and "peak_growth_mb" in live:
                row["peak_growth_mb_default_allocator"] = row["peak_growth_mb"]
                row["peak_growth_mb"] = live["peak_growth_mb"]
            if "seconds" in row and "seconds" in floor:
                row["time_ratio"] = round(row["seconds"] / floor["seconds"], 3)
                if analysis == "lens" and "seconds" in floor_bf16:
                    row["time_ratio_bf16_floor"] = round(row["seconds"] / floor_bf16["seconds"], 3)
                # the residual stream itself: 30 layers x pos x 576 float32
                row["residual_stream_mb"] = round(30 * row["tokens"] * 576 * 4 / 2**20)
            rows.append(row)
            if analysis == "lens":
                lens_rows[n] = row
            print(json.dumps(row), flush=True)
            for key in ("time_ratio", "time_ratio_bf16_floor"):
                if key in row:
                    print(f"long_trace.{analysis}.{n}.{key}: {row[key]:.3f}", flush=True)
    for name, (n, key, op, goal, unit) in BARS.items():
        row = lens_rows.get(n)
        if row is None:
            if "lens" in args.analyses:
                print(f"bar {name}: not measured (add {n} to --lengths)")
            continue
        value = row.get(key)
        met = value is not None and (value <= goal if op == "<=" else value < goal)
        also = f"; x the bf16 floor: {row.get('time_ratio_bf16_floor')}" if key == "time_ratio" else ""
        verdict = "met" if met else "NOT met"
        print(f"bar {name} at {n} tokens: {value} {unit} (goal {op} {goal}{also}): {verdict}", flush=True)
    print(json.dumps({"benchmark": "long_trace", "pythonpath": args.pythonpath, "rows": rows}))


if __name__ == "__main__":
    main()
