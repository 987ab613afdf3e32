"""One-stage dense detectors (RetinaNet, FCOS, ATSS): each framework's head setup, and the loss
profiles that normalize the dense head's three terms.

A dense profile divides each term's sum by a normalizer::

    loss[level] = weight * sum_i num[i, level] / D[i, level]

where ``num[i, level]`` is image ``i``'s summed per-sample loss at the level (focal loss over the
anchors that are not ignored, box loss over the positives (weighted by their centerness targets
for the MMDetection FCOS/ATSS box term), centerness BCE over the positives), and ``D`` is chosen by
the term's ``normalizer``:

=================  ===========================================================================
``level_pos``      positives of this level (the naive per-level mean; 0 on a level without any)
``pos``            positives of the batch, all levels and images
``pos_per_image``  ``N x max(1, #pos_i)``: torchvision's RetinaNet divides each image by its own
                   foreground count and averages the images
``mmdet_pseudo``   sum over images of ``max(#pos_i, 1)`` (MMDetection's PseudoSampler avg_factor)
``ema``            Detectron2: ``m x running + (1 - m) x max(#pos, 1)``, the running value being
                   the model's ``loss_normalizer`` before this step (100 on the first)
``ctr_sum``        the positives' centerness targets summed (MMDetection FCOS/ATSS box term)
=================  ===========================================================================

A ``reduced`` term's count is first averaged over the ranks of the step (MMDetection FCOS's
``reduce_mean``; a single dump is its own mean). Then ``D = max(D, floor) + eps`` (MMDetection adds
float32 epsilon to every avg_factor), and a ``D`` of 0 gives NaN, as 0/0 does in the naive code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..vocab import (
    DenseAssigner,
    DenseCoder,
    DenseKind,
    DenseNormalizer,
    Framework,
    Head,
    LossKind,
    Part,
)
from .checks import as_member, check_range
from .config import AnchorConfig, MatcherConfig
from .dataclass_toml import from_table, load_named
from .errors import InputError
from .profiles import EPS32

# the dump's meta table of a one-stage run: its config, profile and Detectron2's normalizer
DENSE_META = Head.DENSE
# Detectron2's RetinaNet: the running normalizer's start and momentum (dense_detector._ema_update)
EMA_INITIAL, EMA_MOMENTUM = 100.0, 0.9
# torchvision and Detectron2 clamp dw, dh at log(1000 / 16) before exp
DELTA_CLIP = math.log(1000.0 / 16)
# the focal loss's defaults in every framework
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
# the FPN levels a one-stage detector predicts on, finest first
DENSE_STRIDES = (8, 16, 32, 64, 128)
# mmdet FCOS: the box term's normalizer floor (max(reduce_mean(sum ctr targets), 1e-6))
CTR_FLOOR = 1e-6


@dataclass(frozen=True)
class DenseTerm:
    """One dense term's normalization (see the module docstring)."""

    normalizer: DenseNormalizer
    floor: float = 0.0
    eps: float = 0.0
    weight: float = 1.0
    reduced: bool = False  # the count is averaged over the ranks first (reduce_mean)

    def __post_init__(self):
        normalizer = as_member(DenseNormalizer, self.normalizer, "normalizer")
        object.__setattr__(self, "normalizer", normalizer)
        for name in ("floor", "eps", "weight"):
            check_range(getattr(self, name), name, 0.0)
        if not isinstance(self.reduced, bool):
            raise InputError(f"reduced must be true or false, found {self.reduced!r}")


@dataclass(frozen=True)
class DenseProfile:
    """How the dense head's classification, box and centerness terms are normalized."""

    name: str
    summary: str
    cls: DenseTerm
    box: DenseTerm
    ctr: DenseTerm

    @property
    def terms(self) -> dict[Part, DenseTerm]:
        """Each part's term: classification, box, centerness."""
        return {Part.CLS: self.cls, Part.BOX: self.box, Part.CTR: self.ctr}


def _same(name: str, summary: str, term: DenseTerm) -> DenseProfile:
    return DenseProfile(name=name, summary=summary, cls=term, box=term, ctr=term)


LEGACY = _same(
    "legacy",
    "each level divided by its own positives (NaN on a level without one)",
    DenseTerm(DenseNormalizer.LEVEL_POS),
)
FIXED = _same(
    "fixed",
    "every level divided by the positives of the step (averaged over ranks), at least 1",
    DenseTerm(DenseNormalizer.POS, floor=1.0, reduced=True),
)


