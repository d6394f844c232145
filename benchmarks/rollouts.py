"""Sampling speed: the fast path (plain Hugging Face model, no hooks) and the hooked path of
`HookedModel.generate` against `transformers` `generate` on the same model, in one process.

1. Batch 1 and batch 16 (16 copies of one prompt, no KV sharing), `--new` new tokens each,
   temperature 0.6, top-p 0.95: tokens/s of `transformers`, the plain path and the hooked path,
   and each path's ratio to `transformers`.
2. `n = 16` samples of one prompt: `transformers` with `num_return_sequences=16` against ours,
   which computes the prompt once and shares its KV cache across the samples.
3. The anchors resampling of one fixed trace (16 rollouts from before each sentence) through
   each engine: `LocalEngine` on the hooked path and on the fast (plain) path, and
   `EndpointEngine` on vLLM's CPU server (`make vllm`; started here, its start-up time reported
   separately; `--no-vllm` leaves it out). Tokens/s of each and the ratio to the hooked engine.

    python benchmarks/rollouts.py [--new 32] [--backend transformer_lens] [--repeat 2] [--no-vllm]
"""

from __future__ import annotations

import argparse

import torch
from common import best_time, report

import mechlens as ml
from mechlens import Sampling
from mechlens.models.loading import embedded_weights_dir
from mechlens.rollouts import EndpointEngine, LocalEngine, VLLMServer, vllm_python
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

    # the anchors resampling of a fixed trace: every prefix, 16 rollouts each, one seed per prefix
    trace = ml.ReasoningTrace.from_text(model, QUESTION, RESPONSE)
    prompts = [trace.tokens[0, : s.start].tolist() for s in trace.sentences]
    rollouts = sampling.replace(n=16)
    results["resampling_sentences"] = len(prompts)

    def resample(engine) -> int:
        count, step = 0, engine.prompts_per_call
        for i in range(0, len(prompts), step):
            part = prompts[i : i + step]
            rows = engine.sample(part, rollouts, seeds=list(range(i, i + len(part))))
            count += sum(len(r) for per_prompt in rows for r in per_prompt)
        return count

    engines = {"hooked": LocalEngine(model, path="hooked"), "plain": LocalEngine(model, path="plain")}
    times = {}
    for name, engine in engines.items():
        times[name], count = best_time(lambda engine=engine: resample(engine), 1)
        results[f"resampling_{name}_tok_per_s"] = round(count / times[name], 1)
    if not args.no_vllm:
        with VLLMServer(embedded_weights_dir(), name="smollm2", python=vllm_python()) as server:
            results["vllm_server_startup_s"] = round(server.startup_s, 1)
            engine = EndpointEngine(
                server.url, "smollm2", tokenizer=model.tokenizer, concurrency=len(prompts)
            )
            resample(engine)  # warm-up: the server's first requests compile and allocate
            times["vllm"], count = best_time(lambda: resample(engine), 1)
            results["resampling_vllm_tok_per_s"] = round(count / times["vllm"], 1)
    for name, t in times.items():
        if name != "hooked":
            results[f"resampling_{name}_vs_hooked_ratio"] = times["hooked"] / t
    report("rollouts", results)


if __name__ == "__main__":
    main()
