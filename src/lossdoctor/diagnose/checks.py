"""The checks behind the findings: each looks at the replay's numbers and returns hits. The rule
table (``findings.RULES``) gives every check its code, severity, evidence fields and fix."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..inputs.finite import all_finite
from ..replay.boxes import box_iou
from ..replay.engine import Replay
from ..replay.gt import DroppedLabel
from ..replay.proposals import ProposalCounts, image_proposals
from ..vocab import (
    GRADIENT_TERM,
    TERMS,
    Background,
    Framework,
    Funnel,
    Head,
    Part,
    Stage,
    Term,
    term_of,
)
from .gradients import ProfileGrads
from .nan_trace import CAUSES, UNITS, Origin
from .symptom import Symptom

# a per-sample weight that varies more than this across levels is an imbalance
LEVEL_WEIGHT_RATIO = 10.0
# share of the squared classification gradient from negatives above which they dominate (count
# imbalance alone, ~97% in a sparse healthy batch, stays below it)
BACKGROUND_SHARE = 0.99
# the gradient share counts as explained by sample counts when the positives' part of it is at
# least this fraction of their share of the samples
BACKGROUND_COUNT_SLACK = 0.5
# 10x the max_norm=35 MMDetection suggests for clipping
EXPLODING_NORM = 350.0
# one SGD step moving the heads' weights by more than this share of their norm explodes
EXPLODING_STEP = 0.1
# GT boxes without a positive anchor are a warning above this share of the batch's boxes
WITHOUT_POS_SHARE = 0.2
VANISHING_NORM = 1e-6
# a best foreground score below this fraction of chance is a collapse at any step: an untrained
# head scores at chance, and its first steps (the background bias growing) lower that by about one
# order of magnitude, not three
COLLAPSED_FRACTION = 1e-3
# steps before which detecting nothing is expected: a detector does not detect during its LR
# warmup (500 iterations in MMDetection, 1000 in torchvision's references)
EARLY_STEPS = 1000
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
EMPTY_GT_CAUSE = "images without a usable GT box train as images without objects"
# a later cascade stage with at most this many positive RoIs in an image with GT is starved
STAGE_MIN_POS = 1
# evidence lists are cut to this many entries
EVIDENCE_ITEMS = 20
LOSS_COLUMN = {Part.CLS: "loss_cls", Part.BOX: "loss_bbox", Part.MASK: "loss_mask",
               None: "gradient"}  # fmt: skip
# Each stage's cause without where it happened, shared by the grouped finding of its levels
STAGE_CAUSES = {
    Stage.INPUT: "already in the features, and every loss term on those levels inherits it",
    Stage.WEIGHTS: "non-finite head weights in the checkpoint",
    Stage.OUTPUTS: "the head produced Inf/NaN from finite features and weights",
    Stage.PROPOSALS: "non-finite RoI boxes",
    Stage.TARGETS: "non-finite regression targets from GT boxes",
    Stage.PER_SAMPLE: "the per-sample classification loss overflowed",
    Stage.NORMALIZER: "a mean over an empty set",
    Stage.LEVEL_LOSS: "the per-level sum of finite losses overflowed",
    Stage.GRADIENTS: "the loss is finite but its gradient at the head outputs is not",
}


@dataclass(kw_only=True)
class Facts:
    """What the checks read: the replay and the diagnosis built on it."""

    replay: Replay
    grads: dict[str, ProfileGrads]
    origins: list[Origin]
    symptom: Symptom


@dataclass(kw_only=True)
class Hit:
    """One thing a check found. ``minor`` takes the rule's lesser severity (and fix, if it has
    one); ``fix`` replaces the rule's fix where the case has its own (a NaN stage's cause)."""

    message: str
    head: Head | None = None
    level: str | None = None
    profile: str | None = None
    image: int | None = None
    term: Term | str | None = None
    evidence: dict = field(default_factory=dict)
    minor: bool = False
    fix: str | None = None
    fix_prefix: str = ""  # said before the rule's fix, where this case has a sharper first step
    # what the hit has in common with the others of its cause, without where it is (its level,
    # term, profile, image): hits of one code and cause make one grouped finding
    cause: str | None = None


# ---- the batch ---------------------------------------------------------------------------------


def suspicions(code: str, cause: str):
    """A check that turns the batch's suspicions of ``code`` into hits, of one ``cause``."""

    def check(f: Facts) -> list[Hit]:
        out = []
        for s in f.replay.batch.suspicions:
            if s.code == code:
                extra = {"box": s.box} if s.box is not None and "box" not in s.evidence else {}
                ev = {**s.evidence, **extra}
                hit = Hit(message=s.message, image=s.image, level=s.level, evidence=ev, cause=cause)
                out.append(hit)
        return out

    return check


