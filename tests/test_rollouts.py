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

    def __init__(self, inner, prompts_per_call=1, fail_after=None):
        self.inner, self.calls, self.prompts = inner, 0, 0
        self.prompts_per_call, self.fail_after = prompts_per_call, fail_after

    def describe(self):
        return {"engine": self.name}

    def sample(self, prompts, sampling, seeds=None, stop=()):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("the engine died")
        self.calls += 1
        self.prompts += len(prompts)
        return self.inner.sample(prompts, sampling, seeds, stop)


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
    replies = refusal.sample_replies(
        model, ["Hi", "How are you?"], Sampling(max_new_tokens=5, temperature=0), engine=engine
    )
    plain = refusal.sample_replies(model, ["Hi", "How are you?"], Sampling(max_new_tokens=5, temperature=0))
    assert engine.calls == len(trace.sentences) + 2 and replies == plain


def test_per_prompt_seeds_make_samples_independent_of_the_call(llama):
    from mechlens.rollouts import LocalEngine, prompt_seeds

    model, _ = llama
    engine = LocalEngine(model)
    sampling = Sampling(max_new_tokens=6, temperature=1.0, n=3, seed=4)
    a, b = model.to_tokens("Hi there")[0].tolist(), model.to_tokens("Another prompt")[0].tolist()
    both = engine.sample([a, b], sampling, seeds=[7, 9])
    assert both[0] == engine.sample([a], sampling, seeds=[7])[0]
    assert both[1] == engine.sample([b], sampling.replace(seed=9))[0]
    assert prompt_seeds(sampling, 2) == [4 * 1_000_003, 4 * 1_000_003 + 1]
    with pytest.raises(ValueError, match="one seed per prompt"):
        engine.sample([a, b], sampling, seeds=[1])
    with pytest.raises(ValueError, match=r"seeds\[0\] must be an int"):
        engine.sample([a], sampling, seeds=[-1])


def test_stop_strings_end_a_continuation_at_the_completing_token(llama):
    from mechlens.rollouts import LocalEngine
    from mechlens.rollouts.engines import cut_at_stop

    model, _ = llama
    decode = model.tokenizer.decode
    engine = LocalEngine(model)
    sampling = Sampling(max_new_tokens=8, temperature=0, stop_at_eos=False)
    prompt = model.to_tokens("Hello")[0].tolist()
    full = engine.sample([prompt], sampling)[0][0]
    stop = decode(full[3:5])
    cut = engine.sample([prompt], sampling, stop=[stop])[0][0]
    assert stop in decode(cut) and stop not in decode(cut[:-1]) and cut == full[: len(cut)]
    assert len(cut) <= 5
    assert cut_at_stop([1, 2, 3], lambda ids: "".join(map(str, ids)), ("9",)) == [1, 2, 3]
    assert cut_at_stop([1, 2, 3], lambda ids: "".join(map(str, ids)), ("23", "12")) == [1, 2]
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings"):
        engine.sample([prompt], sampling, stop=[""])


def test_prefix_sampling_is_chunked_per_engine_and_resumes(llama, tmp_path):
    """Prompts go to the engine `prompts_per_call` at a time, each stored when its chunk returns;
    the texts do not depend on the chunking; a run killed mid-way resamples only what is missing."""
    from mechlens.rollouts import LocalEngine
    from mechlens.studies import anchors
    from mechlens.studies.anchors.resampling import sample_from_prefixes

    model, _ = llama
    text = "First we add one. Then we add two. Next we add three. After that we add four. Finally five. Done."
    trace = ml.ReasoningTrace.from_text(model, "Q", text)
    ends = [s.start for s in trace.sentences]
    sampling = anchors.ANCHORS_SAMPLING.replace(n=2, max_new_tokens=4)
    kw = dict(sampling=sampling, progress=False)
    one = sample_from_prefixes(model, trace, ends, cache=None, **kw)
    chunked = CountingEngine(LocalEngine(model), prompts_per_call=3)
    assert sample_from_prefixes(model, trace, ends, cache=None, engine=chunked, **kw) == one
    assert chunked.calls == 2 and chunked.prompts == len(ends)
    dying = CountingEngine(LocalEngine(model), prompts_per_call=2, fail_after=1)
    with pytest.raises(RuntimeError, match="died"):
        sample_from_prefixes(model, trace, ends, cache=tmp_path, engine=dying, **kw)
    assert len(list((tmp_path / "rollouts").glob("*.safetensors"))) == 2
    resumed = CountingEngine(LocalEngine(model), prompts_per_call=2)
    assert sample_from_prefixes(model, trace, ends, cache=tmp_path, engine=resumed, **kw) == one
    assert resumed.prompts == len(ends) - 2
