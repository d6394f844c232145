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


ARGMAX_GROUP = 128
"""Columns per group in `argmax_rows`."""


def argmax_rows(z: Tensor) -> Tensor:
    """`z.argmax(-1)` of `z [rows, vocab]` (the first maximum, as torch's), in two cheap passes on
    the CPU: the maximum of each group of `ARGMAX_GROUP` columns, then the argmax within the first
    group that holds the row's maximum (torch's own argmax over 49152 columns costs as much as a
    softmax there).

    >>> z = torch.tensor([[0.0] * 300 + [2.0] + [1.0] * 20, [3.0] * 321])
    >>> argmax_rows(z).tolist()
    [300, 0]
    """
    rows, vocab = z.shape
    main = vocab - vocab % ARGMAX_GROUP
    if z.device.type != "cpu" or main == 0 or z.stride(-1) != 1:
        return z.argmax(-1)
    groups = z[:, :main].unflatten(1, (-1, ARGMAX_GROUP)).amax(-1)  # [rows, main / group]
    best, g = groups.max(-1)  # the first group holding the maximum
    cols = g[:, None] * ARGMAX_GROUP + torch.arange(ARGMAX_GROUP, device=z.device)
    idx = g * ARGMAX_GROUP + z.gather(1, cols).argmax(-1)
    if main < vocab:  # the last, partial group
        tail, at = z[:, main:].max(-1)
        idx = torch.where(tail > best, main + at, idx)
    return idx


class Distributions:
    """Next-token distributions of a block of rows, from logits `z [rows, vocab]`.

    Statistics are float32 (float64 logits stay float64): bfloat16 or float16 logits are
    upcast once per block, so a low-precision unembedding never reaches the sums. Few passes over
    the block: one max, one shift, one softmax, one dot product, a grouped argmax. Sums run over
    terms of one sign (logits shifted by their maximum), so float32 stays accurate.
    """

    def __init__(self, z: Tensor):
        top = z.amax(-1)  # [rows]
        if z.dtype in (torch.bfloat16, torch.float16):  # an upcast copy of our own, shifted in place
            zs = z.float().sub_(top.float()[:, None])
        else:
            zs = z - top[:, None]
        self.zs = zs  # [rows, vocab], <= 0 with its maximum exactly 0 (deleted by drop_logits)
        self.argmax = argmax_rows(zs)  # [rows]
        self.p = torch.softmax(zs, -1)  # [rows, vocab]
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