DEGENERATE_CAUSE = "GT boxes with zero or negative width or height"


def degenerate_gt(f: Facts) -> list[Hit]:
    """Boxes without area, with what the RPN's matching made of them: a box that overlaps no
    anchor under low-quality matching makes every candidate anchor positive (said here, once,
    rather than as a second finding of the same box)."""
    r = f.replay
    every = r.config.rpn_matcher.every_candidate_positive_for_empty_overlap
    out = []
    for s, hit in zip(
        _of_code(r, "degenerate-gt"), suspicions("degenerate-gt", DEGENERATE_CAUSE)(f)
    ):
        used = (r.gt.sources[s.image] == s.box).nonzero().flatten().tolist()
        if every and used and float(r.rpn.images[s.image].gt_best[used[0]]) == 0:
            n = r.images[s.image].rpn_pos_candidates
            hit.message += (
                f"; it overlaps no anchor, so low-quality matching makes all {n} candidate "
                "anchors positive"
            )
            hit.evidence["rpn_pos_candidates"] = n
        out.append(hit)
    return out


def _of_code(r: Replay, code: str) -> list:
    return [s for s in r.batch.suspicions if s.code == code]


def empty_gt(f: Facts) -> list[Hit]:
    """Images without usable GT: none in the dump, all ignored, or all left out."""
    r = f.replay
    out = suspicions("empty-gt-image", EMPTY_GT_CAUSE)(f)
    named = {h.image for h in out}
    for im in r.images:
        if im.gt > 0 or im.image in named:
            continue
        parts = [
            (im.gt_ignored, "ignored"),
            (im.gt_bad_label, f"labelled outside {r.batch.label_space.span(r.heads.num_classes)}"),
            (im.gt_nonfinite, "non-finite"),
        ]
        why = ", ".join(f"{n} {what}" for n, what in parts if n)
        msg = (
            f"image {im.image} has no usable GT box ({why}), so it trains as an image without "
            "objects"
        )
        ev = {"ignored": im.gt_ignored, "bad_label": im.gt_bad_label, "nonfinite": im.gt_nonfinite}
        out.append(Hit(message=msg, image=im.image, evidence=ev, cause=EMPTY_GT_CAUSE))
    return out


def _label_facts(r: Replay) -> tuple[list[int], list[int], bool]:
    """All dump labels, the distinct dropped ones, and whether they look 1-based (in the dump's
    labels)."""
    labels = [lab for img in r.batch.gt_labels for lab in img.tolist()]
    bad = sorted({d.label for d in r.gt.dropped_labels})
    return labels, bad, bool(labels) and min(labels) >= 1 and bad == [r.heads.num_classes]


def labels_one_based(f: Facts) -> list[Hit]:
    """Labels 1..K: an error where label K collides with the background (or falls beyond the
    classifier); minor where the run is torchvision's (whose own labels are 1-based) and the
    labels never use class 0, the mark of its raw labels passed as they are. Labels are named as
    the run names them."""
    r = f.replay
    labels, _, one_based = _label_facts(r)
    k, space = r.heads.num_classes, r.batch.label_space
    if r.gt.dropped_labels and one_based:
        where = (
            f"lands on column {k}, the background of this {r.heads.layout} checkpoint"
            if r.heads.background is Background.LAST
            else f"is past the last class ({space.run(k - 1)})"
        )
        msg = (
            f"labels run {space.run(1)}..{space.run(max(labels))}: they look one too high; label "
            f"{space.run(k)} {where}, and every class is shifted by one"
        )
    elif _raw_torchvision_labels(r, labels):
        msg = (
            f"labels run {min(labels)}..{max(labels)} and never use class 0 in a torchvision run, "
            "whose own labels are 1-based (its label j is class j-1 here): if targets['labels'] "
            "were passed as they are, every class is shifted by one"
        )
    else:
        return []
    ev = {"min_label": space.run(min(labels)), "max_label": space.run(max(labels)),
          "num_classes": k, "dropped": len(r.gt.dropped_labels)}  # fmt: skip
    image = r.gt.dropped_labels[0].image if r.gt.dropped_labels else None
    return [Hit(message=msg, image=image, evidence=ev, minor=not one_based)]


