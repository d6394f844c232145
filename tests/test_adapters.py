"""Low-rank adapters: training changes only what it should, the merged model equals base weights
plus `scale * B @ A` computed by hand, and a saved adapter rebuilds the trained model exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import wrap_with_reference

from mechlens.ops.adapters import LowRankAdapter
from mechlens.ops.finetune import finetune_adapter

PROMPTS = ["Q: hi\nA:", "Q: bye\nA:", "Q: what?\nA:"]
TARGETS = [" hello there", " goodbye now", " nothing much"]


def train(model):
    return finetune_adapter(model, PROMPTS, TARGETS, rank=2, alpha=4.0, train_layers=2, epochs=3, lr=1e-2,
                            batch_size=2, progress=False)  # fmt: skip


def test_merged_model_is_base_plus_low_rank_updates(backend, tokens):
    model, reference = wrap_with_reference("llama", backend)
    before = {n: p.detach().clone() for n, p in model.plain_model.named_parameters()}
    adapter, losses = train(model)
    assert losses[-1] < losses[0]
    trained_blocks = (f"model.layers.{model.n_layers - 2}.", f"model.layers.{model.n_layers - 1}.")
    assert set(adapter.factors) == {
        n for n, p in before.items() if n.startswith(trained_blocks) and p.ndim == 2
    }
    with torch.no_grad():  # the reference: plain HF weights plus each update, by hand
        for name, p in reference.named_parameters():
            if name in adapter.factors:
                a, b = adapter.factors[name]
                p.add_(adapter.scale * (b @ a))
            assert torch.equal(p, dict(model.plain_model.named_parameters())[name]), name
        want = reference(tokens).logits
    torch.testing.assert_close(model(tokens), want, atol=1e-5, rtol=1e-5)
    assert not any("parametrizations" in n for n, _ in model.hf_model.named_parameters())
    assert all(not p.requires_grad for p in model.hf_model.parameters())


def test_saved_adapter_rebuilds_the_trained_model_exactly(backend, tokens, tmp_path):
    model, _ = wrap_with_reference("llama", backend)
    adapter, _ = train(model)
    adapter.save(tmp_path / "a.safetensors", {"seed": 0})
    fresh, _ = wrap_with_reference("llama", backend)
    loaded, info = LowRankAdapter.load(tmp_path / "a.safetensors")
    assert info == {"seed": 0} and loaded.rank == 2 and loaded.scale == adapter.scale
    loaded.merge_into(fresh)
    assert torch.equal(fresh(tokens), model(tokens))
    kw = dict(max_new_tokens=5, temperature=0, stop_at_eos=False)
    assert torch.equal(fresh.generate(tokens, **kw).tokens[0], model.generate(tokens, **kw).tokens[0])


def test_adapter_errors(tmp_path):
    model, _ = wrap_with_reference("llama", "transformer_lens")
    (tmp_path / "x.safetensors").write_bytes(b"")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a mechlens adapter"):
        LowRankAdapter.load(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        LowRankAdapter.init(model, [1], rank=0)
    factors = {"model.layers.99.mlp.down_proj.weight": (torch.ones(1, 2), torch.ones(2, 1))}
    stranger = LowRankAdapter(1, 1.0, factors)
    with pytest.raises(ValueError, match="does not have"):
        stranger.merge_into(model)
    wrong = LowRankAdapter.init(model, [1], rank=1)
    name = next(iter(wrong.factors))
    wrong.factors[name] = (torch.ones(1, 3), torch.ones(5, 1))
    with pytest.raises(ValueError, match="is \\(5, 3\\)"):
        wrong.merge_into(model)
