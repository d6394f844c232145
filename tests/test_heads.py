"""Head ablation sweeps: exact equals a per-head loop; attribution equals finite differences."""

from __future__ import annotations

import pytest
import torch
from conftest import wrap_with_reference
from test_interventions import blocks, hooks

from mechlens.models.architecture import get_submodule
from mechlens.ops import heads as ml_heads
from mechlens.ops.heads import head_ablation_effects


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


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_unembedding_only_chosen_positions_changes_nothing(method, backend):
    model, _ = wrap_with_reference("llama", backend)
    toks, mask = model.tokenize(["a short one", "and a longer second prompt"])
    full = head_ablation_effects(model, toks, metric, method, attention_mask=mask, progress=False)
    part = head_ablation_effects(model, toks, metric, method, attention_mask=mask, positions=[-2, -1],
                                 progress=False)  # fmt: skip
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-4)
    n = int(mask.sum(1).min())  # positions count each row's own tokens: the shortest row bounds them
    valid = rf"\[-{n}, {n}\)"
    with pytest.raises(ValueError, match=rf"positions must be a non-empty list in {valid}; got \[{n}\]"):
        head_ablation_effects(model, toks, metric, method, attention_mask=mask, positions=[n])
    with pytest.raises(ValueError, match='needs on="logits"'):
        head_ablation_effects(model, toks, metric, method, attention_mask=mask, positions=[-1], on="hidden")


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


def test_exact_sweep_on_final_hidden_equals_naive_loop(backend):
    model, reference = wrap_with_reference("llama", backend)
    toks, mask = model.tokenize(["a short one", "and a longer second prompt"])
    w = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))

    def probe_metric(hidden: torch.Tensor) -> torch.Tensor:  # [batch, pos, d] -> [batch]
        return (hidden[:, -2:] @ w).mean(-1)

    def final_hidden() -> torch.Tensor:  # HF's last hidden_states: after the final norm
        last = [model.n_layers - 1]
        _, cache = model.run_with_cache(toks, ["resid_post"], layers=last, attention_mask=mask)
        return model.final_norm(cache["resid_post"][0])

    fast = head_ablation_effects(model, toks, probe_metric, attention_mask=mask, on="hidden", progress=False)
    with torch.no_grad():
        want_clean = reference(toks, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    clean = probe_metric(final_hidden())
    torch.testing.assert_close(clean, probe_metric(want_clean), atol=1e-5, rtol=1e-5)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            with model.ablate_heads([(layer, head)]):
                want = (probe_metric(final_hidden()) - clean).mean()
            assert float(fast[layer, head]) == pytest.approx(float(want), abs=1e-5)
    attr = head_ablation_effects(model, toks, probe_metric, method="attribution", attention_mask=mask,
                                 on="hidden", progress=False)  # fmt: skip
    assert torch.corrcoef(torch.stack([attr.flatten(), fast.flatten()]))[0, 1] > 0.5
    with pytest.raises(ValueError, match="on must be one of"):
        head_ablation_effects(model, toks, probe_metric, on="resid")


def test_start_at_skips_the_blocks_below_and_stop_after_skips_the_unembedding(backend):
    model, _ = wrap_with_reference("llama", backend)
    toks = torch.randint(5, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(toks)
    last = model.n_layers - 1
    with torch.no_grad():
        full = model.forward(toks, mask, capture={"resid_pre": [2], "resid_post": [last]})
        blocks = get_submodule(model.hf_model, model.arch.layers_path)
        head = get_submodule(model.hf_model, model.arch.head_path)
        calls = []
        hooks = [lambda m, a, i=i: calls.append(i) for i in range(len(blocks))]
        handles = [b.register_forward_pre_hook(hook) for b, hook in zip(blocks, hooks, strict=True)]
        handles.append(head.register_forward_pre_hook(lambda m, a: calls.append("unembed")))
        part = model.forward(toks, mask, start_at=2, resid_in=full.acts["resid_pre"][2])
        assert calls == [2, "unembed"] and len(blocks) == model.n_layers  # block 2 only; restored after
        calls.clear()
        top = model.forward(toks, mask, start_at=2, resid_in=full.acts["resid_pre"][2],
                             capture={"resid_post": [last]}, stop_after=last)  # fmt: skip
        assert calls == [2] and top.logits is None
        calls.clear()
        model.forward(toks, mask, capture={"resid_post": [last]}, stop_after=last)
        assert calls == list(range(model.n_layers))
        for h in handles:
            h.remove()
    torch.testing.assert_close(part.logits, full.logits)
    torch.testing.assert_close(top.acts["resid_post"][last], full.acts["resid_post"][last])


# ---------------------------------------------------------------- direct head scores (Refusal Cliff)
def out_proj(model, reference, layer):
    return getattr(getattr(blocks(model, reference)[layer], model.arch.attn_name), model.arch.out_proj_name)


def left_padded(model):
    toks, mask = model.tokenize(["The cat sat on the mat today", "Hi there", "One two three four"])
    assert (mask[:, 0] == 0).any()  # left padding present
    return toks, mask


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_direct_head_scores_equal_a_loop_over_heads(arch, backend):
    """Plain reference: an o_proj pre-hook keeps the input; each head's slice alone goes through
    the whole o_proj (bias included, as the authors), at each row's own positions."""
    model, reference = wrap_with_reference(arch, backend)
    toks, mask = left_padded(model)
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))
    unit = direction / direction.norm()
    lengths = mask.sum(1)
    for positions in ([-1], [0, -2]):
        want = torch.zeros(model.n_layers, model.n_heads)
        kept: dict[int, torch.Tensor] = {}
        projs = [out_proj(model, reference, l) for l in range(model.n_layers)]
        handles = [
            p.register_forward_pre_hook(lambda mod, args, l=l, kept=kept: kept.__setitem__(l, args[0]))
            for l, p in enumerate(projs)
        ]
        with torch.no_grad():
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # each row's own positions (GPT-2 needs them)
            reference(input_ids=toks, attention_mask=mask, position_ids=position_ids)
            for h in handles:
                h.remove()
            for l, proj in enumerate(projs):
                for h in range(model.n_heads):
                    sl = slice(h * model.d_head, (h + 1) * model.d_head)
                    values = []
                    for b in range(len(toks)):
                        pad = toks.shape[1] - int(lengths[b])
                        for p in positions:
                            col = pad + (p if p >= 0 else int(lengths[b]) + p)
                            only = torch.zeros_like(kept[l][b, col])
                            only[sl] = kept[l][b, col, sl]
                            values.append(float(proj(only[None])[0] @ unit))
                    want[l, h] = sum(values) / len(values)
        got = ml_heads.direct_head_scores(
            model, toks, direction, positions, attention_mask=mask, batch_size=2
        )
        # ascending = most negative write first, as the authors sort
        assert torch.equal(got.flatten().argsort()[:3], want.flatten().argsort()[:3])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_direct_head_scores_errors(llama, tokens):
    model, _ = llama
    with pytest.raises(ValueError, match="positions must be"):
        ml_heads.direct_head_scores(model, tokens, torch.ones(model.d_model), positions=[11])
    with pytest.raises(ValueError, match="direction must"):
        ml_heads.direct_head_scores(model, tokens, torch.ones(3))
    with pytest.raises(ValueError, match="batch_size"):
        ml_heads.direct_head_scores(model, tokens, torch.ones(model.d_model), batch_size=0)


