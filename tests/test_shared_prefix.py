"""`SharedPrefixEngine`: its forward equals Hugging Face's, greedy rows equal `generate`'s,
sampled first tokens follow the exact nucleus distribution in float32 and bf16, and
`sample_rows` is exact on every path (top-k prefilter, wider fallback, full sort)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import mechlens as ml
from mechlens.rollouts import LocalEngine, SharedPrefixEngine, engine_for, shared_prefix

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return ml.load_model(f"tiny-{request.param}")


def test_float32_logits_equal_hugging_face(tiny):
    engine = SharedPrefixEngine(tiny, dtype="float32")
    ids = [3, 17, 42, 99, 5, 61, 7]
    _, logits = engine._prefill(engine._weights(), ids)
    want = tiny.plain_model(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(logits, want, atol=2e-5, rtol=1e-5)


def test_greedy_rows_equal_generate(tiny):
    prompts = [[3, 17, 42, 99, 5], [3, 17, 42], [8, 9, 10, 11], [3, 17]]  # two chains
    sampling = ml.Sampling(max_new_tokens=6, temperature=0, n=2, stop_at_eos=False)
    got = SharedPrefixEngine(tiny, dtype="float32", slots=3).sample(prompts, sampling)  # slots < rows
    want = LocalEngine(tiny, path="plain").sample(prompts, sampling)
    assert got == want


def exact_first_token(model, prompt, temperature, top_p) -> np.ndarray:
    z = model.plain_model(torch.tensor([prompt])).logits[0, -1].double() / temperature
    p = torch.softmax(z, -1)
    order = p.argsort(descending=True)
    sorted_p = p[order]
    keep = sorted_p.cumsum(0) - sorted_p < top_p
    q = torch.zeros_like(p)
    q[order[keep]] = sorted_p[keep]
    return (q / q.sum()).numpy()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_tokens_follow_the_nucleus(dtype):
    model = ml.load_model("tiny-llama")
    prompt = [3, 17, 42, 99]
    want = exact_first_token(model, prompt, 1.0, 0.9)
    n = 600
    rows = SharedPrefixEngine(model, dtype=dtype).sample(
        [prompt], ml.Sampling(max_new_tokens=1, temperature=1.0, top_p=0.9, n=n, seed=3)
    )[0]
    counts = np.bincount([r[0] for r in rows if r], minlength=len(want))
    assert counts[want == 0].sum() == 0  # nothing outside the nucleus
    support = want > 0
    expected = want[support] * counts.sum()
    big = expected >= 5  # chi-square cells: pool the rare tokens
    observed = np.append(counts[support][big], counts[support][~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    assert stats.chisquare(observed[keep], expected[keep]).pvalue > 1e-3


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k", "fallback"),
    [(1.0, 1.0, 64, 1024), (0.6, 0.95, 64, 1024), (1.0, 0.95, 2, 1024), (1.0, 0.99, 2, 4)],
)
def test_sample_rows_is_the_inverse_cdf_of_the_nucleus(temperature, top_p, top_k, fallback, monkeypatch):
    monkeypatch.setattr(shared_prefix, "FALLBACK_K", fallback)  # the wider set, then a full sort
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 2
    grid = 4000
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid  # exact quantiles
    for r in range(3):
        tokens = shared_prefix.sample_rows(logits[r].repeat(grid, 1), temperature, top_p, u, top_k)
        z = (logits[r].double() / temperature).softmax(-1)
        order = z.argsort(descending=True)
        sorted_p = z[order]
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        want = torch.zeros_like(z)
        want[order[keep]] = sorted_p[keep] / sorted_p[keep].sum()
        got = torch.bincount(tokens, minlength=50).double() / grid
        assert (got - want).abs().max() <= 2 / grid


def test_seeded_rows_repeat_and_seeds_differ():
    model = ml.load_model("tiny-llama")
    engine = SharedPrefixEngine(model, dtype="float32", slots=5)
    sampling = ml.Sampling(max_new_tokens=5, temperature=1.0, n=4, seed=1)
    a = engine.sample([[3, 4, 5], [3, 4]], sampling)
    assert a == engine.sample([[3, 4, 5], [3, 4]], sampling)
    assert a != engine.sample([[3, 4, 5], [3, 4]], sampling.replace(seed=2))
    alone = engine.sample([[3, 4]], sampling, seeds=[sampling.seed * 1_000_003 + 1])
    assert alone[0] == a[1]  # a row depends on its seed, not on the batch around it


def test_steering_directions_apply_as_in_generate(tiny):
    """Directions added at every position (steering) run in the engine: greedy rows equal the
    hooked `generate`'s under the same contexts, two directions on two layers included."""
    prompts = [[3, 17, 42, 99, 5], [3, 17, 42], [8, 9, 10, 11]]
    sampling = ml.Sampling(max_new_tokens=6, temperature=0, n=1, stop_at_eos=False)
    gen = torch.Generator().manual_seed(0)
    d1, d2 = torch.randn(tiny.d_model, generator=gen), torch.randn(tiny.d_model, generator=gen)
    engine = SharedPrefixEngine(tiny, dtype="float32", slots=2)
    plain = engine.sample(prompts, sampling)
    with tiny.add_direction(1, d1, 6.0), tiny.add_direction(0, d2, -4.0):
        got = engine.sample(prompts, sampling)
        want = LocalEngine(tiny).sample(prompts, sampling)
    assert got == want and got != plain
    with tiny.add_direction(1, d1, 6.0, positions=[0]), pytest.raises(ValueError, match="intervention"):
        engine.sample(prompts, sampling)


