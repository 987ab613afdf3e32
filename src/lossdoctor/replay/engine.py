"""The replay: one forward of both heads on a dumped batch, shared samples, per-profile losses.

Steps (DESIGN "The replay"): RPN head on every level (features require grad); anchors; assign
and sample per image once, seeded; proposals from the detached RPN outputs (or the dump's);
RoI assignment and sampling with GT added; multi-scale RoIAlign; box head; then each profile's
normalization over the same per-sample losses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..inputs.batch import Batch
from ..inputs.checkpoint import HeadWeights
from ..inputs.config import DetectorConfig
from ..inputs.profiles import LossProfile, TermSpec
from ..vocab import Normalizer
from .anchors import level_anchors, valid_flags
from .boxes import encode
from .heads import RpnLevelOutput, box_hidden, box_predict, rpn_head
from .losses import bce_loss, box_loss, ce_loss, normalize
from .matcher import IGNORED, POSITIVE, match
from .proposals import image_proposals
from .roi_align import map_levels, multiscale_roi_align
from .sampler import sample

HEADS = ("rpn", "roi")


@dataclass
class LevelSamples:
    """The samples of one (head, level) that enter the losses.

    cls_loss: Tensor[S] per-sample classification loss of the sampled samples; cls_pos: Tensor[S]
    bool; box_pred / box_target: Tensor[P, 4] of the sampled positives; cls_leak / box_leak: 0 or
    NaN, what unsampled predictions add under weight-multiply semantics (0 * inf = NaN; RPN only).
    """

    name: str
    candidates: int
    ignored: int
    cls_loss: Tensor
    cls_pos: Tensor
    box_pred: Tensor
    box_target: Tensor
    cls_leak: Tensor
    box_leak: Tensor
    _box_cache: dict = field(default_factory=dict, repr=False)

    @property
    def sampled(self) -> int:
        return int(self.cls_pos.numel())

    @property
    def pos(self) -> int:
        return int(self.cls_pos.sum())

    def box_loss(self, term: TermSpec) -> Tensor:
        """Per-positive box loss Tensor[P] under the term's loss kind (cached per kind)."""
        key = (term.loss, term.beta)
        if key not in self._box_cache:
            self._box_cache[key] = box_loss(self.box_pred, self.box_target, term.loss, term.beta)
        return self._box_cache[key]


@dataclass
class HeadCounts:
    """What the normalizers count, for one head: per level, and per image."""

    sampled: list[int]  # per level
    pos: list[int]  # per level
    budget: int  # sampler batch size x images
    img_pos: list[int]
    img_neg: list[int]

    def count(self, normalizer: Normalizer, level: int) -> float:
        """The count ``normalizer`` divides by at ``level``."""
        return COUNTS[normalizer](self, level)


# One entry per Normalizer member (a test checks that every member has one).
COUNTS = {
    Normalizer.LEVEL_SAMPLED: lambda c, level: c.sampled[level],
    Normalizer.LEVEL_POS: lambda c, level: c.pos[level],
    Normalizer.SAMPLED: lambda c, level: sum(c.sampled),
    Normalizer.POS: lambda c, level: sum(c.pos),
    Normalizer.BUDGET: lambda c, level: c.budget,
    Normalizer.MMDET_SAMPLER: lambda c, level: sum(
        max(p, 1) + max(n, 1) for p, n in zip(c.img_pos, c.img_neg)
    ),
    Normalizer.MMDET_PSEUDO: lambda c, level: sum(max(p, 1) for p in c.img_pos),
}


@dataclass
class LevelLoss:
    """One (profile, head, level): the two terms and what they were divided by."""

    level: str
    loss_cls: Tensor
    loss_bbox: Tensor
    avg_factor: float
    avg_factor_bbox: float
    sample_weight: float
    sample_weight_bbox: float


