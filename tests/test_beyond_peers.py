"""Steering directions, probe-gated steering, sentence patching and depth metrics, each against
a slow reference written by hand on tiny models (both backends, padded batches, generate)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import wrap_with_reference
from test_interventions import blocks, greedy_reference, hooks, ref_logits, resid_hooks

import mechlens as ml
from mechlens.models.sampling import Sampling
from mechlens.ops.distributions import jsd
from mechlens.rollouts import SharedPrefixEngine
from mechlens.studies import depth, patching, steering

ATOL = 1e-5
REPLY = (
    "First I add the two numbers. Wait, that is not what they asked. Then I take one away from it. "
    "Hmm, let me re-check that step. So the result is five.\n"
)


def _trace(model, prompt="What is 2+3?", reply=REPLY):
    return ml.ReasoningTrace.from_text(model, prompt, reply)


def _labels(trace):
    return [
        "wait" if s.text.startswith("Wait") else "hmm" if s.text.startswith("Hmm") else ""
        for s in trace.sentences
    ]


# ------------------------------------------------------------------ steering directions
def test_directions_equal_hand_mean_difference(llama):
    model, _ = llama
    traces = [_trace(model), _trace(model, "What is 4+1?", REPLY.replace("two", "both"))]
    labels = [_labels(t) for t in traces]
    found = steering.behaviour_directions(model, traces, labels, layers=[1, 2], window=2, attribution=False)
    assert found.labels == ["hmm", "wait"] and found.counts == {"hmm": 2, "wait": 2}
    for j, layer in enumerate([1, 2]):
        means, wait = [], []
        for t, row in zip(traces, labels, strict=True):
            _, cache = model.run_with_cache(t.tokens, ["resid_post"], layers=[layer])
            r = cache.at("resid_post", layer)[0]
            for s, lab in zip(t.sentences, row, strict=True):
                m = r[max(0, s.start - 2) : s.start].double().mean(0)
                means.append(m)
                if lab == "wait":
                    wait.append(m)
        want = (torch.stack(wait).mean(0) - torch.stack(means).mean(0)).float()
        torch.testing.assert_close(found.directions[1, j], want, atol=1e-5, rtol=1e-5)
    assert torch.isnan(found.attribution).all()
    with pytest.raises(ValueError, match="attribution"):
        found.best_layer("wait")


def test_direction_attribution_equals_finite_difference(llama):
    """The layer score is d/d alpha of the log-probability of the label's sentences."""
    model, _ = llama
    trace = _trace(model)
    labels = [_labels(trace)]
    found = steering.behaviour_directions(model, [trace], labels, layers=[0, 2])
    s = next(s for s, lab in zip(trace.sentences, labels[0], strict=True) if lab == "wait")

    def logp(layer, alpha):
        with model.add_direction(layer, found.direction("wait", layer), alpha, positions=[s.start - 1]):
            lp = model(trace.tokens)[0].double().log_softmax(-1)
        return sum(float(lp[p, trace.tokens[0, p + 1]]) for p in range(s.start - 1, s.end - 1))

    eps = 1e-3
    for j, layer in enumerate([0, 2]):
        fd = (logp(layer, eps) - logp(layer, -eps)) / (2 * eps)
        assert math.isclose(float(found.attribution[1, j]), fd, rel_tol=2e-2, abs_tol=1e-4)
    assert found.best_layer("wait") == [0, 2][int(found.attribution[1].argmax())]


def test_directions_reject_bad_labels(llama):
    model, _ = llama
    trace = _trace(model)
    with pytest.raises(ValueError, match="labels"):
        steering.behaviour_directions(model, [trace], [["wait"]])
    with pytest.raises(ValueError, match="labels hold no behaviour"):
        steering.behaviour_directions(model, [trace], [[""] * len(trace.sentences)])
    with pytest.raises(ValueError, match="window"):
        steering.behaviour_directions(model, [trace], [_labels(trace)], window=0)


