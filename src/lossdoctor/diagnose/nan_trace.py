"""Where the first NaN/Inf came from: finiteness checked stage by stage, in data-flow order.

Stages (:class:`~lossdoctor.vocab.Stage`): input features → head weights → head outputs →
anchors/proposals → regression targets → per-sample losses → normalizer → level loss →
gradients. For each (profile, head, level, part) whose loss or gradient is non-finite, the first
stage that broke, its NaN/+Inf/-Inf counts, one example (image, anchor or RoI, GT box in the dump)
and the cause in words.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs.profiles import LossProfile
from ..replay.engine import Replay
from ..vocab import (
    BIAS,
    BOX_LAYERS,
    MASK_LAYERS,
    RPN_LAYERS,
    WEIGHT,
    Head,
    Layer,
    Normalizer,
    Part,
    Stage,
    param,
    term_of,
)
from .gradients import ProfileGrads

# what a normalizer counted, when it counted nothing
EMPTY_WHAT = {
    Normalizer.LEVEL_SAMPLED: "sampled {unit} at {level}",
    Normalizer.LEVEL_POS: "positives at {level}",
    Normalizer.SAMPLED: "sampled {unit} in the batch",
    Normalizer.POS: "positive {unit} in the batch",
    Normalizer.BUDGET: "images",
    Normalizer.MMDET_SAMPLER: "images",
    Normalizer.MMDET_PSEUDO: "images",
    Normalizer.MASK_PIXELS: "mask pixels of positive RoIs in the batch",
}
UNITS = {Head.RPN: "anchors", Head.ROI: "RoIs", Head.MASK: "RoIs"}
# What to change when a loss first breaks at each stage (the nan-empty-mean finding has its own).
CAUSES = {
    Stage.INPUT: "the features are already non-finite: look upstream of the heads (backbone/FPN "
    "BatchNorm eps, fp16 overflow, input normalization, learning rate)",
    Stage.WEIGHTS: "training had diverged before this checkpoint: restart from an earlier one with "
    "a lower LR, a longer warmup or gradient clipping (max_norm=35)",
    Stage.OUTPUTS: "lower the learning rate or enable gradient clipping (max_norm=35); check fp16 "
    "overflow of logits and deltas",
    Stage.PROPOSALS: "proposals decoded to Inf/NaN: clip dw/dh at log(1000/16) when decoding and "
    "lower the learning rate",
    Stage.TARGETS: "drop GT boxes with x2 <= x1 or y2 <= y1 (or under 1 px) after the augmentation "
    "pipeline, before the loss",
    Stage.PER_SAMPLE: "compute the losses in float32 and check the logits' magnitude",
    Stage.NORMALIZER: "normalize by a count that cannot be 0: one shared avg_factor = max(total "
    "sampled, 1)",
    Stage.LEVEL_LOSS: "compute the losses in float32; the per-level sum overflowed",
    Stage.GRADIENTS: "a loss with an undefined gradient at 0 (smooth-L1 with beta 0 written as "
    "0.5 d^2 / beta): use an exact L1",
}


def _layers(head: Head) -> tuple[Layer, ...]:
    """A head's layers (not every head has each)."""
    return {Head.RPN: RPN_LAYERS, Head.ROI: BOX_LAYERS, Head.MASK: MASK_LAYERS}[head]


@dataclass(kw_only=True)
class Origin:
    """The first broken stage of one non-finite (profile, head, level, part); ``part`` None is a
    gradient that is not finite while its loss is."""

    profile: str
    head: Head
    level: str
    part: Part | None
    stage: Stage
    nan: int
    posinf: int
    neginf: int
    image: int | None = None
    index: int | None = None  # anchor index in the level (RPN) or RoI row (RoI)
    gt: int | None = None  # box index in the dump's gt_boxes[image]
    cause: str = ""
    box_stage: int = 0  # the cascade stage of a RoI level
    reason: str = ""  # the cause without where it happened, where it says more than the stage

    @property
    def kind(self) -> str:
        return "NaN" if self.nan else "Inf"


def counts(t: Tensor) -> tuple[int, int, int]:
    t = t.detach()
    return int(torch.isnan(t).sum()), int(torch.isposinf(t).sum()), int(torch.isneginf(t).sum())


def _bad(t: Tensor) -> Tensor:
    return ~torch.isfinite(t.detach())


@dataclass(kw_only=True)
class _View:
    """The tensors of one (head, level, part) that the stages look at. ``where``: (image, anchor
    or RoI row) per output row; ``pos_where`` / ``pos_gt`` likewise per sampled positive."""

    name: str
    feature: Tensor
    outputs: Tensor
    where: Tensor
    unsampled_only: bool
    pos_where: Tensor
    pos_gt: Tensor
    targets: Tensor
    per_sample: Tensor | None
    refs: Tensor | None = None
    ref_where: Tensor | None = None