@dataclass
class ProfileLosses:
    profile: LossProfile
    levels: dict[str, list[LevelLoss]]  # head -> per level

    def term(self, head: str, kind: str) -> Tensor:
        """Total of one term over levels: kind 'cls' or 'bbox'."""
        return sum((getattr(l, f"loss_{kind}") for l in self.levels[head]), torch.zeros(()))

    @property
    def terms(self) -> dict[str, Tensor]:
        return {
            "rpn_cls": self.term("rpn", "cls"),
            "rpn_box": self.term("rpn", "bbox"),
            "roi_cls": self.term("roi", "cls"),
            "roi_box": self.term("roi", "bbox"),
        }

    @property
    def total(self) -> Tensor:
        return sum(self.terms.values())


@dataclass
class RpnLevel:
    """RPN state of one level. Tensors [N, A_l] are per image and anchor (y, x, a order)."""

    name: str
    stride: int
    anchors: Tensor  # [A_l, 4]
    out: RpnLevelOutput
    labels: Tensor  # int8 1/0/-1 from the matcher
    matched: Tensor  # int64 GT index
    sampled: Tensor  # bool
    positive: Tensor  # bool, sampled positives
    bce: Tensor  # per-anchor BCE, all anchors


@dataclass
class RoiSet:
    """The sampled RoIs of the batch. boxes Tensor[R, 4]; img, level, fg_class (-1 = background),
    gt_index (-1 = none) Tensor[R]; is_gt Tensor[R] bool; targets Tensor[R, 4] (positives only valid)."""

    boxes: Tensor
    img: Tensor
    level: Tensor
    fg_class: Tensor
    gt_index: Tensor
    is_gt: Tensor
    targets: Tensor
    candidates_per_level: list[int]
    pooled: Tensor | None = None
    hidden1: Tensor | None = None
    hidden: Tensor | None = None
    cls_logits: Tensor | None = None
    deltas: Tensor | None = None  # [R, reg_classes, 4]
    ce: Tensor | None = None


@dataclass
class ImageStats:
    image: int
    gt: int
    gt_ignored: int
    gt_bad_label: int
    gt_nonfinite: int
    gt_without_pos: int
    gt_best_iou_min: float
    gt_best_iou_mean: float
    rpn_pos_candidates: int
    rpn_pos: int
    rpn_neg: int
    proposals: int
    proposals_nonfinite: int
    roi_pos: int
    roi_neg: int


@dataclass
class Replay:
    """Everything the diagnosis and the report need, kept in memory (tensors keep their graph)."""

    heads: HeadWeights
    batch: Batch
    config: DetectorConfig
    seed: int
    sample_all: bool
    features: list[Tensor]
    rpn: list[RpnLevel]
    roi: RoiSet
    samples: dict[str, list[LevelSamples]]
    counts: dict[str, HeadCounts]
    images: list[ImageStats]
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    gt_sources: list[Tensor]  # index of each usable GT in the dump's gt_boxes[i]
    gt_best_iou: list[Tensor]
    gt_has_pos: list[Tensor]  # per usable GT: has at least one positive anchor candidate
    dropped_labels: list[tuple[int, int, int]]
    losses: dict[str, ProfileLosses] = field(default_factory=dict)

    @property
    def roi_level_names(self) -> list[str]:
        return self.batch.levels[: len(self.roi.candidates_per_level)]

    def level_rows(self) -> list[dict]:
        """The ``levels`` table: one row per (profile, head, level) plus an ``all`` row per (profile, head)."""
        rows = []
        for name, pl in self.losses.items():
            total = float(pl.total.detach())
            for head in HEADS:
                head_rows = []
                for s, ll in zip(self.samples[head], pl.levels[head]):
                    cls, box = float(ll.loss_cls.detach()), float(ll.loss_bbox.detach())
                    head_rows.append(
                        {
                            "profile": name,
                            "head": head,
                            "level": s.name,
                            "anchors": s.candidates,
                            "pos": s.pos,
                            "neg": s.sampled - s.pos,
                            "ignored": s.ignored,
                            "sampled": s.sampled,
                            "avg_factor": ll.avg_factor,
                            "avg_factor_bbox": ll.avg_factor_bbox,
                            "sample_weight": ll.sample_weight,
                            "sample_weight_bbox": ll.sample_weight_bbox,
                            "loss_cls": cls,
                            "loss_bbox": box,
                            "loss_share": _share(cls + box, total),
                        }
                    )
                rows.extend(head_rows)
                cls = float(pl.term(head, "cls").detach())
                box = float(pl.term(head, "bbox").detach())
                af = sorted({r["avg_factor"] for r in head_rows})
                afb = sorted({r["avg_factor_bbox"] for r in head_rows})
                rows.append(
                    {
                        "profile": name,
                        "head": head,
                        "level": "all",
                        **{
                            k: sum(r[k] for r in head_rows)
                            for k in ("anchors", "pos", "neg", "ignored", "sampled")
                        },
                        # a shared normalizer is one number; per-level ones have none for the whole head
                        "avg_factor": af[0] if len(af) == 1 else float("nan"),
                        "avg_factor_bbox": afb[0] if len(afb) == 1 else float("nan"),
                        "sample_weight": _spread(head_rows, "sample_weight"),
                        "sample_weight_bbox": _spread(head_rows, "sample_weight_bbox"),
                        "loss_cls": cls,
                        "loss_bbox": box,
                        "loss_share": _share(cls + box, total),
                    }
                )
        return rows

    def image_rows(self) -> list[dict]:
        return [vars(s).copy() for s in self.images]