def test_steering_curve_counts_and_pairs_scales(llama):
    model, _ = llama
    kw = Sampling(max_new_tokens=12, temperature=1.0, n=2, seed=3)
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    curve = steering.steering_curve(model, ["Hi there", "A prompt"], direction, 1, [0.0, 0.0, 30.0],
                                    lambda s: True, grade=lambda k, t: k == 0, sampling=kw)  # fmt: skip
    assert curve.replies == [4, 4, 4] and curve.graded == [4, 4, 4] and curve.correct == [2, 2, 2]
    assert curve.texts[0] == curve.texts[1]  # the same seeds at every scale: paired
    assert curve.texts[2] != curve.texts[0]
    with model.add_direction(1, direction, 30.0):
        assert curve.texts[2] == model.generate(["Hi there", "A prompt"], kw).texts
    assert curve.rate[0][0] == curve.with_behaviour[0] / 4
    greedy, prompts = kw.replace(temperature=0), ["Hi there", "A prompt"]
    engine = SharedPrefixEngine(model, "float32")
    scales = [0.0, 30.0]
    fast = steering.steering_curve(model, prompts, direction, 1, scales, bool, sampling=greedy, engine=engine)
    slow = steering.steering_curve(model, prompts, direction, 1, scales, bool, sampling=greedy)
    assert fast.texts == slow.texts  # greedy: the engine steers as the hooked generate does


def test_steering_curve_reads_the_thinking_sentences(llama, monkeypatch):
    """Replies are split into thinking sentences (an unclosed thinking too, when the prompt opened
    it) and the replies with a behaviour sentence counted."""
    model, _ = llama
    replies = [
        "<think>First we add them. Wait, that was wrong here. So it is 5.</think>Answer: 5",
        "<think>First we add them. Then we stop here. So it is 5.</think>Answer: 6",
        "First we add them. Wait, one more thing here. And then more.",  # the prompt opened <think>
    ]
    fake = lambda prompts, sampling, batch_size: ml.Generation(prompts, replies, [], 1)  # noqa: E731
    monkeypatch.setattr(model, "generate", fake)
    prompts = ["q1", "q2", "q3 <think>"]
    wait, right = (lambda s: s.startswith("Wait")), (lambda k, t: t.endswith("5"))
    curve = steering.steering_curve(model, prompts, torch.ones(model.d_model), 1, [0.0], wait, grade=right)
    assert curve.with_behaviour == [2] and curve.replies == [3] and curve.behaviour_sentences == [2]
    assert curve.sentences == [3 + 3 + 3] and curve.correct == [1]  # the unclosed final chunk counts


def test_random_directions_are_a_seeded_distribution():
    d = torch.randn(16)
    a, b = steering.random_directions(d, 20, seed=1), steering.random_directions(d, 20, seed=1)
    assert torch.equal(a, b) and a.shape == (20, 16)
    torch.testing.assert_close(a.norm(dim=1), d.norm().expand(20))
    assert not torch.equal(a, steering.random_directions(d, 20, seed=2))


# ------------------------------------------------------------------ probe-gated steering
def _probe(model):
    w = torch.randn(model.d_model, generator=torch.Generator().manual_seed(5))
    return lambda x: torch.sigmoid(x @ w / x.shape[-1] ** 0.5)


def _gate_hook(model, reference, layer, probe, direction, threshold, scale, start=0):
    """The reference: a forward hook on the block that scores each position and adds by hand."""
    fired = []

    def fn(x):
        score = probe(x.float().reshape(-1, x.shape[-1])).reshape(x.shape[:2])
        n_done = sum(1 for _ in fired)  # positions seen before: a KV-cached step continues them
        pos = torch.arange(x.shape[1]) + (n_done if x.shape[1] == 1 else 0)
        fire = (score < threshold) & (pos >= start)[None]
        fired.append(int(fire.sum()))
        return x + fire[..., None].to(x.dtype) * scale * direction

    return resid_hooks(model, reference, fn, [layer]), fired


def test_gated_equals_hand_hook_forward(llama, tokens):
    model, reference = llama
    probe, d = _probe(model), torch.randn(model.d_model)
    with model.gated(d, 1, probe, 0.5, scale=3.0) as gate:
        got = model(tokens)
    ctx, fired = _gate_hook(model, reference, 1, probe, d, 0.5, 3.0)
    with ctx:
        want = ref_logits(reference, tokens)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert gate.total_fired == sum(fired) > 0 and sum(gate.scored.values()) == tokens.numel()
    assert 0 < gate.total_fired < tokens.numel()  # it gates: some positions, not all


def test_gated_in_generate_equals_hand_hook(llama):
    model, reference = llama
    probe, d = _probe(model), torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))
    ids = model.to_tokens("Hello, this is a test")
    n = ids.shape[1]
    with model.gated(d, 2, probe, 0.1, scale=4.0, start=[n]) as gate:
        got = model.generate(ids, max_new_tokens=8, temperature=0, stop_at_eos=False).tokens[0].tolist()
    assert gate.scored == {0: 7} and 0 < gate.fired[0] < 7  # it gates: some generated tokens, not all

    def hand(x):  # the whole sequence each step (greedy_reference runs without a KV cache)
        score = probe(x.float().reshape(-1, x.shape[-1])).reshape(x.shape[:2])
        fire = (score < 0.1) & (torch.arange(x.shape[1]) >= n)[None]
        return x + fire[..., None].to(x.dtype) * 4.0 * d

    with resid_hooks(model, reference, hand, [2]):
        assert got == greedy_reference(reference, ids, 8)


