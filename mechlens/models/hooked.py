"""HookedModel: one small API over every backend.

Every method in mechlens is written against this class's public members. A backend (the
`Backend` protocol in `mechlens.models.protocol`) supplies one primitive, `run(request)`, which
runs a forward pass applying the request's interventions and capturing what it names; everything
else (tokenisation, validation, contexts, unembedding, generation) lives here once.

The public low-level layer, for methods that need more than `run_with_cache`:
`prepare_input` (validated ids and mask), `forward` (one pass with captures, early stop, a start
layer with a given residual, a KV cache), `intervene` / `scale_heads` (any intervention as a
context), `trainable_blocks` (parameters to fine-tune), and the `check_*` validators.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> toks = model.to_tokens("The cat sat")
    >>> logits, cache = model.run_with_cache(toks, names=["resid_post", "pattern"])
    >>> cache["pattern"].shape[0] == model.n_layers
    True
    >>> out = model.forward(toks, capture={"resid_pre": [1]}, stop_after=1)   # low level
    >>> out.logits is None, tuple(out.acts["resid_pre"][1].shape) == (1, toks.shape[1], model.d_model)
    (True, True)
"""

from __future__ import annotations

import contextlib
import copy
import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechlens.models.architecture import Architecture, require_submodule
from mechlens.models.backends import make_backend
from mechlens.models.generation import PATHS, Generation, Sampling, hooked_step, plain_step, sample_batch
from mechlens.models.interventions import (
    AttentionSuppression,
    DirectionAddition,
    DirectionProjection,
    HeadAblation,
    HeadScaling,
    Intervention,
    Interventions,
    Positions,
)
from mechlens.models.protocol import CACHE_NAMES, Backend, Reducer, RunOutput, RunRequest

TokensLike = Tensor | str | Sequence[str]
"""Token ids `[batch, pos]` (or `[pos]`), one text, or a list of texts."""


def as_index(value: Any, name: str) -> int:
    """`value` as a Python int (ints, NumPy integers, 0-d integer tensors); `TypeError` for bools,
    floats and anything else, naming the argument."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got the boolean {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def _logits(out: RunOutput) -> Tensor:
    """The logits of a forward that ran to the end (not stopped early)."""
    if out.logits is None:
        raise RuntimeError("this forward stopped early and has no logits")
    return out.logits


class ActivationCache(dict):
    """name -> tensor stacked over the captured layers: `[layers, batch, ...]`.

    `cache.layers[name]` lists which model layers the first axis holds (all layers by default);
    `cache.at(name, layer)` indexes by model layer.
    """

    def __init__(self, data: dict[str, Tensor], layers: dict[str, list[int]]):
        super().__init__(data)
        self.layers = layers

    def at(self, name: str, layer: int) -> Tensor:
        if name not in self:
            raise KeyError(f"{name!r} was not captured; captured: {sorted(self)}")
        if layer not in self.layers[name]:
            raise KeyError(f"layer {layer} of {name!r} not captured; captured {self.layers[name]}")
        return self[name][self.layers[name].index(layer)]


@dataclass
class Prefix:
    """One sequence's KV cache (from `HookedModel.cache_prefix`), reusable by `continue_prefix`."""

    tokens: Tensor  # [1, pos]
    past_key_values: Any
    logits: Tensor  # [1, pos, vocab]


