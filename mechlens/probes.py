"""Linear probes: logistic regression in torch with L2, a validation split and early stopping.

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

import torch
from torch import Tensor


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
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        self.l2, self.lr, self.max_epochs = l2, lr, max_epochs
        self.val_fraction, self.patience = val_fraction, patience
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
        train, val = self._split(y)
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
        self.linear = linear.eval()
        return self

    def _split(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Stratified, seeded train/validation indices."""
        gen = torch.Generator().manual_seed(self.seed)
        train, val = [], []
        for label in (0.0, 1.0):
            idx = (y == label).nonzero()[:, 0]
            idx = idx[torch.randperm(len(idx), generator=gen)]
            n_val = int(round(self.val_fraction * len(idx)))
            val.append(idx[:n_val])
            train.append(idx[n_val:])
        return torch.cat(train).sort().values, torch.cat(val).sort().values

    def decision_function(self, X: Tensor) -> Tensor:
        """Logits `[n]`."""
        if self.linear is None:
            raise RuntimeError("fit the probe first")
        X = torch.as_tensor(X, dtype=torch.float32)
        with torch.no_grad():
            return self.linear((X - self.mean) / self.std)[:, 0]

    def predict_proba(self, X: Tensor) -> Tensor:
        """P(y = 1) `[n]`."""
        return torch.sigmoid(self.decision_function(X))

    @property
    def direction(self) -> Tensor:
        """The probe's weight vector in input units `[d]` (w / std)."""
        if self.linear is None:
            raise RuntimeError("fit the probe first")
        return self.linear.weight[0].detach() / self.std
