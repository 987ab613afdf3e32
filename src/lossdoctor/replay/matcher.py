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
    tied_gt, tied_box, tied_val = [], [], []
    for start, iou in iou_chunks(gt, boxes, cfg.union_eps):
        stop = start + iou.shape[1]
        if valid is not None:
            iou = iou.masked_fill(~valid[None, start:stop], -1.0)
        v, a = iou.max(0)
        max_iou[start:stop], argmax[start:stop] = v, a
        best = iou.max(1).values
        gt_best = torch.maximum(gt_best, best)
        if cfg.low_quality:
            # candidates reaching their GT's best IoU within this chunk; a best of 0 ties with every
            # candidate and is handled after the loop without listing them all
            gi, bi = ((iou == best[:, None]) & (best[:, None] > 0)).nonzero(as_tuple=True)
            tied_gt.append(gi)
            tied_box.append(bi + start)
            tied_val.append(best[gi])
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
        gi, bi, val = torch.cat(tied_gt), torch.cat(tied_box), torch.cat(tied_val)
        keep = val == gt_best[gi]
        gi, bi = gi[keep], bi[keep]
        eligible = (
            gt_best >= cfg.min_pos_iou if cfg.style == "mmdet" else torch.ones(g, dtype=torch.bool)
        )
        zero = (gt_best == 0) & eligible
        if bool(zero.any()):
            # a GT overlapping nothing: every candidate ties at IoU 0 (torchvision's all-positive case)
            everyone = torch.arange(m) if valid is None else valid.nonzero().flatten()
            zg = zero.nonzero().flatten()
            gi = torch.cat([gi, zg.repeat_interleave(everyone.numel())])
            bi = torch.cat([bi, everyone.repeat(zg.numel())])
        keep = eligible[gi]
        gi, bi = gi[keep], bi[keep]
        labels[bi] = POSITIVE
        if cfg.style == "mmdet":
            # later GTs win: the largest GT index among each candidate's ties
            last = torch.full((m,), -1, dtype=torch.long).scatter_reduce(0, bi, gi, "amax")
            matched = torch.where(last >= 0, last, matched)
    if valid is not None:
        labels[~valid] = IGNORED
    return Match(labels, matched, max_iou.clamp(min=0), gt_best.clamp(min=0))
