"""torchvision: a ``FasterRCNN`` (``fasterrcnn_resnet50_fpn`` and friends) and its training batch
→ a capture directory.

Two lines in an unchanged torchvision loop::

    from lossdoctor.adapters import torchvision as ld
    capture = ld.Capture("lossdoctor-dumps", model, grad_norm_above=1000)       # 1
    for step, (images, targets) in enumerate(loader):
        loss_dict = model(images, targets)
        losses = sum(loss_dict.values())
        optimizer.zero_grad(); losses.backward()
        capture.check(step, loss_dict)                                         # 2
        optimizer.step()

Forward hooks record what the model's own forward computed: the transformed images and targets
(``model.transform``), the FPN features (``model.backbone``) and the proposals the RPN made
(``model.rpn``). Levels ``'0'..'3', 'pool'`` become p2..p6; torchvision's labels (1..K, 0 the
background) become lossdoctor's foreground classes 0..K-1. The dump records the profile
(``torchvision``) and the live model's detector config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..capture import unwrap
from ..inputs.config import (
    AnchorConfig,
    CoderConfig,
    DetectorConfig,
    MaskConfig,
    MatcherConfig,
    ProposalConfig,
    RoIPoolConfig,
    SamplerConfig,
    TestConfig,
)  # fmt: skip
from ..inputs.dense import DenseConfig, DenseTest, torchvision_fcos, torchvision_retinanet
from ..inputs.errors import InputError
from ..vocab import Framework, LossKind, Mapper, MaskTarget, Ranking
from .common import (
    MAX_BOX_FCS,
    MAX_HEAD_CONVS,
    MAX_RPN_CONVS,
    HookedCapture,
    dense_run_meta,
    describe,
    has_norm,
    head_norm_config,
    is_a,
    kind,
    level_names,
    not_replayed,
    require,
    run_meta,
    untouched,
    write_dump,
)

PROFILE = "torchvision"
BOX_HEADS = ("TwoMLPHead", "FastRCNNConvFCHead")
# torchvision's postprocess drops boxes smaller than this (roi_heads.postprocess_detections)
MIN_DETECTION_SIZE = 1e-2


def _anchors(gen) -> AnchorConfig:
    ratios = {tuple(r) for r in gen.aspect_ratios}
    if len(ratios) != 1:
        raise InputError(
            "the anchor generator uses other aspect ratios on each level; lossdoctor needs one set"
        )
    sizes = tuple(tuple(float(s) for s in level) for level in gen.sizes)
    return AnchorConfig(sizes=sizes, ratios=tuple(float(r) for r in ratios.pop()), round=True,
                        stride_from_size=True)  # fmt: skip


def _matcher(m) -> MatcherConfig:
    return MatcherConfig(fg_iou=float(m.high_threshold), bg_iou=float(m.low_threshold),
                         low_quality=bool(m.allow_low_quality_matches))  # fmt: skip


def _sampler(s, add_gt: bool = False) -> SamplerConfig:
    return SamplerConfig(batch_size=int(s.batch_size_per_image),
                         pos_fraction=float(s.positive_fraction), add_gt=add_gt)  # fmt: skip


def _proposals(rpn, mode: str) -> ProposalConfig:
    return ProposalConfig(
        pre_nms_top_n=int(rpn._pre_nms_top_n[mode]),
        post_nms_top_n=int(rpn._post_nms_top_n[mode]),
        nms_iou=float(rpn.nms_thresh),
        min_size=float(rpn.min_size),
        min_size_inclusive=True,
        min_score=float(rpn.score_thresh),
    )


# the two-stage detectors whose heads the replay runs (Keypoint R-CNN: its box terms)
TWO_STAGE = ("FasterRCNN", "MaskRCNN", "KeypointRCNN")
ONE_STAGE = ("RetinaNet", "FCOS", "SSD", "SSDLite")


def _convs(module) -> int:
    """The 3x3 convs of an RPN head (torchvision's v2 models have 2)."""
    return len(module) if isinstance(module, torch.nn.Sequential) else 1


def _box_head(roi) -> None:
    """TwoMLPHead, or FastRCNNConvFCHead with up to 4 conv blocks and 1 or 2 fcs (v2)."""
    head = roi.box_head
    require("box head", head, BOX_HEADS)
    if kind(head) == "FastRCNNConvFCHead":
        blocks = [m for m in head if kind(m) == "Conv2dNormActivation"]
        fcs = [m for m in head if isinstance(m, torch.nn.Linear)]
        if len(blocks) > MAX_HEAD_CONVS or not 1 <= len(fcs) <= MAX_BOX_FCS:
            raise not_replayed(
                f"box head FastRCNNConvFCHead with {len(blocks)} convs and {len(fcs)} fcs (up to "
                f"{MAX_HEAD_CONVS} convs and {MAX_BOX_FCS} fcs are replayed)"
            )


def two_stage(model) -> None:
    """Refuse a detector that is not one of the detectors replayed, by name."""
    if is_a(model, ONE_STAGE) and not is_a(model, DENSE):
        raise not_replayed(f"{kind(model)}, a one-stage detector (replayed: {', '.join(DENSE)})")
    if not is_a(model, TWO_STAGE + DENSE):
        raise not_replayed(
            f"detector {kind(model)} (lossdoctor replays {', '.join(TWO_STAGE + DENSE)})"
        )


# the one-stage detectors whose dense head the replay runs, and their box losses
DENSE = ("RetinaNet", "FCOS")
RETINANET_LOSSES = {"l1": (LossKind.L1, 0.0), "giou": (LossKind.GIOU_D2, 0.0),
                    "smooth_l1": (LossKind.SMOOTH_L1, 1.0)}  # fmt: skip


def dense_config(model) -> DenseConfig:
    """A RetinaNet's or FCOS's config read off the live model: anchors, matcher, box loss,
    centre sampling radius and test settings."""
    test = DenseTest(score_thr=float(model.score_thresh), topk=int(model.topk_candidates),
                     nms_iou=float(model.nms_thresh),
                     detections_per_img=int(model.detections_per_img))  # fmt: skip
    anchors = _anchors(model.anchor_generator)
    if is_a(model, ("FCOS",)):  # (the levels' strides: whatever the backbone gives)
        return dataclasses.replace(torchvision_fcos(), anchors=anchors, test=test, strides=(),
                                   center_radius=float(model.center_sampling_radius))  # fmt: skip
    require("RetinaNet head", model.head, ("RetinaNetHead",))
    loss = model.head.regression_head._loss_type
    if loss not in RETINANET_LOSSES:
        raise not_replayed(f"RetinaNet box loss {loss!r} (replayed: {', '.join(RETINANET_LOSSES)})")
    kind_, beta = RETINANET_LOSSES[loss]
    base = torchvision_retinanet(v2=has_norm(model.head))
    return dataclasses.replace(base, anchors=anchors, matcher=_matcher(model.proposal_matcher),
                               box_loss=kind_, beta=beta, test=test, strides=())  # fmt: skip


def architecture(model) -> None:
    """Refuse, by name, any part of the model whose losses the replay would not compute as the
    model does."""
    two_stage(model)
    rpn, roi = model.rpn, model.roi_heads
    require("RPN", rpn, ("RegionProposalNetwork",))
    require("RPN head", rpn.head, ("RPNHead",))
    if _convs(rpn.head.conv) > MAX_RPN_CONVS:
        raise not_replayed(f"an RPN head with {_convs(rpn.head.conv)} convs")
    if has_norm(rpn.head):
        raise not_replayed("an RPN head with a norm layer")
    require("RoI heads", roi, ("RoIHeads",))
    _box_head(roi)
    require("box predictor", roi.box_predictor, ("FastRCNNPredictor",))
    require("RoI pooler", roi.box_roi_pool, ("MultiScaleRoIAlign",))
    if roi.has_mask():
        require("mask head", roi.mask_head, ("MaskRCNNHeads",))
        require("mask predictor", roi.mask_predictor, ("MaskRCNNPredictor",))
    head_norm_config(_conv_heads(roi))


def _conv_heads(roi) -> list[torch.nn.Module]:
    return [roi.box_head] + ([roi.mask_head] if roi.has_mask() else [])


def detector_config(model) -> DetectorConfig:
    """The live model's detector config: anchors, matchers, samplers, coders, proposals,
    RoIAlign and test settings, read off ``model.rpn`` and ``model.roi_heads``."""
    architecture(model)
    rpn, roi = model.rpn, model.roi_heads
    pool = roi.box_roi_pool
    return DetectorConfig(
        name="torchvision model",
        ranking=Ranking.TORCHVISION,
        anchors=_anchors(rpn.anchor_generator),
        rpn_matcher=_matcher(rpn.proposal_matcher),
        rpn_sampler=_sampler(rpn.fg_bg_sampler),
        rpn_coder=CoderConfig(
            weights=tuple(rpn.box_coder.weights), clip=rpn.box_coder.bbox_xform_clip
        ),
        train_proposals=_proposals(rpn, "training"),
        test_proposals=_proposals(rpn, "testing"),
        roi_matcher=_matcher(roi.proposal_matcher),
        roi_sampler=_sampler(roi.fg_bg_sampler, True),
        roi_coder=CoderConfig(
            weights=tuple(roi.box_coder.weights), clip=roi.box_coder.bbox_xform_clip
        ),
        roi_pool=RoIPoolConfig(
            num_levels=len(pool.featmap_names),
            sampling_ratio=int(pool.sampling_ratio),
            aligned=False,
            mapper=Mapper.TORCHVISION,
            canonical_scale=float(pool.canonical_scale),
            canonical_level=int(pool.canonical_level),
        ),
        test=TestConfig(
            score_thr=float(roi.score_thresh),
            nms_iou=float(roi.nms_thresh),
            detections_per_img=int(roi.detections_per_img),
            min_box_size=MIN_DETECTION_SIZE,
        ),  # fmt: skip
        mask=_mask(roi),
        head_norm=head_norm_config(_conv_heads(roi)),
    )


def _mask(roi) -> MaskConfig:
    """The mask head's pooling size and mask size (twice it, after the deconvolution)."""
    pool = getattr(roi, "mask_roi_pool", None)
    if pool is None:
        return MaskConfig(target=MaskTarget.TORCHVISION)
    size = pool.output_size[0] if isinstance(pool.output_size, (list, tuple)) else pool.output_size
    return MaskConfig(pool_size=int(size), mask_size=2 * int(size), target=MaskTarget.TORCHVISION)


def batch_fields(image_list, targets, features, proposals=None, shift: int = 1) -> dict:
    """``dump_batch`` arguments from torchvision's own objects: the ImageList and targets after
    ``model.transform``, the backbone's feature dict, the RPN's proposals. ``shift``: what the
    labels lose (a two-stage model's 1..K become 0..K-1; a one-stage model's label is already
    its classifier column)."""
    feats = [f.detach() for f in features.values()]
    pad = tuple(image_list.tensors.shape[-2:])
    names, strides = level_names(feats, pad)
    out = {
        "features": dict(zip(names, feats)),
        "image_sizes": [list(s) for s in image_list.image_sizes],
        "pad_size": list(pad),
        "strides": strides,
        "gt_boxes": [t["boxes"].detach() for t in targets],
        "gt_labels": [t["labels"].detach() - shift for t in targets],  # background 0 → -1
    }
    if proposals is not None:
        out["proposals"] = [p.detach() for p in proposals]
    if targets and all("masks" in t for t in targets):  # Mask R-CNN: masks at the image size
        out["gt_masks"] = [t["masks"].detach().bool() for t in targets]
    return out


def _rpn_proposals(rpn, image_list, features) -> list:
    """The RPN's training proposals for these features, as ``rpn.forward`` makes them, without
    its loss (no sampling: the global RNG is left alone)."""
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    feats = list(features.values())
    objectness, deltas = rpn.head(feats)
    anchors = rpn.anchor_generator(image_list, feats)
    per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    boxes = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    return rpn.filter_proposals(boxes, objectness, image_list.image_sizes, per_level)[0]


def dump(out_dir: str | Path, model, images, targets, *, meta: dict | None = None) -> Path:
    """Write a capture directory for one batch: runs ``model.transform``, ``model.backbone`` and
    the RPN's proposal step under ``no_grad`` (the transform draws its resize size as in
    training when the model is in train mode).

    images: list of Tensor[3, H, W]; targets: list of {"boxes", "labels"} as for ``model(...)``.
    """
    model = unwrap(model)
    dense = is_a(model, DENSE)
    with torch.no_grad():
        image_list, tgts = model.transform(images, targets)
        features = model.backbone(image_list.tensors)
        proposals = None if dense else _rpn_proposals(model.rpn, image_list, features)
    batch = batch_fields(image_list, tgts, features, proposals, 0 if dense else 1)
    return write_dump(out_dir, model.state_dict(), batch, _meta(model, meta))


def _meta(model, meta: dict | None) -> dict:
    if is_a(model, DENSE):
        return dense_run_meta(Framework.TORCHVISION, model, dense_config, meta)
    return run_meta(Framework.TORCHVISION, model, detector_config, lambda _: PROFILE, meta)


def _model_call(args, kwargs) -> tuple:
    """(images, targets) of a ``model(images, targets)`` call."""
    images = args[0] if args else kwargs.get("images")
    return images, args[1] if len(args) > 1 else kwargs.get("targets")


class Capture(HookedCapture):
    """Capture from an unchanged torchvision training loop (see the module docstring)."""

    framework = Framework.TORCHVISION

    def install(self, model) -> None:
        two_stage(model)
        self.hook(model.transform, "transformed")
        self.hook(model.backbone, "features")
        if not is_a(model, DENSE):
            self.hook(model.rpn, "proposals", lambda args, kwargs, out: out[0])

    def describe(self) -> dict:
        return describe(Framework.TORCHVISION, "torchvision", lambda: _meta(self.model, None))

    def batch_from_forward(self) -> tuple[dict, dict]:
        if "transformed" not in self.seen:
            raise RuntimeError("no forward of the model was recorded before check()")
        image_list, targets = self.seen["transformed"]
        if targets is None:
            raise RuntimeError("the recorded forward had no targets: call check() in training")
        shift = 0 if is_a(self.model, DENSE) else 1
        batch = batch_fields(image_list, targets, self.seen["features"],
                             self.seen.get("proposals"), shift)  # fmt: skip
        return batch, {}

    def batch_after_exception(self, args, kwargs) -> tuple[dict, dict]:
        """torchvision asserts on its targets (boxes without area, after the transform) before
        the backbone runs: the transform and the backbone are run here where they did not."""
        model = self.model
        if "transformed" not in self.seen:
            with untouched(model):
                self.seen["transformed"] = model.transform(*_model_call(args, kwargs))
        if "features" not in self.seen:
            with untouched(model.backbone):
                self.seen["features"] = model.backbone(self.seen["transformed"][0].tensors)
        return self.batch_from_forward()
