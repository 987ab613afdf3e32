"""Detector config: how the detector was built and trained, apart from its losses.

Presets reproduce each framework's Faster R-CNN R50-FPN defaults, as read from their source
(see the project's reference notes). All values are plain data; a TOML file with the same
sections overrides a preset field by field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..vocab import CascadeScores, Mapper, MaskTarget, Ranking
from .checks import as_member, check_count, check_fraction, check_range, check_unit
from .dataclass_toml import from_table, load_named
from .errors import InputError

# log(1000 / 16): the cap on dw/dh at decode time in all three frameworks.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


@dataclass(frozen=True)
class AnchorConfig:
    """Anchor generation. ``sizes[l]`` are the anchor sizes (sqrt of area) of level ``l``."""

    sizes: tuple[tuple[float, ...], ...] = ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,))
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # h / w
    round: bool = False  # torchvision rounds cell anchors to integers
    offset: float = 0.0  # centre offset in strides
    size_major: bool = False  # detectron2 orders cell anchors size-major, the others ratio-major
    # torchvision computes strides as padded_size // feature_size, per axis (P6 of an 800-px input
    # gets stride 61, not 64); the others use the nominal stride.
    stride_from_size: bool = False
    # mmdet marks anchors outside each image's own pad_shape (sides rounded up to this) invalid;
    # 0 = all valid
    valid_pad_divisor: int = 0
    # mmdet's train_cfg.rpn.allowed_border: at >= 0 an anchor reaching further than this past its
    # image (img_shape, not the padding) is left out of the RPN's assignment and losses; < 0 = off
    allowed_border: float = -1.0

    def __post_init__(self):
        if not self.sizes or not all(self.sizes):
            raise InputError("anchors.sizes needs at least one size for every level")
        for level in self.sizes:
            for size in level:
                check_range(size, "anchors.sizes", 0.0, open_low=True)
        if not self.ratios:
            raise InputError("anchors.ratios needs at least one ratio")
        for ratio in self.ratios:
            check_range(ratio, "anchors.ratios", 0.0, open_low=True)
        if len({len(level) for level in self.sizes}) != 1:
            raise InputError("anchors.sizes must give every level the same number of sizes")
        check_range(self.offset, "anchors.offset", 0.0, 1.0)
        check_range(self.valid_pad_divisor, "anchors.valid_pad_divisor", 0)
        check_range(self.allowed_border, "anchors.allowed_border", -math.inf)


@dataclass(frozen=True)
class MatcherConfig:
    """Max-IoU assignment: IoU < bg_iou negative, >= fg_iou positive, in between ignored; then the
    low-quality pass, and what a NaN IoU does. The frameworks differ only in the named fields:

    - ``low_quality_min_iou``: a GT takes part in the low-quality pass if its best IoU reaches
      this (MMDetection's ``min_pos_iou``, 0.3 for the RPN). At 0 (torchvision, Detectron2) even a
      GT that overlaps nothing takes part: its best IoU of 0 ties with every candidate.
    - ``low_quality_reassign``: a candidate that ties with a GT's best IoU is assigned to that GT,
      later GTs winning (MMDetection); otherwise it only becomes positive for its own best GT.
    - ``nan_positive``: a NaN IoU leaves the candidate positive (torchvision, Detectron2: it fails
      both threshold tests); otherwise it stays ignored (MMDetection).
    """

    fg_iou: float = 0.7
    bg_iou: float = 0.3
    low_quality: bool = True
    low_quality_min_iou: float = 0.0
    low_quality_reassign: bool = False
    nan_positive: bool = True
    # MMDetection clamps the union to >= 1e-6; torchvision and Detectron2 do not clamp (0 here).
    union_eps: float = 0.0

    def __post_init__(self):
        check_unit(self.fg_iou, "matcher fg_iou")
        check_unit(self.bg_iou, "matcher bg_iou")
        if self.bg_iou > self.fg_iou:
            raise InputError(
                f"matcher thresholds need bg_iou <= fg_iou, found {self.bg_iou}, {self.fg_iou}"
            )
        check_unit(self.low_quality_min_iou, "matcher low_quality_min_iou")
        check_range(self.union_eps, "matcher union_eps", 0.0)

    @property
    def every_candidate_positive_for_empty_overlap(self) -> bool:
        """Whether a GT that overlaps no candidate makes every candidate positive."""
        return self.low_quality and self.low_quality_min_iou == 0.0


@dataclass(frozen=True)
class SamplerConfig:
    """Per-image random sampling: at most ``int(batch_size * pos_fraction)`` positives."""

    batch_size: int = 256
    pos_fraction: float = 0.5
    add_gt: bool = False  # add GT boxes to the candidates (RoI stage)
    # every candidate is a sample, none drawn (MMDetection's PseudoSampler)
    take_all: bool = False
    # MMDetection's avg_factor counts max(#neg, 1) per image too (RandomSampler); PseudoSampler's
    # counts positives only. What the mmdet_sampler normalizer counts.
    avg_factor_with_neg: bool = True
    # added GT boxes are assigned to themselves whatever their IoU (MMDetection); otherwise they
    # are matched like any other candidate
    gt_self_assigned: bool = False
    # online hard example mining (MMDetection's OHEMSampler): where there are more positives (or
    # negatives) than the sampler takes, those of highest classification loss, by a forward of
    # the box head without gradient, instead of a random draw (RoI stage)
    hard_mining: bool = False
    # negatives at most this many times max(1, positives) (MMDetection's neg_pos_ub; < 0: no bound)
    neg_pos_ub: float = -1.0
    # Libra R-CNN's CombinedSampler (RoI stage): positives drawn evenly over the GT boxes they
    # match (InstanceBalancedPosSampler), negatives evenly over this many IoU bins
    # (IoUBalancedNegSampler with floor_thr -1; 0: a plain random draw)
    instance_balanced_pos: bool = False
    iou_balanced_bins: int = 0

    def __post_init__(self):
        check_count(self.batch_size, "sampler batch_size")
        check_fraction(self.pos_fraction, "sampler pos_fraction")
        check_range(self.neg_pos_ub, "sampler neg_pos_ub", -1.0)
        check_range(self.iou_balanced_bins, "sampler iou_balanced_bins", 0)


@dataclass(frozen=True)
class CoderConfig:
    """Box coder: deltas are (dx, dy, dw, dh) multiplied by ``weights``."""

    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    clip: float = BBOX_XFORM_CLIP
    clip_both: bool = False  # mmdet clamps dw/dh to [-clip, clip]; the others only from above
    # decoded boxes (proposals, a cascade's refined RoIs, detections) clamped to the image;
    # mmdet's clip_border=False keeps them as decoded
    clip_border: bool = True

    def __post_init__(self):
        for w in self.weights:
            check_range(w, "coder weights", 0.0, open_low=True)
        check_range(self.clip, "coder clip", 0.0, open_low=True)


@dataclass(frozen=True)
class ProposalConfig:
    """RPN proposal generation: per-level top-k, decode, clip, size filter, per-level NMS, top-k."""

    pre_nms_top_n: int = 2000  # per level and image
    post_nms_top_n: int = 2000  # per image
    nms_iou: float = 0.7
    min_size: float = 1e-3
    min_size_inclusive: bool = True  # torchvision keeps w >= 1e-3; mmdet/Detectron2 keep w > 0
    min_score: float = (
        0.0  # probability a candidate needs to enter NMS (torchvision's score_thresh)
    )

    def __post_init__(self):
        check_count(self.pre_nms_top_n, "proposals pre_nms_top_n")
        check_count(self.post_nms_top_n, "proposals post_nms_top_n")
        check_unit(self.nms_iou, "proposals nms_iou")
        check_range(self.min_size, "proposals min_size", 0.0)
        check_range(self.min_score, "proposals min_score", 0.0, 1.0)


@dataclass(frozen=True)
class RoIPoolConfig:
    """Multi-scale RoIAlign and its level mapping."""

    num_levels: int = 4  # the finest levels used (P2-P5)
    sampling_ratio: int = 2  # 0 = adaptive ceil(roi_size / output_size)
    aligned: bool = False
    mapper: Mapper = Mapper.TORCHVISION
    canonical_scale: float = 224.0
    canonical_level: int = 4
    finest_scale: float = 56.0  # mmdet's mapper
    # a double head's regression branch pools each RoI scaled by this about its centre, at the
    # RoI's own level (MMDetection's reg_roi_scale_factor)
    reg_scale: float = 1.3

    def __post_init__(self):
        object.__setattr__(self, "mapper", as_member(Mapper, self.mapper, "roi_pool.mapper"))
        check_count(self.num_levels, "roi_pool.num_levels")
        check_range(self.sampling_ratio, "roi_pool.sampling_ratio", 0)
        check_range(self.canonical_scale, "roi_pool.canonical_scale", 0.0, open_low=True)
        check_range(self.finest_scale, "roi_pool.finest_scale", 0.0, open_low=True)
        check_range(self.reg_scale, "roi_pool.reg_scale", 0.0, open_low=True)


@dataclass(frozen=True)
class TestConfig:
    """Test-mode detection: what the checkpoint would output."""

    score_thr: float = 0.05
    nms_iou: float = 0.5
    detections_per_img: int = 100
    min_box_size: float = 1e-2

    def __post_init__(self):
        check_unit(self.score_thr, "score threshold")
        check_unit(self.nms_iou, "test nms_iou")
        check_count(self.detections_per_img, "test detections_per_img")
        check_range(self.min_box_size, "test min_box_size", 0.0)


@dataclass(frozen=True)
class MaskConfig:
    """The mask head (Mask R-CNN), when the checkpoint has one: RoIAlign of the positive RoIs to
    ``pool_size`` (with the box head's sampling, alignment and level mapping), a mask of
    ``mask_size`` per RoI, and each framework's rule for the mask target."""

    pool_size: int = 14
    mask_size: int = 28
    target: MaskTarget = MaskTarget.TORCHVISION

    def __post_init__(self):
        object.__setattr__(self, "target", as_member(MaskTarget, self.target, "mask.target"))
        check_count(self.pool_size, "mask.pool_size")
        check_count(self.mask_size, "mask.mask_size")


@dataclass(frozen=True)
class HeadNormConfig:
    """The normalization after each conv of the box and mask heads, where the checkpoint has one.
    Which kind a layer is comes from the checkpoint (a BatchNorm keeps running statistics, a
    GroupNorm does not); what the checkpoint does not hold is set here.

    - ``groups``: a GroupNorm's groups (MMDetection's GN configs and Detectron2's ``GN``: 32).
    - ``batch_stats``: a BatchNorm normalizes by the statistics of the batch's RoIs, as it does
      in training (torchvision's v2 models); false: by its running statistics (frozen).
    - ``weight_std``: the convs standardize their weights first (MMDetection's ``ConvWS``).
    """

    groups: int = 32
    eps: float = 1e-5
    batch_stats: bool = True
    weight_std: bool = False
    weight_std_eps: float = 1e-5

    def __post_init__(self):
        check_count(self.groups, "head_norm.groups")
        check_range(self.eps, "head_norm.eps", 0.0, open_low=True)
        check_range(self.weight_std_eps, "head_norm.weight_std_eps", 0.0, open_low=True)


@dataclass(frozen=True)
class Res5Config:
    """A C4 model's box head, ResNet's res5 stage on the RoIs of one feature map (Detectron2's
    Res5ROIHeads, MMDetection's ResLayer shared head): the RoIAlign side ``pool_size`` (the
    first block halves it), where the first block strides: in its 1x1 conv (Detectron2's
    STRIDE_IN_1X1, MMDetection's caffe style) or its 3x3 conv (pytorch style), and whether its
    BatchNorms are frozen (Detectron2's FrozenBatchNorm2d, MMDetection's norm_eval): they then
    normalize by their running statistics in training too."""

    pool_size: int = 14
    stride_in_1x1: bool = True
    frozen_norm: bool = True

    def __post_init__(self):
        check_count(self.pool_size, "res5.pool_size")


@dataclass(frozen=True)
class CascadeConfig:
    """Cascade R-CNN's stages after the first (the first is ``roi_matcher``, ``roi_sampler``
    and ``roi_coder``): per stage its IoU threshold, box coder weights and loss weight.

    - ``resample``: every stage assigns and samples its candidates again, GT added (MMDetection);
      otherwise a later stage takes every refined box as it is, matched but not sampled, and no GT
      is added (Detectron2).
    - ``drop_gt``: the RoIs that were added GT boxes are not refined into the next stage's
      candidates (MMDetection); Detectron2 refines every RoI.
    - ``feature_grad_scale``: each stage's gradient into the pooled features is scaled by this
      (Detectron2: 1 / stages, which averages the stages' feature gradients).
    - ``stage0_loss_weight``: the first stage's loss weight (MMDetection 1).
    - ``scores``: in test mode (the symptom), how the stages' class scores are joined; the boxes
      are the last stage's regression of the boxes each stage refined for the next.
    """

    ious: tuple[float, ...] = ()
    coder_weights: tuple[tuple[float, float, float, float], ...] = ()
    loss_weights: tuple[float, ...] = ()
    stage0_loss_weight: float = 1.0
    resample: bool = True
    drop_gt: bool = True
    feature_grad_scale: float = 1.0
    scores: CascadeScores = CascadeScores.MEAN_LOGITS

    def __post_init__(self):
        object.__setattr__(self, "scores", as_member(CascadeScores, self.scores, "cascade.scores"))
        if not len(self.ious) == len(self.coder_weights) == len(self.loss_weights):
            raise InputError(
                "cascade ious, coder_weights and loss_weights need one entry per later stage"
            )
        for iou in self.ious:
            check_unit(iou, "cascade ious")
        for w in (*self.loss_weights, self.stage0_loss_weight, self.feature_grad_scale):
            check_range(w, "cascade weights", 0.0)
        for weights in self.coder_weights:
            CoderConfig(weights=tuple(weights))

    @property
    def later_stages(self) -> int:
        return len(self.ious)


@dataclass(frozen=True)
class DetectorConfig:
    """Everything about the detector that is not the loss normalization. Start from a preset
    (:func:`preset`) and change fields with :func:`replace`."""

    name: str = "torchvision"
    ranking: Ranking = Ranking.TORCHVISION  # whose sorts break score ties (see replay/nms.py)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn_matcher: MatcherConfig = field(default_factory=MatcherConfig)
    rpn_sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rpn_coder: CoderConfig = field(default_factory=CoderConfig)
    train_proposals: ProposalConfig = field(default_factory=ProposalConfig)
    test_proposals: ProposalConfig = field(default_factory=ProposalConfig)
    roi_matcher: MatcherConfig = field(default_factory=MatcherConfig)
    roi_sampler: SamplerConfig = field(default_factory=SamplerConfig)
    roi_coder: CoderConfig = field(default_factory=CoderConfig)
    roi_pool: RoIPoolConfig = field(default_factory=RoIPoolConfig)
    test: TestConfig = field(default_factory=TestConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    head_norm: HeadNormConfig = field(default_factory=HeadNormConfig)
    res5: Res5Config = field(default_factory=Res5Config)

    def __post_init__(self):
        object.__setattr__(self, "ranking", as_member(Ranking, self.ranking, "ranking"))


# Box coder weights of the RoI head in all three frameworks (stds 0.1, 0.1, 0.2, 0.2).
ROI_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def torchvision_preset() -> DetectorConfig:
    """torchvision ``fasterrcnn_resnet50_fpn`` defaults."""
    return DetectorConfig(
        name="torchvision",
        ranking=Ranking.TORCHVISION,
        anchors=AnchorConfig(round=True, stride_from_size=True),
        rpn_matcher=MatcherConfig(fg_iou=0.7, bg_iou=0.3, low_quality=True),
        rpn_sampler=SamplerConfig(batch_size=256, pos_fraction=0.5),
        train_proposals=ProposalConfig(pre_nms_top_n=2000, post_nms_top_n=2000, nms_iou=0.7),
        test_proposals=ProposalConfig(pre_nms_top_n=1000, post_nms_top_n=1000, nms_iou=0.7),
        roi_matcher=MatcherConfig(fg_iou=0.5, bg_iou=0.5, low_quality=False),
        roi_sampler=SamplerConfig(batch_size=512, pos_fraction=0.25, add_gt=True),
        roi_coder=CoderConfig(weights=ROI_CODER_WEIGHTS),
        roi_pool=RoIPoolConfig(sampling_ratio=2, aligned=False, mapper=Mapper.TORCHVISION),
        test=TestConfig(score_thr=0.05, nms_iou=0.5, detections_per_img=100, min_box_size=1e-2),
    )


def mmdet_preset() -> DetectorConfig:
    """MMDetection 3.x ``faster-rcnn_r50_fpn_1x`` defaults."""
    mmdet = dict(low_quality_reassign=True, nan_positive=False, union_eps=1e-6)
    proposals = dict(nms_iou=0.7, min_size=0.0, min_size_inclusive=False)
    return DetectorConfig(
        name="mmdet",
        ranking=Ranking.MMDET,
        anchors=AnchorConfig(valid_pad_divisor=32),
        rpn_matcher=MatcherConfig(fg_iou=0.7, bg_iou=0.3, low_quality_min_iou=0.3, **mmdet),
        rpn_sampler=SamplerConfig(batch_size=256, pos_fraction=0.5),
        rpn_coder=CoderConfig(clip_both=True),
        train_proposals=ProposalConfig(pre_nms_top_n=2000, post_nms_top_n=1000, **proposals),
        test_proposals=ProposalConfig(pre_nms_top_n=1000, post_nms_top_n=1000, **proposals),
        roi_matcher=MatcherConfig(
            fg_iou=0.5, bg_iou=0.5, low_quality=False, low_quality_min_iou=0.5, **mmdet
        ),
        roi_sampler=SamplerConfig(
            batch_size=512, pos_fraction=0.25, add_gt=True, gt_self_assigned=True
        ),
        roi_coder=CoderConfig(weights=ROI_CODER_WEIGHTS, clip_both=True),
        roi_pool=RoIPoolConfig(sampling_ratio=0, aligned=True, mapper=Mapper.MMDET),
        test=TestConfig(score_thr=0.05, nms_iou=0.5, detections_per_img=100, min_box_size=0.0),
        mask=MaskConfig(target=MaskTarget.MMDET),
    )


def detectron2_preset() -> DetectorConfig:
    """Detectron2 ``faster_rcnn_R_50_FPN`` (Base-RCNN-FPN) defaults."""
    proposals = dict(nms_iou=0.7, min_size=0.0, min_size_inclusive=False)
    return DetectorConfig(
        name="detectron2",
        ranking=Ranking.DETECTRON2,
        anchors=AnchorConfig(size_major=True),
        rpn_matcher=MatcherConfig(fg_iou=0.7, bg_iou=0.3, low_quality=True),
        rpn_sampler=SamplerConfig(batch_size=256, pos_fraction=0.5),
        train_proposals=ProposalConfig(pre_nms_top_n=2000, post_nms_top_n=1000, **proposals),
        test_proposals=ProposalConfig(pre_nms_top_n=1000, post_nms_top_n=1000, **proposals),
        roi_matcher=MatcherConfig(fg_iou=0.5, bg_iou=0.5, low_quality=False),
        roi_sampler=SamplerConfig(batch_size=512, pos_fraction=0.25, add_gt=True),
        roi_coder=CoderConfig(weights=ROI_CODER_WEIGHTS),
        roi_pool=RoIPoolConfig(sampling_ratio=0, aligned=True, mapper=Mapper.DETECTRON2),
        test=TestConfig(score_thr=0.05, nms_iou=0.5, detections_per_img=100, min_box_size=0.0),
        mask=MaskConfig(target=MaskTarget.DETECTRON2),
    )


def _named(base, name: str):
    """A preset of the same detector under another name (its Mask R-CNN: the same config,
    whose mask section takes effect when the checkpoint has a mask head)."""
    return lambda: dataclasses.replace(base(), name=name)


def mmdet_mask_preset() -> DetectorConfig:
    """MMDetection 3.x ``mask-rcnn_r50_fpn_1x``: Faster R-CNN's, but the RoI assigner's
    low-quality pass is on (``match_low_quality=True``, ``min_pos_iou=0.5``)."""
    base = mmdet_preset()
    matcher = dataclasses.replace(base.roi_matcher, low_quality=True)
    return dataclasses.replace(base, name="mmdet-mask", roi_matcher=matcher)


# MMDetection's DeltaXYWHBBoxCoder divides by its stds; these are their inverses.
MMDET_CASCADE_STDS = ((0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


def mmdet_cascade_preset() -> DetectorConfig:
    """MMDetection 3.x ``cascade-rcnn_r50_fpn_1x``: 3 stages at IoU 0.5/0.6/0.7, stage loss
    weights 1/0.5/0.25, each stage resampled with the GT added; 2000 training proposals; RPN
    anchors crossing the image border left out (``allowed_border=0``)."""
    base = mmdet_preset()
    return dataclasses.replace(
        base,
        name="mmdet-cascade",
        anchors=dataclasses.replace(base.anchors, allowed_border=0.0),
        train_proposals=dataclasses.replace(base.train_proposals, post_nms_top_n=2000),
        cascade=CascadeConfig(
            ious=(0.6, 0.7),
            coder_weights=tuple(tuple(1.0 / x for x in stds) for stds in MMDET_CASCADE_STDS),
            loss_weights=(0.5, 0.25),
        ),
    )


def detectron2_cascade_preset() -> DetectorConfig:
    """Detectron2 ``cascade_mask_rcnn_R_50_FPN`` (CascadeROIHeads): 3 stages at IoU 0.5/0.6/0.7,
    box weights (10,10,5,5)/(20,20,10,10)/(30,30,15,15); later stages refine every RoI and take
    all of them, unsampled; each stage's feature gradient scaled by 1/3; 2000 proposals."""
    base = detectron2_preset()
    return dataclasses.replace(
        base,
        name="detectron2-cascade",
        train_proposals=dataclasses.replace(base.train_proposals, post_nms_top_n=2000),
        cascade=CascadeConfig(
            ious=(0.6, 0.7),
            coder_weights=((20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)),
            loss_weights=(1.0, 1.0),
            resample=False,
            drop_gt=False,
            feature_grad_scale=1.0 / 3,
            scores=CascadeScores.MEAN_PROBABILITIES,
        ),
    )


PRESETS = {
    "torchvision": torchvision_preset,
    "mmdet": mmdet_preset,
    "detectron2": detectron2_preset,
    "torchvision-mask": _named(torchvision_preset, "torchvision-mask"),
    "mmdet-mask": mmdet_mask_preset,
    "detectron2-mask": _named(detectron2_preset, "detectron2-mask"),
    "mmdet-cascade": mmdet_cascade_preset,
    "detectron2-cascade": detectron2_cascade_preset,
}


def preset(name: str) -> DetectorConfig:
    """One of the built-in presets by name."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise InputError(
            f"unknown detector preset {name!r}; use one of {', '.join(PRESETS)} or a .toml file"
        ) from None


def load_config(spec: str | Path) -> DetectorConfig:
    """A preset name, or a TOML file whose optional ``base`` key names the preset it overrides."""
    return load_named(DetectorConfig, spec, PRESETS, "torchvision", "detector preset")


def config_from_meta(value, where: str = "meta.config") -> DetectorConfig:
    """The detector config a dump records: a preset name, or a table in the TOML schema (its
    ``base`` defaults to ``torchvision``)."""
    if isinstance(value, DetectorConfig):
        return value
    if isinstance(value, str):
        return preset(value)
    if isinstance(value, dict):
        return from_table(
            DetectorConfig, value, PRESETS, "torchvision", where, value.get("name", "run")
        )
    raise InputError(
        f"{where}: expected a preset name or a config table, found {type(value).__name__}"
    )


def replace(cfg, **changes):
    """``dataclasses.replace`` under a short name."""
    return dataclasses.replace(cfg, **changes)
