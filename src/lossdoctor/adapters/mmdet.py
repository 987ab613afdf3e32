"""MMDetection 3.x: a two-stage detector (``FasterRCNN`` and friends) and what its dataloader
yields → a capture directory.

Two lines in the training config (the Runner then captures at the first non-finite loss,
non-finite gradient, gradient norm above ``grad_norm_above``, or every ``every`` iterations; each
rank writes its own dump)::

    custom_imports = dict(imports=["lossdoctor.adapters.mmdet"], allow_failed_imports=False)
    custom_hooks = [dict(type="LossDoctorHook", grad_norm_above=1000)]

In a loop of your own: ``capture = Capture(DIR, model)`` once, then ``capture.check(step,
losses)`` after ``backward()``; or ``dump(DIR, model, data_batch)`` for one batch.

What is read: the data samples the model's forward received (``gt_instances``, converted from
``HorizontalBoxes``; ``ignored_instances`` as ignored GT; ``img_shape``, ``batch_input_shape``),
the FPN features (``model.neck``), the RPN's outputs (proposals made from them with
``rpn_head.predict_by_feat`` and the ``rpn_proposal`` config, as ``loss_and_predict`` makes them),
and the live model's config: anchors, assigners, samplers (RandomSampler, or PseudoSampler:
every candidate, avg_factor = sum of max(#pos, 1)), coders, RoI extractor and losses.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..capture import unwrap
from ..inputs.config import (
    AnchorConfig,
    CascadeConfig,
    CoderConfig,
    DetectorConfig,
    MaskConfig,
    MatcherConfig,
    ProposalConfig,
    Res5Config,
    RoIPoolConfig,
    SamplerConfig,
    TestConfig,
)  # fmt: skip
from ..inputs.dataclass_toml import to_dict
from ..inputs.dense import (
    DenseConfig,
    DenseProfile,
    DenseTest,
    mmdet_atss,
    mmdet_fcos,
    mmdet_retinanet,
)
from ..inputs.errors import InputError
from ..inputs.profiles import mmdet, mmdet_cascade
from ..replay.losses import BALANCED_L1_ALPHA, BALANCED_L1_GAMMA, BOUNDED_IOU_EPS, IOU_EPS
from ..replay.sampler import IOU_FLOOR
from ..vocab import Framework, LossKind, Mapper, MaskTarget, Part, Ranking, Term
from .common import (
    BN_EPS,
    MAX_BOX_FCS,
    MAX_HEAD_CONVS,
    MAX_RPN_CONVS,
    HookedCapture,
    built,
    cascade_of_fc_heads,
    dense_run_meta,
    describe,
    has_norm,
    head_norm_config,
    is_a,
    is_norm,
    kind,
    level_names,
    not_replayed,
    observed,
    read_model,
    require,
    run_meta,
    untouched,
    write_dump,
)

# MMDetection's delta2bbox clamps dw, dh to |log(wh_ratio_clip)| with wh_ratio_clip = 16 / 1000
WH_RATIO_CLIP = 16 / 1000
RANDOM, PSEUDO, OHEM = "RandomSampler", "PseudoSampler", "OHEMSampler"
COMBINED = "CombinedSampler"
INSTANCE_BALANCED, IOU_BALANCED = "InstanceBalancedPosSampler", "IoUBalancedNegSampler"


# What the replay runs, by class name (exactly: another class computes its loss its own way)
TWO_STAGE = ("FasterRCNN", "MaskRCNN", "CascadeRCNN", "TwoStageDetector")
ROI_HEADS = ("StandardRoIHead", "CascadeRoIHead", "DynamicRoIHead", "DoubleHeadRoIHead")
# the double head's RoI head and box head (its regression branch on scaled RoIs)
DOUBLE_HEAD = ("DoubleHeadRoIHead", "DoubleConvFCBBoxHead")
# a C4 model's shared head (ResNet's res5) has this many blocks
RES5_BLOCKS = 3
# RoI heads whose assigner thresholds and box-loss beta change as they train (Dynamic R-CNN):
# read off the live head at each training forward, not from train_cfg
ADAPTIVE_ROI_HEADS = ("DynamicRoIHead",)
BOX_HEADS = ("Shared2FCBBoxHead", "Shared4Conv1FCBBoxHead", "ConvFCBBoxHead")
CODERS = ("DeltaXYWHBBoxCoder",)
ASSIGNERS = ("MaxIoUAssigner",)
IOU_CALCULATORS = ("BboxOverlaps2D",)
EXTRACTORS = ("SingleRoIExtractor",)
ROI_LAYERS = ("RoIAlign",)
MASK_HEADS = ("FCNMaskHead",)
# mmdet's box losses on decoded boxes that the replay runs (reg_decoded_bbox=True)
DECODED_LOSSES = {
    "GIoULoss": LossKind.GIOU,
    "IoULoss": LossKind.IOU,
    "DIoULoss": LossKind.DIOU,
    "CIoULoss": LossKind.CIOU,
    "BoundedIoULoss": LossKind.BOUNDED_IOU,
}
# the eps of each that the replay runs (their defaults)
DECODED_EPS = {"BoundedIoULoss": BOUNDED_IOU_EPS}


def _get(cfg, key, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _anchors(gen, pad_divisor: int, border: float) -> AnchorConfig:
    if any(tuple(s) != (b, b) for s, b in zip(gen.strides, gen.base_sizes)):
        raise InputError(
            "an anchor generator whose base sizes differ from its strides is not supported"
        )
    scales = [float(s) for s in gen.scales]
    sizes = tuple(tuple(b * s for s in scales) for b in gen.base_sizes)
    return AnchorConfig(
        sizes=sizes,
        ratios=tuple(float(r) for r in gen.ratios),
        offset=float(gen.center_offset),
        size_major=not gen.scale_major,
        valid_pad_divisor=int(pad_divisor),
        allowed_border=float(border),
    )


def _matcher(assigner, min_iou_default: float = 0.0) -> MatcherConfig:
    neg = _get(assigner, "neg_iou_thr")
    if isinstance(neg, (tuple, list)) or _get(assigner, "gt_max_assign_all", True) is False:
        raise InputError(
            "MaxIoUAssigner with a neg_iou_thr range or gt_max_assign_all=False is not supported"
        )
    return MatcherConfig(
        fg_iou=float(_get(assigner, "pos_iou_thr")),
        bg_iou=float(neg),
        low_quality=bool(_get(assigner, "match_low_quality", True)),
        low_quality_min_iou=float(_get(assigner, "min_pos_iou", min_iou_default)),
        low_quality_reassign=True,
        nan_positive=False,
        union_eps=1e-6,
    )


def _combined(sampler) -> dict:
    """Libra R-CNN's CombinedSampler: its positive and negative samplers as SamplerConfig fields
    (instance-balanced positives, IoU-balanced negatives with floor_thr -1, or random ones)."""
    pos, neg = _get(sampler, "pos_sampler"), _get(sampler, "neg_sampler")
    _require_cfg("positive sampler", pos, (RANDOM, INSTANCE_BALANCED))
    _require_cfg("negative sampler", neg, (RANDOM, IOU_BALANCED))
    fields = {"instance_balanced_pos": _type(pos) == INSTANCE_BALANCED}
    if _type(neg) == IOU_BALANCED:
        if float(_get(neg, "floor_thr", -1)) != IOU_FLOOR or float(_get(neg, "floor_fraction", 0)):
            raise not_replayed("IoUBalancedNegSampler with a floor (floor_thr -1 is replayed)")
        fields["iou_balanced_bins"] = int(_get(neg, "num_bins", 3))
    return fields


def _sampler(sampler, add_gt_default: bool) -> SamplerConfig:
    kind = _get(sampler, "type")
    if kind == PSEUDO:
        return SamplerConfig(take_all=True, avg_factor_with_neg=False)
    if kind not in (RANDOM, OHEM, COMBINED) or _get(sampler, "loss_key", "loss_cls") != "loss_cls":
        raise not_replayed(f"sampler {_type(sampler)} with its options (RandomSampler, "
                           "OHEMSampler, CombinedSampler and PseudoSampler are "
                           "replayed)")  # fmt: skip
    add_gt = bool(_get(sampler, "add_gt_as_proposals", add_gt_default))
    return SamplerConfig(
        batch_size=int(_get(sampler, "num")),
        pos_fraction=float(_get(sampler, "pos_fraction")),
        add_gt=add_gt,
        gt_self_assigned=add_gt,  # mmdet assigns each added GT to itself
        hard_mining=kind == OHEM,
        neg_pos_ub=float(_get(sampler, "neg_pos_ub", -1)),
        **(_combined(sampler) if kind == COMBINED else {}),
    )


def _coder(coder) -> CoderConfig:
    if any(float(m) != 0.0 for m in coder.means):
        raise not_replayed("a box coder with non-zero target_means")
    if any(float(s) <= 0.0 for s in coder.stds):
        raise InputError(
            f"the box coder's target_stds {[float(s) for s in coder.stds]} have a value <= 0: "
            "the box targets are divided by it, so the box loss is inf/NaN from the first step; "
            "fix target_stds in the config"
        )
    weights = tuple(1.0 / float(s) for s in coder.stds)
    clip, border = abs(math.log(WH_RATIO_CLIP)), bool(getattr(coder, "clip_border", True))
    return CoderConfig(weights=weights, clip=clip, clip_both=True, clip_border=border)


def _refining_coders(roi) -> None:
    """A cascade's stages refine their RoIs with coders that all clip to the image, or none."""
    heads = _stages(roi.bbox_head)
    if len({bool(getattr(h.bbox_coder, "clip_border", True)) for h in heads}) > 1:
        raise not_replayed("cascade stages whose box coders differ in clip_border")


