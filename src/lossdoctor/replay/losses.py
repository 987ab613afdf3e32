"""Per-sample losses and their normalization under a profile term."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inputs.profiles import TermSpec
from ..vocab import Empty, LossKind

# fvcore switches smooth-L1 to exact L1 below this beta (the beta = 0 quadratic branch has a NaN
# gradient).
SMOOTH_L1_MIN_BETA = 1e-5
# MMDetection's IoU losses floor the union and the enclosing area (GIoULoss, bbox_overlaps) and
# the IoU under the log (IoULoss) at this
IOU_EPS = 1e-6


# Libra R-CNN's balanced L1 (MMDetection's BalancedL1Loss defaults, the values its config uses)
BALANCED_L1_ALPHA, BALANCED_L1_GAMMA = 0.5, 1.5


def balanced_l1(d: Tensor, beta: float) -> Tensor:
    """Balanced L1 of absolute differences ``d``: with b = e^(gamma / alpha) - 1, alpha / b
    (b d + 1) log(b d / beta + 1) - alpha d below beta, gamma d + gamma / b - alpha beta above."""
    alpha, gamma = BALANCED_L1_ALPHA, BALANCED_L1_GAMMA
    b = math.e ** (gamma / alpha) - 1
    low = alpha / b * (b * d + 1) * torch.log(b * d / beta + 1) - alpha * d
    return torch.where(d < beta, low, gamma * d + gamma / b - alpha * beta)


def box_loss(pred: Tensor, target: Tensor, kind: str, beta: float) -> Tensor:
    """Per-sample box loss, summed over the 4 coordinates: Tensor[M, 4] x2 → Tensor[M]."""
    d = (pred - target).abs()
    if kind is LossKind.BALANCED_L1:
        return balanced_l1(d, beta).sum(-1)
    if kind is LossKind.L1 or beta < SMOOTH_L1_MIN_BETA:
        return d.sum(-1)
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).sum(-1)


def _overlap(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(overlap area, area of a, area of b) of box pairs Tensor[M, 4] x2 → Tensor[M] each."""
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return wh[:, 0] * wh[:, 1], area_a, area_b


def _enclosing(a: Tensor, b: Tensor) -> Tensor:
    """Width and height of the smallest box enclosing each pair: Tensor[M, 2]."""
    return torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])


def _aligned_overlaps(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(overlap, union floored at IOU_EPS, enclosing area floored at IOU_EPS) of box pairs
    Tensor[M, 4] x2 → Tensor[M] each, as mmdet's bbox_overlaps(is_aligned=True) computes them."""
    overlap, area_a, area_b = _overlap(a, b)
    union = (area_a + area_b - overlap).clamp(min=IOU_EPS)
    outer = _enclosing(a, b).clamp(min=0)
    return overlap, union, (outer[:, 0] * outer[:, 1]).clamp(min=IOU_EPS)


def giou_loss(boxes: Tensor, gt: Tensor, beta: float = 0.0) -> Tensor:
    """1 - GIoU per box pair: Tensor[M, 4] x2 → Tensor[M]."""
    overlap, union, enclose = _aligned_overlaps(boxes, gt)
    return 1 - (overlap / union - (enclose - union) / enclose)


def iou_loss(boxes: Tensor, gt: Tensor, beta: float = 0.0) -> Tensor:
    """-log IoU per box pair, the IoU floored at IOU_EPS: Tensor[M, 4] x2 → Tensor[M]."""
    overlap, union, _ = _aligned_overlaps(boxes, gt)
    return -(overlap / union).clamp(min=IOU_EPS).log()


def _distance_terms(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(IoU, squared centre distance over the squared enclosing diagonal) of box pairs, with
    IOU_EPS added to the union and the diagonal, as mmdet's diou_loss and ciou_loss do."""
    overlap, area_a, area_b = _overlap(a, b)
    ious = overlap / (area_a + area_b - overlap + IOU_EPS)
    outer = _enclosing(a, b).clamp(min=0)
    c2 = outer[:, 0] ** 2 + outer[:, 1] ** 2 + IOU_EPS
    centre = ((b[:, :2] + b[:, 2:]) - (a[:, :2] + a[:, 2:])) ** 2 / 4
    return ious, centre.sum(-1) / c2


def diou_loss(boxes: Tensor, gt: Tensor, beta: float = 0.0) -> Tensor:
    """1 - DIoU per box pair: Tensor[M, 4] x2 → Tensor[M]."""
    ious, distance = _distance_terms(boxes, gt)
    return 1 - (ious - distance)


def ciou_loss(boxes: Tensor, gt: Tensor, beta: float = 0.0) -> Tensor:
    """1 - CIoU per box pair, CIoU clamped to [-1, 1]; the aspect term's weight alpha carries no
    gradient (mmdet computes it under no_grad): Tensor[M, 4] x2 → Tensor[M]."""
    ious, distance = _distance_terms(boxes, gt)
    w1, h1 = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1] + IOU_EPS
    w2, h2 = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1] + IOU_EPS
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = (ious > 0.5).float() * v / (1 - ious + v)
    return 1 - (ious - (distance + alpha * v)).clamp(min=-1.0, max=1.0)


