"""Seeded positive/negative sampling, shared by every profile."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..inputs.config import SamplerConfig
from .matcher import NEGATIVE, POSITIVE

# the hardness of candidates (Tensor[K] of their indices, whether positive) → Tensor[K]
Hardness = Callable[[Tensor, bool], Tensor]


def _draw(idx: Tensor, n: int, generator, hardness: Hardness | None, positive: bool) -> Tensor:
    """``n`` of the candidates ``idx`` (all of them where there are no more): the ``n``
    hardest where a ``hardness`` is given, else a seeded random draw."""
    if hardness is None:
        return idx[torch.randperm(idx.numel(), generator=generator)[:n]]
    return idx if idx.numel() <= n else idx[hardness(idx, positive).topk(n).indices]


def sample(
    labels: Tensor,
    cfg: SamplerConfig,
    generator: torch.Generator | None,
    sample_all: bool = False,
    hardness: Hardness | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick positives and negatives from ``labels`` (Tensor[M], 1/0/-1) → sorted (pos, neg).

    At most ``int(batch_size * pos_fraction)`` positives, negatives fill the rest of
    ``batch_size`` (torchvision's BalancedPositiveNegativeSampler, Detectron2's subsample_labels and
    MMDetection's RandomSampler and OHEMSampler agree on these counts): drawn at random, or the
    hardest by ``hardness`` (OHEM). ``sample_all`` takes every candidate.
    """
    pos = (labels == POSITIVE).nonzero().flatten()
    neg = (labels == NEGATIVE).nonzero().flatten()
    if sample_all or cfg.take_all:
        return pos, neg
    num_pos = min(pos.numel(), int(cfg.batch_size * cfg.pos_fraction))
    num_neg = min(neg.numel(), cfg.batch_size - num_pos)
    pos = _draw(pos, num_pos, generator, hardness, True)
    neg = _draw(neg, num_neg, generator, hardness, False)
    return pos.sort().values, neg.sort().values
