"""Per-sample losses and their normalization under a profile term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inputs.profiles import TermSpec
from ..vocab import Empty, LossKind

# fvcore switches smooth-L1 to exact L1 below this beta (the beta = 0 quadratic branch has a NaN
# gradient).
SMOOTH_L1_MIN_BETA = 1e-5


def box_loss(pred: Tensor, target: Tensor, kind: str, beta: float) -> Tensor:
    """Per-sample box loss, summed over the 4 coordinates: Tensor[M, 4] x2 → Tensor[M]."""
    d = (pred - target).abs()
    if kind is LossKind.L1 or beta < SMOOTH_L1_MIN_BETA:
        return d.sum(-1)
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).sum(-1)


def bce_loss(logits: Tensor, positive: Tensor) -> Tensor:
    """Per-anchor objectness BCE: logits Tensor[...], positive Tensor[...] bool → Tensor[...]."""
    return F.binary_cross_entropy_with_logits(logits, positive.to(logits.dtype), reduction="none")


def ce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per-RoI softmax CE: logits Tensor[R, K+1], target column Tensor[R] → Tensor[R]."""
    if logits.shape[0] == 0:
        return logits.sum(1) * 0
    return F.cross_entropy(logits, target, reduction="none")


def denominator(term: TermSpec, count: float) -> float:
    """D = max(count, floor) + eps (see the profiles module)."""
    return max(float(count), term.floor) + term.eps


def normalize(numerator: Tensor, term: TermSpec, count: float) -> tuple[Tensor, float]:
    """weight * numerator / D → (loss, D). D = 0 is the empty set: NaN (0/0) or a live zero."""
    d = denominator(term, count)
    if d == 0:
        value = (
            numerator * 0
            if term.empty is Empty.ZERO
            else numerator / torch.zeros((), dtype=numerator.dtype)
        )
        return value * term.weight, d
    return numerator / d * term.weight, d
