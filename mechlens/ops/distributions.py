"""Next-token distributions and divergences between them, computed in float32 without loss:
the kernels shared by the logit lens, the per-token signals and the suppression KL.

Example:
    >>> import torch
    >>> d = Distributions(torch.tensor([[2.0, 0.0, -1.0]]))
    >>> round(float(d.entropy[0]), 4) == round(float(-(d.p * d.p.log()).sum()), 4)
    True
    >>> p = torch.tensor([1.0, 0.0]).log(); q = torch.tensor([0.0, 1.0]).log()
    >>> round(float(jsd(p, q)), 6) == round(math.log(2), 6)
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BLOCK_ROWS = 64
"""Rows per pass over the vocabulary: small enough to stay in cache."""


class Distributions:
    """Next-token distributions of a block of rows, from logits `z [rows, vocab]` (float32).

    Few passes over the block: one softmax, one max, one shift, one dot product. Sums run over
    terms of one sign (logits shifted by their maximum), so float32 stays accurate.
    """

    def __init__(self, z: Tensor):
        self.p = torch.softmax(z, -1)  # [rows, vocab]
        top, self.argmax = z.max(-1)  # [rows]
        self.zs = z - top[:, None]  # [rows, vocab], <= 0 (deleted by drop_logits)
        self.top_p = self.p.gather(1, self.argmax[:, None])[:, 0]  # >= 1/vocab, so its log is safe
        self.log_top_p = self.top_p.log()  # = max(z) - logsumexp(z)
        self.entropy = -self.log_top_p - torch.linalg.vecdot(self.p, self.zs)  # H = lse - E_p[z]

    def drop_logits(self) -> Distributions:
        """Free the shifted logits (probabilities and entropy stay); returns self."""
        del self.zs
        return self

    def kl_from(self, other: Distributions) -> Tensor:
        """KL(other || self) = -H(other) - E_other[z_self] + logsumexp(z_self), [rows]."""
        return -other.entropy - torch.linalg.vecdot(other.p, self.zs) - self.log_top_p

    def logprob(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probability and rank (0 = most likely) of one token id per row, `ids [rows]`."""
        zt = self.zs.gather(1, ids[:, None])  # [rows, 1]
        return zt[:, 0] + self.log_top_p, (self.zs > zt).sum(-1)

    def jsd(self, other: Distributions) -> Tensor:
        """JSD(self, other), [rows]."""
        return jsd_probs(self.p, other.p)


def jsd_probs(p: Tensor, q: Tensor) -> Tensor:
    """JSD of probabilities `[..., vocab]` as a sum of non-negative terms (accurate in float32).

    With s = p + q and r = p / s, each token adds s * (log 2 - binary_entropy(r)) / 2.
    """
    s = p + q
    r = p / s.clamp_min(torch.finfo(s.dtype).tiny)
    h = torch.special.xlogy(r, r) + torch.special.xlogy(1 - r, 1 - r)  # -binary entropy, in [-log 2, 0]
    return 0.5 * torch.linalg.vecdot(s, h + math.log(2))


def jsd(logp: Tensor, logq: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) between distributions given as log-probabilities `[..., vocab]`.

    >>> p = torch.tensor([1.0, 0.0]).log(); q = torch.tensor([0.0, 1.0]).log()
    >>> round(float(jsd(p, q)), 6) == round(math.log(2), 6)
    True
    """
    return jsd_probs(logp.exp(), logq.exp())