def _proposals(cfg) -> ProposalConfig:
    return ProposalConfig(
        pre_nms_top_n=int(_get(cfg, "nms_pre")),
        post_nms_top_n=int(_get(cfg, "max_per_img")),
        nms_iou=float(_get(_get(cfg, "nms"), "iou_threshold")),
        min_size=float(_get(cfg, "min_bbox_size", 0)),
        min_size_inclusive=False,
    )


def _first(x):
    """A cascade's first stage of a per-stage list or ModuleList, else the thing itself."""
    return x[0] if isinstance(x, (list, tuple, torch.nn.ModuleList)) else x


def _cascade(model) -> CascadeConfig:
    """CascadeRoIHead's later stages: IoU thresholds, coder weights, stage loss weights."""
    heads = model.roi_head.bbox_head
    if not isinstance(heads, torch.nn.ModuleList):
        return CascadeConfig()
    if not all(h.reg_class_agnostic for h in heads):
        raise InputError("cascade stages with class-specific regression are not supported")
    rcnn, weights = model.train_cfg.rcnn, [float(w) for w in model.roi_head.stage_loss_weights]
    return CascadeConfig(
        ious=tuple(float(_get(c.assigner, "pos_iou_thr")) for c in rcnn[1:]),
        coder_weights=tuple(_coder(h.bbox_coder).weights for h in heads[1:]),
        loss_weights=tuple(weights[1:]),
        stage0_loss_weight=weights[0],
    )