def _share(part: float, total: float) -> float:
    return part / total if total != 0 and total == total else float("nan")


def _spread(rows: list[dict], key: str) -> float:
    """A head-wide per-sample weight: the common value, or NaN when levels differ."""
    vals = {r[key] for r in rows if r["sampled"] > 0}
    return vals.pop() if len(vals) == 1 else float("nan")


def usable_gt(batch: Batch, num_classes: int):
    """GT the heads can train on: not ignored, finite coordinates, label in 0..K-1.

    Returns boxes, labels, their indices in the dump (per image), and the (image, box, label) of
    finite, not-ignored boxes dropped for their label. Non-finite boxes are left out too; the batch
    records them as the ``nonfinite-gt`` suspicion.
    """
    boxes, labels, sources, dropped = [], [], [], []
    for i, (b, l, ig) in enumerate(zip(batch.gt_boxes, batch.gt_labels, batch.gt_ignore)):
        ok_label = (l >= 0) & (l < num_classes)
        candidate = torch.isfinite(b).all(1) & ~ig
        for j in (candidate & ~ok_label).nonzero().flatten().tolist():
            dropped.append((i, j, int(l[j])))
        keep = candidate & ok_label
        boxes.append(b[keep])
        labels.append(l[keep])
        sources.append(keep.nonzero().flatten())
    return boxes, labels, sources, dropped


