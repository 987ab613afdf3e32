"""The checks behind the findings: each looks at the replay's numbers and returns hits. The rule
table (``findings.RULES``) gives every check its code, severity, evidence fields and fix."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..replay.engine import Replay
from ..vocab import BOX_TERMS, Background, Framework, Head, Part, Stage, Term
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
VANISHING_NORM = 1e-6
# evidence lists are cut to this many entries
EVIDENCE_ITEMS = 20
LOSS_COLUMN = {Part.CLS: "loss_cls", Part.BOX: "loss_bbox", None: "gradient"}


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
    evidence: dict = field(default_factory=dict)
    minor: bool = False
    fix: str | None = None
    fix_prefix: str = ""  # said before the rule's fix, where this case has a sharper first step


# ---- the batch ---------------------------------------------------------------------------------


def suspicions(code: str):
    """A check that turns the batch's suspicions of ``code`` into hits."""

    def check(f: Facts) -> list[Hit]:
        out = []
        for s in f.replay.batch.suspicions:
            if s.code == code:
                extra = {"box": s.box} if s.box is not None and "box" not in s.evidence else {}
                ev = {**s.evidence, **extra}
                out.append(Hit(message=s.message, image=s.image, level=s.level, evidence=ev))
        return out

    return check


def empty_gt(f: Facts) -> list[Hit]:
    """Images without usable GT: none in the dump, all ignored, or all left out."""
    r = f.replay
    out = suspicions("empty-gt-image")(f)
    named = {h.image for h in out}
    for im in r.images:
        if im.gt > 0 or im.image in named:
            continue
        parts = [
            (im.gt_ignored, "ignored"),
            (im.gt_bad_label, f"labelled outside 0..{r.heads.num_classes - 1}"),
            (im.gt_nonfinite, "non-finite"),
        ]
        why = ", ".join(f"{n} {what}" for n, what in parts if n)
        msg = (
            f"image {im.image} has no usable GT box ({why}), so it trains as an image without "
            "objects"
        )
        ev = {"ignored": im.gt_ignored, "bad_label": im.gt_bad_label, "nonfinite": im.gt_nonfinite}
        out.append(Hit(message=msg, image=im.image, evidence=ev))
    return out


def _label_facts(r: Replay) -> tuple[list[int], list[int], bool]:
    """All dump labels, the distinct dropped ones, and whether they look 1-based."""
    labels = [lab for img in r.batch.gt_labels for lab in img.tolist()]
    bad = sorted({d.label for d in r.gt.dropped_labels})
    return labels, bad, bool(labels) and min(labels) >= 1 and bad == [r.heads.num_classes]


def labels_one_based(f: Facts) -> list[Hit]:
    """Labels 1..K: an error where label K collides with the background (or falls beyond the
    classifier); minor where the run is torchvision's (whose own labels are 1-based) and the
    labels never use class 0, the mark of its raw labels passed as they are."""
    r = f.replay
    labels, _, one_based = _label_facts(r)
    k = r.heads.num_classes
    if r.gt.dropped_labels and one_based:
        where = (
            f"column {k}, the background of this {r.heads.layout} checkpoint"
            if r.heads.background is Background.LAST
            else f"beyond the last class {k - 1}"
        )
        msg = (
            f"labels run 1..{max(labels)}: they look 1-based; label {k} lands on {where}, and "
            "every class is shifted by one"
        )
    elif _raw_torchvision_labels(r, labels):
        msg = (
            f"labels run {min(labels)}..{max(labels)} and never use class 0 in a torchvision run, "
            "whose own labels are 1-based (its label j is class j-1 here): if targets['labels'] "
            "were passed as they are, every class is shifted by one"
        )
    else:
        return []
    ev = {"min_label": min(labels), "max_label": max(labels), "num_classes": k,
          "dropped": len(r.gt.dropped_labels)}  # fmt: skip
    image = r.gt.dropped_labels[0].image if r.gt.dropped_labels else None
    return [Hit(message=msg, image=image, evidence=ev, minor=not one_based)]


def _raw_torchvision_labels(r: Replay, labels: list[int]) -> bool:
    meta = r.batch.meta
    by_hand = meta.get("framework") == Framework.TORCHVISION and meta.get("adapter") is None
    return by_hand and bool(labels) and min(labels) >= 1