def _mask(model) -> MaskConfig:
    """FCNMaskHead's pooling (as the box head's, which lossdoctor uses for both) and mask size."""
    roi = model.roi_head
    if not getattr(roi, "with_mask", False):
        return MaskConfig(target=MaskTarget.MMDET)
    box = _first(roi.bbox_roi_extractor).roi_layers[0]
    mask = _first(roi.mask_roi_extractor).roi_layers[0]
    if (box.sampling_ratio, box.aligned) != (mask.sampling_ratio, mask.aligned):
        raise InputError("a mask RoIAlign that samples unlike the box RoIAlign is not supported")
    size = mask.output_size[0] if isinstance(mask.output_size, tuple) else mask.output_size
    mask_size = _get(_first(model.train_cfg.rcnn), "mask_size", 2 * int(size))
    return MaskConfig(pool_size=int(size), mask_size=int(mask_size), target=MaskTarget.MMDET)


def _type(cfg) -> str:
    t = _get(cfg, "type")
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _require_cfg(what: str, cfg, allowed: tuple[str, ...]) -> None:
    if _type(cfg) not in allowed:
        raise not_replayed(f"{what} {_type(cfg)} (lossdoctor replays {', '.join(allowed)})")


def _norm(head) -> str:
    """The suffix " with GN" (its norm type) where the head's convs and fcs are normalized."""
    norm = getattr(head, "norm_cfg", None)
    return "" if norm is None else f" with {_get(norm, 'type', 'a norm')}"


def _replayed_counts(counts: tuple[int, ...]) -> bool:
    """ConvFCBBoxHead's (shared convs, shared fcs, cls convs, cls fcs, reg convs, reg fcs) that
    the replay runs: up to 4 shared convs, 1 or 2 shared fcs, no separate branches."""
    convs, fcs, *branches = counts
    return 0 <= convs <= MAX_HEAD_CONVS and 1 <= fcs <= MAX_BOX_FCS and not any(branches)


def _double_head(roi) -> float:
    """DoubleHeadRoIHead with DoubleConvFCBBoxHead (up to 4 bottlenecks, 1 or 2 fcs) → the
    scale of its regression branch's RoIs."""
    for head in _stages(roi.bbox_head):
        require("box head of DoubleHeadRoIHead", head, DOUBLE_HEAD[1:])
        if not (head.num_convs <= MAX_HEAD_CONVS and 1 <= head.num_fcs <= MAX_BOX_FCS):
            raise not_replayed(f"DoubleConvFCBBoxHead with {head.num_convs} convs and "
                               f"{head.num_fcs} fcs")  # fmt: skip
        _box_loss_options(head)
    return float(roi.reg_roi_scale_factor)


def _box_head(head) -> None:
    counts = tuple(int(getattr(head, f"num_{x}", -1)) for x in (
        "shared_convs", "shared_fcs", "cls_convs", "cls_fcs", "reg_convs", "reg_fcs"))  # fmt: skip
    pooled = bool(getattr(head, "with_avg_pool", False))
    if kind(head) not in BOX_HEADS or not _replayed_counts(counts) or pooled:
        layers = "" if -1 in counts else " ({} shared convs, {} shared fcs, {}+{} cls convs/fcs, "
        layers = layers and layers.format(*counts[:4]) + "{}+{} reg convs/fcs)".format(*counts[4:])
        layers += ", with_avg_pool" if pooled else ""
        raise not_replayed(f"box head {kind(head)}{_norm(head)}{layers}")
    _box_loss_options(head)


def _head_layers(head) -> tuple[int, int, bool]:
    """A ConvFCBBoxHead's shared convs and fcs, and whether they are normalized."""
    return head.num_shared_convs, head.num_shared_fcs, getattr(head, "norm_cfg", None) is not None


def _box_loss_options(head) -> None:
    """A box head's coder and box loss, as the replay runs them."""
    require("box coder", head.bbox_coder, CODERS)
    if getattr(head.bbox_coder, "add_ctr_clamp", False):
        raise not_replayed("a box coder with add_ctr_clamp=True")
    _decoded_loss(head.loss_bbox, bool(getattr(head, "reg_decoded_bbox", False)))


def _decoded_loss(loss, decoded: bool) -> None:
    """A box loss on decoded boxes (reg_decoded_bbox) is replayed for GIoULoss, IoULoss (mode
    'log'), DIoULoss, CIoULoss and BoundedIoULoss with mmdet's eps; the others are refused, as is
    an IoU loss on deltas."""
    name = kind(loss)
    if not decoded:
        if name in DECODED_LOSSES:
            raise not_replayed(f"{name} on deltas (reg_decoded_bbox=False)")
        return
    if name not in DECODED_LOSSES:
        raise not_replayed(f"a box loss on decoded boxes ({name}, reg_decoded_bbox=True)")
    eps = DECODED_EPS.get(name, IOU_EPS)
    if float(getattr(loss, "eps", eps)) != eps:
        raise not_replayed(f"{name} with eps={loss.eps} (the default {eps} is replayed)")
    if getattr(loss, "mode", "log") != "log":
        raise not_replayed(f"{name} with mode={loss.mode!r} (mode 'log' is replayed)")


def _assignment(what: str, stage_cfg, samplers=(RANDOM, PSEUDO)) -> None:
    assigner, sampler = _get(stage_cfg, "assigner"), _get(stage_cfg, "sampler")
    _require_cfg(f"{what} assigner", assigner, ASSIGNERS)
    _require_cfg(f"{what} IoU calculator", _get(assigner, "iou_calculator",
                 {"type": IOU_CALCULATORS[0]}), IOU_CALCULATORS)  # fmt: skip
    if float(_get(assigner, "ignore_iof_thr", -1)) > 0:
        raise not_replayed(f"{what} assigner ignore_iof_thr > 0")
    _require_cfg(f"{what} sampler", sampler, samplers)


def _side(size) -> int:
    """A square size given as one int or as (h, w)."""
    return int(size[0]) if isinstance(size, (tuple, list)) else int(size)


