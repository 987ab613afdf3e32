"""A one-stage detector's dense head weights, read from any framework's checkpoint keys.

Each framework keeps two towers of 3x3 convs (each optionally followed by a GroupNorm), then a
classification predictor, a box predictor, and for FCOS/ATSS a centerness predictor. The towers
are found by walking the tower module's children in order: a 4-D weight is a conv, a 1-D weight
after it is that conv's norm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..vocab import (
    BIAS,
    DENSE_BOX_CONVS,
    DENSE_BOX_NORMS,
    DENSE_CLS_CONVS,
    DENSE_CLS_NORMS,
    RUNNING_MEAN,
    WEIGHT,
    DenseKind,
    DenseLayer,
    Layout,
)
from .errors import InputError

BOX_COORDS = 4
CONV_DIMS, NORM_DIMS = 4, 1
# GroupNorm's groups in every framework's dense towers
NORM_GROUPS = 32


@dataclass(frozen=True)
class DenseLayout:
    """Where one framework's dense head keeps its layers (module prefixes)."""

    layout: Layout
    kind: DenseKind
    cls_tower: str
    box_tower: str
    logits: str
    deltas: str
    ctr: str | None = None
    scales: str | None = None  # per-level learnable scalars: ``{scales}.{level}.scale``


DENSE_LAYOUTS = (
    DenseLayout(Layout.TORCHVISION, DenseKind.FCOS, "head.classification_head.conv",
                "head.regression_head.conv", "head.classification_head.cls_logits",
                "head.regression_head.bbox_reg", ctr="head.regression_head.bbox_ctrness"),
    DenseLayout(Layout.TORCHVISION, DenseKind.RETINANET, "head.classification_head.conv",
                "head.regression_head.conv", "head.classification_head.cls_logits",
                "head.regression_head.bbox_reg"),
    DenseLayout(Layout.DETECTRON2, DenseKind.RETINANET, "head.cls_subnet", "head.bbox_subnet",
                "head.cls_score", "head.bbox_pred"),
    DenseLayout(Layout.MMDET, DenseKind.RETINANET, "bbox_head.cls_convs", "bbox_head.reg_convs",
                "bbox_head.retina_cls", "bbox_head.retina_reg"),
    DenseLayout(Layout.MMDET, DenseKind.FCOS, "bbox_head.cls_convs", "bbox_head.reg_convs",
                "bbox_head.conv_cls", "bbox_head.conv_reg", ctr="bbox_head.conv_centerness",
                scales="bbox_head.scales"),
    DenseLayout(Layout.MMDET, DenseKind.ATSS, "bbox_head.cls_convs", "bbox_head.reg_convs",
                "bbox_head.atss_cls", "bbox_head.atss_reg", ctr="bbox_head.atss_centerness",
                scales="bbox_head.scales"),
)  # fmt: skip


@dataclass(kw_only=True)
class DenseWeights:
    """A dense head's parameters under canonical names (``dense_cls_conv1.weight``), the
    checkpoint key each came from, and the per-level scales (MMDetection FCOS/ATSS)."""

    layout: DenseLayout
    params: dict[str, Tensor]
    keys: dict[str, str]  # canonical name → checkpoint key
    scales: list[Tensor] = field(default_factory=list)
    norm: bool = False  # the towers have GroupNorms

    @property
    def kind(self) -> DenseKind:
        return self.layout.kind

    @property
    def num_convs(self) -> int:
        return sum(1 for c in DENSE_CLS_CONVS if f"{c}.{WEIGHT}" in self.params)

    @property
    def channels(self) -> int:
        return self.params[f"{DenseLayer.LOGITS}.{WEIGHT}"].shape[1]

    @property
    def num_anchors(self) -> int:
        return self.params[f"{DenseLayer.DELTAS}.{WEIGHT}"].shape[0] // BOX_COORDS

    @property
    def num_classes(self) -> int:
        return self.params[f"{DenseLayer.LOGITS}.{WEIGHT}"].shape[0] // self.num_anchors

    @property
    def has_ctr(self) -> bool:
        return f"{DenseLayer.CTR}.{WEIGHT}" in self.params

    def tensor(self, layer: DenseLayer, kind: str = WEIGHT) -> Tensor | None:
        return self.params.get(f"{layer}.{kind}")