def _raw_torchvision_labels(r: Replay, labels: list[int]) -> bool:
    """A torchvision run whose dump kept the labels as given (no adapter shifted them to the
    dump's 0..K-1), and they never use class 0."""
    torchvision = r.batch.meta.get("framework") == Framework.TORCHVISION
    by_hand = torchvision and r.batch.label_space.offset == 0
    return by_hand and bool(labels) and min(labels) >= 1


def _plural(n: int, noun: str, show: bool = True) -> str:
    """``1 GT box``, ``2 GT boxes``; ``show=False`` leaves the count out."""
    word = noun if n == 1 else noun + ("es" if noun.endswith(("s", "x")) else "s")
    return f"{n} {word}" if show else word


def _boxes(dropped: list[DroppedLabel]) -> list[list[int]]:
    return [[d.image, d.box] for d in dropped[:EVIDENCE_ITEMS]]


def label_out_of_range(f: Facts) -> list[Hit]:
    r = f.replay
    dropped = r.gt.dropped_labels
    _, _, one_based = _label_facts(r)
    if not dropped or one_based:
        return []
    k, space = r.heads.num_classes, r.batch.label_space
    bad = sorted({space.run(d.label) for d in dropped})
    msg = (
        f"{_plural(len(dropped), 'GT box')} {'has' if len(dropped) == 1 else 'have'} "
        f"{_plural(len(bad), 'label', show=False)} {', '.join(map(str, bad))} outside "
        f"{space.span(k)}: left out of the replay"
    )
    ev = {"labels": bad, "num_classes": k, "boxes": _boxes(dropped)}
    return [Hit(message=msg, image=dropped[0].image, evidence=ev)]


def gt_labelled_background(f: Facts) -> list[Hit]:
    """GT boxes labelled with the run's background class (torchvision's 0): trained as objects
    by the RPN and as background by the RoI head, as the framework does."""
    r = f.replay
    marked = r.gt.background_labels
    if not marked:
        return []
    bg, k = r.batch.label_space.background, r.heads.num_classes
    n = len(marked)
    msg = (
        f"{_plural(n, 'GT box')} {'is' if n == 1 else 'are'} labelled {bg}, the background of "
        f"labels {r.batch.label_space.span(k)}: the RPN trains {'it' if n == 1 else 'them'} as "
        "an object, the RoI head as background (no class, no box loss), as the framework does"
    )
    ev = {"label": bg, "num_classes": k, "boxes": _boxes(marked)}
    return [Hit(message=msg, image=marked[0].image, evidence=ev)]


def unsafe_globals(f: Facts) -> list[Hit]:
    r, out = f.replay, []
    for what, replaced in (("checkpoint", r.heads.replaced), ("batch", r.batch.replaced)):
        code = [x.name for x in replaced if x.code]
        if code:
            msg = (
                f"the {what} file names {', '.join(code)}, code that unpickling would have run; "
                "lossdoctor put an inert placeholder in its place and did not run it"
            )
            out.append(Hit(message=msg, evidence={"file": what, "globals": code}))
    return out


def _module(key: str) -> str:
    return key.rsplit(".", 1)[0]


def nonfinite_weights(f: Facts) -> list[Hit]:
    """Non-finite head weights, and non-finite tensors anywhere else in the checkpoint (the
    backbone and neck are not replayed, but a NaN there is a NaN in every feature)."""
    heads, out = f.replay.heads, []
    bad = [heads.file_key(n) for n, t in heads.params.items() if not all_finite(t)]
    if bad:
        msg = f"non-finite head weights: {', '.join(bad)}"
        out.append(Hit(message=msg, evidence={"params": bad, "modules": {}, "values": 0}))
    modules: dict[str, int] = {}
    for key, n in heads.nonfinite_elsewhere.items():
        modules[_module(key)] = modules.get(_module(key), 0) + n
    if modules:
        shown = ", ".join(f"{m} ({n})" for m, n in list(modules.items())[:3])
        more = f" and {len(modules) - 3} more" if len(modules) > 3 else ""
        total = sum(modules.values())
        msg = (
            f"non-finite weights outside the heads: {shown}{more}; {total} NaN/Inf values in "
            f"{len(heads.nonfinite_elsewhere)} tensors of {len(modules)} modules, so every "
            "feature computed from them is suspect"
        )
        ev = {"params": [], "modules": dict(list(modules.items())[:EVIDENCE_ITEMS]),
              "values": total}  # fmt: skip
        out.append(Hit(message=msg, evidence=ev))
    return out