def _res_layer(roi) -> Res5Config:
    """A C4 model's shared head (ResLayer: ResNet's res5, 3 undilated Bottlenecks with BatchNorm)
    and its BBoxHead averaging res5's whole output: where the first block strides, whether its
    norms are frozen (norm_eval), the RoIAlign side."""
    shared = roi.shared_head
    require("shared head", shared, ("ResLayer",))
    blocks = list(getattr(shared, f"layer{shared.stage + 1}"))
    if len(blocks) != RES5_BLOCKS or any(kind(b) != "Bottleneck" for b in blocks):
        raise not_replayed(f"ResLayer of {len(blocks)} blocks ({RES5_BLOCKS} Bottlenecks are "
                           "replayed)")  # fmt: skip
    if any(tuple(b.conv2.dilation) != (1, 1) or b.with_plugins or b.with_dcn for b in blocks):
        raise not_replayed("a ResLayer with dilation, plugins or DCN")
    norms = [m for b in blocks for m in b.modules() if is_norm(m)]
    if any(kind(m) != "BatchNorm2d" or float(m.eps) != BN_EPS for m in norms):
        raise not_replayed("a ResLayer with norms other than BatchNorm2d (eps 1e-5)")
    pool = _side(_first(roi.bbox_roi_extractor).roi_layers[0].output_size)
    for head in _stages(roi.bbox_head):
        require("box head on a shared head", head, ("BBoxHead",))
        if not head.with_avg_pool or 2 * _side(head.roi_feat_size) != pool:
            raise not_replayed("a BBoxHead that does not average res5's whole output")
    return Res5Config(pool_size=pool, stride_in_1x1=tuple(blocks[0].conv1.stride) != (1, 1),
                      frozen_norm=bool(shared.norm_eval))  # fmt: skip


def _roi_head(roi, train) -> None:
    require("RoI head", roi, ROI_HEADS)
    if getattr(roi, "shared_head", None) is not None:
        _res_layer(roi)
        for head in _stages(roi.bbox_head):
            _box_loss_options(head)
    elif kind(roi) == DOUBLE_HEAD[0]:
        _double_head(roi)
    else:
        for head in _stages(roi.bbox_head):
            _box_head(head)
        cascade_of_fc_heads(_stages(roi.bbox_head), _head_layers)
    for ext in _stages(roi.bbox_roi_extractor):
        require("RoI extractor", ext, EXTRACTORS)
        require("RoI layer", ext.roi_layers[0], ROI_LAYERS)
    stages = _stages(_get(train, "rcnn")) if train is not None else []
    for rcnn in stages:  # hard examples mined by a later cascade stage's head are not replayed
        mined = (RANDOM, PSEUDO, OHEM, COMBINED) if len(stages) == 1 else (RANDOM, PSEUDO, COMBINED)
        _assignment("RoI", rcnn, mined)
        if float(_get(rcnn, "pos_weight", -1)) > 0:
            raise not_replayed("a RoI pos_weight > 0 (train_cfg.rcnn.pos_weight)")
    if getattr(roi, "with_mask", False):
        for head in _stages(roi.mask_head):
            require("mask head", head, MASK_HEADS)
            if head.conv_kernel_size != 3:
                raise not_replayed("a mask head with non-3x3 convs")
            loss = head.loss_mask
            if kind(loss) != "CrossEntropyLoss" or float(loss.loss_weight) != 1.0:
                raise not_replayed(f"mask loss {kind(loss)} with loss_weight {loss.loss_weight}")


def is_dense(model) -> bool:
    """A single-stage detector whose dense head the replay runs."""
    head = getattr(model, "bbox_head", None)
    return getattr(model, "rpn_head", None) is None and kind(head) in DENSE_HEADS


def two_stage(model) -> None:
    """Refuse a detector that is neither a two-stage detector nor a dense head replayed."""
    if is_dense(model):
        return
    head = getattr(model, "bbox_head", None)
    if head is not None and getattr(model, "rpn_head", None) is None and not is_a(model, ("RPN",)):
        raise not_replayed(f"{kind(model)}, a one-stage detector with {kind(head)} (replayed: "
                           f"{', '.join(DENSE_HEADS)})")  # fmt: skip
    if getattr(model, "rpn_head", None) is None or getattr(model, "roi_head", None) is None:
        # mmdet's RPN detector keeps its RPN head as bbox_head
        rpn_only = is_a(model, ("RPN",)) or getattr(model, "rpn_head", None) is not None
        stages = "proposal network without RoI heads" if rpn_only else "one-stage detector"
        raise not_replayed(f"{kind(model)}, a {stages}")
    if not is_a(model, TWO_STAGE):
        raise not_replayed(f"detector {kind(model)} (lossdoctor replays {', '.join(TWO_STAGE)})")


def architecture(model) -> None:
    """Refuse, by name, any part of the model whose losses the replay would not compute as
    MMDetection does."""
    two_stage(model)
    require("RPN head", model.rpn_head, ("RPNHead",))
    if getattr(model.rpn_head, "reg_decoded_bbox", False):
        raise not_replayed(f"an RPN box loss on decoded boxes ({kind(model.rpn_head.loss_bbox)})")
    if int(getattr(model.rpn_head, "num_convs", 1)) > MAX_RPN_CONVS:
        raise not_replayed(f"an RPN head with {model.rpn_head.num_convs} convs (num_convs)")
    if has_norm(model.rpn_head):
        raise not_replayed("an RPN head with a norm layer")
    require("RPN box coder", model.rpn_head.bbox_coder, CODERS)
    _refining_coders(model.roi_head)
    train = getattr(model, "train_cfg", None)
    if train is not None:
        _assignment("RPN", train.rpn)
    _roi_head(model.roi_head, train)
    head_norm_config(_conv_heads(model.roi_head))
    _nms(train, getattr(model, "test_cfg", None))


