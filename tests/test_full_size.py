"""DeepSeek-R1-Distill-Qwen-7B's architecture and tokenizer (`mechlens.models.full_size`).

Fast: the builder at reduced width against transformers' own `Qwen2ForCausalLM`, seeded weights,
the GGUF metadata reader on hand-written files, and (where `make r1-header` installed the header)
the real tokenizer, its template and `<think>` spans. Analyses at the real vocabulary never hold
`[pos, vocab]` or `[layers, heads, pos, pos]` (reduced width). Marked `scale` (`make test-scale`,
not `make test`): one 4k-token lens and one suppression column on the full-size model.
"""

from __future__ import annotations

import struct

import pytest
import torch
from conftest import BACKENDS
from torch.utils._python_dispatch import TorchDispatchMode

import mechlens as ml
from mechlens.models.full_size import (
    R1_QWEN2,
    R1_RANDOM,
    THINK_GENERATION_PROMPT,
    model_bytes,
    r1_config,
    r1_header,
    r1_tokenizer,
    random_causal_lm,
    read_gguf_metadata,
)
from mechlens.models.protocol import CACHE_NAMES
from mechlens.text import format_prompt, split_thinking

SMALL_VOCAB = dict(vocab_size=300, pad_token_id=0, bos_token_id=1, eos_token_id=2)
REDUCED = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
)


def header_or_skip():
    try:
        return r1_header()
    except ValueError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def tok():
    header_or_skip()
    return r1_tokenizer()


# ---------------------------------------------------------------------------------------- builder
def test_reduced_width_builder_has_qwen2s_modules_and_shapes():
    from transformers import Qwen2ForCausalLM

    config = r1_config(**REDUCED)
    ours = random_causal_lm(config, seed=1)
    theirs = Qwen2ForCausalLM(config)
    assert type(ours) is Qwen2ForCausalLM
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [
        (n, p.shape) for n, p in theirs.named_parameters()
    ]
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert model_bytes(config) == sum(p.numel() * 2 for p in ours.parameters())
    for name, p in ours.named_parameters():
        if "norm" in name:
            assert (p == 1).all(), name
        elif p.numel() >= 1000:
            assert 0.019 < p.float().std() < 0.021, name  # initializer_range 0.02


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduced_width_builder_has_the_same_hook_names_and_shapes(backend):
    from transformers import Qwen2ForCausalLM

    from mechlens.models.tiny import tiny_tokenizer

    config = r1_config(**REDUCED, **SMALL_VOCAB)
    ours = ml.load_model(random_causal_lm(config), backend=backend, tokenizer=tiny_tokenizer())
    theirs = ml.load_model(Qwen2ForCausalLM(config).bfloat16(), backend=backend, tokenizer=tiny_tokenizer())
    toks = torch.tensor([[5, 6, 7, 8, 9]])
    _, a = ours.run_with_cache(toks, list(CACHE_NAMES))
    _, b = theirs.run_with_cache(toks, list(CACHE_NAMES))
    assert sorted(a) == sorted(b) == sorted(CACHE_NAMES)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert (ours.n_layers, ours.n_heads, ours.d_model, ours.d_head) == (3, 4, 64, 16)


def test_full_size_config_and_bytes_match_the_7b():
    with torch.device("meta"):
        from transformers import Qwen2ForCausalLM

        meta = Qwen2ForCausalLM(r1_config())
    n = sum(p.numel() for p in meta.parameters())
    assert 7.6e9 < n < 7.62e9  # 7,615,616,512 parameters
    assert model_bytes(r1_config()) == 2 * n
    assert model_bytes(r1_config(), torch.float32) == 4 * n


def test_weights_follow_the_seed():
    config = r1_config(**REDUCED, **SMALL_VOCAB)
    a, b, c = (random_causal_lm(config, seed=s) for s in (0, 0, 1))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name


def test_weights_that_do_not_fit_raise_naming_the_dtype(monkeypatch):
    import psutil

    class Little:
        available = 20 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Little())
    with pytest.raises(ValueError, match=r"30\.5 GB in torch.float32.*dtype='bfloat16'"):
        random_causal_lm(r1_config(), dtype=torch.float32)


def test_load_model_by_name_refuses_float32_where_it_does_not_fit(monkeypatch):
    import psutil

    header_or_skip()

    class Little:
        available = 20 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Little())
    with pytest.raises(ValueError, match="dtype='bfloat16'"):
        ml.load_model(R1_RANDOM)  # float32 by default: 30.5 GB


def test_config_overrides_are_checked():
    with pytest.raises(ValueError, match="unknown Qwen2Config fields: \\['hiden_size'\\]"):
        r1_config(hiden_size=64)


# ------------------------------------------------------------------------------------ GGUF reader
def _gguf(path, entries, cut=None):
    """A GGUF v3 file with metadata `entries` [(key, type, value)] and no tensors."""

    def s(text):
        data = text.encode()
        return struct.pack("<Q", len(data)) + data

    body = b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries))
    for key, kind, value in entries:
        body += s(key) + struct.pack("<I", kind)
        if kind == 8:
            body += s(value)
        elif kind == 9:
            item, items = value
            body += struct.pack("<IQ", item, len(items))
            body += b"".join(s(v) if item == 8 else struct.pack("<i", v) for v in items)
        else:
            body += struct.pack({4: "<I", 6: "<f", 7: "<?"}[kind], value)
    path.write_bytes(body[:cut] + b"\x00" * 64 if cut is None else body[:cut])
    return path


