"""The RoI stage: candidates (proposals, plus GT), assignment and sampling per image, multi-scale
RoIAlign, the box head, and each level's samples."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs.checkpoint import BOX_COORDS, HeadWeights
from ..inputs.config import DetectorConfig
from .boxes import encode, scaled_about_centre
from .gt import BACKGROUND_GT, UsableGt
from .heads import box_head
from .losses import ce_loss
from .matcher import NEGATIVE, POSITIVE, match
from .roi_align import map_levels, multiscale_roi_align
from .sampler import sample
from .samples import HeadCounts, LevelSamples, head_counts

BACKGROUND_CLASS = -1  # fg_class of a negative RoI
NO_GT = -1  # gt_index of a negative RoI


@dataclass(kw_only=True)
class SampledRois:
    """The sampled RoIs of the batch, positives first within each image. boxes Tensor[R, 4];
    img, level, fg_class (-1: background), gt_index (-1: none) Tensor[R]; is_gt Tensor[R] bool;
    targets, gt_boxes Tensor[R, 4] (the encoded targets and the matched GT boxes, valid for
    positives)."""

    boxes: Tensor
    img: Tensor
    level: Tensor
    fg_class: Tensor
    gt_index: Tensor
    is_gt: Tensor
    targets: Tensor
    gt_boxes: Tensor
    candidates_per_level: list[int]
    img_pos: list[int]
    img_neg: list[int]


@dataclass(kw_only=True)
class RoiStage(SampledRois):
    """The sampled RoIs and the box head on them: pooled Tensor[R, C, S, S] (pooled_reg: a
    double head's scaled RoIs, else None); hidden1, hidden Tensor[R, F]; hidden_reg
    Tensor[R, F'] (what the regressor takes: ``hidden`` but for a double head); cls_logits
    Tensor[R, K+1]; deltas Tensor[R, reg_classes, 4]; ce Tensor[R]."""

    pooled: Tensor
    pooled_reg: Tensor | None
    hidden1: Tensor
    hidden: Tensor
    hidden_reg: Tensor
    cls_logits: Tensor
    deltas: Tensor
    ce: Tensor
    samples: list[LevelSamples]
    counts: HeadCounts

    @property
    def num_levels(self) -> int:
        return len(self.candidates_per_level)


class ScaleGrad(torch.autograd.Function):
    """The identity forward; the gradient scaled on the way back (Detectron2's cascade scales
    each stage's gradient into the pooled features by 1 / stages)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def _candidates(props: Tensor, gt: Tensor, config: DetectorConfig) -> tuple[Tensor, Tensor]:
    """One image's candidates (proposals, then the GT if the sampler adds it) and is_gt flags."""
    cands = torch.cat([props, gt]) if config.roi_sampler.add_gt else props
    is_gt = torch.zeros(cands.shape[0], dtype=torch.bool)
    if config.roi_sampler.add_gt:
        is_gt[props.shape[0] :] = True
    return cands, is_gt


@dataclass(kw_only=True)
class _ImageRois:
    """One image's candidates and its sampled RoI rows."""

    candidates: Tensor
    boxes: Tensor
    fg_class: Tensor
    gt_index: Tensor
    is_gt: Tensor
    targets: Tensor
    gt_boxes: Tensor
    pos: int
    neg: int


# an image's candidate boxes Tensor[K, 4] and their classes Tensor[K] (-1: background) → each
# one's classification loss Tensor[K], what OHEM ranks them by
Mining = Callable[[Tensor, Tensor], Tensor]


def classification_loss(
    heads: HeadWeights, features: list[Tensor], strides: list[int], config: DetectorConfig,
    image: int, boxes: Tensor, fg_class: Tensor,
) -> Tensor:  # fmt: skip
    """The box head's cross-entropy of each of ``boxes`` Tensor[K, 4] of image ``image`` against
    its class ``fg_class`` Tensor[K] (-1: background), without gradient → Tensor[K]: how
    MMDetection's OHEMSampler ranks candidates (the head in training mode, as it runs it)."""
    with torch.no_grad():
        img = torch.full((boxes.shape[0],), image, dtype=torch.long)
        levels = map_levels(boxes, strides, config.roi_pool)
        feats = [f.detach() for f in features]
        cls = box_head(*pool_rois(feats, strides, boxes, img, levels, heads, config), heads,
                       config).cls  # fmt: skip
        bg = torch.full_like(fg_class, heads.bg_col)
        return ce_loss(cls, torch.where(fg_class >= 0, heads.fg_logit(fg_class.clamp(min=0)), bg))


def _sample_image(
    props, gt, labels, config: DetectorConfig, gen, sample_all, mine: Mining | None = None
) -> _ImageRois:
    """Assign one image's candidates to its GT and sample them (the hardest by ``mine`` where
    the sampler mines hard examples) → that image's RoI rows."""
    cands, is_gt = _candidates(props, gt, config)
    m = _assign(cands, is_gt, gt, labels, config)

    def hardness(idx: Tensor, positive: bool) -> Tensor:
        background = torch.full_like(idx, BACKGROUND_CLASS)
        return mine(cands[idx], labels[m.gt[idx]] if positive else background)

    hard = hardness if mine is not None and config.roi_sampler.hard_mining else None
    pos, neg = sample(m.labels, config.roi_sampler, gen, sample_all, hard, m)
    return _rows(cands, is_gt, gt, labels, m, pos, neg, config)


def _assign(cands: Tensor, is_gt: Tensor, gt: Tensor, labels: Tensor, config: DetectorConfig):
    """One image's candidates matched to its GT, as its framework orders the passes."""
    self_assigned = config.roi_sampler.gt_self_assigned and config.roi_sampler.add_gt
    # MMDetection assigns the proposals alone (a GT's best IoU, which the low-quality pass
    # ties to, is over proposals), then adds each GT as its own match, whatever its IoU
    m = match(gt, cands, config.roi_matcher, valid=~is_gt if self_assigned else None)
    if self_assigned and gt.shape[0]:
        m.labels[is_gt] = POSITIVE
        m.gt[is_gt] = torch.arange(gt.shape[0])
        m.max_iou[is_gt] = 1.0
    if gt.shape[0]:
        # a GT labelled background (torchvision's label 0): what it matches trains as background
        as_bg = (m.labels == POSITIVE) & (labels[m.gt.clamp(min=0)] == BACKGROUND_GT)
        m.labels[as_bg] = NEGATIVE
    return m


def _rows(cands, is_gt, gt, labels, m, pos: Tensor, neg: Tensor, config) -> _ImageRois:
    """The sampled candidates ``pos`` and ``neg`` as RoI rows, positives first."""
    idx = torch.cat([pos, neg])
    fg = torch.full((idx.numel(),), BACKGROUND_CLASS, dtype=torch.long)
    gidx = torch.full((idx.numel(),), NO_GT, dtype=torch.long)
    tgt = torch.zeros(idx.numel(), BOX_COORDS)
    gt_boxes = torch.zeros(idx.numel(), BOX_COORDS)
    if pos.numel():
        gidx[: pos.numel()] = m.gt[pos]
        fg[: pos.numel()] = labels[m.gt[pos]]
        gt_boxes[: pos.numel()] = gt[m.gt[pos]]
        tgt[: pos.numel()] = encode(gt[m.gt[pos]], cands[pos], config.roi_coder.weights)
    return _ImageRois(
        candidates=cands,
        boxes=cands[idx],
        fg_class=fg,
        gt_index=gidx,
        is_gt=is_gt[idx],
        targets=tgt,
        gt_boxes=gt_boxes,
        pos=pos.numel(),
        neg=neg.numel(),
    )


def sample_rois(
    proposals, gt: UsableGt, strides, config: DetectorConfig, gen, sample_all,
    mine: Callable[..., Tensor] | None = None,
):  # fmt: skip
    """Assign and sample every image's candidates → :class:`SampledRois`. ``mine(image, boxes,
    fg_class)``: the classification losses hard-example mining ranks by."""
    cand_levels = torch.zeros(len(strides), dtype=torch.long)
    rows = []
    for i, (props, boxes, labels) in enumerate(zip(proposals, gt.boxes, gt.labels)):
        image_mine = functools.partial(mine, i) if mine is not None else None
        row = _sample_image(props, boxes, labels, config, gen, sample_all, image_mine)
        levels = map_levels(row.candidates, strides, config.roi_pool)
        cand_levels += torch.bincount(levels, minlength=len(strides))
        rows.append(row)
    boxes = torch.cat([r.boxes for r in rows])
    img = [torch.full((r.boxes.shape[0],), i, dtype=torch.long) for i, r in enumerate(rows)]
    return SampledRois(
        boxes=boxes,
        img=torch.cat(img),
        level=map_levels(boxes, strides, config.roi_pool),
        fg_class=torch.cat([r.fg_class for r in rows]),
        gt_index=torch.cat([r.gt_index for r in rows]),
        is_gt=torch.cat([r.is_gt for r in rows]),
        targets=torch.cat([r.targets for r in rows]),
        gt_boxes=torch.cat([r.gt_boxes for r in rows]),
        candidates_per_level=cand_levels.tolist(),
        img_pos=[r.pos for r in rows],
        img_neg=[r.neg for r in rows],
    )


def _level_samples(s: SampledRois, ce: Tensor, deltas: Tensor, heads, names, coder):
    """Each level's samples: Tensor[R] losses and Tensor[R, reg_classes, 4] deltas → one
    :class:`LevelSamples` per level."""
    fg = s.fg_class >= 0
    pos_rows = fg.nonzero().flatten()
    pos_pred = deltas[pos_rows, heads.reg_slot(s.fg_class[pos_rows])]
    zero = torch.zeros(())
    out = []
    for lvl, name in enumerate(names):
        at = s.level == lvl
        at_pos = at[pos_rows]
        out.append(
            LevelSamples(
                name=name,
                candidates=s.candidates_per_level[lvl],
                ignored=0,
                cls_loss=ce[at],
                cls_pos=fg[at],
                box_pred=pos_pred[at_pos],
                box_target=s.targets[pos_rows][at_pos],
                cls_leak=zero,
                box_leak=zero,
                box_ref=s.boxes[pos_rows][at_pos],
                box_gt=s.gt_boxes[pos_rows][at_pos],
                box_coder=coder,
            )
        )
    return out


def pool_rois(
    features: list[Tensor], strides: list[int], boxes: Tensor, img: Tensor, level: Tensor,
    heads: HeadWeights, config: DetectorConfig,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """RoIAlign of ``boxes`` Tensor[R, 4] at their ``level`` → (Tensor[R, C, S, S], and for a
    double head the boxes scaled by ``roi_pool.reg_scale``, pooled at the same levels)."""
    side, cfg = heads.pool_side(config.res5.pool_size), config.roi_pool
    pooled = multiscale_roi_align(features, strides, boxes, img, level, side, cfg)
    if not heads.double_head:
        return pooled, None
    wide = scaled_about_centre(boxes, cfg.reg_scale)
    return pooled, multiscale_roi_align(features, strides, wide, img, level, side, cfg)


def roi_stage(
    heads: HeadWeights,
    features: list[Tensor],
    strides: list[int],
    names: list[str],
    s: SampledRois,
    config: DetectorConfig,
) -> RoiStage:
    """Pool the sampled RoIs from their levels, run the box head, collect each level's samples."""
    pooled, pooled_reg = pool_rois(features, strides, s.boxes, s.img, s.level, heads, config)
    scale = config.cascade.feature_grad_scale
    if config.cascade.later_stages and scale != 1.0:
        pooled = ScaleGrad.apply(pooled, scale)
    out = box_head(pooled, pooled_reg, heads, config)
    cls_logits, deltas = out.cls, out.deltas
    fg = s.fg_class >= 0
    bg = torch.full_like(s.fg_class, heads.bg_col)
    ce = ce_loss(cls_logits, torch.where(fg, heads.fg_logit(s.fg_class.clamp(min=0)), bg))
    samples = _level_samples(s, ce, deltas, heads, names, config.roi_coder)
    return RoiStage(
        **vars(s),
        pooled=pooled,
        pooled_reg=pooled_reg,
        hidden1=out.hidden1,
        hidden=out.hidden,
        hidden_reg=out.hidden_reg,
        cls_logits=cls_logits,
        deltas=deltas,
        ce=ce,
        samples=samples,
        counts=head_counts(samples, config.roi_sampler, len(s.img_pos), s.img_pos, s.img_neg),
    )
