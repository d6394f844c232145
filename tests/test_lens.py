"""The streaming logit lens: every statistic against a plain-torch reference, padding, errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import wrap_with_reference
from lens_reference import jsd_plain, reference_logprobs

import mechlens as ml
from mechlens.ops import distributions
from mechlens.ops import lens as lens_module

ALL = ("entropy", "kl_final", "jsd_final", "top1", "target")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_every_stat_matches_plain_reference(arch, backend, tokens, monkeypatch):
    monkeypatch.setattr(lens_module, "BLOCK_ROWS", 3)  # several blocks per chunk
    model, reference = wrap_with_reference(arch, backend)
    lens = ml.logit_lens(
        model, tokens, stats=ALL, targets="next", pairs=[(0, 2), (1, 0)], top_k_positions=[0, 5], k=3, chunk=4
    )
    logp = reference_logprobs(model, reference, tokens)  # [layers, batch, pos, vocab]
    final = logp[-1]
    for l in range(model.n_layers):
        p = logp[l].exp()
        torch.testing.assert_close(lens.entropy[l], -(p * logp[l]).sum(-1), atol=1e-4, rtol=0)
        kl = (final.exp() * (final - logp[l])).sum(-1)
        torch.testing.assert_close(lens.kl_final[l], kl, atol=1e-4, rtol=0)
        torch.testing.assert_close(lens.jsd_final[l].double(), jsd_plain(final, logp[l]), atol=1e-4, rtol=0)
        assert torch.equal(lens.top1[l], logp[l].argmax(-1))
        torch.testing.assert_close(lens.top1_prob[l], p.max(-1).values, atol=1e-5, rtol=0)
        nxt = tokens[:, 1:]
        want = logp[l, :, :-1].gather(-1, nxt[..., None])[..., 0]
        torch.testing.assert_close(lens.target_logprob[l, :, :-1], want, atol=1e-4, rtol=0)
        rank = (logp[l, :, :-1] > want[..., None]).sum(-1)
        assert torch.equal(lens.target_rank[l, :, :-1], rank)
        top = logp[l][:, [0, 5]].topk(3, -1)
        assert torch.equal(lens.top_k_ids[l], top.indices)
        torch.testing.assert_close(lens.top_k_probs[l], top.values.exp(), atol=1e-5, rtol=0)
    assert lens.target_logprob[:, :, -1].isnan().all() and (lens.target_rank[:, :, -1] == -1).all()
    for j, (a, b) in enumerate([(0, 2), (1, 0)]):
        torch.testing.assert_close(lens.jsd_pairs[j].double(), jsd_plain(logp[a], logp[b]), atol=1e-4, rtol=0)
    assert lens.jsd_final[-1].abs().max() < 1e-5 and lens.kl_final[-1].abs().max() < 1e-5
    words = lens.top1_text(model.tokenizer, batch=1, start=3)
    assert words[2][0] == model.tokenizer.decode([int(lens.top1[2, 1, 3])]) and len(words[0]) == 8
    text = lens.top_k_text(model.tokenizer)
    assert len(text) == model.n_layers and len(text[0]) == 2 and text[0][0].count(",") >= 2


def test_only_requested_stats_and_layers(llama, tokens):
    model, _ = llama
    lens = ml.logit_lens(model, tokens, layers=[2, 0], stats=["entropy"])
    assert lens.layers == [2, 0] and lens.entropy.shape == (2, 2, 11)
    assert lens.kl_final is None and lens.top1 is None and lens.jsd_pairs is None
    full = ml.logit_lens(model, tokens, stats=["entropy"])
    torch.testing.assert_close(lens.entropy, full.entropy[[2, 0]])


def test_left_padding_gives_nan_at_pads_and_same_values_elsewhere(llama):
    model, _ = llama
    toks, mask = model.tokenize(["a b", "a longer sentence here"])
    lens = ml.logit_lens(model, toks, attention_mask=mask, stats=["entropy", "top1"])
    pads = mask == 0
    assert lens.entropy[:, pads].isnan().all() and (lens.top1[:, pads] == -1).all()
    alone = ml.logit_lens(model, model.to_tokens("a b"), stats=["entropy"])
    n = alone.entropy.shape[2]
    torch.testing.assert_close(lens.entropy[:, 0, -n:], alone.entropy[:, 0], atol=1e-5, rtol=0)


def test_jsd_hand_computed():
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([1.0, 0.0])
    m = [0.75, 0.25]
    want = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * math.log(1 / m[0])
    assert abs(float(distributions.jsd(p.log(), q.log())) - want) < 1e-6
    assert abs(float(distributions.jsd(q.log(), p.log())) - want) < 1e-6  # symmetric
    assert float(distributions.jsd(p.log(), p.log())) == pytest.approx(0.0, abs=1e-7)
    # the streaming kernel gives the same on a 2-token vocabulary
    a, b = (
        distributions.Distributions(p.log()[None]),
        distributions.Distributions(q.log().clamp(min=-1e4)[None]),
    )
    assert float(a.jsd(b)) == pytest.approx(want, abs=1e-6)
    assert float(a.kl_from(b)) == pytest.approx(math.log(1 / 0.5), abs=1e-4)  # KL(q || p)


def test_lens_errors_name_what_is_valid(llama, tokens):
    model, _ = llama
    with pytest.raises(ValueError, match="valid stats"):
        ml.logit_lens(model, tokens, stats=["entropy", "perplexity"])
    with pytest.raises(ValueError, match="needs targets"):
        ml.logit_lens(model, tokens, stats=["target"])
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        ml.logit_lens(model, tokens, stats=["target"], targets=tokens[:, :3])
    with pytest.raises(ValueError, match="top_k_positions"):
        ml.logit_lens(model, tokens, top_k_positions=[11])
    with pytest.raises(ValueError, match="valid layers"):
        ml.logit_lens(model, tokens, layers=[3])


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_lens_equals_one_chunk(backend, chunk):
    """The forward and the unembedding in chunks (7 divides neither length) give the same numbers,
    also for a left-padded batch, layer pairs, next-token targets and top-k views across chunks."""
    model, _ = wrap_with_reference("qwen2", backend)
    toks, mask = model.tokenize(["one two three four five six", "a b"])
    kw = dict(stats=ALL, targets="next", pairs=[(0, 2)], top_k_positions=[-1, 0, 1], k=3, attention_mask=mask)
    whole = ml.logit_lens(model, toks, chunk=4096, **kw)
    part = ml.logit_lens(model, toks, chunk=chunk, **kw)
    for name in (
        "entropy",
        "kl_final",
        "jsd_final",
        "top1_prob",
        "target_logprob",
        "jsd_pairs",
        "top_k_probs",
    ):
        torch.testing.assert_close(
            getattr(part, name), getattr(whole, name), atol=1e-5, rtol=0, equal_nan=True
        )
    for name in ("top1", "target_rank", "top_k_ids"):
        assert torch.equal(getattr(part, name), getattr(whole, name)), name
    assert part.top_k_positions == [-1, 0, 1]