class HookedModel:
    """A causal LM whose activations can be read and edited, backend-independent.

    Args:
        hf_model: a Hugging Face causal LM (loaded with eager attention).
        tokenizer: its tokenizer.
        backend: a registered backend name ("transformer_lens", "nnsight") or a `Backend` object.
        name: a label for provenance (default: the config's `_name_or_path`).
    """

    def __init__(self, hf_model: nn.Module, tokenizer, backend: str | Backend = "transformer_lens",
                 name: str | None = None):  # fmt: skip
        self.arch = Architecture.of(hf_model)
        # read and edited, not trained: the weights are frozen (see trainable_blocks)
        self.hf_model: Any = hf_model.eval().requires_grad_(False)
        # the HF names of the weights, taken before a backend rewraps modules (tensors kept by reference)
        self._hf_state = hf_model.state_dict(keep_vars=True)
        # the plain HF module tree sharing every weight: the fast sampling path (no hooks)
        shared = {id(t): t for t in [*hf_model.parameters(), *hf_model.buffers()]}
        self.plain_model: nn.Module = copy.deepcopy(hf_model, shared)
        self.tokenizer = tokenizer
        self.name = name or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        self._interventions = Interventions()
        self.memory_budget = int(float(os.environ.get("MECHLENS_MEMORY_BUDGET_GB", 8)) * 2**30)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.adapter: Backend = (
            make_backend(backend, hf_model, tokenizer, self.arch, self.name)
            if isinstance(backend, str)
            else backend
        )

    @property
    def backend(self) -> str:
        """The backend's name: "transformer_lens" or "nnsight" (its object: `model.adapter`)."""
        return self.adapter.name

    # ---------------------------------------------------------------- dimensions
    n_layers = property(lambda self: self.arch.n_layers)
    n_heads = property(lambda self: self.arch.n_heads)
    d_model = property(lambda self: self.arch.d_model)
    d_head = property(lambda self: self.arch.d_head)
    d_vocab = property(lambda self: self.arch.d_vocab)
    n_ctx = property(lambda self: self.arch.n_ctx)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, backend={self.backend!r}, "
            f"layers={self.n_layers}, heads={self.n_heads}, d_model={self.d_model})"
        )

    # ---------------------------------------------------------------- tokens
    def to_tokens(self, text: str | Sequence[str]) -> Tensor:
        """Token ids `[batch, pos]`, the same ids as `model.tokenizer(text)` (left-padded batch)."""
        return self.tokenize(text)[0]

    def tokenize(self, text: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """`(tokens [batch, pos], attention_mask [batch, pos])`, left-padded for a list."""
        texts = [text] if isinstance(text, str) else list(text)
        if any(not isinstance(t, str) for t in texts):
            bad = next(t for t in texts if not isinstance(t, str))
            raise TypeError(f"text must be a string or a list of strings, got a {type(bad).__name__} entry")
        if not texts or any(not t for t in texts):
            raise ValueError("empty text: give at least one non-empty string")
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        tokens, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        self.check_tokens(tokens)
        return tokens, mask

    def to_str_tokens(self, tokens: Tensor | str) -> list[str]:
        """One string per token of a single sequence (for hover text and axis labels)."""
        if isinstance(tokens, str):
            tokens = self.to_tokens(tokens)
        ids = tokens.reshape(-1).tolist()
        return [self.tokenizer.decode([i]) for i in ids]

    def to_string(self, tokens: Tensor) -> str:
        return self.tokenizer.decode(tokens.reshape(-1).tolist())

    # ---------------------------------------------------------------- validation
    def check_tokens(self, tokens: Tensor) -> Tensor:
        """Validate token ids `[batch, pos]`: integers in `[0, d_vocab)`, at least one row and one
        position, at most `n_ctx` positions. Returns them; raises `ValueError`/`TypeError`."""
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
            raise TypeError(f"token ids must be integers, got dtype {tokens.dtype}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.shape[0] == 0:
            raise ValueError("empty batch: tokens have 0 rows")
        if tokens.shape[1] == 0:
            raise ValueError("empty input: tokens have 0 positions")
        if tokens.shape[1] > self.n_ctx:
            raise ValueError(
                f"input of {tokens.shape[1]} tokens is longer than the context window "
                f"({self.n_ctx} tokens) of {self.name}"
            )
        if tokens.min() < 0 or tokens.max() >= self.d_vocab:
            raise ValueError(f"token ids must lie in [0, {self.d_vocab}); got {tokens.min()}..{tokens.max()}")
        return tokens

    def check_layer(self, layer: Any, name: str = "layer") -> int:
        """`layer` as an int in `0..n_layers-1`, else `ValueError`/`TypeError` naming what is valid."""
        layer = as_index(layer, name)
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"{name} {layer} out of range: valid layers are 0..{self.n_layers - 1}")
        return layer

    def check_layers(self, layers: Sequence[int] | None, name: str = "layers") -> list[int]:
        """A list of valid layers (None: all of them); one int counts as a list of one."""
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, int | Tensor) and not isinstance(layers, bool):
            layers = [layers]
        if isinstance(layers, str) or not isinstance(layers, Sequence | range | Tensor):
            raise TypeError(f"{name} must be a list of layer indices, got {type(layers).__name__}")
        return [self.check_layer(l, f"{name} entry") for l in layers]

    def check_head(self, head: Any, name: str = "head") -> int:
        """`head` as an int in `0..n_heads-1`, else `ValueError`/`TypeError`."""
        head = as_index(head, name)
        if not 0 <= head < self.n_heads:
            raise ValueError(f"{name} {head} out of range: valid heads are 0..{self.n_heads - 1}")
        return head

    def check_heads(self, heads: Any) -> dict[int, list[int]]:
        """`(layer, head)` pairs grouped by layer; raises naming the first malformed entry."""
        if isinstance(heads, str) or not isinstance(heads, Sequence | Iterator):
            raise TypeError(f"heads must be a list of (layer, head) pairs, got {type(heads).__name__}")
        by_layer: dict[int, list[int]] = {}
        for pair in heads:
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(f"heads must be (layer, head) pairs; got the entry {pair!r}")
            layer, head = self.check_layer(pair[0]), self.check_head(pair[1])
            by_layer.setdefault(layer, []).append(head)
        if not by_layer:
            raise ValueError("heads is empty: give (layer, head) pairs")
        return by_layer

    def check_direction(self, direction: Tensor) -> Tensor:
        """A finite, non-zero `[d_model]` vector on the model's device."""
        direction = torch.as_tensor(direction)
        if direction.shape != (self.d_model,):
            raise ValueError(f"direction must have shape ({self.d_model},), got {tuple(direction.shape)}")
        if not direction.is_floating_point():
            direction = direction.float()
        if not torch.isfinite(direction).all() or direction.norm() == 0:
            raise ValueError("direction must be finite and non-zero")
        return direction.to(self.device)

    def prepare_input(
        self, tokens: TokensLike, attention_mask: Tensor | None = None, fit: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Validated `(tokens [batch, pos], attention_mask [batch, pos])` on the model's device,
        from text(s) or ids; with `fit`, the active contexts' spans and positions must lie inside
        every row (generation passes `fit=False`: they may point at tokens still to come)."""
        if isinstance(tokens, str) or (isinstance(tokens, Sequence) and not isinstance(tokens, Tensor)):
            if attention_mask is not None:
                raise ValueError("attention_mask goes with token ids; texts are tokenised (and masked) here")
            tokens, attention_mask = self.tokenize(tokens)
        else:
            tokens = torch.as_tensor(tokens)
            if tokens.ndim == 1:
                tokens = tokens[None]
            self.check_tokens(tokens)
            tokens = tokens.to(self.device)
            if attention_mask is None:
                attention_mask = torch.ones_like(tokens)
            else:
                attention_mask = torch.as_tensor(attention_mask)
                if attention_mask.ndim == 1:
                    attention_mask = attention_mask[None]
                if attention_mask.shape != tokens.shape:
                    raise ValueError(
                        f"attention_mask shape {tuple(attention_mask.shape)} != tokens {tuple(tokens.shape)}"
                    )
                if not torch.isin(attention_mask, torch.tensor([0, 1], device=attention_mask.device)).all():
                    raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
                if (attention_mask.sum(1) == 0).any():
                    raise ValueError("attention_mask has a row with no token")
        attention_mask = attention_mask.to(self.device).long()
        if fit:
            self._check_interventions_fit(attention_mask.sum(1))
        return tokens, attention_mask

    def _check_interventions_fit(self, lengths: Tensor) -> None:
        """Spans and positions of the active contexts must lie inside every row (of `lengths` real tokens)."""
        shortest = int(lengths.min())
        for it in self._interventions.items:
            if isinstance(it, AttentionSuppression):
                ends = [e for _, e in it.spans]
                rows = lengths.tolist() if len(ends) > 1 else [shortest]
                if len(ends) > 1 and len(ends) != len(rows):
                    raise ValueError(f"{len(ends)} suppressed spans for a batch of {len(rows)} rows (keys)")
                for end, n in zip(ends, rows, strict=True):
                    if end > n:
                        raise ValueError(
                            f"suppressed span keys={it.keys} is past the end of a row of {n} tokens"
                        )
            wanted = list(getattr(it, "positions", None) or []) + list(getattr(it, "queries", None) or [])
            if any(not 0 <= p < shortest for p in wanted):
                raise ValueError(
                    f"positions {wanted} must lie in 0..{shortest - 1} "
                    f"(the shortest row has {shortest} tokens)"
                )

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        *,
        capture: dict[str, list[int]] | None = None,
        stop_after: int | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        start_at: int | None = None,
        resid_in: Tensor | None = None,
        reduce: Reducer | None = None,
    ) -> RunOutput:
        """One forward pass under the active interventions: the low-level primitive.

        Args:
            tokens: ids `[batch, q]` (from `prepare_input`, which also checks that the active
                contexts fit the input).
            attention_mask: `[batch, k]` over cached keys and `tokens` (default: all ones).
            capture: `{name: layers}` to capture (`CACHE_NAMES`), returned in `RunOutput.acts`.
            stop_after: run no block above this one (no logits).
            past_key_values, use_cache: transformers' KV cache, to continue or to keep.
            start_at, resid_in: run blocks `start_at..` only, from `resid_in [batch, q, d_model]`
                as the residual entering block `start_at` (backends skip the blocks below).
            reduce: `reduce(name, layer, t)` shrinks each capture as it is taken.

        Gradients flow when enabled by the caller (`torch.enable_grad()`).
        """
        tokens = torch.as_tensor(tokens, device=self.device)
        if past_key_values is None:
            self.check_tokens(tokens)
            if attention_mask is None:
                attention_mask = torch.ones_like(tokens)
        elif attention_mask is None:
            raise ValueError("continuing past_key_values needs the attention_mask over cached and new tokens")
        if attention_mask.shape[0] != tokens.shape[0] or attention_mask.shape[1] < tokens.shape[1]:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not cover tokens {tuple(tokens.shape)}"
            )
        unknown = [name for name in capture or {} if name not in CACHE_NAMES]
        if unknown:
            raise ValueError(f"unknown capture name {unknown[0]!r}: valid names are {list(CACHE_NAMES)}")
        # a checked copy: the caller's dict is left as it was
        capture = {
            name: self.check_layers(layers, f"capture[{name!r}]") for name, layers in (capture or {}).items()
        }
        if stop_after is not None:
            stop_after = self.check_layer(stop_after, "stop_after")
        if (start_at is None) != (resid_in is None):
            raise ValueError("start_at and resid_in go together: the residual entering block start_at")
        if start_at is not None and resid_in is not None:
            start_at = self.check_layer(start_at, "start_at")
            if resid_in.shape != (*tokens.shape, self.d_model):
                raise ValueError(f"resid_in must be [batch, pos, d_model] = {(*tokens.shape, self.d_model)}, "
                                 f"got {tuple(resid_in.shape)}")  # fmt: skip
        pos = Positions.from_mask(attention_mask, tokens.shape[1])
        request = RunRequest(
            tokens=tokens,
            attention_mask=attention_mask,
            position_ids=pos.query.clamp(min=0),
            pos=pos,
            interventions=Interventions(list(self._interventions.items)),
            capture=capture,
            stop_after=stop_after,
            past_key_values=past_key_values,
            use_cache=use_cache,
            start_at=start_at,
            resid_in=resid_in,
            reduce=reduce,
        )
        return self.adapter.run(request)

    def chunk_size_for(self, n_pos: int, budget_mb: float = 128) -> int:
        """Positions per chunk for a forward over `n_pos` tokens: 512, fewer on long inputs so that
        one layer's eager attention (scores, softmax and a copy: `3 x heads x chunk x n_pos`
        floats) stays under `budget_mb`; at least 64."""
        per_position = 3 * self.n_heads * max(int(n_pos), 1) * 4
        return int(min(512, max(64, budget_mb * 2**20 // per_position)))

    def forward_chunks(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        chunk_size: int | None = None,
        *,
        capture: dict[str, list[int]] | None = None,
        stop_after: int | None = None,
        past_key_values: Any = None,
        reduce: Reducer | None = None,
    ) -> Iterator[tuple[int, RunOutput]]:
        """One forward pass run `chunk_size` positions at a time (default `chunk_size_for` the
        input's length), the earlier chunks' keys and values kept in a KV cache: yields
        `(start, RunOutput)` for positions `start .. start + chunk_size`.

        Memory then depends on the chunk, not on the sequence: each layer's attention scores are
        `[batch, heads, chunk, pos]` at most, and captures, logits and `reduce` see one chunk at a
        time (the KV cache itself grows with the sequence). The numbers equal one full forward.
        `past_key_values` continues a cache whose positions come before `tokens` (all rows real).

            >>> for start, out in model.forward_chunks(toks, chunk_size=256, stop_after=5,   # doctest: +SKIP
            ...                                        capture={"resid_post": [5]}):
            ...     use(out.acts["resid_post"][5])        # [batch, <=256, d_model]
        """
        from transformers import DynamicCache

        if past_key_values is None:
            tokens, attention_mask = self.prepare_input(tokens, attention_mask)
            past_key_values = DynamicCache(config=self.hf_model.config)
            done = 0
        else:
            tokens = torch.as_tensor(tokens, device=self.device)
            done = past_key_values.get_seq_length()
            attention_mask = torch.ones(
                tokens.shape[0], done + tokens.shape[1], dtype=torch.long, device=self.device
            )
        if chunk_size is None:
            chunk_size = self.chunk_size_for(done + tokens.shape[1])
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        n = tokens.shape[1]
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            out = self.forward(
                tokens[:, start:end],
                attention_mask[:, : done + end],
                capture=capture,
                stop_after=stop_after,
                past_key_values=past_key_values,
                use_cache=True,
                reduce=reduce,
            )
            out.past_key_values = past_key_values
            yield start, out

    def __call__(self, tokens: TokensLike, attention_mask: Tensor | None = None) -> Tensor:
        """Logits `[batch, pos, vocab]` under the active interventions."""
        tokens, attention_mask = self.prepare_input(tokens, attention_mask)
        self.check_memory(tokens.shape, {}, logits=True)
        with torch.no_grad():
            return _logits(self.forward(tokens, attention_mask))

    def check_memory(
        self,
        shape: tuple[int, ...],
        capture: dict[str, list[int]],
        logits: bool,
        reduce: Reducer | None = None,
    ) -> int:
        """Estimated bytes a one-pass forward of `shape = (batch, pos)` holds (captures, logits, one
        layer's eager attention scores); `ValueError` naming the ways out when it exceeds
        `model.memory_budget` (bytes; default 8 GiB or `$MECHLENS_MEMORY_BUDGET_GB`)."""
        batch, pos = int(shape[0]), int(shape[1])
        item = torch.finfo(self.dtype).bits // 8
        per_layer = {
            "resid_pre": batch * pos * self.d_model,
            "resid_post": batch * pos * self.d_model,
            "z": batch * pos * self.n_heads * self.d_head,
            "pattern": batch * self.n_heads * pos * pos,
        }
        held = 0 if reduce is not None else sum(per_layer[n] * len(ls) for n, ls in capture.items())
        held += batch * pos * self.d_vocab if logits else 0
        held += 3 * batch * self.n_heads * pos * pos  # scores, softmax and its copy, one layer at a time
        held *= item
        if held > self.memory_budget:
            gib = 2**30
            raise ValueError(
                f"this forward of {batch} x {pos} tokens would hold about {held / gib:.1f} GiB (budget "
                f"{self.memory_budget / gib:.1f} GiB, model.memory_budget): capture fewer layers=, shrink "
                "each capture as it is taken with run_with_cache(reduce=...), use return_logits=False, or "
                "run in chunks: model.forward_chunks(...), logit_lens(chunk=), sentence_attention(chunk=)"
            )
        return held

    def run_with_cache(
        self,
        tokens: TokensLike,
        names: Sequence[str] = ("resid_post",),
        layers: Sequence[int] | None = None,
        attention_mask: Tensor | None = None,
        return_logits: bool = True,
        grad: bool = False,
        reduce: Reducer | None = None,
    ) -> tuple[Tensor | None, ActivationCache]:
        """Logits and the named activations, stacked as `[layers, batch, ...]`.

        Only the requested names and layers are captured. With `return_logits=False` the forward
        stops after the last requested layer and the logits are None. `reduce(name, layer,
        tensor)` shrinks each activation as soon as it is captured, so that only its result is
        kept (e.g. attention pooled over sentences instead of `[heads, q, k]` for every layer):

            >>> _, c = model.run_with_cache(toks, ["pattern"],        # doctest: +SKIP
            ...     reduce=lambda name, layer, p: p[..., -1, :])    # last query's row per layer

        `reduce=` is the way to capture from long traces: a full `pattern` capture of an 8k-token
        trace is 30 x 9 x 8192^2 floats (72 GiB). A request whose estimate exceeds
        `model.memory_budget` raises a `ValueError` naming `reduce=`, `layers=` and the chunked
        forward (`forward_chunks`) instead of running out of memory.
        """
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in CACHE_NAMES]
        if unknown or not names:
            raise ValueError(f"unknown cache name(s) {unknown}: valid names are {list(CACHE_NAMES)}")
        layer_list = self.check_layers(layers)
        if not layer_list:
            raise ValueError("layers is empty: give at least one layer")
        tokens, attention_mask = self.prepare_input(tokens, attention_mask)
        capture = {n: layer_list for n in names}
        self.check_memory(tokens.shape, capture, return_logits, reduce)
        stop_after = None if return_logits else max(layer_list)
        with torch.set_grad_enabled(grad):
            out = self.forward(tokens, attention_mask, capture=capture, stop_after=stop_after, reduce=reduce)
        data = {n: torch.stack([out.acts[n][l] for l in layer_list]) for n in names}
        return out.logits, ActivationCache(data, {n: layer_list for n in names})

    def final_norm(self, resid: Tensor) -> Tensor:
        """The model's final normalisation, applied to `resid [..., d_model]`."""
        return require_submodule(self.hf_model, self.arch.norm_path)(resid)

    def W_O(self, layer: int) -> Tensor:
        """The attention output projection of `layer` per head, `[n_heads, d_head, d_model]`
        (TransformerLens's layout): head h writes `z[..., h, :] @ W_O[h]` into the residual stream.

            >>> model.W_O(0).shape == (model.n_heads, model.d_head, model.d_model)  # doctest: +SKIP
            True
        """
        weight = self._hf_state[self._out_proj_key(layer, "weight")].detach()
        if not self.arch.out_proj_transposed:
            weight = weight.T  # nn.Linear stores [out, in]
        return weight.reshape(self.n_heads, self.d_head, self.d_model)  # [heads * d_head, d_model] split

    def b_O(self, layer: int) -> Tensor | None:
        """The output projection's bias of `layer` `[d_model]`, or None when it has none."""
        bias = self._hf_state.get(self._out_proj_key(layer, "bias"))
        return None if bias is None else bias.detach()

    def _out_proj_key(self, layer: int, name: str) -> str:
        layer = self.check_layer(layer)
        return f"{self.arch.layers_path}.{layer}.{self.arch.attn_name}.{self.arch.out_proj_name}.{name}"

    def unembed(self, resid: Tensor, normalize: bool = True) -> Tensor:
        """Final norm + unembedding (+ logit soft-capping where the model has it) -> logits.

        `resid [..., d_model]` -> `[..., d_vocab]`. Each input is normalised by its own norm, so
        the logit lens of the last layer equals the model's logits.
        """
        if resid.shape[-1] != self.d_model:
            raise ValueError(f"resid last dim must be d_model={self.d_model}, got {resid.shape[-1]}")
        x = self.final_norm(resid) if normalize else resid
        logits = require_submodule(self.hf_model, self.arch.head_path)(x)
        if self.arch.logit_softcap:
            cap = self.arch.logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def save_pretrained(self, path: str | Path) -> None:
        """Write the current weights (HF names, shared tensors once), config and tokenizer as a
        Hugging Face folder that `load_model(path)` reads; works under either backend."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors, seen = {}, set()
        for name, t in self._hf_state.items():
            if t.data_ptr() not in seen:  # tied weights (embedding = unembedding) are stored once
                seen.add(t.data_ptr())
                tensors[name] = t.detach().cpu().contiguous()
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        self.hf_model.config.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    # ---------------------------------------------------------------- contexts
    @contextlib.contextmanager
    def intervene(self, item: Intervention) -> Iterator[None]:
        """Context: apply any intervention object (`mechlens.models.interventions`) to every
        forward inside it, generation included. The named contexts below build these."""
        self._interventions.items.append(item)
        try:
            yield
        finally:
            self._interventions.items.remove(item)

    def _check_positions(self, positions: Sequence[int] | None, name: str = "positions") -> list[int] | None:
        if positions is None:
            return None
        if isinstance(positions, int | Tensor) and not isinstance(positions, bool):
            positions = [positions]
        if isinstance(positions, str) or not isinstance(positions, Sequence | range | Tensor):
            raise TypeError(f"{name} must be a list of token positions, got {type(positions).__name__}")
        out = [as_index(p, f"{name} entry") for p in positions]
        if not out or any(not 0 <= p < self.n_ctx for p in out):
            raise ValueError(
                f"{name} must be a non-empty list of positions in 0..{self.n_ctx - 1}, got {out}"
            )
        return out

    def ablate_heads(
        self,
        heads: Sequence[tuple[int, int]],
        mode: str = "zero",
        positions: Sequence[int] | None = None,
        reference: TokensLike | None = None,
        rescale: str | None = None,
    ) -> contextlib.AbstractContextManager[None]:
        """Context: replace the outputs (z, before W_O) of `heads` by zero or by a mean.

        `mode="mean"` uses each head's mean z over `reference` tokens when given, else over the
        real positions of each forward pass. `positions` (default: all) limits where it applies.
        `rescale="norm"` scales each sequence's z in every ablated layer (all heads, positions and
        head dimensions of one forward; in `generate`, of each step) back to its norm before the
        ablation, as the Refusal Cliff authors do, though per sequence rather than per batch.

            >>> with model.ablate_heads([(0, 1), (1, 0)]):  # doctest: +SKIP
            ...     logits = model(toks)
        """
        if mode not in ("zero", "mean"):
            raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
        if rescale not in (None, "norm"):
            raise ValueError(f"rescale must be None or 'norm', got {rescale!r}")
        by_layer = self.check_heads(heads)
        positions = self._check_positions(positions)
        means = None
        if mode == "mean" and reference is not None:
            _, cache = self.run_with_cache(reference, ["z"], layers=sorted(by_layer), return_logits=False)
            means = {l: cache.at("z", l).flatten(0, 1).mean(0) for l in by_layer}  # [heads, d_head]
        return self.intervene(HeadAblation(by_layer, mode, means, positions, rescale))

    def scale_heads(self, scales: dict[int, Tensor]) -> contextlib.AbstractContextManager[None]:
        """Context: multiply head outputs z by factors, `scales[layer]` `[n_heads]` (every row) or
        `[batch, n_heads]` (one set per row). Differentiable in the factors (attribution patching).

            >>> with model.scale_heads({3: torch.ones(model.n_heads)}):   # doctest: +SKIP
            ...     logits = model(toks)
        """
        checked = {}
        for layer, factor in scales.items():
            factor = torch.as_tensor(factor)
            if factor.shape[-1:] != (self.n_heads,) or factor.ndim > 2:
                raise ValueError(
                    f"scales[{layer}] must be [n_heads] or [batch, n_heads] (n_heads={self.n_heads}), "
                    f"got {tuple(factor.shape)}"
                )
            checked[self.check_layer(layer, "scales key")] = factor
        return self.intervene(HeadScaling(checked))

    def suppress_attention(
        self,
        keys: tuple[int, int] | Sequence[tuple[int, int]],
        queries: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
    ) -> contextlib.AbstractContextManager[None]:
        """Context: pre-softmax scores from `queries` (default all) to key positions
        `[start, end)` set to the dtype minimum, in `layers`/`heads` (default all).

        As in the Thought Anchors code. Positions count each sequence's own tokens. `keys` may
        also be a list with one span per batch row, to suppress a different sentence in each row
        of one batched forward.

            >>> with model.suppress_attention(keys=(5, 9)):            # doctest: +SKIP
            ...     logits = model(toks)
        """
        valid = (
            f"keys must be a span (start, end) with 0 <= start < end <= {self.n_ctx}, or a list "
            f"of such spans (one per batch row); got {keys!r}"
        )
        if isinstance(keys, str) or not isinstance(keys, Sequence):
            raise TypeError(valid)
        per_row = not (len(keys) == 2 and all(isinstance(k, int) and not isinstance(k, bool) for k in keys))
        spans = list(keys) if per_row else [keys]
        if not spans:
            raise ValueError("keys is an empty list: give a span (start, end) or one per batch row")
        checked: list[tuple[int, int]] = []
        for span in spans:
            if isinstance(span, str) or not isinstance(span, Sequence) or len(span) != 2:
                raise ValueError(valid)
            start, end = as_index(span[0], "keys entry"), as_index(span[1], "keys entry")
            if not 0 <= start < end <= self.n_ctx:
                raise ValueError(valid)
            checked.append((start, end))
        layer_set = None if layers is None else set(self.check_layers(layers))
        head_list = None if heads is None else [self.check_head(h) for h in heads]
        queries = self._check_positions(queries, "queries")
        return self.intervene(
            AttentionSuppression(checked if per_row else checked[0], queries, layer_set, head_list)
        )

    def add_direction(
        self,
        layer: int,
        direction: Tensor,
        scale: float = 1.0,
        positions: Sequence[int] | None = None,
    ) -> contextlib.AbstractContextManager[None]:
        """Context: add `scale * direction` to the residual stream leaving block `layer`."""
        layer = self.check_layer(layer)
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not torch.isfinite(torch.tensor(scale))
        ):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        positions = self._check_positions(positions)
        return self.intervene(
            DirectionAddition(layer, self.check_direction(direction), float(scale), positions)
        )

    def project_out(
        self, direction: Tensor, layers: Sequence[int] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Context: remove the component along `direction` from the residual stream leaving
        each block in `layers` (default: every block)."""
        layer_set = None if layers is None else set(self.check_layers(layers))
        return self.intervene(DirectionProjection(self.check_direction(direction), layer_set))

    @contextlib.contextmanager
    def trainable_blocks(self, first: int) -> Iterator[list[nn.Parameter]]:
        """Context yielding the parameters of blocks `first..` and of the final norm with gradients
        on, every other weight frozen; on exit every weight's `requires_grad` is as before.

            >>> with model.trainable_blocks(model.n_layers - 2) as params:   # doctest: +SKIP
            ...     opt = torch.optim.AdamW(params)
        """
        first = self.check_layer(first, "first")
        before = {p: p.requires_grad for p in self.hf_model.parameters()}
        blocks = require_submodule(self.hf_model, self.arch.layers_path)
        modules = [*list(blocks)[first:], require_submodule(self.hf_model, self.arch.norm_path)]
        params = list(dict.fromkeys(p for m in modules for p in m.parameters()))
        self.hf_model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        try:
            yield params
        finally:
            for p, flag in before.items():
                p.requires_grad_(flag)

    # ---------------------------------------------------------------- prefix reuse
    def cache_prefix(self, tokens: Tensor | str) -> Prefix:
        """Run one sequence once and keep its KV cache, to continue from any point of it later.

        >>> prefix = model.cache_prefix(toks)                  # doctest: +SKIP
        >>> logits = model.continue_prefix(prefix, suffixes, upto=5)   # doctest: +SKIP
        """
        tokens, mask = self.prepare_input(tokens)
        if tokens.shape[0] != 1:
            raise ValueError(f"cache_prefix takes one sequence, got a batch of {tokens.shape[0]}")
        with torch.no_grad():
            out = self.forward(tokens, mask, use_cache=True)
        return Prefix(tokens, out.past_key_values, _logits(out))

    def continue_prefix(self, prefix: Prefix, suffix: Tensor, upto: int | None = None) -> Tensor:
        """Logits `[batch, suffix_pos, vocab]` of `suffix [batch, suffix_pos]` run after the first
        `upto` tokens of `prefix` (default: all of them), each row after the same prefix.

        Only the suffix is computed; the active contexts apply to it (positions count from the
        start of the prefix). Equal to running `prefix[:upto] + suffix` from scratch.
        """
        n = prefix.tokens.shape[1]
        upto = n if upto is None else as_index(upto, "upto")
        if not 1 <= upto <= n:
            raise ValueError(f"upto must lie in 1..{n} (the prefix has {n} tokens), got {upto}")
        suffix = torch.as_tensor(suffix).to(self.device)
        if suffix.ndim == 1:
            suffix = suffix[None]
        if suffix.ndim != 2 or suffix.shape[1] == 0:
            raise ValueError(
                f"suffix must be token ids [batch, pos] with pos >= 1, got shape {tuple(suffix.shape)}"
            )
        full = self.check_tokens(torch.cat([prefix.tokens[:, :upto].expand(len(suffix), -1), suffix], 1))
        self._check_interventions_fit(torch.full((len(full),), full.shape[1]))
        past = copy.deepcopy(prefix.past_key_values)
        if upto < n:
            past.crop(upto - n)  # a negative count removes that many positions from the end
        if len(suffix) > 1:
            past.batch_repeat_interleave(len(suffix))
        mask = torch.ones(len(suffix), upto + suffix.shape[1], dtype=torch.long, device=self.device)
        with torch.no_grad():
            return _logits(self.forward(suffix, mask, past_key_values=past, use_cache=True))

    # ---------------------------------------------------------------- generation
    def generate(
        self,
        prompts: TokensLike,
        sampling: Sampling | None = None,
        *,
        attention_mask: Tensor | None = None,
        batch_size: int = 16,
        progress: bool = False,
        path: str = "auto",
        **settings: Any,
    ) -> Generation:
        """Sample continuations of each prompt under the active interventions.

        Args:
            prompts: one text, a list of texts, or token ids `[batch, pos]` (for instance a trace
                cut at a sentence, which decoding and re-tokenising might not reproduce); padded
                ids need their `attention_mask`.
            sampling: a `Sampling` (default `Sampling()`); keyword `settings` override its fields:
                `max_new_tokens`, `temperature` (0 = greedy), `top_p`, `n`, `seed`, `stop_at_eos`.
            batch_size: rows per forward; results do not depend on it.
            path: "auto" runs the plain Hugging Face model when no intervention is active (the fast
                path: no hooks, only the last position unembedded) and the hooked forward
                otherwise; "hooked" always hooks (the reference); "plain" refuses interventions.
                Both give the same tokens.

        Each prompt runs once and its KV cache is shared by its `n` samples. Row r draws from its
        own generator seeded from `(seed, r)`. A prompt gives the same continuation alone or in
        any batch (left padding is masked).

            >>> model.generate("2+2=", max_new_tokens=4, temperature=0).texts  # doctest: +SKIP
        """
        sampling = (sampling or Sampling()).replace(**settings) if settings else (sampling or Sampling())
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        tokens, mask = self.prepare_input(prompts, attention_mask, fit=False)
        if isinstance(prompts, Tensor) and attention_mask is None and len(tokens) > 1:
            self._reject_unmasked_padding(tokens)
        for it in self._interventions.of(HeadAblation):
            if it.mode == "mean" and it.means is None:
                raise ValueError("mean ablation during generate needs reference= tokens for the means")
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if path == "plain" and self._interventions.items:
            raise ValueError('path="plain" runs no hooks, but an intervention is active: use "auto"')
        plain = path == "plain" or (path == "auto" and not self._interventions.items)
        step = plain_step(self) if plain else hooked_step(self)
        per_batch = max(1, batch_size // sampling.n)
        new_tokens: list[Tensor] = []
        chunks = range(0, len(tokens), per_batch)
        for i in tqdm(chunks, desc="generate", disable=not progress):
            rows_mask = mask[i : i + per_batch]
            width = int(rows_mask.sum(1).max())  # drop columns that are padding in every row
            rows = tokens[i : i + per_batch, -width:]
            new_tokens += sample_batch(self, rows, rows_mask[:, -width:], sampling, i * sampling.n, step)
        texts = [self.tokenizer.decode(row.tolist()) for row in new_tokens]
        if isinstance(prompts, Tensor):
            shown = [self.tokenizer.decode(t[m.bool()].tolist()) for t, m in zip(tokens, mask, strict=True)]
        else:
            shown = [prompts] if isinstance(prompts, str) else list(prompts)
        return Generation(shown, texts, new_tokens, sampling.n, sampling)

    def _reject_unmasked_padding(self, tokens: Tensor) -> None:
        """Left-padded ids without their mask would be sampled from as if the pads were text."""
        pad = self.tokenizer.pad_token_id
        starts_with_pad = tokens[:, 0] == pad
        if pad is not None and starts_with_pad.any() and not starts_with_pad.all():
            raise ValueError(
                "some prompt rows start with the padding token: pass their attention_mask "
                "(model.tokenize(texts) returns both) or give the prompts as texts"
            )
