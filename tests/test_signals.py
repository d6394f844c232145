"""Token and step signals against plain log-softmax references."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import wrap_with_reference
from lens_reference import jsd_plain

import mechlens as ml
from mechlens.ops import signals
from mechlens.text.thinking import format_prompt

RESPONSE = "First, 2 plus 3 is 5.\n\nThen check: 5 - 3 = 2.\n\nThe answer is 5."


def test_token_signals_match_plain_reference(backend):
    model, reference = wrap_with_reference("qwen2", backend)
    trace = ml.ReasoningTrace.from_text(model, "What is 2+3?", RESPONSE)
    sig = signals.token_signals(model, trace)
    with torch.no_grad():
        logp = torch.log_softmax(reference(trace.tokens).logits[0].double(), -1)  # [pos, vocab]
    start, end = trace.prompt_len, trace.n_tokens
    rows = logp[start - 1 : end - 1]  # predicts tokens start .. end-1
    torch.testing.assert_close(
        sig.logprob.double(), rows.gather(1, trace.tokens[0, start:end, None])[:, 0], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(sig.entropy.double(), -(rows.exp() * rows).sum(-1), atol=1e-4, rtol=0)
    certainty = -math.log(model.d_vocab) - rows.mean(-1)
    torch.testing.assert_close(sig.self_certainty.double(), certainty, atol=1e-4, rtol=0)
    instability = jsd_plain(logp[start - 1 : end - 1], logp[start - 2 : end - 2])
    torch.testing.assert_close(sig.instability.double(), instability, atol=1e-5, rtol=0)
    assert sig.perplexity == pytest.approx(math.exp(-float(sig.logprob.mean())))
    inst = signals.dynamic_instability(sig)
    assert inst.peak == pytest.approx(float((sig.instability * sig.entropy).max()))
    assert 0 <= inst.peak_fraction <= 1
    z = signals.dynamic_instability(sig, combine="zsum")
    assert z.score.shape == sig.entropy.shape
    with pytest.raises(ValueError, match="combine"):
        signals.dynamic_instability(sig, combine="max")


def test_conditional_entropy_per_step_equals_full_forwards(backend):
    model, reference = wrap_with_reference("llama", backend)
    trace = ml.ReasoningTrace.from_text(model, "What is 2+3?", RESPONSE)
    h = signals.conditional_entropy_per_step(model, trace, "5", answer_prefix="\nAnswer: ")
    assert h.shape == (len(trace.sentences) + 1,)
    tok = model.tokenizer
    suffix = tok("\nAnswer: 5", add_special_tokens=False)["input_ids"]
    head = len(tok("\nAnswer: ", add_special_tokens=False)["input_ids"])
    for k, upto in enumerate([trace.prompt_len] + [s.end for s in trace.sentences]):
        ids = torch.cat([trace.tokens[0, :upto], torch.tensor(suffix)])[None]
        with torch.no_grad():
            logp = torch.log_softmax(reference(ids).logits[0, upto + head - 1 : -1].double(), -1)
        want = float((-(logp.exp() * logp).sum(-1)).mean())
        assert float(h[k]) == pytest.approx(want, abs=1e-4)


def test_p_true_matches_manual_softmax(llama):
    model, _ = llama
    got = signals.p_true(model, ["What is 2+3?", "Capital of France?"], ["5", "Rome"], batch_size=1)
    for i, (q, a) in enumerate([("What is 2+3?", "5"), ("Capital of France?", "Rome")]):
        prompt = format_prompt(model.tokenizer, signals.P_TRUE_TEMPLATE.format(question=q, answer=a))
        last = model(prompt)[0, -1]
        t, f = (model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("True", "False"))
        assert float(got[i]) == pytest.approx(float(torch.softmax(last[[t, f]], -1)[0]), abs=1e-5)
    batched = signals.p_true(model, ["What is 2+3?", "Capital of France?"], ["5", "Rome"], batch_size=2)
    torch.testing.assert_close(batched, got, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        signals.p_true(model, ["a", "b"], ["c"])
