"""Max-IoU assignment of anchors (or proposals) to GT boxes, computed in bounded-memory chunks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs.config import MatcherConfig
from .boxes import iou_chunks

POSITIVE, NEGATIVE, IGNORED = 1, 0, -1


@dataclass
class Match:
    """labels (Tensor[M] int8): 1 positive, 0 negative, -1 ignored; gt (Tensor[M] int64): matched
    GT index (0 where none); max_iou (Tensor[M]): best IoU over GTs (0 without GT);
    gt_best (Tensor[G]): each GT's best IoU over the candidates."""

    labels: Tensor
    gt: Tensor
    max_iou: Tensor
    gt_best: Tensor


def match(gt: Tensor, boxes: Tensor, cfg: MatcherConfig, valid: Tensor | None = None) -> Match:
    """Assign each of ``boxes`` (Tensor[M, 4]) to one of ``gt`` (Tensor[G, 4]).

    Thresholds: IoU < bg_iou → negative, >= fg_iou → positive, between → ignored. Then the
    low-quality pass (see :class:`MatcherConfig`). ``valid`` (Tensor[M] bool) excludes candidates:
    they are ignored and do not count towards a GT's best IoU (mmdet's inside flags).
    """
    m = boxes.shape[0]
    g = gt.shape[0]
    labels = torch.full((m,), IGNORED, dtype=torch.int8)
    if g == 0:
        labels.fill_(NEGATIVE)
        if valid is not None:
            labels[~valid] = IGNORED
        return Match(labels, torch.zeros(m, dtype=torch.long), torch.zeros(m), torch.zeros(0))
    max_iou = torch.empty(m)
    argmax = torch.empty(m, dtype=torch.long)
    gt_best = torch.full((g,), -float("inf"))
    for start, iou in iou_chunks(gt, boxes, cfg.union_eps):
        stop = start + iou.shape[1]
        if valid is not None:
            iou = iou.masked_fill(~valid[None, start:stop], -1.0)
        v, a = iou.max(0)
        max_iou[start:stop], argmax[start:stop] = v, a
        gt_best = torch.maximum(gt_best, iou.max(1).values)
    matched = argmax.clone()
    if cfg.style == "mmdet":
        # starts ignored; a NaN IoU stays ignored
        labels[(max_iou >= 0) & (max_iou < cfg.bg_iou)] = NEGATIVE
        labels[max_iou >= cfg.fg_iou] = POSITIVE
    else:
        # starts matched to its argmax; a NaN IoU fails both tests and stays positive (torchvision)
        labels.fill_(POSITIVE)
        labels[max_iou < cfg.bg_iou] = NEGATIVE
        labels[(max_iou >= cfg.bg_iou) & (max_iou < cfg.fg_iou)] = IGNORED
    if cfg.low_quality:
        for start, iou in iou_chunks(gt, boxes, cfg.union_eps):
            stop = start + iou.shape[1]
            hit = iou == gt_best[:, None]
            if valid is not None:
                hit &= valid[None, start:stop]
            if cfg.style == "mmdet":
                hit &= (gt_best >= cfg.min_pos_iou)[:, None]
                any_hit = hit.any(0)
                # later GTs win: the last GT index with a hit
                last = g - 1 - hit.flip(0).int().argmax(0)
                matched[start:stop] = torch.where(any_hit, last, matched[start:stop])
            else:
                any_hit = hit.any(0)
            labels[start:stop][any_hit] = POSITIVE
    if valid is not None:
        labels[~valid] = IGNORED
    return Match(labels, matched, max_iou.clamp(min=0), gt_best.clamp(min=0))