def _rpn_view(r: Replay, lvl: int, part: Part, leak: bool) -> _View:
    level, s = r.rpn.levels[lvl], r.rpn.samples[lvl]
    box = part is Part.BOX
    mask = level.positive if box else level.sampled
    counted = (level.out.deltas if box else level.out.logits).detach()
    if leak:  # every anchor enters the weight-multiply sum
        mask = torch.ones_like(mask)
    img, anc = level.positive.nonzero(as_tuple=True)
    return _View(
        name=s.name,
        feature=r.features[lvl].detach(),
        outputs=counted[mask],
        where=mask.nonzero(),
        unsampled_only=leak
        and not bool(_bad(counted[level.positive if box else level.sampled]).any()),
        pos_where=torch.stack([img, anc], 1),
        pos_gt=level.matched[img, anc],
        targets=s.box_target.detach(),
        per_sample=None if box else s.cls_loss.detach(),
    )


def _roi_view(r: Replay, lvl: int, part: Part, k: int, box_spec) -> _View:
    roi = r.roi_stages[k]
    s = roi.samples[lvl]
    at = (roi.level == lvl).nonzero().flatten()
    fg_at = at[roi.fg_class[at] >= 0]
    box = part is Part.BOX
    rows = fg_at if box else at
    outputs = (roi.deltas if box else roi.cls_logits).detach()[rows]
    return _View(
        name=s.name,
        feature=r.features[lvl].detach(),
        outputs=outputs,
        where=torch.stack([roi.img[rows], rows], 1),
        unsampled_only=False,
        pos_where=torch.stack([roi.img[fg_at], fg_at], 1),
        pos_gt=roi.gt_index[fg_at],
        targets=s.targets_for(box_spec).detach(),
        per_sample=None if box else s.cls_loss.detach(),
        refs=roi.boxes[at],
        ref_where=torch.stack([roi.img[at], at], 1),
    )


def _example(where: Tensor, bad: Tensor) -> tuple[int | None, int | None]:
    first = bad.nonzero()
    if first.numel() == 0:
        return None, None
    row = int(first[0, 0]) if first.dim() > 1 else int(first[0])
    return int(where[row, 0]), int(where[row, 1])


def _mask_view(r: Replay, lvl: int) -> _View:
    m = r.mask
    at = (r.roi.level[m.rows] == lvl).nonzero().flatten()
    rows = m.rows[at]
    where = torch.stack([r.roi.img[rows], rows], 1)
    return _View(
        name=m.samples[lvl].name,
        feature=r.features[lvl].detach(),
        outputs=m.logits.detach()[at],
        where=where,
        unsampled_only=False,
        pos_where=where,
        pos_gt=r.roi.gt_index[rows],
        targets=m.targets[at],
        per_sample=m.bce.detach()[at],
        refs=r.roi.boxes[rows],
        ref_where=where,
    )


class _Tracer:
    """Builds the origin of one (profile, head, level, part) of one box-head stage."""

    def __init__(self, r: Replay, p: LossProfile, head: Head, lvl: int, part: Part, k: int = 0):
        self.r, self.p, self.head, self.part, self.k = r, p, head, part, k
        self.heads = r.heads.stage(k)
        leak = p.unsampled_leak and head is Head.RPN
        views = {
            Head.RPN: lambda: _rpn_view(r, lvl, part, leak),
            Head.ROI: lambda: _roi_view(r, lvl, part, k, p.roi_box),
            Head.MASK: lambda: _mask_view(r, lvl),
        }
        self.v = views[head]()

    def origin(self, stage: Stage, t: Tensor, image=None, index=None, gt=None, cause="") -> Origin:
        nan, pos, neg = counts(t)
        return Origin(
            profile=self.p.name,
            head=self.head,
            level=self.v.name,
            part=self.part,
            stage=stage,
            nan=nan,
            posinf=pos,
            neginf=neg,
            image=image,
            index=index,
            gt=gt,
            cause=cause,
            box_stage=self.k,
        )

    def first_stage(self, value: Tensor, denominator: float) -> Origin:
        v = self.v
        if _bad(v.outputs).any():
            return self.before_outputs() or self.outputs()
        if self.part is Part.BOX and _bad(v.targets).any():
            return self.targets()
        if v.per_sample is not None and _bad(v.per_sample).any():
            cause = "per-sample loss: the classification loss overflowed"
            return self.origin(Stage.PER_SAMPLE, v.per_sample, cause=cause)
        if denominator == 0:
            spec = self.p.term(term_of(self.head, self.part))
            what = EMPTY_WHAT[spec.normalizer].format(unit=UNITS[self.head], level="{level}")
            o = self.origin(
                Stage.NORMALIZER, value, cause=f"empty set: mean over 0 {what}".format(level=v.name)
            )
            o.reason = f"a mean over 0 {what}".format(level="its level")
            return o
        cause = "level loss: the sum of finite per-sample losses overflowed"
        return self.origin(Stage.LEVEL_LOSS, value, cause=cause)

    def before_outputs(self) -> Origin | None:
        """Broken outputs whose cause is upstream: the features, the weights, the RoI boxes."""
        v, heads = self.v, self.heads
        if _bad(v.feature).any():
            imgs = _bad(v.feature).flatten(1).any(1).nonzero().flatten().tolist()
            kind = "NaN" if counts(v.feature)[0] else "Inf"
            cause = f"input: {kind} already in the {v.name} features (images {imgs})"
            return self.origin(Stage.INPUT, v.feature, image=imgs[0], cause=cause)
        names = [param(x, kind) for x in _layers(self.head) for kind in (WEIGHT, BIAS)]
        broken = [n for n in names if n in heads.params and _bad(heads.params[n]).any()]
        if broken:
            layers = list(dict.fromkeys(heads.keys[Layer(n.split(".")[0])] for n in broken))
            t = torch.cat([heads.params[n].detach().flatten() for n in broken])
            cause = (
                f"weights: non-finite checkpoint parameters {', '.join(layers)} "
                "(training had already diverged)"
            )
            return self.origin(Stage.WEIGHTS, t, cause=cause)
        if v.refs is not None and _bad(v.refs).any():
            image, index = _example(v.ref_where, _bad(v.refs).any(1))
            cause = "proposals: non-finite RoI boxes"
            return self.origin(Stage.PROPOSALS, v.refs, image, index, cause=cause)
        return None

    def outputs(self) -> Origin:
        v = self.v
        bad = _bad(v.outputs)
        image, index = _example(v.where, bad.reshape(bad.shape[0], -1).any(1))
        if v.unsampled_only:
            cause = (
                f"outputs: a non-finite prediction at an unsampled anchor of {v.name} enters "
                "through weight 0 (0 x inf = NaN, MMDetection's weight-multiply)"
            )
        else:
            finite = v.outputs[torch.isfinite(v.outputs)]
            peak = float(finite.abs().max()) if finite.numel() else float("nan")
            cause = (
                f"outputs: the {self.head.upper()} head produced Inf/NaN from finite features "
                f"and weights (overflow; largest finite |output| {peak:.3g})"
            )
        return self.origin(Stage.OUTPUTS, v.outputs, image, index, cause=cause)

    def targets(self) -> Origin:
        v = self.v
        row = int(_bad(v.targets).any(1).nonzero()[0])
        image, index = int(v.pos_where[row, 0]), int(v.pos_where[row, 1])
        g = int(v.pos_gt[row])
        cause = _target_cause(self.r, self.head, image, g, index)
        return self.origin(
            Stage.TARGETS, v.targets, image, index, self.r.gt.dump_index(image, g), cause
        )