@dataclass(frozen=True, kw_only=True)
class DenseTest:
    """Test-time post-processing of a dense head's outputs."""

    score_thr: float = 0.05
    topk: int = 1000  # per level, before NMS
    nms_iou: float = 0.5
    detections_per_img: int = 100


@dataclass(frozen=True, kw_only=True)
class DenseConfig:
    """A framework's dense head: its priors, assignment, losses, and its own normalization."""

    name: str
    framework: Framework
    kind: DenseKind
    anchors: AnchorConfig  # FCOS: one square of side = stride per location (its point: the centre)
    strides: tuple[int, ...] = DENSE_STRIDES  # of the levels the priors are for; () = any
    assigner: DenseAssigner
    matcher: MatcherConfig = field(default_factory=lambda: MatcherConfig(fg_iou=0.5, bg_iou=0.4))
    coder: DenseCoder = DenseCoder.DELTAS
    delta_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    delta_clip_both: bool = False  # mmdet clamps dw/dh from below too
    box_loss: LossKind = LossKind.L1
    beta: float = 0.0  # smooth-L1's transition point
    alpha: float = FOCAL_ALPHA
    gamma: float = FOCAL_GAMMA
    center_radius: float = 1.5  # FCOS centre sampling radius, in anchor sizes (strides)
    # MMDetection FCOS: each level's range of the largest GT distance it regresses, whether
    # positives must lie within center_radius strides of the GT centre, box outputs exp() (else
    # clamped at 0) and in strides (norm_on_bbox) or pixels, the box term weighted by centerness
    regress_ranges: tuple[tuple[float, float], ...] = ()
    center_sampling: bool = True
    exp_distances: bool = False
    distances_in_strides: bool = True
    box_weight_ctr: bool = False
    atss_topk: int = 9  # ATSS: candidates per level and GT
    ctr_on_box: bool = True  # the centerness branch sits on the box tower (else the cls tower)
    ema_momentum: float = EMA_MOMENTUM
    test: DenseTest = field(default_factory=DenseTest)
    profile: DenseProfile = FIXED  # the framework's own normalization

    def __post_init__(self):
        object.__setattr__(self, "strides", tuple(int(x) for x in self.strides))
        for name, enum in (("framework", Framework), ("kind", DenseKind),
                           ("assigner", DenseAssigner), ("coder", DenseCoder),
                           ("box_loss", LossKind)):  # fmt: skip
            object.__setattr__(self, name, as_member(enum, getattr(self, name), name))
        check_range(self.alpha, "alpha", 0.0, 1.0)
        check_range(self.gamma, "gamma", 0.0)
        check_range(self.center_radius, "center_radius", 0.0, open_low=True)


def _retina_sizes(base: float, integer: bool) -> tuple[tuple[float, ...], ...]:
    """Three octave scales per level: x, x 2^(1/3), x 2^(2/3) with x = base x stride
    (torchvision truncates them to integers)."""
    sizes = []
    for s in DENSE_STRIDES:
        x = s * base
        octave = [x * 2 ** (k / 3.0) for k in range(3)]
        sizes.append(tuple(float(int(v)) if integer else v for v in octave))
    return tuple(sizes)


def _per_image(name: str) -> DenseProfile:
    return DenseProfile(
        name=name,
        summary="each image divided by max(1, its positives), then averaged over the images",
        cls=DenseTerm(DenseNormalizer.POS_PER_IMAGE),
        box=DenseTerm(DenseNormalizer.POS_PER_IMAGE),
        ctr=DenseTerm(DenseNormalizer.POS_PER_IMAGE),
    )


def torchvision_retinanet(v2: bool = False) -> DenseConfig:
    """``retinanet_resnet50_fpn`` (L1 on deltas), or ``_v2`` (GroupNorm towers, GIoU)."""
    name = "torchvision-retinanet-v2" if v2 else "torchvision-retinanet"
    return DenseConfig(
        name=name,
        framework=Framework.TORCHVISION,
        kind=DenseKind.RETINANET,
        anchors=AnchorConfig(
            sizes=_retina_sizes(4.0, integer=True), round=True, stride_from_size=True
        ),
        assigner=DenseAssigner.MAX_IOU,
        box_loss=LossKind.GIOU_D2 if v2 else LossKind.L1,
        test=DenseTest(score_thr=0.05, topk=1000, nms_iou=0.5, detections_per_img=300),
        profile=_per_image(name),
    )


