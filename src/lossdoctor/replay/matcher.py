"""Max-IoU assignment of anchors (or proposals) to GT boxes, computed in bounded-memory chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs.config import MatcherConfig
from .boxes import iou_chunks

POSITIVE, NEGATIVE, IGNORED = 1, 0, -1
# an invalid candidate's IoU while matching: below every threshold, never a GT's best
INVALID_IOU = -1.0


@dataclass(kw_only=True)
class Match:
    """labels (Tensor[M] int8): 1 positive, 0 negative, -1 ignored; gt (Tensor[M] int64): matched
    GT index (0 where none); max_iou (Tensor[M]): best IoU over GTs (0 without GT);
    gt_best (Tensor[G]): each GT's best IoU over the candidates."""

    labels: Tensor
    gt: Tensor
    max_iou: Tensor
    gt_best: Tensor


@dataclass(kw_only=True)
class _Scan:
    """What one pass over the IoU blocks collects: per candidate its best IoU and GT, per GT its
    best IoU, and (for the low-quality pass) the candidates that reached a GT's block-best."""

    max_iou: Tensor
    argmax: Tensor
    gt_best: Tensor
    tied_gt: list[Tensor]
    tied_box: list[Tensor]
    tied_val: list[Tensor]


def _scan(gt: Tensor, boxes: Tensor, cfg: MatcherConfig, valid: Tensor | None) -> _Scan:
    m, g = boxes.shape[0], gt.shape[0]
    s = _Scan(
        max_iou=torch.empty(m),
        argmax=torch.empty(m, dtype=torch.long),
        gt_best=torch.full((g,), -float("inf")),
        tied_gt=[],
        tied_box=[],
        tied_val=[],
    )
    for start, iou in iou_chunks(gt, boxes, cfg.union_eps):
        stop = start + iou.shape[1]
        if valid is not None:
            iou = iou.masked_fill(~valid[None, start:stop], INVALID_IOU)
        s.max_iou[start:stop], s.argmax[start:stop] = iou.max(0)
        best = iou.max(1).values
        s.gt_best = torch.maximum(s.gt_best, best)
        if cfg.low_quality:
            # a best of 0 ties with every candidate: handled after the scan, without listing them
            gi, bi = ((iou == best[:, None]) & (best[:, None] > 0)).nonzero(as_tuple=True)
            s.tied_gt.append(gi)
            s.tied_box.append(bi + start)
            s.tied_val.append(best[gi])
    return s


def _threshold(s: _Scan, cfg: MatcherConfig) -> Tensor:
    """Labels from the thresholds: < bg_iou negative, >= fg_iou positive, in between ignored."""
    m = s.max_iou.shape[0]
    if cfg.nan_positive:  # starts positive; a NaN IoU fails both tests and stays so
        labels = torch.full((m,), POSITIVE, dtype=torch.int8)
        labels[s.max_iou < cfg.bg_iou] = NEGATIVE
        labels[(s.max_iou >= cfg.bg_iou) & (s.max_iou < cfg.fg_iou)] = IGNORED
        return labels
    labels = torch.full((m,), IGNORED, dtype=torch.int8)  # starts ignored; so does a NaN IoU
    labels[(s.max_iou >= 0) & (s.max_iou < cfg.bg_iou)] = NEGATIVE
    labels[s.max_iou >= cfg.fg_iou] = POSITIVE
    return labels


def _ties(s: _Scan, cfg: MatcherConfig, m: int, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """(GT, candidate) pairs of the low-quality pass: candidates reaching an eligible GT's best."""
    gi, bi, val = torch.cat(s.tied_gt), torch.cat(s.tied_box), torch.cat(s.tied_val)
    keep = val == s.gt_best[gi]
    gi, bi = gi[keep], bi[keep]
    eligible = s.gt_best >= cfg.low_quality_min_iou
    zero = (s.gt_best == 0) & eligible
    if bool(zero.any()):
        # a GT overlapping nothing: every candidate ties at IoU 0 (torchvision's all-positive case)
        everyone = torch.arange(m) if valid is None else valid.nonzero().flatten()
        zg = zero.nonzero().flatten()
        gi = torch.cat([gi, zg.repeat_interleave(everyone.numel())])
        bi = torch.cat([bi, everyone.repeat(zg.numel())])
    keep = eligible[gi]
    return gi[keep], bi[keep]


def match(gt: Tensor, boxes: Tensor, cfg: MatcherConfig, valid: Tensor | None = None) -> Match:
    """Assign each of ``boxes`` (Tensor[M, 4]) to one of ``gt`` (Tensor[G, 4]).

    Thresholds, then the low-quality pass (see :class:`MatcherConfig`). ``valid`` (Tensor[M] bool)
    excludes candidates: they are ignored and do not count towards a GT's best IoU (mmdet's
    inside flags).
    """
    m = boxes.shape[0]
    if gt.shape[0] == 0:
        labels = torch.full((m,), NEGATIVE, dtype=torch.int8)
        if valid is not None:
            labels[~valid] = IGNORED
        return Match(
            labels=labels,
            gt=torch.zeros(m, dtype=torch.long),
            max_iou=torch.zeros(m),
            gt_best=torch.zeros(0),
        )
    s = _scan(gt, boxes, cfg, valid)
    labels, matched = _threshold(s, cfg), s.argmax.clone()
    if cfg.low_quality:
        gi, bi = _ties(s, cfg, m, valid)
        labels[bi] = POSITIVE
        if cfg.low_quality_reassign:  # the tying GT takes the candidate; later GTs win
            last = torch.full((m,), -1, dtype=torch.long).scatter_reduce(0, bi, gi, "amax")
            matched = torch.where(last >= 0, last, matched)
    if valid is not None:
        labels[~valid] = IGNORED
    return Match(
        labels=labels, gt=matched, max_iou=s.max_iou.clamp(min=0), gt_best=s.gt_best.clamp(min=0)
    )
