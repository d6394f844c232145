"""Head ablation sweeps: exact equals a per-head loop; attribution equals finite differences."""

from __future__ import annotations

import pytest
import torch
from conftest import wrap_with_reference

from mechlens.heads import head_ablation_effects


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].log_softmax(-1)[:, 7] - logits[:, -2].log_softmax(-1)[:, 3]  # [batch]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_sweep_equals_naive_loop(arch, backend):
    model, _ = wrap_with_reference(arch, backend)
    toks, mask = model.tokenize(["a short one", "and a longer second prompt"])  # left-padded
    fast = head_ablation_effects(model, toks, metric, attention_mask=mask, progress=False)
    clean = metric(model(toks, attention_mask=mask))
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            with model.ablate_heads([(layer, head)]):
                want = (metric(model(toks, attention_mask=mask)) - clean).mean()
            assert float(fast[layer, head]) == pytest.approx(float(want), abs=1e-5)
    assert fast.abs().max() > 1e-3  # the heads matter at all
    part = head_ablation_effects(model, toks, metric, attention_mask=mask, layers=[1], progress=False)
    assert part[[0, 2]].isnan().all() and torch.equal(part[1], fast[1])


def test_attribution_equals_finite_differences(backend):
    model, reference = wrap_with_reference("llama", backend)
    toks = torch.randint(5, 200, (2, 8), generator=torch.Generator().manual_seed(3))
    attr = head_ablation_effects(model, toks, metric, method="attribution", progress=False)
    d_head, eps = model.d_head, 1e-3
    for layer, head in [(0, 1), (1, 3), (2, 0)]:
        o_proj = reference.model.layers[layer].self_attn.o_proj
        values = []
        for scale in (1.0, 1.0 - eps):

            def hook(mod, args, scale=scale, head=head):
                x = args[0].clone()
                x[..., head * d_head : (head + 1) * d_head] *= scale
                return (x,)

            handle = o_proj.register_forward_pre_hook(hook)
            with torch.no_grad():
                values.append(metric(reference(toks).logits.double()).mean())
            handle.remove()
        finite = float((values[1] - values[0]) / eps)  # = -d metric / d scale = (0 - z) . grad
        assert float(attr[layer, head]) == pytest.approx(finite, rel=2e-2, abs=1e-4)


def test_head_effect_errors(llama, tokens):
    model, _ = llama
    with pytest.raises(ValueError, match="method must be one of"):
        head_ablation_effects(model, tokens, metric, method="loop")
    with pytest.raises(ValueError, match=r"to a \[batch\] tensor; got \(2, 11\)"):
        head_ablation_effects(model, tokens, lambda logits: logits[..., 0], progress=False)
