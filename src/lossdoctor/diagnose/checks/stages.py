"""Checks of the mask head and a cascade's later stages."""

from __future__ import annotations

from ...vocab import (
    Head,
)
from ..finding import Finding
from .base import EARLY_STEPS, EVIDENCE_ITEMS, Facts, _step

# a later cascade stage with at most this many positive RoIs in an image with GT is starved
STAGE_MIN_POS = 1


def empty_mask(f: Facts) -> list[Finding]:
    """Positive RoIs whose mask target is all background: their mask loss teaches 'no object'
    inside a box that holds one."""
    r, m = f.replay, f.replay.mask
    if m is None or m.rows.numel() == 0:
        return []
    empty = m.targets.flatten(1).sum(1) == 0
    out = []
    for i in range(r.batch.num_images):
        at = empty & (r.roi.img[m.rows] == i)
        n = int(at.sum())
        if n:
            gts = sorted({r.gt.dump_index(i, g) for g in r.roi.gt_index[m.rows[at]].tolist()})
            msg = (
                f"image {i}: {n} positive RoIs have an all-zero mask target (GT boxes {gts[:10]}): "
                "their mask is empty inside the RoI"
            )
            ev = {"rois": n, "boxes": gts[:EVIDENCE_ITEMS]}
            cause = "positive RoIs whose mask target is all zeros"
            out.append(Finding(message=msg, head=Head.MASK, image=i, evidence=ev, cause=cause))
    return out


def mask_branch_skipped(f: Facts) -> list[Finding]:
    """A mask head with no positive RoI in the batch, under a profile whose loss code leaves the
    empty mask term out of the graph (the frameworks keep it: a zero gradient, nothing to say)."""
    r = f.replay
    if r.mask is None or r.mask.rows.numel() > 0:
        return []
    msg = (
        "{}: the batch has no positive RoI, so the mask head gets no sample, and this loss code "
        "leaves the empty mask term out of the graph: the mask head gets no gradient on this rank"
    )
    skipping = [name for name, pl in r.losses.items() if not pl.profile.roi_mask.empty_in_graph]
    ev = {"positive_rois": 0}
    return [
        Finding(message=msg.format(n), head=Head.MASK, profile=n, evidence=ev) for n in skipping
    ]


def stage_starved(f: Facts) -> list[Finding]:
    """A later cascade stage with at most STAGE_MIN_POS positives in an image that has GT."""
    r, out = f.replay, []
    with_gt = [im.image for im in r.images if im.gt > 0]
    for k, stage in enumerate(r.stages, start=1):
        pos = [stage.img_pos[i] for i in with_gt]
        starved = [i for i, p in zip(with_gt, pos) if p <= STAGE_MIN_POS]
        if not starved:
            continue
        iou = r.config.cascade.ious[k - 1]
        before = [r.roi_stages[k - 1].img_pos[i] for i in starved]
        msg = (
            f"cascade stage {k} (IoU {iou:g}): images {starved} have at most {STAGE_MIN_POS} "
            f"positive RoIs ({[stage.img_pos[i] for i in starved]}; stage {k - 1} had {before})"
        )
        ev = {"stage": k, "iou": iou, "images": starved,
              "positives": [stage.img_pos[i] for i in starved], "previous": before}  # fmt: skip
        step = _step(r)
        early = step is not None and step < EARLY_STEPS
        out.append(Finding(message=msg, head=Head.ROI, evidence=ev, minor=early))
    return out
