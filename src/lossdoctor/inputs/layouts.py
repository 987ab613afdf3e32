"""Where each framework keeps the heads' weights: the key prefix of every layer, per layout,
for the RPN and box head, the mask head, and the box heads of a cascade's stages."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..vocab import (
    BOX_CONVS,
    BOX_FCS,
    BOX_NORMS,
    DH_BLOCKS,
    DH_RES,
    MASK_CONVS,
    MASK_NORMS,
    NORM_OF,
    RES5_BLOCKS,
    RES5_SHORTCUT,
    RPN_LAYERS,
    WEIGHT,
    Background,
    Layer,
    Layout,
)

# the norm modules' names: MMDetection's ConvModule names its norm by kind
_MM_NORMS = ("gn", "bn")

# Key prefix of each layer, per layout. The torchvision RPN conv has two spellings (pre-v2, v2);
# the first 3x3 conv of a two-conv RPN (torchvision v2, MMDetection num_convs, Detectron2
# conv_dims) is spelled its own way.
LAYOUTS: dict[Layout, dict[Layer, tuple[str, ...]]] = {
    Layout.TORCHVISION: {
        Layer.RPN_CONV: ("rpn.head.conv.0.0", "rpn.head.conv"),
        Layer.RPN_CONV2: ("rpn.head.conv.1.0",),
        Layer.RPN_LOGITS: ("rpn.head.cls_logits",),
        Layer.RPN_DELTAS: ("rpn.head.bbox_pred",),
        **{c: (f"roi_heads.box_head.{k}.0",) for k, c in enumerate(BOX_CONVS)},
        **{n: (f"roi_heads.box_head.{k}.1",) for k, n in enumerate(BOX_NORMS)},
        Layer.BOX_FC1: ("roi_heads.box_head.fc6",),
        Layer.BOX_FC2: ("roi_heads.box_head.fc7",),
        Layer.BOX_LOGITS: ("roi_heads.box_predictor.cls_score",),
        Layer.BOX_DELTAS: ("roi_heads.box_predictor.bbox_pred",),
    },
    Layout.MMDET: {
        Layer.RPN_CONV: ("rpn_head.rpn_conv", "rpn_head.rpn_conv.0.conv"),
        Layer.RPN_CONV2: ("rpn_head.rpn_conv.1.conv",),
        Layer.RPN_LOGITS: ("rpn_head.rpn_cls",),
        Layer.RPN_DELTAS: ("rpn_head.rpn_reg",),
        **{c: (f"roi_head.bbox_head.shared_convs.{k}.conv",) for k, c in enumerate(BOX_CONVS)},
        **{n: tuple(f"roi_head.bbox_head.shared_convs.{k}.{m}" for m in _MM_NORMS)
           for k, n in enumerate(BOX_NORMS)},
        Layer.BOX_FC1: ("roi_head.bbox_head.shared_fcs.0",),
        Layer.BOX_FC2: ("roi_head.bbox_head.shared_fcs.1",),
        Layer.BOX_LOGITS: ("roi_head.bbox_head.fc_cls",),
        Layer.BOX_DELTAS: ("roi_head.bbox_head.fc_reg",),
    },
    Layout.DETECTRON2: {
        Layer.RPN_CONV: ("proposal_generator.rpn_head.conv",
                         "proposal_generator.rpn_head.conv.conv0"),
        Layer.RPN_CONV2: ("proposal_generator.rpn_head.conv.conv1",),
        Layer.RPN_LOGITS: ("proposal_generator.rpn_head.objectness_logits",),
        Layer.RPN_DELTAS: ("proposal_generator.rpn_head.anchor_deltas",),
        **{c: (f"roi_heads.box_head.conv{k + 1}",) for k, c in enumerate(BOX_CONVS)},
        **{n: (f"roi_heads.box_head.conv{k + 1}.norm",) for k, n in enumerate(BOX_NORMS)},
        Layer.BOX_FC1: ("roi_heads.box_head.fc1",),
        Layer.BOX_FC2: ("roi_heads.box_head.fc2",),
        Layer.BOX_LOGITS: ("roi_heads.box_predictor.cls_score",),
        Layer.BOX_DELTAS: ("roi_heads.box_predictor.bbox_pred",),
    },
}  # fmt: skip
# A C4 model's res5 box head: each block's convs and norms, the first block's shortcut.
RES5_LAYOUTS: dict[Layout, dict[Layer, str]] = {
    Layout.MMDET: {
        **{c: f"roi_head.shared_head.layer4.{b}.conv{i + 1}"
           for b, block in enumerate(RES5_BLOCKS) for i, c in enumerate(block)},
        **{NORM_OF[c]: f"roi_head.shared_head.layer4.{b}.bn{i + 1}"
           for b, block in enumerate(RES5_BLOCKS) for i, c in enumerate(block)},
        RES5_SHORTCUT: "roi_head.shared_head.layer4.0.downsample.0",
        NORM_OF[RES5_SHORTCUT]: "roi_head.shared_head.layer4.0.downsample.1",
    },
    Layout.DETECTRON2: {
        **{c: f"roi_heads.res5.{b}.conv{i + 1}"
           for b, block in enumerate(RES5_BLOCKS) for i, c in enumerate(block)},
        **{NORM_OF[c]: f"roi_heads.res5.{b}.conv{i + 1}.norm"
           for b, block in enumerate(RES5_BLOCKS) for i, c in enumerate(block)},
        RES5_SHORTCUT: "roi_heads.res5.0.shortcut",
        NORM_OF[RES5_SHORTCUT]: "roi_heads.res5.0.shortcut.norm",
    },
}  # fmt: skip
# MMDetection's double head (DoubleConvFCBBoxHead): the regression branch's residual block and
# bottlenecks (ConvModule's conv and bn, mmdet's Bottleneck convN and bnN); its fcs are
# fc_branch.0 and .1
_DH = "roi_head.bbox_head"
DOUBLE_HEAD_LAYOUTS: dict[Layout, dict[Layer, str]] = {
    Layout.MMDET: {
        **{c: f"{_DH}.res_block.{n}.conv"
           for c, n in zip(DH_RES, ("conv1", "conv2", "conv_identity"))},
        **{NORM_OF[c]: f"{_DH}.res_block.{n}.bn"
           for c, n in zip(DH_RES, ("conv1", "conv2", "conv_identity"))},
        **{c: f"{_DH}.conv_branch.{k}.conv{i + 1}"
           for k, block in enumerate(DH_BLOCKS) for i, c in enumerate(block)},
        **{NORM_OF[c]: f"{_DH}.conv_branch.{k}.bn{i + 1}"
           for k, block in enumerate(DH_BLOCKS) for i, c in enumerate(block)},
        Layer.BOX_FC1: f"{_DH}.fc_branch.0",
        Layer.BOX_FC2: f"{_DH}.fc_branch.1",
    },
}  # fmt: skip
# the mask head's module, which a C4 model runs on res5's features (not replayed)
MASK_ROOTS: dict[Layout, str] = {
    Layout.TORCHVISION: "roi_heads.mask_head",
    Layout.MMDET: "roi_head.mask_head",
    Layout.DETECTRON2: "roi_heads.mask_head",
}
# torchvision's FastRCNNConvFCHead (v2) is one nn.Sequential: its conv blocks, a Flatten, then
# each fc and its ReLU; the fcs are the numbered children with a 2-d weight, in order.
SEQUENTIAL_BOX_HEADS: dict[Layout, str] = {Layout.TORCHVISION: "roi_heads.box_head"}
# a Sequential's children are looked for up to this index
MAX_CHILDREN = 16
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
        **{n: (f"roi_heads.mask_head.{k}.1",) for k, n in enumerate(MASK_NORMS)},
        Layer.MASK_DECONV: ("roi_heads.mask_predictor.conv5_mask",),
        Layer.MASK_LOGITS: ("roi_heads.mask_predictor.mask_fcn_logits",),
    },
    Layout.MMDET: {
        **{conv: (f"roi_head.mask_head.convs.{k}.conv",) for k, conv in enumerate(MASK_CONVS)},
        **{n: tuple(f"roi_head.mask_head.convs.{k}.{m}" for m in _MM_NORMS)
           for k, n in enumerate(MASK_NORMS)},
        Layer.MASK_DECONV: ("roi_head.mask_head.upsample",),
        Layer.MASK_LOGITS: ("roi_head.mask_head.conv_logits",),
    },
    Layout.DETECTRON2: {
        **{conv: (f"roi_heads.mask_head.mask_fcn{k + 1}",) for k, conv in enumerate(MASK_CONVS)},
        **{n: (f"roi_heads.mask_head.mask_fcn{k + 1}.norm",) for k, n in enumerate(MASK_NORMS)},
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

# The modules of the two stages, per layout: every tensor under them must be one the replay runs,
# or belong to a head it names as not replayed (PARTIAL); anything else refuses the checkpoint.
HEAD_ROOTS: dict[Layout, tuple[str, ...]] = {
    Layout.TORCHVISION: ("rpn.", "roi_heads."),
    Layout.MMDET: ("rpn_head.", "roi_head."),
    Layout.DETECTRON2: ("proposal_generator.", "roi_heads."),
}
# Heads beside the box head whose own losses are not replayed: their modules → what they are.
# The box and RPN terms do not depend on them (they run on their own pooled features).
PARTIAL: dict[Layout, dict[str, str]] = {
    Layout.TORCHVISION: {
        "roi_heads.keypoint_head": "the keypoint head",
        "roi_heads.keypoint_predictor": "the keypoint predictor",
    },
    Layout.MMDET: {},
    Layout.DETECTRON2: {"roi_heads.keypoint_head": "the keypoint head"},
}
# Head designs the replay does not run, named by a module they have (checked in this order).
DESIGNS: dict[Layout, tuple[tuple[str, str], ...]] = {
    Layout.TORCHVISION: (
        ("rpn.head.conv.2", "an RPN head with more than 2 convs"),
        ("roi_heads.box_head.4.0", "box head FastRCNNConvFCHead with more than 4 convs"),
        ("roi_heads.mask_head.4.0", "a mask head with more than 4 convs"),
    ),
    Layout.MMDET: (
        ("rpn_head.rpn_conv.2", "an RPN head with more than 2 convs (RPNHead num_convs > 2)"),
        ("roi_head.bbox_head.shared_convs", "box head with more than 4 shared convs"),
        ("roi_head.bbox_head.fc_branch", "box head DoubleConvFCBBoxHead with more than 2 fcs"),
        ("roi_head.bbox_head.conv_branch", "box head DoubleConvFCBBoxHead with more than 4 "
         "convs"),
        ("roi_head.bbox_head.cls_fcs", "box head with separate classification fcs "
         "(a ConvFCBBoxHead variant)"),
        ("roi_head.bbox_head.reg_fcs", "box head with separate regression fcs "
         "(a ConvFCBBoxHead variant)"),
        ("roi_head.bbox_head.cls_convs", "box head with separate classification convs"),
        ("roi_head.bbox_head.reg_convs", "box head with separate regression convs"),
        ("roi_head.semantic_head", "a semantic head (HTC, SCNet)"),
        ("roi_head.mask_iou_head", "a MaskIoU head (Mask Scoring R-CNN)"),
        ("roi_head.grid_head", "a grid head (Grid R-CNN)"),
        ("roi_head.point_head", "a point head (PointRend)"),
    ),
    Layout.DETECTRON2: (
        ("proposal_generator.rpn_head.conv.conv2", "an RPN head with more than 2 convs"),
        ("roi_heads.res5", "Res5ROIHeads with a res5 unlike ResNet's (3 bottleneck blocks)"),
        ("roi_heads.box_head.conv5", "box head FastRCNNConvFCHead with more than 4 convs"),
        ("roi_heads.box_head.fc3", "box head FastRCNNConvFCHead with more than 2 fcs"),
    ),
}  # fmt: skip
# One-stage detectors, named by a module of their dense head.
ONE_STAGE: tuple[tuple[str, str], ...] = (
    ("head.classification_head", "torchvision RetinaNet/FCOS"),
    ("bbox_head.", "an MMDetection one-stage detector"),
    ("head.cls_score", "Detectron2 RetinaNet"),
    ("head.cls_subnet", "Detectron2 RetinaNet"),
)
# how many of a refused head's own layers the message lists
SHOWN = 4


@dataclass(kw_only=True)
class FoundKeys:
    """The key prefix of every layer a checkpoint has: the RPN, the (first) box head and the
    mask head in ``keys``, the box heads of later cascade stages in ``stages``."""

    keys: dict[Layer, str]
    stages: list[dict[Layer, str]] = field(default_factory=list)
    # heads found and not replayed: "module (what it is)"
    unreplayed: list[str] = field(default_factory=list)

    def prefixes(self) -> set[str]:
        """Every replayed layer's key prefix, every stage."""
        return {p for keys in (self.keys, *self.stages) for p in keys.values()}


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
    return [f"{p} (one mask head per cascade stage)" for p in found
            if f"{p}.conv_logits.{WEIGHT}" in sd]  # fmt: skip


