"""Checks of the anchor assignment: levels without positives, GT boxes no anchor matches."""

from __future__ import annotations

from ...replay.engine import Replay
from ...vocab import (
    Head,
)
from ..finding import Finding
from .base import Facts

# GT boxes without a positive anchor are a warning above this share of the batch's boxes
WITHOUT_POS_SHARE = 0.2


def _gt_size_range(r: Replay) -> list[float]:
    sides = [
        ((b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)).sqrt()
        for b in r.gt.boxes
        if b.shape[0]
    ]
    if not sides:
        return []
    return [
        round(min(float(s.min()) for s in sides), 1),
        round(max(float(s.max()) for s in sides), 1),
    ]


def no_positive_level(f: Facts) -> list[Finding]:
    r = f.replay
    if not sum(im.gt for im in r.images):
        return []
    out = []
    for lvl, level in enumerate(r.rpn.levels):
        if int((level.labels == 1).sum()) == 0:
            size = list(r.config.anchors.sizes[lvl])
            msg = (
                f"no anchor of {level.name} (sizes {size} px) is positive for any GT in this batch"
            )
            ev = {"anchor_sizes": size, "gt_sizes": _gt_size_range(r)}
            cause = "no anchor of the level is positive for any GT in this batch"
            out.append(
                Finding(message=msg, head=Head.RPN, level=level.name, evidence=ev, cause=cause)
            )
    return out


def matches_no_anchor(f: Facts) -> list[Finding]:
    """GTs whose best anchor IoU is 0; minor where the matcher does not then take every anchor.
    A box without area is left to ``degenerate-gt``, which names it (this is its consequence)."""
    r = f.replay
    every = r.config.rpn_matcher.every_candidate_positive_for_empty_overlap
    out = []
    for i, (im, gts) in enumerate(zip(r.rpn.images, r.gt.boxes)):
        n = r.images[i].rpn_pos_candidates
        flat = (gts[:, 2] <= gts[:, 0]) | (gts[:, 3] <= gts[:, 1])
        for g in ((im.gt_best == 0) & ~flat).nonzero().flatten().tolist():
            box = [round(v, 1) for v in gts[g].tolist()]
            msg = f"image {i} box {r.gt.dump_index(i, g)} {box} overlaps no anchor (best IoU 0)"
            if every:
                msg += f": low-quality matching makes all {n} candidate anchors positive"
            ev = {"box": r.gt.dump_index(i, g), "rpn_pos_candidates": n}
            cause = "GT boxes overlap no anchor (best IoU 0)"
            out.append(
                Finding(
                    message=msg, head=Head.RPN, image=i, evidence=ev, minor=not every, cause=cause
                )
            )
    return out


def without_positive(f: Facts) -> list[Finding]:
    """GT boxes that overlap anchors but get no positive one; minor where they are a small share
    of the batch's boxes (a few small objects under the smallest anchor are common)."""
    r = f.replay
    missed = [
        (i, g)
        for i, im in enumerate(r.rpn.images)
        for g in ((~im.gt_has_pos) & (im.gt_best > 0)).nonzero().flatten().tolist()
    ]
    total = sum(b.shape[0] for b in r.gt.boxes)
    minor = len(missed) <= WITHOUT_POS_SHARE * total
    out = []
    for i, g in missed:
        best, j = float(r.rpn.images[i].gt_best[g]), r.gt.dump_index(i, g)
        msg = f"image {i} box {j} gets no positive anchor (best IoU {best:.2f} < min_pos_iou)"
        ev, cause = {"box": j, "best_iou": best}, "GT boxes get no positive anchor"
        out.append(
            Finding(message=msg, head=Head.RPN, image=i, evidence=ev, cause=cause, minor=minor)
        )
    return out
