"""Intervention specs and the tensor operations that carry them out.

Backends only decide *where* a tensor is reachable (a TransformerLens hook point, an nnsight
envoy); *what* happens to it is written once here, so every backend applies the same maths.

Positions are each sequence's own token indices (0 = its first real token), also under left
padding and a KV cache: `Positions.query[b, i]` is the index of the i-th token of this forward
in sequence b (-1 for padding), `Positions.key` the same for every key, cached ones included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class Positions:
    """Real token indices of the queries (this forward) and keys (cache + this forward), and
    which of the caller's rows each batch row is (`rows`: per-row settings such as one suppressed
    span per row follow their row when `generate` repeats rows for `n` samples or drops the
    finished ones)."""

    query: Tensor  # [batch, q]
    key: Tensor  # [batch, k]
    rows: Tensor  # [batch]: the caller's row index of each batch row

    @classmethod
    def from_mask(cls, attention_mask: Tensor, n_new: int, rows: Tensor | None = None) -> Positions:
        """From the attention mask over all keys [batch, k], the number of new tokens and the
        caller's row of each batch row (default: row b is row b)."""
        key = attention_mask.long().cumsum(-1) - 1  # [batch, k]
        key = key.masked_fill(attention_mask == 0, -1)
        if rows is None:
            rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
        return cls(query=key[:, -n_new:], key=key, rows=rows.to(attention_mask.device))


def _select(pos: Tensor, positions: Sequence[int] | None) -> Tensor:
    """Bool mask of entries of `pos` that are real and (if given) listed in `positions`."""
    if positions is None:
        return pos >= 0
    wanted = torch.as_tensor(list(positions), device=pos.device)
    return (pos >= 0) & torch.isin(pos, wanted)