def _convs(sd: dict, table: dict[Layer, tuple[str, ...]], convs) -> dict[Layer, str]:
    """Convs as far as they run unbroken, each with its norm where it has one."""
    found = {}
    for conv in convs:
        prefix = _first(sd, table[conv])
        if prefix is None:
            break
        found[conv] = prefix
        norm = _first(sd, table.get(NORM_OF.get(conv), ()))
        if norm is not None:
            found[NORM_OF[conv]] = norm
    return found


def _mask(sd: dict, layout: Layout) -> dict[Layer, str]:
    """The mask head's layers (convs as far as they run unbroken), or nothing."""
    table = MASK_LAYOUTS[layout]
    found = {layer: _first(sd, table[layer]) for layer in (Layer.MASK_DECONV, Layer.MASK_LOGITS)}
    if None in found.values():
        return {}
    return found | _convs(sd, table, MASK_CONVS)


def _sequential_fcs(sd: dict, layout: Layout) -> dict[Layer, str]:
    """The fcs of a box head kept as one nn.Sequential (SEQUENTIAL_BOX_HEADS), in order."""
    root = SEQUENTIAL_BOX_HEADS.get(layout)
    if root is None:
        return {}
    children = (f"{root}.{i}" for i in range(MAX_CHILDREN))
    fcs = [p for p in children if getattr(sd.get(f"{p}.{WEIGHT}"), "ndim", 0) == 2]
    return dict(zip(BOX_FCS, fcs)) if len(fcs) <= len(BOX_FCS) else {}


