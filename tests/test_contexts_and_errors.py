"""Contexts restore the model (also after an exception); bad input raises a clear ValueError."""

from __future__ import annotations

import pytest
import torch

import mechlens as ml


def all_contexts(model):
    d = torch.ones(model.d_model)
    return [
        lambda: model.ablate_heads([(0, 0)]),
        lambda: model.ablate_heads([(1, 1)], mode="mean"),
        lambda: model.suppress_attention(keys=(1, 4)),
        lambda: model.add_direction(1, d),
        lambda: model.project_out(d),
    ]


def test_contexts_restore_on_exit_and_exception(llama, tokens):
    model, _ = llama
    clean = model(tokens)
    for make in all_contexts(model):
        with make():
            assert not torch.equal(model(tokens), clean)
        assert torch.equal(model(tokens), clean)
        with pytest.raises(RuntimeError), make():
            raise RuntimeError("boom")
        assert torch.equal(model(tokens), clean)
        assert not model._interventions.items


def test_contexts_nest(llama, tokens):
    model, _ = llama
    clean = model(tokens)
    with model.ablate_heads([(0, 0)]):
        one = model(tokens)
        with model.suppress_attention(keys=(1, 3)):
            both = model(tokens)
        assert torch.equal(model(tokens), one)
    assert not torch.equal(one, both)
    assert torch.equal(model(tokens), clean)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.ablate_heads([(3, 0)]), r"layer 3 out of range: valid layers are 0\.\.2"),
        (lambda m: m.ablate_heads([(0, -1)]), r"head -1 out of range: valid heads are 0\.\.3"),
        (lambda m: m.ablate_heads([(0, 4)]), r"valid heads are 0\.\.3"),
        (lambda m: m.ablate_heads([(0, 0)], mode="half"), "mode must be"),
        (lambda m: m.ablate_heads([]), "heads is empty"),
        (lambda m: m.suppress_attention(keys=(5, 2)), r"keys must be a span"),
        (lambda m: m.suppress_attention(keys=(0, 10_000)), r"keys must be a span"),
        (lambda m: m.suppress_attention(keys=(0, 2), layers=[7]), "valid layers"),
        (lambda m: m.add_direction(0, torch.ones(5)), r"direction must have shape \(64,\)"),
        (lambda m: m.add_direction(0, torch.zeros(64)), "non-zero"),
        (lambda m: m.run_with_cache(m.to_tokens("hi"), ["resid_mid"]), "unknown cache name.*valid names"),
        (lambda m: m.run_with_cache(m.to_tokens("hi"), ["z"], layers=[9]), "valid layers"),
        (lambda m: m.to_tokens(""), "empty text"),
        (lambda m: m(torch.zeros(1, 0, dtype=torch.long)), "empty input"),
        (lambda m: m(torch.zeros(1, 1100, dtype=torch.long)), r"longer than the context window \(1024"),
        (lambda m: m(torch.full((1, 3), 10**6)), "token ids must lie in"),
        (lambda m: m.generate("hi", max_new_tokens=1100), "exceeds the context window"),
        (lambda m: m.unembed(torch.zeros(3)), "d_model=64"),
    ],
)
def test_bad_input_raises_clear_error(llama, call, match):
    model, _ = llama
    with pytest.raises(ValueError, match=match):
        call(model)


def test_intervene_refuses_an_unknown_intervention(llama, tokens):
    model, _ = llama
    clean = model(tokens)
    for item in (object(), "ablate", lambda z: z, None):
        with pytest.raises(TypeError, match="item must be an intervention"):
            model.intervene(item)
    assert torch.equal(model(tokens), clean) and not model.active_interventions


def test_span_or_positions_past_the_input_raise(llama, tokens):
    model, _ = llama  # tokens: 11 positions
    with model.suppress_attention(keys=(8, 12)), pytest.raises(ValueError, match="past the end.*11 tokens"):
        model(tokens)
    with model.ablate_heads([(0, 0)], positions=[3, 11]), pytest.raises(ValueError, match=r"0\.\.10"):
        model.run_with_cache(tokens, ["z"])
    with model.suppress_attention(keys=(2, 4), queries=[20]), pytest.raises(ValueError, match="must lie in"):
        model(tokens)
    with model.suppress_attention(keys=(8, 11)):
        model(tokens)  # a span ending exactly at the end is fine


def test_mean_ablation_in_generate_needs_reference(llama):
    model, _ = llama
    with model.ablate_heads([(0, 0)], mode="mean"), pytest.raises(ValueError, match="reference="):
        model.generate("hi", max_new_tokens=2)


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'tl'.*transformer_lens"):
        ml.load_model("tiny-llama", backend="tl")
    with pytest.raises(ValueError, match="unknown model .*local folder"):
        ml.load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown tiny model"):
        ml.load_model("tiny-rwkv")
    hf, _ = ml.tiny_model("llama")
    with pytest.raises(ValueError, match="needs its tokenizer"):
        ml.load_model(hf)


def test_repr_and_dims(llama):
    model, _ = llama
    assert (model.n_layers, model.n_heads, model.d_model, model.d_head) == (3, 4, 64, 16)
    assert model.d_vocab == len(model.tokenizer)
    assert model.backend.name in repr(model)


def test_a_capture_over_the_memory_budget_raises_and_names_the_ways_out(llama):
    model, _ = llama
    toks = torch.randint(3, 200, (1, 900))
    model.memory_budget = 2**20  # 1 MiB
    try:
        with pytest.raises(ValueError, match=r"reduce=.*forward_chunks"):
            model.run_with_cache(toks, ["pattern"])
        with pytest.raises(ValueError, match="model.memory_budget"):
            model(toks)
        model.memory_budget = 2**30
        _, cache = model.run_with_cache(toks, ["pattern"], layers=[0], return_logits=False,
                                        reduce=lambda name, layer, p: p[..., -1, :])  # fmt: skip
        assert cache["pattern"].shape == (1, 1, model.n_heads, 900)
    finally:
        model.memory_budget = 8 * 2**30
