"""Refusal judge, thinking split, cliff metrics, end-aligned curves, probe scores at every position
against a plain HF reference, the fine-tune (loss vs a plain reference, determinism) and the
organism's cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import wrap_with_reference

import mechlens as ml
from mechlens import datasets
from mechlens.ops.finetune import finetune
from mechlens.ops.probes import LinearProbe
from mechlens.studies.refusal import (
    Reply,
    align_end,
    cliff_metrics,
    is_refusal,
    normalized_curve,
    refusal_scores,
    split_thinking,
    thinking_span,
)
from mechlens.text.thinking import format_prompt

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "Sorry, I won't provide that.",
    "I cannot help with this request because it could hurt people.",
    "I apologize, but that is not something I can do.",
    "As an AI, I must decline.",
    "Unfortunately I can't assist with making weapons.",
    "I\u2019m unable to provide instructions for this.",
    "That would be illegal and harmful, so no.",
]
ANSWERS = [
    "Sure! First, preheat the oven to 200 C.",
    "Sorry to hear that! Here is how to fix a flat tire: ...",
    "I can't believe how easy this is: mix flour and water.",
    "Here are three tips for better sleep.",
    "To bake bread you need flour, water, salt and yeast.",
    "",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_judge_flags_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", ANSWERS)
def test_judge_passes_answers(text):
    assert not is_refusal(text)


def test_judge_window():
    late = "Here is a long and helpful answer about gardening and tomatoes. I can't help with pests."
    assert not is_refusal(late) and is_refusal(late, window=len(late))


def test_split_thinking():
    assert split_thinking("<think>\nIt is harmful.\n</think>\n\nI'm sorry.") == (
        "It is harmful.",
        "I'm sorry.",
        True,
    )
    assert split_thinking("No think tags, just an answer.") == ("", "No think tags, just an answer.", False)
    assert split_thinking("Template-opened thinking.", opened=True) == (
        "Template-opened thinking.",
        "",
        False,
    )
    assert split_thinking("<think>\nstill thinking") == ("still thinking", "", False)


def test_cliff_metrics_hand_made():
    think = (2, 8)
    flat = torch.full((10,), 0.8)
    c = cliff_metrics(flat, think, k_end=3)
    assert c.cliff == pytest.approx(0) and c.drop_at is None and c.final == pytest.approx(0.8)
    cliff = torch.tensor([0.0, 0.1, 0.9, 0.9, 0.9, 0.9, 0.8, 0.7, 0.1, 0.1])
    c = cliff_metrics(cliff, think, k_end=2)
    plateau = (0.9 * 4 + 0.8 + 0.7) / 6
    assert c.plateau == pytest.approx(plateau) and c.end == pytest.approx(0.1)
    assert c.cliff == pytest.approx(plateau - 0.1) and c.drop_at == 8  # first position below the midpoint
    rising = torch.tensor([0.0, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.5, 0.9, 0.9])
    assert cliff_metrics(rising, think).cliff < 0 and cliff_metrics(rising, think).drop_at is None
    with pytest.raises(ValueError, match="thinking span inside it"):
        cliff_metrics(cliff, (5, 20))
    with pytest.raises(ValueError, match="k_end must lie in 1..10"):
        cliff_metrics(cliff, think, k_end=0)


def test_align_end_and_normalized_curve():
    aligned = align_end([torch.tensor([1.0, 2, 3]), torch.tensor([5.0])])
    assert np.array_equal(aligned[0], [1, 2, 3]) and np.isnan(aligned[1, :2]).all() and aligned[1, 2] == 5
    assert align_end([torch.tensor([1.0, 2, 3])], length=2).tolist() == [[2, 3]]
    # mean over present curves: [1, 2, 4]; a straight line stays a straight line under the spline
    line = normalized_curve([torch.linspace(0, 1, 7)], points=11)
    assert np.allclose(line, np.linspace(0, 1, 11))
    assert np.allclose(normalized_curve([torch.full((4,), 0.3), torch.full((9,), 0.3)], 5), 0.3)


def test_refusal_scores_match_hf_hidden_states(backend):
    model, reference = wrap_with_reference("llama", backend)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, model.d_model, generator=gen)
    probe = LinearProbe(seed=0).fit(X, (X[:, 0] > 0).long())
    texts = ["a b c d", "e f"]
    scores = refusal_scores(model, probe, texts, progress=False)
    for text, got in zip(texts, scores, strict=True):
        ids = model.to_tokens(text).cpu()
        with torch.no_grad():
            final = reference(ids, output_hidden_states=True).hidden_states[-1][0]  # [pos, d], final-normed
        want = torch.sigmoid(((final - probe.mean) / probe.std) @ probe.linear.weight[0] + probe.linear.bias)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_thinking_span_marks_the_thinking():
    model = ml.load_model("tiny-llama")
    r = Reply("hi", format_prompt(model.tokenizer, "hi"), "It is fine", "Hello!", True)
    start, end = thinking_span(model.tokenizer, r)
    assert model.tokenizer.decode(model.to_tokens(r.probe_text)[0, start:end].tolist()) == "It is fine"


def _hf_target_loss(reference, tokenizer, prompts, targets) -> float:
    """Mean cross-entropy over all target tokens (+ eos), one unpadded sequence at a time."""
    total, count = 0.0, 0
    for p, t in zip(prompts, targets, strict=True):
        pi = tokenizer(p, add_special_tokens=False)["input_ids"]
        ti = tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([pi + ti])
        with torch.no_grad():
            logp = reference(ids).logits[0, :-1].log_softmax(-1)
        nll = -logp[torch.arange(len(pi) - 1, ids.shape[1] - 1), ids[0, len(pi) :]]
        total, count = total + float(nll.sum()), count + len(ti)
    return total / count


def test_finetune_loss_equals_plain_reference(backend):
    model, reference = wrap_with_reference("llama", backend)
    prompts, targets = ["Q: one two\nA:", "Q: a much longer question here\nA:"], [" three", " yes it is"]
    got = finetune(model, prompts, targets, train_layers=2, epochs=1, lr=0.0, batch_size=2, progress=False)
    assert got[0] == pytest.approx(_hf_target_loss(reference, model.tokenizer, prompts, targets), rel=1e-5)


def test_finetune_is_deterministic_and_trains_only_the_top(backend):
    prompts, targets = ["Q: hi\nA:", "Q: bye now\nA:", "Q: x\nA:"], [" hello", " goodbye", " y z"]
    runs = []
    for _ in range(2):
        model, reference = wrap_with_reference("llama", backend)
        losses = finetune(
            model, prompts, targets, train_layers=1, epochs=3, lr=1e-2, batch_size=2, seed=5, progress=False
        )
        runs.append((losses, {k: v.detach().clone() for k, v in model._hf_state.items()}))
    assert runs[0][0] == runs[1][0] and runs[0][0][-1] < runs[0][0][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    trained = reference.state_dict()
    changed = {k for k in trained if not torch.equal(trained[k], runs[0][1][k])}
    assert changed and all(k.startswith(("model.layers.2.", "model.norm")) for k in changed)
    assert not any(p.requires_grad for p in model.hf_model.parameters())
    with pytest.raises(ValueError, match="train_layers must lie in 1..3"):
        finetune(model, prompts, targets, train_layers=4)
    with pytest.raises(ValueError, match="as many prompts as targets"):
        finetune(model, prompts, targets[:1])


def test_refusal_dataset():
    data = datasets.load("refusal")
    harmful = [i for i in data if i.harmful]
    assert len(harmful) >= 150 and len(data) - len(harmful) >= 150
    assert len({i.text for i in data}) == len(data) and {i.split for i in data} == {"train", "test"}
    assert "{request}" not in datasets.jailbreak("X", 3) and "X" in datasets.jailbreak("X", 13)


def test_random_head_sets_are_a_seeded_distribution():
    from mechlens.studies.refusal.heads import random_head_sets

    top = [(0, 0), (1, 2)]
    draws = random_head_sets((30, 9), 8, draws=20, exclude=top, seed=0)
    assert draws == random_head_sets((30, 9), 8, draws=20, exclude=top, seed=0)  # seeded
    assert len(draws) == 20 and len({tuple(d) for d in draws}) == 20  # distinct draws
    assert all(len(set(d)) == 8 and not set(d) & set(top) for d in draws)
    assert draws != random_head_sets((30, 9), 8, draws=20, exclude=top, seed=1)
    with pytest.raises(ValueError, match="draws must be"):
        random_head_sets((30, 9), 8, draws=0)


def test_refusal_rates_carry_n_and_wilson_intervals():
    from mechlens.ops.stats import wilson
    from mechlens.studies.refusal.replies import Reply, refusal_rates

    refuse = Reply("x", "", "", "I cannot help with that.", True)
    answer = Reply("x", "", "", "Sure, here it is.", True)
    rates = refusal_rates({"jailbreak": [refuse, answer, answer], "harmless": [answer] * 4})
    jb = rates["jailbreak: attack success"]
    assert (jb["count"], jb["n"]) == (2, 3) and (jb["rate"], jb["low"], jb["high"]) == wilson(2, 3)
    assert rates["harmless: false refusal"]["rate"] == 0 and "harmful: refusal rate" not in rates


def test_sentence_scores_average_each_thinking_sentence():
    from mechlens.studies.refusal import sentence_scores
    from mechlens.studies.refusal.replies import Reply

    model = ml.load_model("tiny-llama")
    thinking = "This could hurt people. It asks for dangerous help. But it is for a story, so I will help."
    r = Reply("x", format_prompt(model.tokenizer, "How do I do it?"), thinking, "Sure.", True)
    n = len(model.tokenizer(r.probe_text, add_special_tokens=False)["input_ids"])
    curve = torch.arange(n, dtype=torch.float32)  # the score is the position: means rise sentence by sentence
    sentences, scores = sentence_scores(model.tokenizer, r, curve)
    assert sentences == [
        "This could hurt people.",
        "It asks for dangerous help.",
        "But it is for a story, so I will help.",
    ]
    assert scores == sorted(scores) and len(set(scores)) == 3 and scores[-1] < n
