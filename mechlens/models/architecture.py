"""Where the standard parts (blocks, attention, output projection, final norm, unembedding) live
inside a Hugging Face causal LM, and its dimensions.

One naming over every supported family (Llama, Qwen2/3, Mistral, Gemma, GPT-2, GPT-NeoX), in the
spirit of nnterp's standardized transformer: methods never see a family-specific path.

Example:
    >>> from mechlens.models.tiny import tiny_model
    >>> hf, tok = tiny_model("gpt2")
    >>> Architecture.of(hf).layers_path
    'transformer.h'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
_ATTN_NAMES = ("self_attn", "attn", "attention")
_OUT_PROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj")
_NORM_PATHS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.norm")
_HEAD_PATHS = ("lm_head", "embed_out")


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """`root.get_submodule(path)`, or None when the path does not exist."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def require_submodule(root: nn.Module, path: str) -> Any:
    """`root.get_submodule(path)`; `ValueError` naming the path when it does not exist."""
    module = get_submodule(root, path)
    if module is None:
        raise ValueError(f"{type(root).__name__} has no submodule {path!r}")
    return module


@dataclass(frozen=True)
class Architecture:
    """Module paths and dimensions of one HF causal LM."""

    layers_path: str
    attn_name: str
    out_proj_name: str
    norm_path: str
    head_path: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    d_mlp: int
    logit_softcap: float | None
    out_proj_transposed: bool = False  # GPT-2's Conv1D stores the weight as [in, out]

    @classmethod
    def of(cls, hf_model: nn.Module) -> Architecture:
        """Resolve the architecture of `hf_model`; raise ValueError naming what is supported."""
        layers_path = next((p for p in _LAYER_PATHS if get_submodule(hf_model, p) is not None), None)
        if layers_path is None:
            raise ValueError(
                f"{type(hf_model).__name__}: no transformer block list found; supported layouts "
                f"put blocks at one of {_LAYER_PATHS}"
            )
        block0 = require_submodule(hf_model, layers_path)[0]
        attn_name = next((n for n in _ATTN_NAMES if hasattr(block0, n)), None)
        if attn_name is None:
            raise ValueError(f"block {type(block0).__name__} has none of {_ATTN_NAMES}")
        attn = getattr(block0, attn_name)
        out_proj_name = next((n for n in _OUT_PROJ_NAMES if hasattr(attn, n)), None)
        norm_path = next((p for p in _NORM_PATHS if get_submodule(hf_model, p) is not None), None)
        head_path = next((p for p in _HEAD_PATHS if get_submodule(hf_model, p) is not None), None)
        if out_proj_name is None or norm_path is None or head_path is None:
            raise ValueError(
                f"{type(hf_model).__name__}: could not find the attention output projection "
                f"({_OUT_PROJ_NAMES}), final norm ({_NORM_PATHS}) or unembedding ({_HEAD_PATHS})"
            )
        config: Any = hf_model.config
        cfg = config.get_text_config()
        n_heads = _first_attr(cfg, "num_attention_heads", "n_head")
        d_model = _first_attr(cfg, "hidden_size", "n_embd")
        d_head = getattr(cfg, "head_dim", None) or d_model // n_heads
        return cls(
            layers_path=layers_path,
            attn_name=attn_name,
            out_proj_name=out_proj_name,
            norm_path=norm_path,
            head_path=head_path,
            n_layers=_first_attr(cfg, "num_hidden_layers", "n_layer"),
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            d_model=d_model,
            d_head=d_head,
            d_vocab=cfg.vocab_size,
            n_ctx=_first_attr(cfg, "max_position_embeddings", "n_positions"),
            d_mlp=getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d_model,
            logit_softcap=getattr(cfg, "final_logit_softcapping", None),
            out_proj_transposed=type(getattr(attn, out_proj_name)).__name__ == "Conv1D",
        )


def _first_attr(cfg, *names: str) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"config {type(cfg).__name__} has none of {names}")
