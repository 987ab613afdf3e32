"""RPN proposals: per-level top-k, decode, clip, size filter, per-level NMS, per-image top-k."""

from __future__ import annotations

import torch
from torch import Tensor

from ..inputs.config import CoderConfig, ProposalConfig
from .boxes import batched_nms, clip_to_image, decode, keep_min_size


def image_proposals(
    logits: list[Tensor],
    deltas: list[Tensor],
    anchors: list[Tensor],
    size: tuple[int, int],
    cfg: ProposalConfig,
    coder: CoderConfig,
) -> tuple[Tensor, Tensor, int]:
    """Proposals of one image, from detached head outputs.

    logits[l]: Tensor[A_l]; deltas[l]: Tensor[A_l, 4]; anchors[l]: Tensor[A_l, 4].
    Returns (boxes Tensor[M, 4], objectness logits Tensor[M], non-finite boxes dropped).
    Non-finite boxes are dropped (Detectron2 would raise "Training has diverged" here).
    """
    boxes, scores, groups = [], [], []
    for lvl, (lo, de, an) in enumerate(zip(logits, deltas, anchors)):
        k = min(cfg.pre_nms_top_n, lo.shape[0])
        top = lo.nan_to_num(-float("inf")).topk(k, sorted=True).indices
        b = clip_to_image(
            decode(de[top], an[top], coder.weights, coder.clip, coder.clip_both), size
        )
        boxes.append(b)
        scores.append(lo[top])
        groups.append(torch.full((k,), lvl, dtype=torch.long))
    boxes, scores, groups = torch.cat(boxes), torch.cat(scores), torch.cat(groups)
    finite = torch.isfinite(boxes).all(1) & torch.isfinite(scores)
    dropped = int((~finite).sum())
    idx = finite.nonzero().flatten()
    idx = idx[keep_min_size(boxes[idx], cfg.min_size, cfg.min_size_inclusive)]
    boxes, scores, groups = boxes[idx], scores[idx], groups[idx]
    keep = batched_nms(boxes, scores, groups, cfg.nms_iou)[: cfg.post_nms_top_n]
    return boxes[keep], scores[keep], dropped


def training_proposals(
    outs, anchors: list[Tensor], batch, config
) -> tuple[list[Tensor], list[int]]:
    """Per image, the RoI stage's candidates and how many were dropped as non-finite: the dump's
    proposals (less any with NaN/Inf coordinates), else the RPN's from its detached outputs."""
    if batch.proposals is not None:
        finite = [torch.isfinite(p).all(1) for p in batch.proposals]
        return [p[f] for p, f in zip(batch.proposals, finite)], [int((~f).sum()) for f in finite]
    proposals, nonfinite = [], []
    with torch.no_grad():
        for i, size in enumerate(batch.image_sizes):
            logits, deltas = [o.logits[i] for o in outs], [o.deltas[i] for o in outs]
            boxes, _, bad = image_proposals(
                logits, deltas, anchors, size, config.train_proposals, config.rpn_coder
            )
            proposals.append(boxes)
            nonfinite.append(bad)
    return proposals, nonfinite