def torchvision_fcos() -> DenseConfig:
    """``fcos_resnet50_fpn``: centre sampling, GIoU on the decoded boxes, centerness BCE, every
    term divided by the batch's foreground count (at least 1)."""
    return DenseConfig(
        name="torchvision-fcos",
        framework=Framework.TORCHVISION,
        kind=DenseKind.FCOS,
        anchors=AnchorConfig(
            sizes=tuple((float(s),) for s in DENSE_STRIDES),
            ratios=(1.0,),
            round=True,
            stride_from_size=True,
        ),
        assigner=DenseAssigner.FCOS_TORCHVISION,
        coder=DenseCoder.DISTANCES,
        box_loss=LossKind.GIOU_D2,
        test=DenseTest(score_thr=0.2, topk=1000, nms_iou=0.6, detections_per_img=100),
        profile=_same(
            "torchvision-fcos",
            "every term divided by the batch's foreground count, at least 1",
            DenseTerm(DenseNormalizer.POS, floor=1.0),
        ),
    )


def detectron2_retinanet() -> DenseConfig:
    """Detectron2 ``retinanet_R_50_FPN`` (Base-RetinaNet.yaml): L1 on deltas (its
    SMOOTH_L1_LOSS_BETA 0.0; the defaults.py 0.1 is not what the zoo trains), the EMA
    normalizer."""
    return DenseConfig(
        name="detectron2-retinanet",
        framework=Framework.DETECTRON2,
        kind=DenseKind.RETINANET,
        anchors=AnchorConfig(sizes=_retina_sizes(4.0, integer=False), size_major=True),
        assigner=DenseAssigner.MAX_IOU,
        box_loss=LossKind.SMOOTH_L1,
        beta=0.0,
        test=DenseTest(score_thr=0.05, topk=1000, nms_iou=0.5, detections_per_img=100),
        profile=_same(
            "detectron2-retinanet",
            "both terms divided by the running (EMA) positive count",
            DenseTerm(DenseNormalizer.EMA),
        ),
    )


def mmdet_retinanet() -> DenseConfig:
    """MMDetection ``retinanet_r50_fpn``: MaxIoUAssigner (0.5 / 0.4, min_pos_iou 0),
    PseudoSampler, L1 on deltas, avg_factor = sum over images of max(#pos, 1)."""
    matcher = MatcherConfig(
        fg_iou=0.5,
        bg_iou=0.4,
        low_quality_min_iou=0.0,
        low_quality_reassign=True,
        nan_positive=False,
        union_eps=1e-6,
    )
    return DenseConfig(
        name="mmdet-retinanet",
        framework=Framework.MMDET,
        kind=DenseKind.RETINANET,
        anchors=AnchorConfig(sizes=_retina_sizes(4.0, integer=False), valid_pad_divisor=32),
        assigner=DenseAssigner.MAX_IOU,
        matcher=matcher,
        delta_clip_both=True,
        box_loss=LossKind.L1,
        test=DenseTest(score_thr=0.05, topk=1000, nms_iou=0.5, detections_per_img=100),
        profile=_same(
            "mmdet-retinanet",
            "both terms divided by the sum over images of max(#pos, 1) (+ float32 eps)",
            DenseTerm(DenseNormalizer.MMDET_PSEUDO, eps=EPS32),
        ),
    )


# MMDetection FCOS's default regress ranges (the last level's upper bound is its INF)
FCOS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, 1e8))


def mmdet_fcos(giou: bool = False) -> DenseConfig:
    """MMDetection ``fcos_r50-caffe_fpn_gn-head_1x`` (IoU loss on exp() distances in pixels,
    centerness on the cls tower, no centre sampling), or with ``giou`` its
    ``-center-normbbox-centeronreg-giou`` variant. The box term is weighted by the positives'
    centerness targets and divided by their sum; cls and centerness by max(reduce_mean(#pos), 1).
    """
    name = "mmdet-fcos-giou" if giou else "mmdet-fcos"
    pos = DenseTerm(DenseNormalizer.POS, floor=1.0, eps=EPS32, reduced=True)
    return DenseConfig(
        name=name,
        framework=Framework.MMDET,
        kind=DenseKind.FCOS,
        anchors=AnchorConfig(
            sizes=tuple((float(s),) for s in DENSE_STRIDES), ratios=(1.0,), offset=0.5
        ),
        assigner=DenseAssigner.FCOS_MMDET,
        coder=DenseCoder.DISTANCES,
        box_loss=LossKind.GIOU if giou else LossKind.IOU,
        ctr_on_box=giou,
        regress_ranges=FCOS_RANGES,
        center_sampling=giou,
        exp_distances=not giou,
        distances_in_strides=giou,
        box_weight_ctr=True,
        test=DenseTest(
            score_thr=0.05, topk=1000, nms_iou=0.6 if giou else 0.5, detections_per_img=100
        ),  # fmt: skip
        profile=DenseProfile(
            name=name,
            summary="cls and centerness over max(reduce_mean(#pos), 1); the box term weighted "
            "by centerness targets over their reduced sum",
            cls=pos,
            box=DenseTerm(DenseNormalizer.CTR_SUM, floor=CTR_FLOOR, eps=EPS32, reduced=True),
            ctr=pos,
        ),
    )


