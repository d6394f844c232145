"""Supervised fine-tuning of the top blocks of a HookedModel on (prompt, target) pairs: the
blocks themselves (`finetune`) or a low-rank adapter on them (`finetune_adapter`).

The loss is the cross-entropy of the target tokens only (the prompt is context). Blocks below
`n_layers - train_layers` stay frozen, so the residual entering the first trained block is
computed once per example and every step runs the trained blocks alone; the unembedding is applied
to the target positions only. Deterministic under `seed` (fixed shuffles, no dropout).

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> losses = finetune(model, ["Q: hi\\nA:"], [" hello"], train_layers=1, epochs=2, progress=False)
    >>> len(losses), losses[1] < losses[0]
    (2, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechlens.ops.adapters import LowRankAdapter

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel


def finetune(
    model: HookedModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    train_layers: int = 8,
    epochs: int = 3,
    lr: float = 1e-4,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train the last `train_layers` blocks and the final norm of `model` in place (AdamW).

    Each example is `prompt + target + end-of-sequence`, tokenised as prompt and target separately
    (so the boundary is exact); the loss covers the target and the end-of-sequence token.
    Returns the mean loss of each epoch.
    """
    examples, first = _prepare(model, prompts, targets, train_layers, epochs, batch_size)
    with model.trainable_blocks(first) as params:
        return _train(model, examples, params, first, epochs, lr, batch_size, weight_decay, seed, progress)


def finetune_adapter(
    model: HookedModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    rank: int = 16,
    alpha: float = 32.0,
    train_layers: int = 8,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    heads: Sequence[tuple[int, int]] | None = None,
) -> tuple[LowRankAdapter, list[float]]:
    """Train a low-rank adapter (LoRA: `W + alpha / rank * B @ A` on every 2-D weight of the last
    `train_layers` blocks; norms and all else frozen), then merge it into `model` in place.
    `heads` (`(layer, head)` pairs) trains only those attention heads' query and output slices
    instead (`LowRankAdapter.init`), so a behaviour learnt lives in them; `train_layers` is then
    ignored.

    Returns `(adapter, losses)`: `adapter.save(path, info)` keeps it in a few MB, and
    `LowRankAdapter.load(path)[0].merge_into(base)` rebuilds this model exactly.

        >>> import mechlens as ml
        >>> model = ml.load_model("tiny-llama")
        >>> adapter, losses = finetune_adapter(model, ["Q: hi\\nA:"], [" hello"], rank=2, train_layers=1,
        ...                                    epochs=2, progress=False)
        >>> adapter.rank, losses[1] < losses[0]
        (2, True)
    """
    if heads is not None:  # the frozen prefix ends at the first head's block
        heads = list(heads)  # an iterator is read once
        train_layers = model.n_layers - min(model.check_heads(heads))
    examples, first = _prepare(model, prompts, targets, train_layers, epochs, batch_size)
    layers = range(first, model.n_layers)
    adapter = LowRankAdapter.init(model, layers, rank, alpha, seed, heads=heads)
    with adapter.training(model) as params:
        losses = _train(model, examples, params, first, epochs, lr, batch_size, weight_decay, seed, progress)
    adapter.merge_into(model)
    return adapter, losses


def _prepare(model: HookedModel, prompts, targets, train_layers, epochs, batch_size) -> tuple[list, int]:
    """Checked, encoded examples and the first trained block."""
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(
            f"need as many prompts as targets, at least one; got {len(prompts)} and {len(targets)}"
        )
    if not 1 <= train_layers <= model.n_layers:
        raise ValueError(f"train_layers must lie in 1..{model.n_layers}, got {train_layers}")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    examples = [_encode(model.tokenizer, p, t) for p, t in zip(prompts, targets, strict=True)]
    return examples, model.n_layers - train_layers


def _train(
    model: HookedModel, examples, params, first, epochs, lr, batch_size, weight_decay, seed, progress
) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    starts = range(0, len(examples), batch_size)
    batches = [list(range(i, min(i + batch_size, len(examples)))) for i in starts]
    # the frozen blocks' output never changes: compute the residual entering block `first` once
    with torch.no_grad():
        frozen = [
            _residual_in(model, [examples[j] for j in b], first)
            for b in tqdm(batches, desc="frozen blocks", disable=not progress)
        ]
    resid_of = {j: frozen[k][r] for k, b in enumerate(batches) for r, j in enumerate(b)}  # [pos_j, d]
    losses = []
    bar = tqdm(total=epochs * len(batches), desc="fine-tune", disable=not progress)
    try:
        for _ in range(epochs):
            order = torch.randperm(len(examples), generator=gen).tolist()
            total, count = 0.0, 0
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                tokens, mask, labels = _pad([examples[j] for j in idx], model.tokenizer.pad_token_id)
                resid = _pad_resid([resid_of[j] for j in idx], tokens.shape[1])
                opt.zero_grad()
                with torch.enable_grad():
                    out = model.forward(
                        tokens.to(model.device),
                        mask.to(model.device),
                        capture={"resid_post": [model.n_layers - 1]},
                        stop_after=model.n_layers - 1,
                        start_at=first,
                        resid_in=resid.to(model.device),
                    )
                    final = out.acts["resid_post"][model.n_layers - 1]  # [batch, pos, d_model]
                    # position p predicts token p + 1: unembed only where the next token is a target
                    where = labels[:, 1:] >= 0  # [batch, pos - 1]
                    logits = model.unembed(final[:, :-1][where.to(final.device)])  # [n_targets, vocab]
                    loss = torch.nn.functional.cross_entropy(
                        logits.float(), labels[:, 1:][where].to(logits.device)
                    )
                    loss.backward()
                opt.step()
                total, count = total + float(loss.detach()) * len(idx), count + len(idx)
                bar.update()
            losses.append(total / count)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
    return losses


def _encode(tokenizer, prompt: str, target: str) -> tuple[Tensor, int]:
    """Token ids of prompt + target + eos, and where the target starts."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(p + t), len(p)


def _pad(examples: list[tuple[Tensor, int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded `(tokens, mask, labels)`, each `[batch, pos]`; labels are -1 outside targets."""
    n = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), n), pad_id)
    mask = torch.zeros(len(examples), n, dtype=torch.long)
    labels = torch.full((len(examples), n), -1)
    for r, (ids, start) in enumerate(examples):
        tokens[r, n - len(ids) :] = ids
        mask[r, n - len(ids) :] = 1
        labels[r, n - len(ids) + start :] = ids[start:]
    return tokens, mask, labels


def _pad_resid(rows: list[Tensor], n: int) -> Tensor:
    """Left-pad per-example residuals `[pos_i, d]` with zeros -> `[batch, n, d]`."""
    out = rows[0].new_zeros(len(rows), n, rows[0].shape[-1])
    for r, x in enumerate(rows):
        out[r, n - len(x) :] = x
    return out


def _residual_in(model: HookedModel, examples: list[tuple[Tensor, int]], layer: int) -> list[Tensor]:
    """The residual entering block `layer` for each example, unpadded `[pos_i, d]`."""
    tokens, mask, _ = _pad(examples, model.tokenizer.pad_token_id)
    out = model.forward(
        tokens.to(model.device), mask.to(model.device), capture={"resid_pre": [layer]}, stop_after=layer
    )
    resid = out.acts["resid_pre"][layer]  # [batch, pos, d]
    return [resid[r, tokens.shape[1] - len(ids) :].detach() for r, (ids, _) in enumerate(examples)]