@dataclass
class HeadAblation:
    """Replace the outputs z of some heads (before W_O) by zero or by a mean.

    Without `means`, mode "mean" uses each sequence's own mean over its real positions of this
    forward. `rescale="norm"` then scales each sequence's z (all heads, its real positions of this
    forward, all head dimensions) back to its norm before the ablation, as the RefusalCliff
    attention forward (`src/model/modeling_llama.py`) does for the whole batch tensor; per
    sequence, results do not depend on batching. Both are statistics of one forward
    (`per_forward_statistic`): a chunked or KV-cached continuation would compute them over part
    of the sequence, so those paths refuse them (`generate` documents its per-step use)."""

    heads: dict[int, list[int]]  # layer -> heads
    mode: str = "zero"  # "zero" | "mean"
    means: dict[int, Tensor] | None = None  # layer -> [n_heads, d_head], from a reference
    positions: Sequence[int] | None = None
    rescale: str | None = None  # None | "norm"

    @property
    def per_forward_statistic(self) -> bool:
        """Whether the replacement depends on the other positions of the same forward."""
        return self.rescale == "norm" or (self.mode == "mean" and self.means is None)

    def apply(self, layer: int, z: Tensor, pos: Positions) -> Tensor:
        """z: [batch, q, n_heads, d_head] -> same, with the listed heads replaced."""
        heads = self.heads.get(layer)
        if not heads:
            return z
        sel = _select(pos.query, self.positions)[:, :, None, None]  # [batch, q, 1, 1]
        if self.mode == "zero":
            repl = torch.zeros_like(z[:, :, heads])
        elif self.means is not None:
            repl = self.means[layer][heads].to(z)[None, None].expand_as(z[:, :, heads])
        else:  # each sequence's mean over its real positions of this forward
            real = (pos.query >= 0)[:, :, None, None].to(z.dtype)  # [batch, q, 1, 1]
            mean = (z[:, :, heads] * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp(min=1)
            repl = mean.expand_as(z[:, :, heads])
        before = z
        z = z.clone()
        z[:, :, heads] = torch.where(sel, repl, z[:, :, heads])
        if self.rescale == "norm":
            real = (pos.query >= 0)[:, :, None, None].to(z.dtype)  # [batch, q, 1, 1]
            norm_before = (before * real).flatten(1).norm(dim=1)  # [batch]
            norm_after = (z * real).flatten(1).norm(dim=1)
            ratio = norm_before / norm_after.clamp_min(torch.finfo(z.dtype).tiny)
            z = z * torch.where(norm_after > 0, ratio, torch.ones_like(ratio))[:, None, None, None]
        return z


@dataclass
class HeadScaling:
    """Multiply each head's output z by a factor: `scales[layer]` is `[n_heads]` (every row) or
    `[rows, n_heads]`, one set per row: per caller's row (`per_row="caller"`, `Positions.rows`:
    it follows its prompt through `generate`), or per row of the forward itself
    (`per_row="forward"`, e.g. one head zeroed per row in a batched sweep). Differentiable:
    gradients with respect to the factors give attribution patching."""

    scales: dict[int, Tensor]
    per_row: Literal["caller", "forward"] = "caller"

    def apply(self, layer: int, z: Tensor, pos: Positions) -> Tensor:
        if layer not in self.scales:
            return z
        scale = self.scales[layer].to(z)
        if scale.ndim == 2 and self.per_row == "caller":
            if int(pos.rows.max()) >= len(scale):
                raise ValueError(
                    f"scales[{layer}] holds {len(scale)} rows, but row {int(pos.rows.max())} runs"
                )
            scale = scale[pos.rows]
        elif scale.ndim == 2 and len(scale) != z.shape[0]:
            raise ValueError(f"scales[{layer}] holds {len(scale)} rows for a forward of {z.shape[0]}")
        return z * scale.reshape(-1, 1, z.shape[2], 1)  # [1 | batch, 1, heads, 1]


@dataclass
class AttentionSuppression:
    """Set pre-softmax scores from `queries` to keys in [start, end) to the dtype minimum.

    `keys` is one span for every row, or a list with one span per batch row."""

    keys: tuple[int, int] | list[tuple[int, int]]
    queries: Sequence[int] | None = None
    layers: set[int] | None = None
    heads: list[int] | None = None

    @property
    def spans(self) -> list[tuple[int, int]]:
        return list(self.keys) if isinstance(self.keys, list) else [self.keys]

    def active(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def mask(self, pos: Positions) -> Tensor:
        """Bool [batch, q, k]: True where the score is suppressed.

        A query whose every visible key lies in the span (only possible when the span starts at
        0) keeps its scores: a softmax over nothing but masked entries has no meaning.
        """
        spans = torch.tensor(self.spans, device=pos.key.device)  # [1 | rows, 2]
        if isinstance(self.keys, list):  # one span per caller's row
            if int(pos.rows.max()) >= len(spans):
                raise ValueError(f"{len(spans)} suppressed spans for row {int(pos.rows.max())} (keys)")
            spans = spans[pos.rows]  # [batch, 2]
        start, end = spans[:, :1], spans[:, 1:]  # [1 | batch, 1]
        key_in = (pos.key >= start) & (pos.key < end)  # [batch, k]
        query_sel = _select(pos.query, self.queries)  # [batch, q]
        has_other_key = (pos.query >= end) | (start > 0)  # [batch, q]
        return (query_sel & has_other_key)[:, :, None] & key_in[:, None, :]

    def apply_to_scores(self, scores: Tensor, pos: Positions) -> Tensor:
        """scores: [batch, heads, q, k] pre-softmax -> suppressed copy."""
        m = self.mask(pos)[:, None]  # [batch, 1, q, k]
        if self.heads is not None:
            head_sel = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
            head_sel[self.heads] = True
            m = m & head_sel[None, :, None, None]
        return scores.masked_fill(m, torch.finfo(scores.dtype).min)


def unit_vector(direction: Tensor) -> Tensor:
    """`direction / |direction|` in float32, scale-safe: divided by its largest entry first, so
    that neither a tiny nor a huge vector under- or overflows the norm. `ValueError` when it is
    not finite or is zero."""
    d = direction.detach().to(torch.float64 if direction.dtype == torch.float64 else torch.float32)
    biggest = d.abs().max() if torch.isfinite(d).all() else torch.tensor(0.0)
    if biggest == 0:
        raise ValueError("direction must be finite and non-zero")
    d = d / biggest
    return (d / d.norm()).float()


def _finite(resid: Tensor, what: str) -> Tensor:
    """`resid`, or a `ValueError` when an edit made it overflow the model's dtype."""
    if not torch.isfinite(resid).all():
        raise ValueError(
            f"{what} made the residual stream non-finite in {resid.dtype}: use a smaller scale or a "
            "wider dtype"
        )
    return resid


def _add_where(resid: Tensor, where: Tensor, direction: Tensor, scale: float, what: str) -> Tensor:
    """`resid [batch, q, d_model]` plus `scale * direction` at the `[batch, q]` positions `where`
    (the vector formed in float32, then cast to the residual's dtype); checked by `_finite`."""
    vector = (scale * direction.float()).to(resid)
    return _finite(resid + where[:, :, None].to(resid.dtype) * vector, what)


@dataclass
class DirectionAddition:
    """Add `scale * direction` to the residual stream after block `layer` (the vector is formed
    in float32, then cast to the residual's dtype)."""

    layer: int
    direction: Tensor  # [d_model]
    scale: float = 1.0
    positions: Sequence[int] | None = None

    def apply(self, layer: int, resid: Tensor, pos: Positions) -> Tensor:
        """resid: [batch, q, d_model] -> same."""
        if layer != self.layer:
            return resid
        return _add_where(
            resid, _select(pos.query, self.positions), self.direction, self.scale, "add_direction"
        )


@dataclass
class DirectionProjection:
    """Remove the component along `unit` (a float32 unit vector, `unit_vector`) from the residual
    stream after given blocks; the coefficient is computed in float32 whatever the model's dtype."""

    unit: Tensor  # [d_model], float32, norm 1
    layers: set[int] | None = None

    def apply(self, layer: int, resid: Tensor, pos: Positions) -> Tensor:
        if self.layers is not None and layer not in self.layers:
            return resid
        d = self.unit.to(resid.device, torch.float32)
        coef = resid.float() @ d  # [batch, q]
        return _finite(resid - (coef[..., None] * d).to(resid.dtype), "project_out")


@dataclass
class GatedDirection:
    """Add `scale * direction` to the residual stream after block `layer` at each position where
    `probe(resid)` (the probe's score of that position's residual before the addition) is below
    `threshold` (`below=True`) or above it, and at or after `start` (each sequence's own index;
    a list holds one start per caller's row, `Positions.rows`).

    The decision at a position reads only blocks `<= layer` of that position, which no addition
    at `layer` changes: one forward over a whole sequence gates exactly as token-by-token
    generation does. `fired` / `scored` count, per caller's row, the positions it added at and
    the positions it scored (real tokens at or after `start`), over every forward while active
    (in `generate`: the prompt once, then each of its samples' tokens)."""

    layer: int
    direction: Tensor  # [d_model], float32
    probe: Callable[[Tensor], Tensor]  # [n, d_model] float32 -> [n] scores
    threshold: float
    scale: float = 1.0
    below: bool = True
    start: int | list[int] = 0
    fired: dict[int, int] = field(default_factory=dict)
    scored: dict[int, int] = field(default_factory=dict)

    def apply(self, layer: int, resid: Tensor, pos: Positions) -> Tensor:
        """resid: [batch, q, d_model] -> same, with the direction added where the gate opens."""
        if layer != self.layer:
            return resid
        if isinstance(self.start, list):
            if int(pos.rows.max()) >= len(self.start):
                raise ValueError(f"{len(self.start)} gate starts (start) for row {int(pos.rows.max())}")
            start = torch.tensor(self.start, device=pos.query.device)[pos.rows][:, None]  # [batch, 1]
        else:
            start = torch.tensor(self.start, device=pos.query.device)
        live = (pos.query >= 0) & (pos.query >= start)  # [batch, q]
        with torch.no_grad():
            score = torch.as_tensor(self.probe(resid.detach().float().reshape(-1, resid.shape[-1])))
        score = score.reshape(live.shape).to(live.device)
        if not torch.isfinite(score[live]).all():
            raise ValueError("the gate's probe returned a non-finite score: fix the probe (or its input)")
        fire = live & ((score < self.threshold) if self.below else (score > self.threshold))
        for row, n_fired, n_live in zip(
            pos.rows.tolist(), fire.sum(1).tolist(), live.sum(1).tolist(), strict=True
        ):
            self.fired[row] = self.fired.get(row, 0) + int(n_fired)
            self.scored[row] = self.scored.get(row, 0) + int(n_live)
        return _add_where(resid, fire, self.direction, self.scale, "gated")

    @property
    def total_fired(self) -> int:
        """Positions the direction was added at, all rows together."""
        return sum(self.fired.values())


@dataclass
class ActivationPatch:
    """Replace an activation at given positions (each sequence's own index) by given values:
    `site="resid_post"` the residual stream after block `layer` (`values [n_positions, d_model]`),
    or `site="z"` its head outputs before W_O (`values [n_positions, n_heads, d_head]`). It
    applies to the caller's rows in `rows` (`Positions.rows`; None: every row), each the same
    values; a continuation, one token at a time, reaches none of the positions again."""

    site: Literal["resid_post", "z"]
    layer: int
    positions: list[int]
    values: Tensor  # [n_positions, ...], float32
    rows: list[int] | None = None

    def apply(self, layer: int, x: Tensor, pos: Positions) -> Tensor:
        """x: `[batch, q, d_model]` or `[batch, q, heads, d_head]` -> same, patched."""
        if layer != self.layer:
            return x
        wanted = torch.tensor(self.positions, device=pos.query.device)  # [n]
        hit = pos.query[:, :, None] == wanted[None, None, :]  # [batch, q, n]
        if self.rows is not None:
            mine = torch.isin(pos.rows, torch.tensor(self.rows, device=pos.rows.device))  # [batch]
            hit = hit & mine[:, None, None]
        if not bool(hit.any()):
            return x
        which = hit.float().argmax(-1)  # [batch, q]: the patch entry of each position
        patched = self.values.to(x)[which]  # [batch, q, ...]
        sel = hit.any(-1).reshape(*hit.shape[:2], *([1] * (x.ndim - 2)))
        return torch.where(sel, patched, x)


@dataclass
class Interventions:
    """The active interventions, in the order their contexts were entered."""

    items: list[Intervention] = field(default_factory=list)

    def remove(self, item: Intervention) -> None:
        """Remove the latest entry that *is* `item` (identity, never equality: two directions or
        ablations that compare equal, or hold tensors, are still two entries)."""
        for i in range(len(self.items) - 1, -1, -1):
            if self.items[i] is item:
                del self.items[i]
                return
        raise RuntimeError("this intervention is not active: its context was exited more often than entered")

    def per_forward_statistics(self) -> list[Intervention]:
        """Active interventions whose effect depends on the other positions of one forward."""
        return [it for it in self.of(HeadAblation) if it.per_forward_statistic]

    def of(self, kind: type) -> list:
        return [it for it in self.items if isinstance(it, kind)]

    def z(self, layer: int, z: Tensor, pos: Positions) -> Tensor:
        for it in self.items:
            if isinstance(it, HeadAblation | HeadScaling) or (
                isinstance(it, ActivationPatch) and it.site == "z"
            ):
                z = it.apply(layer, z, pos)
        return z

    def scores(self, layer: int, scores: Tensor, pos: Positions) -> Tensor:
        for it in self.of(AttentionSuppression):
            if it.active(layer):
                scores = it.apply_to_scores(scores, pos)
        return scores

    def resid(self, layer: int, resid: Tensor, pos: Positions) -> Tensor:
        for it in self.items:
            if isinstance(it, DirectionAddition | DirectionProjection | GatedDirection) or (
                isinstance(it, ActivationPatch) and it.site == "resid_post"
            ):
                resid = it.apply(layer, resid, pos)
        return resid

    def touches_z(self, layer: int) -> bool:
        return (
            any(layer in it.heads for it in self.of(HeadAblation))
            or any(layer in it.scales for it in self.of(HeadScaling))
            or any(it.site == "z" and it.layer == layer for it in self.of(ActivationPatch))
        )

    def touches_scores(self, layer: int) -> bool:
        return any(it.active(layer) for it in self.of(AttentionSuppression))

    def touches_resid(self, layer: int) -> bool:
        for it in self.items:
            if isinstance(it, DirectionAddition | GatedDirection) and it.layer == layer:
                return True
            if isinstance(it, ActivationPatch) and it.site == "resid_post" and it.layer == layer:
                return True
            if isinstance(it, DirectionProjection) and (it.layers is None or layer in it.layers):
                return True
        return False


Intervention = (
    HeadAblation
    | HeadScaling
    | AttentionSuppression
    | DirectionAddition
    | DirectionProjection
    | GatedDirection
    | ActivationPatch
)
"""Any intervention that `HookedModel.intervene` accepts."""