def _box(sd: dict, layout: Layout) -> dict[Layer, str] | None:
    """The box head's layers: its convs (and norms), one or two fcs, the two predictors; None
    where the fc1 or a predictor is missing."""
    table = LAYOUTS[layout]
    fcs = {fc: p for fc in BOX_FCS if (p := _first(sd, table[fc])) is not None}
    fcs = fcs or _sequential_fcs(sd, layout)
    predictors = {x: _first(sd, table[x]) for x in (Layer.BOX_LOGITS, Layer.BOX_DELTAS)}
    if None in predictors.values():
        return None
    if Layer.BOX_FC1 not in fcs:
        res5 = RES5_LAYOUTS.get(layout, {})
        if res5 and all(f"{p}.{WEIGHT}" in sd for p in res5.values()):
            return {**res5, **predictors}
        return _double_head(sd, layout, predictors)
    return _convs(sd, table, BOX_CONVS) | fcs | predictors


def _double_head(sd: dict, layout: Layout, predictors: dict) -> dict[Layer, str] | None:
    """A double head's layers: the residual block, the bottlenecks as far as they run
    unbroken, the fc branch (None where the block or the first fc is missing)."""
    table = DOUBLE_HEAD_LAYOUTS.get(layout, {})
    res = [*DH_RES, *(NORM_OF[c] for c in DH_RES), Layer.BOX_FC1]
    if not table or any(f"{table[x]}.{WEIGHT}" not in sd for x in res):
        return None
    found = {x: table[x] for x in res}
    for block in DH_BLOCKS:
        layers = [*block, *(NORM_OF[c] for c in block)]
        if any(f"{table[x]}.{WEIGHT}" not in sd for x in layers):
            break
        found |= {x: table[x] for x in layers}
    if f"{table[Layer.BOX_FC2]}.{WEIGHT}" in sd:
        found[Layer.BOX_FC2] = table[Layer.BOX_FC2]
    return found | predictors


