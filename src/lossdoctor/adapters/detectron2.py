"""Detectron2: a ``GeneralizedRCNN`` with an RPN and ``StandardROIHeads`` (Mask R-CNN's too) or
``CascadeROIHeads`` and its batched inputs → a capture directory.

Two lines with ``DefaultTrainer`` or ``SimpleTrainer`` (the hook runs after ``backward()`` and
before the optimizer steps, so the checkpoint holds the weights that made the loss)::

    from lossdoctor.adapters.detectron2 import LossDoctorHook
    trainer.register_hooks([LossDoctorHook("lossdoctor-dumps", grad_norm_above=1000)])

In a loop of your own: ``capture = Capture(DIR, model)`` once, then ``capture.check(step,
loss_dict)`` after ``backward()``; or ``dump(DIR, model, batched_inputs)`` for one batch.

One forward hook on ``model.proposal_generator`` sees what the model computed: the ImageList
(image sizes, padded size), the FPN features (p2..p6), the GT ``Instances`` (``gt_boxes``,
``gt_classes`` 0..K-1, ``gt_masks``) and the RPN's proposals. ``BitMasks`` are dumped as they
are; ``PolygonMasks`` are rasterized over the whole image, which is not how Detectron2 makes its
mask targets (it rasterizes each polygon inside each RoI), so the replayed ``loss_mask`` differs
from Detectron2's by a little: train with ``INPUT.MASK_FORMAT: bitmask`` for exact agreement.
"""

from __future__ import annotations

