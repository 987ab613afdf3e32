"""Seeded positive/negative sampling, shared by every profile."""

from __future__ import annotations

import torch
from torch import Tensor

from ..inputs.config import SamplerConfig
from .matcher import NEGATIVE, POSITIVE


def sample(
    labels: Tensor, cfg: SamplerConfig, generator: torch.Generator | None, sample_all: bool = False
) -> tuple[Tensor, Tensor]:
    """Pick positives and negatives from ``labels`` (Tensor[M], 1/0/-1) → sorted (pos, neg).

    At most ``int(batch_size * pos_fraction)`` positives, negatives fill the rest of
    ``batch_size`` (torchvision's BalancedPositiveNegativeSampler, Detectron2's subsample_labels and
    MMDetection's RandomSampler agree on these counts). ``sample_all`` takes every candidate.
    """
    pos = (labels == POSITIVE).nonzero().flatten()
    neg = (labels == NEGATIVE).nonzero().flatten()
    if sample_all or cfg.take_all:
        return pos, neg
    num_pos = min(pos.numel(), int(cfg.batch_size * cfg.pos_fraction))
    num_neg = min(neg.numel(), cfg.batch_size - num_pos)
    pos = pos[torch.randperm(pos.numel(), generator=generator)[:num_pos]]
    neg = neg[torch.randperm(neg.numel(), generator=generator)[:num_neg]]
    return pos.sort().values, neg.sort().values