def replay(
    heads: HeadWeights,
    batch: Batch,
    config: DetectorConfig,
    profiles: list[LossProfile],
    *,
    seed: int = 0,
    sample_all: bool = False,
) -> Replay:
    """Replay the RPN and RoI losses of ``batch`` under each of ``profiles``.

    All profiles see the same samples (one seeded draw, or every candidate with ``sample_all``),
    so their differences are differences of normalization only.
    """
    gen = torch.Generator().manual_seed(seed)
    n = batch.num_images
    # the diagnosis differentiates with respect to the head parameters and the features; tensors
    # that already require grad (a training loop's parameters) are used as they are
    heads = dataclasses.replace(heads, params={k: _live(v) for k, v in heads.params.items()})
    gts, gt_labels, gt_sources, dropped = usable_gt(batch, heads.num_classes)
    features = [_live(f) for f in batch.features.values()]
    shapes = [tuple(f.shape[2:]) for f in features]
    anchors = level_anchors(config.anchors, batch.strides, shapes, batch.pad_size)
    sizes = [a.shape[0] for a in anchors]
    outs = [rpn_head(f, heads) for f in features]

    a = _assign_rpn(anchors, shapes, gts, batch, heads, config, gen, sample_all)
    labels, matched, sampled, positive = a.labels, a.matched, a.sampled, a.positive

    rpn_levels, rpn_samples = [], []
    leak_zero = torch.zeros(())
    for lvl, (name, out, anc, (start, stop)) in enumerate(
        zip(batch.levels, outs, anchors, _ranges(sizes))
    ):
        lab, mat = labels[:, start:stop], matched[:, start:stop]
        smp, pos = sampled[:, start:stop], positive[:, start:stop]
        bce = bce_loss(out.logits, lab == POSITIVE)
        img_idx, a_idx = pos.nonzero(as_tuple=True)
        tgt = torch.zeros(img_idx.numel(), 4)
        for i in range(n):
            sel = img_idx == i
            if sel.any():
                tgt[sel] = encode(
                    gts[i][mat[i, a_idx[sel]]], anc[a_idx[sel]], config.rpn_coder.weights
                )
        rpn_levels.append(RpnLevel(name, batch.strides[lvl], anc, out, lab, mat, smp, pos, bce))
        rpn_samples.append(
            LevelSamples(
                name,
                candidates=lab.numel(),
                ignored=int((lab == IGNORED).sum()),
                cls_loss=bce[smp],
                cls_pos=pos[smp],
                box_pred=out.deltas[img_idx, a_idx],
                box_target=tgt,
                cls_leak=(bce * 0).sum(),
                box_leak=(out.deltas * 0).sum(),
            )
        )

    proposals, nonfinite = _proposals(outs, anchors, batch, config)
    roi_levels = min(config.roi_pool.num_levels, len(features))
    roi, roi_pos, roi_neg = _sample_rois(
        proposals, gts, gt_labels, batch.strides[:roi_levels], config, gen, sample_all
    )
    roi.pooled = multiscale_roi_align(
        features[:roi_levels],
        batch.strides[:roi_levels],
        roi.boxes,
        roi.img,
        roi.level,
        heads.pool_size,
        config.roi_pool,
    )
    roi.hidden1, roi.hidden = box_hidden(roi.pooled, heads)
    roi.cls_logits, roi.deltas = box_predict(roi.hidden, heads)
    fg = roi.fg_class >= 0
    target_col = torch.where(
        fg, heads.fg_logit(roi.fg_class.clamp(min=0)), torch.full_like(roi.fg_class, heads.bg_col)
    )
    roi.ce = ce_loss(roi.cls_logits, target_col)
    pos_rows = fg.nonzero().flatten()
    pos_pred = roi.deltas[pos_rows, heads.reg_slot(roi.fg_class[pos_rows])]
    roi_samples = []
    for lvl in range(roi_levels):
        at = roi.level == lvl
        at_pos = at[pos_rows]
        roi_samples.append(
            LevelSamples(
                batch.levels[lvl],
                candidates=roi.candidates_per_level[lvl],
                ignored=0,
                cls_loss=roi.ce[at],
                cls_pos=fg[at],
                box_pred=pos_pred[at_pos],
                box_target=roi.targets[pos_rows][at_pos],
                cls_leak=leak_zero,
                box_leak=leak_zero,
            )
        )

    counts = {
        "rpn": HeadCounts(
            [s.sampled for s in rpn_samples],
            [s.pos for s in rpn_samples],
            config.rpn_sampler.batch_size * n,
            a.img_pos,
            a.img_neg,
        ),
        "roi": HeadCounts(
            [s.sampled for s in roi_samples],
            [s.pos for s in roi_samples],
            config.roi_sampler.batch_size * n,
            roi_pos,
            roi_neg,
        ),
    }
    images = []
    for i in range(n):
        best = a.gt_best[i]
        images.append(
            ImageStats(
                image=i,
                gt=gts[i].shape[0],
                gt_ignored=int(batch.gt_ignore[i].sum()),
                gt_bad_label=sum(1 for d in dropped if d[0] == i),
                gt_nonfinite=int((~torch.isfinite(batch.gt_boxes[i]).all(1)).sum()),
                gt_without_pos=int((~a.gt_has_pos[i]).sum()),
                gt_best_iou_min=float(best.min()) if best.numel() else float("nan"),
                gt_best_iou_mean=float(best.mean()) if best.numel() else float("nan"),
                rpn_pos_candidates=a.pos_candidates[i],
                rpn_pos=a.img_pos[i],
                rpn_neg=a.img_neg[i],
                proposals=proposals[i].shape[0],
                proposals_nonfinite=nonfinite[i],
                roi_pos=roi_pos[i],
                roi_neg=roi_neg[i],
            )
        )
    result = Replay(
        heads,
        batch,
        config,
        seed,
        sample_all,
        features,
        rpn_levels,
        roi,
        {"rpn": rpn_samples, "roi": roi_samples},
        counts,
        images,
        gts,
        gt_labels,
        gt_sources,
        a.gt_best,
        a.gt_has_pos,
        dropped,
    )
    for p in profiles:
        result.losses[p.name] = profile_losses(result, p)
    return result