# Detectron2's (and fvcore's) IoU losses add this to the union and the enclosing area / diagonal
D2_IOU_EPS = 1e-7


def _d2_terms(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(IoU, union, enclosing width and height) with D2_IOU_EPS added to the union as
    Detectron2 adds it."""
    overlap, area_a, area_b = _overlap(a, b)
    union = area_a + area_b - overlap
    return overlap / (union + D2_IOU_EPS), union, _enclosing(a, b)


def giou_d2_loss(boxes: Tensor, gt: Tensor, beta: float = 0.0) -> Tensor:
    """fvcore's giou_loss (Detectron2's box_reg_loss_type giou): Tensor[M, 4] x2 → Tensor[M]."""
    iou, union, outer = _d2_terms(boxes, gt)
    area_c = outer[:, 0] * outer[:, 1]
    return 1 - (iou - (area_c - union) / (area_c + D2_IOU_EPS))


def _d2_distance(boxes: Tensor, gt: Tensor, outer: Tensor) -> Tensor:
    diag = outer[:, 0] ** 2 + outer[:, 1] ** 2 + D2_IOU_EPS
    centre = ((boxes[:, :2] + boxes[:, 2:]) / 2 - (gt[:, :2] + gt[:, 2:]) / 2) ** 2
    return centre.sum(-1) / diag


def diou_d2_loss(boxes: Tensor, gt: Tensor, beta: float = 0.0) -> Tensor:
    """Detectron2's diou_loss: 1 - IoU + centre distance² / diagonal²."""
    iou, _, outer = _d2_terms(boxes, gt)
    return 1 - iou + _d2_distance(boxes, gt, outer)


def ciou_d2_loss(boxes: Tensor, gt: Tensor, beta: float = 0.0) -> Tensor:
    """Detectron2's ciou_loss: the DIoU loss + alpha v, alpha = v / (1 - IoU + v + eps) without
    gradient, no IoU gate and no clamp."""
    iou, _, outer = _d2_terms(boxes, gt)
    w1, h1 = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    w2, h2 = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + D2_IOU_EPS)
    return 1 - iou + _d2_distance(boxes, gt, outer) + alpha * v


# MMDetection's BoundedIoULoss floors its ratios with this (its default, the one replayed)
BOUNDED_IOU_EPS = 1e-3


def bounded_iou_loss(boxes: Tensor, gt: Tensor, beta: float = 0.2) -> Tensor:
    """MMDetection's bounded IoU loss: per coordinate 1 - a bound on the IoU (centre offsets
    against the GT's size, width and height ratios), smoothed as smooth-L1 with ``beta``, summed
    over the 4 coordinates: Tensor[M, 4] x2 → Tensor[M]. The GT side carries no gradient."""
    ctr, wh = (boxes[:, :2] + boxes[:, 2:]) * 0.5, boxes[:, 2:] - boxes[:, :2]
    gt = gt.detach()
    gt_ctr, gt_wh = (gt[:, :2] + gt[:, 2:]) * 0.5, gt[:, 2:] - gt[:, :2]
    d = (gt_ctr - ctr).abs()
    eps = BOUNDED_IOU_EPS
    shift = 1 - torch.clamp((gt_wh - 2 * d) / (gt_wh + 2 * d + eps), min=0)
    size = 1 - torch.min(gt_wh / (wh + eps), wh / (gt_wh + eps))
    comb = torch.cat([shift, size], 1)
    return torch.where(comb < beta, 0.5 * comb * comb / beta, comb - 0.5 * beta).sum(-1)


# one entry per member of vocab.DECODED_BOX_LOSSES; ``beta`` is the bounded IoU loss's
# smoothing (a term's beta), unused by the others
DECODED_LOSSES = {
    LossKind.GIOU: giou_loss,
    LossKind.IOU: iou_loss,
    LossKind.DIOU: diou_loss,
    LossKind.CIOU: ciou_loss,
    LossKind.GIOU_D2: giou_d2_loss,
    LossKind.DIOU_D2: diou_d2_loss,
    LossKind.CIOU_D2: ciou_d2_loss,
    LossKind.BOUNDED_IOU: bounded_iou_loss,
}


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
