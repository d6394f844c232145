"""Both backends agree with raw transformers on logits, residuals, attention patterns and z."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, wrap_with_reference

from mechlens.models.architecture import get_submodule

ATOL = 1e-5


def reference_run(model, reference, tokens):
    """Raw HF outputs plus z captured with a plain pre-hook on each attention output projection."""
    zs = {}
    handles = []
    layers = get_submodule(reference, model.arch.layers_path)
    for l, block in enumerate(layers):
        proj = getattr(getattr(block, model.arch.attn_name), model.arch.out_proj_name)
        handles.append(proj.register_forward_pre_hook(lambda m, args, l=l: zs.__setitem__(l, args[0])))
    with torch.no_grad():
        out = reference(tokens, output_hidden_states=True, output_attentions=True)
    for h in handles:
        h.remove()
    return out, zs


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_matches_hf(arch, backend, tokens):
    model, reference = wrap_with_reference(arch, backend)
    out, zs = reference_run(model, reference, tokens)
    logits, cache = model.run_with_cache(tokens, names=["resid_pre", "resid_post", "pattern", "z"])
    torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=0)
    n = model.n_layers
    assert cache["resid_post"].shape == (n, 2, 11, model.d_model)
    assert cache["pattern"].shape == (n, 2, model.n_heads, 11, 11)
    assert cache["z"].shape == (n, 2, 11, model.n_heads, model.d_head)
    for l in range(n):
        torch.testing.assert_close(cache["resid_pre"][l], out.hidden_states[l], atol=ATOL, rtol=0)
        torch.testing.assert_close(cache["pattern"][l], out.attentions[l], atol=ATOL, rtol=0)
        z_ref = zs[l].reshape(2, 11, model.n_heads, model.d_head)
        torch.testing.assert_close(cache["z"][l], z_ref, atol=ATOL, rtol=0)
    for l in range(n - 1):
        torch.testing.assert_close(cache["resid_post"][l], out.hidden_states[l + 1], atol=ATOL, rtol=0)
    # HF's last hidden state is after the final norm
    torch.testing.assert_close(
        model.final_norm(cache["resid_post"][-1]), out.hidden_states[-1], atol=ATOL, rtol=0
    )
    torch.testing.assert_close(model.unembed(cache["resid_post"][-1]), out.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3", "mistral", "gemma"])
def test_more_families_logits(arch, backend, tokens):
    model, reference = wrap_with_reference(arch, backend)
    out, _ = reference_run(model, reference, tokens)
    logits, cache = model.run_with_cache(tokens, names=["resid_post", "pattern"])
    torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["pattern"][1], out.attentions[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(model.unembed(cache["resid_post"][-1]), out.logits, atol=ATOL, rtol=0)


def test_layer_subset_and_early_stop(llama, tokens):
    model, reference = llama
    out, _ = reference_run(model, reference, tokens)
    logits, cache = model.run_with_cache(tokens, names="resid_post", layers=[1], return_logits=False)
    assert logits is None
    assert cache["resid_post"].shape[0] == 1 and cache.layers["resid_post"] == [1]
    torch.testing.assert_close(cache.at("resid_post", 1), out.hidden_states[2], atol=ATOL, rtol=0)


def test_padded_batch_matches_single(llama):
    model, _ = llama
    texts = ["a short one", "a much longer prompt here"]
    toks, mask = model.tokenize(texts)
    assert (mask[0] == 0).any() and mask[:, -1].all()  # left padding
    batched = model(toks, attention_mask=mask)
    for i, text in enumerate(texts):
        single = model(model.to_tokens(text))
        torch.testing.assert_close(batched[i, -single.shape[1] :], single[0], atol=1e-4, rtol=0)


def test_to_tokens_matches_tokenizer(llama):
    model, _ = llama
    assert model.to_tokens("Hi there.")[0].tolist() == model.tokenizer("Hi there.")["input_ids"]


def test_backends_agree_with_each_other(tokens):
    tl, _ = wrap_with_reference("llama", "transformer_lens")
    nn, _ = wrap_with_reference("llama", "nnsight")
    for name in ("resid_post", "pattern", "z"):
        a = tl.run_with_cache(tokens, [name])[1][name]
        b = nn.run_with_cache(tokens, [name])[1][name]
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
