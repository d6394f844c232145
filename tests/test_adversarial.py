"""A careful new user's and a security reviewer's inputs: every mistake raises a `ValueError` or
`TypeError` that names the argument; valid random inputs give the same numbers in both backends and
under batching; the reproducers of each fixed problem.

Property tests are derandomized (fixed examples, identical on every run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import wrap_with_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mechlens as ml
from mechlens.ops.heads import head_ablation_effects
from mechlens.ops.probes import LinearProbe, collect_activations, diff_in_means

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


@pytest.fixture(scope="module")
def pair():
    """The same tiny Llama under both backends."""
    tl, _ = wrap_with_reference("llama", "transformer_lens")
    nn_, _ = wrap_with_reference("llama", "nnsight")
    return tl, nn_


@pytest.fixture(scope="module")
def model(pair):
    return pair[0]


# ---------------------------------------------------------------- one clear error per mistake
D = 64  # tiny-llama: 3 layers, 4 heads, d_model 64, vocab 261
BAD_CALLS = {
    "numpy layer out of range": (lambda m: m.run_with_cache("hi", ["z"], layers=[np.int64(5)]), "layer.* 5 out of range"),
    "bool layer": (lambda m: m.add_direction(True, torch.ones(D)), "layer must be an integer"),
    "bool head": (lambda m: m.ablate_heads([(0, False)]), "head must be an integer"),
    "float layer": (lambda m: m.ablate_heads([(1.0, 0)]), "layer must be an integer"),
    "string layers": (lambda m: m.run_with_cache("hi", ["z"], layers="12"), "layers must be a list"),
    "head pair of three": (lambda m: m.ablate_heads([(0, 1, 2)]), r"\(layer, head\) pairs"),
    "head not a pair": (lambda m: m.ablate_heads([3]), r"\(layer, head\) pairs"),
    "heads a string": (lambda m: m.ablate_heads("0,1"), "heads must be a list"),
    "float token ids": (lambda m: m(torch.zeros(1, 4)), "token ids must be integers"),
    "bool token ids": (lambda m: m(torch.zeros(1, 4, dtype=torch.bool)), "token ids must be integers"),
    "empty batch": (lambda m: m(torch.zeros(0, 5, dtype=torch.long)), "empty batch"),
    "3-d tokens": (lambda m: m(torch.zeros(1, 2, 3, dtype=torch.long)), r"tokens must be \[batch, pos\]"),
    "negative token id": (lambda m: m(torch.tensor([[1, -2]])), "token ids must lie in"),
    "list of non-strings": (lambda m: m.to_tokens(["a", 3]), "list of strings"),
    "mask of wrong shape": (lambda m: m(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 2)), "attention_mask shape"),
    "mask with a 2": (lambda m: m(torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, 2, 1]])), "only 0"),
    "all-padding row": (lambda m: m(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]])), "no token"),
    "max_new_tokens float": (lambda m: m.generate("hi", max_new_tokens=2.5), "max_new_tokens must be an int"),
    "max_new_tokens zero": (lambda m: m.generate("hi", max_new_tokens=0), "max_new_tokens must be >= 1"),
    "seed None": (lambda m: m.generate("hi", seed=None), "seed must be an int"),
    "seed 2**63": (lambda m: m.generate("hi", seed=2**63), "seed must be in"),
    "seed negative": (lambda m: m.generate("hi", seed=-1), "seed must be in"),
    "temperature nan": (lambda m: m.generate("hi", temperature=float("nan")), "temperature must be a finite"),
    "temperature inf": (lambda m: m.generate("hi", temperature=float("inf")), "temperature must be a finite"),
    "top_p zero": (lambda m: m.generate("hi", top_p=0), "top_p must lie in"),
    "top_p string": (lambda m: m.generate("hi", top_p="0.9"), "top_p must be a real number"),
    "unknown sampling setting": (lambda m: m.generate("hi", temprature=0.5), "unknown sampling setting"),
    "batch_size zero": (lambda m: m.generate("hi", batch_size=0), "batch_size must be"),
    "lens target >= vocab": (lambda m: ml.logit_lens(m, torch.tensor([[1, 2]]), stats=["target"], targets=torch.tensor([[1, 999]])), "below the vocabulary"),
    "lens float targets": (lambda m: ml.logit_lens(m, torch.tensor([[1, 2]]), stats=["target"], targets=torch.zeros(1, 2)), "integer token ids"),
    "lens k > vocab": (lambda m: ml.logit_lens(m, torch.tensor([[1, 2]]), top_k_positions=[0], k=10**6), "k in 1"),
    "lens unknown stat": (lambda m: ml.logit_lens(m, torch.tensor([[1, 2]]), stats=["perplexity"]), "unknown stat"),
    "continue with empty suffix": (lambda m: m.continue_prefix(m.cache_prefix("hello"), torch.zeros(1, 0, dtype=torch.long)), "suffix must be token ids"),
    "continue upto 0": (lambda m: m.continue_prefix(m.cache_prefix("hello"), torch.tensor([[5]]), upto=0), "upto must lie in"),
    "diff_in_means labels mismatch": (lambda m: diff_in_means(torch.randn(4, 3), [0, 1]), "labels must be one per row"),
    "diff_in_means label 2": (lambda m: diff_in_means(torch.randn(2, 3), [0, 2]), "labels must be 0 or 1"),
    "collect batch_size 0": (lambda m: collect_activations(m, ["a"], batch_size=0, progress=False), "batch_size must be"),
    "collect empty": (lambda m: collect_activations(m, [], progress=False), "texts is empty"),
    "collect bytes": (lambda m: collect_activations(m, b"abc", progress=False), "texts must be a string"),
    "trace prompt None": (lambda m: ml.ReasoningTrace.from_text(m, None, "Fine."), "prompt must be a string"),
    "trace response int": (lambda m: ml.ReasoningTrace.from_text(m, "Q?", 5), "response must be a string"),
    "load_model(5)": (lambda m: ml.load_model(5), "name must be None"),
    "load_model backend": (lambda m: ml.load_model("tiny-llama", backend=None), "unknown backend"),
    "scale nan": (lambda m: m.add_direction(0, torch.ones(D), scale=float("nan")), "scale must be a finite"),
    "scale inf": (lambda m: m.add_direction(0, torch.ones(D), scale=float("inf")), "scale must be a finite"),
    "direction nan": (lambda m: m.add_direction(0, torch.full((D,), float("nan"))), "finite and non-zero"),
    "positions negative": (lambda m: m.add_direction(0, torch.ones(D), positions=[-1]), "positions must be"),
    "positions a string": (lambda m: m.ablate_heads([(0, 0)], positions="12"), "positions must be a list"),
    "keys a string": (lambda m: m.suppress_attention(keys="1:3"), "keys must be a span"),
    "keys of floats": (lambda m: m.suppress_attention(keys=[(1.0, 3.0)]), "keys entry must be an integer"),
    "scale_heads wrong shape": (lambda m: m.scale_heads({0: torch.ones(3)}), r"\[n_heads\]"),
    "forward resid_in without start_at": (lambda m: m.forward(torch.tensor([[1, 2]]), resid_in=torch.zeros(1, 2, D)), "start_at and resid_in"),
    "forward bad capture": (lambda m: m.forward(torch.tensor([[1, 2]]), capture={"mlp_out": [0]}), "unknown capture name"),
    "trainable_blocks out of range": (lambda m: m.trainable_blocks(7).__enter__(), "first 7 out of range"),
    "head sweep NaN metric": (lambda m: head_ablation_effects(m, "a b c", lambda logits: logits[:, -1, 0] * float("nan"), progress=False), "metric returned NaN"),
    "head sweep bad method": (lambda m: head_ablation_effects(m, "a b", lambda x: x[:, -1, 0], method="fast"), "method must be"),
    "probe NaN feature": (lambda m: LinearProbe().fit(torch.tensor([[0.0, 1], [1, float("nan")], [2, 0], [3, 1]]), torch.tensor([0, 1, 0, 1])), "NaN or inf in rows"),
    "probe predict before fit": (lambda m: LinearProbe().predict_proba(torch.zeros(2)), "fit the probe first"),
    "sampling replace unknown": (lambda m: ml.Sampling().replace(k=3), "unknown sampling setting"),
    "register empty backend": (lambda m: ml.register_backend("", None), "non-empty string"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_each_mistake_raises_one_clear_error(model, name):
    call, match = BAD_CALLS[name]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match) as info:
        call(model)
    assert type(info.value) in (ValueError, TypeError) or name == "probe predict before fit"
    assert not model._interventions.items  # a failed context leaves nothing behind


BAD_LAYERS = st.one_of(
    st.integers().filter(lambda i: not 0 <= i < 3),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(0, 2), max_size=2),
)


@PROPERTY
@given(layer=BAD_LAYERS)
def test_random_bad_layers_raise_value_or_type_error(model, layer):
    for call in (
        lambda: model.add_direction(layer, torch.ones(D)),
        lambda: model.ablate_heads([(layer, 0)]),
        lambda: model.check_layer(layer),
    ):
        with pytest.raises((ValueError, TypeError), match="layer"):
            call()


@PROPERTY
@given(
    max_new_tokens=st.one_of(st.integers(max_value=0), st.floats(), st.none(), st.text(max_size=2)),
    seed=st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63), st.floats(), st.none()),
)
def test_random_bad_sampling_settings_raise(max_new_tokens, seed):
    with pytest.raises((ValueError, TypeError), match="max_new_tokens"):
        ml.Sampling(max_new_tokens=max_new_tokens)
    with pytest.raises((ValueError, TypeError), match="seed"):
        ml.Sampling(seed=seed)


# ---------------------------------------------------------------- valid inputs: backends and batching agree
ROWS = st.lists(st.lists(st.integers(3, 260), min_size=1, max_size=12), min_size=1, max_size=4)


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    toks = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        toks[i, n - len(r) :] = torch.tensor(r)
        mask[i, n - len(r) :] = 1
    return toks, mask


@PROPERTY
@given(rows=ROWS)
def test_backends_and_batching_agree(pair, rows):
    tl, nn_ = pair
    toks, mask = _left_pad(rows)
    a, b = tl(toks, mask), nn_(toks, mask)
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0)
    for i, r in enumerate(rows):  # each row alone equals its row of the padded batch
        alone = tl(torch.tensor([r]))[0]
        torch.testing.assert_close(a[i, -len(r) :], alone, atol=1e-4, rtol=0)


@PROPERTY
@given(rows=ROWS, layer=st.integers(0, 2))
def test_interventions_are_batch_invariant(pair, rows, layer):
    tl, _ = pair
    toks, mask = _left_pad(rows)
    shortest = min(len(r) for r in rows)
    with (
        tl.ablate_heads([(layer, 1)], positions=[0]),
        tl.add_direction(layer, torch.ones(D), positions=[shortest - 1]),
    ):
        batch = tl(toks, mask)
        for i, r in enumerate(rows):
            torch.testing.assert_close(batch[i, -len(r) :], tl(torch.tensor([r]))[0], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- reproducers of fixed problems
@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_generate_respects_padding(backend):
    """Issue: left-padded ids were sampled from as if the pads were text."""
    m, _ = wrap_with_reference("llama", backend)
    toks, mask = m.tokenize(["Hi", "A much longer prompt here"])
    alone = m.generate("Hi", max_new_tokens=6, temperature=0).texts[0]
    assert m.generate(toks, attention_mask=mask, max_new_tokens=6, temperature=0).texts[0] == alone
    assert m.generate(["Hi", "A much longer prompt here"], max_new_tokens=6, temperature=0).texts[0] == alone
    with pytest.raises(ValueError, match="attention_mask"):
        m.generate(toks, max_new_tokens=6, temperature=0)  # padded ids without their mask
    sampled = [m.generate(["Hi", "A much longer prompt here"], max_new_tokens=6, seed=3, batch_size=b).texts
               for b in (1, 2)]  # fmt: skip
    assert sampled[0] == sampled[1]


def test_span_or_position_past_a_short_row_raises(model):
    toks, mask = model.tokenize(["ab", "a much longer row of text"])
    with model.suppress_attention(keys=(5, 9)), pytest.raises(ValueError, match="past the end of a row of 2"):
        model(toks, mask)
    with (
        model.add_direction(0, torch.ones(D), positions=[15]),
        pytest.raises(ValueError, match="shortest row"),
    ):
        model(toks, mask)


def test_one_string_is_one_text(model):
    one = collect_activations(model, "hello", layers=[1], progress=False)
    assert one.shape == (1, 1, D)
    torch.testing.assert_close(one, collect_activations(model, ["hello"], layers=[1], progress=False))


def test_numpy_and_tensor_indices_are_accepted(model):
    toks = model.to_tokens("a b c")
    _, a = model.run_with_cache(toks, ["z"], layers=[np.int64(1), torch.tensor(2)])
    assert a.layers["z"] == [1, 2]
    with model.ablate_heads([(np.int32(1), torch.tensor(0))]):
        model(toks)


def test_nothing_loads_with_pickle_execution():
    import pathlib
    import re

    root = pathlib.Path(ml.__file__).parent
    offenders = [
        p for p in root.rglob("*.py") if re.search(r"weights_only\s*=\s*False|pickle\.load", p.read_text())
    ]
    assert not offenders


def test_probe_load_rejects_foreign_files(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a probe at all")
    with pytest.raises(ValueError, match="not a probe saved by LinearProbe.save"):
        LinearProbe.load(tmp_path / "x.pt")
    torch.save({"something": torch.ones(2)}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match="not a probe"):
        LinearProbe.load(tmp_path / "y.pt")


def test_unknown_hub_model_fails_fast(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="unknown model"):
        ml.load_model("no-such-org/no-such-model")
    assert time.perf_counter() - start < 20
