"""The replay: one forward of both heads on a dumped batch, shared samples, per-profile losses.

Stages, each in its own module, in the order a training forward runs them: the usable GT
(``gt``); the RPN head on every level, anchors, one seeded assignment and sampling per image
(``rpn``); the RoI stage's candidates (``proposals``), their sampling, RoIAlign and the box head
(``roi``), a cascade's later stages (``cascade``) and the mask head (``mask``); then each
profile's normalization of the same per-sample losses (``normalize``). Shapes: the glossary in
``lossdoctor.replay``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..inputs.batch import Batch
from ..inputs.checkpoint import HeadWeights
from ..inputs.config import DetectorConfig
from ..inputs.profiles import LossProfile
from ..vocab import Head
from .cascade import check_stages, later_stages
from .gt import UsableGt, usable_gt
from .mask import MaskStage, mask_stage
from .normalize import ProfileLosses, profile_losses
from .proposals import training_proposals
from .roi import RoiStage, classification_loss, roi_stage, sample_rois
from .rpn import RpnStage, rpn_stage
from .samples import HeadCounts, LevelSamples


@dataclass(kw_only=True)
class ImageStats:
    """One image: its GT (usable, ignored, left out), matching and sampling counts, proposals."""

    image: int
    gt: int
    gt_ignored: int
    gt_bad_label: int
    gt_nonfinite: int
    gt_without_pos: int
    gt_best_iou_min: float
    gt_best_iou_mean: float
    rpn_pos_candidates: int
    rpn_pos: int
    rpn_neg: int
    proposals: int
    proposals_nonfinite: int
    roi_pos: int
    roi_neg: int


@dataclass(kw_only=True)
class Replay:
    """Everything the diagnosis and the report need, kept in memory (tensors keep their graph)."""

    heads: HeadWeights
    batch: Batch
    config: DetectorConfig
    seed: int
    sample_all: bool
    features: list[Tensor]
    gt: UsableGt
    rpn: RpnStage
    roi: RoiStage
    proposals: list[Tensor]  # per image, the RoI stage's candidates before sampling (Tensor[M, 4])
    stages: list[RoiStage] = field(default_factory=list)  # a cascade's later stages
    mask: MaskStage | None = None  # the mask head, where the checkpoint and the batch have one
    images: list[ImageStats] = field(default_factory=list)
    losses: dict[str, ProfileLosses] = field(default_factory=dict)

    @property
    def samples(self) -> dict[Head, list[LevelSamples]]:
        """Per head the samples of each level (the RoI head's first stage)."""
        out = {Head.RPN: self.rpn.samples, Head.ROI: self.roi.samples}
        return out | ({Head.MASK: self.mask.samples} if self.mask else {})

    @property
    def counts(self) -> dict[Head, HeadCounts]:
        out = {Head.RPN: self.rpn.counts, Head.ROI: self.roi.counts}
        return out | ({Head.MASK: self.mask.counts} if self.mask else {})

    @property
    def roi_stages(self) -> list[RoiStage]:
        """Every box-head stage: the first, then a cascade's later ones."""
        return [self.roi, *self.stages]

    @property
    def roi_level_names(self) -> list[str]:
        return self.batch.levels[: self.roi.num_levels]


def _stats(i: int, batch: Batch, gt: UsableGt, rpn: RpnStage, roi: RoiStage, props, bad):
    im, best = rpn.images[i], rpn.images[i].gt_best
    return ImageStats(
        image=i,
        gt=gt.boxes[i].shape[0],
        gt_ignored=int(batch.gt_ignore[i].sum()),
        gt_bad_label=sum(1 for d in gt.dropped_labels if d.image == i),
        gt_nonfinite=int((~torch.isfinite(batch.gt_boxes[i]).all(1)).sum()),
        gt_without_pos=int((~im.gt_has_pos).sum()),
        gt_best_iou_min=float(best.min()) if best.numel() else math.nan,
        gt_best_iou_mean=float(best.mean()) if best.numel() else math.nan,
        rpn_pos_candidates=im.pos_candidates,
        rpn_pos=im.pos,
        rpn_neg=im.neg,
        proposals=props[i].shape[0],
        proposals_nonfinite=bad[i],
        roi_pos=roi.img_pos[i],
        roi_neg=roi.img_neg[i],
    )


def live(t: Tensor) -> Tensor:
    """A leaf that requires grad (a training loop's parameters already do: used as they are)."""
    return t if t.requires_grad else t.detach().requires_grad_(True)


def _roi_heads(heads, features, batch, props, gt, config, gen, sample_all) -> dict:
    """The box head's stages on the proposals (one, or a cascade's), and the mask head."""
    k = min(config.roi_pool.num_levels, len(features))
    check_stages(heads, config)
    names, strides, feats = batch.levels[:k], batch.strides[:k], features[:k]
    mine = functools.partial(classification_loss, heads, feats, strides, config)
    roi = roi_stage(
        heads,
        feats,
        strides,
        names,
        sample_rois(props, gt, strides, config, gen, sample_all, mine),
        config,
    )
    stages = later_stages(heads, feats, strides, names, roi, batch, gt, config, gen, sample_all)
    mask = None
    if heads.has_mask and batch.gt_masks is not None:
        mask = mask_stage(heads, feats, strides, names, roi, batch.gt_masks, gt, config)
    return dict(roi=roi, stages=stages, mask=mask)


def replay(
    heads: HeadWeights,
    batch: Batch,
    config: DetectorConfig,
    profiles: list[LossProfile],
    *,
    seed: int = 0,
    sample_all: bool = False,
) -> Replay:
    """Replay the RPN and RoI losses of ``batch`` under each of ``profiles``.

    All profiles see the same samples (one seeded draw, or every candidate with ``sample_all``),
    so their differences are differences of normalization only.
    """
    gen = torch.Generator().manual_seed(seed)
    heads = dataclasses.replace(heads, params={k: live(v) for k, v in heads.params.items()})
    gt = usable_gt(batch, heads.num_classes)
    features = [live(f) for f in batch.features.values()]
    rpn = rpn_stage(heads, features, batch, config, gt, gen, sample_all)
    anchors = [lv.anchors for lv in rpn.levels]
    props, bad = training_proposals([lv.out for lv in rpn.levels], anchors, batch, config)
    roi = _roi_heads(heads, features, batch, props, gt, config, gen, sample_all)
    r = Replay(heads=heads, batch=batch, config=config, seed=seed, sample_all=sample_all,
               features=features, gt=gt, rpn=rpn, proposals=props, **roi)  # fmt: skip
    r.images = [_stats(i, batch, gt, rpn, r.roi, props, bad) for i in range(batch.num_images)]
    later = [(st.samples, st.counts, w) for st, w in zip(r.stages, config.cascade.loss_weights)]
    first = config.cascade.stage0_loss_weight if r.stages else 1.0
    r.losses = {p.name: profile_losses(r.samples, r.counts, p, later, first) for p in profiles}
    return r