def label_out_of_range(f: Facts) -> list[Hit]:
    r = f.replay
    dropped = r.gt.dropped_labels
    _, bad, one_based = _label_facts(r)
    if not dropped or one_based:
        return []
    k = r.heads.num_classes
    msg = (
        f"{len(dropped)} GT boxes have labels {bad} outside 0..{k - 1}: they were left out of "
        "the replay"
    )
    boxes = [[d.image, d.box] for d in dropped[:EVIDENCE_ITEMS]]
    ev = {"labels": bad, "num_classes": k, "boxes": boxes}
    return [Hit(message=msg, image=dropped[0].image, evidence=ev)]


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


def nonfinite_weights(f: Facts) -> list[Hit]:
    heads = f.replay.heads
    bad = [
        heads.file_key(n) for n, t in heads.params.items() if not bool(t.detach().isfinite().all())
    ]
    if not bad:
        return []
    return [
        Hit(message=f"non-finite checkpoint weights: {', '.join(bad)}", evidence={"params": bad})
    ]


# ---- NaN/Inf origins ---------------------------------------------------------------------------


def _origin_hit(o: Origin, fix: str | None) -> Hit:
    msg = (
        f"{o.profile}: {o.head} {LOSS_COLUMN[o.part]} at {o.level} is {o.kind}; first broken "
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
        evidence=ev,
        fix=fix,
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
            out.append(Hit(message=msg, head=Head.RPN, level=level.name, evidence=ev))
    return out


def matches_no_anchor(f: Facts) -> list[Hit]:
    """GTs whose best anchor IoU is 0; minor where the matcher does not then take every anchor."""
    r = f.replay
    every = r.config.rpn_matcher.every_candidate_positive_for_empty_overlap
    out = []
    for i, (im, gts) in enumerate(zip(r.rpn.images, r.gt.boxes)):
        n = r.images[i].rpn_pos_candidates
        for g in (im.gt_best == 0).nonzero().flatten().tolist():
            box = [round(v, 1) for v in gts[g].tolist()]
            msg = f"image {i} box {r.gt.dump_index(i, g)} {box} overlaps no anchor (best IoU 0)"
            if every:
                msg += f": low-quality matching makes all {n} candidate anchors positive"
            ev = {"box": r.gt.dump_index(i, g), "rpn_pos_candidates": n}
            out.append(Hit(message=msg, head=Head.RPN, image=i, evidence=ev, minor=not every))
    return out


def without_positive(f: Facts) -> list[Hit]:
    r = f.replay
    out = []
    for i, im in enumerate(r.rpn.images):
        for g in ((~im.gt_has_pos) & (im.gt_best > 0)).nonzero().flatten().tolist():
            best, j = float(im.gt_best[g]), r.gt.dump_index(i, g)
            msg = f"image {i} box {j} gets no positive anchor (best IoU {best:.2f} < min_pos_iou)"
            out.append(
                Hit(message=msg, head=Head.RPN, image=i, evidence={"box": j, "best_iou": best})
            )
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
    split by term, left out)."""
    sq = {
        t: sum(v.by_term[t] ** 2 for v in g.params.values() if v.by_term[t] == v.by_term[t])
        for t in BOX_TERMS
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


def exploding(f: Facts) -> list[Hit]:
    out = []
    for name, g in f.grads.items():
        if not (g.total_norm == g.total_norm and g.total_norm > EXPLODING_NORM):
            continue
        clip = ""
        if g.max_norm:
            clip = (
                f"; a clip at {g.max_norm} scales it by {g.clip_coef:.3g} to {g.clipped_norm:.3g}"
            )
        term, share = dominant_term(g)
        what, first_step = _divided_by(f.replay, name, term, share) if term else ("", "")
        msg = f"{name}: total head gradient norm {g.total_norm:.3g} (pre-clip){what}{clip}"
        ev = {
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


def collapse(f: Facts) -> list[Hit]:
    r, s = f.replay, f.symptom
    with_gt = [i for i, im in enumerate(r.images) if im.gt > 0]
    if not with_gt or any(s.detections[i] for i in with_gt):
        return []
    top = max(s.max_fg_score) if s.max_fg_score else 0.0
    msg = (
        f"0 detections above score {s.score_thr} in every image with objects; the best "
        f"foreground score is {top:.3g}"
    )
    ev = {"max_fg_score": top, "objectness_above_half": s.objectness_above_half}
    return [Hit(message=msg, head=Head.ROI, evidence=ev)]
