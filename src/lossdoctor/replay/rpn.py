"""The RPN stage: head outputs on every level, anchors, one assignment and sampling per image over
all levels jointly (the sampler's budget is per image, not per level), regression targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs.batch import Batch
from ..inputs.checkpoint import BOX_COORDS, HeadWeights
from ..inputs.config import DetectorConfig
from .anchors import inside_flags, level_anchors, valid_flags
from .boxes import encode
from .gt import UsableGt
from .heads import RpnLevelOutput, rpn_head
from .losses import bce_loss
from .matcher import IGNORED, POSITIVE, match
from .sampler import sample
from .samples import HeadCounts, LevelSamples, head_counts


@dataclass(kw_only=True)
class RpnLevel:
    """RPN state of one level. Tensors [N, A_l] are per image and anchor (y, x, a order)."""

    name: str
    stride: int
    anchors: Tensor  # [A_l, 4]
    out: RpnLevelOutput
    labels: Tensor  # int8 1/0/-1 from the matcher
    matched: Tensor  # int64 GT index
    sampled: Tensor  # bool
    positive: Tensor  # bool, sampled positives
    bce: Tensor  # per-anchor BCE, all anchors


@dataclass(kw_only=True)
class RpnImage:
    """One image's assignment: sampled positives and negatives, positive candidates, and per
    usable GT its best anchor IoU and whether any anchor is a positive candidate for it."""

    pos: int
    neg: int
    pos_candidates: int
    gt_best: Tensor
    gt_has_pos: Tensor


@dataclass(kw_only=True)
class RpnStage:
    levels: list[RpnLevel]
    images: list[RpnImage]
    samples: list[LevelSamples]
    counts: HeadCounts


@dataclass(kw_only=True)
class _Assignment:
    """Per image (rows) and anchor of all levels (columns)."""

    labels: Tensor
    matched: Tensor
    sampled: Tensor
    positive: Tensor
    images: list[RpnImage]


def _usable(config, batch: Batch, shapes, flat: Tensor, num_anchors: int, i: int):
    """Image ``i``'s anchors (of all levels) that take part in assignment → Tensor[M] bool, or
    None for all: mmdet's valid flags, and its inside flags with an allowed border."""
    size = batch.image_sizes[i]
    flags = valid_flags(config.anchors, batch.strides, shapes, size, num_anchors)
    valid = None if flags is None else torch.cat(flags)
    inside = inside_flags(flat, size, config.anchors.allowed_border)
    if inside is None or valid is None:
        return valid if inside is None else inside
    return valid & inside


def _assign(
    anchors: list[Tensor], batch: Batch, heads: HeadWeights, config, gt: UsableGt, gen, all_
):
    """Match and sample every image against the anchors of all levels."""
    n, shapes = batch.num_images, [tuple(f.shape[2:]) for f in batch.features.values()]
    flat = torch.cat(anchors)
    a = _Assignment(
        labels=torch.empty(n, flat.shape[0], dtype=torch.int8),
        matched=torch.empty(n, flat.shape[0], dtype=torch.long),
        sampled=torch.zeros(n, flat.shape[0], dtype=torch.bool),
        positive=torch.zeros(n, flat.shape[0], dtype=torch.bool),
        images=[],
    )
    for i in range(n):
        m = match(
            gt.boxes[i],
            flat,
            config.rpn_matcher,
            _usable(config, batch, shapes, flat, heads.num_anchors, i),
        )
        a.labels[i], a.matched[i] = m.labels, m.gt
        pos, neg = sample(m.labels, config.rpn_sampler, gen, all_)
        a.sampled[i, pos] = a.sampled[i, neg] = a.positive[i, pos] = True
        candidates = m.labels == POSITIVE
        hit = torch.zeros(gt.boxes[i].shape[0], dtype=torch.bool)
        hit[m.gt[candidates]] = True
        a.images.append(
            RpnImage(
                pos=pos.numel(),
                neg=neg.numel(),
                pos_candidates=int(candidates.sum()),
                gt_best=m.gt_best,
                gt_has_pos=hit,
            )
        )
    return a


def _targets(pos: Tensor, matched: Tensor, anchors: Tensor, gt: UsableGt, weights) -> Tensor:
    """Regression targets of a level's sampled positives (pos, matched: Tensor[N, A_l])."""
    img_idx, a_idx = pos.nonzero(as_tuple=True)
    tgt = torch.zeros(img_idx.numel(), BOX_COORDS)
    for i in range(pos.shape[0]):
        sel = img_idx == i
        if sel.any():
            tgt[sel] = encode(gt.boxes[i][matched[i, a_idx[sel]]], anchors[a_idx[sel]], weights)
    return tgt


def _level(name, stride, out: RpnLevelOutput, anchors, a: _Assignment, span, gt, config):
    """One level's state and samples; ``span`` is its (start, stop) in the anchors of all levels."""
    start, stop = span
    lab, mat = a.labels[:, start:stop], a.matched[:, start:stop]
    smp, pos = a.sampled[:, start:stop], a.positive[:, start:stop]
    bce = bce_loss(out.logits, lab == POSITIVE)
    level = RpnLevel(
        name=name,
        stride=stride,
        anchors=anchors,
        out=out,
        labels=lab,
        matched=mat,
        sampled=smp,
        positive=pos,
        bce=bce,
    )
    samples = LevelSamples(
        name=name,
        candidates=lab.numel(),
        ignored=int((lab == IGNORED).sum()),
        cls_loss=bce[smp],
        cls_pos=pos[smp],
        box_pred=out.deltas[pos.nonzero(as_tuple=True)],
        box_target=_targets(pos, mat, anchors, gt, config.rpn_coder.weights),
        cls_leak=(bce * 0).sum(),
        box_leak=(out.deltas * 0).sum(),
    )
    return level, samples


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [(end - size, end) for size, end in zip(sizes, ends)]


def rpn_stage(
    heads: HeadWeights,
    features: list[Tensor],
    batch: Batch,
    config: DetectorConfig,
    gt: UsableGt,
    gen: torch.Generator,
    sample_all: bool,
) -> RpnStage:
    """Forward the RPN head on every level, assign and sample, and collect each level's samples."""
    shapes = [tuple(f.shape[2:]) for f in features]
    anchors = level_anchors(config.anchors, batch.strides, shapes, batch.pad_size)
    outs = [rpn_head(f, heads) for f in features]
    a = _assign(anchors, batch, heads, config, gt, gen, sample_all)
    spans = _spans([x.shape[0] for x in anchors])
    built = [
        _level(name, stride, out, anc, a, span, gt, config)
        for name, stride, out, anc, span in zip(batch.levels, batch.strides, outs, anchors, spans)
    ]
    samples = [s for _, s in built]
    pos, neg = [x.pos for x in a.images], [x.neg for x in a.images]
    counts = head_counts(samples, config.rpn_sampler, batch.num_images, pos, neg)
    return RpnStage(levels=[lv for lv, _ in built], images=a.images, samples=samples, counts=counts)
