"""Sampling speed: the fast path (plain Hugging Face model, no hooks) and the hooked path of
`HookedModel.generate` against `transformers` `generate` on the same model, in one process.

1. Batch 1 and batch 16 (16 copies of one prompt, no KV sharing), `--new` new tokens each,
   temperature 0.6, top-p 0.95: tokens/s of `transformers`, the plain path and the hooked path,
   and each path's ratio to `transformers`.
2. `n = 16` samples of one prompt: `transformers` with `num_return_sequences=16` against ours,
   which computes the prompt once and shares its KV cache across the samples.
3. The anchors resampling of one fixed organism trace (its greedy answer to a held-out problem;
   `--model base`: a fixed text on the embedded model): `--rollouts` (default 100, the paper's)
   rollouts of `--new` tokens from before each of `--prefixes` evenly spaced sentences, through
   each engine: `LocalEngine` on the hooked path (the float32 engine the anchors study used) and
   on the plain path, `SharedPrefixEngine` in bf16 and in float32, and `EndpointEngine` on vLLM's
   CPU server in bf16 (`make vllm`; started here, its start-up time reported separately;
   `--no-vllm` leaves it out). Every engine gets the same prompts, seeds and token counts (no
   stop at EOS). Printed per engine: tokens/s, the ratio to the hooked float32 engine, and the
   ratio to this machine's bound, measured in the same run: at `slots` rows per step a decoder
   needs 2 x parameters FLOP per token, run by the model's own matmul shapes at the rate measured
   here (bf16 or float32), and it reads its weights once per step at the measured bandwidth; the
   bound is slots / max(compute time, weight-read time) per step. The bound leaves out attention
   over the prompt, so no engine can reach it.

    python benchmarks/rollouts.py [--rollouts 100] [--prefixes 4] [--new 48] [--no-vllm] [--model base]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import best_time, report

import mechlens as ml
from mechlens import Sampling
from mechlens.models.loading import embedded_weights_dir
from mechlens.rollouts import EndpointEngine, LocalEngine, SharedPrefixEngine, VLLMServer, vllm_python
from mechlens.text.thinking import format_prompt

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
RESPONSE = (
    "First, Tom starts with 3 apples. Then he buys 4 more apples. So we add 3 and 4. "
    "3 + 4 = 7. Let me check: 7 - 4 = 3, which matches. So Tom has 7 apples. Answer: 7"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="transformer_lens")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-vllm", action="store_true", help="leave out the vLLM CPU server")
    parser.add_argument("--model", choices=("organism", "base"), default="organism")
    parser.add_argument("--rollouts", type=int, default=100)
    parser.add_argument("--prefixes", type=int, default=4)
    parser.add_argument("--resample-new", type=int, default=48)
    parser.add_argument("--slots", type=int, default=256)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = ml.load_model(backend=args.backend)
    prompt = format_prompt(model.tokenizer, QUESTION)
    sampling = Sampling(max_new_tokens=args.new, temperature=0.6, top_p=0.95, stop_at_eos=False)
    results: dict = {"backend": args.backend, "new_tokens": args.new, "threads": torch.get_num_threads()}

    def hf(ids: torch.Tensor, mask: torch.Tensor, n: int = 1) -> torch.Tensor:
        torch.manual_seed(0)
        return model.plain_model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
            do_sample=True, temperature=0.6, top_p=0.95, top_k=0, num_return_sequences=n,
            pad_token_id=model.tokenizer.pad_token_id,
        )  # fmt: skip

    for batch in (1, 16):
        ids, mask = model.tokenize([prompt] * batch)
        tokens = batch * args.new
        t_hf, _ = best_time(lambda ids=ids, mask=mask: hf(ids, mask), args.repeat)
        for path in ("plain", "hooked"):
            t, out = best_time(
                lambda path=path, ids=ids, mask=mask, batch=batch: model.generate(
                    ids, sampling, attention_mask=mask, batch_size=batch, path=path
                ),
                args.repeat,
            )
            assert sum(len(x) for x in out.tokens) == tokens
            results[f"batch{batch}_{path}_tok_per_s"] = round(tokens / t, 1)
            results[f"batch{batch}_{path}_vs_transformers_ratio"] = t_hf / t
        results[f"batch{batch}_transformers_tok_per_s"] = round(tokens / t_hf, 1)

    # n samples of one prompt: ours shares the prompt's KV cache; transformers expands the prompt
    ids, mask = model.tokenize([prompt])
    t_hf, _ = best_time(lambda: hf(ids, mask, n=16), args.repeat)
    t_ours, _ = best_time(lambda: model.generate(ids, sampling.replace(n=16), batch_size=16), args.repeat)
    results["n16_shared_prompt_vs_transformers_ratio"] = t_hf / t_ours

    # the anchors resampling of one fixed trace: prefixes before evenly spaced sentences
    subject, trace = resampling_trace(model, args.model, args.backend)
    spaced = np.linspace(0, len(trace.sentences) - 1, min(args.prefixes, len(trace.sentences))).round()
    prompts = [trace.tokens[0, : trace.sentences[int(k)].start].tolist() for k in sorted(set(spaced))]
    rollouts = sampling.replace(n=args.rollouts, max_new_tokens=args.resample_new)
    results |= {"resampling_model": args.model, "resampling_sentences": len(trace.sentences),
                "resampling_prefixes": len(prompts), "rollouts": args.rollouts,
                "resampling_new_tokens": args.resample_new}  # fmt: skip

    def resample(engine) -> int:
        count, step = 0, engine.prompts_per_call
        for i in range(0, len(prompts), step):
            part = prompts[i : i + step]
            rows = engine.sample(part, rollouts, seeds=list(range(i, i + len(part))))
            count += sum(len(r) for per_prompt in rows for r in per_prompt)
        assert count == len(prompts) * args.rollouts * args.resample_new, count
        return count

    engines = {
        "hooked_float32": (LocalEngine(subject, path="hooked"), torch.float32),
        "plain_float32": (LocalEngine(subject, path="plain"), torch.float32),
        "shared_prefix_float32": (SharedPrefixEngine(subject, "float32", slots=args.slots), torch.float32),
        "shared_prefix_bfloat16": (SharedPrefixEngine(subject, "bfloat16", slots=args.slots), torch.bfloat16),
    }
    bound = {dtype: decode_bound(subject, dtype, args.slots) for dtype in (torch.float32, torch.bfloat16)}
    for dtype, b in bound.items():
        name = str(dtype).removeprefix("torch.")
        results[f"bound_{name}"] = b
    times, dtypes = {}, {}
    for name, (engine, dtype) in engines.items():
        times[name], count = best_time(lambda engine=engine: resample(engine), 1)
        dtypes[name] = dtype
    if not args.no_vllm:
        folder = subject.hf_model.name_or_path if args.model == "organism" else embedded_weights_dir()
        with VLLMServer(folder, name="subject", python=vllm_python(), dtype="bfloat16") as server:
            results["vllm_server_startup_s"] = round(server.startup_s, 1)
            engine = EndpointEngine(
                server.url, "subject", tokenizer=subject.tokenizer, concurrency=len(prompts)
            )
            resample(engine)  # warm-up: the server's first requests compile and allocate
            times["vllm_bfloat16"], count = best_time(lambda: resample(engine), 1)
            dtypes["vllm_bfloat16"] = torch.bfloat16
    for name, t in times.items():
        rate = count / t
        results[f"resampling_{name}_tok_per_s"] = round(rate, 1)
        results[f"resampling_{name}_vs_hooked_float32_ratio"] = times["hooked_float32"] / t
        results[f"resampling_{name}_vs_bound_ratio"] = rate / bound[dtypes[name]]["tok_per_s"]
    report("rollouts", results)


def resampling_trace(model, which: str, backend: str):
    """The subject and its fixed trace: the organism's greedy answer to a held-out problem, or
    the fixed `RESPONSE` on the embedded model."""
    if which == "base":
        return model, ml.ReasoningTrace.from_text(model, QUESTION, RESPONSE)
    from mechlens.datasets import STEP_BY_STEP
    from mechlens.organism import held_out_problems, load_subject

    subject = load_subject("organism", backend)
    problem = held_out_problems(1, seed=44, steps=(3,))[0]
    question = problem.question + STEP_BY_STEP
    ids, mask = subject.tokenize([format_prompt(subject.tokenizer, question)])
    out = subject.generate(ids, Sampling(max_new_tokens=288, temperature=0, n=1), attention_mask=mask)
    return subject, ml.ReasoningTrace.from_text(subject, question, subject.tokenizer.decode(out.tokens[0]))


def decode_bound(model, dtype: torch.dtype, slots: int, repeat: int = 3) -> dict:
    """Tokens/s at most at `slots` rows per decode step for `model` in `dtype`: the step's matmuls
    (every linear layer and the unembedding at `slots` rows) timed here, against reading the
    weights once at the bandwidth measured here (a copy of a 512 MB buffer)."""
    shapes = [tuple(m.weight.shape) for m in model.plain_model.modules() if isinstance(m, torch.nn.Linear)]
    weights = [torch.randn(shape, dtype=dtype) for shape in set(shapes)]
    xs = {w.shape[1]: torch.randn(slots, w.shape[1], dtype=dtype) for w in weights}
    by_shape = {tuple(w.shape): w for w in weights}
    flop = sum(2 * slots * a * b for a, b in shapes)

    def step() -> None:
        for shape in shapes:
            w = by_shape[shape]
            torch.nn.functional.linear(xs[w.shape[1]], w)

    step()
    compute, _ = best_time(step, repeat)
    src = torch.ones(2**27, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy, _ = best_time(lambda: dst.copy_(src), repeat)
    bandwidth = 2 * src.numel() * 4 / copy  # bytes/s, read + write
    weight_bytes = sum(a * b for a, b in shapes) * torch.empty(0, dtype=dtype).element_size()
    per_step = max(compute, weight_bytes / bandwidth)
    return {"tok_per_s": slots / per_step, "matmul_tflop_per_s": flop / compute / 1e12,
            "bandwidth_gb_per_s": bandwidth / 1e9, "slots": slots}  # fmt: skip


if __name__ == "__main__":
    main()
