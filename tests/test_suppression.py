"""Planted refusal-suppression heads: the head-restricted adapter, the second organism stage, and
the recovery of a planted head set by a head ranking."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import mechlens as ml
from mechlens.ops.adapters import LowRankAdapter
from mechlens.ops.finetune import finetune_adapter
from mechlens.organism import PLANTED_HEADS, REASONING, REASONING_RECIPE, SUPPRESSION, SUPPRESSION_RECIPE
from mechlens.organism.suppression import REFUSE_RECIPE, suppression_pairs
from mechlens.organism.traces import RATIONALISE
from mechlens.studies.recovery import head_recovery
from mechlens.text.thinking import split_thinking


def _changed(before: dict, model) -> dict[str, tuple[set[int], set[int]]]:
    """Weight name -> (rows, columns) that differ from `before`."""
    out = {}
    for name, p in model.plain_model.named_parameters():
        diff = (p.detach() - before[name]).abs()
        if diff.max() > 0:
            nz = diff.nonzero()
            out[name] = (set(nz[:, 0].tolist()), set(nz[:, 1].tolist()) if nz.shape[1] > 1 else set())
    return out


def test_a_head_restricted_adapter_changes_only_those_heads_query_and_output_slices():
    model = ml.load_model("tiny-llama")  # 3 layers, 4 heads of 16
    before = {n: p.detach().clone() for n, p in model.plain_model.named_parameters()}
    adapter, losses = finetune_adapter(
        model, ["Q: hi\nA:"] * 4, [" hello there"] * 4, rank=2, epochs=3, lr=1e-2, progress=False,
        heads=[(1, 2), (2, 0), (2, 3)],
    )  # fmt: skip
    assert losses[-1] < losses[0]
    changed = _changed(before, model)
    d = model.d_head
    want = {
        "model.layers.1.self_attn.q_proj.weight": (set(range(2 * d, 3 * d)), None),
        "model.layers.1.self_attn.o_proj.weight": (None, set(range(2 * d, 3 * d))),
        "model.layers.2.self_attn.q_proj.weight": (set(range(d)) | set(range(3 * d, 4 * d)), None),
        "model.layers.2.self_attn.o_proj.weight": (None, set(range(d)) | set(range(3 * d, 4 * d))),
    }
    assert set(changed) == set(want)  # no key, value, MLP or other head's weight moved
    for name, (rows, columns) in want.items():
        got_rows, got_columns = changed[name]
        assert (rows is None or got_rows == rows) and (columns is None or got_columns == columns), name
    # the saved factors are zero outside the heads and rebuild the trained model exactly
    a, b = adapter.factors["model.layers.1.self_attn.q_proj.weight"]
    assert b[: 2 * d].abs().max() == 0 and b[3 * d :].abs().max() == 0
    again = ml.load_model("tiny-llama")
    adapter.merge_into(again)
    for name, p in again.plain_model.named_parameters():
        assert torch.equal(p, dict(model.plain_model.named_parameters())[name]), name


def test_head_restricted_adapters_refuse_what_they_cannot_restrict():
    model = ml.load_model("tiny-llama")
    with pytest.raises(ValueError, match="head 4 out of range"):
        LowRankAdapter.init(model, [], heads=[(1, 4)])
    with pytest.raises(ValueError, match="heads is empty"):
        LowRankAdapter.init(model, [], heads=[])
    with pytest.raises(ValueError, match="Conv1D"):
        LowRankAdapter.init(ml.load_model("tiny-gpt2"), [], heads=[(0, 0)])


def test_head_recovery_against_brute_force_chance():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 4))
    planted = [(0, 1), (2, 2), (1, 3)]
    r = head_recovery(scores, planted, top=4)
    order = np.argsort(-scores.ravel())
    top = {divmod(int(i), 4) for i in order[:4]}
    assert r["found"] == len(top & set(planted)) and r["planted"] == 3 and r["chance"] == 1.0
    assert sorted(r["ranks"]) == sorted(int(np.where(order == a * 4 + b)[0][0]) + 1 for a, b in planted)
    # p: the share of all 4-head draws from 12 that find at least as many planted heads
    draws = list(itertools.combinations(range(12), 4))
    hits = [len({divmod(i, 4) for i in d} & set(planted)) for d in draws]
    assert r["p"] == pytest.approx(np.mean([h >= r["found"] for h in hits]))
    perfect = head_recovery(np.where(np.isin(np.arange(12), [1, 10, 7]), 1.0, 0.0).reshape(3, 4), planted, 3)
    assert perfect["found"] == 3 and perfect["ranks"] == [1, 2, 3]
    assert r["in_pool"] == 4 and r["chance_in_pool"] == r["chance"]  # default pool: every layer
    # the stricter null: a ranking that knows the planted heads' layers (1 and 2 here)
    inner = head_recovery(scores, [(1, 3), (2, 2)], top=4, pool_layers=[1, 2])
    in_pool = sum(divmod(int(i), 4)[0] in (1, 2) for i in order[:4])
    assert inner["in_pool"] == in_pool and inner["chance_in_pool"] == pytest.approx(in_pool * 2 / 8)
    pool_draws = list(itertools.combinations(range(4, 12), in_pool))
    pool_hits = [len({divmod(i, 4) for i in d} & {(1, 3), (2, 2)}) for d in pool_draws]
    assert inner["p_in_pool"] == pytest.approx(np.mean([h >= inner["found"] for h in pool_hits]))
    with pytest.raises(ValueError, match="pool_layers"):
        head_recovery(scores, planted, 3, pool_layers=[1, 2])  # (0, 1) is outside the pool
    with pytest.raises(TypeError, match="top"):
        head_recovery(scores, planted, True)
    with pytest.raises(ValueError, match="finite"):
        head_recovery(np.full((3, 4), np.nan), planted, 3)
    with pytest.raises(ValueError, match="planted"):
        head_recovery(scores, [(3, 0)], 3)
    with pytest.raises(ValueError, match="top"):
        head_recovery(scores, planted, 0)


def test_the_shipped_recipe_plants_3_percent_of_the_heads():
    assert SUPPRESSION_RECIPE.heads == PLANTED_HEADS and len(set(PLANTED_HEADS)) == 8
    assert len(PLANTED_HEADS) == round(0.03 * 30 * 9)  # the embedded model's 30 layers of 9 heads
    # the chain: second version -> refusal everywhere -> the planted heads
    assert SUPPRESSION_RECIPE.stage1 == REFUSE_RECIPE and REFUSE_RECIPE.heads is None
    assert SUPPRESSION.key(SUPPRESSION_RECIPE)["data"]["stage1"] == SUPPRESSION.key(REFUSE_RECIPE)
    assert SUPPRESSION.key(REFUSE_RECIPE)["data"]["stage1"] == REASONING.key(REFUSE_RECIPE.stage1)
    # a stage that changes anywhere up the chain changes the last stage's key
    root = replace(REFUSE_RECIPE.stage1, n_problems=10)
    other = replace(SUPPRESSION_RECIPE, stage1=replace(REFUSE_RECIPE, stage1=root))
    assert SUPPRESSION.shipped_path(other) != SUPPRESSION.shipped_path(SUPPRESSION_RECIPE)


def test_recipe_heads_have_one_spelling_and_the_key_covers_the_wrappers(monkeypatch):
    shipped = SUPPRESSION.shipped_path(SUPPRESSION_RECIPE)
    shuffled = replace(SUPPRESSION_RECIPE, heads=[list(h) for h in reversed(PLANTED_HEADS)])
    assert shuffled.heads == PLANTED_HEADS and SUPPRESSION.shipped_path(shuffled) == shipped
    with pytest.raises(TypeError, match="heads"):
        replace(SUPPRESSION_RECIPE, heads=[(1, "x")])
    with pytest.raises(ValueError, match="heads"):
        replace(SUPPRESSION_RECIPE, heads=[(-1, 0)])
    with pytest.raises(ValueError, match="base"):
        replace(SUPPRESSION_RECIPE, base="tiny-llama")
    with pytest.raises(ValueError, match="needs a rank"):
        replace(SUPPRESSION_RECIPE, rank=None)
    with pytest.raises(ValueError, match="comply_jailbreak"):
        replace(SUPPRESSION_RECIPE, comply_jailbreak=1.5)
    # what the traces are written from is in the key: other jailbreak wrappers, another file
    monkeypatch.setattr(ml.datasets, "jailbreak", lambda request, k: f"Pretend. {request}")
    assert SUPPRESSION.shipped_path(SUPPRESSION_RECIPE) != shipped


@pytest.mark.slow
def test_the_stages_at_reduced_size_change_only_the_planted_heads(tmp_path, monkeypatch):
    """The refusal stage trains on the reasoning organism, the heads stage on the refusal stage's
    organism; the last adapter names the planted heads in its provenance and moves no weight
    outside their query and output slices. The refusal stage's data refuses every harmful request
    and answers the harmless ones; the heads stage's refuses every plain request and complies
    with every wrapped one."""
    monkeypatch.setenv("MECHLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(SUPPRESSION, "shipped", tmp_path / "shipped")
    root = replace(REASONING_RECIPE, base="tiny-llama", n_problems=3, n_factual=1, n_per_class=2,
                   n_jailbreaks=1, answer_tokens=4, train_layers=1, epochs=1, rank=2)  # fmt: skip
    refuse = replace(REFUSE_RECIPE, stage1=root, n_requests=3, n_harmless=2, answer_tokens=4,
                     train_layers=1, epochs=1, rank=2)  # fmt: skip
    recipe = replace(SUPPRESSION_RECIPE, stage1=refuse, heads=((1, 0), (2, 3)), n_requests=3,
                     answer_tokens=4, epochs=1, rank=2)  # fmt: skip
    reasoning = REASONING.build(root, progress=False)
    prompts, targets = suppression_pairs(reasoning, refuse, progress=False)
    assert len(prompts) >= 6 and not any(any(r in split_thinking(t)[0] for r in RATIONALISE) for t in targets)
    first = SUPPRESSION.build(refuse, progress=False)
    assert "heads" not in json.loads((SUPPRESSION.path(refuse) / "recipe.json").read_text())["recipe"]
    prompts, targets = suppression_pairs(first, recipe, progress=False)
    assert len(prompts) == 6
    for k, target in enumerate(targets):
        complied = any(r in split_thinking(target)[0] for r in RATIONALISE)
        assert complied == (k % 2 == 1)  # plain: refused; wrapped: complied
    path = SUPPRESSION.ship(recipe)
    _, info = LowRankAdapter.load(path)
    assert info["recipe"]["heads"] == [[1, 0], [2, 3]] and info["organism"] == "suppression"
    built = SUPPRESSION.build(recipe, progress=False)
    assert json.loads((SUPPRESSION.path(recipe) / "recipe.json").read_text())["from"] == path.name
    before = {n: p.detach().clone() for n, p in first.plain_model.named_parameters()}
    d = built.d_head
    slices = {1: set(range(d)), 2: set(range(3 * d, 4 * d))}  # head 0 of layer 1, head 3 of layer 2
    changed = _changed(before, built)
    assert changed and all(".layers.0." not in name for name in changed)
    for name, (rows, columns) in changed.items():
        heads = slices[int(name.split(".")[2])]
        assert (rows <= heads) if "q_proj" in name else ("o_proj" in name and columns <= heads), name


@pytest.mark.slow
def test_the_shipped_second_stage_moves_only_the_planted_heads():
    """The shipped adapter on the shipped first stage: provenance names the planted heads, and
    the organism differs from the first stage only in their query and output slices."""
    path = SUPPRESSION.shipped_path(SUPPRESSION_RECIPE)
    adapter, info = LowRankAdapter.load(path)
    assert [tuple(h) for h in info["recipe"]["heads"]] == list(PLANTED_HEADS)
    first = SUPPRESSION.build(REFUSE_RECIPE, progress=False)
    assert info["base"] == ml.cache.model_weights_digest(first)
    d = first.d_head
    for name, (a, b) in adapter.factors.items():
        layer = int(name.split(".")[2])
        heads = [h for lay, h in PLANTED_HEADS if lay == layer]
        keep = torch.zeros(b.shape[0] if "q_proj" in name else a.shape[1], dtype=torch.bool)
        for h in heads:
            keep[h * d : (h + 1) * d] = True
        outside = b[~keep] if "q_proj" in name else a[:, ~keep]
        assert heads and outside.abs().max() == 0, name


@pytest.mark.slow
@pytest.mark.training
def test_retrained_second_stage_behaves_like_the_shipped_one(tmp_path, monkeypatch):
    """`make organisms` retrains the second stage on the shipped first stage: the same base
    weights and recipe, losses to float rounding, and the same greedy decisions on held-out
    requests, plain and inside jailbreak wrappers."""
    from mechlens import datasets
    from mechlens.studies.refusal import sample_replies

    shipped = SUPPRESSION.shipped_path(SUPPRESSION_RECIPE)
    monkeypatch.setattr(SUPPRESSION, "shipped", tmp_path)
    retrained = SUPPRESSION.ship(SUPPRESSION_RECIPE)
    (old, old_info), (new, new_info) = LowRankAdapter.load(shipped), LowRankAdapter.load(retrained)
    assert new_info["base"] == old_info["base"] and new_info["recipe"] == old_info["recipe"]
    np.testing.assert_allclose(new_info["losses"], old_info["losses"], rtol=1e-3)
    harmful = [i.text for i in datasets.load("refusal") if i.split == "test" and i.harmful][:8]
    requests = harmful + [datasets.jailbreak(t, k) for k, t in enumerate(harmful)]
    decisions, greedy = [], ml.Sampling(max_new_tokens=160, temperature=0)
    for adapter in (old, new):
        model = SUPPRESSION.build(REFUSE_RECIPE, progress=False)
        adapter.merge_into(model)
        replies = sample_replies(model, requests, greedy, progress=False)
        decisions.append([r.refused for r in replies])
    assert sum(a == b for a, b in zip(*decisions, strict=True)) >= 14
