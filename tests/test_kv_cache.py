"""`reserved_cache`: the same keys and values as `DynamicCache`, within the reserved length and
past it, and after a crop; a chunked forward over it equals one forward."""

from __future__ import annotations

import torch
from transformers import DynamicCache

import mechlens as ml
from mechlens.models.kv_cache import ReservedLayer, reserved_cache


def test_reserved_cache_matches_dynamic_cache_past_capacity_and_after_a_crop():
    model = ml.load_model("tiny-llama")
    config = model.hf_model.config
    ours, theirs = reserved_cache(config, 7), DynamicCache(config=config)
    assert all(isinstance(layer, ReservedLayer) for layer in ours.layers)
    torch.manual_seed(0)
    for step, n in enumerate([3, 4, 2, 1]):  # 3 + 4 fill the buffer, 2 more spill past it
        k, v = torch.randn(2, 2, n, 4), torch.randn(2, 2, n, 4)
        a, b = ours.update(k, v, 0), theirs.update(k, v, 0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), step
        if step == 1:
            ours.crop(-2), theirs.crop(-2)  # a crop leaves the buffer: later updates concatenate
    assert ours.get_seq_length() == theirs.get_seq_length() == 8


def test_chunked_forward_on_reserved_buffers_equals_one_forward():
    model = ml.load_model("tiny-llama")
    toks = torch.randint(3, 200, (2, 23))
    full = model.forward(toks, capture={"resid_post": [1]})
    parts = [
        out.acts["resid_post"][1]
        for _, out in model.forward_chunks(toks, chunk_size=5, capture={"resid_post": [1]})
    ]
    torch.testing.assert_close(torch.cat(parts, 1), full.acts["resid_post"][1], atol=1e-5, rtol=1e-5)
