"""Streaming logit lens: each layer's residual stream read through the final norm and unembedding.

Statistics are computed one layer and one position chunk at a time, so memory holds a few
`[batch * chunk, vocab]` blocks, never `[layers, pos, vocab]`. The unembedding matmuls may run in
bfloat16 (`unembed_dtype=`), the statistics always run in float32.

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
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor
from torch.nn import functional

from mechlens.models.architecture import require_submodule
from mechlens.models.hooked import ActivationCache
from mechlens.models.loading import fast_bf16
from mechlens.models.padding import as_positions, row_columns
from mechlens.ops.distributions import BLOCK_ROWS, Distributions

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

STATS = ("entropy", "kl_final", "jsd_final", "top1", "target")
"""Statistics `logit_lens` can compute. `target` needs `targets=` (token ids or "next")."""
DEFAULT_STATS = ("entropy", "kl_final", "top1")
UnembedDtype = Literal["model", "auto", "float32", "bfloat16"]
UNEMBED_DTYPES = ("model", "auto", "float32", "bfloat16")
"""Dtypes of the lens's unembedding matmuls (`unembed_dtype=`); statistics are float32 in all."""
UNEMBED_ROWS = 256
"""Residual rows unembedded by one matmul (bf16 matmuls on the CPU run best at 128-512 rows)."""


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
    model: HookedModel,
    tokens: Tensor | str,
    layers: Sequence[int] | None = None,
    stats: Sequence[str] = DEFAULT_STATS,
    targets: Tensor | str | None = None,
    pairs: Sequence[tuple[int, int]] = (),
    top_k_positions: Sequence[int] = (),
    k: int = 5,
    chunk: int | None = None,
    attention_mask: Tensor | None = None,
    unembed_dtype: UnembedDtype | torch.dtype = "model",
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
            length: 512, fewer on long inputs, rounded down to whole `UNEMBED_ROWS` blocks).
            Memory: the KV cache, one chunk's attention and captures, and a few `[256, vocab]`
            blocks; never `[pos, vocab]`.
        unembed_dtype: the dtype of the final norm's output and of the unembedding matmuls, one
            of `UNEMBED_DTYPES` or `torch.float32` / `torch.bfloat16`: "model" (the default: the
            model's own dtype, so a float32 model gives float32 logits, the exact lens the oracle
            tests check), "float32", "bfloat16", or "auto": bfloat16 where bf16 matmuls are fast
            (`mechlens.models.loading.fast_bf16`: a CPU with AVX512-BF16 or AMX-BF16, a bf16
            GPU), else the model's dtype. The statistics are float32 whatever the choice: each
            block of at most `BLOCK_ROWS` rows of bf16 logits is upcast before the softmax, and
            the results are float32 tensors. The forward itself keeps the model's dtype.

    The matmuls are most of the lens's work (30 layers x 49152 x 576 per position on the
    embedded model), and a CPU with AVX512-BF16 multiplies in bf16 about 5x faster than in
    float32: `unembed_dtype="auto"` is what `benchmarks/long_trace.py` and `benchmarks/lens.py`
    run, and the choice for long traces. It stays opt-in because it changes the numbers: on the
    embedded model (float32 forward, a 509-token trace, all 30 layers) bf16 blocks change the
    entropy by at most 0.056 nats (mean 0.0057; entropies span 0-7 nats), KL to the output by
    at most 0.32 nats (mean 0.026; the largest at a KL of 21.7, 1.5%; KLs span 0-48 nats), and
    the top-1 token at 0.66% of the (layer, position) cells (near-ties of the two most likely
    tokens). It runs 2.2-2.7x faster there (`benchmarks/long_trace.py`).

    The forward runs `chunk` positions at a time over a KV cache (`HookedModel.forward_chunks`),
    stopping after the last layer needed; each chunk's residual stream is read through the final
    norm and unembedding layer by layer, the output distribution included (the last layer's lens
    is the model's output), so nothing `[pos, vocab]`-sized beyond one chunk is ever held.
    """
    ids, mask = model.prepare_input(tokens, attention_mask)
    unembed = _Unembed(model, unembed_dtype)
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
    if chunk is None:  # whole unembedding blocks per forward chunk (e.g. 303 -> 256 at 4k tokens)
        rows = max(1, UNEMBED_ROWS // ids.shape[0])
        chunk = model.chunk_size_for(n_pos)
        chunk = chunk - chunk % rows if chunk > rows else chunk
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
        part = _lens_from_cache(
            model, None, cache, lens_layers, stats, None if target_ids is None else target_ids[:, start:end],
            pair_list, [c - start for c in here], k, None, mask[:, start:end], None, unembed,
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


def _check_pairs(model: HookedModel, pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(model.check_layer(a, "pairs entry"), model.check_layer(b, "pairs entry")) for a, b in pairs]


def _check_positions(top_k_positions: Sequence[int], n_pos: int) -> list[int]:
    """Columns `0..n_pos-1` (for `lens_from_cache`, which reads a cache by column)."""
    positions = as_positions(top_k_positions, "top_k_positions")
    if any(not 0 <= p < n_pos for p in positions):
        raise ValueError(f"top_k_positions must lie in 0..{n_pos - 1}, got {positions}")
    return positions


@torch.no_grad()
def lens_from_cache(
    model: HookedModel,
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
    unembed_dtype: UnembedDtype | torch.dtype = "model",
) -> LensResult:
    """`logit_lens` on an existing forward: a cache holding `resid_post` of the needed layers and
    the output `logits [batch, pos, vocab]`, or None to read the output distribution from the
    last layer's `resid_post` (then it must be in the cache). `chunk` positions are unembedded at
    once (default: 256 rows), so memory holds a few `[256, vocab]` blocks. `unembed_dtype` as in
    `logit_lens` (given `logits` are read in their own dtype, their statistics in float32)."""
    return _lens_from_cache(
        model, logits, cache, layers, stats, targets, pairs, top_k_positions, k, chunk, attention_mask,
        tokens, _Unembed(model, unembed_dtype),
    )  # fmt: skip


class _Unembed:
    """Final norm + unembedding of residual rows, `[..., d_model] -> [rows, vocab]`, in `dtype`:
    the model's own `unembed` when that is the model's dtype, else the final norm in the model's
    dtype and one matmul with a copy of the unembedding matrix in `dtype` (made once per call).

    That matmul returns each row's logits less an estimate `m` of the row's maximum, `mean + 4
    std` of the row's logits over the vocabulary (from the matrix's column means and covariance,
    1% of the matmul): it multiplies `[x | 1 | m]` by `[W | b | -1]`, so the shift is summed in
    the float32 accumulator, and bf16 rounds the result near the top to a spacing of 1/128 or
    less rather than the 1/8 of logits near 20. The statistics do not depend on a per-row shift
    (soft-capped models get `m` back before the cap); it halves the entropy difference of bf16
    blocks on the embedded model and quarters the largest KL difference.
    """

    SPREAD = 4.0
    """`m = mean + SPREAD * std`: the largest of ~50k near-Gaussian logits lies ~4 std above the mean."""

    def __init__(self, model: HookedModel, unembed_dtype: UnembedDtype | torch.dtype):
        self.model, self.dtype = model, _unembed_dtype(model, unembed_dtype)
        self.weight: Tensor | None = None
        if self.dtype == model.dtype:
            return
        head = require_submodule(model.hf_model, model.arch.head_path)
        weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (model.d_vocab, model.d_model):
            raise ValueError(
                f"unembed_dtype={unembed_dtype!r} needs a linear unembedding with a weight [d_vocab, "
                f'd_model]; {model.arch.head_path!r} has none: use unembed_dtype="model"'
            )
        self.has_bias = isinstance(bias, Tensor)
        d = model.d_model + self.has_bias  # the columns of [W | b]
        self.weight = torch.empty(model.d_vocab, d + 1, dtype=self.dtype, device=weight.device)
        self.weight[:, : model.d_model] = weight.detach()
        if isinstance(bias, Tensor):
            self.weight[:, model.d_model] = bias.detach()
        self.weight[:, d] = -1.0
        sample = self.weight[:: max(1, model.d_vocab // 8192), :d].float()  # [<= 8192 rows, d]
        self.mean = sample.mean(0)  # [d]
        centered = sample - self.mean
        self.cov = (centered.T @ centered / len(sample)).to(self.dtype)  # [d, d]

    def __call__(self, resid: Tensor) -> Tensor:
        x = resid.reshape(-1, resid.shape[-1])  # 2-D: a bf16 matmul on a 3-D slice is 4x slower
        if self.weight is None:
            return self.model.unembed(x)
        x = self.model.final_norm(x).float()
        if self.has_bias:
            x = torch.cat([x, x.new_ones(len(x), 1)], 1)
        low = x.to(self.dtype)
        var = torch.linalg.vecdot((low @ self.cov).float(), x).clamp_min(0)
        m = x @ self.mean + self.SPREAD * var.sqrt()  # [rows]
        z = functional.linear(torch.cat([low, m[:, None].to(self.dtype)], 1), self.weight)
        cap = self.model.arch.logit_softcap
        return torch.tanh((z.float() + m.to(self.dtype).float()[:, None]) / cap) * cap if cap else z


def _unembed_dtype(model: HookedModel, unembed_dtype) -> torch.dtype:
    """`unembed_dtype` (see `logit_lens`) as a `torch.dtype` for `model`."""
    if isinstance(unembed_dtype, torch.dtype) and unembed_dtype in (torch.float32, torch.bfloat16):
        return unembed_dtype
    if isinstance(unembed_dtype, str) and unembed_dtype in UNEMBED_DTYPES:
        if unembed_dtype == "model":
            return model.dtype
        if unembed_dtype == "auto":
            return torch.bfloat16 if fast_bf16(model.device) else model.dtype
        return torch.float32 if unembed_dtype == "float32" else torch.bfloat16
    names = ", ".join(repr(n) for n in UNEMBED_DTYPES)
    raise ValueError(
        f"unembed_dtype must be one of {names}, torch.float32 or torch.bfloat16; got {unembed_dtype!r}"
    )


def _lens_from_cache(  # lens_from_cache with the caller's unembedding (logit_lens makes one per call)
    model: HookedModel, logits, cache, layers, stats, targets, pairs, top_k_positions, k, chunk,
    attention_mask, tokens,
    unembed: _Unembed,
) -> LensResult:  # fmt: skip
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
    last = model.n_layers - 1
    for start in range(0, n_pos, chunk):
        sl = slice(start, start + chunk)
        rows = real[:, sl]  # [batch, chunk]
        tgt = None if target_ids is None else target_ids[:, sl].reshape(-1)  # [rows]
        final, z_last = None, None
        if needs_final:  # probabilities and entropy only: [rows, vocab] once per chunk
            if logits is None:  # the last layer's logits, kept for its own lens below
                z_last = z_final = unembed(cache.at("resid_post", last)[:, sl])
            else:
                z_final = logits[:, sl].reshape(-1, vocab)
            final = [Distributions(b).drop_logits() for b in z_final.split(BLOCK_ROWS)]
            del z_final
        kept: dict[int, list[Distributions]] = {}  # layers still needed by a pair
        for layer in sorted({*layer_list, *free_after}):
            if layer == last and z_last is not None:
                z, z_last = z_last, None
            else:  # [rows, vocab] in the unembedding's dtype; statistics upcast block by block
                z = unembed(cache.at("resid_post", layer)[:, sl])
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
        ids, probs = _top_k(unembed, cache, layer_list, positions, k)  # [layers, batch, n, k]
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


def _top_k(
    unembed: _Unembed, cache, layers: list[int], positions: list[int], k: int
) -> tuple[Tensor, Tensor]:
    ids, probs = [], []
    for layer in layers:
        resid = cache.at("resid_post", layer)[:, positions]  # [batch, n, d_model]
        z = unembed(resid).float().reshape(*resid.shape[:2], -1)  # [batch, n, vocab]
        top = torch.softmax(z, -1).topk(k, -1)
        ids.append(top.indices.cpu())
        probs.append(top.values.cpu())
    return torch.stack(ids), torch.stack(probs)  # [layers, batch, n, k]
