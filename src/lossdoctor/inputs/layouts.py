"""Where each framework keeps the heads' weights: the key prefix of every layer, per layout,
for the RPN and box head, the mask head, and the box heads of a cascade's stages."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..vocab import BOX_LAYERS, MASK_CONVS, RPN_LAYERS, WEIGHT, Background, Layer, Layout

# Key prefix of each layer, per layout. The torchvision RPN conv has two spellings (pre-v2, v2).
LAYOUTS: dict[Layout, dict[Layer, tuple[str, ...]]] = {
    Layout.TORCHVISION: {
        Layer.RPN_CONV: ("rpn.head.conv.0.0", "rpn.head.conv"),
        Layer.RPN_LOGITS: ("rpn.head.cls_logits",),
        Layer.RPN_DELTAS: ("rpn.head.bbox_pred",),
        Layer.BOX_FC1: ("roi_heads.box_head.fc6",),
        Layer.BOX_FC2: ("roi_heads.box_head.fc7",),
        Layer.BOX_LOGITS: ("roi_heads.box_predictor.cls_score",),
        Layer.BOX_DELTAS: ("roi_heads.box_predictor.bbox_pred",),
    },
    Layout.MMDET: {
        Layer.RPN_CONV: ("rpn_head.rpn_conv",),
        Layer.RPN_LOGITS: ("rpn_head.rpn_cls",),
        Layer.RPN_DELTAS: ("rpn_head.rpn_reg",),
        Layer.BOX_FC1: ("roi_head.bbox_head.shared_fcs.0",),
        Layer.BOX_FC2: ("roi_head.bbox_head.shared_fcs.1",),
        Layer.BOX_LOGITS: ("roi_head.bbox_head.fc_cls",),
        Layer.BOX_DELTAS: ("roi_head.bbox_head.fc_reg",),
    },
    Layout.DETECTRON2: {
        Layer.RPN_CONV: ("proposal_generator.rpn_head.conv",),
        Layer.RPN_LOGITS: ("proposal_generator.rpn_head.objectness_logits",),
        Layer.RPN_DELTAS: ("proposal_generator.rpn_head.anchor_deltas",),
        Layer.BOX_FC1: ("roi_heads.box_head.fc1",),
        Layer.BOX_FC2: ("roi_heads.box_head.fc2",),
        Layer.BOX_LOGITS: ("roi_heads.box_predictor.cls_score",),
        Layer.BOX_DELTAS: ("roi_heads.box_predictor.bbox_pred",),
    },
}
# Where each layout keeps the background logit.
BACKGROUND = {
    Layout.TORCHVISION: Background.FIRST,
    Layout.MMDET: Background.LAST,
    Layout.DETECTRON2: Background.LAST,
}
# The mask head (Mask R-CNN), per layout; the torchvision convs have two spellings (v2, v1).
MASK_LAYOUTS: dict[Layout, dict[Layer, tuple[str, ...]]] = {
    Layout.TORCHVISION: {
        **{conv: (f"roi_heads.mask_head.{k}.0", f"roi_heads.mask_head.mask_fcn{k + 1}")
           for k, conv in enumerate(MASK_CONVS)},
        Layer.MASK_DECONV: ("roi_heads.mask_predictor.conv5_mask",),
        Layer.MASK_LOGITS: ("roi_heads.mask_predictor.mask_fcn_logits",),
    },
    Layout.MMDET: {
        **{conv: (f"roi_head.mask_head.convs.{k}.conv",) for k, conv in enumerate(MASK_CONVS)},
        Layer.MASK_DECONV: ("roi_head.mask_head.upsample",),
        Layer.MASK_LOGITS: ("roi_head.mask_head.conv_logits",),
    },
    Layout.DETECTRON2: {
        **{conv: (f"roi_heads.mask_head.mask_fcn{k + 1}",) for k, conv in enumerate(MASK_CONVS)},
        Layer.MASK_DECONV: ("roi_heads.mask_head.deconv",),
        Layer.MASK_LOGITS: ("roi_heads.mask_head.predictor",),
    },
}  # fmt: skip
# MMDetection's Cascade Mask R-CNN keeps one mask head per stage ({k}); they are found (by their
# conv_logits) and named, not replayed.
STAGE_MASK_LAYOUTS: dict[Layout, str] = {Layout.MMDET: "roi_head.mask_head.{k}"}
# The box head of cascade stage {k} (Cascade R-CNN), where a layout has stages.
CASCADE_LAYOUTS: dict[Layout, dict[Layer, str]] = {
    Layout.MMDET: {
        Layer.BOX_FC1: "roi_head.bbox_head.{k}.shared_fcs.0",
        Layer.BOX_FC2: "roi_head.bbox_head.{k}.shared_fcs.1",
        Layer.BOX_LOGITS: "roi_head.bbox_head.{k}.fc_cls",
        Layer.BOX_DELTAS: "roi_head.bbox_head.{k}.fc_reg",
    },
    Layout.DETECTRON2: {
        Layer.BOX_FC1: "roi_heads.box_head.{k}.fc1",
        Layer.BOX_FC2: "roi_heads.box_head.{k}.fc2",
        Layer.BOX_LOGITS: "roi_heads.box_predictor.{k}.cls_score",
        Layer.BOX_DELTAS: "roi_heads.box_predictor.{k}.bbox_pred",
    },
}
# more cascade stages than this are not looked for
MAX_STAGES = 8


@dataclass(kw_only=True)
class FoundKeys:
    """The key prefix of every layer a checkpoint has: the RPN, the (first) box head and the
    mask head in ``keys``, the box heads of later cascade stages in ``stages``."""

    keys: dict[Layer, str]
    stages: list[dict[Layer, str]] = field(default_factory=list)
    unreplayed: list[str] = field(default_factory=list)  # heads found and not replayed


def _first(sd: dict, prefixes) -> str | None:
    return next((p for p in prefixes if f"{p}.{WEIGHT}" in sd), None)


def _cascade(sd: dict, layout: Layout) -> list[dict[Layer, str]]:
    """The box heads of every cascade stage, in order (none for a plain Faster R-CNN)."""
    out = []
    for k in range(MAX_STAGES):
        stage = {layer: p.format(k=k) for layer, p in CASCADE_LAYOUTS.get(layout, {}).items()}
        if not stage or any(f"{p}.{WEIGHT}" not in sd for p in stage.values()):
            break
        out.append(stage)
    return out


def _stage_masks(sd: dict, layout: Layout) -> list[str]:
    """The module prefixes of per-stage mask heads (not replayed), in stage order."""
    head = STAGE_MASK_LAYOUTS.get(layout)
    if head is None:
        return []
    found = [head.format(k=k) for k in range(MAX_STAGES)]
    return [p for p in found if f"{p}.conv_logits.{WEIGHT}" in sd]


def _mask(sd: dict, layout: Layout) -> dict[Layer, str]:
    """The mask head's layers (convs as far as they run unbroken), or nothing."""
    table = MASK_LAYOUTS[layout]
    found = {layer: _first(sd, table[layer]) for layer in (Layer.MASK_DECONV, Layer.MASK_LOGITS)}
    if None in found.values():
        return {}
    for conv in MASK_CONVS:
        prefix = _first(sd, table[conv])
        if prefix is None:
            break
        found[conv] = prefix
    return found


def find_keys(sd: dict, layout: Layout) -> FoundKeys | None:
    """Every head layer's key prefix in ``sd`` under ``layout``, or None if the RPN or the box
    head is missing. A cascade's first stage is the box head; its later stages follow."""
    table = LAYOUTS[layout]
    rpn = {layer: _first(sd, table[layer]) for layer in RPN_LAYERS}
    box = {layer: _first(sd, table[layer]) for layer in BOX_LAYERS}
    stages = _cascade(sd, layout)
    if None in rpn.values() or (None in box.values() and not stages):
        return None
    if None in box.values():
        box, stages = stages[0], stages[1:]
    else:
        stages = []
    return FoundKeys(keys={**rpn, **box, **_mask(sd, layout)}, stages=stages,
                     unreplayed=_stage_masks(sd, layout))  # fmt: skip