def find_keys(sd: dict, layout: Layout) -> FoundKeys | None:
    """Every head layer's key prefix in ``sd`` under ``layout``, or None if the RPN or the box
    head is missing. A cascade's first stage is the box head; its later stages follow."""
    table = LAYOUTS[layout]
    rpn = {layer: _first(sd, table[layer]) for layer in RPN_LAYERS}
    if rpn[Layer.RPN_CONV2] is None:
        del rpn[Layer.RPN_CONV2]  # one conv
    box = _box(sd, layout)
    stages = _cascade(sd, layout)
    if None in rpn.values() or (box is None and not stages):
        return None
    if box is None:
        box, stages = stages[0], stages[1:]
    else:
        stages = []
    partial = [f"{m} ({what})" for m, what in PARTIAL[layout].items() if _under(sd, m)]
    mask = _mask(sd, layout)
    if mask and Layer.RES5_0_CONV1 in box:  # a C4 model's mask head runs on res5's features
        mask = {}
        partial.append(f"{MASK_ROOTS[layout]} (a mask head on res5's features: C4)")
    return FoundKeys(keys={**rpn, **box, **mask}, stages=stages,
                     unreplayed=_stage_masks(sd, layout) + partial)  # fmt: skip


def _under(sd: dict, module: str) -> bool:
    return any(k.startswith(f"{module}.") for k in sd)


