"""Where the first NaN/Inf came from: finiteness checked stage by stage, in data-flow order.

Stages: input features → head weights → head outputs → anchors/proposals → regression targets →
per-sample losses → normalizer → level loss → gradients. For each (profile, head, level, term)
whose loss or gradient is non-finite, the first stage that broke, its NaN/+Inf/-Inf counts, one
example (image, anchor or RoI, GT box in the dump) and the cause in words.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..replay.engine import Replay
from .gradients import ProfileGrads

STAGES = (
    "input",
    "weights",
    "outputs",
    "proposals",
    "targets",
    "per-sample loss",
    "normalizer",
    "level loss",
    "gradients",
)
RPN_PARAMS = ("rpn_conv", "rpn_cls", "rpn_reg")
ROI_PARAMS = ("fc1", "fc2", "cls", "reg")
EMPTY_WHAT = {
    "level_sampled": "sampled {unit} at {level}",
    "level_pos": "positives at {level}",
    "sampled": "sampled {unit} in the batch",
    "pos": "positive {unit} in the batch",
    "budget": "images",
    "mmdet_sampler": "images",
    "mmdet_pseudo": "images",
}


@dataclass
class Origin:
    profile: str
    head: str
    level: str
    term: str  # "cls", "bbox" or "grad"
    stage: str
    nan: int
    posinf: int
    neginf: int
    image: int | None
    index: int | None  # anchor index in the level (RPN) or RoI row (RoI)
    gt: int | None  # box index in the dump's gt_boxes[image]
    cause: str

    @property
    def kind(self) -> str:
        return "NaN" if self.nan else "Inf"


def counts(t: Tensor) -> tuple[int, int, int]:
    t = t.detach()
    return int(torch.isnan(t).sum()), int(torch.isposinf(t).sum()), int(torch.isneginf(t).sum())


def _bad(t: Tensor) -> Tensor:
    return ~torch.isfinite(t.detach())


class _Level:
    """The tensors of one (head, level) that the stages look at, for one term."""

    def __init__(self, r: Replay, head: str, lvl: int, term: str, leak: bool):
        self.r, self.head, self.lvl, self.term = r, head, lvl, term
        s = r.samples[head][lvl]
        self.name = s.name
        self.feature = r.features[lvl].detach()
        if head == "rpn":
            out = r.rpn[lvl]
            mask = out.positive if term == "bbox" else out.sampled
            if leak:
                mask = torch.ones_like(mask)
            pred = (
                out.out.deltas.detach()[mask] if term == "bbox" else out.out.logits.detach()[mask]
            )
            self.outputs = pred
            self.where = mask.nonzero()  # (image, anchor) per output row
            self.unsampled_only = leak and not bool(
                _bad(
                    out.out.deltas[out.positive] if term == "bbox" else out.out.logits[out.sampled]
                ).any()
            )
            img, anc = out.positive.nonzero(as_tuple=True)
            self.pos_where = torch.stack([img, anc], 1)
            self.pos_gt = out.matched[img, anc]
            self.refs = None
        else:
            roi = r.roi
            at = (roi.level == lvl).nonzero().flatten()
            fg_at = at[roi.fg_class[at] >= 0]
            rows = fg_at if term == "bbox" else at
            self.outputs = (
                roi.deltas.detach()[rows] if term == "bbox" else roi.cls_logits.detach()[rows]
            )
            self.where = torch.stack([roi.img[rows], rows], 1)
            self.unsampled_only = False
            self.pos_where = torch.stack([roi.img[fg_at], fg_at], 1)
            self.pos_gt = roi.gt_index[fg_at]
            self.refs = roi.boxes[at]
            self.ref_where = torch.stack([roi.img[at], at], 1)
        self.targets = s.box_target.detach()
        self.per_sample = s.cls_loss.detach() if term == "cls" else None


def _example(where: Tensor, bad: Tensor):
    first = bad.nonzero()
    if first.numel() == 0:
        return None, None
    row = int(first[0, 0]) if first.dim() > 1 else int(first[0])
    return int(where[row, 0]), int(where[row, 1])


def _first_stage(
    r: Replay, p, head: str, lvl: int, term: str, value: Tensor, denominator: float
) -> Origin | None:
    lv = _Level(r, head, lvl, term, p.unsampled_leak and head == "rpn")
    unit = "anchors" if head == "rpn" else "RoIs"

    def origin(stage, t, image=None, index=None, gt=None, cause=""):
        n, pi, ni = counts(t)
        return Origin(p.name, head, lv.name, term, stage, n, pi, ni, image, index, gt, cause)

    out_bad = _bad(lv.outputs)
    if out_bad.any():
        fb = _bad(lv.feature)
        if fb.any():
            imgs = fb.flatten(1).any(1).nonzero().flatten().tolist()
            n, pi, ni = counts(lv.feature)
            return origin(
                "input",
                lv.feature,
                image=imgs[0],
                cause=f"input: {'NaN' if n else 'Inf'} already in the {lv.name} features (images {imgs})",
            )
        keys = [
            k
            for k in (RPN_PARAMS if head == "rpn" else ROI_PARAMS)
            for kind in ("weight", "bias")
            if _bad(r.heads.params[f"{k}.{kind}"]).any()
        ]
        if keys:
            names = [f"{r.heads.keys[k]}" for k in dict.fromkeys(keys)]
            t = torch.cat(
                [
                    r.heads.params[f"{k}.{kind}"].detach().flatten()
                    for k in dict.fromkeys(keys)
                    for kind in ("weight", "bias")
                ]
            )
            return origin(
                "weights",
                t,
                cause=f"weights: non-finite checkpoint parameters {', '.join(names)} (training had already diverged)",
            )
        if head == "roi" and _bad(lv.refs).any():
            image, index = _example(lv.ref_where, _bad(lv.refs).any(1))
            return origin(
                "proposals", lv.refs, image, index, cause="proposals: non-finite RoI boxes"
            )
        image, index = _example(lv.where, out_bad.reshape(out_bad.shape[0], -1).any(1))
        if lv.unsampled_only:
            cause = (
                f"outputs: a non-finite prediction at an unsampled anchor of {lv.name} enters through weight 0 "
                "(0 x inf = NaN, MMDetection's weight-multiply)"
            )
        else:
            peak = (
                float(lv.outputs[torch.isfinite(lv.outputs)].abs().max())
                if torch.isfinite(lv.outputs).any()
                else float("nan")
            )
            cause = f"outputs: the {head.upper()} head produced Inf/NaN from finite features and weights (overflow; largest finite |output| {peak:.3g})"
        return origin("outputs", lv.outputs, image, index, cause=cause)
    if term == "bbox" and _bad(lv.targets).any():
        rows = _bad(lv.targets).any(1)
        row = int(rows.nonzero()[0])
        image, index = int(lv.pos_where[row, 0]), int(lv.pos_where[row, 1])
        g = int(lv.pos_gt[row])
        return origin(
            "targets",
            lv.targets,
            image,
            index,
            int(r.gt_sources[image][g]),
            cause=_target_cause(r, head, image, g, index),
        )
    if term == "cls" and lv.per_sample is not None and _bad(lv.per_sample).any():
        return origin(
            "per-sample loss",
            lv.per_sample,
            cause="per-sample loss: the classification loss overflowed",
        )
    if denominator == 0:
        what = EMPTY_WHAT[
            (p.term(f"{head}_{'cls' if term == 'cls' else 'box'}")).normalizer
        ].format(unit=unit, level=lv.name)
        return origin("normalizer", value, cause=f"empty set: mean over 0 {what}")
    return origin(
        "level loss", value, cause="level loss: the sum of finite per-sample losses overflowed"
    )


def _target_cause(r: Replay, head: str, image: int, g: int, index: int) -> str:
    box = r.gt_boxes[image][g]
    j = int(r.gt_sources[image][g])
    w, h = float(box[2] - box[0]), float(box[3] - box[1])
    where = f"(image {image}, box {j})"
    if not bool(torch.isfinite(box).all()):
        return f"target: non-finite GT box coordinates {where}"
    if w == 0 or h == 0:
        return f"target: log(0) from a zero-{'width' if w == 0 else 'height'} GT box {where}"
    if w < 0 or h < 0:
        return (
            f"target: log of a negative size from an inverted GT box {where} (x2 < x1 or y2 < y1)"
        )
    if head == "roi":
        ref = r.roi.boxes[index]
        return f"target: zero-size reference RoI {ref.tolist()} (division by its width or height) {where}"
    return f"target: non-finite regression target {where}"


def trace(r: Replay, grads: dict[str, ProfileGrads] | None = None) -> list[Origin]:
    """The first broken stage of every non-finite (profile, head, level, term)."""
    out: list[Origin] = []
    for name, pl in r.losses.items():
        p = pl.profile
        for head in ("rpn", "roi"):
            for lvl, ll in enumerate(pl.levels[head]):
                broken = False
                for term, value, d in (
                    ("cls", ll.loss_cls, ll.avg_factor),
                    ("bbox", ll.loss_bbox, ll.avg_factor_bbox),
                ):
                    if not bool(torch.isfinite(value.detach())):
                        out.append(_first_stage(r, p, head, lvl, term, value, d))
                        broken = True
                if broken or grads is None:
                    continue
                row = next(g for g in grads[name].levels if g.head == head and g.level == ll.level)
                if row.nonfinite:
                    out.append(
                        Origin(
                            name,
                            head,
                            ll.level,
                            "grad",
                            "gradients",
                            row.nonfinite,
                            0,
                            0,
                            None,
                            None,
                            None,
                            "gradients: the loss is finite but its gradient at the head outputs is not",
                        )
                    )
    return out
