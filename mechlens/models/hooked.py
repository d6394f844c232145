"""The HookedModel protocol: one small API over every backend.

Every method in mechlens is written against this class. A backend subclass supplies one
primitive, `_run`, which runs a forward pass while applying the active interventions and
capturing the requested activations; everything else (tokenisation, validation, contexts,
unembedding, generation) lives here once.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> toks = model.to_tokens("The cat sat")
    >>> logits, cache = model.run_with_cache(toks, names=["resid_post", "pattern"])
    >>> cache["pattern"].shape[0] == model.n_layers
    True
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechlens.models.architecture import Architecture, get_submodule
from mechlens.models.interventions import (
    AttentionSuppression,
    DirectionAddition,
    DirectionProjection,
    HeadAblation,
    Interventions,
    Positions,
)

CACHE_NAMES = ("resid_pre", "resid_post", "pattern", "z")
"""Activation names `run_with_cache` understands (TransformerLens's hook-point words):
resid_pre [batch, pos, d_model] entering a block; resid_post [batch, pos, d_model] leaving it;
pattern [batch, heads, q_pos, k_pos] post-softmax attention; z [batch, pos, heads, d_head] head
outputs before W_O."""


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
class RunRequest:
    """One forward pass for a backend's `_run`: inputs, what to capture, where to stop."""

    tokens: Tensor  # [batch, q]
    attention_mask: Tensor  # [batch, k], k = cached + q
    position_ids: Tensor  # [batch, q]
    pos: Positions
    capture: dict[str, list[int]]  # name -> layers
    stop_after: int | None = None  # last layer to run; None runs to the logits
    past_key_values: Any = None
    use_cache: bool = False
    start_at: int | None = None  # run blocks start_at.. only, from `resid_in`
    resid_in: Tensor | None = None  # [batch, q, d_model], the residual entering block start_at
    reduce: Callable[[str, int, Tensor], Tensor] | None = None  # applied to each capture as it is taken

    def keep(self, name: str, layer: int, tensor: Tensor) -> Tensor:
        """What a backend stores for a captured activation: reduced, detached unless it needs grad."""
        if self.reduce is not None:
            tensor = self.reduce(name, layer, tensor)
        return tensor if tensor.requires_grad else tensor.detach()


@dataclass
class RunOutput:
    """What a backend's `_run` returns."""

    logits: Tensor | None  # [batch, pos, vocab], None when stopped early
    acts: dict[str, dict[int, Tensor]] = field(default_factory=dict)  # name -> layer -> tensor
    past_key_values: Any = None


@dataclass
class Prefix:
    """One sequence's KV cache (from `HookedModel.cache_prefix`), reusable by `continue_prefix`."""

    tokens: Tensor  # [1, pos]
    past_key_values: Any
    logits: Tensor  # [1, pos, vocab]


@dataclass
class Generation:
    """Sampled continuations, prompt-major: rows `i*n ... i*n+n-1` continue prompt i."""

    prompts: list[str]
    texts: list[str]  # decoded new tokens, up to (not including) end-of-sequence
    tokens: list[Tensor]  # new token ids per row, [new_pos]
    n: int


class HookedModel:
    """A causal LM whose activations can be read and edited, backend-independent."""

    backend: str = "abstract"

    def __init__(self, hf_model: nn.Module, tokenizer, name: str | None = None):
        self.arch = Architecture.of(hf_model)
        self.hf_model = hf_model.eval()
        # the HF names of the weights, taken before a backend rewraps modules (tensors kept by reference)
        self._hf_state = hf_model.state_dict(keep_vars=True)
        self.tokenizer = tokenizer
        self.name = name or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        self._interventions = Interventions()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

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
        if not texts or any(not t for t in texts):
            raise ValueError("empty text: give at least one non-empty string")
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        tokens, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        self._check_tokens(tokens)
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
    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] == 0:
            raise ValueError("empty input: tokens have 0 positions")
        if tokens.shape[1] > self.n_ctx:
            raise ValueError(
                f"input of {tokens.shape[1]} tokens is longer than the context window "
                f"({self.n_ctx} tokens) of {self.name}"
            )
        if tokens.min() < 0 or tokens.max() >= self.d_vocab:
            raise ValueError(f"token ids must lie in [0, {self.d_vocab}); got {tokens.min()}..{tokens.max()}")

    def _check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer!r} out of range: valid layers are 0..{self.n_layers - 1}")
        return layer

    def _check_head(self, head: int) -> int:
        if not isinstance(head, int) or not 0 <= head < self.n_heads:
            raise ValueError(f"head {head!r} out of range: valid heads are 0..{self.n_heads - 1}")
        return head

    def _check_direction(self, direction: Tensor) -> Tensor:
        direction = torch.as_tensor(direction)
        if direction.shape != (self.d_model,):
            raise ValueError(f"direction must have shape ({self.d_model},), got {tuple(direction.shape)}")
        if not torch.isfinite(direction).all() or direction.norm() == 0:
            raise ValueError("direction must be finite and non-zero")
        return direction.to(self.device)

    def _as_input(
        self, tokens: Tensor | str | Sequence[str], attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Validated `(tokens [batch, pos], attention_mask)` from text or ids; the active contexts'
        spans and positions must fit the input."""
        if isinstance(tokens, str) or (isinstance(tokens, Sequence) and not isinstance(tokens, Tensor)):
            tokens, attention_mask = self.tokenize(tokens)
        else:
            tokens = torch.as_tensor(tokens)
            if tokens.ndim == 1:
                tokens = tokens[None]
            self._check_tokens(tokens)
            tokens = tokens.to(self.device)
            if attention_mask is None:
                attention_mask = torch.ones_like(tokens)
            elif attention_mask.shape != tokens.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != tokens {tuple(tokens.shape)}"
                )
        self._check_interventions_fit(tokens.shape[1])
        return tokens, attention_mask.to(self.device)

    def _check_interventions_fit(self, n_pos: int) -> None:
        """Spans and positions of the active contexts must lie inside an input of `n_pos` tokens
        (generation is exempt: there they may point at tokens still to come)."""
        for it in self._interventions.items:
            if isinstance(it, AttentionSuppression) and max(e for _, e in it.spans) > n_pos:
                raise ValueError(f"suppressed span {it.keys} is past the end of the input ({n_pos} tokens)")
            wanted = list(getattr(it, "positions", None) or []) + list(getattr(it, "queries", None) or [])
            if any(not 0 <= p < n_pos for p in wanted):
                raise ValueError(f"positions {wanted} must lie in 0..{n_pos - 1} (input of {n_pos} tokens)")

    # ---------------------------------------------------------------- forward
    def _forward(
        self,
        tokens: Tensor,
        attention_mask: Tensor,
        capture: dict[str, list[int]] | None = None,
        stop_after: int | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        start_at: int | None = None,
        resid_in: Tensor | None = None,
        reduce: Callable[[str, int, Tensor], Tensor] | None = None,
    ) -> RunOutput:
        """Run `_run` with positions worked out from the mask (which covers cached keys too).

        With `start_at`, `resid_in [batch, q, d_model]` replaces the residual entering that block
        (backends that can skip the blocks below do)."""
        pos = Positions.from_mask(attention_mask, tokens.shape[1])
        request = RunRequest(
            tokens,
            attention_mask,
            pos.query.clamp(min=0),
            pos,
            capture or {},
            stop_after,
            past_key_values,
            use_cache,
            start_at,
            resid_in,
            reduce,
        )
        return self._run(request)

    @contextlib.contextmanager
    def _only_blocks_from(self, first: int) -> Iterator[bool]:
        """Context: the HF model's layer loop sees blocks `first..` only, so the blocks below are not
        computed (their output is replaced anyway). Yields False, changing nothing, where per-layer
        settings are looked up by loop index and would shift (e.g. sliding-window layer types)."""
        parent_path, _, attr = self.arch.layers_path.rpartition(".")
        parent = get_submodule(self.hf_model, parent_path) if parent_path else self.hf_model
        blocks = getattr(parent, attr)
        types = getattr(self.hf_model.config.get_text_config(), "layer_types", None)
        shifts = types is not None and any(types[i] != types[first + i] for i in range(len(blocks) - first))
        if first == 0 or shifts:
            yield False
            return
        setattr(parent, attr, nn.ModuleList(list(blocks)[first:]))
        try:
            yield True
        finally:
            setattr(parent, attr, blocks)

    def _run(self, req: RunRequest) -> RunOutput:
        """Run one forward pass applying `self._interventions`; the one primitive a backend writes."""
        raise NotImplementedError

    def __call__(self, tokens: Tensor | str | Sequence[str], attention_mask: Tensor | None = None) -> Tensor:
        """Logits `[batch, pos, vocab]` under the active interventions."""
        tokens, attention_mask = self._as_input(tokens, attention_mask)
        with torch.no_grad():
            return self._forward(tokens, attention_mask).logits

    def run_with_cache(
        self,
        tokens: Tensor | str | Sequence[str],
        names: Sequence[str] = ("resid_post",),
        layers: Sequence[int] | None = None,
        attention_mask: Tensor | None = None,
        return_logits: bool = True,
        grad: bool = False,
        reduce: Callable[[str, int, Tensor], Tensor] | None = None,
    ) -> tuple[Tensor | None, ActivationCache]:
        """Logits and the named activations, stacked as `[layers, batch, ...]`.

        Only the requested names and layers are captured. With `return_logits=False` the forward
        stops after the last requested layer and the logits are None. `reduce(name, layer,
        tensor)` shrinks each activation as soon as it is captured, so that only its result is
        kept (e.g. attention pooled over sentences instead of `[heads, q, k]` for every layer):

            >>> _, c = model.run_with_cache(toks, ["pattern"],        # doctest: +SKIP
            ...     reduce=lambda name, layer, p: p[..., -1, :])    # last query's row per layer
        """
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in CACHE_NAMES]
        if unknown or not names:
            raise ValueError(f"unknown cache name(s) {unknown}: valid names are {list(CACHE_NAMES)}")
        layer_list = list(range(self.n_layers)) if layers is None else [self._check_layer(l) for l in layers]
        if not layer_list:
            raise ValueError("layers is empty: give at least one layer")
        tokens, attention_mask = self._as_input(tokens, attention_mask)
        capture = {n: layer_list for n in names}
        stop_after = None if return_logits else max(layer_list)
        with torch.set_grad_enabled(grad):
            out = self._forward(tokens, attention_mask, capture, stop_after, reduce=reduce)
        data = {n: torch.stack([out.acts[n][l] for l in layer_list]) for n in names}
        return out.logits, ActivationCache(data, {n: layer_list for n in names})

    def final_norm(self, resid: Tensor) -> Tensor:
        """The model's final normalisation, applied to `resid [..., d_model]`."""
        return get_submodule(self.hf_model, self.arch.norm_path)(resid)

    def unembed(self, resid: Tensor, normalize: bool = True) -> Tensor:
        """Final norm + unembedding (+ logit soft-capping where the model has it) -> logits.

        `resid [..., d_model]` -> `[..., d_vocab]`. Each input is normalised by its own norm, so
        the logit lens of the last layer equals the model's logits.
        """
        if resid.shape[-1] != self.d_model:
            raise ValueError(f"resid last dim must be d_model={self.d_model}, got {resid.shape[-1]}")
        x = self.final_norm(resid) if normalize else resid
        logits = get_submodule(self.hf_model, self.arch.head_path)(x)
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
    def _intervene(self, item) -> Iterator[None]:
        self._interventions.items.append(item)
        try:
            yield
        finally:
            self._interventions.items.remove(item)

    def ablate_heads(
        self,
        heads: Sequence[tuple[int, int]],
        mode: str = "zero",
        positions: Sequence[int] | None = None,
        reference: Tensor | str | Sequence[str] | None = None,
    ) -> contextlib.AbstractContextManager[None]:
        """Context: replace the outputs (z, before W_O) of `heads` by zero or by a mean.

        `mode="mean"` uses each head's mean z over `reference` tokens when given, else over the
        real positions of each forward pass. `positions` (default: all) limits where it applies.

            >>> with model.ablate_heads([(0, 1), (1, 0)]):  # doctest: +SKIP
            ...     logits = model(toks)
        """
        if mode not in ("zero", "mean"):
            raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            self._check_layer(layer)
            by_layer.setdefault(layer, []).append(self._check_head(head))
        if not by_layer:
            raise ValueError("heads is empty: give (layer, head) pairs")
        means = None
        if mode == "mean" and reference is not None:
            _, cache = self.run_with_cache(reference, ["z"], layers=sorted(by_layer), return_logits=False)
            means = {l: cache.at("z", l).flatten(0, 1).mean(0) for l in by_layer}  # [heads, d_head]
        return self._intervene(HeadAblation(by_layer, mode, means, positions))

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
        per_row = not (len(keys) == 2 and all(isinstance(k, int) for k in keys))
        spans = [tuple(k) for k in keys] if per_row else [tuple(keys)]
        for span in spans:
            ok = len(span) == 2 and all(isinstance(k, int) for k in span)
            if not ok or not 0 <= span[0] < span[1] <= self.n_ctx:
                raise ValueError(
                    f"keys must be a span (start, end) with 0 <= start < end <= {self.n_ctx}, or a list "
                    f"of such spans (one per batch row); got {keys}"
                )
        if not spans:
            raise ValueError("keys is an empty list: give a span (start, end) or one per batch row")
        layer_set = None if layers is None else {self._check_layer(l) for l in layers}
        head_list = None if heads is None else [self._check_head(h) for h in heads]
        return self._intervene(
            AttentionSuppression(spans if per_row else spans[0], queries, layer_set, head_list)
        )

    def add_direction(
        self,
        layer: int,
        direction: Tensor,
        scale: float = 1.0,
        positions: Sequence[int] | None = None,
    ) -> contextlib.AbstractContextManager[None]:
        """Context: add `scale * direction` to the residual stream leaving block `layer`."""
        self._check_layer(layer)
        return self._intervene(DirectionAddition(layer, self._check_direction(direction), scale, positions))

    def project_out(
        self, direction: Tensor, layers: Sequence[int] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Context: remove the component along `direction` from the residual stream leaving
        each block in `layers` (default: every block)."""
        layer_set = None if layers is None else {self._check_layer(l) for l in layers}
        return self._intervene(DirectionProjection(self._check_direction(direction), layer_set))

    # ---------------------------------------------------------------- prefix reuse
    def cache_prefix(self, tokens: Tensor | str) -> Prefix:
        """Run one sequence once and keep its KV cache, to continue from any point of it later.

        >>> prefix = model.cache_prefix(toks)                  # doctest: +SKIP
        >>> logits = model.continue_prefix(prefix, suffixes, upto=5)   # doctest: +SKIP
        """
        tokens, mask = self._as_input(tokens, None)
        if tokens.shape[0] != 1:
            raise ValueError(f"cache_prefix takes one sequence, got a batch of {tokens.shape[0]}")
        with torch.no_grad():
            out = self._forward(tokens, mask, use_cache=True)
        return Prefix(tokens, out.past_key_values, out.logits)

    def continue_prefix(self, prefix: Prefix, suffix: Tensor, upto: int | None = None) -> Tensor:
        """Logits `[batch, suffix_pos, vocab]` of `suffix [batch, suffix_pos]` run after the first
        `upto` tokens of `prefix` (default: all of them), each row after the same prefix.

        Only the suffix is computed; the active contexts apply to it (positions count from the
        start of the prefix). Equal to running `prefix[:upto] + suffix` from scratch.
        """
        n = prefix.tokens.shape[1]
        upto = n if upto is None else upto
        if not 1 <= upto <= n:
            raise ValueError(f"upto must lie in 1..{n} (the prefix has {n} tokens), got {upto}")
        suffix = torch.as_tensor(suffix).to(self.device)
        if suffix.ndim == 1:
            suffix = suffix[None]
        self._check_tokens(torch.cat([prefix.tokens[:, :upto].expand(len(suffix), -1), suffix], 1))
        self._check_interventions_fit(upto + suffix.shape[1])
        past = copy.deepcopy(prefix.past_key_values)
        if upto < n:
            past.crop(upto - n)  # a negative count removes that many positions from the end
        if len(suffix) > 1:
            past.batch_repeat_interleave(len(suffix))
        mask = torch.ones(len(suffix), upto + suffix.shape[1], dtype=torch.long, device=self.device)
        with torch.no_grad():
            return self._forward(suffix, mask, past_key_values=past, use_cache=True).logits

    # ---------------------------------------------------------------- generation
    def generate(
        self,
        prompts: str | Sequence[str] | Tensor,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        n: int = 1,
        seed: int = 0,
        batch_size: int = 16,
        stop_at_eos: bool = True,
        progress: bool = False,
    ) -> Generation:
        """Sample `n` continuations of each prompt under the active interventions.

        `prompts` are strings or token ids `[batch, pos]` (for instance a trace cut at a sentence,
        which decoding and re-tokenising might not reproduce). Batched (`batch_size` rows a
        forward) with the prompt's KV cache computed once and shared by its `n` samples. Row r
        draws from its own generator seeded `(seed, r)`, so results do not depend on
        `batch_size`. `temperature=0` is greedy.

            >>> model.generate("2+2=", max_new_tokens=4, temperature=0).texts  # doctest: +SKIP
        """
        if isinstance(prompts, Tensor):
            prompts = prompts[None] if prompts.ndim == 1 else prompts
            self._check_tokens(prompts)
            prompt_list = list(prompts)  # each [pos]
        else:
            prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        if max_new_tokens < 1 or n < 1 or batch_size < 1:
            raise ValueError("max_new_tokens, n and batch_size must be >= 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        for it in self._interventions.of(HeadAblation):
            if it.mode == "mean" and it.means is None:
                raise ValueError("mean ablation during generate needs reference= tokens for the means")
        per_batch = max(1, batch_size // n)
        texts: list[str] = []
        new_tokens: list[Tensor] = []
        chunks = range(0, len(prompt_list), per_batch)
        for i in tqdm(chunks, desc="generate", disable=not progress):
            chunk = prompt_list[i : i + per_batch]
            rows = self._sample(
                chunk,
                max_new_tokens,
                temperature,
                top_p,
                n,
                seed,
                first_row=i * n,
                stop_at_eos=stop_at_eos,
            )
            for row in rows:
                new_tokens.append(row)
                texts.append(self.tokenizer.decode(row.tolist()))
        shown = [p if isinstance(p, str) else self.tokenizer.decode(p.tolist()) for p in prompt_list]
        return Generation(shown, texts, new_tokens, n)

    @torch.no_grad()
    def _sample(
        self,
        prompts: list[str] | list[Tensor],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        n: int,
        seed: int,
        first_row: int,
        stop_at_eos: bool,
    ) -> list[Tensor]:
        if isinstance(prompts[0], Tensor):  # token ids, all of one length
            tokens = torch.stack(prompts).to(self.device)
            mask = torch.ones_like(tokens)
        else:
            tokens, mask = self.tokenize(prompts)
        if tokens.shape[1] + max_new_tokens > self.n_ctx:
            raise ValueError(
                f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"the context window ({self.n_ctx})"
            )
        out = self._forward(tokens, mask, use_cache=True)
        past = out.past_key_values
        if n > 1:  # share the prompt's KV cache across its n samples
            past.batch_repeat_interleave(n)
            mask = mask.repeat_interleave(n, 0)
        logits = out.logits[:, -1].float().repeat_interleave(n, 0)  # [rows, vocab]
        rows = logits.shape[0]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + first_row + r) for r in range(rows)]
        eos = self.tokenizer.eos_token_id if stop_at_eos else None
        generated = torch.full((rows, max_new_tokens), self.tokenizer.pad_token_id)  # [rows, new]
        lengths = torch.full((rows,), max_new_tokens)
        active = torch.arange(rows)  # rows still sampling; finished rows leave the batch
        for step in range(max_new_tokens):
            nxt = _sample_next(logits, temperature, top_p, [gens[r] for r in active.tolist()])
            generated[active, step] = nxt.cpu()
            finished = (nxt == eos).cpu() if eos is not None else torch.zeros(len(active), dtype=torch.bool)
            lengths[active[finished]] = step  # a row ends before its end-of-sequence token
            if finished.all() or step == max_new_tokens - 1:
                break
            if finished.any():
                keep = (~finished).nonzero()[:, 0]
                active, nxt, mask = active[keep], nxt[keep.to(nxt.device)], mask[keep.to(mask.device)]
                past.batch_select_indices(keep.to(self.device))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = self._forward(nxt[:, None].to(self.device), mask, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1].float()
        return [generated[r, : lengths[r]] for r in range(rows)]


def _sample_next(logits: Tensor, temperature: float, top_p: float, gens: list[torch.Generator]) -> Tensor:
    """One token per row of `logits [rows, vocab]`: greedy, or temperature + nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1).cpu()
    if top_p < 1:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.stack([torch.multinomial(probs[r], 1, generator=g)[0] for r, g in enumerate(gens)])