def test_gguf_metadata_reader_reads_scalars_strings_and_arrays(tmp_path):
    f = _gguf(tmp_path / "m.gguf", [
        ("general.architecture", 8, "qwen2"), ("qwen2.block_count", 4, 28), ("eps", 6, 0.5),
        ("flag", 7, True), ("tokens", 9, (8, ["a", "<think>", "é"])), ("types", 9, (5, [1, 4, -3])),
    ])  # fmt: skip
    meta = read_gguf_metadata(f)
    assert meta == {"general.architecture": "qwen2", "qwen2.block_count": 28, "eps": 0.5, "flag": True,
                    "tokens": ["a", "<think>", "é"], "types": [1, 4, -3]}  # fmt: skip


def test_gguf_metadata_reader_refuses_other_and_cut_files(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_metadata(tmp_path / "x.gguf")
    cut = _gguf(tmp_path / "cut.gguf", [("tokens", 9, (8, ["abc", "def"]))], cut=40)
    with pytest.raises(ValueError, match="ends inside its metadata"):
        read_gguf_metadata(cut)


# -------------------------------------------------------------------------------- real tokenizer
def test_header_states_the_7b_architecture():
    meta = read_gguf_metadata(header_or_skip())
    assert meta["general.architecture"] == "qwen2"
    keys = {
        "hidden_size": "qwen2.embedding_length",
        "intermediate_size": "qwen2.feed_forward_length",
        "num_hidden_layers": "qwen2.block_count",
        "num_attention_heads": "qwen2.attention.head_count",
        "num_key_value_heads": "qwen2.attention.head_count_kv",
        "rope_theta": "qwen2.rope.freq_base",
    }
    assert {k: meta[v] for k, v in keys.items()} == {k: R1_QWEN2[k] for k in keys}
    assert len(meta["tokenizer.ggml.tokens"]) == R1_QWEN2["vocab_size"]
    assert abs(meta["qwen2.attention.layer_norm_rms_epsilon"] - R1_QWEN2["rms_norm_eps"]) < 1e-9


def test_real_tokenizer_ids_and_special_tokens(tok):
    assert len(tok) == 152064
    ids = tok.encode("Hello world! 12 + 18 = 30.")
    assert ids[:3] == [151646, 9707, 1879]  # BOS, "Hello", " world"
    assert tok.convert_ids_to_tokens(ids)[5:7] == ["1", "2"]  # digits one at a time
    special = {"<｜begin▁of▁sentence｜>": 151646, "<｜end▁of▁sentence｜>": 151643, "<｜User｜>": 151644,
               "<｜Assistant｜>": 151645, "<think>": 151648, "</think>": 151649}  # fmt: skip
    for text, i in special.items():
        assert tok.encode(text, add_special_tokens=False) == [i], text
    assert (tok.bos_token_id, tok.eos_token_id) == (151646, 151643)


@pytest.mark.parametrize(
    "text",
    ["<think>\nOkay, so 12 + 18 is 30. Wait, let me check.\n</think>\n\nThe answer is $\\boxed{30}$.",
     "Ça coûte 3,50 €.  Tabs\there,\n\nnew lines\r\n", "数学题：七加五等于十二。", "emoji 🤔 and  spaces  "],
)  # fmt: skip
def test_real_tokenizer_round_trips(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert all(0 <= i < 152064 for i in ids)


def test_real_template_opens_the_thinking(tok):
    prompt = format_prompt(tok, "What is 7 + 5?")
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>What is 7 + 5?" + THINK_GENERATION_PROMPT
    as_stored = r1_tokenizer(template="header")
    assert format_prompt(as_stored, "What is 7 + 5?").endswith("<｜Assistant｜>")
    # the response starts inside the thinking: split_thinking reads it with opened=True
    reply = "7 + 5 = 12. That is it.\n</think>\n\nThe answer is 12."
    assert split_thinking(reply, opened=True) == ("7 + 5 = 12. That is it.", "The answer is 12.", True)
    with pytest.raises(ValueError, match="template must be"):
        r1_tokenizer(template="new")


def test_trace_spans_on_r1_text(tok):
    hf = random_causal_lm(r1_config(**REDUCED))
    model = ml.load_model(hf, tokenizer=tok)
    thinking = "First, 7 + 5 is 12. Wait, let me check that again. Yes, 12 is right."
    trace = ml.ReasoningTrace.from_text(model, "What is 7 + 5?", thinking, rule="thought-branches")
    assert model.to_string(trace.tokens[0, : trace.prompt_len]).endswith("<｜Assistant｜><think>\n")
    texts = [s.text for s in trace.sentences]
    assert texts == ["First, 7 + 5 is 12.", "Wait, let me check that again.", "Yes, 12 is right."]
    for s in trace.sentences:  # each span's tokens decode to its sentence
        assert tok.decode(trace.tokens[0, s.start : s.end]).strip() == s.text


# ------------------------------------------------------------------------------------- streaming
class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an operation returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_analyses_at_the_real_vocabulary_never_hold_pos_by_vocab():
    """At 2048 positions and 152,064 tokens, [pos, vocab] is 311M elements; each analysis keeps to
    chunks (lens, score, suppression: `chunk` rows of the vocabulary at a time)."""
    from mechlens import anchors, depth
    from mechlens.models.tiny import tiny_tokenizer

    hf = random_causal_lm(r1_config(**{**REDUCED, "num_hidden_layers": 4}))
    model = ml.load_model(hf, tokenizer=tiny_tokenizer(), dtype="bfloat16")
    text = " ".join(f"Step {i} adds {i} to the total and checks it." for i in range(48))
    trace = ml.ReasoningTrace.from_text(model, "Add.", text, rule="thought-branches")
    pos = trace.n_tokens
    assert pos > 2000
    pos_vocab, layers_heads_pos_pos = pos * 152064, 4 * 4 * pos * pos
    with torch.no_grad(), LargestTensor() as seen:  # the instrument sees a forward's whole logits
        model(trace.tokens)
    assert seen.numel >= pos_vocab
    calls = {
        "lens": lambda: ml.logit_lens(model, trace.tokens, stats=("entropy", "kl_final"), chunk=256),
        "score": lambda: depth.reasoning_score(model, trace, unit="sentence"),
        "attention": lambda: anchors.sentence_attention(model, trace, chunk=256),
        "suppression": lambda: anchors.suppression_matrix(model, trace, sources=[0], chunk=256),
    }
    for name, call in calls.items():
        with torch.no_grad(), LargestTensor() as seen:
            call()
        assert seen.numel < pos_vocab / 4, (name, seen.numel, pos_vocab)
        assert seen.numel < layers_heads_pos_pos, (name, seen.numel, layers_heads_pos_pos)


# ---------------------------------------------------------------------------------- full size
@pytest.mark.scale
def test_full_size_lens_and_suppression_at_4k_stay_within_memory():
    """The full-size random model (15.2 GB): a 4k-token lens within 1.5 GB of peak growth and one
    suppression column within 3 GB (`benchmarks/scale.py` measures the table)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from common import PeakMemory
    from long_trace import build_trace

    from mechlens import anchors

    header_or_skip()
    model = ml.load_model(R1_RANDOM, dtype="bfloat16")
    assert (model.n_layers, model.n_heads, model.d_model, model.d_vocab) == (28, 28, 3584, 152064)
    trace = build_trace(model, 4096)
    assert 3900 < trace.n_tokens <= 4096
    torch.set_grad_enabled(False)
    with PeakMemory() as lens_mem:
        lens = ml.logit_lens(model, trace.tokens, stats=("entropy", "kl_final"), unembed_dtype="auto")
    assert lens.entropy is not None and torch.isfinite(lens.entropy).all()
    assert lens_mem.extra_mb < 1536, lens_mem.extra_mb
    with PeakMemory() as column_mem:
        column = anchors.suppression_matrix(model, trace, sources=[0])
    assert torch.isfinite(column[1:, 0]).all()
    assert column_mem.extra_mb < 3072, column_mem.extra_mb


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_head_sweep_runs_in_passes_that_fit_the_budget(backend):
    """The exact sweep ablates as many heads per pass as `model.memory_budget` holds: the same
    effects in one pass or in eight, and no pass holds every head's attention at once."""
    from mechlens.models.tiny import tiny_model
    from mechlens.ops.heads import head_ablation_effects

    hf, tok = tiny_model("qwen2", n_heads=8, d_model=64)
    model = ml.load_model(hf, backend=backend, tokenizer=tok)
    toks = torch.randint(10, 200, (2, 96), generator=torch.Generator().manual_seed(0))

    def metric(logits):
        return logits[:, -1].logsumexp(-1)

    whole = head_ablation_effects(model, toks, metric, positions=[-1], progress=False)
    one_copy = model.check_memory((2, 96), {}, logits=False)
    model.memory_budget = one_copy  # one head (one copy of the batch) per pass
    with LargestTensor() as seen:
        passes = head_ablation_effects(model, toks, metric, positions=[-1], progress=False)
    torch.testing.assert_close(passes, whole, rtol=1e-5, atol=1e-5)
    every_head_at_once = 8 * 2 * 8 * 96 * 96  # [heads x batch rows, heads, pos, pos]
    assert seen.numel < every_head_at_once / 4, seen.numel


def test_attribution_refuses_a_backward_pass_past_the_budget():
    from mechlens.models.tiny import tiny_model
    from mechlens.ops.heads import head_ablation_effects

    hf, tok = tiny_model("llama")
    model = ml.load_model(hf, tokenizer=tok)
    toks = torch.randint(10, 200, (1, 64))
    model.memory_budget = 10_000
    with pytest.raises(ValueError, match=r"attribution over 1 x 64 tokens keeps about .*model.memory_budget"):
        head_ablation_effects(model, toks, lambda x: x[:, -1, 0], method="attribution")
