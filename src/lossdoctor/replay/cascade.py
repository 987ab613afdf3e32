"""Cascade R-CNN: each later stage's candidates are the previous stage's RoIs moved by its box
regression (detached), assigned at the stage's IoU, sampled again (MMDetection) or taken as they
are (Detectron2), and scored by the stage's own box head."""

from __future__ import annotations

from torch import Tensor

from ..inputs.checkpoint import HeadWeights
from ..inputs.config import DetectorConfig, replace
from ..inputs.errors import InputError
from .boxes import decode_in_image
from .gt import UsableGt
from .roi import RoiStage, roi_stage, sample_rois


def stage_config(config: DetectorConfig, k: int) -> DetectorConfig:
    """The detector config as cascade stage ``k`` (1, 2, ...) sees it: its IoU threshold and box
    coder; sampled like the first stage, or every candidate taken with no GT added."""
    c = config.cascade
    iou = c.ious[k - 1]
    matcher = replace(config.roi_matcher, fg_iou=iou, bg_iou=iou)
    sampler = (
        config.roi_sampler
        if c.resample
        else replace(config.roi_sampler, take_all=True, add_gt=False)
    )
    coder = replace(config.roi_coder, weights=tuple(c.coder_weights[k - 1]))
    return replace(config, roi_matcher=matcher, roi_sampler=sampler, roi_coder=coder)


def refined(stage: RoiStage, sizes: list[tuple[int, int]], config: DetectorConfig) -> list[Tensor]:
    """Per image, the next stage's candidates: this stage's RoIs decoded with its class-agnostic
    regression (detached), clipped to the image where the coder clips; without the added GT
    (MMDetection) or without empty boxes (Detectron2)."""
    deltas, boxes = stage.deltas.detach()[:, 0], stage.boxes.detach()
    out = []
    for i, size in enumerate(sizes):
        rows = stage.img == i
        b = decode_in_image(deltas[rows], boxes[rows], config.roi_coder, size)
        if config.cascade.drop_gt:
            b = b[~stage.is_gt[rows]]
        else:
            b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
        out.append(b)
    return out


def check_stages(heads: HeadWeights, config: DetectorConfig) -> None:
    later = heads.num_stages - 1
    if later != config.cascade.later_stages:
        raise InputError(
            f"the checkpoint has {heads.num_stages} box-head stages but config '{config.name}' "
            f"describes {config.cascade.later_stages + 1}; pass --config mmdet-cascade or "
            "detectron2-cascade (or set [cascade] in a config TOML)"
        )
    if later and heads.stage(0).reg_classes != 1:
        raise InputError("cascade stages need class-agnostic box regression (4 outputs)")


def later_stages(heads, features, strides, names, first: RoiStage, batch, gt: UsableGt,
                 config: DetectorConfig, gen, sample_all) -> list[RoiStage]:  # fmt: skip
    """Stages 1, 2, ... of a cascade, each from the one before."""
    stages, prev, prev_cfg = [], first, config
    for k in range(1, heads.num_stages):
        cfg = stage_config(config, k)
        cands = refined(prev, batch.image_sizes, prev_cfg)
        sampled = sample_rois(cands, gt, strides, cfg, gen, sample_all)
        prev = roi_stage(heads.stage(k), features, strides, names, sampled, cfg)
        stages.append(prev)
        prev_cfg = cfg
    return stages