def _target_cause(r: Replay, head: Head, image: int, g: int, index: int) -> str:
    box = r.gt.boxes[image][g]
    w, h = float(box[2] - box[0]), float(box[3] - box[1])
    where = f"(image {image}, box {r.gt.dump_index(image, g)})"
    if not bool(torch.isfinite(box).all()):
        return f"target: non-finite GT box coordinates {where}"
    if w == 0 or h == 0:
        return f"target: log(0) from a zero-{'width' if w == 0 else 'height'} GT box {where}"
    if w < 0 or h < 0:
        return (
            f"target: log of a negative size from an inverted GT box {where} (x2 < x1 or y2 < y1)"
        )
    if head is Head.ROI:
        ref = r.roi.boxes[index].tolist()
        return f"target: zero-size reference RoI {ref} (division by its width or height) {where}"
    return f"target: non-finite regression target {where}"


def _gradient_origin(profile: str, head: Head, level: str, nonfinite: int) -> Origin:
    cause = "gradients: the loss is finite but its gradient at the head outputs is not"
    return Origin(
        profile=profile,
        head=head,
        level=level,
        part=None,
        stage=Stage.GRADIENTS,
        nan=nonfinite,
        posinf=0,
        neginf=0,
        cause=cause,
    )


def _parts(head: Head, ll) -> tuple:
    """(part, value, normalizer) of each term a level has."""
    if head is Head.MASK:
        return ((Part.MASK, ll.loss_mask, ll.avg_factor),)
    return ((Part.CLS, ll.loss_cls, ll.avg_factor), (Part.BOX, ll.loss_bbox, ll.avg_factor_bbox))


def _levels(pl) -> list[tuple[Head, int, list]]:
    """(head, box stage, level losses) of every head and cascade stage."""
    first = [(head, 0, levels) for head, levels in pl.levels.items()]
    return first + [(Head.ROI, k, levels) for k, levels in enumerate(pl.stages, start=1)]


def trace(r: Replay, grads: dict[str, ProfileGrads] | None = None) -> list[Origin]:
    """The first broken stage of every non-finite (profile, head, box stage, level, part)."""
    out: list[Origin] = []
    for name, pl in r.losses.items():
        for head, k, levels in _levels(pl):
            for lvl, ll in enumerate(levels):
                broken = [x for x in _parts(head, ll) if not bool(torch.isfinite(x[1].detach()))]
                for part, value, d in broken:
                    out.append(_Tracer(r, pl.profile, head, lvl, part, k).first_stage(value, d))
                if broken or grads is None:
                    continue
                row = next(g for g in grads[name].levels
                           if (g.head, g.level, g.stage) == (head, ll.level, k))  # fmt: skip
                if row.nonfinite:
                    out.append(_gradient_origin(name, head, ll.level, row.nonfinite))
    return out
