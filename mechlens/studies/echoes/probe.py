"""The paper's echo detector: a small MLP on sentence embeddings of the question and of the
opening of the thinking (hhh2210/echoes-as-anchors, `train_mlp/train_repeat_mlp.py`,
`RepeatDetector`; used by `src/data_processing/mlp_pipeline/inference.py`).

Its defaults are the authors': the first 32 words of the thinking, a 32-unit hidden layer (0: a
linear probe), AdamW at lr 1e-4 and weight decay 0.01, batches of 64, a positive-class weight of
negatives / positives, early stopping after 10 epochs without a better loss on a 15% validation
split, at most 200 epochs, and "echo" above probability 0.5. The labels are the user's (the
authors label by hand and with an LLM); the embedder defaults to the thought-anchors one,
all-MiniLM-L6-v2 (the authors' is a local SentenceTransformer path).

Example (`embed` maps texts to vectors):
    >>> probe = EchoProbe(seed=0).fit(questions, responses, labels, embed)   # doctest: +SKIP
    >>> probe.predict_proba(questions, responses, embed)                     # doctest: +SKIP
    >>> echoes.analyze(model, problems, detector=probe.detector(embed))     # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from mechlens.studies.echoes.echo import _thinking_start

Embedder = Callable[[list[str]], Tensor]


def opening_words(response: str, words: int = 32) -> str:
    """The first `words` words of the thinking (after `<think>`): what the probe reads.

    >>> opening_words("<think>\\nTom has 3 apples and more", words=3)
    'Tom has 3'
    """
    return " ".join(response[_thinking_start(response) :].split()[:words])


class EchoProbe:
    """The authors' `RepeatDetector` and its training loop (see the module docstring)."""

    def __init__(
        self,
        hidden: int = 32,
        words: int = 32,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        epochs: int = 200,
        batch_size: int = 64,
        patience: int = 10,
        val_fraction: float = 0.15,
        threshold: float = 0.5,
        seed: int = 0,
    ):
        counts = {"hidden": (hidden, 0), "words": (words, 1), "epochs": (epochs, 1),
                  "batch_size": (batch_size, 1), "patience": (patience, 1), "seed": (seed, 0)}  # fmt: skip
        for name, (count, low) in counts.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < low:
                raise ValueError(f"{name} must be an int >= {low}, got {count!r}")
        for name, number, high in (("lr", lr, float("inf")), ("val_fraction", val_fraction, 1.0),
                                   ("threshold", threshold, 1.0)):  # fmt: skip
            if isinstance(number, bool) or not isinstance(number, int | float) or not 0 < number < high:
                raise ValueError(f"{name} must be a number in (0, {high}), got {number!r}")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, int | float) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        self.hidden, self.words, self.lr, self.weight_decay = hidden, words, float(lr), float(weight_decay)
        self.epochs, self.batch_size, self.patience = epochs, batch_size, patience
        self.val_fraction, self.threshold, self.seed = float(val_fraction), float(threshold), seed
        self.net: nn.Module | None = None
        self.history: list[float] = []  # validation loss per epoch

    def features(self, questions: Sequence[str], responses: Sequence[str], embed: Embedder) -> Tensor:
        """`[n, 2 d]`: the question's embedding beside the thinking's opening words'."""
        if len(questions) != len(responses) or not questions:
            raise ValueError(
                "questions and responses must be equally long and non-empty, "
                f"got {len(questions)} and {len(responses)}"
            )
        q = torch.as_tensor(embed(list(questions)), dtype=torch.float32)
        p = torch.as_tensor(embed([opening_words(r, self.words) for r in responses]), dtype=torch.float32)
        return torch.cat([q, p], dim=1)

    def fit(
        self, questions: Sequence[str], responses: Sequence[str], labels: Sequence[int], embed: Embedder
    ) -> EchoProbe:
        """Train on `labels` (1: the thinking opens with an echo), seeded."""
        X = self.features(questions, responses, embed)
        y = torch.as_tensor(list(labels), dtype=torch.float32)
        if y.shape != (len(X),) or not torch.isin(y, torch.tensor([0.0, 1.0])).all() or y.min() == y.max():
            raise ValueError("labels must hold 0 and 1, one per response")
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(X), generator=gen)
        n_val = max(1, int(self.val_fraction * len(X)))
        val, train = order[:n_val], order[n_val:]
        if len(train) == 0:
            raise ValueError(f"too few examples ({len(X)}) for a validation split of {self.val_fraction}")
        torch.manual_seed(self.seed)
        d = X.shape[1]
        net: nn.Module = (
            nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
            if self.hidden
            else nn.Linear(d, 1)
        )
        positives = float(y[train].sum())
        weight = (len(train) - positives) / positives if 0 < positives < len(train) else 1.0
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(weight))
        optimizer = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best, best_state, waited = float("inf"), copy.deepcopy(net.state_dict()), 0
        self.history = []
        with torch.enable_grad():
            for _ in range(self.epochs):
                net.train()
                for batch in train[torch.randperm(len(train), generator=gen)].split(self.batch_size):
                    optimizer.zero_grad()
                    loss_fn(net(X[batch]).squeeze(1), y[batch]).backward()
                    optimizer.step()
                net.eval()
                with torch.no_grad():
                    val_loss = float(loss_fn(net(X[val]).squeeze(1), y[val]))
                self.history.append(val_loss)
                if val_loss < best:
                    best, best_state, waited = val_loss, copy.deepcopy(net.state_dict()), 0
                else:
                    waited += 1
                    if waited >= self.patience:
                        break
        net.load_state_dict(best_state)
        self.net = net.eval()
        return self

    @torch.no_grad()
    def predict_proba(self, questions: Sequence[str], responses: Sequence[str], embed: Embedder) -> Tensor:
        """`[n]`: the probability that each thinking opens with an echo."""
        if self.net is None:
            raise ValueError("fit the probe first")
        return torch.sigmoid(self.net(self.features(questions, responses, embed)).squeeze(1))

    def detector(self, embed: Embedder) -> Callable[[str, str], bool]:
        """`(question, response) -> bool`, for `echoes.analyze(detector=...)`."""
        return lambda q, r: bool(self.predict_proba([q], [r], embed)[0] > self.threshold)
