"""The mask head (Mask R-CNN): the box stage's positive RoIs pooled at 14 x 14, 3x3 convs, a 2x2
deconvolution and per-class mask logits at 28 x 28, scored against each RoI's mask target, cut out
of its GT mask the way its framework does."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inputs.checkpoint import HeadWeights
from ..inputs.config import DetectorConfig, HeadNormConfig, MaskConfig
from ..vocab import BIAS, WEIGHT, Layer, MaskTarget, param
from .gt import UsableGt
from .heads import conv_block
from .losses import bce_loss
from .precision import autocast
from .roi import RoiStage
from .roi_align import multiscale_roi_align, roi_align_level
from .samples import HeadCounts, LevelSamples

# the deconvolution doubles the RoI size (the convs keep it)
MASK_UPSAMPLE = 2
# MMDetection and Detectron2 binarize a resized mask at this value
MASK_BINARIZE = 0.5


@dataclass(kw_only=True)
class MaskStage:
    """The positive RoIs of the box stage and the mask head on them. rows: Tensor[P] their rows
    in the box stage; pooled Tensor[P, C, S, S]; logits Tensor[P, T, T] (each RoI's class
    channel); targets Tensor[P, T, T]; bce Tensor[P, T, T] per pixel."""

    rows: Tensor
    pooled: Tensor
    hidden: list[Tensor]  # after each conv + ReLU, then after the deconv + ReLU
    all_logits: Tensor  # Tensor[P, Q, T, T]
    logits: Tensor
    targets: Tensor
    bce: Tensor
    samples: list[LevelSamples]
    counts: HeadCounts


def mask_head(pooled: Tensor, w: HeadWeights, cfg: HeadNormConfig) -> tuple[list[Tensor], Tensor]:
    """Tensor[P, C, S, S] → (the activations after each conv block and the deconv, logits
    Tensor[P, Q, 2S, 2S]), computed in the heads' precision and returned in fp32."""
    x, hidden = pooled, []
    with autocast(w.precision):
        for conv in w.mask_convs:
            x = conv_block(x, w, conv, cfg).float()  # fp32 copies in the graph, as in rpn_head
            hidden.append(x)
        deconv = (w.weight(Layer.MASK_DECONV), w.bias(Layer.MASK_DECONV))
        x = F.relu(F.conv_transpose2d(x, *deconv, stride=MASK_UPSAMPLE)).float()
        hidden.append(x)
        logits = F.conv2d(x, w.weight(Layer.MASK_LOGITS), w.bias(Layer.MASK_LOGITS))
    return hidden, logits.float()


def mask_targets(masks: Tensor, boxes: Tensor, which: Tensor, cfg: MaskConfig) -> Tensor:
    """Each RoI's mask target: GT mask ``which[i]`` of ``masks`` (Tensor[G, H, W] bool) cut out
    by ``boxes[i]`` (Tensor[P, 4], input pixels) and resized to T x T → Tensor[P, T, T].

    torchvision: RoIAlign, not aligned, adaptive sampling, fractional values. MMDetection: the box
    clipped to the mask, aligned RoIAlign, then >= 0.5. Detectron2: aligned RoIAlign, >= 0.5.
    """
    m = cfg.mask_size
    if boxes.shape[0] == 0:
        return boxes.new_zeros(0, m, m)
    h, w = masks.shape[1:]
    grid = math.ceil(max(h, w) / m) + 1  # a RoI is at most the image: no cap below that
    feat = masks[:, None]  # bool: RoIAlign converts only what it gathers
    if cfg.target is MaskTarget.TORCHVISION:
        return roi_align_level(feat, boxes, which, 1.0, m, 0, False, grid)[:, 0]
    if cfg.target is MaskTarget.MMDET:
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                             boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1)  # fmt: skip
    cut = roi_align_level(feat, boxes, which, 1.0, m, 0, True, grid)[:, 0]
    return (cut >= MASK_BINARIZE).float()


def _targets(roi: RoiStage, rows: Tensor, batch_masks, gt: UsableGt, cfg: MaskConfig) -> Tensor:
    """The mask targets of the positive RoIs ``rows``, image by image."""
    out = torch.zeros(rows.numel(), cfg.mask_size, cfg.mask_size)
    for i, masks in enumerate(batch_masks):
        at = (roi.img[rows] == i).nonzero().flatten()
        if at.numel():
            usable = masks[gt.sources[i]]  # the usable GT's masks, in their order
            r = rows[at]
            out[at] = mask_targets(usable, roi.boxes[r].detach(), roi.gt_index[r], cfg)
    return out


def _level_samples(bce: Tensor, level: Tensor, names: list[str]) -> list[LevelSamples]:
    """Per level, each positive RoI's summed pixel BCE as one sample of the mask term."""
    per_roi = bce.flatten(1).sum(1)
    empty, zero = per_roi.new_zeros(0, 4), torch.zeros(())
    return [
        LevelSamples(
            name=name,
            candidates=int((level == lvl).sum()),
            ignored=0,
            cls_loss=per_roi[level == lvl],
            cls_pos=torch.ones(int((level == lvl).sum()), dtype=torch.bool),
            box_pred=empty,
            box_target=empty,
            cls_leak=zero,
            box_leak=zero,
        )  # fmt: skip
        for lvl, name in enumerate(names)
    ]


def mask_stage(
    heads: HeadWeights,
    features: list[Tensor],
    strides: list[int],
    names: list[str],
    roi: RoiStage,
    batch_masks: list[Tensor],
    gt: UsableGt,
    config: DetectorConfig,
) -> MaskStage:
    """The mask head on the box stage's positive RoIs, pooled from the levels the box head used,
    and their per-pixel BCE against the mask targets."""
    cfg = config.mask
    rows = (roi.fg_class >= 0).nonzero().flatten()
    boxes, img, level = roi.boxes[rows], roi.img[rows], roi.level[rows]
    pooled = multiscale_roi_align(
        features, strides, boxes, img, level, cfg.pool_size, config.roi_pool
    )
    hidden, all_logits = mask_head(pooled, heads, config.head_norm)
    slot = heads.mask_slot(roi.fg_class[rows])
    logits = all_logits[torch.arange(rows.numel()), slot]
    targets = _targets(roi, rows, batch_masks, gt, cfg)
    bce = bce_loss(logits, targets)
    samples = _level_samples(bce, level, names)
    counts = HeadCounts(
        sampled=[s.sampled for s in samples], pos=[s.pos for s in samples], budget=0,
        img_pos=[int((img == i).sum()) for i in range(len(batch_masks))],
        img_neg=[0] * len(batch_masks), pixels=cfg.mask_size**2,
    )  # fmt: skip
    return MaskStage(rows=rows, pooled=pooled, hidden=hidden, all_logits=all_logits,
                     logits=logits, targets=targets, bce=bce, samples=samples,
                     counts=counts)  # fmt: skip


# the mask head's parameters, by canonical name (for the gradient norms)
def mask_params(heads: HeadWeights) -> list[str]:
    convs = [y for x in heads.mask_convs for y in (x, heads.norm_of(x)) if y is not None]
    names = (param(x, k) for x in (*convs, Layer.MASK_DECONV, Layer.MASK_LOGITS)
             for k in (WEIGHT, BIAS))  # fmt: skip
    return [n for n in names if n in heads.params]
