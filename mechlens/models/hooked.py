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
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechlens.models import validation
from mechlens.models.architecture import Architecture, require_submodule
from mechlens.models.backends import make_backend
from mechlens.models.generation import PATHS, Generation, hooked_step, plain_step, sample_batch
from mechlens.models.interventions import (
    ActivationPatch,
    AttentionSuppression,
    DirectionAddition,
    DirectionProjection,
    GatedDirection,
    HeadAblation,
    HeadScaling,
    Intervention,
    Interventions,
    Positions,
    unit_vector,
)
from mechlens.models.kv_cache import reserved_cache
from mechlens.models.memory import chunk_size, forward_bytes
from mechlens.models.padding import check_mask, check_unmasked, left_align
from mechlens.models.protocol import CACHE_NAMES, Backend, Reducer, RunOutput, RunRequest
from mechlens.models.sampling import Sampling, check_int, check_real, check_seeds
from mechlens.models.tokens import str_tokens, tokenize

TokensLike = Tensor | str | Sequence[str]
"""Token ids `[batch, pos]` (or `[pos]`), one text, or a list of texts."""


def _logits(out: RunOutput) -> Tensor:
    """The logits of a forward that ran to the end (not stopped early)."""
    if out.logits is None:
        raise RuntimeError("this forward stopped early and has no logits")
    return out.logits


def _leaves_prefix(item: Intervention, upto: int) -> bool:
    """Whether `item` changes nothing that a continuation after the first `upto` positions reads
    from their keys and values: it touches none of them, or (a suppression of every layer and
    head from every query) the only ones it touches lie in the suppressed spans, which no later
    query reads."""
    if isinstance(item, AttentionSuppression):
        if all(start >= upto for start, _ in item.spans):
            return True
        if item.queries is not None:
            return min(item.queries) >= upto
        return item.layers is None and item.heads is None and all(end >= upto for _, end in item.spans)
    if isinstance(item, DirectionAddition) or (isinstance(item, HeadAblation) and item.rescale is None):
        return item.positions is not None and min(item.positions) >= upto
    if isinstance(item, ActivationPatch):
        return min(item.positions) >= upto
    if isinstance(item, GatedDirection):
        return min(item.start) >= upto if isinstance(item.start, list) else item.start >= upto
    return False


def _prompt_only(item: Intervention, upto: int) -> bool:
    """Whether `item` changes nothing computed at positions `>= upto` but through the keys and
    values of earlier ones: a continuation after `upto` positions may then run without hooks."""
    if isinstance(item, ActivationPatch):
        return max(item.positions) < upto
    if isinstance(item, DirectionAddition) or (
        isinstance(item, HeadAblation) and not item.per_forward_statistic
    ):
        return item.positions is not None and max(item.positions) < upto
    return False


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
    """One sequence's KV cache (from `HookedModel.cache_prefix`), reusable by `continue_prefix`;
    `interventions` are the ones in force when it was cached (its keys and values carry them)."""

    tokens: Tensor  # [1, pos]
    past_key_values: Any
    logits: Tensor  # [1, pos, vocab]
    interventions: list[Intervention]