@dataclass
class RpnAssignment:
    """Per image (rows) and anchor of all levels (columns): matcher labels and GT, the sampled mask."""

    labels: Tensor
    matched: Tensor
    sampled: Tensor
    positive: Tensor
    gt_best: list[Tensor]
    gt_has_pos: list[Tensor]
    img_pos: list[int]
    img_neg: list[int]
    pos_candidates: list[int]


def _assign_rpn(
    anchors, shapes, gts, batch: Batch, heads: HeadWeights, config: DetectorConfig, gen, sample_all
) -> RpnAssignment:
    """Assign and sample per image, over all levels jointly (the budget is per image, not per level)."""
    n = batch.num_images
    all_anchors = torch.cat(anchors)
    a = RpnAssignment(
        torch.empty(n, all_anchors.shape[0], dtype=torch.int8),
        torch.empty(n, all_anchors.shape[0], dtype=torch.long),
        torch.zeros(n, all_anchors.shape[0], dtype=torch.bool),
        torch.zeros(n, all_anchors.shape[0], dtype=torch.bool),
        [],
        [],
        [],
        [],
        [],
    )
    for i in range(n):
        flags = valid_flags(
            config.anchors, batch.strides, shapes, batch.image_sizes[i], heads.num_anchors
        )
        m = match(
            gts[i], all_anchors, config.rpn_matcher, torch.cat(flags) if flags is not None else None
        )
        a.labels[i], a.matched[i] = m.labels, m.gt
        pos, neg = sample(m.labels, config.rpn_sampler, gen, sample_all)
        a.sampled[i, pos] = True
        a.sampled[i, neg] = True
        a.positive[i, pos] = True
        cand = m.labels == POSITIVE
        hit = torch.zeros(gts[i].shape[0], dtype=torch.bool)
        hit[m.gt[cand]] = True
        a.gt_best.append(m.gt_best)
        a.gt_has_pos.append(hit)
        a.img_pos.append(pos.numel())
        a.img_neg.append(neg.numel())
        a.pos_candidates.append(int(cand.sum()))
    return a


def _proposals(
    outs, anchors, batch: Batch, config: DetectorConfig
) -> tuple[list[Tensor], list[int]]:
    """Per image: the dump's proposals, or the RPN's from its detached outputs (and how many were non-finite)."""
    if batch.proposals is not None:  # the dump's, less any with non-finite coordinates
        finite = [torch.isfinite(p).all(1) for p in batch.proposals]
        return [p[f] for p, f in zip(batch.proposals, finite)], [int((~f).sum()) for f in finite]
    proposals, nonfinite = [], []
    with torch.no_grad():
        for i in range(batch.num_images):
            boxes, _, bad = image_proposals(
                [o.logits[i] for o in outs],
                [o.deltas[i] for o in outs],
                anchors,
                batch.image_sizes[i],
                config.train_proposals,
                config.rpn_coder,
            )
            proposals.append(boxes)
            nonfinite.append(bad)
    return proposals, nonfinite


def _live(t: Tensor) -> Tensor:
    return t if t.requires_grad else t.detach().requires_grad_(True)


