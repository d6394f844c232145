"""Sampling engines: one interface for every method that samples continuations.

An engine takes prompts as token ids (a trace cut at a sentence is continued from its exact
tokens) and returns, per prompt, `sampling.n` continuations as token ids. `describe()` names the
engine and its settings for provenance and cache keys.

- `LocalEngine(model)`: `HookedModel.generate`, on the plain Hugging Face model when no context
  is active (the fast path) and through the hooks otherwise; per-row seeds.

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

from mechlens.rollouts.engines import Engine, LocalEngine

__all__ = ["Engine", "LocalEngine"]