class InterventionContext(contextlib.AbstractContextManager):
    """The context `HookedModel.intervene` returns: while entered, `item` applies to every forward.

    Reusable and re-entrant: each entry adds the item once, each exit removes one entry of that very
    object (by identity), so any nesting order, an exception inside, or entering it again later
    leaves the model as it was."""

    def __init__(self, model: HookedModel, item: Intervention):
        self.model, self.item = model, item

    def __enter__(self) -> Intervention:
        self.model._interventions.items.append(self.item)
        return self.item

    def __exit__(self, *exc: object) -> None:
        self.model._interventions.remove(self.item)


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
        self._trainable: list[list[nn.Parameter]] = []  # one entry per open trainable_blocks context
        self._grad_flags: dict[nn.Parameter, bool] = {}  # requires_grad before the first of them
        self.memory_budget = int(float(os.environ.get("MECHLENS_MEMORY_BUDGET_GB", 8)) * 2**30)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.backend: Backend = (
            make_backend(backend, hf_model, tokenizer, self.arch, self.name)
            if isinstance(backend, str)
            else backend
        )
        self.hf_model.requires_grad_(False)  # a backend may add parameters (e.g. split q/k/v views)

    @property
    def active_interventions(self) -> tuple[Intervention, ...]:
        """The interventions in force, in the order their contexts were entered (part of every
        cache key: `mechlens.cache.model_fingerprint`)."""
        return tuple(self._interventions.items)

    # ---------------------------------------------------------------- dimensions
    n_layers = property(lambda self: self.arch.n_layers)
    n_heads = property(lambda self: self.arch.n_heads)
    d_model = property(lambda self: self.arch.d_model)
    d_head = property(lambda self: self.arch.d_head)
    d_vocab = property(lambda self: self.arch.d_vocab)
    d_mlp = property(lambda self: self.arch.d_mlp)
    n_ctx = property(lambda self: self.arch.n_ctx)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, backend={self.backend.name!r}, "
            f"layers={self.n_layers}, heads={self.n_heads}, d_model={self.d_model})"
        )

    # ---------------------------------------------------------------- tokens
    def to_tokens(self, text: str | Sequence[str]) -> Tensor:
        """Token ids `[batch, pos]`, the same ids as `model.tokenizer(text)` (left-padded batch)."""
        return self.tokenize(text)[0]

    def tokenize(self, text: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """`(tokens [batch, pos], attention_mask [batch, pos])`, left-padded for a list
        (`mechlens.models.tokens.tokenize`), validated."""
        tokens, mask = tokenize(self.tokenizer, text, self.device)
        self.check_tokens(tokens)
        return tokens, mask

    def to_str_tokens(self, tokens: Tensor | str) -> list[str]:
        """One string per token of a single sequence (for hover text and axis labels)."""
        return str_tokens(self.tokenizer, self.to_tokens(tokens) if isinstance(tokens, str) else tokens)

    def to_string(self, tokens: Tensor) -> str:
        return self.tokenizer.decode(tokens.reshape(-1).tolist())

    # ---------------------------------------------------------------- validation (mechlens.models.validation)
    def check_tokens(self, tokens: Tensor) -> Tensor:
        """Validate token ids `[batch, pos]`: integers in `[0, d_vocab)`, at least one row and one
        position, at most `n_ctx` positions. Returns them; raises `ValueError`/`TypeError`."""
        return validation.check_tokens(tokens, self.n_ctx, self.d_vocab, self.name)

    def check_layer(self, layer: Any, name: str = "layer") -> int:
        """`layer` as an int in `0..n_layers-1`, else `ValueError`/`TypeError` naming what is valid."""
        return validation.check_layer(layer, self.n_layers, name)

    def check_layers(self, layers: Any, name: str = "layers") -> list[int]:
        """A list of valid layers (None: all of them); one int counts as a list of one."""
        return validation.check_layers(layers, self.n_layers, name)

    def check_head(self, head: Any, name: str = "head") -> int:
        """`head` as an int in `0..n_heads-1`, else `ValueError`/`TypeError`."""
        return validation.check_head(head, self.n_heads, name)

    def check_heads(self, heads: Any) -> dict[int, list[int]]:
        """`(layer, head)` pairs grouped by layer; raises naming the first malformed entry."""
        return validation.check_heads(heads, self.n_layers, self.n_heads)

    def check_direction(self, direction: Tensor) -> Tensor:
        """A finite, non-zero `[d_model]` vector (float32, on the model's device); tiny and huge
        vectors are fine (`unit_vector` normalises them scale-safely)."""
        return validation.check_direction(direction, self.d_model, self.device)

    def prepare_input(
        self, tokens: TokensLike, attention_mask: Tensor | None = None, fit: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Validated `(tokens [batch, pos], attention_mask [batch, pos])` on the model's device,
        from text(s) or ids; with `fit`, the active contexts' spans and positions must lie inside
        every row (generation passes `fit=False`: they may point at tokens still to come).

        Ids may be padded on either side with their mask (`mechlens.models.padding`); ids
        without a mask that hold padding raise a `ValueError`."""
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
                check_unmasked(tokens, self.tokenizer)
                attention_mask = torch.ones_like(tokens)
            else:
                attention_mask = check_mask(attention_mask, tuple(tokens.shape))
        attention_mask = attention_mask.to(self.device).long()
        if fit:
            self._check_interventions_fit(attention_mask.sum(1))
        return tokens, attention_mask

    def _check_row_settings(self, rows: int, what: str) -> None:
        """Per-row settings of the active contexts must name rows of the call: one gate start per
        row, patched rows among them."""
        for it in self._interventions.of(GatedDirection):
            if isinstance(it.start, list) and len(it.start) != rows:
                raise ValueError(f"{len(it.start)} gate starts (start) for {rows} {what}: give one per row")
        for it in self._interventions.of(ActivationPatch):
            if it.rows is not None and max(it.rows) >= rows:
                raise ValueError(f"patched rows {it.rows} must lie in 0..{rows - 1} ({rows} {what})")

    def _check_interventions_fit(self, lengths: Tensor) -> None:
        """Spans and positions of the active contexts must lie inside every row (of `lengths` real tokens)."""
        self._check_row_settings(len(lengths), "rows")
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
        rows: Tensor | None = None,
        per_step_statistics: bool = False,
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
            rows: `[batch]`, the caller's row of each batch row (default: row b is row b): the
                row of per-row settings (one suppressed span or one head-scale set per row).
            per_step_statistics: continuing a KV cache under an intervention whose statistic is
                taken over one forward (mean ablation without `reference=`, `rescale="norm"`)
                raises, because the statistic would cover only the new tokens; `generate` passes
                True, taking it per step as the Refusal Cliff authors' generation does.

        Gradients flow when enabled by the caller (`torch.enable_grad()`).
        """
        tokens = torch.as_tensor(tokens, device=self.device)
        if past_key_values is None:
            self.check_tokens(tokens)
            if attention_mask is None:
                attention_mask = torch.ones_like(tokens)
        elif attention_mask is None:
            raise ValueError("continuing past_key_values needs the attention_mask over cached and new tokens")
        elif past_key_values.get_seq_length() > 0 and not per_step_statistics:
            self._refuse_partial_statistics("continuing a KV cache")
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
        if rows is not None and (rows.ndim != 1 or len(rows) != tokens.shape[0]):
            raise ValueError(f"rows must be [batch] = [{tokens.shape[0]}], got {tuple(rows.shape)}")
        pos = Positions.from_mask(attention_mask, tokens.shape[1], rows)
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
        out = self.backend.run(request)
        if out.logits is not None and not torch.isfinite(out.logits).all():
            kinds = ", ".join(type(i).__name__ for i in request.interventions.items)
            cause = (
                f"under the active interventions ({kinds}): use smaller scales or a wider dtype"
                if kinds
                else "the model overflows in this dtype: load it in float32"
            )
            raise ValueError(f"the logits are not finite in {self.dtype} {cause}")
        return out

    def _refuse_partial_statistics(self, path: str) -> None:
        """`ValueError` when an active intervention takes a statistic over one forward's positions."""
        found = self._interventions.per_forward_statistics()
        if found:
            raise ValueError(
                f"{path} under ablate_heads(mode='mean' without reference=, or rescale='norm') would take "
                "the ablation's statistic over part of the sequence only, not over the whole of it as one "
                "forward does: run one full forward (e.g. chunk= at least the length), or give "
                "reference= for the mean"
            )

    def chunk_size_for(self, n_pos: int, budget_mb: float = 128) -> int:
        """Positions per chunk for a forward over `n_pos` tokens (`mechlens.models.memory.chunk_size`)."""
        return chunk_size(n_pos, self.n_heads, budget_mb)

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
        if past_key_values is None:  # buffers of the full length: no growth by concatenation
            tokens, attention_mask = self.prepare_input(tokens, attention_mask)
            past_key_values = reserved_cache(self.hf_model.config, tokens.shape[1])
            done = 0
        else:
            tokens = torch.as_tensor(tokens, device=self.device)
            done = past_key_values.get_seq_length()
            attention_mask = torch.ones(
                tokens.shape[0], done + tokens.shape[1], dtype=torch.long, device=self.device
            )
        if chunk_size is None:
            chunk_size = self.chunk_size_for(done + tokens.shape[1])
        chunk_size = check_int("chunk_size", chunk_size, 1)
        n = tokens.shape[1]
        if n > chunk_size or done > 0:
            self._refuse_partial_statistics(f"a forward in chunks of {chunk_size} positions")
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

    def forward_bytes(
        self,
        shape: tuple[int, ...],
        capture: dict[str, list[int]] | None = None,
        logits: bool = False,
        reduce: Reducer | None = None,
    ) -> int:
        """Estimated bytes a one-pass forward of `shape = (batch, pos)` holds at a time in this
        model's dtype: captures, logits, one layer's eager attention scores (and their float32
        softmax) and MLP activations (`mechlens.models.memory.forward_bytes`).

            >>> model.forward_bytes((1, 4096)) < model.forward_bytes((1, 4096), logits=True)  # doctest: +SKIP
            True
        """
        dims = (self.d_model, self.n_heads, self.d_head, self.d_vocab, torch.finfo(self.dtype).bits // 8)
        return forward_bytes(
            shape, capture or {}, logits, *dims, reduced=reduce is not None, d_mlp=self.d_mlp
        )

    def check_memory(
        self,
        shape: tuple[int, ...],
        capture: dict[str, list[int]],
        logits: bool,
        reduce: Reducer | None = None,
    ) -> int:
        """`forward_bytes` of a one-pass forward; `ValueError` naming the ways out when it exceeds
        `model.memory_budget` (bytes; default 8 GiB or `$MECHLENS_MEMORY_BUDGET_GB`)."""
        batch, pos = int(shape[0]), int(shape[1])
        held = self.forward_bytes(shape, capture, logits, reduce)
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
    def intervene(self, item: Intervention) -> InterventionContext:
        """Context: apply any intervention object (`mechlens.models.interventions`) to every
        forward inside it, generation included. The named contexts below build these. The
        context may be nested in any order, entered again, and left by an exception: the model
        is always restored (`InterventionContext`).

            >>> ctx = model.add_direction(0, torch.ones(model.d_model))   # doctest: +SKIP
            >>> with ctx, ctx:                # applied twice inside, removed on exit   # doctest: +SKIP
            ...     logits = model(toks)
        """
        if not isinstance(item, Intervention):
            raise TypeError(
                f"item must be an intervention (mechlens.models.interventions), got {type(item).__name__}"
            )
        return InterventionContext(self, item)

    def _check_positions(self, positions: Any, name: str = "positions") -> list[int] | None:
        return validation.check_positions(positions, self.n_ctx, name)

    def ablate_heads(
        self,
        heads: Sequence[tuple[int, int]],
        mode: str = "zero",
        positions: Sequence[int] | None = None,
        reference: TokensLike | tuple[Tensor, Tensor] | None = None,
        rescale: str | None = None,
    ) -> contextlib.AbstractContextManager[None]:
        """Context: replace the outputs (z, before W_O) of `heads` by zero or by a mean.

        `mode="mean"` uses each head's mean z over the real tokens of `reference` (texts, ids, or
        `model.tokenize(texts)`'s `(ids, mask)`), taken on the unedited model whatever contexts
        are active, when given;
        else each sequence's mean over its own real positions of each forward pass. `positions`
        (default: all) limits where it applies.
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
            if isinstance(reference, tuple) and len(reference) == 2 and isinstance(reference[1], Tensor):
                ref, ref_mask = self.prepare_input(reference[0], reference[1], fit=False)
            else:
                ref, ref_mask = self.prepare_input(cast(TokensLike, reference), fit=False)
            active, self._interventions = self._interventions, Interventions()  # the unedited model
            try:
                _, cache = self.run_with_cache(
                    ref, ["z"], layers=sorted(by_layer), attention_mask=ref_mask, return_logits=False
                )
            finally:
                self._interventions = active
            real = ref_mask.bool()  # [batch, pos]: padding is no part of the mean
            means = {l: cache.at("z", l)[real].float().mean(0) for l in by_layer}  # [heads, d_head]
        return self.intervene(HeadAblation(by_layer, mode, means, positions, rescale))

    def scale_heads(self, scales: dict[int, Tensor]) -> contextlib.AbstractContextManager[None]:
        """Context: multiply head outputs z by factors, `scales[layer]` `[n_heads]` (every row) or
        `[batch, n_heads]` (one set per row of the call, following its prompt through `generate`).
        Differentiable in the factors (attribution patching).

            >>> with model.scale_heads({3: torch.ones(model.n_heads)}):   # doctest: +SKIP
            ...     logits = model(toks)
        """
        checked = {}
        for layer, factor in scales.items():
            factor = torch.as_tensor(factor)
            if factor.dtype == torch.bool or factor.is_complex():
                raise TypeError(f"scales[{layer}] must hold real factors, got dtype {factor.dtype}")
            factor = factor if factor.is_floating_point() else factor.float()
            if not torch.isfinite(factor.detach()).all():
                raise ValueError(f"scales[{layer}] must hold finite factors")
            if factor.shape[-1:] != (self.n_heads,) or factor.ndim > 2:
                raise ValueError(
                    f"scales[{layer}] must be [n_heads] or [batch, n_heads] (n_heads={self.n_heads}), "
                    f"got {tuple(factor.shape)}"
                )
            checked[self.check_layer(layer, "scales key")] = factor
        return self.intervene(HeadScaling(checked))  # per caller row when [batch, n_heads]

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
        per_row = not (len(keys) == 2 and all(validation.is_integer(k) for k in keys))
        spans = list(keys) if per_row else [keys]
        if not spans:
            raise ValueError("keys is an empty list: give a span (start, end) or one per batch row")
        checked: list[tuple[int, int]] = []
        for span in spans:
            if isinstance(span, str) or not isinstance(span, Sequence) or len(span) != 2:
                raise ValueError(valid)
            start, end = (
                validation.as_index(span[0], "keys entry"),
                validation.as_index(span[1], "keys entry"),
            )
            if not 0 <= start < end <= self.n_ctx:
                raise ValueError(valid)
            checked.append((start, end))
        layer_set = None if layers is None else set(self.check_layers(layers))
        if heads is not None and (isinstance(heads, str) or not isinstance(heads, Sequence | range | Tensor)):
            raise TypeError(f"heads must be a list of head indices, got {type(heads).__name__}")
        head_list = None if heads is None else [self.check_head(h, "heads entry") for h in heads]
        if head_list is not None and not head_list:
            raise ValueError("heads is empty: give at least one head (None means all of them)")
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
        scale = check_real("scale", scale)
        positions = self._check_positions(positions)
        direction = self.check_direction(direction)
        biggest = float(scale) * direction.double().abs().max()
        if self.dtype.is_floating_point and biggest > torch.finfo(self.dtype).max:
            raise ValueError(
                f"scale * direction has entries up to {float(biggest):.3g}, past the largest "
                f"{self.dtype} ({torch.finfo(self.dtype).max:.3g}): use a smaller scale"
            )
        return self.intervene(DirectionAddition(layer, direction.float(), float(scale), positions))

    def gated(
        self,
        direction: Tensor,
        layer: int,
        probe: Callable[[Tensor], Tensor],
        threshold: float,
        scale: float = 1.0,
        below: bool = True,
        start: int | Sequence[int] = 0,
    ) -> InterventionContext:
        """Context: add `scale * direction` to the residual stream leaving block `layer` at each
        token where `probe(resid)` is below `threshold` (`below=False`: above it), from position
        `start` on (one per prompt: e.g. each prompt's length, to gate generated tokens only).

        `probe` maps `[n, d_model]` float32 residuals to `[n]` scores, typically a fitted
        `LinearProbe(...).predict_proba` trained on this layer's `resid_post`. The gate reads the
        residual before the addition, per row and per token, in every forward (`generate`
        included: the prompt's forward, then one token at a time). Entering it returns the
        `GatedDirection`, whose `fired` / `scored` count the tokens per prompt: the prompt's
        once (its `n` samples share its forward), then every sample's generated tokens. A probe
        score that is not finite at a scored token raises a `ValueError`.

            >>> with model.gated(d, 4, probe.predict_proba, 0.5, scale=8.0) as gate:  # doctest: +SKIP
            ...     out = model.generate(prompts, max_new_tokens=64)
            >>> gate.total_fired                                                        # doctest: +SKIP
        """
        layer = self.check_layer(layer)
        if not callable(probe):
            raise TypeError(
                f"probe must be callable ([n, d_model] -> [n] scores), got {type(probe).__name__}"
            )
        threshold, scale = check_real("threshold", threshold), check_real("scale", scale)
        if not isinstance(below, bool):
            raise TypeError(f"below must be True or False, got {below!r}")
        starts: int | list[int]
        if isinstance(start, Sequence) and not isinstance(start, str):
            starts = [validation.as_index(s, "start entry") for s in start]
            if not starts:
                raise ValueError("start is an empty list: give one start per prompt, or one int")
        else:
            starts = validation.as_index(start, "start")
        if min(starts if isinstance(starts, list) else [starts]) < 0:
            raise ValueError(f"start must be >= 0 (each sequence's own position), got {start!r}")
        vector = self.check_direction(direction).float()
        probe_out = torch.as_tensor(probe(torch.zeros(2, self.d_model, device=self.device)))
        if probe_out.shape != (2,):
            raise ValueError(
                f"probe must map [n, d_model] to [n]; on [2, {self.d_model}] it gave {tuple(probe_out.shape)}"
            )
        item = GatedDirection(layer, vector, probe, threshold, scale, below, starts)
        return self.intervene(item)

    def patch(
        self,
        layer: int,
        positions: Sequence[int],
        values: Tensor,
        site: Literal["resid_post", "z"] = "resid_post",
        rows: Sequence[int] | None = None,
    ) -> InterventionContext:
        """Context: replace the activation at `site` of block `layer` at `positions` (each
        sequence's own index) by `values`: `[len(positions), d_model]` for "resid_post" (the
        residual leaving the block), `[len(positions), n_heads, d_head]` for "z" (head outputs
        before W_O). Every row gets the same values, also in `generate` (where the prompt holds
        the positions); `rows` limits it to some of the call's rows (prompts; default all), so one
        batch can hold several patches. `mechlens.studies.patching` builds these from another trace.

            >>> with model.patch(3, [5, 6], source_resid[5:7]):   # doctest: +SKIP
            ...     logits = model(toks)
        """
        layer = self.check_layer(layer)
        if site not in ("resid_post", "z"):
            raise ValueError(f"site must be 'resid_post' or 'z', got {site!r}")
        checked = self._check_positions(positions)
        if not checked:
            raise ValueError("positions must list at least one position")
        if len(set(checked)) != len(checked):
            raise ValueError(f"positions must not repeat, got {checked}")
        if not isinstance(values, Tensor) or not values.is_floating_point():
            raise TypeError(f"values must be a floating-point tensor, got {type(values).__name__}")
        shape = (
            (len(checked), self.d_model)
            if site == "resid_post"
            else (len(checked), self.n_heads, self.d_head)
        )
        if tuple(values.shape) != shape:
            raise ValueError(f"values must be {list(shape)} for site={site!r}, got {list(values.shape)}")
        if not torch.isfinite(values).all():
            raise ValueError("values must be finite")
        row_list = None
        if rows is not None:
            if isinstance(rows, str) or not isinstance(rows, Sequence) or not rows:
                raise ValueError(f"rows must be a non-empty list of row indices, got {rows!r}")
            row_list = [validation.as_index(r, "rows entry") for r in rows]
            if min(row_list) < 0:
                raise ValueError(f"rows must be >= 0, got {row_list}")
        return self.intervene(ActivationPatch(site, layer, checked, values.detach().float(), row_list))

    def project_out(
        self, direction: Tensor, layers: Sequence[int] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Context: remove the component along `direction` from the residual stream leaving
        each block in `layers` (default: every block)."""
        layer_set = None if layers is None else set(self.check_layers(layers))
        return self.intervene(DirectionProjection(unit_vector(self.check_direction(direction)), layer_set))

    @contextlib.contextmanager
    def trainable_blocks(self, first: int) -> Iterator[list[nn.Parameter]]:
        """Context yielding the parameters of blocks `first..` and of the final norm with gradients
        on, every other weight frozen. Nested contexts train the union of their blocks, whatever
        order they are left in; when the last one closes every weight's `requires_grad` is as
        before the first.

            >>> with model.trainable_blocks(model.n_layers - 2) as params:   # doctest: +SKIP
            ...     opt = torch.optim.AdamW(params)
        """
        first = self.check_layer(first, "first")
        blocks = require_submodule(self.hf_model, self.arch.layers_path)
        modules = [*list(blocks)[first:], require_submodule(self.hf_model, self.arch.norm_path)]
        params = list(dict.fromkeys(p for m in modules for p in m.parameters()))
        if not self._trainable:
            self._grad_flags = {p: p.requires_grad for p in self.hf_model.parameters()}
        self._trainable.append(params)
        self._apply_trainable()
        try:
            yield params
        finally:
            index = next(i for i in range(len(self._trainable) - 1, -1, -1) if self._trainable[i] is params)
            del self._trainable[index]
            self._apply_trainable()

    def _apply_trainable(self) -> None:
        """Gradients on for the parameters of the open `trainable_blocks` contexts, off elsewhere;
        with none open, every flag as it was before the first."""
        if not self._trainable:
            for p, flag in self._grad_flags.items():
                p.requires_grad_(flag)
            return
        self.hf_model.requires_grad_(False)
        for params in self._trainable:
            for p in params:
                p.requires_grad_(True)

    # ---------------------------------------------------------------- prefix reuse
    def cache_prefix(self, tokens: Tensor | str) -> Prefix:
        """Run one sequence once and keep its KV cache, to continue from any point of it later.

        >>> prefix = model.cache_prefix(toks)                  # doctest: +SKIP
        >>> logits = model.continue_prefix(prefix, suffixes, upto=5)   # doctest: +SKIP
        """
        tokens, mask = self.prepare_input(tokens, fit=False)  # contexts may point at the suffix to come
        if tokens.shape[0] != 1:
            raise ValueError(f"cache_prefix takes one sequence, got a batch of {tokens.shape[0]}")
        with torch.no_grad():
            out = self.forward(tokens, mask, use_cache=True)
        return Prefix(tokens, out.past_key_values, _logits(out), list(self._interventions.items))

    def continue_prefix(self, prefix: Prefix, suffix: Tensor, upto: int | None = None) -> Tensor:
        """Logits `[batch, suffix_pos, vocab]` of `suffix [batch, suffix_pos]` run after the first
        `upto` tokens of `prefix` (default: all of them), each row after the same prefix.

        Only the suffix is computed; the active contexts apply to it (positions count from the
        start of the prefix). Equal to running `prefix[:upto] + suffix` from scratch: so the
        contexts in force now must be those the prefix was cached under, plus any that change
        nothing the suffix reads from the first `upto` positions (`positions=`, `queries=` or a
        suppressed span at or after `upto`, or a span of every layer and head ending at or after
        it); anything else raises a `ValueError`.
        """
        n = prefix.tokens.shape[1]
        upto = n if upto is None else validation.as_index(upto, "upto")
        if not 1 <= upto <= n:
            raise ValueError(f"upto must lie in 1..{n} (the prefix has {n} tokens), got {upto}")
        suffix = torch.as_tensor(suffix).to(self.device)
        if suffix.ndim == 1:
            suffix = suffix[None]
        if suffix.ndim != 2 or suffix.shape[1] == 0:
            raise ValueError(
                f"suffix must be token ids [batch, pos] with pos >= 1, got shape {tuple(suffix.shape)}"
            )
        if not isinstance(prefix, Prefix):
            raise TypeError(f"prefix must come from model.cache_prefix, got {type(prefix).__name__}")
        self._check_prefix_interventions(prefix, upto)
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

    def _check_prefix_interventions(self, prefix: Prefix, upto: int) -> None:
        """The cached prefix must carry exactly the interventions now in force, but for those that
        leave its first `upto` positions alone."""
        now = list(self._interventions.items)
        for it in prefix.interventions:
            if not any(x is it for x in now):
                raise ValueError(
                    "the prefix was cached under an intervention that is no longer active: its keys and "
                    "values still carry it; cache the prefix again under the contexts in force now"
                )
        for it in now:
            per_row = (isinstance(it, ActivationPatch) and it.rows is not None) or (
                isinstance(it, GatedDirection) and isinstance(it.start, list)
            )
            if per_row and not _leaves_prefix(it, upto):
                raise ValueError(
                    f"a per-row {type(it).__name__} (rows= or a list start=) acts on the first {upto} "
                    "positions, which the cached prefix holds as one row for every suffix: run the full "
                    "sequences instead"
                )
            if not any(x is it for x in prefix.interventions) and not _leaves_prefix(it, upto):
                raise ValueError(
                    f"an intervention entered after the prefix was cached ({type(it).__name__}) changes "
                    f"its first {upto} positions, which the cache holds as they were: cache the prefix "
                    "again inside the context"
                )

    # ---------------------------------------------------------------- generation
    def generate(
        self,
        prompts: TokensLike,
        sampling: Sampling | None = None,
        *,
        attention_mask: Tensor | None = None,
        seeds: Sequence[int] | None = None,
        batch_size: int = 16,
        progress: bool = False,
        path: str = "auto",
        **settings: Any,
    ) -> Generation:
        """Sample continuations of each prompt under the active interventions.

        Args:
            prompts: one text, a list of texts, or token ids `[batch, pos]` (for instance a trace
                cut at a sentence, which decoding and re-tokenising might not reproduce); padded
                ids (left or right) need their `attention_mask`.
            sampling: a `Sampling` (default `Sampling()`); keyword `settings` override its fields:
                `max_new_tokens`, `temperature` (0 = greedy), `top_p`, `n`, `seed`, `stop_at_eos`.
            seeds: one seed per prompt (default: `sampling.seed` for every prompt).
            batch_size: rows per forward; results do not depend on it.
            path: "auto" runs the plain Hugging Face model when no intervention is active (the fast
                path: no hooks, only the last position unembedded) and the hooked forward
                otherwise, but only for the prompts when every active intervention lies inside
                them (a patch or positioned edit of prompt positions); "hooked" always hooks (the
                reference); "plain" refuses interventions. All give the same tokens.

        Each prompt runs once and its KV cache is shared by its `n` samples. Sample j of prompt i
        draws from its own generator seeded from `(seeds[i], j)` (`row_seed`), so a prompt gives
        the same continuations alone or in any batch, whatever precedes it. Per-row
        interventions (one suppressed span per row) hold one entry per prompt, shared by its `n`
        samples. `rescale="norm"` takes its statistic per step (the prompt, then each new token).

            >>> model.generate("2+2=", max_new_tokens=4, temperature=0).texts  # doctest: +SKIP
        """
        sampling = (sampling or Sampling()).replace(**settings) if settings else (sampling or Sampling())
        batch_size = check_int("batch_size", batch_size, 1)
        tokens, mask = self.prepare_input(prompts, attention_mask, fit=False)
        tokens, mask = left_align(tokens, mask, self.tokenizer.pad_token_id)
        prompt_seeds = [sampling.seed] * len(tokens) if seeds is None else check_seeds(seeds, len(tokens))
        for it in self._interventions.of(HeadAblation):
            if it.mode == "mean" and it.means is None:
                raise ValueError("mean ablation during generate needs reference= tokens for the means")
        for it in self._interventions.of(AttentionSuppression):
            if isinstance(it.keys, list) and len(it.keys) != len(tokens):
                raise ValueError(
                    f"{len(it.keys)} suppressed spans (keys) for {len(tokens)} prompts: give one span per "
                    "prompt (its n samples share it)"
                )
        self._check_row_settings(len(tokens), "prompts")
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
            shortest = int(rows_mask.sum(1).min())
            items = self._interventions.items
            later = (  # interventions inside the prompts only: the new tokens need no hooks
                plain_step(self)
                if path == "auto" and items and all(_prompt_only(it, shortest) for it in items)
                else None
            )
            new_tokens += sample_batch(
                self, rows, rows_mask[:, -width:], sampling, prompt_seeds[i : i + per_batch], i, step, later
            )
        texts = [self.tokenizer.decode(row.tolist()) for row in new_tokens]
        if isinstance(prompts, Tensor):
            shown = [self.tokenizer.decode(t[m.bool()].tolist()) for t, m in zip(tokens, mask, strict=True)]
        else:
            shown = [prompts] if isinstance(prompts, str) else list(prompts)
        return Generation(shown, texts, new_tokens, sampling.n, sampling)
