"""TransformerLens backend: the `Backend` protocol on a TransformerLens 4 `TransformerBridge`.

Interventions and captures are hook functions on the bridge's standard hook points
(`blocks.{l}.attn.hook_z`, `hook_attn_scores`, `hook_pattern`, `blocks.{l}.hook_resid_pre/post`).
Booting the bridge replaces the HF model's modules in place: wrap a model you own.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama", backend="transformer_lens")
    >>> model.backend.bridge.cfg.n_layers == model.n_layers
    True
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from mechlens.models.architecture import Architecture
from mechlens.models.interventions import Positions
from mechlens.models.protocol import RunOutput, RunRequest, only_blocks_from

_HOOK_NAMES = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_post": "blocks.{}.hook_resid_post",
    "pattern": "blocks.{}.attn.hook_pattern",
    "z": "blocks.{}.attn.hook_z",
}


class TransformerLensBackend:
    """Interventions and captures as hook functions on the bridge's hook points."""

    name = "transformer_lens"

    def __init__(self, hf_model: nn.Module, tokenizer, arch: Architecture, model_name: str):
        from transformer_lens.model_bridge import TransformerBridge

        self.hf_model, self.arch = hf_model, arch

        # The bridge re-loads a tokenizer without add_bos_token from its hub id (a download);
        # a copy that already says add_bos_token keeps ours. mechlens tokenises itself.
        bridge_tok = copy.copy(tokenizer)
        bridge_tok.init_kwargs = {
            **tokenizer.init_kwargs,
            "add_bos_token": True,
            "name_or_path": tokenizer.name_or_path or "local",
        }
        self.bridge = TransformerBridge.boot_transformers(model_name, hf_model=hf_model, tokenizer=bridge_tok)
        self.bridge.eval()

    def run(self, req: RunRequest) -> RunOutput:
        tokens, capture, pos, stop_after = req.tokens, req.capture, req.pos, req.stop_after
        iv = req.interventions
        acts: dict[str, dict[int, Tensor]] = {name: {} for name in capture}
        hooks = []
        first = req.start_at or 0
        for layer in range(first, self.arch.n_layers if stop_after is None else stop_after + 1):
            if iv.touches_scores(layer):
                hooks.append((f"blocks.{layer}.attn.hook_attn_scores", _edit(iv.scores, layer, pos)))
            if iv.touches_z(layer):
                hooks.append((f"blocks.{layer}.attn.hook_z", _edit(iv.z, layer, pos)))
            if iv.touches_resid(layer):
                hooks.append((f"blocks.{layer}.hook_resid_post", _edit(iv.resid, layer, pos)))
            for name, layers in capture.items():
                if layer in layers:
                    hooks.append((_HOOK_NAMES[name].format(layer), _store(req, acts, name, layer)))
        if stop_after is not None:  # after the captures of that layer (hooks run in order)
            hooks.append((_HOOK_NAMES["resid_post"].format(stop_after), _stop))
        kwargs: dict[str, Any] = {"attention_mask": req.attention_mask, "position_ids": req.position_ids}
        with self.bridge.hooks(fwd_hooks=hooks):
            try:
                if req.start_at is not None:  # blocks start_at.. only, from the residual
                    with only_blocks_from(self.hf_model, self.arch, req.start_at):
                        logits = self.bridge(req.resid_in, start_at_layer=req.start_at, **kwargs)
                    return RunOutput(logits, acts)
                if req.use_cache:
                    logits, past = self.bridge(
                        tokens,
                        return_type="logits_and_cache",
                        past_key_values=req.past_key_values,
                        **kwargs,
                    )
                    return RunOutput(logits, acts, past)
                return RunOutput(self.bridge(tokens, **kwargs), acts)
            except _Stopped:
                return RunOutput(None, acts)


class _Stopped(Exception):
    """Raised by the hook after the last wanted layer, so that nothing above it runs.

    The bridge's own `stop_at_layer` stops at the entry of a block and so never skips the final
    norm and unembedding when the last wanted layer is the top one."""


def _stop(tensor: Tensor, hook) -> None:
    raise _Stopped


def _edit(fn, layer: int, pos: Positions):
    def hook(tensor: Tensor, hook) -> Tensor:
        return fn(layer, tensor, pos)

    return hook


def _store(req: RunRequest, acts: dict[str, dict[int, Tensor]], name: str, layer: int):
    def hook(tensor: Tensor, hook) -> None:
        acts[name][layer] = req.keep(name, layer, tensor)

    return hook
