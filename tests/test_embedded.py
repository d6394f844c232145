"""The embedded SmolLM2-135M-Instruct: both backends equal raw transformers (slow: loads weights)."""

from __future__ import annotations

import pytest
import torch

import mechlens as ml

pytestmark = pytest.mark.slow
TEXT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital is"


def test_dims(embedded_tl):
    m = embedded_tl
    assert (m.n_layers, m.n_heads, m.d_model, m.d_head, m.d_vocab) == (30, 9, 576, 64, 49152)
    assert m.arch.n_kv_heads == 3


@pytest.mark.parametrize("which", ["embedded_tl", "embedded_nnsight"])
def test_backend_equals_hf(which, request, embedded_hf):
    model = request.getfixturevalue(which)
    toks = model.to_tokens(TEXT)
    with torch.no_grad():
        out = embedded_hf(toks, output_hidden_states=True, output_attentions=True)
    logits, cache = model.run_with_cache(toks, ["resid_post", "pattern"], layers=[0, 14, 29])
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(cache.at("resid_post", 14), out.hidden_states[15], atol=1e-4, rtol=0)
    torch.testing.assert_close(cache.at("pattern", 29), out.attentions[29], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.unembed(cache.at("resid_post", 29)), out.logits, atol=1e-4, rtol=0)
    assert model.tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_backends_agree_under_interventions(embedded_tl, embedded_nnsight, embedded_hf):
    toks = embedded_tl.to_tokens(TEXT)
    outs = []
    for m in (embedded_tl, embedded_nnsight):
        with m.ablate_heads([(10, 3), (20, 8)]), m.suppress_attention(keys=(5, 12), layers=range(10, 20)):
            outs.append(m(toks))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=0)
    # and the head ablation alone against a plain pre-hook on o_proj
    handle = embedded_hf.model.layers[10].self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args: (
            torch.cat([args[0][..., :192], torch.zeros_like(args[0][..., 192:256]), args[0][..., 256:]], -1),
        )
    )
    try:
        with torch.no_grad():
            want = embedded_hf(toks).logits
    finally:
        handle.remove()
    with embedded_nnsight.ablate_heads([(10, 3)]):
        torch.testing.assert_close(embedded_nnsight(toks), want, atol=1e-4, rtol=0)


def test_generate_greedy_matches_hf(embedded_tl, embedded_hf):
    prompt = ml.format_prompt(embedded_tl.tokenizer, "What is 2+3?")
    ours = embedded_tl.generate(prompt, max_new_tokens=12, temperature=0).tokens[0].tolist()
    toks = embedded_tl.to_tokens(prompt)
    hf = embedded_hf.generate(toks, max_new_tokens=12, do_sample=False)[0, toks.shape[1] :].tolist()
    assert ours == hf[: len(ours)]


def test_warm_load_is_fast():
    import time

    ml.load_model()  # makes sure the converted weights exist
    start = time.perf_counter()
    ml.load_model(backend="nnsight")
    assert time.perf_counter() - start < 30


def test_lens_matches_hf_on_embedded(embedded_nnsight, embedded_hf):
    from lens_reference import jsd_plain, reference_logprobs

    model = embedded_nnsight
    toks = model.to_tokens(TEXT)
    lens = ml.logit_lens(model, toks, layers=[3, 15, 29], stats=("entropy", "kl_final", "jsd_final", "top1"))
    logp = reference_logprobs(model, embedded_hf, toks)
    for i, l in enumerate([3, 15, 29]):
        torch.testing.assert_close(lens.entropy[i], -(logp[l].exp() * logp[l]).sum(-1), atol=2e-4, rtol=0)
        kl = (logp[-1].exp() * (logp[-1] - logp[l])).sum(-1)
        torch.testing.assert_close(lens.kl_final[i], kl, atol=2e-4, rtol=0)
        want = jsd_plain(logp[-1], logp[l])
        torch.testing.assert_close(lens.jsd_final[i].double(), want, atol=2e-4, rtol=0)
        assert torch.equal(lens.top1[i], logp[l].argmax(-1))


def test_conditional_entropy_with_merging_tokenizer(embedded_tl):
    from mechlens.ops.signals import conditional_entropy_per_step

    trace = ml.ReasoningTrace.from_text(
        embedded_tl, "Symbol of gold?", "Gold is a metal.\n\nIts symbol is Au."
    )
    h = conditional_entropy_per_step(embedded_tl, trace, "Au")  # "is " + "Au" tokenises as "is", " Au"
    assert h.shape == (len(trace.sentences) + 1,) and torch.isfinite(h).all()


def test_converted_folder_is_a_checkpoint_other_readers_load(embedded_hf):
    """vLLM and other readers take the model class from `architectures` and the tied embedding
    from its own name (they ignore safetensors' alias metadata)."""
    import json

    from safetensors import safe_open

    from mechlens.models.loading import embedded_weights_dir

    folder = embedded_weights_dir()
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
        embed = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(embed, embedded_hf.get_input_embeddings().weight.detach())


def test_folders_of_earlier_releases_are_repaired(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from mechlens.models.loading import _repair_weights_dir

    head = torch.randn(8, 4)
    weights = {"lm_head.weight": head, "model.norm.weight": torch.ones(4)}
    save_file(
        weights, str(tmp_path / "model.safetensors"), metadata={"model.embed_tokens.weight": "lm_head.weight"}
    )
    (tmp_path / "config.json").write_text(json.dumps({"architectures": None, "tie_word_embeddings": True}))
    _repair_weights_dir(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["model.embed_tokens.weight", "model.norm.weight"]
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), head)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not list(tmp_path.glob(".*tmp"))