def test_gated_padded_batch_equals_rows_alone(llama):
    model, _ = llama
    probe, d = _probe(model), torch.randn(model.d_model)
    prompts = ["Hi", "A longer prompt to pad against"]
    starts = [len(model.to_tokens(p)[0]) for p in prompts]
    kw = dict(max_new_tokens=5, temperature=0, stop_at_eos=False)
    with model.gated(d, 1, probe, 0.5, scale=4.0, start=starts) as gate:
        batched = model.generate(prompts, **kw).tokens
    both = dict(gate.fired)
    for i, p in enumerate(prompts):
        with model.gated(d, 1, probe, 0.5, scale=4.0, start=starts[i]) as alone:
            assert batched[i].tolist() == model.generate(p, **kw).tokens[0].tolist()
        assert alone.fired[0] == both[i]


def test_gated_rejects_bad_arguments(llama):
    model, _ = llama
    d = torch.randn(model.d_model)
    with pytest.raises(TypeError, match="probe"):
        model.gated(d, 1, "probe", 0.5)
    with pytest.raises(ValueError, match="threshold"):
        model.gated(d, 1, _probe(model), float("nan"))
    with pytest.raises(TypeError, match="threshold"):  # a wrong type is a TypeError, as in add_direction
        model.gated(d, 1, _probe(model), "0.5")
    with pytest.raises(TypeError, match="scale"):
        model.gated(d, 1, _probe(model), 0.5, scale=True)
    with pytest.raises(ValueError, match="probe must map"):
        model.gated(d, 1, lambda x: x, 0.5)
    with pytest.raises(ValueError, match="start"):
        model.gated(d, 1, _probe(model), 0.5, start=-1)
    with pytest.raises(ValueError, match="layer"):
        model.gated(d, 99, _probe(model), 0.5)
    ids = model.to_tokens(["Hi", "there you"])
    with model.gated(d, 1, _probe(model), 0.5, start=[0, 0, 0]), pytest.raises(ValueError, match="start"):
        model.generate(["Hi", "there you"], max_new_tokens=2)
    with model.gated(d, 1, _probe(model), 0.5, start=[0, 0, 0]), pytest.raises(ValueError, match="start"):
        model(ids)
    nan = lambda x: torch.full(x.shape[:1], float("nan"))  # noqa: E731
    with model.gated(d, 1, nan, 0.5), pytest.raises(ValueError, match="non-finite"):
        model(model.to_tokens("Hi there"))


# ------------------------------------------------------------------ sentence patching
@pytest.mark.parametrize("site", ["resid_post", "z"])
def test_patch_equals_hand_hook(llama, tokens, site):
    model, reference = llama
    shape = (2, model.d_model) if site == "resid_post" else (2, model.n_heads, model.d_head)
    values = torch.randn(*shape)
    with model.patch(1, [3, 7], values, site=site):
        got = model(tokens)
    if site == "resid_post":

        def fn(x):
            x = x.clone()
            x[:, [3, 7]] = values.to(x)
            return x

        ctx = resid_hooks(model, reference, fn, [1])
    else:
        attn = getattr(blocks(model, reference)[1], model.arch.attn_name)
        proj = getattr(attn, model.arch.out_proj_name)

        def pre(mod, args):
            x = args[0].clone()
            x[:, [3, 7]] = values.reshape(2, -1).to(x)
            return (x,)

        ctx = hooks([proj.register_forward_pre_hook(pre)])
    with ctx:
        want = ref_logits(reference, tokens)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_patch_padded_rows_use_their_own_positions(llama):
    model, _ = llama
    texts = ["Hi there you", "A much longer prompt to pad against"]
    ids, mask = model.tokenize(texts)
    values = torch.randn(1, model.d_model)
    with model.patch(2, [1], values):
        batched = model(ids, attention_mask=mask)
        for i, t in enumerate(texts):
            alone = model(model.to_tokens(t))[0]
            row = batched[i][mask[i].bool()]
            torch.testing.assert_close(row, alone, atol=1e-4, rtol=0)


