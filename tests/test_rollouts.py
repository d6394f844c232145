"""Sampling paths and engines: the fast path (plain Hugging Face model) gives the hooked path's tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import wrap_with_reference

import mechlens as ml
from mechlens import Sampling
from mechlens.datasets import Problem

SAMPLINGS = [
    Sampling(max_new_tokens=8, temperature=0, stop_at_eos=False),
    Sampling(max_new_tokens=8, temperature=0.8, top_p=0.9, n=3, seed=5),
]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_plain_path_gives_the_hooked_tokens(backend, sampling):
    model, _ = wrap_with_reference("llama", backend)
    prompts = ["Hi", "A longer prompt to pad against", "Third one here"]
    hooked = model.generate(prompts, sampling, path="hooked", batch_size=4).tokens
    plain = model.generate(prompts, sampling, path="plain", batch_size=4).tokens
    auto = model.generate(prompts, sampling, batch_size=2).tokens
    assert [t.tolist() for t in hooked] == [t.tolist() for t in plain] == [t.tolist() for t in auto]


def test_auto_path_hooks_when_an_intervention_is_active(llama):
    model, _ = llama
    kw = dict(max_new_tokens=6, temperature=0, stop_at_eos=False)
    with model.ablate_heads([(1, 0), (2, 2)]):
        auto = model.generate("Hello there", **kw).tokens[0].tolist()
        assert auto == model.generate("Hello there", path="hooked", **kw).tokens[0].tolist()
        with pytest.raises(ValueError, match='path="plain" runs no hooks'):
            model.generate("Hello there", path="plain", **kw)
    assert auto != model.generate("Hello there", **kw).tokens[0].tolist()
    with pytest.raises(ValueError, match="path must be one of"):
        model.generate("Hello there", path="fast", **kw)


def test_plain_model_shares_the_weights(llama):
    model, _ = llama
    kw = dict(max_new_tokens=6, temperature=0, stop_at_eos=False)
    before = model.generate("Hello there", **kw).tokens[0].tolist()
    with torch.no_grad(), model.trainable_blocks(0) as params:
        for p in params:
            p.add_(torch.randn_like(p) * 0.5, alpha=1.0)
    after_plain = model.generate("Hello there", path="plain", **kw).tokens[0].tolist()
    assert after_plain == model.generate("Hello there", path="hooked", **kw).tokens[0].tolist()
    assert after_plain != before


# ---------------------------------------------------------------- the engine interface
def test_local_engine_equals_generate(llama):
    from mechlens.rollouts import Engine, LocalEngine

    model, _ = llama
    sampling = Sampling(max_new_tokens=6, temperature=0.7, n=2, seed=3)
    prompts = ["Hi there", "A longer prompt to pad against"]
    engine = LocalEngine(model, batch_size=3)
    assert isinstance(engine, Engine)
    ids = [model.to_tokens(p)[0].tolist() for p in prompts]
    got = engine.sample(ids, sampling)
    want = model.generate(prompts, sampling).tokens
    assert [row for rows in got for row in rows] == [t.tolist() for t in want]
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a list of token ids"):
        engine.sample([[1, 2], "text"], sampling)
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        engine.sample([[]], sampling)
    with pytest.raises(ValueError, match="batch_size"):
        LocalEngine(model, batch_size=0)


class CountingEngine:
    """Any object with `name`, `describe` and `sample` is an engine; this one records its calls."""

    name = "counting"

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def describe(self):
        return {"engine": self.name}

    def sample(self, prompts, sampling):
        self.calls += 1
        return self.inner.sample(prompts, sampling)


def test_anchors_and_refusal_sample_through_the_engine(llama, tmp_path):
    from mechlens.rollouts import LocalEngine
    from mechlens.studies import anchors, refusal

    model, _ = llama
    problem = Problem("p", "What is 2+3?", "5", kind="number")
    trace = ml.ReasoningTrace.from_text(model, problem.question, "First add them. So it is 5. Done.")
    sampling = anchors.ANCHORS_SAMPLING.replace(n=2, max_new_tokens=4)
    engine = CountingEngine(LocalEngine(model))
    embed = lambda texts: torch.eye(8)[[len(t) % 8 for t in texts]]  # noqa: E731
    res = anchors.resample(
        model, trace, problem, sampling, cache=tmp_path, embed=embed, engine=engine, progress=False
    )
    assert engine.calls == len(trace.sentences) + 1
    again = anchors.resample(
        model, trace, problem, sampling, cache=tmp_path, embed=embed, engine=engine, progress=False
    )
    assert engine.calls == len(trace.sentences) + 1  # read back from the cache
    default = anchors.resample(model, trace, problem, sampling, cache=None, embed=embed, progress=False)
    assert [[r.text for r in rows] for rows in res.rollouts] == [
        [r.text for r in rows] for rows in again.rollouts
    ]
    assert [[r.text for r in rows] for rows in res.rollouts] == [
        [r.text for r in rows] for rows in default.rollouts
    ]
    replies = refusal.rollouts(
        model, ["Hi", "How are you?"], Sampling(max_new_tokens=5, temperature=0), engine=engine
    )
    plain = refusal.rollouts(model, ["Hi", "How are you?"], Sampling(max_new_tokens=5, temperature=0))
    assert engine.calls == len(trace.sentences) + 2 and replies == plain