# ---------------------------------------------------------------- norm-preserving ablation
def rescaled_zero_hooks(model, reference, heads, masks):
    """Plain pre-hooks on o_proj: zero the heads, then scale each row's input (its real positions)
    back to its norm before; `masks[0]` is the attention mask of the current forward."""
    handles = []
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    for l, hs in by_layer.items():
        proj = out_proj(model, reference, l)

        def pre(mod, args, hs=hs):
            x = args[0]
            real = masks[0][:, -x.shape[1] :, None].to(x.dtype)  # [batch, q, 1]
            y = x.clone()
            for h in hs:
                y[..., h * model.d_head : (h + 1) * model.d_head] = 0
            before, after = (x * real).flatten(1).norm(dim=1), (y * real).flatten(1).norm(dim=1)
            return (y * (before / after)[:, None, None],)

        handles.append(proj.register_forward_pre_hook(pre))
    return hooks(handles)


def test_norm_rescaled_ablation_equals_plain_hooks(backend):
    model, reference = wrap_with_reference("llama", backend)
    toks, mask = left_padded(model)
    heads = [(0, 1), (1, 0), (1, 3)]
    with model.ablate_heads(heads, rescale="norm"):
        got = model.forward(toks, mask).logits
    with torch.no_grad(), rescaled_zero_hooks(model, reference, heads, [mask]):
        want = reference(input_ids=toks, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    with model.ablate_heads(heads):
        plain = model.forward(toks, mask).logits
    assert (plain[real] - got[real]).abs().max() > 1e-3  # the rescaling changes the result
    # per sequence: a row alone gives what it gives in the padded batch
    with model.ablate_heads(heads, rescale="norm"):
        alone = model.forward(toks[1:2, -int(mask[1].sum()) :]).logits
    torch.testing.assert_close(alone[0], got[1][real[1]], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="rescale must be"):
        model.ablate_heads(heads, rescale="frobenius")


def test_norm_rescaled_ablation_during_generate(backend):
    """Greedy decoding under the rescaled ablation equals a plain loop over the HF model with the
    pre-hooks, one step at a time (the rescaling is per step)."""
    model, reference = wrap_with_reference("llama", backend)
    heads = [(0, 1), (1, 2)]
    prompt = model.to_tokens("The cat sat on")
    with model.ablate_heads(heads, rescale="norm"):
        got = model.generate(prompt, max_new_tokens=6, temperature=0).tokens[0]
    ids, masks, past, out = prompt, [torch.ones_like(prompt)], None, []
    with torch.no_grad(), rescaled_zero_hooks(model, reference, heads, masks):
        step = ids
        for _ in range(6):
            res = reference(input_ids=step, attention_mask=masks[0], past_key_values=past, use_cache=True)
            past = res.past_key_values
            step = res.logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(step))
            masks[0] = torch.cat([masks[0], torch.ones_like(step)], 1)
    assert got.tolist() == out