def _module(key: str) -> str:
    return key.rsplit(".", 1)[0]


def _extra(sd: dict, layout: Layout, found: FoundKeys | None) -> list[str]:
    """The modules under the heads' roots with tensors the replay does not run."""
    used = found.prefixes() if found is not None else set()
    named = [*PARTIAL[layout], *(u.split(" ", 1)[0] for u in (found.unreplayed if found else ()))]
    skip = tuple(f"{m}." for m in named)
    return sorted({_module(k) for k in sd
                   if k.startswith(HEAD_ROOTS[layout]) and _module(k) not in used
                   and not k.startswith(skip)})  # fmt: skip


def _named(extra: list[str], layout: Layout) -> str | None:
    for module, name in DESIGNS[layout]:
        if any(m == module or m.startswith(f"{module}.") for m in extra):
            return name
    return None


def _listed(extra: list[str]) -> str:
    more = len(extra) - SHOWN
    shown = ", ".join(extra[:SHOWN]) + (f" and {more} more" if more > 0 else "")
    return f"head layers lossdoctor does not replay ({shown})"


def unreplayed_design(sd: dict, layout: Layout, found: FoundKeys) -> str | None:
    """What in ``sd``'s heads the replay would not run, named (None: every head tensor is one
    the replay runs, or one of a head named as not replayed)."""
    extra = _extra(sd, layout, found)
    return (_named(extra, layout) or _listed(extra)) if extra else None


def headless_design(sd: dict, layouts) -> str | None:
    """For a state_dict in which no layout finds an RPN and a box head: the head design it has
    instead, named where a layout knows it, else its layers listed (None: no head modules)."""
    extras = {layout: _extra(sd, layout, None) for layout in layouts}
    named = [_named(extra, layout) for layout, extra in extras.items() if extra]
    listed = [_listed(extra) for extra in extras.values() if extra]
    return next((n for n in named if n), None) or next(iter(listed), None)


def one_stage(sd: dict) -> str | None:
    """The name of a one-stage detector ``sd`` is the checkpoint of, if it is one."""
    return next((name for module, name in ONE_STAGE if any(k.startswith(module) for k in sd)), None)