import dataclasses
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
from ..inputs.dense import DENSE_META, DenseConfig, DenseTest, detectron2_retinanet
from ..inputs.errors import InputError
from ..inputs.profiles import detectron2 as builtin_profile
from ..vocab import CascadeScores, Framework, LossKind, Mapper, MaskTarget, Ranking, Term
from .common import (
    BN_EPS,
    HEAD_NORMS,
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

# the Matcher's labels for (below, between, above) its thresholds
RPN_LABELS, ROI_LABELS = [0, -1, 1], [0, 1]
# fvcore's smooth-L1 is exact L1 below this beta
L1_BELOW_BETA = 1e-5
# Detectron2's BBOX_REG_LOSS_TYPE of its smooth-L1/L1 box loss on deltas
D2_SMOOTH_L1 = "smooth_l1"
# its losses on decoded boxes, as the replay names them
D2_DECODED = {"giou": LossKind.GIOU_D2, "diou": LossKind.DIOU_D2, "ciou": LossKind.CIOU_D2}


def _cell(cell: torch.Tensor) -> tuple[list[float], list[float]]:
    """Sizes and ratios (h / w) of one level's cell anchors (size-major, as Detectron2 orders)."""
    w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    sizes = [round(float(s), 4) for s in (w * h).sqrt()]
    ratios = [round(float(r), 4) for r in h / w]
    distinct = list(dict.fromkeys(sizes))
    return distinct, ratios[: len(ratios) // len(distinct)]


def _anchors(gen) -> AnchorConfig:
    levels = [_cell(c) for c in gen.cell_anchors]
    ratios = {tuple(r) for _, r in levels}
    if len(ratios) != 1:
        raise InputError(
            "the anchor generator uses other aspect ratios on each level; lossdoctor needs one set"
        )
    return AnchorConfig(sizes=tuple(tuple(s) for s, _ in levels), ratios=ratios.pop(),
                        offset=float(gen.offset), size_major=True)  # fmt: skip


def _matcher(m, labels: list[int]) -> MatcherConfig:
    if list(m.labels) != labels:
        raise InputError(f"a matcher with labels {list(m.labels)} is not supported ({labels} are)")
    inner = m.thresholds[1:-1]
    return MatcherConfig(fg_iou=float(inner[-1]), bg_iou=float(inner[0]),
                         low_quality=bool(m.allow_low_quality_matches))  # fmt: skip


def _coder(transform) -> CoderConfig:
    return CoderConfig(
        weights=tuple(float(w) for w in transform.weights), clip=float(transform.scale_clamp)
    )


def _proposals(rpn, training: bool) -> ProposalConfig:
    return ProposalConfig(
        pre_nms_top_n=int(rpn.pre_nms_topk[training]),
        post_nms_top_n=int(rpn.post_nms_topk[training]),
        nms_iou=float(rpn.nms_thresh),
        min_size=float(rpn.min_box_size),
        min_size_inclusive=False,
    )


def _pool(pooler) -> RoIPoolConfig:
    layer = pooler.level_poolers[0]
    return RoIPoolConfig(
        num_levels=pooler.max_level - pooler.min_level + 1,
        sampling_ratio=int(layer.sampling_ratio),
        aligned=bool(layer.aligned),
        mapper=Mapper.DETECTRON2,
        canonical_scale=float(pooler.canonical_box_size),
        canonical_level=int(pooler.canonical_level),
    )


def _stages(modules) -> list:
    """A cascade's per-stage box heads or predictors (a ModuleList), else the one."""
    return list(modules) if isinstance(modules, torch.nn.ModuleList) else [modules]


def _cascade(roi) -> CascadeConfig:
    """CascadeROIHeads' later stages: each stage's matcher IoU and box weights; every refined
    box taken unsampled, no GT added, the feature gradient averaged over the stages."""
    preds = _stages(roi.box_predictor)
    if len(preds) == 1:
        return CascadeConfig()
    later = len(preds) - 1
    return CascadeConfig(
        ious=tuple(float(m.thresholds[1]) for m in roi.proposal_matchers[1:]),
        coder_weights=tuple(_coder(p.box2box_transform).weights for p in preds[1:]),
        loss_weights=(1.0,) * later,
        resample=False,
        drop_gt=False,
        feature_grad_scale=1.0 / len(preds),
        scores=CascadeScores.MEAN_PROBABILITIES,
    )


def _mask(roi) -> MaskConfig:
    """The mask head's pooling (as the box head's, which lossdoctor uses for both) and mask size
    (the pooled size doubled by the deconvolution)."""
    if not getattr(roi, "mask_on", False) or kind(roi) in RES5_HEADS:
        return MaskConfig(target=MaskTarget.DETECTRON2)
    if roi.mask_pooler is None:
        raise InputError("a mask head without a mask pooler is not supported")
    box, mask = roi.box_pooler.level_poolers[0], roi.mask_pooler.level_poolers[0]
    if (type(box), box.sampling_ratio, box.aligned) != (
        type(mask),
        mask.sampling_ratio,
        mask.aligned,
    ):
        raise InputError("a mask pooler that samples unlike the box pooler is not supported")
    size = int(roi.mask_pooler.output_size[0])
    return MaskConfig(pool_size=size, mask_size=2 * size, target=MaskTarget.DETECTRON2)


# What the replay runs, by class name (exactly: another class computes its loss its own way)
ROI_HEADS = ("StandardROIHeads", "CascadeROIHeads", "Res5ROIHeads")
# a C4 model's RoI heads: res5 as the box head (its mask head, on res5's output, not replayed)
RES5_HEADS = ("Res5ROIHeads",)
RES5_BLOCKS = 3
ROI_ALIGN = ("ROIAlign",)


def _res5(roi) -> Res5Config:
    """Res5ROIHeads' res5: 3 BottleneckBlocks, undilated, frozen or plain BatchNorms; where the
    first block strides, whether its norms are frozen, the RoIAlign side."""
    blocks = list(roi.res5)
    if len(blocks) != RES5_BLOCKS or any(kind(b) != "BottleneckBlock" for b in blocks):
        raise not_replayed(f"Res5ROIHeads with res5 of {len(blocks)} {kind(blocks[0])}s "
                           f"({RES5_BLOCKS} BottleneckBlocks are replayed)")  # fmt: skip
    if any(tuple(b.conv2.dilation) != (1, 1) for b in blocks):
        raise not_replayed("Res5ROIHeads with a dilated res5 (RES5_DILATION)")
    norms = [m for b in blocks for m in b.modules() if is_norm(m)]
    frozen = {kind(m) == "FrozenBatchNorm2d" or not m.training for m in norms}
    if len(frozen) > 1 or any(kind(m) not in HEAD_NORMS or float(m.eps) != BN_EPS for m in norms):
        raise not_replayed("Res5ROIHeads with norms other than one kind of BatchNorm (eps 1e-5)")
    return Res5Config(pool_size=int(roi.pooler.output_size[0]),
                      stride_in_1x1=tuple(blocks[0].conv1.stride) != (1, 1),
                      frozen_norm=frozen.pop())  # fmt: skip


def _pooler(roi):
    """The box head's pooler (Res5ROIHeads calls it ``pooler``)."""
    return roi.pooler if kind(roi) in RES5_HEADS else roi.box_pooler


def _box_heads(roi) -> None:
    if kind(roi) in RES5_HEADS:
        _res5(roi)
        require("box predictor", roi.box_predictor, ("FastRCNNOutputLayers",))
        return
    for head in _stages(roi.box_head):
        require("box head", head, ("FastRCNNConvFCHead",))
        convs, fcs = len(head.conv_norm_relus), len(head.fcs)
        if convs > MAX_HEAD_CONVS or not 1 <= fcs <= MAX_BOX_FCS:
            raise not_replayed(f"box head FastRCNNConvFCHead with NUM_CONV {convs}, NUM_FC {fcs}")
    cascade_of_fc_heads(_stages(roi.box_head), lambda h: (
        len(h.conv_norm_relus), len(h.fcs), any(is_norm(m) for m in h.modules())))  # fmt: skip
    for pred in _stages(roi.box_predictor):
        require("box predictor", pred, ("FastRCNNOutputLayers",))


def _mask_head(roi) -> None:
    if not getattr(roi, "mask_on", False):
        return
    head = roi.mask_head
    require("mask head", head, ("MaskRCNNConvUpsampleHead",))
    convs = head.conv_norm_relus
    if len(convs) > MAX_HEAD_CONVS:
        raise not_replayed(f"a mask head with {len(convs)} convs (ROI_MASK_HEAD.NUM_CONV)")


def two_stage(model) -> None:
    """Refuse a detector that is neither a two-stage GeneralizedRCNN nor a RetinaNet, by name."""
    if not is_a(model, ("GeneralizedRCNN", *DENSE)):
        one = is_a(model, ("FCOS", "DenseDetector"))
        raise not_replayed(f"{kind(model)}" + (", a one-stage detector" if one else ""))


# the one-stage detector whose dense head the replay runs
DENSE = ("RetinaNet",)


def dense_config(model) -> DenseConfig:
    """A RetinaNet's config read off the live model: anchors, matcher, coder, focal loss, box
    loss and test settings (its EMA normalizer is recorded per capture)."""
    require("RetinaNet head", model.head, ("RetinaNetHead",))
    loss = model.box_reg_loss_type
    if loss == D2_SMOOTH_L1:
        box, beta = LossKind.SMOOTH_L1, float(model.smooth_l1_beta)
    elif loss in D2_DECODED:
        box, beta = D2_DECODED[loss], 0.0
    else:
        raise not_replayed(f"RetinaNet box_reg_loss_type {loss!r}")
    coder = _coder(model.box2box_transform)
    return dataclasses.replace(
        detectron2_retinanet(),
        anchors=_anchors(model.anchor_generator),
        strides=tuple(int(s) for s in model.anchor_generator.strides),
        matcher=_matcher(model.anchor_matcher, RPN_LABELS),
        delta_weights=coder.weights,
        box_loss=box, beta=beta,
        alpha=float(model.focal_loss_alpha), gamma=float(model.focal_loss_gamma),
        test=DenseTest(score_thr=float(model.test_score_thresh),
                       topk=int(model.test_topk_candidates), nms_iou=float(model.test_nms_thresh),
                       detections_per_img=int(model.max_detections_per_image)),
    )  # fmt: skip


def architecture(model) -> None:
    """Refuse, by name, any part of the model whose losses the replay would not compute as
    Detectron2 does."""
    two_stage(model)
    rpn, roi = model.proposal_generator, model.roi_heads
    require("proposal generator", rpn, ("RPN",))
    require("RPN head", rpn.rpn_head, ("StandardRPNHead",))
    conv = rpn.rpn_head.conv
    if isinstance(conv, torch.nn.Sequential) and len(conv) > MAX_RPN_CONVS:
        raise not_replayed(f"an RPN head with {len(conv)} convs (RPN.CONV_DIMS)")
    if has_norm(rpn.rpn_head):
        raise not_replayed("an RPN head with a norm layer")
    require("RoI heads", roi, ROI_HEADS)
    _box_heads(roi)
    require("RoI pooler", _pooler(roi).level_poolers[0], ROI_ALIGN)
    _mask_head(roi)
    head_norm_config(_conv_heads(roi))


def _conv_heads(roi) -> list[torch.nn.Module]:
    """The box heads (each stage's) and the mask head, whose conv blocks the replay runs (a C4
    model's res5 is read by :func:`_res5`, its mask head not replayed)."""
    if kind(roi) in RES5_HEADS:
        return []
    return [*_stages(roi.box_head), *([roi.mask_head] if getattr(roi, "mask_on", False) else [])]


def detector_config(model) -> DetectorConfig:
    """The live model's detector config, read off ``model.proposal_generator`` and
    ``model.roi_heads`` (a cascade's first stage as the RoI head, its later stages in
    ``cascade``)."""
    architecture(model)
    rpn, roi = model.proposal_generator, model.roi_heads
    pred = _stages(roi.box_predictor)[0]
    return DetectorConfig(
        name="detectron2 model",
        ranking=Ranking.DETECTRON2,
        anchors=_anchors(rpn.anchor_generator),
        rpn_matcher=_matcher(rpn.anchor_matcher, RPN_LABELS),
        rpn_sampler=SamplerConfig(
            batch_size=int(rpn.batch_size_per_image), pos_fraction=float(rpn.positive_fraction)
        ),
        rpn_coder=_coder(rpn.box2box_transform),
        train_proposals=_proposals(rpn, True),
        test_proposals=_proposals(rpn, False),
        roi_matcher=_matcher(roi.proposal_matcher, ROI_LABELS),
        roi_sampler=SamplerConfig(
            batch_size=int(roi.batch_size_per_image),
            pos_fraction=float(roi.positive_fraction),
            add_gt=bool(roi.proposal_append_gt),
        ),  # fmt: skip
        roi_coder=_coder(pred.box2box_transform),
        roi_pool=_pool(_pooler(roi)),
        test=TestConfig(
            score_thr=float(pred.test_score_thresh),
            nms_iou=float(pred.test_nms_thresh),
            detections_per_img=int(pred.test_topk_per_image),
            min_box_size=0.0,
        ),  # fmt: skip
        mask=_mask(roi),
        cascade=_cascade(roi),
        head_norm=head_norm_config(_conv_heads(roi)),
        res5=_res5(roi) if kind(roi) in RES5_HEADS else Res5Config(),
    )


def _box_spec(spec, loss_type: str, beta: float, weight: float, decoded: bool):
    """The box term of a BBOX_REG_LOSS_TYPE; the losses on decoded boxes where ``decoded`` (the
    RoI head) allows them."""
    if decoded and loss_type in D2_DECODED:
        return dataclasses.replace(spec, loss=D2_DECODED[loss_type], beta=0.0, weight=float(weight))
    if loss_type != D2_SMOOTH_L1:
        where = "an RPN" if not decoded else "a"
        raise not_replayed(
            f"{where} box regression loss {loss_type!r} (smooth_l1 and L1 are replayed"
            + (", and giou, diou and ciou in the RoI head)" if decoded else " in the RPN)")
        )
    kind = LossKind.L1 if beta < L1_BELOW_BETA else LossKind.SMOOTH_L1
    return dataclasses.replace(spec, loss=kind, beta=float(beta), weight=float(weight))


def _box_loss(pred) -> tuple:
    """What decides a box predictor's losses."""
    return (pred.use_sigmoid_ce, pred.use_fed_loss, pred.box_reg_loss_type, pred.smooth_l1_beta,
            tuple(sorted(pred.loss_weight.items())))  # fmt: skip


def profile(model) -> str | dict:
    """The loss normalization the model trains with: ``detectron2``, or a profile table where
    its smooth-L1 betas or loss weights differ from the defaults (a cascade's stages share
    one)."""
    roi = model.roi_heads
    rpn, preds = model.proposal_generator, _stages(roi.box_predictor)
    pred = preds[0]
    if len({_box_loss(p) for p in preds}) > 1:
        raise not_replayed("cascade stages with different losses")
    if pred.use_sigmoid_ce or pred.use_fed_loss:
        raise not_replayed("a sigmoid or federated classification loss")
    base = builtin_profile()
    rw, pw = rpn.loss_weight, pred.loss_weight
    rpn_box = _box_spec(base.rpn_box, rpn.box_reg_loss_type, rpn.smooth_l1_beta,
                        rw.get("loss_rpn_loc", 1.0), decoded=False)  # fmt: skip
    roi_box = _box_spec(base.roi_box, pred.box_reg_loss_type, pred.smooth_l1_beta,
                        pw.get("loss_box_reg", 1.0), decoded=True)  # fmt: skip
    specs = {
        Term.RPN_CLS.value: dataclasses.replace(
            base.rpn_cls, weight=float(rw.get("loss_rpn_cls", 1.0))
        ),
        Term.RPN_BOX.value: rpn_box,
        Term.ROI_CLS.value: dataclasses.replace(
            base.roi_cls, weight=float(pw.get("loss_cls", 1.0))
        ),
        Term.ROI_BOX.value: roi_box,
    }
    if getattr(roi, "mask_on", False):
        weight = float(getattr(roi.mask_head, "loss_weight", 1.0))
        specs[Term.ROI_MASK.value] = dataclasses.replace(base.roi_mask, weight=weight)
    live = dataclasses.replace(base, **specs)
    return "detectron2" if live == base else to_dict(live)


def batch_fields(images, features: dict, gt_instances, proposals=None) -> dict:
    """``dump_batch`` arguments from Detectron2's objects: the ImageList, the feature dict
    (p2..p6), the GT Instances and the proposal Instances."""
    feats = [v.detach() for v in features.values()]
    pad = tuple(images.tensor.shape[-2:])
    names, strides = level_names(feats, pad)
    out = {
        "features": dict(zip(names, feats)), "pad_size": list(pad), "strides": strides,
        "image_sizes": [list(s) for s in images.image_sizes],
        "gt_boxes": [g.gt_boxes.tensor.detach().float().cpu() for g in gt_instances],
        "gt_labels": [g.gt_classes.detach().cpu().long() for g in gt_instances],
    }  # fmt: skip
    if proposals is not None:
        out["proposals"] = [p.proposal_boxes.tensor.detach().float().cpu() for p in proposals]
    if all(g.has("gt_masks") for g in gt_instances) and gt_instances:
        out["gt_masks"] = [_masks(g) for g in gt_instances]
    return out


def _masks(g) -> torch.Tensor:
    """One image's GT masks → Tensor[K, H, W] bool: BitMasks as they are, PolygonMasks
    rasterized over the image."""
    masks = g.gt_masks
    if hasattr(masks, "tensor"):
        return masks.tensor.detach().cpu().bool()
    from detectron2.structures.masks import polygons_to_bitmask

    h, w = g.image_size
    out = [torch.from_numpy(polygons_to_bitmask(p, h, w)) for p in masks.polygons]
    return torch.stack(out) if out else torch.zeros(0, h, w, dtype=torch.bool)


def _rpn_proposals(rpn, images, features) -> list:
    """The RPN's proposals, as its training forward makes them, without its loss (no sampling:
    the global RNG is left alone)."""
    feats = [features[f] for f in rpn.in_features]
    anchors = rpn.anchor_generator(feats)
    logits, deltas = rpn.rpn_head(feats)
    logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
    dim = rpn.anchor_generator.box_dim
    deltas = [
        x.view(x.shape[0], -1, dim, *x.shape[-2:]).permute(0, 3, 4, 1, 2).flatten(1, -2)
        for x in deltas
    ]
    return rpn.predict_proposals(anchors, logits, deltas, images.image_sizes)


def _meta(model, meta):
    if is_a(model, DENSE):
        return dense_run_meta(Framework.DETECTRON2, model, dense_config, meta)
    return run_meta(Framework.DETECTRON2, model, detector_config, profile, meta)


def _normalizer(model) -> dict:
    """A RetinaNet's running loss normalizer before the step (absent before its first)."""
    value = getattr(model, "loss_normalizer", None)
    return {} if value is None else {DENSE_META: {"loss_normalizer": float(value)}}


def dump(
    out_dir: str | Path, model, batched_inputs: list[dict], *, meta: dict | None = None
) -> Path:
    """Write a capture directory for one batch as the data loader yields it (dicts with
    ``image`` and ``instances``): runs ``model.preprocess_image``, the backbone and the RPN's
    proposal step under ``no_grad``."""
    model = unwrap(model)
    dense = is_a(model, DENSE)
    with torch.no_grad():
        images = model.preprocess_image(batched_inputs)
        features = model.backbone(images.tensor)
        proposals = None if dense else _rpn_proposals(model.proposal_generator, images, features)
    if dense:
        features = {f: features[f] for f in model.head_in_features}
        meta = {**_normalizer(model), **(meta or {})}
    gt = [x["instances"] for x in batched_inputs]
    return write_dump(
        out_dir,
        model.state_dict(),
        batch_fields(images, features, gt, proposals),
        _meta(model, meta),
    )


def _rpn_call(args, kwargs, output):
    """What the RPN saw (images, features, GT) and made; also when it raised (no proposals)."""
    images, features = args[0], args[1]
    gt = args[2] if len(args) > 2 else kwargs.get("gt_instances")
    if gt is None:
        return None
    return images, features, gt, output[0] if output is not None else None


class Capture(HookedCapture):
    """Capture from the model's own training forward: ``check(step, loss_dict)`` after
    ``backward()``, before the optimizer steps."""

    framework = Framework.DETECTRON2

    def install(self, model) -> None:
        two_stage(model)
        if is_a(model, DENSE):
            self.hook(model.head, "head_features", lambda args, kwargs, out: args[0], always=True)
        else:
            self.hook(model.proposal_generator, "proposal_generator", _rpn_call, always=True)
        self.hook(model, "losses", lambda args, kwargs, out: out if isinstance(out, dict) else None)

    def _forward_starts(self, module, args) -> None:
        super()._forward_starts(module, args)
        if module.training and is_a(module, DENSE):
            self.seen["batched"] = args[0] if args else None
            self.seen["normalizer"] = _normalizer(module)

    def _dense_batch(self) -> tuple[dict, dict]:
        """A RetinaNet's: the images as its forward preprocessed them (run again here), the
        features its head took, the GT, and its running normalizer before the step."""
        model, batched = self.model, self.seen.get("batched")
        if batched is None:
            raise RuntimeError("no training forward of the model was recorded before check()")
        with untouched(model):
            images = model.preprocess_image(batched)
            feats = self.seen.get("head_features")
            if feats is None:  # the forward raised before its head ran
                out = model.backbone(images.tensor)
                feats = [out[f] for f in model.head_in_features]
        gt = [x["instances"].to(model.device) for x in batched]
        features = dict(zip(model.head_in_features, feats))
        return batch_fields(images, features, gt), self.seen.get("normalizer", {})

    def describe(self) -> dict:
        return describe(Framework.DETECTRON2, "detectron2", lambda: _meta(self.model, None))

    def batch_from_forward(self) -> tuple[dict, dict]:
        if is_a(self.model, DENSE):
            return self._dense_batch()
        if "proposal_generator" not in self.seen:
            raise RuntimeError("no training forward of the model was recorded before check()")
        images, features, gt, proposals = self.seen["proposal_generator"]
        return batch_fields(images, features, gt, proposals), {}

    def batch_after_exception(self, args, kwargs) -> tuple[dict, dict]:
        """The RPN's inputs where it ran (it raises on non-finite proposals), else the
        preprocessed images and the backbone's features, computed here."""
        if is_a(self.model, DENSE):
            self.seen.setdefault("batched", args[0] if args else kwargs.get("batched_inputs"))
            return self._dense_batch()
        if "proposal_generator" not in self.seen:
            model, batched = self.model, args[0] if args else kwargs["batched_inputs"]
            with untouched(model):
                images = model.preprocess_image(batched)
                features = model.backbone(images.tensor)
            gt = [x["instances"].to(model.device) for x in batched]
            self.seen["proposal_generator"] = (images, features, gt, None)
        return self.batch_from_forward()


def _start(hook) -> None:
    """The hook's capture on the trainer's model. ``DefaultTrainer`` runs its steps in an inner
    ``SimpleTrainer`` or ``AMPTrainer`` (``_trainer``) whose own hooks get ``after_backward``:
    the hook joins them."""
    outer = hook.trainer
    inner = getattr(outer, "_trainer", outer)
    if inner is not outer and hook not in inner._hooks:
        inner._hooks.append(hook)
    options = {**hook.options, "optimizer": inner.optimizer}
    options["scaler"] = getattr(inner, "grad_scaler", None)
    hook.capture = Capture(hook.out_dir, inner.model, **options)
    hook.capture.next_step = outer.iter


def _check(hook) -> None:
    """Check the step: its loss dict (from the model's forward) and its gradients."""
    capture = hook.capture
    if capture is not None and capture.seen.get("losses") is not None:
        capture.check(hook.trainer.iter, capture.seen["losses"])


def _hook_class():
    from detectron2.engine import HookBase

    class LossDoctorHook(HookBase):
        """Captures in ``after_backward`` (after the loss scaler's backward under AMP): the loss
        of the step's forward, its gradients, and the weights before the optimizer steps.
        Registered on ``DefaultTrainer``, ``SimpleTrainer`` or ``AMPTrainer`` (or the inner
        trainer of a ``DefaultTrainer``, which calls no hook but ``after_backward``: the capture
        starts when the hook is registered); takes :class:`Capture`'s options."""

        def __init__(self, out_dir="lossdoctor-dumps", **options):
            self.out_dir, self.options, self.capture = out_dir, options, None
            self._trainer = None

        @property
        def trainer(self):
            return self._trainer

        @trainer.setter
        def trainer(self, value):  # register_hooks sets it: the model and optimizer exist
            self._trainer = value
            if value is not None and self.capture is None:
                observed("not capturing this run", lambda: _start(self))

        def before_step(self):
            if self.capture is not None:
                self.capture.next_step = self.trainer.iter

        def after_backward(self):
            _check(self)

    return LossDoctorHook


try:
    LossDoctorHook = _hook_class()
except ImportError:  # detectron2 absent
    LossDoctorHook = None


def config_from_file(path: str | Path) -> tuple[DetectorConfig, str | dict]:
    """The detector config and profile of a Detectron2 config file, through ``get_cfg()`` and
    ``build_model`` (on the CPU, without weights)."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    def build():
        cfg = get_cfg()
        cfg.merge_from_file(str(path))
        cfg.MODEL.DEVICE = "cpu"
        return build_model(cfg)

    model = built("detectron2", path, build)
    if is_a(model, DENSE):  # a RetinaNet: its dense head's config
        return read_model(model, dense_config, lambda _: None)
    return read_model(model, detector_config, profile)