def _conv_heads(roi) -> list[torch.nn.Module]:
    """The box heads (each stage's) and the mask head, whose conv blocks the replay runs."""
    masks = _stages(roi.mask_head) if getattr(roi, "with_mask", False) else []
    return [*_stages(roi.bbox_head), *masks] if not roi.with_shared_head else []


def _nms(train, test) -> None:
    """Proposals and detections with plain NMS, as the replay makes them."""
    stages = [
        ("rpn_proposal", _get(train, "rpn_proposal") if train is not None else None),
        ("test_cfg.rpn", test.rpn if test is not None else None),
        ("rcnn", _get(test, "rcnn") if test is not None else None),
    ]
    for stage, part in stages:
        nms = _get(part, "nms") if part is not None else None
        if nms is not None and _type(nms) != "nms":
            raise not_replayed(f"{stage} NMS {_type(nms)} (plain nms is replayed)")


def _stages(x) -> list:
    """A cascade's per-stage list or ModuleList, else the one thing."""
    return list(x) if isinstance(x, (list, tuple, torch.nn.ModuleList)) else [x]


def detector_config(model) -> DetectorConfig:
    """The live model's detector config, read off its heads and ``train_cfg`` / ``test_cfg``
    (a cascade's first stage as the RoI head, its later stages in ``cascade``)."""
    architecture(model)
    train, test = model.train_cfg, model.test_cfg
    rpn, box = model.rpn_head, _first(model.roi_head.bbox_head)
    ext = _first(model.roi_head.bbox_roi_extractor)
    layer, rcnn = ext.roi_layers[0], _first(train.rcnn)
    return DetectorConfig(
        name="mmdet model",
        ranking=Ranking.MMDET,
        anchors=_anchors(
            rpn.prior_generator,
            _get(model.data_preprocessor, "pad_size_divisor", 1),
            _get(train.rpn, "allowed_border", -1),
        ),
        rpn_matcher=_matcher(train.rpn.assigner),
        rpn_sampler=_sampler(train.rpn.sampler, False),
        rpn_coder=_coder(rpn.bbox_coder),
        train_proposals=_proposals(_get(train, "rpn_proposal", test.rpn)),
        test_proposals=_proposals(test.rpn),
        roi_matcher=_matcher(_roi_assigner(model.roi_head, rcnn)),
        roi_sampler=_sampler(rcnn.sampler, True),
        roi_coder=_coder(box.bbox_coder),
        roi_pool=_roi_pool(model.roi_head, ext, layer),
        test=TestConfig(
            score_thr=float(test.rcnn.score_thr),
            nms_iou=float(_get(test.rcnn.nms, "iou_threshold")),
            detections_per_img=int(test.rcnn.max_per_img),
            min_box_size=0.0,
        ),  # fmt: skip
        mask=_mask(model),
        cascade=_cascade(model),
        head_norm=head_norm_config(_conv_heads(model.roi_head)),
        res5=_res_layer(model.roi_head) if model.roi_head.with_shared_head else Res5Config(),
    )


def _roi_pool(roi, ext, layer) -> RoIPoolConfig:
    reg = {"reg_scale": _double_head(roi)} if kind(roi) == DOUBLE_HEAD[0] else {}
    return RoIPoolConfig(num_levels=len(ext.featmap_strides),
                         sampling_ratio=int(layer.sampling_ratio), aligned=bool(layer.aligned),
                         mapper=Mapper.MMDET, finest_scale=float(ext.finest_scale),
                         **reg)  # fmt: skip


def _roi_assigner(roi, rcnn):
    """The RoI assigner the head assigns with now: Dynamic R-CNN moves its live assigner's IoU
    thresholds away from train_cfg's as it trains."""
    return roi.bbox_assigner if kind(roi) in ADAPTIVE_ROI_HEADS else rcnn.assigner


def _loss(module, cls: bool) -> tuple[LossKind, float, float]:
    """(kind, beta, weight) of one of mmdet's loss modules."""
    name, weight = type(module).__name__, float(getattr(module, "loss_weight", 1.0))
    if cls and name == "CrossEntropyLoss":
        _plain_ce(module)
        return (LossKind.BCE if module.use_sigmoid else LossKind.CE), 0.0, weight
    if not cls and name == "L1Loss":
        return LossKind.L1, 0.0, weight
    if not cls and name == "SmoothL1Loss":
        return LossKind.SMOOTH_L1, float(module.beta), weight
    if not cls and name == "BalancedL1Loss":
        if (float(module.alpha), float(module.gamma)) != (BALANCED_L1_ALPHA, BALANCED_L1_GAMMA):
            raise not_replayed(f"BalancedL1Loss with alpha {module.alpha}, gamma {module.gamma} "
                               f"(alpha {BALANCED_L1_ALPHA}, gamma {BALANCED_L1_GAMMA} are "
                               "replayed)")  # fmt: skip
        return LossKind.BALANCED_L1, float(module.beta), weight
    if not cls and name in DECODED_LOSSES:
        return DECODED_LOSSES[name], float(getattr(module, "beta", 0.0)), weight
    raise not_replayed(
        f"loss {name} (CrossEntropyLoss, L1Loss, SmoothL1Loss, BalancedL1Loss, and GIoU, IoU, "
        "DIoU, CIoU and BoundedIoU losses on decoded boxes are replayed)"
    )


def _plain_ce(module) -> None:
    """CrossEntropyLoss options the replay does not model."""
    if getattr(module, "class_weight", None) is not None:
        raise not_replayed("CrossEntropyLoss with class_weight")
    if getattr(module, "avg_non_ignore", False) or getattr(module, "use_mask", False):
        raise not_replayed("CrossEntropyLoss with avg_non_ignore or use_mask")


