"""RPN proposals: per-level top-k, decode, clip, size filter, per-level NMS, per-image top-k."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs.config import CoderConfig, ProposalConfig
from ..vocab import Ranking
from .anchors import level_anchors
from .boxes import decode_in_image, keep_min_size
from .heads import rpn_head
from .nms import RANKINGS


@dataclass(kw_only=True)
class ProposalCounts:
    """How many candidates each step of one image's proposal generation kept."""

    anchors: int  # all levels
    preselected: int  # the per-level top-k
    finite: int  # with finite box coordinates and logit
    large_enough: int  # sides above min_size
    scored: int  # probability at least min_score
    kept: int  # after NMS and the per-image top-n

    @property
    def nonfinite(self) -> int:
        return self.preselected - self.finite


def _candidates(rule, logits, deltas, anchors, size, cfg, coder) -> tuple[Tensor, Tensor, Tensor]:
    """Each level's top-k, decoded and clipped → (boxes Tensor[M, 4], logits Tensor[M], level
    Tensor[M])."""
    boxes, scores, groups = [], [], []
    for lvl, (lo, de, an) in enumerate(zip(logits, deltas, anchors)):
        top = rule.preselect(lo.nan_to_num(-float("inf")), min(cfg.pre_nms_top_n, lo.shape[0]))
        boxes.append(decode_in_image(de[top], an[top], coder, size))
        scores.append(lo[top])
        groups.append(torch.full((top.numel(),), lvl, dtype=torch.long))
    return torch.cat(boxes), torch.cat(scores), torch.cat(groups)


def image_proposals(
    logits: list[Tensor],
    deltas: list[Tensor],
    anchors: list[Tensor],
    size: tuple[int, int],
    cfg: ProposalConfig,
    coder: CoderConfig,
    ranking: Ranking,
) -> tuple[Tensor, Tensor, ProposalCounts]:
    """Proposals of one image, from detached head outputs, ranked as ``ranking``'s framework does.

    logits[l]: Tensor[A_l]; deltas[l]: Tensor[A_l, 4]; anchors[l]: Tensor[A_l, 4].
    Returns (boxes Tensor[M, 4], objectness logits Tensor[M], what each step kept).
    Non-finite boxes are dropped (Detectron2 would raise "Training has diverged" here), and NaN
    logits rank last.
    """
    rule = RANKINGS[ranking]
    boxes, scores, groups = _candidates(rule, logits, deltas, anchors, size, cfg, coder)
    preselected = boxes.shape[0]
    idx = (torch.isfinite(boxes).all(1) & torch.isfinite(scores)).nonzero().flatten()
    finite = idx.numel()
    idx = idx[keep_min_size(boxes[idx], cfg.min_size, cfg.min_size_inclusive)]
    large_enough = idx.numel()
    if cfg.min_score > 0:
        idx = idx[scores[idx].sigmoid() >= cfg.min_score]
    boxes, scores, groups = boxes[idx], scores[idx], groups[idx]
    keep = rule.batched_nms(boxes, rule.nms_score(scores), groups, cfg.nms_iou)
    keep = keep[: cfg.post_nms_top_n]
    n = ProposalCounts(
        anchors=sum(a.shape[0] for a in anchors),
        preselected=preselected,
        finite=finite,
        large_enough=large_enough,
        scored=idx.numel(),
        kept=keep.numel(),
    )
    return boxes[keep], scores[keep], n


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
            boxes, _, counts = image_proposals(
                logits,
                deltas,
                anchors,
                size,
                config.train_proposals,
                config.rpn_coder,
                config.ranking,
            )
            proposals.append(boxes)
            nonfinite.append(counts.nonfinite)
    return proposals, nonfinite


def rpn_proposals(heads, batch, config) -> list[Tensor]:
    """Per image, the training proposals (Tensor[M_i, 4]) lossdoctor's RPN generates from the
    batch's features, whether or not the batch carries the run's own."""
    feats = list(batch.features.values())
    shapes = [tuple(f.shape[2:]) for f in feats]
    with torch.no_grad():
        anchors = level_anchors(config.anchors, batch.strides, shapes, batch.pad_size)
        outs = [rpn_head(f, heads) for f in feats]
        own = dataclasses.replace(batch, proposals=None)
        return training_proposals(outs, anchors, own, config)[0]