def _order(key: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def _tower(sd: dict, prefix: str) -> list[tuple[str, str | None]]:
    """(conv module, norm module or None) of each conv of a tower, in order."""
    weights = sorted(
        (k[: -len(WEIGHT) - 1] for k in sd if k.startswith(prefix + ".") and k.endswith(WEIGHT)),
        key=_order,
    )
    out: list[tuple[str, str | None]] = []
    for module in weights:
        dims = sd[f"{module}.{WEIGHT}"].dim()
        if dims == CONV_DIMS:
            out.append((module, None))
        elif dims == NORM_DIMS and out and out[-1][1] is None:
            if f"{module}.{RUNNING_MEAN}" in sd:
                raise InputError(
                    f"{module} is a BatchNorm in the dense head's tower: not replayed (the "
                    "towers are replayed with GroupNorm or no norm)"
                )
            out[-1] = (out[-1][0], module)
        else:
            raise InputError(f"{module}: a {dims}-D weight in the dense head's tower is not a "
                             "conv or a norm; this head design is not replayed")  # fmt: skip
    return out


def find_dense_layout(sd: dict) -> DenseLayout | None:
    """The dense head layout whose predictors ``sd`` holds (FCOS before RetinaNet: they share
    torchvision's names but FCOS adds centerness)."""
    for lay in DENSE_LAYOUTS:
        needed = [lay.logits, lay.deltas] + ([lay.ctr] if lay.ctr else [])
        if all(f"{m}.{WEIGHT}" in sd for m in needed):
            return lay
    return None


def _take(sd, module: str, layer: DenseLayer, params: dict, keys: dict) -> None:
    for kind in (WEIGHT, BIAS):
        key = f"{module}.{kind}"
        if key in sd:
            params[f"{layer}.{kind}"] = sd[key].detach().float()
            keys[f"{layer}.{kind}"] = key


def _scales(sd: dict, prefix: str | None) -> list[Tensor]:
    if prefix is None:
        return []
    found = {}
    for k, v in sd.items():
        m = re.fullmatch(re.escape(prefix) + r"\.(\d+)\.scale", k)
        if m:
            found[int(m.group(1))] = v.detach().float().reshape(())
    return [found[i] for i in sorted(found)]


def dense_weights(sd: dict[str, Tensor], lay: DenseLayout) -> DenseWeights:
    """The dense head of ``sd`` under the layout ``lay``, checked for shape consistency."""
    params: dict[str, Tensor] = {}
    keys: dict[str, str] = {}
    towers = [(_tower(sd, lay.cls_tower), DENSE_CLS_CONVS, DENSE_CLS_NORMS),
              (_tower(sd, lay.box_tower), DENSE_BOX_CONVS, DENSE_BOX_NORMS)]  # fmt: skip
    lengths = {len(t) for t, _, _ in towers}
    if len(lengths) != 1 or not 0 < next(iter(lengths)) <= len(DENSE_CLS_CONVS):
        raise InputError(
            f"the dense head's towers have {' and '.join(str(len(t)) for t, _, _ in towers)} "
            f"convs; replayed: equal towers of 1 to {len(DENSE_CLS_CONVS)} convs"
        )
    norm = set()
    for tower, convs, norms in towers:
        for (conv, nm), c, n in zip(tower, convs, norms):
            _take(sd, conv, c, params, keys)
            norm.add(nm is not None)
            if nm is not None:
                _take(sd, nm, n, params, keys)
    if len(norm) != 1:
        raise InputError("the dense head's convs are normalized in some places and not others; "
                         "replayed: a GroupNorm after every tower conv, or none")  # fmt: skip
    _take(sd, lay.logits, DenseLayer.LOGITS, params, keys)
    _take(sd, lay.deltas, DenseLayer.DELTAS, params, keys)
    if lay.ctr is not None:
        _take(sd, lay.ctr, DenseLayer.CTR, params, keys)
    w = DenseWeights(layout=lay, params=params, keys=keys, scales=_scales(sd, lay.scales),
                     norm=norm == {True})  # fmt: skip
    _check(w)
    return w


def _check_layers(w: DenseWeights) -> None:
    """Every conv 3x3 and taking the head's width; a tower conv keeps it; a norm has one value
    per channel, in groups of NORM_GROUPS."""
    c = w.channels
    for name, t in w.params.items():
        layer, kind = name.rsplit(".", 1)
        tower = layer.startswith(("dense_cls_conv", "dense_box_conv"))
        if t.dim() == CONV_DIMS and (tuple(t.shape[2:]) != (3, 3) or (tower and t.shape[0] != c)):
            raise InputError(f"{w.keys[name]} has shape {list(t.shape)}; the dense head's convs "
                             f"are 3x3{f' and keep {c} channels' if tower else ''}")  # fmt: skip
        if t.dim() == NORM_DIMS and tuple(t.shape) != (c,) and "norm" in layer:
            raise InputError(f"{w.keys[name]} has {t.shape[0]} values for {c} channels")
    if w.norm and c % NORM_GROUPS:
        raise InputError(f"the dense head's GroupNorm needs channels divisible by {NORM_GROUPS}; "
                         f"its convs have {c}")  # fmt: skip
    ctr = w.tensor(DenseLayer.CTR)
    if ctr is not None and ctr.shape[0] != w.num_anchors:
        raise InputError(f"the centerness predictor has {ctr.shape[0]} outputs for "
                         f"{w.num_anchors} anchors per location")  # fmt: skip


def _check(w: DenseWeights) -> None:
    deltas = w.tensor(DenseLayer.DELTAS)
    if deltas.dim() != CONV_DIMS or deltas.shape[0] % BOX_COORDS:
        raise InputError(
            f"{w.keys[f'{DenseLayer.DELTAS}.{WEIGHT}']} has shape {list(deltas.shape)}; a box "
            f"predictor has {BOX_COORDS} outputs per anchor"
        )
    logits = w.tensor(DenseLayer.LOGITS)
    if logits.shape[0] % w.num_anchors or logits.shape[1] != deltas.shape[1]:
        raise InputError(
            f"the classification predictor {list(logits.shape)} does not fit the box predictor "
            f"{list(deltas.shape)} ({w.num_anchors} anchors per location)"
        )
    for name, t in w.params.items():
        if t.dim() == CONV_DIMS and t.shape[1] != w.channels:
            raise InputError(f"{w.keys[name]} takes {t.shape[1]} channels; the dense head's "
                             f"predictors take {w.channels}")  # fmt: skip
    _check_layers(w)


def nonfinite_params(w: DenseWeights) -> dict[str, int]:
    """Checkpoint key → how many of its values are NaN/Inf, for the keys that have any."""
    out = {w.keys[n]: int((~torch.isfinite(t)).sum()) for n, t in w.params.items()}
    for i, s in enumerate(w.scales):
        out[f"{w.layout.scales}.{i}.scale"] = int(not bool(torch.isfinite(s)))
    return {k: v for k, v in out.items() if v}
