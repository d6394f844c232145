"""Sampling paths and engines: the fast path (plain Hugging Face model) gives the hooked path's tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import wrap_with_reference

from mechlens import Sampling

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