def _ranges(sizes: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


def _sample_rois(proposals, gts, gt_labels, strides, config: DetectorConfig, gen, sample_all):
    """Assign proposals (+ GT) to GT and sample per image → (RoiSet, pos per image, neg per image)."""
    rows = {k: [] for k in ("boxes", "img", "fg", "gt", "is_gt", "targets")}
    cand_levels = torch.zeros(len(strides), dtype=torch.long)
    img_pos, img_neg = [], []
    for i, (props, gt, lab) in enumerate(zip(proposals, gts, gt_labels)):
        cands = torch.cat([props, gt]) if config.roi_sampler.add_gt else props
        is_gt = torch.zeros(cands.shape[0], dtype=torch.bool)
        if config.roi_sampler.add_gt:
            is_gt[props.shape[0] :] = True
        m = match(gt, cands, config.roi_matcher)
        if config.roi_matcher.style == "mmdet" and config.roi_sampler.add_gt and gt.shape[0]:
            # mmdet assigns every added GT to itself, whatever its IoU (a zero-size GT too)
            m.labels[is_gt] = POSITIVE
            m.gt[is_gt] = torch.arange(gt.shape[0])
        cand_levels += torch.bincount(
            map_levels(cands, strides, config.roi_pool), minlength=len(strides)
        )
        pos, neg = sample(m.labels, config.roi_sampler, gen, sample_all)
        idx = torch.cat([pos, neg])
        img_pos.append(pos.numel())
        img_neg.append(neg.numel())
        fg = torch.full((idx.numel(),), -1, dtype=torch.long)
        gidx = torch.full((idx.numel(),), -1, dtype=torch.long)
        tgt = torch.zeros(idx.numel(), 4)
        if pos.numel():
            gidx[: pos.numel()] = m.gt[pos]
            fg[: pos.numel()] = lab[m.gt[pos]]
            tgt[: pos.numel()] = encode(gt[m.gt[pos]], cands[pos], config.roi_coder.weights)
        rows["boxes"].append(cands[idx])
        rows["img"].append(torch.full((idx.numel(),), i, dtype=torch.long))
        rows["fg"].append(fg)
        rows["gt"].append(gidx)
        rows["is_gt"].append(is_gt[idx])
        rows["targets"].append(tgt)
    boxes = torch.cat(rows["boxes"]) if rows["boxes"] else torch.zeros(0, 4)
    roi = RoiSet(
        boxes=boxes,
        img=torch.cat(rows["img"]),
        level=map_levels(boxes, strides, config.roi_pool),
        fg_class=torch.cat(rows["fg"]),
        gt_index=torch.cat(rows["gt"]),
        is_gt=torch.cat(rows["is_gt"]),
        targets=torch.cat(rows["targets"]),
        candidates_per_level=cand_levels.tolist(),
    )
    return roi, img_pos, img_neg


def profile_losses(r: Replay, profile: LossProfile) -> ProfileLosses:
    """Normalize the shared per-sample losses under one profile."""
    levels = {}
    for head in HEADS:
        cls_term, box_term = profile.term(f"{head}_cls"), profile.term(f"{head}_box")
        counts = r.counts[head]
        out = []
        for lvl, s in enumerate(r.samples[head]):
            w = torch.where(s.cls_pos, profile.pos_weight, 1.0)
            cls_num = (s.cls_loss * w).sum()
            box_num = s.box_loss(box_term).sum()
            if profile.unsampled_leak:
                cls_num, box_num = cls_num + s.cls_leak, box_num + s.box_leak
            loss_cls, d_cls = normalize(cls_num, cls_term, counts.count(cls_term.normalizer, lvl))
            loss_box, d_box = normalize(box_num, box_term, counts.count(box_term.normalizer, lvl))
            out.append(
                LevelLoss(
                    s.name,
                    loss_cls,
                    loss_box,
                    d_cls,
                    d_box,
                    cls_term.weight / d_cls if d_cls else float("nan"),
                    box_term.weight / d_box if d_box else float("nan"),
                )
            )
        levels[head] = out
    return ProfileLosses(profile, levels)
