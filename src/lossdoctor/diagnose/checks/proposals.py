"""Checks of the proposals: images without any, and the funnel from GT objects to RoI
positives (anchors, RPN sampling, proposals, RoI sampling)."""

from __future__ import annotations

import torch
from torch import Tensor

from ...replay.boxes import box_iou
from ...replay.engine import Replay
from ...replay.proposals import ProposalCounts, image_proposals
from ...vocab import (
    Funnel,
    Head,
)
from ..finding import Finding
from .base import EARLY_STEPS, Facts, _step

# the RPN starves the RoI head when fewer than this share of GT objects reach a RoI positive
# through one of its proposals
STARVED_SHARE = 0.5


# the evidence field of each funnel stage: GT objects that reach it
FUNNEL_KEYS = {
    Funnel.ANCHORS: "with_positive_anchor",
    Funnel.SAMPLED: "with_sampled_positive",
    Funnel.PROPOSALS: "covered_by_proposal",
    Funnel.ROI: "with_roi_positive",
}


LOST_AT = {
    Funnel.ANCHORS: "at the anchors",
    Funnel.SAMPLED: "at RPN sampling",
    Funnel.PROPOSALS: "at the proposals",
    Funnel.ROI: "at RoI sampling",
}


STARVED_FIX = {
    Funnel.ANCHORS: "add anchor sizes or ratios that fit these objects, or lower the RPN "
    "matcher's positive IoU threshold",
    Funnel.SAMPLED: "raise the RPN sampler's batch size or positive fraction: positives exist but "
    "are not sampled",
    Funnel.PROPOSALS: "the proposals miss the objects: expected while the RPN does not localize "
    "yet (early steps); later, check the RPN's box loss weight and normalization, and the "
    "pre/post-NMS top-n",
    Funnel.ROI: "proposals cover the objects but no RoI positive is sampled from them: raise the "
    "RoI sampler's positive fraction or batch size",
}


def own_proposal_counts(r: Replay, i: int) -> ProposalCounts:
    """What each step of lossdoctor's own training-proposal generation kept for image ``i``."""
    cfg, levels = r.config, r.rpn.levels
    with torch.no_grad():
        _, _, counts = image_proposals(
            [lv.out.logits.detach()[i] for lv in levels],
            [lv.out.deltas.detach()[i] for lv in levels],
            [lv.anchors for lv in levels],
            r.batch.image_sizes[i],
            cfg.train_proposals,
            cfg.rpn_coder,
            cfg.ranking,
        )
    return counts


def _why_no_proposals(r: Replay, i: int, n: ProposalCounts) -> str:
    """The first step that left image ``i`` without a proposal."""
    cfg = r.config.train_proposals
    if r.batch.proposals is not None:
        if r.images[i].proposals_nonfinite:
            return "every proposal of the run's dump has NaN/Inf coordinates"
        if n.kept:
            return (
                f"the run's dump has none, while lossdoctor's RPN keeps {n.kept} from the same "
                "outputs: the run's proposal settings differ from the config's"
            )
    if n.preselected == 0:
        return "the image has no anchors"
    if n.finite == 0:
        return "every candidate box or objectness logit is NaN/Inf: the RPN's outputs diverged"
    if n.large_enough == 0:
        return (
            f"every decoded box has a side under min_size {cfg.min_size:g}: the deltas shrink them"
        )
    return f"no candidate reaches the objectness min_score {cfg.min_score:g}"


def no_proposals(f: Facts) -> list[Finding]:
    r, out = f.replay, []
    for im in r.images:
        if im.gt == 0 or im.proposals > 0:
            continue
        n = own_proposal_counts(r, im.image)
        why = _why_no_proposals(r, im.image, n)
        fed = "on its GT boxes alone" if r.config.roi_sampler.add_gt else "on nothing"
        msg = (
            f"image {im.image} has {im.gt} GT boxes and 0 proposals ({why}); its RoI head "
            f"trains {fed}"
        )
        ev = {
            "gt": im.gt,
            **vars(n),
            "dumped": r.batch.proposals is not None,
        }
        out.append(
            Finding(
                message=msg, head=Head.RPN, image=im.image, evidence=ev, cause=f"0 proposals: {why}"
            )
        )
    return out


def _gt_funnel(r: Replay, i: int) -> dict[Funnel, Tensor]:
    """Per usable GT box of image ``i``, whether it reaches each stage of the funnel."""
    g = r.gt.boxes[i].shape[0]
    on = {stage: torch.zeros(g, dtype=torch.bool) for stage in Funnel}
    for lv in r.rpn.levels:
        on[Funnel.ANCHORS][lv.matched[i][lv.labels[i] == 1]] = True
        on[Funnel.SAMPLED][lv.matched[i][lv.positive[i]]] = True
    props = r.proposals[i]
    if props.shape[0] and g:
        on[Funnel.PROPOSALS] = box_iou(r.gt.boxes[i], props).max(1).values >= (
            r.config.roi_matcher.fg_iou
        )
    roi = r.roi
    from_props = (roi.img == i) & (roi.fg_class >= 0) & ~roi.is_gt
    on[Funnel.ROI][roi.gt_index[from_props]] = True
    return on


def _funnel_counts(r: Replay) -> dict[Funnel, int]:
    """GT boxes of the batch that reach each stage, each stage counting only those that reached
    the ones before it."""
    counts = dict.fromkeys(Funnel, 0)
    for i in range(r.batch.num_images):
        reached = r.gt.labels[i] >= 0  # a GT labelled background never becomes a RoI positive
        for stage, on in _gt_funnel(r, i).items():
            reached &= on
            counts[stage] += int(reached.sum())
    return counts


def positives_starved(f: Facts) -> list[Finding]:
    """Fewer than half the GT objects reach a RoI positive through an RPN proposal: where along
    the funnel they are lost."""
    r = f.replay
    total = sum(int((lab >= 0).sum()) for lab in r.gt.labels)
    counts = _funnel_counts(r)
    if not total or counts[Funnel.ROI] >= STARVED_SHARE * total:
        return []
    before = [total, *counts.values()]
    lost = {stage: before[k] - before[k + 1] for k, stage in enumerate(Funnel)}
    worst = max(lost, key=lost.get)
    per_level = {lv.name: int((lv.labels == 1).sum()) for lv in r.rpn.levels}
    chain = " -> ".join(f"{n} {stage}" for stage, n in counts.items())
    msg = (
        f"{counts[Funnel.ROI]} of {total} GT objects reach a RoI positive through a proposal "
        f"({total} GT -> {chain}); most ({lost[worst]}) are lost {LOST_AT[worst]}"
    )
    step = _step(r)
    ev = {"gt": total, **{FUNNEL_KEYS[s]: n for s, n in counts.items()},
          "lost_at": LOST_AT[worst], "positive_anchors_per_level": per_level}  # fmt: skip
    early = step is not None and step < EARLY_STEPS
    return [Finding(message=msg, head=Head.RPN, evidence=ev, fix=STARVED_FIX[worst], minor=early)]