def _sigmoid(module, want: bool, what: str) -> None:
    """The RPN's objectness is a sigmoid, the RoI classifier a softmax, as the replay runs them."""
    if bool(getattr(module, "use_sigmoid", want)) != want:
        raise not_replayed(f"{what} with use_sigmoid={not want}")


def profile(model) -> str | dict:
    """The loss normalization the model trains with: ``mmdet`` (whose RPN avg_factor follows the
    sampler) or ``mmdet-cascade`` where the model's losses are theirs, else a profile table. A
    cascade's stages share one box loss (its weights are the stage loss weights)."""
    rpn, box = model.rpn_head, _first(model.roi_head.bbox_head)
    heads = model.roi_head.bbox_head
    stages = heads if isinstance(heads, torch.nn.ModuleList) else [heads]
    if len({(_loss(h.loss_cls, True), _loss(h.loss_bbox, False)) for h in stages}) > 1:
        raise not_replayed("cascade stages with different losses")
    modules = {
        Term.RPN_CLS: rpn.loss_cls, Term.RPN_BOX: rpn.loss_bbox,
        Term.ROI_CLS: box.loss_cls, Term.ROI_BOX: box.loss_bbox,
    }  # fmt: skip
    _sigmoid(rpn.loss_cls, True, "an RPN classification loss")
    _sigmoid(box.loss_cls, False, "a RoI classification loss")
    base = mmdet()
    specs = {}
    for term, module in modules.items():
        kind, beta, weight = _loss(module, term.part is Part.CLS)
        specs[term.value] = dataclasses.replace(
            base.term(term), loss=kind, beta=beta, weight=weight
        )
    pos = float(_get(model.train_cfg.rpn, "pos_weight", -1))
    live = dataclasses.replace(base, pos_weight=pos if pos > 0 else 1.0, **specs)
    for known in (base, mmdet_cascade()):
        if dataclasses.replace(known, name=base.name, summary=base.summary) == live:
            return known.name
    return to_dict(live)


def _boxes(instances) -> torch.Tensor:
    b = instances.bboxes
    return (b.tensor if hasattr(b, "tensor") else b).detach().float().cpu().reshape(-1, 4)


def batch_fields(inputs, data_samples, features, proposals=None) -> dict:
    """``dump_batch`` arguments from what the model's forward got: the padded inputs, the data
    samples, the FPN features (a tuple) and the proposals."""
    feats = [f.detach() for f in features]
    pad = tuple(inputs.shape[-2:])
    names, strides = level_names(feats, pad)
    boxes, labels, ignore = [], [], []
    for ds in data_samples:
        gt, ign = ds.gt_instances, ds.get("ignored_instances", None)
        extra = _boxes(ign) if ign is not None and len(ign) else torch.zeros(0, 4)
        boxes.append(torch.cat([_boxes(gt), extra]))
        ign_labels = (
            ign.labels if ign is not None and len(ign) else torch.zeros(0, dtype=torch.long)
        )
        labels.append(torch.cat([gt.labels.detach().cpu(), ign_labels.detach().cpu()]).long())
        ignore.append(
            torch.cat(
                [torch.zeros(len(gt), dtype=torch.bool), torch.ones(len(extra), dtype=torch.bool)]
            )
        )
    out = {"features": dict(zip(names, feats)), "pad_size": list(pad), "strides": strides,
           "image_sizes": [list(ds.metainfo["img_shape"][:2]) for ds in data_samples],
           "gt_boxes": boxes, "gt_labels": labels, "gt_ignore": ignore}  # fmt: skip
    if proposals is not None:
        out["proposals"] = [p.detach().float().cpu() for p in proposals]
    if all(ds.gt_instances.get("masks", None) is not None for ds in data_samples):
        out["gt_masks"] = [_masks(ds) for ds in data_samples]
    return out


def _masks(ds) -> torch.Tensor:
    """An image's GT masks (then its ignored instances'), cut to its own size: mmdet pads masks
    to the batch when the data preprocessor pads them."""
    h, w = ds.metainfo["img_shape"][:2]
    parts = [ds.gt_instances.masks]
    ign = ds.get("ignored_instances", None)
    if ign is not None and len(ign):
        parts.append(ign.masks)
    arrays = [torch.as_tensor(m.to_ndarray())[:, :h, :w].bool() for m in parts]
    return torch.cat(arrays) if arrays else torch.zeros(0, h, w, dtype=torch.bool)


def rpn_proposals(model, rpn_outs, data_samples) -> list[torch.Tensor]:
    """The RPN's training proposals, as ``rpn_head.loss_and_predict`` makes them."""
    cfg = _get(model.train_cfg, "rpn_proposal", model.test_cfg.rpn)
    metas = [ds.metainfo for ds in data_samples]
    with torch.no_grad():
        results = model.rpn_head.predict_by_feat(*rpn_outs, batch_img_metas=metas, cfg=cfg)
    return [_boxes(r) for r in results]


# the dense heads the replay runs, and the options it models
DENSE_HEADS = ("RetinaHead", "FCOSHead", "ATSSHead")
FOCAL = "FocalLoss"


def _focal(head) -> tuple[float, float, float]:
    """(alpha, gamma, weight) of a dense head's sigmoid focal loss."""
    loss = head.loss_cls
    if kind(loss) != FOCAL or not bool(getattr(loss, "use_sigmoid", False)):
        raise not_replayed(f"{kind(head)} classification loss {kind(loss)} (replayed: "
                           "FocalLoss with use_sigmoid)")  # fmt: skip
    return float(loss.alpha), float(loss.gamma), float(loss.loss_weight)


def _dense_box(head, decoded: bool) -> tuple[LossKind, float, float]:
    kind_, beta, weight = _loss(head.loss_bbox, cls=False)
    if (kind_ in DECODED_LOSSES.values()) != decoded:
        raise not_replayed(f"{kind(head)} box loss {kind(head.loss_bbox)} with "
                           f"reg_decoded_bbox={not decoded}")  # fmt: skip
    return kind_, beta, weight


