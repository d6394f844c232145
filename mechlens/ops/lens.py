"""Streaming logit lens: each layer's residual stream read through the final norm and unembedding.

Statistics are computed one layer and one position chunk at a time, so memory holds a few
`[batch * chunk, vocab]` blocks, never `[layers, pos, vocab]`.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> toks = model.to_tokens("one two three")
    >>> lens = ml.logit_lens(model, toks, stats=("entropy", "kl_final", "jsd_final", "top1"))
    >>> lens.entropy.shape == (model.n_layers, 1, 13)
    True
    >>> float(lens.kl_final[-1].abs().max()) < 1e-4   # the last layer is the model's output
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mechlens.models.hooked import ActivationCache
from mechlens.models.padding import as_positions, row_columns
from mechlens.ops.distributions import BLOCK_ROWS, Distributions

STATS = ("entropy", "kl_final", "jsd_final", "top1", "target")
"""Statistics `logit_lens` can compute. `target` needs `targets=` (token ids or "next")."""
DEFAULT_STATS = ("entropy", "kl_final", "top1")


@dataclass
class LensResult:
    """Per-layer logit-lens statistics, each `[layers, batch, pos]` (None when not requested).

    Statistics at padded positions (attention mask 0) are NaN (top1 and ranks: -1).

    entropy: entropy of the layer's next-token distribution p_layer (nats).
    kl_final: KL(p_final || p_layer) (nats); p_final is the model's output distribution.
    jsd_final: Jensen-Shannon divergence JSD(p_final, p_layer) (nats, at most log 2).
    top1, top1_prob: the layer's most likely next token and its probability.
    target_logprob, target_rank: log p_layer(target) and the target's rank (0 = top); NaN / -1
        where there is no target (the last position with `targets="next"`, or a negative id).
    jsd_pairs: `[pairs, batch, pos]` JSD between the layer pairs in `pairs`.
    top_k_ids, top_k_probs: `[layers, batch, len(top_k_positions), k]` for a few positions (from
        `logit_lens`: each row's own positions; from `lens_from_cache`: columns, -1 and NaN at
        padding).
    """

    layers: list[int]
    entropy: Tensor | None = None
    kl_final: Tensor | None = None
    jsd_final: Tensor | None = None
    top1: Tensor | None = None
    top1_prob: Tensor | None = None
    target_logprob: Tensor | None = None
    target_rank: Tensor | None = None
    pairs: list[tuple[int, int]] = field(default_factory=list)
    jsd_pairs: Tensor | None = None
    top_k_positions: list[int] = field(default_factory=list)
    top_k_ids: Tensor | None = None
    top_k_probs: Tensor | None = None

    def top1_text(self, tokenizer, batch: int = 0, start: int = 0) -> list[list[str]]:
        """The top-1 next token as a string per (layer, position >= start), for labels and hover."""
        if self.top1 is None:
            raise ValueError('no top-1 tokens: call logit_lens(..., stats=[..., "top1"])')
        return [[tokenizer.decode([t]) for t in row] for row in self.top1[:, batch, start:].tolist()]

    def top_k_text(self, tokenizer, batch: int = 0) -> list[list[str]]:
        """Hover text per (layer, top-k position): "'tok' 0.42, 'tok2' 0.13, ..."."""
        if self.top_k_ids is None or self.top_k_probs is None:
            raise ValueError("no top-k view: call logit_lens(..., top_k_positions=[...])")
        return [
            [
                ", ".join(
                    f"{tokenizer.decode([int(t)])!r} {float(p):.2f}"
                    for t, p in zip(self.top_k_ids[l, batch, i], self.top_k_probs[l, batch, i], strict=True)
                )
                for i in range(len(self.top_k_positions))
            ]
            for l in range(len(self.layers))
        ]


@torch.no_grad()
def logit_lens(
    model,
    tokens: Tensor | str,
    layers: Sequence[int] | None = None,
    stats: Sequence[str] = DEFAULT_STATS,
    targets: Tensor | str | None = None,
    pairs: Sequence[tuple[int, int]] = (),
    top_k_positions: Sequence[int] = (),
    k: int = 5,
    chunk: int | None = None,
    attention_mask: Tensor | None = None,
) -> LensResult:
    """Logit-lens statistics of `tokens` at every layer in `layers` (default: all).

    Args:
        stats: any of `STATS`; unrequested fields of the result are None.
        targets: `[batch, pos]` token ids whose log-prob and rank to report, or "next" for the
            input's own next token (what the model was trained to predict).
        pairs: layer pairs `(a, b)` whose JSD to report in `jsd_pairs` (any model layers).
        top_k_positions: positions for the `top_k_ids`/`top_k_probs` view (hover text), each
            row's own (0 = its first real token, negative: back from its last).
        chunk: positions run through the forward at once (default: `model.chunk_size_for` the
            length: 512, fewer on long inputs). Memory: the KV cache, one chunk's attention and
            captures, and a few `[256, vocab]` blocks; never `[pos, vocab]`.

    The forward runs `chunk` positions at a time over a KV cache (`HookedModel.forward_chunks`),
    stopping after the last layer needed; each chunk's residual stream is read through the final
    norm and unembedding layer by layer, the output distribution included (the last layer's lens
    is the model's output), so nothing `[pos, vocab]`-sized beyond one chunk is ever held.
    """
    ids, mask = model.prepare_input(tokens, attention_mask)
    stats = _check_stats(stats)
    lens_layers = model.check_layers(layers)
    pair_list = _check_pairs(model, pairs)
    last = model.n_layers - 1
    final = [last] if any(s in stats for s in FINAL_STATS) else []
    needed = sorted({*lens_layers, *(l for p in pair_list for l in p), *final})
    n_pos = ids.shape[1]
    positions = as_positions(top_k_positions, "top_k_positions")
    columns = (
        row_columns(mask, positions, "top_k_positions").cpu() if positions else None
    )  # [batch, n]: each row's own
    target_ids = (
        _targets(targets, ids, ids.shape[0], n_pos, model.d_vocab, mask) if "target" in stats else None
    )
    parts, top = [], {}
    for start, out in model.forward_chunks(
        ids, mask, chunk, capture={"resid_post": needed}, stop_after=max(needed)
    ):
        resid = out.acts["resid_post"]
        end = start + resid[needed[0]].shape[1]
        cache = ActivationCache(
            {"resid_post": torch.stack([resid[l] for l in needed])}, {"resid_post": needed}
        )
        here = [] if columns is None else sorted({c for c in columns.flatten().tolist() if start <= c < end})
        part = lens_from_cache(
            model, None, cache, lens_layers, stats, None if target_ids is None else target_ids[:, start:end],
            pair_list, [c - start for c in here], k, None, mask[:, start:end],
        )  # fmt: skip
        if here and part.top_k_ids is not None and part.top_k_probs is not None:
            for i, c in enumerate(here):
                top[c] = (part.top_k_ids[:, :, i], part.top_k_probs[:, :, i])  # [layers, batch, k]
        parts.append(part)
    result = _concat(parts)
    result.top_k_positions = positions
    if columns is not None:  # [layers, batch, n, k]: row b's own position i at its column
        for field_name, which in (("top_k_ids", 0), ("top_k_probs", 1)):
            per_row = [
                torch.stack([top[int(columns[b, i])][which][:, b] for i in range(len(positions))], 1)
                for b in range(len(columns))
            ]
            setattr(result, field_name, torch.stack(per_row, 1))
    return result


FINAL_STATS = ("kl_final", "jsd_final")
"""Statistics that compare a layer with the model's output distribution."""
_POSITION_FIELDS = ("entropy", "kl_final", "jsd_final", "top1", "top1_prob", "target_logprob", "target_rank",
                    "jsd_pairs")  # fmt: skip


def _concat(parts: list[LensResult]) -> LensResult:
    """Chunks' results joined along the position axis."""
    first = parts[0]
    joined = LensResult(first.layers, pairs=first.pairs)
    for name in _POSITION_FIELDS:
        if getattr(first, name) is not None:
            setattr(joined, name, torch.cat([getattr(p, name) for p in parts], 2))
    return joined


def _check_stats(stats: Sequence[str] | str) -> list[str]:
    stats = [stats] if isinstance(stats, str) else list(stats)
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(f"unknown stat(s) {unknown}: valid stats are {list(STATS)}")
    return stats


def _check_pairs(model, pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(model.check_layer(a, "pairs entry"), model.check_layer(b, "pairs entry")) for a, b in pairs]


def _check_positions(top_k_positions: Sequence[int], n_pos: int) -> list[int]:
    """Columns `0..n_pos-1` (for `lens_from_cache`, which reads a cache by column)."""
    positions = as_positions(top_k_positions, "top_k_positions")
    if any(not 0 <= p < n_pos for p in positions):
        raise ValueError(f"top_k_positions must lie in 0..{n_pos - 1}, got {positions}")
    return positions


@torch.no_grad()
def lens_from_cache(
    model,
    logits: Tensor | None,
    cache,
    layers: Sequence[int] | None = None,
    stats: Sequence[str] = DEFAULT_STATS,
    targets: Tensor | str | None = None,
    pairs: Sequence[tuple[int, int]] = (),
    top_k_positions: Sequence[int] = (),
    k: int = 5,
    chunk: int | None = None,
    attention_mask: Tensor | None = None,
    tokens: Tensor | None = None,
) -> LensResult:
    """`logit_lens` on an existing forward: a cache holding `resid_post` of the needed layers and
    the output `logits [batch, pos, vocab]`, or None to read the output distribution from the
    last layer's `resid_post` (then it must be in the cache). `chunk` positions are unembedded at
    once (default: 256 rows), so memory holds a few `[256, vocab]` blocks."""
    stats = _check_stats(stats)
    vocab = model.d_vocab if logits is None else logits.shape[-1]
    batch, n_pos = cache["resid_post"].shape[1:3]
    chunk = max(1, 256 // batch) if chunk is None else chunk
    for name, value in (("chunk", chunk), ("k", k)):
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    chunk, k = int(chunk.__index__()), int(k.__index__())
    if chunk < 1 or not 1 <= k <= vocab:
        raise ValueError(f"chunk must be >= 1 and k in 1..{vocab} (the vocabulary), got {chunk}, {k}")
    captured = cache.layers["resid_post"]
    layer_list = captured if layers is None else model.check_layers(layers)
    pair_list = _check_pairs(model, pairs)
    needs_final = any(s in stats for s in FINAL_STATS)
    from_last = [model.n_layers - 1] if needs_final and logits is None else []
    missing = sorted({*layer_list, *(l for p in pair_list for l in p), *from_last} - set(captured))
    if missing:
        raise ValueError(f"layers {missing} are not in the cache (captured: {captured})")
    positions = _check_positions(top_k_positions, n_pos)
    target_ids = _targets(targets, tokens, batch, n_pos, vocab, attention_mask) if "target" in stats else None

    shape = (len(layer_list), batch, n_pos)
    out: dict[str, Tensor] = {}
    for name in ("entropy", "kl_final", "jsd_final"):
        if name in stats:
            out[name] = torch.full(shape, float("nan"))
    if "top1" in stats:
        out["top1"], out["top1_prob"] = torch.full(shape, -1), torch.full(shape, float("nan"))
    if target_ids is not None:
        out["target_logprob"], out["target_rank"] = torch.full(shape, float("nan")), torch.full(shape, -1)
    if pair_list:
        out["jsd_pairs"] = torch.full((len(pair_list), batch, n_pos), float("nan"))

    free_after = {l: max(max(p) for p in pair_list if l in p) for p in pair_list for l in p}
    real = torch.ones(batch, n_pos, dtype=torch.bool)  # [batch, pos] positions to report
    if attention_mask is not None:
        real = attention_mask.bool().cpu()
    for start in range(0, n_pos, chunk):
        sl = slice(start, start + chunk)
        rows = real[:, sl]  # [batch, chunk]
        tgt = None if target_ids is None else target_ids[:, sl].reshape(-1)  # [rows]
        final = None
        if needs_final:  # probabilities and entropy only: [rows, vocab] once per chunk
            z_final = (
                model.unembed(cache.at("resid_post", model.n_layers - 1)[:, sl])
                if logits is None
                else logits[:, sl]
            )
            final = [
                Distributions(b).drop_logits() for b in z_final.float().reshape(-1, vocab).split(BLOCK_ROWS)
            ]
            del z_final
        kept: dict[int, list[Distributions]] = {}  # layers still needed by a pair
        for layer in sorted({*layer_list, *free_after}):
            resid = cache.at("resid_post", layer)[:, sl]  # [batch, chunk, d_model]
            z = model.unembed(resid).float().reshape(-1, vocab)  # [rows, vocab]
            wanted = stats if layer in layer_list else []
            values, dists = _layer_stats(z, final, wanted, tgt, keep=layer in free_after)
            del z
            if layer in layer_list:
                i = layer_list.index(layer)
                for name, value in values.items():
                    where = (
                        rows & (tgt.reshape(rows.shape) >= 0)
                        if tgt is not None and name.startswith("target")
                        else rows
                    )
                    _put(out[name][i], sl, value, where)
            if layer in free_after:
                kept[layer] = dists
            for j, (a, b) in enumerate(pair_list):
                if layer == max(a, b):
                    value = torch.cat([da.jsd(db) for da, db in zip(kept[a], kept[b], strict=True)])
                    _put(out["jsd_pairs"][j], sl, value, rows)
            kept = {l: d for l, d in kept.items() if free_after[l] > layer}
    result = LensResult(layer_list, pairs=pair_list, top_k_positions=positions, **out)
    if positions:
        ids, probs = _top_k(model, cache, layer_list, positions, k)  # [layers, batch, n, k]
        pad = ~real[:, positions][None, :, :, None]  # padding has no top-k: -1 and NaN, as above
        result.top_k_ids, result.top_k_probs = ids.masked_fill(pad, -1), probs.masked_fill(pad, float("nan"))
    return result


def _layer_stats(
    z: Tensor, final: list[Distributions] | None, stats: list[str], targets: Tensor | None, keep: bool
) -> tuple[dict[str, Tensor], list[Distributions]]:
    """The requested statistics of one layer's logits `z [rows, vocab]`, each `[rows]`, computed
    block by block; with `keep`, also the blocks' distributions (for layer pairs)."""
    parts: dict[str, list[Tensor]] = {}
    kept = []
    for n, block in enumerate(z.split(BLOCK_ROWS)):
        dist = Distributions(block)
        values = {}
        if "entropy" in stats:
            values["entropy"] = dist.entropy
        if "kl_final" in stats and final is not None:
            values["kl_final"] = dist.kl_from(final[n])
        if "jsd_final" in stats and final is not None:
            values["jsd_final"] = dist.jsd(final[n])
        if "top1" in stats:
            values["top1"], values["top1_prob"] = dist.argmax, dist.top_p
        if targets is not None and "target" in stats:
            ids = targets[n * BLOCK_ROWS : n * BLOCK_ROWS + len(block)].clamp(min=0).to(block.device)
            values["target_logprob"], values["target_rank"] = dist.logprob(ids)
        for name, value in values.items():
            parts.setdefault(name, []).append(value)
        if keep:
            kept.append(dist.drop_logits())
    return {name: torch.cat(value) for name, value in parts.items()}, kept


def _put(dest: Tensor, sl: slice, values: Tensor, rows: Tensor) -> None:
    """Write flat chunk `values [batch * chunk]` into `dest[:, sl]` where `rows [batch, chunk]` is True."""
    block = dest[:, sl]  # a view of [batch, chunk]
    new = values.detach().to("cpu", dest.dtype).reshape(block.shape)
    block.copy_(torch.where(rows, new, block))


def _targets(
    targets, tokens: Tensor | None, batch: int, n_pos: int, vocab: int, mask: Tensor | None = None
) -> Tensor:
    """Target ids `[batch, pos]` (-1: none); "next" is each row's own next real token, so a row's
    last token (and padding, on either side) has none."""
    if targets is None:
        raise ValueError('stat "target" needs targets= (token ids [batch, pos] or "next")')
    if isinstance(targets, str):
        if targets != "next":
            raise ValueError(f'targets must be token ids or "next", got {targets!r}')
        if tokens is None:
            raise ValueError('targets="next" needs the input tokens')
        nxt = torch.cat([tokens[:, 1:], torch.full((batch, 1), -1, device=tokens.device)], 1).cpu()
        if mask is not None:
            real = mask.bool().cpu()
            has_next = torch.cat([real[:, 1:], torch.zeros(batch, 1, dtype=torch.bool)], 1) & real
            nxt = nxt.masked_fill(~has_next, -1)
        return nxt
    targets = torch.as_tensor(targets).cpu()
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if targets.shape != (batch, n_pos):
        raise ValueError(f"targets must be [batch, pos] = {[batch, n_pos]}, got {list(targets.shape)}")
    if targets.numel() and targets.max() >= vocab:
        raise ValueError(f"targets must be token ids below the vocabulary size {vocab} (negative: none)")
    return targets


def _top_k(model, cache, layers: list[int], positions: list[int], k: int) -> tuple[Tensor, Tensor]:
    ids, probs = [], []
    for layer in layers:
        resid = cache.at("resid_post", layer)[:, positions]  # [batch, n, d_model]
        top = torch.softmax(model.unembed(resid).float(), -1).topk(k, -1)
        ids.append(top.indices.cpu())
        probs.append(top.values.cpu())
    return torch.stack(ids), torch.stack(probs)  # [layers, batch, n, k]