# ---- NaN/Inf origins ---------------------------------------------------------------------------


def _origin_hit(o: Origin, fix: str | None) -> Hit:
    where = f"{o.head} stage {o.box_stage}" if o.box_stage else f"{o.head}"
    msg = (
        f"{o.profile}: {where} {LOSS_COLUMN[o.part]} at {o.level} is {o.kind}; first broken "
        f"stage: {o.cause}"
    )
    ev = {
        "stage": o.stage,
        "nan": o.nan,
        "posinf": o.posinf,
        "neginf": o.neginf,
        "index": o.index,
        "gt": o.gt,
    }
    return Hit(
        message=msg,
        head=o.head,
        level=o.level,
        profile=o.profile,
        image=o.image,
        term=term_of(o.head, o.part) if o.part else GRADIENT_TERM,
        evidence=ev,
        fix=fix,
        cause=f"{o.kind}, first broken at {o.stage}: {o.reason or STAGE_CAUSES[o.stage]}",
    )


def empty_mean(f: Facts) -> list[Hit]:
    return [_origin_hit(o, None) for o in f.origins if o.stage is Stage.NORMALIZER]


def nonfinite_loss(f: Facts) -> list[Hit]:
    return [_origin_hit(o, CAUSES[o.stage]) for o in f.origins if o.stage is not Stage.NORMALIZER]


# ---- matching ----------------------------------------------------------------------------------


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


def no_positive_level(f: Facts) -> list[Hit]:
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
            out.append(Hit(message=msg, head=Head.RPN, level=level.name, evidence=ev, cause=cause))
    return out


def matches_no_anchor(f: Facts) -> list[Hit]:
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
                Hit(message=msg, head=Head.RPN, image=i, evidence=ev, minor=not every, cause=cause)
            )
    return out


def without_positive(f: Facts) -> list[Hit]:
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
        out.append(Hit(message=msg, head=Head.RPN, image=i, evidence=ev, cause=cause, minor=minor))
    return out


# ---- proposals ---------------------------------------------------------------------------------


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


