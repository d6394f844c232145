"""Combinations a researcher writes: contexts in any nesting, caches under interventions and
in-place edits, padding on either side, chunked paths under every context, low precision,
per-row suppression in batched generation, seeds, traces, probes, endpoints and cache files.

Each class of mistake has one property-based test (hypothesis, derandomised) on tiny models
of both backends, plus the cases that name its edges.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mechlens as ml
from mechlens.cache import DiskCache, model_fingerprint, remove_stale_temporaries
from mechlens.models.tiny import tiny_model
from mechlens.ops.probes import LinearProbe, collect_activations, probe_sweep

BACKENDS = ["transformer_lens", "nnsight"]
PROPERTY = settings(derandomize=True, max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
_MODELS: dict[str, ml.HookedModel] = {}


def shared(backend: str) -> ml.HookedModel:
    """One tiny llama per backend for the tests that leave the weights alone."""
    if backend not in _MODELS:
        _MODELS[backend] = ml.load_model("tiny-llama", backend=backend)
    return _MODELS[backend]


def fresh(backend: str, arch: str = "llama", **kwargs) -> ml.HookedModel:
    hf, tok = tiny_model(arch, **kwargs)
    return ml.load_model(hf, backend=backend, tokenizer=tok)


def ids(n: int = 10, rows: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 200, (rows, n), generator=torch.Generator().manual_seed(seed))


def unit(model, seed: int) -> torch.Tensor:
    return torch.randn(model.d_model, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ 1. contexts
def context_makers(model):
    """Named factories of every kind of context, two of a kind where equality once confused them."""
    ref = ids(6, 1, 3)
    return {
        "direction a": lambda: model.add_direction(1, unit(model, 1), scale=2.0),
        "direction b": lambda: model.add_direction(1, unit(model, 2), scale=3.0),
        "project a": lambda: model.project_out(unit(model, 3)),
        "project b": lambda: model.project_out(unit(model, 4), layers=[0, 2]),
        "mean ref a": lambda: model.ablate_heads([(0, 1)], mode="mean", reference=ref),
        "mean ref b": lambda: model.ablate_heads([(1, 2)], mode="mean", reference=ref),
        "zero rescale": lambda: model.ablate_heads([(2, 0)], rescale="norm"),
        "scale": lambda: model.scale_heads({1: torch.tensor([1.0, 0.5, 0.0, 2.0])}),
        "suppress": lambda: model.suppress_attention(keys=(2, 5)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_contexts_restore_the_model_under_any_nesting_exception_and_reuse(backend):
    model = shared(backend)
    toks = ids()
    clean = model(toks)
    makers = context_makers(model)
    names = sorted(makers)

    @PROPERTY
    @given(
        order=st.lists(st.sampled_from(names), min_size=1, max_size=5),
        raise_at=st.integers(-1, 5),
        reuse=st.booleans(),
    )
    def check(order, raise_at, reuse):
        contexts = [makers[n]() for n in order]
        if reuse:  # the same object entered twice, nested
            contexts.append(contexts[0])
        with contextlib.suppress(KeyError), contextlib.ExitStack() as stack:
            for i, ctx in enumerate(contexts):
                stack.enter_context(ctx)
                if i == raise_at:
                    raise KeyError("inside")
            model(toks)
        assert model.active_interventions == ()
        assert torch.equal(model(toks), clean)
        with contexts[0]:  # and entered again, later
            model(toks)
        assert torch.equal(model(toks), clean)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_equal_contexts_each_apply_and_leave_in_any_order(backend):
    model = shared(backend)
    toks = ids()
    d1, d2 = unit(model, 1), unit(model, 2)
    with model.add_direction(1, d1), model.add_direction(1, d2):
        both = model(toks)
    with model.add_direction(1, d1 + d2):
        summed = model(toks)
    torch.testing.assert_close(both, summed, atol=1e-4, rtol=1e-4)
    twice = model.add_direction(1, d1)
    with twice, twice:  # one object entered twice applies twice
        doubled = model(toks)
    with model.add_direction(1, d1, scale=2.0):
        torch.testing.assert_close(doubled, model(toks), atol=1e-4, rtol=1e-4)
    a, b = model.project_out(d1), model.project_out(d1)  # equal fields, two entries
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # out of order
    assert model.active_interventions == (b.item,)
    b.__exit__(None, None, None)
    assert model.active_interventions == ()
    with pytest.raises(RuntimeError, match="exited more often than entered"):
        b.__exit__(None, None, None)
    with model.scale_heads({0: torch.ones(model.n_heads)}):  # a study inside a user's context
        ml.head_ablation_effects(model, toks, lambda lg: lg[:, -1, 5], progress=False)
        assert len(model.active_interventions) == 1
    assert model.active_interventions == ()


# ------------------------------------------------------------------------------------ 2. caches
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_keys_change_with_every_intervention_and_in_place_edit(backend, tmp_path):
    model = fresh(backend)
    makers = context_makers(model)
    base = model_fingerprint(model)
    keys: dict[str, tuple] = {json.dumps(base, sort_keys=True): ()}

    @PROPERTY
    @given(order=st.lists(st.sampled_from(sorted(makers)), min_size=1, max_size=3))
    def check(order):
        with contextlib.ExitStack() as stack:
            for name in order:
                stack.enter_context(makers[name]())
            key = json.dumps(model_fingerprint(model), sort_keys=True)
        assert keys.setdefault(key, tuple(order)) == tuple(order)  # a new key for every new list
        assert model_fingerprint(model) == base

    check()
    seen = set(keys)
    param = next(model.hf_model.parameters())
    edits = {
        ".data": lambda: param.data.view(-1)[0].add_(1.0),
        "numpy view": lambda: param.detach().numpy().reshape(-1).__setitem__(1, 7.0),
        "copy_": lambda: param.detach().view(-1)[2:3].copy_(torch.tensor([3.0])),
    }
    for name, edit in edits.items():
        with torch.no_grad():
            edit()
        key = json.dumps(model_fingerprint(model), sort_keys=True)
        assert key not in seen, name
        seen.add(key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_activations_follow_the_interventions_in_force(backend, tmp_path):
    model = shared(backend)
    texts = ["a b c", "d e f g"]
    clean = collect_activations(model, texts, layers=[2], cache=tmp_path, progress=False)
    with model.ablate_heads([(0, 0), (1, 1)]):
        ablated = collect_activations(model, texts, layers=[2], cache=tmp_path, progress=False)
        uncached = collect_activations(model, texts, layers=[2], progress=False)
    assert torch.equal(ablated, uncached) and not torch.equal(ablated, clean)
    assert torch.equal(collect_activations(model, texts, layers=[2], cache=tmp_path, progress=False), clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchor_rollouts_are_cached_per_intervention_and_only_sampled_with_them(backend, tmp_path):
    from mechlens.rollouts import EndpointEngine
    from mechlens.studies.anchors.resampling import sample_from_prefixes

    model = shared(backend)
    trace = ml.ReasoningTrace.from_text(model, "Q?", "<think>First step here. Second step here.</think>A")
    sampling = ml.Sampling(max_new_tokens=4, temperature=1.0, n=2, seed=1)
    clean = sample_from_prefixes(model, trace, [3, 6], sampling, cache=tmp_path, progress=False)
    with model.add_direction(0, unit(model, 0), scale=50.0):
        steered = sample_from_prefixes(model, trace, [3, 6], sampling, cache=tmp_path, progress=False)
        assert steered == sample_from_prefixes(model, trace, [3, 6], sampling, cache=None, progress=False)
        with pytest.raises(ValueError, match="samples without it"):
            engine = EndpointEngine("http://127.0.0.1:9", "tiny")
            sample_from_prefixes(model, trace, [3], sampling, cache=None, progress=False, engine=engine)
    assert steered != clean


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prefix_cache_refuses_contexts_it_was_not_cached_under(backend):
    model = shared(backend)
    toks, suffix = ids(10, 1), ids(3, 2, 5)
    prefix = model.cache_prefix(toks)
    with model.ablate_heads([(1, 1)]):
        with pytest.raises(ValueError, match="changes its first 10 positions"):
            model.continue_prefix(prefix, suffix)
        inside = model.cache_prefix(toks)
        got = model.continue_prefix(inside, suffix, upto=7)
        want = model(torch.cat([toks[:, :7].expand(2, -1), suffix], 1))[:, 7:]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no longer active"):
        model.continue_prefix(inside, suffix)
    with model.add_direction(1, unit(model, 1), positions=[8, 9]):  # after upto: allowed
        got = model.continue_prefix(prefix, suffix, upto=8)
        want = model(torch.cat([toks[:, :8].expand(2, -1), suffix], 1))[:, 8:]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ 3. padding
def padded(model, rows: list[torch.Tensor], side: str, extra: int = 0):
    """Rows padded on `side` ("left" / "right") to the longest plus `extra`, with their mask."""
    width = max(len(r) for r in rows) + extra
    pad = model.tokenizer.pad_token_id
    toks = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        at = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        toks[b, at], mask[b, at] = r, 1
    return toks, mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_padding_layout_gives_each_row_its_own_numbers(backend):
    model = shared(backend)
    metric = lambda logits: logits[:, 0].log_softmax(-1)[:, 7]  # noqa: E731

    @PROPERTY
    @given(
        lengths=st.lists(st.integers(3, 9), min_size=2, max_size=3),
        side=st.sampled_from(["left", "right"]),
        extra=st.integers(0, 2),
    )
    def check(lengths, side, extra):
        rows = [ids(n, 1, seed=n * 7 + i)[0] for i, n in enumerate(lengths)]
        toks, mask = padded(model, rows, side, extra)
        logits = model(toks, attention_mask=mask)
        effects = ml.head_ablation_effects(
            model, toks, metric, attention_mask=mask, positions=[0], layers=[1], progress=False
        )
        heads = ml.heads.direct_head_scores(
            model, toks, unit(model, 0), positions=[0, -1], attention_mask=mask
        )
        gen = model.generate(toks, attention_mask=mask, max_new_tokens=3, temperature=0, stop_at_eos=False)
        alone_effects, alone_heads = [], []
        for b, r in enumerate(rows):
            alone = model(r[None])
            torch.testing.assert_close(logits[b][mask[b].bool()], alone[0], atol=1e-4, rtol=1e-4)
            assert (
                gen.tokens[b].tolist()
                == model.generate(r[None], max_new_tokens=3, temperature=0, stop_at_eos=False)
                .tokens[0]
                .tolist()
            )
            alone_effects.append(
                ml.head_ablation_effects(model, r[None], metric, positions=[0], layers=[1], progress=False)[1]
            )
            alone_heads.append(ml.heads.direct_head_scores(model, r[None], unit(model, 0), positions=[0, -1]))
        torch.testing.assert_close(effects[1], torch.stack(alone_effects).mean(0), atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(heads, torch.stack(alone_heads).mean(0), atol=1e-4, rtol=1e-3)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_holding_padding_without_a_mask_are_refused(backend):
    model = shared(backend)
    rows = [ids(4, 1, 1)[0], ids(6, 1, 2)[0]]
    for side in ("left", "right"):
        toks, mask = padded(model, rows, side)
        for call in (model, lambda t: model.run_with_cache(t), lambda t: ml.logit_lens(model, t),
                     lambda t: model.generate(t, max_new_tokens=2)):  # fmt: skip
            with pytest.raises(ValueError, match="no attention_mask"):
                call(toks)
    enc = model.tokenizer(["a b", "c d e"], padding="max_length", max_length=12, return_tensors="pt")
    with pytest.raises(ValueError, match="no attention_mask"):  # every row starts with a pad
        model(enc["input_ids"])
    model(enc["input_ids"], attention_mask=enc["attention_mask"])  # with it: fine
    with pytest.raises(ValueError, match="padding between tokens"):
        model(ids(5, 1), attention_mask=torch.tensor([[1, 1, 0, 1, 1]]))


# ------------------------------------------------------------------------------------ 4. chunking
CHUNK_CONTEXTS = {
    "none": lambda m: contextlib.nullcontext(),
    "zero": lambda m: m.ablate_heads([(0, 1), (2, 3)]),
    "mean ref": lambda m: m.ablate_heads([(1, 0)], mode="mean", reference=ids(5, 1, 9)),
    "mean": lambda m: m.ablate_heads([(1, 0)], mode="mean"),
    "rescale": lambda m: m.ablate_heads([(1, 0)], rescale="norm"),
    "direction": lambda m: m.add_direction(1, unit(m, 1), scale=4.0, positions=[3, 7]),
    "project": lambda m: m.project_out(unit(m, 2)),
    "suppress": lambda m: m.suppress_attention(keys=(1, 4)),
    "scale": lambda m: m.scale_heads({2: torch.tensor([0.0, 1.0, 2.0, 1.0])}),
}
PER_FORWARD = {"mean", "rescale"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CHUNK_CONTEXTS))
def test_chunked_paths_equal_one_pass_under_every_context_or_refuse(backend, name):
    model = shared(backend)
    toks = ids(12, 2)
    with CHUNK_CONTEXTS[name](model):
        one = ml.logit_lens(model, toks, stats=("entropy", "kl_final"))
        full = model(toks)
        if name in PER_FORWARD:
            with pytest.raises(ValueError, match="part of the sequence"):
                ml.logit_lens(model, toks, chunk=5)
            with pytest.raises(ValueError, match="part of the sequence"):
                next(model.forward_chunks(toks, chunk_size=4))
            prefix = model.cache_prefix(toks[:1, :8])
            with pytest.raises(ValueError, match="part of the sequence"):
                model.continue_prefix(prefix, toks[:1, 8:])
            return

        @PROPERTY
        @given(chunk=st.integers(1, 13), cut=st.integers(1, 11))
        def check(chunk, cut):
            chunked = ml.logit_lens(model, toks, stats=("entropy", "kl_final"), chunk=chunk)
            torch.testing.assert_close(chunked.entropy, one.entropy, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(chunked.kl_final, one.kl_final, atol=1e-4, rtol=1e-4)
            pieces = [out.logits for _, out in model.forward_chunks(toks, chunk_size=chunk)]
            torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)
            if name == "suppress" and cut < 4:
                return  # a span (1, 4) past the cut changes what the suffix reads: refused, below
            prefix = model.cache_prefix(toks[:1, :cut])
            got = model.continue_prefix(prefix, toks[:1, cut:])
            torch.testing.assert_close(got, full[:1, cut:], atol=1e-4, rtol=1e-4)

        check()


# ------------------------------------------------------------------------------------ 5. precision
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_directions_in_low_precision_give_finite_logits_or_refuse(backend, dtype):
    hf, tok = tiny_model("llama")
    model = ml.load_model(hf, backend=backend, tokenizer=tok, dtype=dtype)
    assert model.dtype == dtype
    toks = ids()
    tiny = unit(model, 0) * 1e-30
    with model.project_out(tiny):
        assert torch.isfinite(model(toks)).all()
        _, cache = model.run_with_cache(toks, ["resid_post"], layers=[1])
    d = unit(model, 0)
    along = cache["resid_post"][0].float() @ (d / d.norm())
    assert along.abs().max() < 0.05 * cache["resid_post"][0].float().norm(dim=-1).max()
    big = torch.finfo(dtype).max
    with pytest.raises(ValueError, match="past the largest"):
        model.add_direction(1, unit(model, 0), scale=big)
    peak = unit(model, 0) / unit(model, 0).abs().max()  # largest entry 1
    with (
        pytest.raises(ValueError, match="non-finite"),
        model.add_direction(1, peak, scale=0.75 * big),
        model.add_direction(1, peak, scale=0.75 * big),
    ):
        model(toks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_directions_still_project_out(backend):
    model = shared(backend)
    d = unit(model, 5)
    with model.project_out(d * 1e20, layers=[1]):
        _, cache = model.run_with_cache(ids(), ["resid_post"], layers=[1])
    assert (cache["resid_post"][0] @ (d / d.norm())).abs().max() < 1e-4


# ------------------------------------------------------------------------------------ 6. suppression
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_spans_follow_their_prompt_through_batched_generation(backend):
    model = shared(backend)
    rows = [ids(n, 1, seed=n)[0] for n in (7, 9, 8, 10)]
    toks, mask = padded(model, rows, "left")
    spans = [(1, 3), (2, 5), (0, 2), (4, 6)]
    sampling = ml.Sampling(max_new_tokens=5, temperature=1.0, n=2, seed=3)
    with model.suppress_attention(keys=spans):
        together = model.generate(toks, sampling, attention_mask=mask, batch_size=2).tokens
    for b, (r, span) in enumerate(zip(rows, spans, strict=True)):
        with model.suppress_attention(keys=span):
            alone = model.generate(r[None], sampling).tokens
        assert [t.tolist() for t in together[2 * b : 2 * b + 2]] == [t.tolist() for t in alone]
    # rows that stop early leave the batch: an end-of-sequence push at each row's own position 9
    eos = model.tokenizer.eos_token_id
    push = model.hf_model.get_output_embeddings().weight[eos].detach()
    stop_at_9 = sampling.replace(max_new_tokens=6, temperature=0.2)
    with model.suppress_attention(keys=spans), model.add_direction(2, push, scale=500.0, positions=[9]):
        together = model.generate(toks, stop_at_9, attention_mask=mask, batch_size=3).tokens
        with pytest.raises(ValueError, match="one span per prompt"):
            model.generate(toks[:2], sampling, attention_mask=mask[:2])
    assert len({len(t) for t in together}) > 1  # some rows stopped before others
    for b, (r, span) in enumerate(zip(rows, spans, strict=True)):
        with model.suppress_attention(keys=span), model.add_direction(2, push, scale=500.0, positions=[9]):
            alone = model.generate(r[None], stop_at_9).tokens
        assert [t.tolist() for t in together[2 * b : 2 * b + 2]] == [t.tolist() for t in alone]
    for bad in ({"heads": []}, {"layers": []}):
        with pytest.raises(ValueError, match="is empty"):
            model.suppress_attention(keys=(0, 2), **bad)


# ------------------------------------------------------------------------------------ 7. seeds
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prompt_samples_the_same_in_any_batch(backend):
    model = shared(backend)
    prompts = ["one two", "three four five", "six", "seven eight nine ten"]
    sampling = ml.Sampling(max_new_tokens=5, temperature=1.0, n=2, seed=11)
    alone = {p: [t.tolist() for t in model.generate(p, sampling).tokens] for p in prompts}

    @PROPERTY
    @given(order=st.permutations(prompts), size=st.integers(1, 4), batch_size=st.integers(1, 8))
    def check(order, size, batch_size):
        chosen = list(order)[:size]
        out = model.generate(chosen, sampling, batch_size=batch_size).tokens
        for i, p in enumerate(chosen):
            assert [t.tolist() for t in out[2 * i : 2 * i + 2]] == alone[p]

    check()
    seeded = model.generate(prompts[:2], sampling, seeds=[5, 6]).tokens
    assert [t.tolist() for t in seeded[2:]] == [
        t.tolist() for t in model.generate(prompts[1], sampling, seed=6).tokens
    ]
    with pytest.raises(ValueError, match="one seed per prompt"):
        model.generate(prompts[:2], sampling, seeds=[5])


# ------------------------------------------------------------------------------------ 8. traces
RESPONSES = {
    "closed": "<think>First, add 2 and 3. That gives 5. Done.</think>The answer is 5.",
    "unclosed": "<think>First, add 2 and 3. That gives 5. Still",
    "second think": "<think>First, add 2 and 3. That gives 5.</think>Five.<think>again?</think>x",
    "no markers": "Just an answer. With two sentences.",
    "close only": "First, add 2 and 3. That gives 5.</think>Five.",
    "close then think": "First, add 2 and 3. That gives 5.</think>Five.<think>Later, a new thought.</think>x",
}


@pytest.mark.parametrize("name", sorted(RESPONSES))
def test_trace_thinking_and_answer_agree_with_split_thinking(name):
    from mechlens.text.thinking import split_thinking

    model = shared("transformer_lens")
    response = RESPONSES[name]
    trace = ml.ReasoningTrace.from_text(model, "What is 2+3?", response)
    thinking, answer, closed = split_thinking(response)
    assert trace.answer == answer
    if trace.thinking is None:
        assert thinking == "" and not closed
    else:
        assert trace.text[slice(*trace.thinking)].strip("\n") == thinking
    assert {
        "closed": answer == "The answer is 5.",
        "unclosed": answer == "" and not closed,
        "second think": answer == "Five.<think>again?</think>x" and thinking.endswith("gives 5."),
        "no markers": answer == response and thinking == "",
        "close only": answer == "Five." and thinking.startswith("First"),
        "close then think": thinking.startswith("First") and answer.startswith("Five.<think>Later"),
    }[name]


SETTINGS = [
    {"rule": "thought-branches"},
    {"system": "Be brief."},
    {"protect_abbreviations": True},
    {"chat_template": False},
]


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_traces_round_trip_with_their_settings(tmp_path, kwargs):
    model = shared("transformer_lens")
    response = "<think>First, e.g. add 2 and 3. That gives 5. Done now</think>5"
    trace = ml.ReasoningTrace.from_text(model, "What is 2+3?", response, **kwargs)
    trace.save(tmp_path / "t.json")
    back = ml.ReasoningTrace.load(model, tmp_path / "t.json")
    assert [s.text for s in back.sentences] == [s.text for s in trace.sentences]
    assert torch.equal(back.tokens, trace.tokens)


def test_malformed_trace_files_name_the_field(tmp_path):
    model = shared("transformer_lens")
    path = tmp_path / "t.json"
    for content, match in (
        ("[" * 100_000, "not a saved trace"),
        (json.dumps({"prompt": 3, "response": "x", "tokens": []}), "field 'prompt'"),
        (json.dumps({"prompt": "p", "response": "x", "tokens": [], "settings": {"evil": 1}}), "settings"),
    ):
        path.write_text(content)
        with pytest.raises(ValueError, match=match):
            ml.ReasoningTrace.load(model, path)
    from mechlens.cli import main

    path.write_text("[" * 100_000)
    assert main(["anchors", str(path), "--model", "tiny-llama"]) == 2


# ------------------------------------------------------------------------------------ 9. probes
def test_probe_settings_that_would_give_nan_raise():
    X = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1] * 5)
    with pytest.raises(ValueError, match="val_fraction"):
        LinearProbe(val_fraction=0.95).fit(X, y)
    for bad in ({"l2": float("nan")}, {"l2": -1.0}, {"lr": 0.0}, {"max_epochs": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LinearProbe(**bad)
    acts = torch.randn(2, 10, 3)
    for fraction in (0, 1, 0.01):
        with pytest.raises(ValueError, match="test_fraction"):
            probe_sweep(acts, y, test_fraction=fraction)
    sweep = probe_sweep(acts, y, test_fraction=0.4)
    assert np.isfinite(sweep.auroc).all()


# ------------------------------------------------------------------------------------ 10. endpoints
class _Server:
    """A local HTTP server on 127.0.0.1 with a handler function; records what it received."""

    def __init__(self, handle):
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", 0))
                received.append((dict(self.headers), self.rfile.read(length)))
                handle(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _answer(handler, body: bytes, status: int = 200, headers: dict | None = None):
    handler.send_response(status)
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def test_redirects_are_not_followed_and_carry_no_key():
    from mechlens.rollouts import EndpointEngine
    from mechlens.rollouts.endpoint import EndpointError

    target = _Server(lambda h: _answer(h, b'{"choices": []}'))
    source = _Server(lambda h: _answer(h, b"", 307, {"Location": target.url + "/v1/completions"}))
    try:
        engine = EndpointEngine(source.url, "m", api_key="secret-key", retries=0)
        with pytest.raises(EndpointError, match="redirects are not followed"):
            engine.sample([[1, 2]], ml.Sampling(max_new_tokens=2))
        assert source.received and source.received[0][0].get("Authorization") == "Bearer secret-key"
        assert target.received == []
    finally:
        source.close()
        target.close()


def test_the_timeout_bounds_the_whole_request_even_a_trickled_answer():
    from mechlens.rollouts import EndpointEngine
    from mechlens.rollouts.endpoint import EndpointError

    def trickle(h):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(40):
                h.wfile.write(b" ")
                h.wfile.flush()
                time.sleep(0.1)

    server = _Server(trickle)
    try:
        engine = EndpointEngine(server.url, "m", timeout=0.5, retries=0)
        start = time.monotonic()
        with pytest.raises(EndpointError, match="timeout"):
            engine.sample([[1, 2]], ml.Sampling(max_new_tokens=2))
        assert time.monotonic() - start < 2.0
    finally:
        server.close()


def test_endpoint_prompts_outside_the_vocabulary_are_refused():
    from mechlens.rollouts import EndpointEngine

    model = shared("transformer_lens")
    engine = EndpointEngine("http://127.0.0.1:9", "m", tokenizer=model.tokenizer, retries=0)
    sampling = ml.Sampling(max_new_tokens=2)
    for bad, match in (([[1, -1]], "outside"), ([[1, 10**9]], "outside"), ([[True, 2]], "token ids")):
        with pytest.raises((ValueError, TypeError), match=match):
            engine.sample(bad, sampling)


# ------------------------------------------------------------------------------------ 11. cache files
def test_step_names_cannot_leave_the_cache_root(tmp_path):
    store = DiskCache(tmp_path / "root")
    for step in ("../../x", "/abs/step", "a/../../b", "", ".hidden", "a//b"):
        with pytest.raises(ValueError, match="inside the cache root"):
            store.put(step, {"k": 1}, 1)
        with pytest.raises(ValueError, match="inside the cache root"):
            store.cached(step, lambda: 1, k=1)
    assert not (tmp_path / "x").exists() and sorted(os.listdir(tmp_path)) == []
    store.put("ok/nested", {"k": 1}, 5)
    assert store.get("ok/nested", {"k": 1}) == 5


def test_a_fifo_or_link_at_an_entry_is_not_read(tmp_path):
    store = DiskCache(tmp_path)
    path = store.path("step", {"k": 1})
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    start = time.monotonic()
    with pytest.warns(UserWarning, match="not a regular file"):
        assert store.cached("step", lambda: 3, k=1) == 3
    assert time.monotonic() - start < 5
    other = tmp_path / "elsewhere.safetensors"
    store.put("step", {"k": 2}, 4)
    os.replace(store.path("step", {"k": 2}), other)
    os.symlink(other, store.path("step", {"k": 2}))
    with pytest.warns(UserWarning, match="ignoring cache file"):
        assert store.get("step", {"k": 2}) is None


def test_temporaries_of_other_hosts_are_swept_only_when_old(tmp_path):
    mine_dead = tmp_path / f".x.tmp-{socket.gethostname().replace('-', '_')}-999999-abc"
    other_new = tmp_path / ".x.tmp-otherhost-1-abc"
    other_old = tmp_path / ".x.tmp-otherhost-2-abc"
    for p in (mine_dead, other_new, other_old):
        p.write_text("half")
    old = time.time() - 3 * 24 * 3600
    os.utime(other_old, (old, old))
    assert remove_stale_temporaries(tmp_path) == 2
    assert other_new.exists() and not other_old.exists() and not mine_dead.exists()


# ------------------------------------------------------------------------------------ confusing
@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_that_once_failed_deep_inside_now_work_or_name_the_argument(backend):
    model = shared(backend)
    toks = ids()
    out = model.generate("one two", max_new_tokens=3, temperature=1e-40)
    assert (
        out.tokens[0].tolist()
        == model.generate("one two", max_new_tokens=3, temperature=0).tokens[0].tolist()
    )
    with pytest.raises(ValueError, match="layers is empty"):
        ml.logit_lens(model, toks, layers=[])
    with model.add_direction(np.int64(1), unit(model, 0), scale=np.float32(2.0)):
        a = model(toks)
    with model.add_direction(1, unit(model, 0), scale=2.0):
        assert torch.equal(a, model(toks))
    with model.suppress_attention(keys=(np.int64(1), np.int64(4))):
        b = model(toks)
    with model.suppress_attention(keys=(1, 4)):
        assert torch.equal(b, model(toks))
    with model.ablate_heads(np.array([[0, 1], [2, 3]])):
        c = model(toks)
    with model.ablate_heads([(0, 1), (2, 3)]):
        assert torch.equal(c, model(toks))
    with pytest.raises(TypeError, match="scale must be a real number"):
        model.add_direction(1, unit(model, 0), scale="2")


# ------------------------------------------------------------------------------------ audit findings
@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_means_count_real_tokens_of_the_unedited_model(backend):
    model = shared(backend)
    texts = ["a b c d e f g", "h i"]
    toks, mask = model.tokenize(texts)
    _, cache = model.run_with_cache(toks, ["z"], layers=[1], attention_mask=mask)
    want = cache["z"][0][mask.bool()].mean(0)[2]  # [d_head]: head 2, real tokens only
    probe = ids(6, 1)
    with model.ablate_heads([(1, 2)], mode="mean", reference=texts):
        inside = model(probe)
    with model.scale_heads({1: want.new_ones(model.n_heads)}):
        with model.add_direction(0, unit(model, 3), scale=5.0):
            built_inside = model.ablate_heads([(1, 2)], mode="mean", reference=texts)
        with built_inside:
            again = model(probe)
    assert torch.equal(inside, again)  # the means do not depend on the contexts around the call
    ablation = model.active_interventions
    assert ablation == ()
    torch.testing.assert_close(built_inside.item.means[1][2], want, atol=1e-5, rtol=1e-5)


def test_nested_trainable_blocks_restore_flags_in_any_order():
    model = fresh("transformer_lens")
    before = {n: p.requires_grad for n, p in model.hf_model.named_parameters()}
    outer, inner = model.trainable_blocks(1), model.trainable_blocks(2)
    outer_params = outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the outer closes first
    assert all(p.requires_grad for p in inner.gen.gi_frame.f_locals["params"])  # noqa: SLF001
    assert not all(p.requires_grad for p in outer_params)
    inner.__exit__(None, None, None)
    assert {n: p.requires_grad for n, p in model.hf_model.named_parameters()} == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_are_never_passed_on(backend):
    hf, tok = tiny_model("llama")
    model = ml.load_model(hf, backend=backend, tokenizer=tok, dtype=torch.float16)
    with model.scale_heads({1: torch.full((model.n_heads,), 1e6)}):
        with pytest.raises(ValueError, match="not finite"):
            model(ids())
        with pytest.raises(ValueError, match="not finite"):
            model.generate("a b", max_new_tokens=3, temperature=0)
    with pytest.raises(ValueError, match="finite factors"):
        model.scale_heads({1: torch.full((model.n_heads,), float("inf"))})


@pytest.mark.parametrize("backend", BACKENDS)
def test_lens_targets_and_top_k_read_each_rows_own_tokens(backend):
    model = shared(backend)
    rows = [ids(5, 1, 1)[0], ids(8, 1, 2)[0]]
    for side in ("left", "right"):
        toks, mask = padded(model, rows, side)
        lens = ml.logit_lens(model, toks, attention_mask=mask, stats=("target",), targets="next",
                             top_k_positions=[0, -1], k=3)  # fmt: skip
        for b, r in enumerate(rows):
            alone = ml.logit_lens(
                model, r[None], stats=("target",), targets="next", top_k_positions=[0, -1], k=3
            )
            real = mask[b].bool()
            torch.testing.assert_close(lens.target_logprob[:, b][:, real], alone.target_logprob[:, 0],
                                       atol=1e-4, rtol=1e-4, equal_nan=True)  # fmt: skip
            assert torch.equal(lens.top_k_ids[:, b], alone.top_k_ids[:, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_studies_inside_per_row_contexts_keep_each_rows_settings(backend):
    model = shared(backend)
    toks = ids(8, 2)
    metric = lambda logits: logits[:, -1].log_softmax(-1)[:, 9]  # noqa: E731
    per_row = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.5, 1.0, 1.0, 0.0]])
    with model.scale_heads({0: per_row}):
        exact = ml.head_ablation_effects(model, toks, metric, layers=[2], progress=False)
    alone = []
    for b in range(2):
        with model.scale_heads({0: per_row[b]}):
            alone.append(
                ml.head_ablation_effects(model, toks[b : b + 1], metric, layers=[2], progress=False)[2]
            )
    torch.testing.assert_close(exact[2], torch.stack(alone).mean(0), atol=1e-5, rtol=1e-4)
    with model.suppress_attention(keys=[(0, 2), (3, 5)]):
        ml.head_ablation_effects(model, toks, metric, layers=[1], progress=False)


def test_numpy_and_tensor_arguments_mean_what_they_say():
    model = shared("transformer_lens")
    toks = ids()
    full = ml.logit_lens(model, toks, layers=torch.tensor([0, 2]), stats=("entropy",))
    assert full.layers == [0, 2]
    same = ml.logit_lens(model, toks, layers=np.array([0, 2]), stats=("entropy",), chunk=np.int64(4),
                         top_k_positions=[np.int64(0)], k=np.int64(2))  # fmt: skip
    torch.testing.assert_close(same.entropy, full.entropy, atol=1e-5, rtol=1e-5)
    s = ml.Sampling(max_new_tokens=np.int64(3), temperature=np.float32(0.5), n=np.int32(2), seed=np.int64(4))
    assert (type(s.max_new_tokens), type(s.temperature), s.n) == (int, float, 2)
    from mechlens.rollouts import LocalEngine

    engine = LocalEngine(model)
    assert engine.sample([np.array([5, 6, 7])], s) == engine.sample([[5, 6, 7]], s)
    with pytest.raises(TypeError, match="the entry True"):
        engine.sample([[5, True]], s)


# ------------------------------------------------------------------------------------ second audit
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_weights_are_frozen_after_load_under_every_backend(backend, arch):
    model = fresh(backend, arch)
    assert not any(p.requires_grad for p in model.hf_model.parameters())


def test_a_changed_tokenizer_changes_the_cache_key(tmp_path):
    from tokenizers import normalizers

    model = fresh("transformer_lens")
    before = collect_activations(model, ["Hello World"], cache=tmp_path, progress=False)
    model.tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    after = collect_activations(model, ["Hello World"], cache=tmp_path, progress=False)
    assert torch.equal(after, collect_activations(model, ["Hello World"], progress=False))
    assert not torch.equal(before, after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_generated_trace_holds_the_generated_ids(backend, tmp_path):
    model = shared(backend)
    prompt = ml.format_prompt(model.tokenizer, "What is 2+3?")
    generated = model.generate(prompt, max_new_tokens=40, temperature=0).tokens[0]
    trace = ml.ReasoningTrace.from_generation(model, "What is 2+3?", max_new_tokens=40)
    assert trace.tokens[0, trace.prompt_len :].tolist() == generated.tolist()
    assert trace.response == model.tokenizer.decode(generated.tolist())
    trace.save(tmp_path / "t.json")
    assert torch.equal(ml.ReasoningTrace.load(model, tmp_path / "t.json").tokens, trace.tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_reference_given_as_tokenize_output_equals_texts(backend):
    model = shared(backend)
    texts = ["one two three", "a much longer one here"]
    with model.ablate_heads([(1, 2)], mode="mean", reference=texts):
        a = model(ids())
    with model.ablate_heads([(1, 2)], mode="mean", reference=model.tokenize(texts)):
        assert torch.equal(a, model(ids()))
    with pytest.raises(ValueError, match="no attention_mask"):
        model.ablate_heads([(1, 2)], mode="mean", reference=model.to_tokens(texts))


def test_more_arguments_that_failed_deep_inside():
    from mechlens.ops.probes import diff_in_means
    from mechlens.ops.signals import p_true

    model = shared("transformer_lens")
    with pytest.raises(ValueError, match="NaN"):
        diff_in_means(torch.tensor([[0.0, 0], [float("nan"), 0], [2.0, 0]]), [0, 1, 1])
    assert torch.equal(diff_in_means(torch.tensor([[0.0, 0], [2.0, 0]]), torch.tensor([False, True])),
                       torch.tensor([1.0, 0.0]))  # fmt: skip
    with pytest.raises(ValueError, match="batch_size"):
        p_true(model, ["Q?"], ["A"], batch_size=0)
    trace = ml.ReasoningTrace.from_text(
        model, "Q", "First add two and three.\n\nSo it is five.", chat_template=False
    )
    with pytest.raises(ValueError, match="prompt tokens"):
        ml.depth.analyze_trace(model, trace)


def test_probe_settings_from_numpy_save_and_load(tmp_path):
    X = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    y = (X[:, 0] > 0).long()
    probe = LinearProbe(l2=np.float64(1e-3), lr=np.float32(0.05), max_epochs=np.int64(30)).fit(X, y)
    probe.save(tmp_path / "p.pt")
    back = LinearProbe.load(tmp_path / "p.pt")
    assert torch.equal(back.predict_proba(X), probe.predict_proba(X))


def test_cache_values_and_keys_of_numpy_scalars_and_deep_nesting(tmp_path):
    store = DiskCache(tmp_path)
    assert store.cached("s", lambda: {"ok": np.float32(1) > 0}, flag=np.bool_(True)) == {"ok": True}
    assert store.get("s", {"flag": True}) == {"ok": True}  # NumPy scalars key as Python ones
    deep: list = []
    node = deep
    for _ in range(1500):
        node.append([])
        node = node[0]
    with pytest.raises(TypeError, match="nested this deeply"):
        store.put("s", {"k": 1}, deep)
    with pytest.raises(TypeError, match="nested this deeply"):
        store.cached("s", lambda: 1, key=deep)


def test_endpoint_answers_cut_short_or_malformed():
    from mechlens.rollouts import EndpointEngine
    from mechlens.rollouts.endpoint import EndpointError

    ok = json.dumps({"choices": [{"index": 0, "token_ids": [7], "finish_reason": "length"}]}).encode()
    calls = []

    def cut_then_whole(h):
        calls.append(1)
        if len(calls) == 1:  # promises the whole body, sends 5 bytes and closes
            h.send_response(200)
            h.send_header("Content-Length", str(len(ok)))
            h.end_headers()
            h.wfile.write(ok[:5])
            h.close_connection = True
        else:
            _answer(h, ok)

    server = _Server(cut_then_whole)
    bad = _Server(lambda h: _answer(h, json.dumps({"choices": [{"index": None, "token_ids": [7]}]}).encode()))
    try:
        assert EndpointEngine(server.url, "m", retries=1, backoff=0).sample([[5, 6]], ml.Sampling()) == [
            [[7]]
        ]
        with pytest.raises(EndpointError, match="indices"):
            EndpointEngine(bad.url, "m", retries=0).sample([[5, 6]], ml.Sampling())
    finally:
        server.close()
        bad.close()
    with pytest.raises(ValueError, match="timeout must be a finite number"):
        EndpointEngine("http://127.0.0.1:9", "m", timeout=float("inf"))
