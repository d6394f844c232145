"""Every intervention equals an independent reference written with plain torch hooks on the raw
HF model, in both backends, and inside generate."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import ARCHS, wrap_with_reference

from mechlens.models.architecture import get_submodule

ATOL = 1e-5


def blocks(model, reference):
    return get_submodule(reference, model.arch.layers_path)


@contextlib.contextmanager
def hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def zero_head_hooks(model, reference, heads, positions=None, value=None):
    """Zero (or set to `value[l]`) the o_proj input slice of each head: plain pre-hooks."""
    handles = []
    for l, h in heads:
        attn = getattr(blocks(model, reference)[l], model.arch.attn_name)
        proj = getattr(attn, model.arch.out_proj_name)
        sl = slice(h * model.d_head, (h + 1) * model.d_head)

        def pre(mod, args, h=h, sl=sl, l=l):
            x = args[0].clone()
            pos = slice(None) if positions is None else positions
            x[:, pos, sl] = 0 if value is None else value[l][h]
            return (x,)

        handles.append(proj.register_forward_pre_hook(pre))
    return hooks(handles)


def suppression_hooks(model, reference, start, end, layers=None, heads=None):
    """Put the dtype minimum into the additive attention mask handed to each attention module."""
    handles = []
    for l, block in enumerate(blocks(model, reference)):
        if layers is not None and l not in layers:
            continue
        attn = getattr(block, model.arch.attn_name)

        def pre(mod, args, kwargs):
            mask = kwargs["attention_mask"]
            mask = mask.expand(mask.shape[0], model.n_heads, *mask.shape[2:]).clone()
            sel = list(range(model.n_heads)) if heads is None else heads
            for h in sel:
                mask[:, h, :, start:end] = torch.finfo(mask.dtype).min
            kwargs["attention_mask"] = mask
            return args, kwargs

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
    return hooks(handles)


def resid_hooks(model, reference, fn, layers):
    handles = []
    for l in layers:

        def post(mod, args, out):
            if isinstance(out, tuple):
                return (fn(out[0]),) + out[1:]
            return fn(out)

        handles.append(blocks(model, reference)[l].register_forward_hook(post))
    return hooks(handles)


def ref_logits(reference, tokens):
    with torch.no_grad():
        return reference(tokens).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_ablate_heads_zero(arch, backend, tokens):
    model, reference = wrap_with_reference(arch, backend)
    heads = [(0, 1), (2, 3), (2, 0)]
    with model.ablate_heads(heads):
        got = model(tokens)
    with zero_head_hooks(model, reference, heads):
        want = ref_logits(reference, tokens)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - model(tokens)).abs().max() > 1e-3  # it did something


def test_ablate_heads_positions(llama, tokens):
    model, reference = llama
    with model.ablate_heads([(1, 2)], positions=[3, 4, 5]):
        got = model(tokens)
    with zero_head_hooks(model, reference, [(1, 2)], positions=[3, 4, 5]):
        want = ref_logits(reference, tokens)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_ablate_heads_mean_with_reference(llama, tokens):
    model, reference = llama
    ref_tokens = torch.randint(5, 200, (3, 9), generator=torch.Generator().manual_seed(1))
    _, cache = model.run_with_cache(ref_tokens, ["z"])
    means = {1: cache.at("z", 1).flatten(0, 1).mean(0)}  # [heads, d_head]
    with model.ablate_heads([(1, 2)], mode="mean", reference=ref_tokens):
        got = model(tokens)
    with zero_head_hooks(model, reference, [(1, 2)], value=means):
        want = ref_logits(reference, tokens)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_suppress_attention_all(arch, backend, tokens):
    model, reference = wrap_with_reference(arch, backend)
    with model.suppress_attention(keys=(3, 6)):
        got = model(tokens)
        _, cache = model.run_with_cache(tokens, ["pattern"])
    with suppression_hooks(model, reference, 3, 6):
        want = ref_logits(reference, tokens)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert cache["pattern"][..., 3:6].abs().max() < 1e-6  # nobody attends to the span
    assert (got - model(tokens)).abs().max() > 1e-3


def test_suppress_attention_some_layers_heads(llama, tokens):
    model, reference = llama
    with model.suppress_attention(keys=(2, 5), layers=[1, 2], heads=[0, 3]):
        got = model(tokens)
    with suppression_hooks(model, reference, 2, 5, layers=[1, 2], heads=[0, 3]):
        want = ref_logits(reference, tokens)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_suppress_span_at_start_stays_finite_and_causal(llama, tokens):
    model, _ = llama
    with model.suppress_attention(keys=(0, 3)):
        _, cache = model.run_with_cache(tokens, ["pattern"])
    pattern = cache["pattern"]
    assert torch.isfinite(pattern).all()
    assert pattern.triu(1).abs().max() == 0  # never attends to the future
    assert pattern[..., 3:, :3].abs().max() < 1e-6  # later queries ignore the span


def test_add_direction_and_project_out(llama, tokens):
    model, reference = llama
    d = torch.randn(model.d_model, generator=torch.Generator().manual_seed(2))
    with model.add_direction(1, d, scale=2.0):
        got = model(tokens)
    with resid_hooks(model, reference, lambda x: x + 2.0 * d, [1]):
        want = ref_logits(reference, tokens)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    u = d / d.norm()
    with model.project_out(d, layers=[0, 2]):
        got = model(tokens)
        _, cache = model.run_with_cache(tokens, ["resid_post"])
    with resid_hooks(model, reference, lambda x: x - (x @ u)[..., None] * u, [0, 2]):
        want = ref_logits(reference, tokens)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (cache.at("resid_post", 2) @ u).abs().max() < 1e-4


def test_add_direction_positions(llama, tokens):
    model, reference = llama
    d = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))

    def add_at(x):
        x = x.clone()
        x[:, [2, 7]] += d
        return x

    with model.add_direction(0, d, positions=[2, 7]):
        got = model(tokens)
    with resid_hooks(model, reference, add_at, [0]):
        want = ref_logits(reference, tokens)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def greedy_reference(reference, prompt_ids, steps):
    """Greedy decoding with a full forward per step (no KV cache)."""
    ids = prompt_ids
    for _ in range(steps):
        nxt = ref_logits(reference, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids[0, prompt_ids.shape[1] :].tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_respects_contexts(arch, backend):
    model, reference = wrap_with_reference(arch, backend)
    prompt = "Hello, this is a test"
    ids = model.to_tokens(prompt)
    kw = dict(max_new_tokens=6, temperature=0, stop_at_eos=False)
    plain = model.generate(prompt, **kw).tokens[0].tolist()
    assert plain == greedy_reference(reference, ids, 6)
    with model.ablate_heads([(1, 0), (2, 2)]), model.suppress_attention(keys=(2, 6)):
        edited = model.generate(prompt, **kw).tokens[0].tolist()
    with zero_head_hooks(model, reference, [(1, 0), (2, 2)]), suppression_hooks(model, reference, 2, 6):
        assert edited == greedy_reference(reference, ids, 6)
    if arch == "llama":  # the random tiny GPT-2 repeats one token whatever we do
        assert edited != plain


def test_generate_batched_padded_equals_single(llama):
    model, _ = llama
    prompts = ["Hi", "A longer prompt to pad against"]
    kw = dict(max_new_tokens=5, temperature=0, stop_at_eos=False)
    batched = model.generate(prompts, **kw).tokens
    for i, p in enumerate(prompts):
        assert batched[i].tolist() == model.generate(p, **kw).tokens[0].tolist()


def test_generate_seeded_and_batch_independent(llama):
    model, _ = llama
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, n=3, seed=7, stop_at_eos=False)
    a = model.generate(["one", "two words"], batch_size=6, **kw).texts
    b = model.generate(["one", "two words"], batch_size=3, **kw).texts
    c = model.generate(["one", "two words"], **{**kw, "seed": 8}).texts
    assert a == b and len(a) == 6
    assert a != c
    assert len(set(a[:3])) > 1  # the n samples of a prompt differ


def test_generate_rows_leave_the_batch_at_eos(llama):
    """Rows that sample end-of-sequence drop out of the batch; the others continue unchanged."""
    model, _ = llama
    kw = dict(max_new_tokens=12, temperature=1.0, n=6, seed=3)
    full = model.generate(["one", "two words"], stop_at_eos=False, **kw).tokens
    counts = torch.bincount(torch.cat(full))
    model.tokenizer.eos_token_id = int(counts.argmax())  # a token most rows will sample
    stopped = model.generate(["one", "two words"], **kw).tokens
    lengths = set()
    for f, s in zip(full, stopped, strict=True):
        hits = (f == model.tokenizer.eos_token_id).nonzero()
        end = int(hits[0]) if len(hits) else len(f)
        assert s.tolist() == f[:end].tolist()
        lengths.add(end)
    assert len(lengths) > 2  # rows really finished at different steps


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_continue_prefix_equals_full_forward(arch, backend):
    model, _ = wrap_with_reference(arch, backend)
    toks = torch.randint(5, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    suffix = torch.randint(5, 200, (3, 4), generator=torch.Generator().manual_seed(2))
    prefix = model.cache_prefix(toks)
    torch.testing.assert_close(prefix.logits, model(toks), atol=1e-5, rtol=0)
    for upto in (12, 7, 1):
        got = model.continue_prefix(prefix, suffix, upto=upto)
        full = model(torch.cat([toks[:, :upto].expand(3, -1), suffix], 1))[:, upto:]
        torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
    with model.suppress_attention(keys=(8, 10)):  # contexts apply to the suffix
        got = model.continue_prefix(prefix, suffix[:1], upto=10)
        full = model(torch.cat([toks[:, :10], suffix[:1]], 1))[:, 10:]
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
    got_again = model.continue_prefix(prefix, suffix[:1], upto=12)  # the stored prefix is unchanged
    torch.testing.assert_close(got_again, model(torch.cat([toks, suffix[:1]], 1))[:, 12:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="upto must lie in 1..12"):
        model.continue_prefix(prefix, suffix, upto=13)