def _weighted(profile: DenseProfile, cls: float, box: float, ctr: float) -> DenseProfile:
    terms = {"cls": cls, "box": box, "ctr": ctr}
    return dataclasses.replace(profile, **{k: dataclasses.replace(getattr(profile, k), weight=w)
                                           for k, w in terms.items()})  # fmt: skip


def _retina_config(model, head) -> DenseConfig:
    train = model.train_cfg
    _assignment("RetinaHead", train, samplers=(PSEUDO,))
    alpha, gamma, w_cls = _focal(head)
    box, beta, w_box = _dense_box(head, bool(getattr(head, "reg_decoded_bbox", False)))
    coder = _coder(head.bbox_coder)
    base = mmdet_retinanet()
    pad = _get(model.data_preprocessor, "pad_size_divisor", 1)
    return dataclasses.replace(
        base,
        anchors=_anchors(head.prior_generator, pad, _get(train, "allowed_border", -1)),
        matcher=_matcher(train.assigner),
        delta_weights=coder.weights,
        box_loss=box, beta=beta, alpha=alpha, gamma=gamma,
        profile=_weighted(base.profile, w_cls, w_box, 1.0),
    )  # fmt: skip


def _fcos_config(model, head) -> DenseConfig:
    alpha, gamma, w_cls = _focal(head)
    box, beta, w_box = _dense_box(head, True)
    w_ctr = _ctr_loss(head)
    strides = tuple(int(s[0] if isinstance(s, (tuple, list)) else s) for s in head.strides)
    base = mmdet_fcos(giou=box is LossKind.GIOU)
    return dataclasses.replace(
        base,
        anchors=dataclasses.replace(base.anchors, sizes=tuple((float(s),) for s in strides),
                                    offset=float(head.prior_generator.offset)),
        regress_ranges=tuple((float(a), float(b)) for a, b in head.regress_ranges),
        center_sampling=bool(head.center_sampling),
        center_radius=float(head.center_sample_radius),
        exp_distances=not head.norm_on_bbox, distances_in_strides=bool(head.norm_on_bbox),
        ctr_on_box=bool(head.centerness_on_reg),
        box_loss=box, beta=beta, alpha=alpha, gamma=gamma,
        profile=_weighted(base.profile, w_cls, w_box, w_ctr),
    )  # fmt: skip


def _ctr_loss(head) -> float:
    """The centerness loss's weight (a sigmoid CrossEntropyLoss is what the replay runs)."""
    ctr = head.loss_centerness
    if kind(ctr) != "CrossEntropyLoss" or not bool(getattr(ctr, "use_sigmoid", False)):
        raise not_replayed(f"{kind(head)} centerness loss {kind(ctr)} (replayed: "
                           "CrossEntropyLoss with use_sigmoid)")  # fmt: skip
    return float(ctr.loss_weight)


def _atss_config(model, head) -> DenseConfig:
    train = model.train_cfg
    _require_cfg("ATSSHead assigner", train.assigner, ("ATSSAssigner",))
    if _get(train.assigner, "alpha", None) is not None:
        raise not_replayed("ATSSAssigner with alpha (the cost-based assigner)")
    alpha, gamma, w_cls = _focal(head)
    box, beta, w_box = _dense_box(head, bool(getattr(head, "reg_decoded_bbox", True)))
    base = mmdet_atss()
    pad = _get(model.data_preprocessor, "pad_size_divisor", 1)
    return dataclasses.replace(
        base,
        anchors=_anchors(head.prior_generator, pad, _get(train, "allowed_border", -1)),
        atss_topk=int(_get(train.assigner, "topk", 9)),
        delta_weights=_coder(head.bbox_coder).weights,
        box_loss=box, beta=beta, alpha=alpha, gamma=gamma,
        profile=_weighted(base.profile, w_cls, w_box, _ctr_loss(head)),
    )  # fmt: skip


DENSE_CONFIGS = {"RetinaHead": _retina_config, "FCOSHead": _fcos_config, "ATSSHead": _atss_config}


def dense_config(model) -> DenseConfig:
    """A RetinaNet's, FCOS's or ATSS's dense head config, read off the live head and
    ``train_cfg``."""
    head = model.bbox_head
    require("dense head", head, DENSE_HEADS)
    cfg = DENSE_CONFIGS[kind(head)](model, head)
    strides = tuple(int(s[0] if isinstance(s, (tuple, list)) else s)
                    for s in head.prior_generator.strides)  # fmt: skip
    cfg = dataclasses.replace(cfg, strides=strides)
    test = model.test_cfg
    return dataclasses.replace(cfg, test=DenseTest(
        score_thr=float(_get(test, "score_thr", 0.05)), topk=int(_get(test, "nms_pre", 1000)),
        nms_iou=float(_get(_get(test, "nms", {}), "iou_threshold", 0.5)),
        detections_per_img=int(_get(test, "max_per_img", 100))))  # fmt: skip


def _meta(model, meta):
    if is_dense(model):
        return dense_run_meta(Framework.MMDET, model, dense_config, meta)
    return run_meta(Framework.MMDET, model, detector_config, profile, meta)


def dump(out_dir: str | Path, model, data_batch: dict, *, meta: dict | None = None) -> Path:
    """Write a capture directory for one batch as the dataloader yields it: runs the model's
    ``data_preprocessor``, ``extract_feat`` and its RPN under ``no_grad``."""
    model = unwrap(model)
    with torch.no_grad():
        data = model.data_preprocessor(data_batch, True)
        feats = model.extract_feat(data["inputs"])
        outs = None if is_dense(model) else model.rpn_head(feats)
    samples = data["data_samples"]
    proposals = None if outs is None else rpn_proposals(model, outs, samples)
    batch = batch_fields(data["inputs"], samples, feats, proposals)
    return write_dump(out_dir, model.state_dict(), batch, _meta(model, meta))