def no_proposals(f: Facts) -> list[Hit]:
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
            Hit(
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


def positives_starved(f: Facts) -> list[Hit]:
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
    return [Hit(message=msg, head=Head.RPN, evidence=ev, fix=STARVED_FIX[worst], minor=early)]


# ---- mask and cascade --------------------------------------------------------------------------


def empty_mask(f: Facts) -> list[Hit]:
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
            out.append(Hit(message=msg, head=Head.MASK, image=i, evidence=ev, cause=cause))
    return out


def mask_branch_skipped(f: Facts) -> list[Hit]:
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
    return [Hit(message=msg.format(n), head=Head.MASK, profile=n, evidence=ev) for n in skipping]


def stage_starved(f: Facts) -> list[Hit]:
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
        out.append(Hit(message=msg, head=Head.ROI, evidence=ev, minor=early))
    return out


# ---- gradients ---------------------------------------------------------------------------------


def background_dominance(f: Facts) -> list[Hit]:
    """Negatives carry nearly all the classification gradient; minor when the counts explain it."""
    r, out = f.replay, []
    for name, g in f.grads.items():
        for head, samples in r.samples.items():
            share = g.neg_share.get(head, math.nan)
            if not (share == share and share > BACKGROUND_SHARE):
                continue
            pos = sum(s.pos for s in samples)
            neg = sum(s.sampled for s in samples) - pos
            counts = neg / max(pos + neg, 1)
            # equal per-sample gradients give the count share; beyond it, weighting amplifies
            by_counts = 1 - share >= BACKGROUND_COUNT_SLACK * (1 - counts)
            tail = ": the counts alone explain it" if by_counts else ""
            msg = (
                f"{name}: negatives carry {share:.1%} of the {head} classification gradient "
                f"({neg} negatives vs {pos} positives sampled{tail})"
            )
            ev = {"neg_share": share, "neg_count_share": counts, "pos": pos, "neg": neg}
            out.append(Hit(message=msg, head=head, profile=name, evidence=ev, minor=by_counts))
    return out


def level_weight_imbalance(f: Facts) -> list[Hit]:
    r, out = f.replay, []
    for name, pl in r.losses.items():
        for head, samples in r.samples.items():
            used = [(lv, s) for lv, s in zip(pl.levels[head], samples) if s.sampled > 0]
            weights = [lv.sample_weight for lv, _ in used if lv.sample_weight > 0]
            if len(weights) < 2 or max(weights) / min(weights) <= LEVEL_WEIGHT_RATIO:
                continue
            levels = [s.name for lv, s in used if lv.sample_weight > 0]
            hi, lo = levels[weights.index(max(weights))], levels[weights.index(min(weights))]
            ratio = max(weights) / min(weights)
            msg = f"{name}: one {head} sample at {hi} weighs {ratio:.0f}x one at {lo}"
            ev = {"max_weight": max(weights), "min_weight": min(weights), "levels": [hi, lo]}
            out.append(Hit(message=msg, head=head, profile=name, evidence=ev))
    return out


def no_gradient(f: Facts) -> list[Hit]:
    """Parameters (or RPN feature levels: minor) that got no gradient from this batch."""
    out = []
    for name, g in f.grads.items():
        params = [f.replay.heads.file_key(n) for n in g.no_grad_params]
        levels = g.no_grad_levels
        if not params and not levels:
            continue
        parts = ([f"parameters {', '.join(params)}"] if params else []) + (
            [f"the RPN features of {', '.join(levels)}"] if levels else []
        )
        msg = f"{name}: {' and '.join(parts)} received no gradient from this batch"
        ev = {"params": params, "levels": levels}
        out.append(Hit(message=msg, profile=name, evidence=ev, minor=not params))
    return out


def dominant_term(g: ProfileGrads) -> tuple[Term | None, float]:
    """The loss term with the largest share of the squared gradient norm (the 3x3 conv, not
    split by term, left out; the mask term where the heads have a mask head)."""
    sq = {
        t: sum(v.by_term[t] ** 2 for v in g.params.values() if v.by_term[t] == v.by_term[t])
        for t in TERMS
    }
    total = sum(sq.values())
    if not total > 0:
        return None, math.nan
    term = max(sq, key=sq.get)
    return term, sq[term] / total


def _divided_by(r: Replay, name: str, term: Term, share: float) -> tuple[str, str]:
    """What the dominant term is divided by; a sharper fix when it is a box loss averaged over a
    few positives (the normalizer, not the learning rate, is then the cause)."""
    head = term.head
    first = r.losses[name].levels[head][0]
    d = first.avg_factor_bbox if term.part is Part.BOX else first.avg_factor
    pos = sum(s.pos for s in r.samples[head])
    sampled = sum(s.sampled for s in r.samples[head])
    by_pos = term.part is Part.BOX and d == pos and sampled > pos
    what = f"; {share:.0%} of it from {term}, divided by {d:g}"
    if not by_pos:
        return what, ""
    first_step = (
        f"divide {term} by all sampled samples (profile 'fixed'; MMDetection, torchvision and "
        "Detectron2 all do) instead of the positives; then "
    )
    return what + f", its positive {UNITS[head]}, of {sampled} sampled", first_step


def _step_share(r: Replay, g: ProfileGrads) -> float | None:
    """How far one SGD step at the recorded learning rate moves the heads, as a share of their
    weights' norm (the clipped gradient where the profile clips); None without a recorded lr."""
    lr = r.batch.meta.get("lr")
    weights = math.sqrt(
        sum(float(t.detach().double().square().sum()) for t in r.heads.params.values())
    )
    if lr is None or not weights > 0:
        return None
    return lr * g.clipped_norm / weights


def _exploding(r: Replay, g: ProfileGrads) -> tuple[bool, float | None]:
    """Whether a profile's gradient explodes: a step moving the heads by over EXPLODING_STEP of
    their norm where the lr is recorded (a norm alone says little: it scales with the features),
    else a norm over EXPLODING_NORM."""
    if not g.total_norm == g.total_norm:
        return False, None
    share = _step_share(r, g)
    if share is None:
        return g.total_norm > EXPLODING_NORM, None
    return share > EXPLODING_STEP, share


def exploding(f: Facts) -> list[Hit]:
    out = []
    for name, g in f.grads.items():
        explodes, share_of_weights = _exploding(f.replay, g)
        if not explodes:
            continue
        clip = ""
        if g.max_norm:
            clip = (
                f"; a clip at {g.max_norm} scales it by {g.clip_coef:.3g} to {g.clipped_norm:.3g}"
            )
        term, share = dominant_term(g)
        what, first_step = _divided_by(f.replay, name, term, share) if term else ("", "")
        msg = f"{name}: total head gradient norm {g.total_norm:.3g} (pre-clip){what}{clip}"
        if share_of_weights is not None:
            lr = f.replay.batch.meta["lr"]
            msg += (
                f"; one step at lr {lr:g} moves the heads by {share_of_weights:.0%} of their norm"
            )
        ev = {
            "step_share": share_of_weights,
            "total_norm": g.total_norm,
            "clip_coef": g.clip_coef,
            "clipped_norm": g.clipped_norm,
            "dominant_term": term,
            "dominant_share": share,
        }
        head = term.head if term else None
        out.append(Hit(message=msg, head=head, profile=name, evidence=ev, fix_prefix=first_step))
    return out


def vanishing(f: Facts) -> list[Hit]:
    return [
        Hit(
            message=f"{name}: total head gradient norm {g.total_norm:.3g}",
            profile=name,
            evidence={"total_norm": g.total_norm},
        )
        for name, g in f.grads.items()
        if g.total_norm == g.total_norm and g.total_norm < VANISHING_NORM
    ]


# ---- the symptom -------------------------------------------------------------------------------


def chance(r: Replay) -> float:
    """A foreground class's score from an uninformed classifier: a uniform softmax over the K
    classes and background, 1 / (K + 1)."""
    return 1.0 / (r.heads.num_classes + 1)


def _nothing_detected(f: Facts) -> float | None:
    """The best foreground score when no image with objects has a detection, else None."""
    r, s = f.replay, f.symptom
    with_gt = [i for i, im in enumerate(r.images) if im.gt > 0]
    if not with_gt or any(s.detections[i] for i in with_gt):
        return None
    return max(s.max_fg_score) if s.max_fg_score else 0.0


def _step(r: Replay) -> int | None:
    step = r.batch.meta.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _collapsed(f: Facts) -> tuple[float, float, int | None] | None:
    """(best score, chance, step) when nothing is detected and the scores say collapse: far
    below chance, or below it after the steps a detector needs to start detecting."""
    top = _nothing_detected(f)
    if top is None:
        return None
    ch, step = chance(f.replay), _step(f.replay)
    far_below = top < COLLAPSED_FRACTION * ch
    trained_below = step is not None and step >= EARLY_STEPS and top < ch
    return (top, ch, step) if far_below or trained_below else None


def collapse(f: Facts) -> list[Hit]:
    found = _collapsed(f)
    if found is None:
        return []
    top, ch, step = found
    s = f.symptom
    at = f" at step {step}" if step is not None else ""
    msg = (
        f"0 detections above score {s.score_thr} in every image with objects{at}; the best "
        f"foreground score is {top:.3g}, chance is {ch:.3g} (1/{f.replay.heads.num_classes + 1})"
    )
    ev = {"max_fg_score": top, "chance": ch, "step": step,
          "objectness_above_half": s.objectness_above_half}  # fmt: skip
    return [Hit(message=msg, head=Head.ROI, evidence=ev)]


def untrained_or_collapsed(f: Facts) -> list[Hit]:
    """Nothing detected with scores below chance, and no step to say whether the head has
    trained: an untrained head and a collapsed one look alike here."""
    top = _nothing_detected(f)
    r = f.replay
    if top is None or _step(r) is not None or _collapsed(f) or top >= chance(r):
        return []
    msg = (
        f"0 detections above score {f.symptom.score_thr} in every image with objects and "
        f"foreground scores below chance (best {top:.3g}, chance {chance(r):.3g}): an untrained "
        "head (its background bias grows first) or a collapsed one"
    )
    ev = {"max_fg_score": top, "chance": chance(r), "step": None}
    return [Hit(message=msg, head=Head.ROI, evidence=ev)]
