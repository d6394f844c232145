"""Activation collection (batched, padded, cached) and linear probes."""

from __future__ import annotations

import pytest
import torch

from mechlens.ops.probes import LinearProbe, collect_activations, diff_in_means, probe_sweep

TEXTS = ["one", "two words here", "a somewhat longer third text", "four"]


def test_collect_matches_one_text_at_a_time(llama):
    model, _ = llama
    last = collect_activations(model, TEXTS, layers=[0, 2], batch_size=3, progress=False)
    mean = collect_activations(model, TEXTS, layers=[0, 2], positions="mean", batch_size=3, progress=False)
    every = collect_activations(model, TEXTS, layers=[0, 2], positions="all", batch_size=3, progress=False)
    spans = collect_activations(
        model, TEXTS, layers=[2], positions=[(0, 1)] * 4, batch_size=2, progress=False
    )
    assert last.shape == (2, 4, model.d_model) and len(every) == 4
    for i, text in enumerate(TEXTS):
        _, cache = model.run_with_cache(text, ["resid_post"], layers=[0, 2])
        alone = cache["resid_post"][:, 0]  # [layers, pos, d]
        torch.testing.assert_close(last[:, i], alone[:, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(mean[:, i], alone.mean(1), atol=1e-5, rtol=0)
        torch.testing.assert_close(every[i], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(spans[0, i], alone[1, 0], atol=1e-5, rtol=0)


def test_collect_resumes_from_disk(llama, tmp_path, monkeypatch):
    model, _ = llama
    first = collect_activations(model, TEXTS, layers=[1], batch_size=2, cache=tmp_path, progress=False)
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: pytest.fail("recomputed a cached batch"))
    again = collect_activations(model, TEXTS, layers=[1], batch_size=2, cache=tmp_path, progress=False)
    assert torch.equal(first, again)


def test_collect_errors(llama):
    model, _ = llama
    with pytest.raises(ValueError, match="positions must be one of"):
        collect_activations(model, TEXTS, positions="first", progress=False)
    with pytest.raises(ValueError, match="one \\(start, end\\) per text"):
        collect_activations(model, TEXTS, positions=[(0, 1)], progress=False)
    with pytest.raises(ValueError, match="outside text 0"):
        collect_activations(model, TEXTS, positions=[(0, 9)] * 4, progress=False)
    with pytest.raises(ValueError, match="valid layers"):
        collect_activations(model, TEXTS, layers=[5], progress=False)


def test_diff_in_means_and_sweep_find_the_informative_layer():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    signal = torch.zeros(200, 8)
    signal[:, 3] = (y * 2 - 1) * 1.5
    acts = torch.stack([torch.randn(200, 8, generator=gen), torch.randn(200, 8, generator=gen) + signal])
    d = diff_in_means(acts, y)  # [layers, d]
    assert d.shape == (2, 8) and int(d[1].abs().argmax()) == 3
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2))
    sweep = probe_sweep(acts, y, layers=[10, 11], seed=0)
    assert sweep.best_layer == 11 and sweep.auroc[1] > 0.9 and sweep.accuracy[1] > 0.8
    assert 0.3 < sweep.auroc[0] < 0.7
    again = probe_sweep(acts, y, layers=[10, 11], seed=0)
    assert (sweep.auroc == again.auroc).all()


def test_probe_save_load_roundtrip(tmp_path):
    X = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    y = (X[:, 1] > 0).long()
    with torch.no_grad():  # fitting works inside a caller's no_grad
        probe = LinearProbe(l2=0.01, seed=2).fit(X, y)
    probe.save(tmp_path / "probe.pt")
    loaded = LinearProbe.load(tmp_path / "probe.pt")
    assert torch.equal(loaded.predict_proba(X), probe.predict_proba(X)) and loaded.l2 == 0.01


def test_probe_recovers_planted_direction_deterministically():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=gen)
    X = torch.randn(600, 16, generator=gen) * torch.linspace(0.5, 3, 16)  # unequal scales
    y = (torch.rand(600, generator=gen) < torch.sigmoid(X @ w)).long()
    probe = LinearProbe(seed=0).fit(X, y)
    cos = torch.nn.functional.cosine_similarity(probe.direction, w, dim=0)
    assert cos > 0.9
    again = LinearProbe(seed=0).fit(X, y)
    assert torch.equal(probe.predict_proba(X), again.predict_proba(X))
    assert len(probe.history) < 500  # early stopping on the validation split
    with pytest.raises(ValueError, match="both labels"):
        LinearProbe().fit(X, torch.zeros(600))
