"""nnsight backend: the `Backend` protocol on an nnsight `TransformersModel`.

Interventions edit envoy values inside one trace, in forward order per block: the attention mask
handed to the attention module (suppression), the input of the attention output projection (head
outputs z), the block output (directions). Captures read the same places.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama", backend="nnsight")
    >>> type(model.backend.lm).__name__
    'TransformersModel'
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mechlens.models.architecture import Architecture
from mechlens.models.interventions import Interventions, Positions
from mechlens.models.protocol import RunOutput, RunRequest, only_blocks_from


class NNsightBackend:
    """Interventions and captures as edits and saves of envoy values inside one nnsight trace."""

    name = "nnsight"

    def __init__(self, hf_model: nn.Module, tokenizer, arch: Architecture, model_name: str):
        from nnsight import TransformersModel

        self.hf_model, self.arch = hf_model, arch
        self.lm = TransformersModel(hf_model, tokenizer=tokenizer)

    def run(self, req: RunRequest) -> RunOutput:
        tokens, capture, pos, stop_after = req.tokens, req.capture, req.pos, req.stop_after
        iv = req.interventions
        arch = self.arch
        layers = _envoy(self.lm, arch.layers_path)
        last = arch.n_layers - 1 if stop_after is None else stop_after
        n_heads, d_head = arch.n_heads, arch.d_head
        kwargs: dict[str, Any] = {
            "attention_mask": req.attention_mask,
            "position_ids": req.position_ids,
            "use_cache": req.use_cache,
        }
        if req.past_key_values is not None:
            kwargs["past_key_values"] = req.past_key_values
        first = req.start_at or 0
        with (
            only_blocks_from(self.hf_model, arch, first) as skipped,
            self.lm.trace(tokens, **kwargs) as tracer,
        ):
            found: Any = list().save()  # type: ignore[attr-defined]  # nnsight adds save() in a trace
            for layer in range(first if skipped else 0, last + 1):
                block = layers[layer]
                attn = getattr(block, arch.attn_name)
                if layer == req.start_at:  # replaces the embeddings or the output of the blocks below
                    args, kw = block.inputs
                    if args:
                        args = (req.resid_in, *args[1:])
                    else:
                        kw["hidden_states"] = req.resid_in
                    block.inputs = (args, kw)
                if "resid_pre" in capture and layer in capture["resid_pre"]:
                    args, kw = block.inputs
                    found.append(
                        (
                            "resid_pre",
                            layer,
                            req.keep("resid_pre", layer, args[0] if args else kw["hidden_states"]),
                        )
                    )
                if iv.touches_scores(layer):
                    args, kw = attn.inputs
                    kw["attention_mask"] = _suppressed_mask(kw.get("attention_mask"), iv, layer, pos, n_heads)
                    attn.inputs = (args, kw)
                want_z = "z" in capture and layer in capture["z"]
                if iv.touches_z(layer) or want_z:
                    out_proj = getattr(attn, arch.out_proj_name)
                    z = out_proj.input  # [batch, pos, heads * d_head]
                    if iv.touches_z(layer):
                        zh = iv.z(layer, z.reshape(*z.shape[:2], n_heads, d_head), pos)
                        out_proj.input = zh.reshape(z.shape)
                        z = out_proj.input
                    if want_z:
                        found.append(
                            ("z", layer, req.keep("z", layer, z.reshape(*z.shape[:2], n_heads, d_head)))
                        )
                if "pattern" in capture and layer in capture["pattern"]:
                    out = attn.output
                    found.append(("pattern", layer, req.keep("pattern", layer, out[1])))
                    attn.output = (out[0], None, *out[2:])  # the block ignores it: let it go now
                if iv.touches_resid(layer):
                    out = block.output
                    if isinstance(out, tuple):
                        block.output = (iv.resid(layer, out[0], pos),) + tuple(out[1:])
                    else:
                        block.output = iv.resid(layer, out, pos)
                if "resid_post" in capture and layer in capture["resid_post"]:
                    out = block.output
                    found.append(
                        (
                            "resid_post",
                            layer,
                            req.keep("resid_post", layer, out[0] if isinstance(out, tuple) else out),
                        )
                    )
            if stop_after is not None:
                _ = layers[stop_after].output  # run up to here even when nothing was captured
                tracer.stop()
            else:
                output = self.lm.output.save()
        acts: dict[str, dict[int, Tensor]] = {name: {} for name in capture}
        for name, layer, tensor in found:
            acts[name][layer] = tensor
        if stop_after is not None:
            return RunOutput(None, acts)
        return RunOutput(output.logits, acts, output.past_key_values if req.use_cache else None)


def _envoy(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _suppressed_mask(
    mask: Tensor | None, iv: Interventions, layer: int, pos: Positions, n_heads: int
) -> Tensor:
    """The additive attention mask [batch, 1|heads, q, k] with suppressed entries at the minimum.

    Replacing (not adding to) the mask value keeps the causal entries finite, which matches
    setting the pre-softmax scores to the dtype minimum.
    """
    if mask is None or mask.dtype == torch.bool:
        allowed = pos.key[:, None, None, :] <= pos.query[:, None, :, None]  # causal, by position
        allowed &= pos.key[:, None, None, :] >= 0
        if mask is not None:
            allowed &= mask
        dtype = torch.get_default_dtype() if mask is None else torch.float32
        mask = torch.zeros(allowed.shape, dtype=dtype, device=pos.key.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    scores_like = mask.expand(mask.shape[0], n_heads, *mask.shape[2:])
    return iv.scores(layer, scores_like, pos)