def _model_input(args, kwargs, output):
    """The inputs and data samples of a ``mode="loss"`` forward (also when it raised)."""
    if kwargs.get("mode", args[2] if len(args) > 2 else None) != "loss":
        return None
    inputs = kwargs.get("inputs", args[0] if args else None)
    return inputs, kwargs.get("data_samples", args[1] if len(args) > 1 else None)


class Capture(HookedCapture):
    """Capture from the model's own training forward (``mode="loss"``): call ``check(step,
    losses)`` after ``backward()``, before the optimizer steps."""

    framework = Framework.MMDET

    def install(self, model) -> None:
        two_stage(model)
        self.hook(model, "model_input", _model_input, always=True)
        self.hook(model, "losses", lambda args, kwargs, out: out if isinstance(out, dict) else None)
        # the features the heads take: the neck's, or the backbone's where there is no neck (DC5)
        self.hook(model.neck if model.with_neck else model.backbone, "features")
        if not is_dense(model):
            self.hook(model.rpn_head, "rpn_outs")

    def describe(self) -> dict:
        return describe(Framework.MMDET, "mmdet", lambda: _meta(self.model, None))

    def _forward_starts(self, module, args) -> None:
        super()._forward_starts(module, args)
        roi = getattr(self.model, "roi_head", None)
        adaptive = kind(roi) in ADAPTIVE_ROI_HEADS and "unsupported" not in self.run_info
        if module.training and adaptive:
            # the thresholds and beta this forward trains with (the head updates them after
            # its loss, every update_iter_interval iterations)
            self.seen["state"] = run_meta(
                Framework.MMDET, self.model, detector_config, profile, None
            )

    def batch_from_forward(self) -> tuple[dict, dict]:
        if "model_input" not in self.seen:
            raise RuntimeError("no training forward of the model (mode='loss') was recorded")
        inputs, samples = self.seen["model_input"]
        rpn_outs = self.seen.get("rpn_outs")
        proposals = rpn_proposals(self.model, rpn_outs, samples) if rpn_outs else None
        state = self.seen.get("state", {})
        fields = batch_fields(inputs, samples, self.seen["features"], proposals)
        return fields, {k: state[k] for k in ("config", "profile") if k in state}

    def batch_after_exception(self, args, kwargs) -> tuple[dict, dict]:
        """What the forward had seen; the FPN features computed here where it had not."""
        if "features" not in self.seen and "model_input" in self.seen:
            with untouched(self.model):
                self.seen["features"] = self.model.extract_feat(self.seen["model_input"][0])
        return self.batch_from_forward()


def _accumulation(wrapper) -> dict:
    """Which micro-batch of an accumulated step the capture holds (the last forward's)."""
    counts = int(getattr(wrapper, "_accumulative_counts", 1))
    if counts == 1:
        return {}
    k = (int(wrapper._inner_count) - 1) % counts + 1
    note = "the batch is this micro-batch; the gradients sum all of them"
    return {"accumulation": {"micro_batches": counts, "captured": k, "note": note}}


def _start(hook, runner) -> None:
    """The hook's capture, checking each optimizer step before the wrapper steps (before the
    loss scaler unscales, clips, or skips a non-finite step)."""
    wrapper = runner.optim_wrapper
    options = {**hook.options, "optimizer": wrapper.optimizer}
    options["scaler"] = getattr(wrapper, "loss_scaler", None)
    folder = Path(runner.work_dir) / hook.out_dir
    hook.capture = Capture(folder, runner.model, **options)
    hook.runner = runner
    steps = wrapper.step

    def step(*args, **kwargs):
        _check_step(hook)
        return steps(*args, **kwargs)

    wrapper.step = step


def _check_step(hook) -> None:
    capture = hook.capture
    losses = capture.seen.get("losses")
    if losses is not None:
        meta = observed("the accumulation count", lambda: _accumulation(hook.runner.optim_wrapper))
        capture.check(hook.runner.iter, losses, meta=meta)


def _hook_class():
    """``LossDoctorHook``, an mmengine Hook, registered in mmengine's and mmdet's HOOKS."""
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    class LossDoctorHook(Hook):
        """Captures from inside the Runner: each optimizer step checks the loss of the forward
        and the gradients before the weights change (the checkpoint holds the weights that made
        that loss). ``out_dir`` is relative to the work dir; takes :class:`Capture`'s options."""

        priority = "LOW"

        def __init__(self, out_dir="lossdoctor-dumps", **options):
            self.out_dir, self.options = out_dir, options
            self.capture, self.runner = None, None

        def before_train(self, runner):
            observed("not capturing this run", lambda: _start(self, runner))

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            if self.capture is not None:
                self.capture.next_step = runner.iter

    HOOKS.register_module(module=LossDoctorHook, force=True)
    try:
        from mmdet.registry import HOOKS as MMDET_HOOKS

        MMDET_HOOKS.register_module(module=LossDoctorHook, force=True)
    except ImportError:
        pass
    return LossDoctorHook


try:
    LossDoctorHook = _hook_class()
except ImportError:  # mmengine absent: dump() and Capture still work where mmdet models do
    LossDoctorHook = None


def config_from_file(path: str | Path) -> tuple[DetectorConfig, str | dict]:
    """The detector config and profile of an mmdet config file: built through mmengine's Config
    (which runs the file's Python) and the model registry, without loading weights."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    model = built("mmdet", path, lambda: MODELS.build(Config.fromfile(str(path)).model))
    if is_dense(model):  # a one-stage detector: its dense head's config
        return read_model(model, dense_config, lambda _: None)
    return read_model(model, detector_config, profile)
