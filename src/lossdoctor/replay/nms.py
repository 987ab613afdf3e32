"""Greedy NMS, and how each framework ranks candidates around it.

The frameworks keep the same boxes as long as no two scores tie. On ties their sorts differ:
torchvision's NMS kernel sorts stably, mmcv's does not, torchvision's and mmcv's batched NMS shift
boxes apart per group (which rounds coordinates) below a size and re-sort unstably above it,
torchvision and Detectron2 pre-select by logit with ``topk`` while MMDetection sorts probabilities,
and torchvision ranks its NMS by probability while Detectron2 ranks by logit (probabilities tie
where logits do not, once the sigmoid saturates). Each :class:`RankingRule` replays one framework's
sequence of operations, so that ties break as they did in the run (on the same torch build and
device: an unstable sort's order on ties is the sort kernel's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..vocab import Ranking
from .boxes import box_iou

# torchvision's batched_nms shifts groups apart (one NMS) up to this many coordinates on CPU and
# runs one NMS per group above it (20000 on CUDA)
TORCHVISION_SHIFT_MAX_NUMEL = 4000
# mmcv's batched_nms shifts groups apart (one NMS) below this many boxes, one NMS per group from it
MMCV_SPLIT_THR = 10000


def descending(scores: Tensor, stable: bool) -> Tensor:
    """scores (Tensor[N]) → indices by decreasing score; ``stable=False`` is torch's default sort,
    whose order on ties is the kernel's."""
    return scores.sort(descending=True, stable=stable).indices


def greedy_keep(boxes: Tensor, iou_threshold: float) -> Tensor:
    """Positions (Tensor[K]) kept by greedy NMS over boxes (Tensor[N, 4]) already in visiting
    order: a box is dropped when its IoU with a kept, earlier box exceeds the threshold."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    over = (box_iou(boxes, boxes) > iou_threshold).numpy()
    suppressed = over[0] & False
    keep = []
    for i in range(boxes.shape[0]):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return torch.as_tensor(keep, dtype=torch.long)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, stable: bool = True) -> Tensor:
    """Greedy NMS → kept indices by decreasing score: torchvision's kernel (``stable``) or mmcv's
    (its sort is not stable)."""
    order = descending(scores, stable)
    return order[greedy_keep(boxes[order], iou_threshold)]


def _shifted(boxes: Tensor, groups: Tensor) -> Tensor:
    """The coordinate trick: each group moved past the largest coordinate, so groups never
    overlap and one NMS runs them all (rounding the shifted coordinates as the frameworks do)."""
    return boxes + (groups.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes)))[:, None]


def _kept_per_group(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, order: Tensor | None
) -> Tensor:
    """Kept mask (Tensor[N] bool) of one greedy NMS per group. A group visits its boxes in the
    global ``order`` when given (one NMS over shifted groups), else in its own unstable sort
    (mmcv's per-group NMS); torchvision's stable per-group order is the global stable order."""
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool)
    rank = None
    if order is not None:
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
    for g in groups.unique():
        idx = (groups == g).nonzero().flatten()
        idx = idx[descending(scores[idx], False)] if rank is None else idx[rank[idx].argsort()]
        keep[idx[greedy_keep(boxes[idx], iou_threshold)]] = True
    return keep


def _resorted(keep: Tensor, scores: Tensor) -> Tensor:
    """Kept indices in index order, then sorted by decreasing score with torch's default sort, as
    both frameworks' per-group paths end."""
    idx = keep.nonzero().flatten()
    return idx[descending(scores[idx], False)]


def torchvision_batched_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float
) -> Tensor:
    """``torchvision.ops.batched_nms`` on CPU → kept indices by decreasing score."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    order = descending(scores, True)
    if boxes.numel() <= TORCHVISION_SHIFT_MAX_NUMEL:
        return order[
            _kept_per_group(_shifted(boxes, groups), scores, groups, iou_threshold, order)[order]
        ]
    return _resorted(_kept_per_group(boxes, scores, groups, iou_threshold, order), scores)


def mmcv_batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """``mmcv.ops.batched_nms`` (type ``nms``, offset 0) → kept indices by decreasing score."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    shifted = _shifted(boxes, groups)
    if boxes.shape[0] < MMCV_SPLIT_THR:
        order = descending(scores, False)
        return order[_kept_per_group(shifted, scores, groups, iou_threshold, order)[order]]
    return _resorted(_kept_per_group(shifted, scores, groups, iou_threshold, None), scores)


def _topk_logits(logits: Tensor, k: int) -> Tensor:
    """torchvision and Detectron2: ``topk`` of the level's logits."""
    return logits.topk(k, sorted=True).indices


def _sorted_probabilities(logits: Tensor, k: int) -> Tensor:
    """MMDetection: a full sort of the level's probabilities, only when it has more than k."""
    if k >= logits.shape[0]:
        return torch.arange(logits.shape[0])
    return descending(logits.sigmoid(), False)[:k]


def _logits(logits: Tensor) -> Tensor:
    return logits


@dataclass(frozen=True)
class RankingRule:
    """One framework's ranking of RPN candidates and detections."""

    # a level's logits (Tensor[A]) and k → the k candidates it keeps, in the framework's order
    preselect: Callable[[Tensor, int], Tensor]
    # objectness logits → the score its proposal NMS sorts by
    nms_score: Callable[[Tensor], Tensor]
    # (boxes, scores, groups, iou threshold) → kept indices by decreasing score
    batched_nms: Callable[[Tensor, Tensor, Tensor, float], Tensor]


RANKINGS = {
    Ranking.TORCHVISION: RankingRule(_topk_logits, torch.sigmoid, torchvision_batched_nms),
    Ranking.DETECTRON2: RankingRule(_topk_logits, _logits, torchvision_batched_nms),
    Ranking.MMDET: RankingRule(_sorted_probabilities, torch.sigmoid, mmcv_batched_nms),
}
