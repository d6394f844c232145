"""The backend contract: what `HookedModel.forward` asks of a backend, and what it gets back.

A backend is any object with a `name` and a `run(request) -> RunOutput` method (the `Backend`
Protocol), built by a factory `(hf_model, tokenizer, arch, name) -> Backend` that `register_backend`
adds to `load_model`'s registry. `run` performs one forward pass of the Hugging Face model and,
in every block `l` it runs, in this order:

1. `resid_pre`: the residual stream entering block `l` `[batch, q, d_model]` (when
   `request.start_at == l`, replace it by `request.resid_in` first);
2. attention scores `[batch, heads, q, k]` before the softmax: pass them through
   `request.interventions.scores(l, scores, request.pos)` when `touches_scores(l)`;
3. `pattern`: the post-softmax attention `[batch, heads, q, k]`;
4. `z`: the head outputs entering the attention output projection, viewed as
   `[batch, q, heads, d_head]`: pass through `interventions.z(l, z, pos)` when `touches_z(l)`;
5. `resid_post`: the block's output: pass through `interventions.resid(l, x, pos)` when
   `touches_resid(l)`.

Captured tensors (names in `request.capture`, each with its layers) are taken after the edits and
stored through `request.keep(name, layer, tensor)` into `RunOutput.acts[name][layer]`. With
`stop_after = L` nothing above block L runs (no final norm, no logits: `RunOutput.logits` is
None). With `start_at = L` blocks below L need not run. `past_key_values` / `use_cache` follow
transformers' KV-cache API, and `attention_mask` covers cached keys too.

Example:
    >>> from mechlens.models.protocol import Backend
    >>> import mechlens as ml
    >>> isinstance(ml.load_model("tiny-llama").backend, Backend)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor, nn

from mechlens.models.architecture import Architecture, get_submodule
from mechlens.models.interventions import Interventions, Positions

CaptureName = Literal["resid_pre", "resid_post", "pattern", "z"]
CACHE_NAMES: tuple[CaptureName, ...] = ("resid_pre", "resid_post", "pattern", "z")
"""Activation names `run_with_cache` understands (TransformerLens's hook-point words):
resid_pre [batch, pos, d_model] entering a block; resid_post [batch, pos, d_model] leaving it;
pattern [batch, heads, q_pos, k_pos] post-softmax attention; z [batch, pos, heads, d_head] head
outputs before W_O."""

Reducer = Callable[[str, int, Tensor], Tensor]
"""`reduce(name, layer, tensor) -> smaller tensor`, applied to each capture as it is taken."""


@dataclass
class RunRequest:
    """One forward pass: inputs, the interventions to apply, what to capture, where to start and stop."""

    tokens: Tensor  # [batch, q]
    attention_mask: Tensor  # [batch, k], k = cached + q
    position_ids: Tensor  # [batch, q]
    pos: Positions  # each token's index in its own sequence (padding: -1)
    interventions: Interventions = field(default_factory=Interventions)
    capture: dict[str, list[int]] = field(default_factory=dict)  # name -> layers
    stop_after: int | None = None  # last block to run; None runs to the logits
    past_key_values: Any = None
    use_cache: bool = False
    start_at: int | None = None  # run blocks start_at.. only, from `resid_in`
    resid_in: Tensor | None = None  # [batch, q, d_model], the residual entering block start_at
    reduce: Reducer | None = None

    def keep(self, name: str, layer: int, tensor: Tensor) -> Tensor:
        """What a backend stores for a captured activation: reduced, detached unless it needs grad."""
        if self.reduce is not None:
            tensor = self.reduce(name, layer, tensor)
        return tensor if tensor.requires_grad else tensor.detach()


@dataclass
class RunOutput:
    """What `Backend.run` returns."""

    logits: Tensor | None  # [batch, pos, vocab], None when stopped early
    acts: dict[str, dict[int, Tensor]] = field(default_factory=dict)  # name -> layer -> tensor
    past_key_values: Any = None


@runtime_checkable
class Backend(Protocol):
    """One forward pass of a Hugging Face causal LM under interventions, with captures.

    Implementations: `mechlens.models.backends.transformer_lens.TransformerLensBackend` (hook
    points of a TransformerBridge) and `mechlens.models.backends.nnsight.NNsightBackend` (envoys
    of an nnsight trace). See the module docstring for the sites and their order.
    """

    name: str

    def run(self, request: RunRequest) -> RunOutput:
        """Run `request` (module docstring) and return the logits, captures and KV cache."""
        ...


BackendFactory = Callable[[nn.Module, Any, Architecture, str], Backend]
"""`(hf_model, tokenizer, arch, model name) -> Backend`; registered with `register_backend`."""


@contextlib.contextmanager
def only_blocks_from(hf_model: nn.Module, arch: Architecture, first: int) -> Iterator[bool]:
    """Context for backends: the HF model's layer loop sees blocks `first..` only, so the blocks
    below are not computed (their output is replaced anyway). Yields False, changing nothing, where
    per-layer settings are looked up by loop index and would shift (e.g. sliding-window layer types)."""
    parent_path, _, attr = arch.layers_path.rpartition(".")
    parent = get_submodule(hf_model, parent_path) if parent_path else hf_model
    blocks = getattr(parent, attr)
    config: Any = hf_model.config
    types = getattr(config.get_text_config(), "layer_types", None)
    shifts = types is not None and any(types[i] != types[first + i] for i in range(len(blocks) - first))
    if first == 0 or shifts:
        yield False
        return
    setattr(parent, attr, nn.ModuleList(list(blocks)[first:]))
    try:
        yield True
    finally:
        setattr(parent, attr, blocks)
