"""Seeded positive/negative sampling, shared by every profile."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..inputs.config import SamplerConfig
from .matcher import NEGATIVE, POSITIVE, Match

# the hardness of candidates (Tensor[K] of their indices, whether positive) → Tensor[K]
Hardness = Callable[[Tensor, bool], Tensor]
# IoUBalancedNegSampler's floor_thr: every negative is IoU-sampled (no floor set)
IOU_FLOOR = -1.0


def _choice(idx: Tensor, n: int, generator) -> Tensor:
    """``n`` of ``idx`` at random (MMDetection's random_choice)."""
    return idx[torch.randperm(idx.numel(), generator=generator)[:n]]


def _fill(chosen: Tensor, idx: Tensor, n: int, generator) -> Tensor:
    """``chosen`` topped up to ``n`` at random from the rest of ``idx`` (or cut to ``n``)."""
    if chosen.numel() > n:
        return _choice(chosen, n, generator)
    rest = idx[~torch.isin(idx, chosen)]
    return torch.cat([chosen, _choice(rest, n - chosen.numel(), generator)])


def instance_balanced(pos: Tensor, n: int, gt: Tensor, generator) -> Tensor:
    """InstanceBalancedPosSampler: round(n / G) + 1 positives at most per matched GT box (of
    ``gt`` Tensor[M], each candidate's GT), then topped up or cut to ``n`` at random."""
    if pos.numel() <= n:
        return pos
    boxes = gt[pos].unique()
    per = int(round(n / boxes.numel()) + 1)
    chosen = [pos[gt[pos] == g] for g in boxes]
    chosen = [c if c.numel() <= per else _choice(c, per, generator) for c in chosen]
    return _fill(torch.cat(chosen), pos, n, generator)


def iou_balanced(neg: Tensor, n: int, max_iou: Tensor, bins: int, generator) -> Tensor:
    """IoUBalancedNegSampler (floor_thr -1): n // bins negatives at most from each of ``bins``
    equal IoU intervals between -1 and the best IoU of any candidate (``max_iou`` Tensor[M]),
    then topped up to ``n`` at random."""
    if neg.numel() <= n:
        return neg
    top = float(max_iou.max())
    width, per = (top - IOU_FLOOR) / bins, int(n / bins)
    iou, chosen = max_iou[neg], []
    for i in range(bins):
        lo, hi = IOU_FLOOR + i * width, IOU_FLOOR + (i + 1) * width
        at = neg[(iou >= lo) & (iou < hi)]
        chosen.append(at if at.numel() <= per else _choice(at, per, generator))
    return _fill(torch.cat(chosen), neg, n, generator)


def _draw(idx: Tensor, n: int, generator, hardness: Hardness | None, positive: bool) -> Tensor:
    """``n`` of the candidates ``idx`` (all of them where there are no more): the ``n``
    hardest where a ``hardness`` is given, else a seeded random draw."""
    if hardness is None:
        return _choice(idx, n, generator)
    return idx if idx.numel() <= n else idx[hardness(idx, positive).topk(n).indices]


def sample(
    labels: Tensor,
    cfg: SamplerConfig,
    generator: torch.Generator | None,
    sample_all: bool = False,
    hardness: Hardness | None = None,
    match: Match | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick positives and negatives from ``labels`` (Tensor[M], 1/0/-1) → sorted (pos, neg).

    At most ``int(batch_size * pos_fraction)`` positives, negatives fill the rest of
    ``batch_size`` (torchvision's BalancedPositiveNegativeSampler, Detectron2's subsample_labels and
    MMDetection's samplers agree on these counts), and at most ``neg_pos_ub`` times the positives
    where that is set: drawn at random, the hardest by ``hardness`` (OHEM), or balanced over the
    GT boxes and IoU bins of ``match`` (Libra R-CNN). ``sample_all`` takes every candidate.
    """
    pos = (labels == POSITIVE).nonzero().flatten()
    neg = (labels == NEGATIVE).nonzero().flatten()
    if sample_all or cfg.take_all:
        return pos, neg
    num_pos = min(pos.numel(), int(cfg.batch_size * cfg.pos_fraction))
    num_neg = min(neg.numel(), cfg.batch_size - num_pos)
    if cfg.neg_pos_ub >= 0:
        num_neg = min(num_neg, int(cfg.neg_pos_ub * max(1, num_pos)))
    if match is not None and cfg.instance_balanced_pos:
        pos = instance_balanced(pos, num_pos, match.gt, generator)
    else:
        pos = _draw(pos, num_pos, generator, hardness, True)
    if match is not None and cfg.iou_balanced_bins:
        neg = iou_balanced(neg, num_neg, match.max_iou, cfg.iou_balanced_bins, generator)
    else:
        neg = _draw(neg, num_neg, generator, hardness, False)
    return pos.sort().values, neg.sort().values
