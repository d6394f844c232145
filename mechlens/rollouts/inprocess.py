"""`VLLMEngine`: sampling with an in-process `vllm.LLM`, automatic prefix caching on.

For a Python that has both mechlens's dependencies and vLLM (typically a GPU machine); on this
project's CPU machines vLLM lives in its own environment, so sample through `VLLMServer` +
`EndpointEngine` there. All prompts of a call go to vLLM at once (it schedules and batches them);
the `n` samples of a prompt, and every prompt sharing a prefix, reuse its KV cache.

Example:
    >>> from mechlens.rollouts import VLLMEngine
    >>> engine = VLLMEngine("/models/r1-distill-qwen-7b", dtype="bfloat16")   # doctest: +SKIP
    >>> engine.sample([[1, 2, 3]], ml.Sampling(max_new_tokens=8, n=4))      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mechlens.models.sampling import Sampling
from mechlens.rollouts.engines import check_request


class VLLMEngine:
    """A `vllm.LLM` over a local model folder (or an existing `llm=`).

    Args:
        model: a Hugging Face folder or name vLLM can load; ignored when `llm` is given.
        llm: an already built `vllm.LLM`.
        progress: vLLM's own progress bar.
        **llm_args: passed to `vllm.LLM` (`dtype`, `max_model_len`, `tensor_parallel_size`, ...);
            `enable_prefix_caching` defaults to True.
    """

    name = "vllm"
    prompts_per_call = 1024

    def __init__(self, model: str | Path | None = None, llm: Any = None, progress: bool = False, **llm_args):
        if llm is None:
            if model is None:
                raise ValueError("give model= (a folder or name vLLM can load) or llm= (a vllm.LLM)")
            try:
                from vllm import LLM
            except ImportError as err:
                raise ImportError(
                    "VLLMEngine needs vllm in this Python; on a CPU machine use `make vllm` with "
                    "VLLMServer + EndpointEngine instead"
                ) from err
            llm = LLM(model=str(model), **{"enable_prefix_caching": True, **llm_args})
        self.llm, self.progress = llm, progress
        self.model_name = str(model) if model is not None else str(getattr(llm, "model", "vllm"))
        self.llm_args = {k: str(v) for k, v in llm_args.items()}
        tokenizer = llm.get_tokenizer()
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.vocab_size = len(tokenizer)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "model": Path(self.model_name).name, "args": self.llm_args}

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        seeds: Sequence[int] | None = None,
        stop: Sequence[str] = (),
    ) -> list[list[list[int]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids, seeds, stop = check_request(prompts, sampling, seeds, stop, self.vocab_size)
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=s,
                stop=list(stop) or None,
                ignore_eos=not sampling.stop_at_eos,
                skip_special_tokens=False,
            )
            for s in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=self.progress
        )
        return [[self._strip(c) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]

    def _strip(self, completion) -> list[int]:
        ids = list(completion.token_ids)
        if ids and ids[-1] == self.eos and completion.finish_reason == "stop":
            ids = ids[:-1]
        return ids
