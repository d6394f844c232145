"""Activation collection and linear probes: batched, cached captures; logistic-regression probes
with L2, a validation split and early stopping; difference-in-means directions; per-layer sweeps.

Example:
    >>> import torch
    >>> X = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    >>> y = (X[:, 0] > 0).long()
    >>> probe = LinearProbe(seed=0).fit(X, y)
    >>> float((probe.predict_proba(X).round() == y).float().mean()) > 0.95
    True
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechlens.cache import DiskCache, atomic_write_bytes, model_fingerprint, stable_hash
from mechlens.models.sampling import check_int
from mechlens.ops.stats import auroc
from mechlens.text.inputs import as_texts

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

POSITIONS = ("last", "mean", "all")


@torch.no_grad()
def collect_activations(
    model: HookedModel,
    texts: str | Sequence[str],
    name: str = "resid_post",
    layers: Sequence[int] | None = None,
    positions: str | Sequence[tuple[int, int]] = "last",
    batch_size: int = 8,
    cache: DiskCache | str | Path | None = None,
    progress: bool = True,
) -> Tensor | list[Tensor]:
    """Activations of `texts` at `layers` (default all) of one cache name, in batches.

    Args:
        positions: "last" (each text's last token) -> `[layers, n, d]`; "mean" (mean over its
            tokens) -> `[layers, n, d]`; "all" -> a list of `[layers, pos_i, d]`; or one token span
            `(start, end)` per text, averaged -> `[layers, n, d]`.
        cache: a `DiskCache` or folder; each batch is stored under the model, texts and settings,
            so an interrupted collection resumes.

    Only the named activation is captured and the forward stops after the last layer needed.
    Activations come back in float32 whatever the model's dtype. In bfloat16 on the embedded model
    (`benchmarks/bf16.py`: 160 chat-templated requests, last token, last layer, final-normed as
    the refusal probe reads them) they differ from float32 by at most 0.85 (mean 0.023, 1.6%
    relative).

        >>> import mechlens as ml
        >>> model = ml.load_model("tiny-llama")
        >>> collect_activations(model, ["a b", "c d e"], layers=[0, 2], progress=False).shape
        torch.Size([2, 2, 64])
    """
    layer_list = model.check_layers(layers)
    spans = None if isinstance(positions, str) else list(positions)
    if spans is None and positions not in POSITIONS:
        raise ValueError(
            f"positions must be one of {POSITIONS} or one (start, end) span per text, got {positions!r}"
        )
    texts = as_texts(texts)
    batch_size = check_int("batch_size", batch_size, 1)
    if spans is not None and len(spans) != len(texts):
        raise ValueError(f"{len(spans)} spans for {len(texts)} texts: give one (start, end) per text")
    if not texts:
        raise ValueError("no texts to collect activations from")
    store = DiskCache.of(cache, "activations")
    fingerprint = model_fingerprint(model) if store is not None else None
    parts: list = []
    for i in tqdm(range(0, len(texts), batch_size), desc="collect activations", disable=not progress):
        batch = list(texts[i : i + batch_size])
        batch_spans = None if spans is None else spans[i : i + batch_size]

        def compute(batch=batch, batch_spans=batch_spans):
            return _collect_batch(model, batch, name, layer_list, positions, batch_spans)

        if store is None:
            parts.append(compute())
        else:
            key = dict(model=fingerprint, texts=stable_hash(batch), hook=name, layers=layer_list,
                       positions=positions if spans is None else batch_spans)  # fmt: skip
            parts.append(store.cached("activations", compute, **key))
    if positions == "all":
        return [t for part in parts for t in part]
    return torch.cat(parts, 1)


def _collect_batch(model: HookedModel, texts, name, layers, positions, spans) -> Tensor | list[Tensor]:
    tokens, mask = model.tokenize(texts)
    _, cache = model.run_with_cache(tokens, [name], layers=layers, attention_mask=mask, return_logits=False)
    acts = cache[name].float().cpu()  # [layers, batch, pos, d] (left-padded)
    if acts.ndim != 4:
        raise ValueError(
            f"collect_activations needs a per-position activation, not {name!r} {tuple(acts.shape)}"
        )
    n_real = mask.sum(1).cpu()
    n_pos = tokens.shape[1]
    if positions == "last":
        return acts[:, :, -1]
    if positions == "all":
        return [acts[:, b, n_pos - int(n_real[b]) :].clone() for b in range(len(texts))]
    rows = []
    for b in range(len(texts)):
        pad = n_pos - int(n_real[b])
        start, end = (0, int(n_real[b])) if spans is None else spans[b]
        if not 0 <= start < end <= int(n_real[b]):
            raise ValueError(f"span {(start, end)} outside text {b} of {int(n_real[b])} tokens")
        rows.append(acts[:, b, pad + start : pad + end].mean(1))
    return torch.stack(rows, 1)


def diff_in_means(acts: Tensor, labels: Sequence[int], normalize: bool = True) -> Tensor:
    """Difference-in-means direction `mean(acts[y == 1]) - mean(acts[y == 0])` over axis -2.

    `acts [..., n, d]` -> `[..., d]` (e.g. one direction per layer), unit length by default.

        >>> diff_in_means(torch.tensor([[0.0, 0], [2.0, 0]]), [0, 1])
        tensor([1., 0.])
    """
    y = torch.as_tensor(labels)
    y = y.long() if y.dtype == torch.bool else y
    if y.ndim != 1 or acts.ndim < 2 or len(y) != acts.shape[-2]:
        raise ValueError(
            f"labels must be one per row of acts [..., n, d]: {tuple(y.shape)} vs {tuple(acts.shape)}"
        )
    if not torch.isin(y, torch.tensor([0, 1])).all():
        raise ValueError("labels must be 0 or 1")
    y = y.bool()
    if y.all() or not y.any():
        raise ValueError("labels must contain both 0 and 1")
    if not torch.isfinite(acts).all():
        raise ValueError("acts hold NaN or inf: drop or fix those rows first")
    d = acts[..., y, :].mean(-2) - acts[..., ~y, :].mean(-2)
    return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12) if normalize else d


@dataclass
class ProbeSweep:
    """A probe per layer and its held-out metrics: `auroc`, `accuracy` `[layers]`."""

    layers: list[int]
    probes: list[LinearProbe]
    auroc: np.ndarray
    accuracy: np.ndarray

    @property
    def best_layer(self) -> int:
        return self.layers[int(np.nanargmax(self.auroc))]


def probe_sweep(
    acts: Tensor,
    labels: Sequence[int],
    layers: Sequence[int] | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    **probe_kwargs,
) -> ProbeSweep:
    """Fit one `LinearProbe` per layer of `acts [layers, n, d]` on a stratified, seeded split and
    report AUROC and accuracy on the held-out part.

    On features collected in bfloat16 on the embedded model (`benchmarks/bf16.py`: harmful vs
    harmless requests, 30 layers), the held-out AUROC per layer differs from float32 by at most
    0.031 (mean 0.008); the curve agrees (Spearman 0.985 over layers) and the best layer is the
    same (16): bfloat16 does not change the conclusion."""
    y = torch.as_tensor(labels).long()
    if acts.ndim != 3 or acts.shape[1] != len(y):
        raise ValueError(f"acts must be [layers, n={len(y)}, d], got {tuple(acts.shape)}")
    layers = list(range(acts.shape[0])) if layers is None else list(layers)
    if len(layers) != acts.shape[0]:
        raise ValueError(f"layers names {len(layers)} layers for acts of {acts.shape[0]}")
    _check_fraction("test_fraction", test_fraction, low_open=True)
    train, test = _stratified_split(y, test_fraction, seed)
    _check_split(y, train, test, "test_fraction", test_fraction)
    probes, aucs, accs = [], [], []
    for i in range(acts.shape[0]):
        probe = LinearProbe(seed=seed, **probe_kwargs).fit(acts[i, train], y[train])
        p = probe.predict_proba(acts[i, test])
        probes.append(probe)
        aucs.append(auroc(p.numpy(), y[test].numpy()))
        accs.append(float(((p > 0.5).long() == y[test]).float().mean()))
    return ProbeSweep(layers, probes, np.array(aucs), np.array(accs))


def _check_fraction(name: str, value: float, low_open: bool) -> float:
    """`value` as a float in (0, 1) (`low_open`) or [0, 1); `ValueError`/`TypeError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    low_ok = value > 0 if low_open else value >= 0
    if not (low_ok and value < 1):
        raise ValueError(f"{name} must lie in {'(0' if low_open else '[0'}, 1), got {value}")
    return value


def _check_split(y: Tensor, keep: Tensor, held: Tensor, name: str, fraction: float) -> None:
    """Both labels on the kept side of a split, and on the held-out side too for a test split (an
    AUROC needs both; a validation split only measures the loss)."""
    for side, idx in (("kept", keep), ("held-out", held)):
        if side == "held-out" and name == "val_fraction":
            continue
        if y[idx].unique().numel() < 2:
            raise ValueError(
                f"{name}={fraction} leaves the {side} part of {len(y)} rows ({len(idx)} rows) without both "
                "labels: use more rows or another fraction"
            )


def _stratified_split(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded indices `(keep, held_out)`, `fraction` of each label held out."""
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for label in y.unique():
        idx = (y == label).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


_SETTINGS = ("l2", "lr", "max_epochs", "val_fraction", "patience", "standardize", "seed")


class LinearProbe:
    """Binary logistic-regression probe `p(y=1 | x) = sigmoid(w . standardise(x) + b)`.

    Args:
        l2: weight of the L2 penalty on w (not on b), relative to the mean log-loss.
        lr, max_epochs: full-batch Adam steps.
        val_fraction: share of the data held out (stratified) for early stopping; 0 trains on
            everything for `max_epochs` steps.
        patience: stop after this many steps without a better validation loss; the best
            weights are kept.
        seed: fixes the split, so fitting is deterministic.

    The probe fits in float32; `decision_function` scores in its input's dtype. Fit and scored
    on features collected in bfloat16 on the embedded model (`benchmarks/bf16.py`: 120 training
    and 40 held-out refusal requests, last layer), its held-out probabilities differ from float32
    by at most 0.17 (mean 0.0054); the float32 probe reading bf16 features, by at most 0.055 (mean
    0.0019). The held-out AUROC is 1.000 in both (bootstrap 95% interval [1, 1]): no change of
    conclusion, on a task that saturates it.
    """

    def __init__(
        self,
        l2: float = 1e-3,
        lr: float = 0.05,
        max_epochs: int = 500,
        val_fraction: float = 0.2,
        patience: int = 25,
        standardize: bool = True,
        seed: int = 0,
    ):
        _check_fraction("val_fraction", val_fraction, low_open=False)
        for name, value, zero_ok in (("l2", l2, True), ("lr", lr, False)):
            if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
            if not np.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
                raise ValueError(f"{name} must be a finite number {'>=' if zero_ok else '>'} 0, got {value}")
        for name, count in (("max_epochs", max_epochs), ("patience", patience)):
            if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
                raise ValueError(f"{name} must be an int >= 1, got {count!r}")
        if not isinstance(standardize, bool):
            raise TypeError(f"standardize must be True or False, got {standardize!r}")
        seed = check_int("seed", seed, 0)
        # plain Python numbers, so that `save` writes only what `load` reads back safely
        self.l2, self.lr, self.max_epochs = float(l2), float(lr), int(max_epochs)
        self.val_fraction, self.patience = float(val_fraction), int(patience)
        self.standardize, self.seed = standardize, seed
        self.linear: torch.nn.Linear | None = None
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.history: list[float] = []

    def fit(self, X: Tensor, y: Tensor) -> LinearProbe:
        """Fit on `X [n, d]` and labels `y [n]` in {0, 1}."""
        X, y = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y).float()
        if X.ndim != 2 or y.shape != (X.shape[0],):
            raise ValueError(f"X must be [n, d] and y [n]; got {tuple(X.shape)} and {tuple(y.shape)}")
        if not torch.isin(y, torch.tensor([0.0, 1.0])).all() or y.min() == y.max():
            raise ValueError("y must hold both labels 0 and 1")
        if not torch.isfinite(X).all():
            bad = (~torch.isfinite(X)).any(1).nonzero()[:, 0].tolist()
            raise ValueError(
                f"X has NaN or inf in rows {bad[:10]}{'...' if len(bad) > 10 else ''}: drop or fix them"
            )
        y_int = y.long()
        train, val = _stratified_split(y_int, self.val_fraction, self.seed)
        _check_split(y_int, train, val, "val_fraction", self.val_fraction)
        self.mean = X[train].mean(0) if self.standardize else torch.zeros(X.shape[1])
        self.std = X[train].std(0).clamp_min(1e-8) if self.standardize else torch.ones(X.shape[1])
        Z = (X - self.mean) / self.std
        gen = torch.Generator().manual_seed(self.seed)
        linear = torch.nn.Linear(X.shape[1], 1)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.01)
            linear.bias.zero_()
        opt = torch.optim.Adam(linear.parameters(), lr=self.lr)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        best, best_state, waited = float("inf"), copy.deepcopy(linear.state_dict()), 0
        self.history = []
        for _ in range(self.max_epochs):
            opt.zero_grad()
            with torch.enable_grad():  # also inside a caller's no_grad
                loss = loss_fn(linear(Z[train])[:, 0], y[train]) + self.l2 * linear.weight.pow(2).sum()
                loss.backward()
            opt.step()
            if len(val):
                with torch.no_grad():
                    v = float(loss_fn(linear(Z[val])[:, 0], y[val]))
                self.history.append(v)
                if v < best - 1e-6:
                    best, best_state, waited = v, copy.deepcopy(linear.state_dict()), 0
                else:
                    waited += 1
                    if waited >= self.patience:
                        break
        if len(val):
            linear.load_state_dict(best_state)
        self.linear = linear.eval().requires_grad_(False)
        return self

    def decision_function(self, X: Tensor) -> Tensor:
        """Logits: `X [..., d]` -> `[...]`; differentiable in X (the probe's own weights are frozen)."""
        if self.linear is None:
            raise RuntimeError("fit the probe first")
        X = torch.as_tensor(X)
        X = X if X.is_floating_point() else X.float()
        assert self.mean is not None and self.std is not None  # set by fit / load with the weights
        w, b = self.linear.weight[0].to(X), self.linear.bias[0].to(X)
        return ((X - self.mean.to(X)) / self.std.to(X)) @ w + b

    def predict_proba(self, X: Tensor) -> Tensor:
        """P(y = 1): `X [..., d]` -> `[...]`."""
        return torch.sigmoid(self.decision_function(X))

    def save(self, path: str | Path) -> None:
        """Write the fitted probe (weights, standardisation, settings) atomically."""
        if self.linear is None:
            raise RuntimeError("fit the probe first")
        state = {"settings": {k: getattr(self, k) for k in _SETTINGS}, "linear": self.linear.state_dict(),
                 "mean": self.mean, "std": self.std}  # fmt: skip
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> LinearProbe:
        """A probe written by `save` (loading runs no code: tensors and settings only)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            settings, mean, std, linear = state["settings"], state["mean"], state["std"], state["linear"]
        except FileNotFoundError:
            raise
        except Exception as err:  # a pickle error, a foreign file, a missing key
            raise ValueError(
                f"{path} is not a probe saved by LinearProbe.save ({type(err).__name__}: {err})"
            ) from None
        probe = cls(**settings)
        probe.mean, probe.std = mean, std
        probe.linear = torch.nn.Linear(len(probe.mean), 1)
        probe.linear.load_state_dict(linear)
        probe.linear.eval().requires_grad_(False)
        return probe

    @property
    def direction(self) -> Tensor:
        """The probe's weight vector in input units `[d]` (w / std)."""
        if self.linear is None or self.std is None:
            raise RuntimeError("fit the probe first")
        return self.linear.weight[0].detach() / self.std
