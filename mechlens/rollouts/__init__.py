"""Sampling engines: one interface for every method that samples continuations.

An engine takes prompts as token ids (a trace cut at a sentence is continued from its exact
tokens) and returns, per prompt, `sampling.n` continuations as token ids. `describe()` names the
engine and its settings for provenance and cache keys.

- `LocalEngine(model)`: `HookedModel.generate`, on the plain Hugging Face model when no context
  is active (the fast path) and through the hooks otherwise; per-row seeds.
- `EndpointEngine(urls, model)`: OpenAI-compatible `/v1/completions` servers (vLLM, SGLang,
  hosted providers), one or many, with bounded concurrency and retries.
- `VLLMEngine(folder)`: an in-process `vllm.LLM` with prefix caching (a Python that has vLLM).
- `VLLMServer(folder)`: starts vLLM's server from its own environment (`make vllm`) and stops it.
- `SharedPrefixEngine(model)`: in-process batched sampling for resampling (prompts that are
  prefixes of one another share one prefill), in bf16 where the CPU is fast at it; Llama-style
  decoders, no interventions.

Example:
    >>> import mechlens as ml
    >>> from mechlens.rollouts import LocalEngine
    >>> model = ml.load_model("tiny-llama")
    >>> engine = LocalEngine(model)
    >>> out = engine.sample([[5, 6, 7], [8, 9]], ml.Sampling(max_new_tokens=3, n=2, temperature=0))
    >>> len(out), len(out[0]), len(out[0][0]) <= 3
    (2, 2, True)
    >>> engine.describe()["engine"]
    'mechlens'
"""

from mechlens.rollouts.endpoint import EndpointEngine, EndpointError, engine_for
from mechlens.rollouts.engines import Engine, LocalEngine, check_prompts, prompt_seeds
from mechlens.rollouts.inprocess import VLLMEngine
from mechlens.rollouts.server import VLLMServer, free_port, vllm_python
from mechlens.rollouts.shared_prefix import SharedPrefixEngine

__all__ = [
    "EndpointEngine",
    "EndpointError",
    "Engine",
    "LocalEngine",
    "SharedPrefixEngine",
    "VLLMEngine",
    "VLLMServer",
    "check_prompts",
    "engine_for",
    "free_port",
    "prompt_seeds",
    "vllm_python",
]