def mmdet_atss() -> DenseConfig:
    """MMDetection ``atss_r50_fpn_1x``: one anchor per location (8 x stride), ATSSAssigner top 9,
    GIoU (weight 2) on boxes decoded with stds (0.1, 0.1, 0.2, 0.2), weighted by centerness
    targets over their reduced sum (at least 1); cls and centerness over the reduced sum over
    images of max(#pos, 1)."""
    pseudo = DenseTerm(DenseNormalizer.MMDET_PSEUDO, eps=EPS32, reduced=True)
    return DenseConfig(
        name="mmdet-atss",
        framework=Framework.MMDET,
        kind=DenseKind.ATSS,
        anchors=AnchorConfig(
            sizes=tuple((8.0 * s,) for s in DENSE_STRIDES), ratios=(1.0,), valid_pad_divisor=32
        ),  # fmt: skip
        assigner=DenseAssigner.ATSS,
        delta_weights=(10.0, 10.0, 5.0, 5.0),
        delta_clip_both=True,
        box_loss=LossKind.GIOU,
        box_weight_ctr=True,
        test=DenseTest(score_thr=0.05, topk=1000, nms_iou=0.6, detections_per_img=100),
        profile=DenseProfile(
            name="mmdet-atss",
            summary="cls and centerness over reduce_mean(sum over images of max(#pos, 1)); the "
            "box term (weight 2) weighted by centerness targets over their reduced sum, at least 1",
            cls=pseudo,
            box=DenseTerm(DenseNormalizer.CTR_SUM, floor=1.0, weight=2.0, reduced=True),
            ctr=pseudo,
        ),
    )


# the presets by name, as --config and a dump's meta name them
DENSE_PRESETS = {
    "torchvision-retinanet": torchvision_retinanet,
    "torchvision-retinanet-v2": lambda: torchvision_retinanet(v2=True),
    "torchvision-fcos": torchvision_fcos,
    "detectron2-retinanet": detectron2_retinanet,
    "mmdet-retinanet": mmdet_retinanet,
    "mmdet-fcos": mmdet_fcos,
    "mmdet-fcos-giou": lambda: mmdet_fcos(giou=True),
    "mmdet-atss": mmdet_atss,
}


def dense_preset(name: str) -> DenseConfig:
    try:
        return DENSE_PRESETS[name]()
    except KeyError:
        known = ", ".join(DENSE_PRESETS)
        raise InputError(f"no one-stage preset named {name!r}; the presets: {known}") from None


def load_dense_config(spec) -> DenseConfig:
    """A one-stage preset by name, or a TOML file whose keys override the preset its ``base``
    names."""
    return load_named(DenseConfig, spec, DENSE_PRESETS, "torchvision-retinanet",
                      "one-stage preset")  # fmt: skip


def dense_config_from_meta(value, where: str = "meta.dense.config") -> DenseConfig:
    """The live model's config as a capture recorded it (a table over its ``base`` preset)."""
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a table of a one-stage config, found {value!r}")
    name = value.get("name", "recorded")
    base = name if name in DENSE_PRESETS else "torchvision-retinanet"  # (a full table: any base)
    return from_table(DenseConfig, value, DENSE_PRESETS, base, where, name)


def dense_profile(name: str, config: DenseConfig) -> DenseProfile:
    """A dense profile by name: legacy, fixed, or the config's own (its preset name)."""
    named = {p.name: p for p in (LEGACY, FIXED, config.profile)}
    if name not in named:
        raise InputError(
            f"no one-stage profile named {name!r}; the profiles here: {', '.join(named)}"
        )
    return named[name]