def test_refuses_interventions_and_other_architectures():
    model = ml.load_model("tiny-llama")
    engine = SharedPrefixEngine(model, dtype="float32")
    with model.ablate_heads([(0, 0)]), pytest.raises(ValueError, match="intervention"):
        engine.sample([[3, 4]], ml.Sampling(max_new_tokens=2, n=1))
    for arch in ("gpt2", "gemma"):
        with pytest.raises(ValueError, match="LocalEngine"):
            SharedPrefixEngine(ml.load_model(f"tiny-{arch}"))
        assert engine_for(ml.load_model(f"tiny-{arch}"), local="auto").name == "mechlens"
    with pytest.raises(ValueError, match="local"):
        engine_for(model, local="fast")
    with pytest.raises(ValueError, match="slots"):
        SharedPrefixEngine(model, slots=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rows_ending_at_eos_free_their_slots_without_changing_any_row(arch):
    """Rows that stop at EOS at different steps, with the queue empty: the engine moves the last
    live rows into the freed slots. Each row still depends only on its seed: the same rows come out
    with 2, 5 or 64 slots, and equal `LocalEngine`'s greedy rows (qwen2: biased projections)."""
    model = ml.load_model(f"tiny-{arch}")
    prompts = [[3, 17, 42, 99, 5], [3, 17, 42], [8, 9, 10, 11]]
    sampling = ml.Sampling(max_new_tokens=12, temperature=1.0, n=6, seed=5)
    free = SharedPrefixEngine(model, dtype="float32", slots=64).sample(
        prompts, sampling.replace(stop_at_eos=False)
    )
    counts = np.bincount([tok for rows in free for r in rows for tok in r[1:]])
    tokenizer, eos = model.tokenizer, model.tokenizer.eos_token
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(counts.argmax()))  # a frequent token ends rows
    greedy = sampling.replace(temperature=0)
    try:
        outs = [
            SharedPrefixEngine(model, dtype="float32", slots=k).sample(prompts, sampling) for k in (2, 5, 64)
        ]
        want = LocalEngine(model, path="plain").sample(prompts, greedy)
        got = {
            k: SharedPrefixEngine(model, dtype="float32", slots=k).sample(prompts, greedy) for k in (2, 3, 8)
        }
    finally:
        tokenizer.eos_token = eos
    assert outs[0] == outs[1] == outs[2]
    lengths = {len(r) for rows in outs[0] for r in rows}
    assert len(lengths) >= 3 and max(lengths) == 12  # rows end at different steps, some run to the end
    assert all(rows == want for rows in got.values())  # slots moved, against generate's greedy rows


def test_a_model_off_the_cpu_samples_with_its_own_generate(monkeypatch):
    model = ml.load_model("tiny-llama")
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    with pytest.raises(ValueError, match="runs on the CPU.*cuda"):
        SharedPrefixEngine(model)
    assert engine_for(model, local="auto").name == "mechlens"  # LocalEngine: generate on the GPU


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_distinct_prompts_read_per_slot_prompt_caches_with_the_same_rows(arch, monkeypatch):
    """One chain reads its prompt keys in place; several chains copy each slot's prompt keys. A
    prompt's rows are the same either way, and with the per-slot caches capped to one slot."""
    model = ml.load_model(f"tiny-{arch}")
    sampling = ml.Sampling(max_new_tokens=8, temperature=1.0, n=3, seed=2)
    engine = SharedPrefixEngine(model, dtype="float32")
    one_chain = engine.sample([[3, 4, 5, 6], [3, 4]], sampling, seeds=[10, 11])
    chains = engine.sample([[3, 4, 5, 6], [3, 4], [9, 8, 7]], sampling, seeds=[10, 11, 12])
    assert chains[:2] == one_chain
    monkeypatch.setattr(shared_prefix, "PROMPT_CACHE_BYTES", 1)  # one slot at a time
    assert engine.sample([[3, 4, 5, 6], [3, 4], [9, 8, 7]], sampling, seeds=[10, 11, 12]) == chains
