"""The logit lens with bf16 unembedding blocks: within tolerance of the float32 lens, and the
`unembed_dtype` option's choices and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import wrap_with_reference

import mechlens as ml
from mechlens.ops import lens as lens_module

STATS = ("entropy", "kl_final", "jsd_final", "top1", "target")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_bf16_blocks_are_close_to_float32(arch, backend, tokens):
    model, _ = wrap_with_reference(arch, backend)
    exact = ml.logit_lens(model, tokens, stats=STATS, targets="next", top_k_positions=[0, 4], k=3)
    low = ml.logit_lens(
        model, tokens, stats=STATS, targets="next", top_k_positions=[0, 4], k=3, unembed_dtype="bfloat16"
    )
    for name in ("entropy", "kl_final", "jsd_final", "top1_prob", "target_logprob", "top_k_probs"):
        a, b = getattr(exact, name), getattr(low, name)
        assert b.dtype == torch.float32 and b.shape == a.shape, name  # statistics stay float32
        torch.testing.assert_close(b, a, atol=0.03, rtol=0.02, equal_nan=True, msg=name)
    assert (exact.top1 == low.top1).float().mean() > 0.95
    assert low.kl_final[-1].abs().max() < 1e-4  # the last layer is still the output itself


def test_lens_from_cache_takes_the_same_option(llama, tokens):
    model, _ = llama
    _, cache = model.run_with_cache(tokens, names=["resid_post"])
    low = lens_module.lens_from_cache(
        model, None, cache, stats=("entropy", "kl_final"), unembed_dtype=torch.bfloat16
    )
    run = ml.logit_lens(model, tokens, stats=("entropy", "kl_final"), unembed_dtype="bfloat16")
    torch.testing.assert_close(low.entropy, run.entropy, atol=1e-4, rtol=0)


def test_auto_is_bf16_only_where_the_cpu_is_fast(llama, tokens, monkeypatch):
    model, _ = llama
    exact = ml.logit_lens(model, tokens, stats=["entropy"])
    monkeypatch.setattr(lens_module, "fast_bf16", lambda device=None: False)
    assert lens_module._unembed_dtype(model, "auto") == torch.float32
    assert torch.equal(
        ml.logit_lens(model, tokens, stats=["entropy"], unembed_dtype="auto").entropy, exact.entropy
    )
    monkeypatch.setattr(lens_module, "fast_bf16", lambda device=None: True)
    assert lens_module._unembed_dtype(model, "auto") == torch.bfloat16
    assert lens_module._unembed_dtype(model, "model") == torch.float32


@pytest.mark.parametrize("bad", ["bf16", torch.float16, 3])
def test_unknown_unembed_dtype_is_named(llama, tokens, bad):
    model, _ = llama
    with pytest.raises(ValueError, match="unembed_dtype"):
        ml.logit_lens(model, tokens, unembed_dtype=bad)