def test_patch_rows_limit_it_to_some_prompts(llama):
    model, _ = llama
    texts = ["Hi there you", "A much longer prompt to pad against"]
    ids, mask = model.tokenize(texts)
    values = torch.randn(1, model.d_model)
    with model.patch(2, [1], values, rows=[1]):
        batched = model(ids, attention_mask=mask)
    plain = model(model.to_tokens(texts[0]))[0]
    with model.patch(2, [1], values):
        patched = model(model.to_tokens(texts[1]))[0]
    torch.testing.assert_close(batched[0][mask[0].bool()], plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(batched[1][mask[1].bool()], patched, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="rows"):
        model.patch(2, [1], values, rows=[])
    with model.patch(2, [1], values, rows=[5]), pytest.raises(ValueError, match="patched rows"):
        model(ids, attention_mask=mask)


def test_continue_prefix_refuses_per_row_contexts_on_the_prefix(llama):
    """A cached prefix is one row for every suffix: a per-row patch or gate on its positions
    would be applied to row 0 only, so it raises; on the suffix's positions it runs."""
    model, _ = llama
    ids = model.to_tokens("A prompt to cache and continue")
    suffix = torch.randint(5, 200, (2, 3), generator=torch.Generator().manual_seed(0))
    values = torch.randn(1, model.d_model)
    with model.patch(0, [1], values, rows=[1]):
        prefix = model.cache_prefix(ids)
        with pytest.raises(ValueError, match="per-row"):
            model.continue_prefix(prefix, suffix)
    prefix = model.cache_prefix(ids)
    n = ids.shape[1]
    with model.gated(torch.randn(model.d_model), 1, _probe(model), 0.5, start=[n, n]):
        got = model.continue_prefix(prefix, suffix)
        want = model(torch.cat([ids.expand(2, -1), suffix], 1))[:, n:]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_patch_sentences_writes_the_aligned_positions(llama):
    model, _ = llama
    source = _trace(model)
    target = _trace(
        model, "What is 4+1?", REPLY.replace("First I add the two numbers", "I begin by adding them up")
    )
    sampling = Sampling(temperature=0, max_new_tokens=5, stop_at_eos=False)
    out = patching.patch_sentences(model, source, target, [(0, 0), (2, 2)], layers=[1, 2], sampling=sampling)
    assert out.positions == [target.sentences[0].end - 1, target.sentences[2].end - 1] and out.cut == 2
    _, cache = model.run_with_cache(source.tokens, ["resid_post"], layers=[2])
    src = cache.at("resid_post", 2)[0]
    values = src[[source.sentences[0].end - 1, source.sentences[2].end - 1]]
    prompt = target.tokens[:, : target.sentences[2].end]
    with model.patch(2, out.positions, values):
        assert out.texts[2] == model.generate(prompt, sampling).texts
    assert out.baseline == model.generate(prompt, sampling).texts
    mean = patching.patch_sentences(
        model, source, target, [(1, 1)], layers=[1], align="mean", sampling=sampling
    )
    t = target.sentences[1]
    assert mean.positions == list(range(t.start, t.end))
    kl = out.answer_kl(lambda text: text[:1])
    assert set(kl) == {1, 2} and all(v >= 0 for v in kl.values())


def test_patch_sentences_rejects_bad_arguments(llama):
    model, _ = llama
    a, b = _trace(model), _trace(model, "Q?", "Short one here. And the second one. Then.\n")
    with pytest.raises(ValueError, match="pair"):
        patching.patch_sentences(model, a, b, [(0, 9)], layers=[1])
    with pytest.raises(ValueError, match="align"):
        patching.patch_sentences(model, a, b, [(0, 0)], layers=[1], align="first")
    with pytest.raises(ValueError, match="equal length"):
        patching.patch_sentences(model, a, b, [(0, 0)], layers=[1], align="position")
    with pytest.raises(ValueError, match="values must be"):
        model.patch(1, [2], torch.zeros(2, model.d_model))
    with pytest.raises(ValueError, match="site"):
        model.patch(1, [2], torch.zeros(1, model.d_model), site="mlp")


# ------------------------------------------------------------------ depth metrics
def test_dtr_equals_direct_full_lens(llama):
    """The deep-thinking ratio from the streaming lens equals one computed from the full
    `[layers, pos, vocab]` distributions of a tiny model."""
    model, _ = llama
    trace = _trace(model)
    got = depth.token_depth(model, trace, ["dtr", "reasoning_score"])
    _, cache = model.run_with_cache(trace.tokens, ["resid_post"])
    logp = torch.stack([model.unembed(cache.at("resid_post", l))[0].float().log_softmax(-1)
                        for l in range(model.n_layers)])  # [layers, pos, vocab]  # fmt: skip
    d = jsd(logp[-1].expand_as(logp), logp)  # [layers, pos]
    for threshold in (0.5, float(d.median())):
        settled = d.cummin(0).values <= threshold
        first = [  # the settling layer, counted 1..L; never settled: L + 1
            int(settled[:, p].nonzero()[0]) + 1 if settled[:, p].any() else model.n_layers + 1
            for p in range(d.shape[1])
        ]
        want = torch.tensor([float(f >= math.ceil(0.85 * model.n_layers)) for f in first])
        torch.testing.assert_close(depth.deep_thinking(d, threshold), want)
    want = depth.deep_thinking(d)
    torch.testing.assert_close(got["dtr"][1:], want[:-1])
    assert math.isnan(float(got["dtr"][0]))
    late = depth.late_layers(model.n_layers)
    torch.testing.assert_close(got["reasoning_score"][1:], d[late].mean(0)[:-1], atol=1e-5, rtol=1e-4)


def test_depth_metric_registry_and_evaluate(llama):
    model, _ = llama
    depth.register_depth_metric("entropy_drop", lambda lens: lens.entropy[0, 0] - lens.entropy[-1, 0],
                                stats=("entropy",), sign=+1)  # fmt: skip
    try:
        trace = _trace(model)
        record = depth.analyze(model, trace, "5", unit="sentence", metrics=["dtr", "entropy_drop"])
        assert set(record["depth_metrics"]) == {"dtr", "entropy_drop"}
        assert 0 <= record["depth_metrics"]["dtr"] <= 1
        records = []
        for k in range(8):
            r = {**record, "label": k % 2, "depth_metrics": {"dtr": k / 10, "entropy_drop": -k}}
            records.append(r)
        result = depth.evaluate(records, folds=2)
        want = ml.stats.auroc([-k / 10 for k in range(8)], [k % 2 for k in range(8)])  # sign -1
        assert result["depth: dtr"]["auroc_a_priori"] == pytest.approx(want)
        assert "depth: entropy_drop" in result
        with pytest.raises(ValueError, match="unknown depth metrics"):
            depth.token_depth(model, trace, ["nope"])
        with pytest.raises(ValueError, match="sign"):
            depth.register_depth_metric("bad", lambda lens: lens.entropy[0, 0], stats=("entropy",), sign=2)
    finally:
        depth.DEPTH_METRICS.pop("entropy_drop", None)


def test_both_backends_agree_on_new_methods(tokens):
    """The gate and the patch give the same logits through either backend."""
    outs = []
    for backend in ("transformer_lens", "nnsight"):
        model, _ = wrap_with_reference("qwen2", backend)
        probe, d = _probe(model), torch.ones(model.d_model)
        with model.gated(d, 1, probe, 0.5, scale=2.0), model.patch(0, [2], torch.ones(1, model.d_model)):
            outs.append(model(tokens))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_generate_hooks_only_the_prompt_when_interventions_stay_inside_it(llama, monkeypatch):
    """A patch (or positioned edit) of prompt positions runs the prompt hooked and the new tokens
    on the plain model: the same tokens as hooking every step, with one hooked forward."""
    model, _ = llama
    prompts = ["Hi there you", "A much longer prompt to pad against"]
    kw = dict(max_new_tokens=6, temperature=1.0, n=2, seed=4, stop_at_eos=False)
    values = torch.randn(2, model.d_model)
    with (
        model.patch(1, [0, 2], values),
        model.add_direction(2, torch.randn(model.d_model), 5.0, positions=[1]),
    ):
        want = model.generate(prompts, path="hooked", **kw).texts
        calls = []
        forward = model.forward
        monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
        got = model.generate(prompts, **kw).texts
    assert got == want and len(calls) == 1
    assert got != model.generate(prompts, **kw).texts  # the patch changed the continuations
    with model.patch(1, [2], values[:1]), model.add_direction(2, torch.randn(model.d_model), 5.0):
        calls.clear()
        model.generate(prompts, **kw)  # a direction at every position: every step is hooked
    assert len(calls) == 6


def test_gate_counts_each_sample_and_the_prompt_once(llama):
    model, _ = llama
    ids = model.to_tokens("Hello, this is a test")
    n = ids.shape[1]
    with model.gated(torch.randn(model.d_model), 1, _probe(model), 0.5, start=n - 2) as gate:
        model.generate(ids, max_new_tokens=4, temperature=1.0, n=3, stop_at_eos=False)
    assert gate.scored == {0: 2 + 3 * 3}  # two prompt tokens once, then 3 forwarded tokens per sample
