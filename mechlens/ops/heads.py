"""Head scores: the effect of zero-ablating each attention head on a metric, and each head's
direct write along a direction.

`metric` maps logits `[batch, pos, vocab]` (or, with `on="hidden"`, the final-normed last hidden
state `[batch, pos, d_model]`, e.g. for a probe) to `[batch]`; each entry of the result is
`mean over the batch of metric(head zero-ablated) - metric(clean)`. With `on="hidden"` the
unembedding is skipped; with `positions=[...]` only those positions are unembedded and the metric
receives logits `[batch, len(positions), vocab]` (with `positions=[-1]`, `logits[:, -1]` still
reads the last token), which saves most of the unembedding when the metric reads a few tokens.
Positions count each row's own tokens (negative: back from its last real token), with padding on
either side.

- `method="exact"`: for each layer, all its heads at once (one row group per head), starting from
  the clean residual entering that layer, so the unchanged computation below it is shared.
- `method="attribution"`: attribution patching, one forward and one backward:
  `effect ~ sum over positions of (0 - z) . d metric / d z` per head, read as the gradient of
  the metric with respect to a factor on each head's output.

`direct_head_scores` is the Refusal Cliff head score: what each head itself writes (its slice of
z through its slice of the output projection) at given positions, projected on a direction.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> toks = model.to_tokens("The cat sat on the mat")
    >>> metric = lambda logits: logits[:, -1].log_softmax(-1)[:, 5]
    >>> head_ablation_effects(model, toks, metric, progress=False).shape == (model.n_layers, model.n_heads)
    True
    >>> direct_head_scores(model, toks, torch.ones(model.d_model)).shape == (model.n_layers, model.n_heads)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechlens.models.interventions import HeadScaling
from mechlens.models.padding import as_positions, row_columns
from mechlens.models.sampling import check_int

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

METHODS = ("exact", "attribution")
METRIC_INPUTS = ("logits", "hidden")


def head_ablation_effects(
    model: HookedModel,
    tokens: Tensor | str | Sequence[str],
    metric: Callable[[Tensor], Tensor],
    method: str = "exact",
    attention_mask: Tensor | None = None,
    layers: Sequence[int] | None = None,
    on: str = "logits",
    positions: Sequence[int] | None = None,
    progress: bool = True,
) -> Tensor:
    """`[n_layers, n_heads]` effect of zero-ablating each head (rows outside `layers` are NaN).

    In bfloat16 on the embedded model (`benchmarks/bf16.py`: the refusal experiment's probe metric,
    `on="hidden"`, 4 prompts), "exact" effects differ from float32 by at most 0.38 (mean 0.069,
    mean |effect| 0.53, 12% relative) and the ranking changes (Spearman 0.989, top-8 overlap 7/8,
    top-10 8/10): an effect is the difference of two bf16 forwards, whose rounding does not
    cancel, so compute the exact sweep in float32. "attribution" differs by at most 0.13 (mean
    0.023, 4.6%) and keeps its ranking (Spearman 0.9986, top-8 8/8, top-10 10/10).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if on not in METRIC_INPUTS:
        raise ValueError(f"on must be one of {METRIC_INPUTS}, got {on!r}")
    ids, mask = model.prepare_input(tokens, attention_mask)
    columns = None
    if positions is not None:
        if on != "logits":
            raise ValueError('positions selects positions to unembed; it needs on="logits"')
        columns = row_columns(mask, positions)  # [batch, n_pos]
    last = model.n_layers - 1
    stop = on == "hidden" or positions is not None  # run to the last hidden state, not the logits
    hidden = {"capture": {"resid_post": [last]}, "stop_after": last} if stop else {}

    def measure(out) -> Tensor:  # [batch * k] metric of one run's output
        if on == "hidden":
            return metric(model.final_norm(out.acts["resid_post"][last]))
        if columns is not None:
            resid = out.acts["resid_post"][last]  # [rows, pos, d]: `rows` repeats the batch
            picked = columns.repeat(len(resid) // len(columns), 1)  # [rows, n_pos]
            return metric(model.unembed(resid.gather(1, picked[:, :, None].expand(-1, -1, resid.shape[2]))))
        return metric(out.logits)

    layer_list = model.check_layers(layers)
    effects = torch.full((model.n_layers, model.n_heads), float("nan"))
    batch, n_pos = ids.shape
    if method == "exact":
        # heads ablated in one pass: as many copies of the batch as `model.memory_budget` holds
        per_pass = max(
            1, min(model.n_heads, model.memory_budget // model.forward_bytes((batch, n_pos), logits=not stop))
        )
        with torch.no_grad():
            capture = {"resid_pre": layer_list, **hidden.get("capture", {})}
            clean_out = model.forward(ids, mask, capture=capture)
            clean = _check_metric(measure(clean_out), batch)  # [batch]
            for layer in tqdm(layer_list, desc="ablate heads", disable=not progress):
                ablated = []
                for first in range(0, model.n_heads, per_pass):
                    heads = min(per_pass, model.n_heads - first)
                    # row h * batch + b zeroes head first + h: factor 0 for that head, 1 for the others
                    keep = (1 - torch.eye(model.n_heads)[first : first + heads]).repeat_interleave(batch, 0)
                    rows = torch.arange(batch, device=ids.device).repeat(heads)  # each row's row of the batch
                    resid = clean_out.acts["resid_pre"][layer].repeat(heads, 1, 1)  # [heads * batch, pos, d]
                    with model.intervene(HeadScaling({layer: keep}, per_row="forward")):
                        out = model.forward(ids.repeat(heads, 1), mask.repeat(heads, 1),
                                            start_at=layer, resid_in=resid, rows=rows, **hidden)  # fmt: skip
                    ablated.append(_check_metric(measure(out), heads * batch).reshape(heads, batch))
                effects[layer] = (torch.cat(ablated) - clean).mean(1).float().cpu()
        return effects
    # the backward pass keeps every layer's activations: refuse what would not fit
    saved = model.n_layers * model.forward_bytes((batch, n_pos))
    if saved > model.memory_budget:
        raise ValueError(
            f"attribution over {batch} x {n_pos} tokens keeps about {saved / 2**30:.1f} GiB of activations "
            f"for its backward pass (budget {model.memory_budget / 2**30:.1f} GiB, model.memory_budget): "
            'use method="exact" (memory of one forward per pass), fewer tokens, or a larger budget'
        )
    # attribution: scale every head's z by a factor alpha = 1; d metric / d alpha_h = sum z . grad,
    # so the first-order effect of alpha_h -> 0 (zero ablation) is -d metric / d alpha_h
    scales = {l: torch.ones(model.n_heads, requires_grad=True) for l in layer_list}
    with torch.enable_grad(), model.scale_heads(scales):
        value = _check_metric(measure(model.forward(ids, mask, **hidden)), ids.shape[0])
        grads = torch.autograd.grad(value.mean(), [scales[l] for l in layer_list])
    for layer, g in zip(layer_list, grads, strict=True):
        effects[layer] = -g.float().cpu()
    return effects


def _check_metric(value: Tensor, batch: int) -> Tensor:
    if not isinstance(value, Tensor) or value.shape != (batch,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"metric must map logits [batch, pos, vocab] to a [batch] tensor; got {shape}")
    if not torch.isfinite(value).all():
        raise ValueError("metric returned NaN or inf; the effect of ablating a head would be undefined")
    return value


def direct_head_scores(
    model: HookedModel,
    tokens: Tensor | str | Sequence[str],
    direction: Tensor,
    positions: Sequence[int] = (-1,),
    attention_mask: Tensor | None = None,
    batch_size: int = 16,
) -> Tensor:
    """`[n_layers, n_heads]`: each head's own write into the residual stream at `positions`,
    projected on `direction / |direction|`, averaged over rows and positions. One forward per
    batch of rows; nothing is ablated.

    Head h of layer l writes `z[..., h, :] @ W_O[h]` (plus the output bias, which the authors'
    score includes because it runs the whole projection on a tensor holding one head's slice).
    Positions index each row's own tokens (negative: from its last real token), also with padding.
    As the authors' `find_refusal_head` (RefusalCliff `src/lens/refusal.py` with the attention
    forward of `src/model/modeling_llama.py`; their default reads position -1 of a prompt and
    thinking that end in `</think>`), the most negative heads write most against the direction:
    sort ascending to find refusal-suppressing heads.

    In bfloat16 on the embedded model (`benchmarks/bf16.py`: 4 prompts, a refusal probe's
    direction), the scores differ from float32 by at most 0.068 (mean 0.0062, mean |score| 0.40,
    1.5% relative) and the ranking agrees (Spearman 0.9994, top-8 overlap 8/8, top-10 10/10):
    bfloat16 does not change this ranking.
    """
    direction = model.check_direction(direction).float()
    unit = direction / direction.norm()
    batch_size = check_int("batch_size", batch_size, 1)
    ids, mask = model.prepare_input(tokens, attention_mask)
    wanted = as_positions(positions)
    all_columns = row_columns(mask, wanted)  # [batch, n_pos]
    layers = list(range(model.n_layers))
    # [layers, heads, d_head]: the direction read back through each head's slice of W_O
    reads = torch.stack([w.float() @ unit.to(w.device) for w in map(model.W_O, layers)])
    biases = torch.tensor(
        [0.0 if (b := model.b_O(l)) is None else float(b.float() @ unit.to(b.device)) for l in layers]
    )
    total = torch.zeros(model.n_layers, model.n_heads)
    for start in range(0, len(ids), batch_size):
        rows_mask = mask[start : start + batch_size]
        columns = all_columns[start : start + batch_size]  # [rows, n_pos]

        def pick(name: str, layer: int, z: Tensor, columns=columns) -> Tensor:  # [rows, pos, heads, d]
            return z.gather(1, columns[:, :, None, None].expand(-1, -1, *z.shape[2:]))

        out = model.forward(
            ids[start : start + batch_size],
            rows_mask,
            capture={"z": layers},
            stop_after=layers[-1],
            reduce=pick,
        )
        for l in layers:
            z = out.acts["z"][l].float()  # [rows, n_pos, heads, d_head]
            total[l] += torch.einsum("bphd,hd->h", z, reads[l].to(z.device)).cpu()
    count = len(ids) * len(wanted)
    return total / count + biases[:, None]
