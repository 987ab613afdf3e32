"""Findings: rules over the replay's numbers, each with evidence and a concrete fix.

Codes are an interface (users grep them in CI); they are listed in the README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..replay.engine import Replay
from .gradients import ProfileGrads
from .nan_trace import Origin
from .symptom import Symptom

SEVERITIES = ("error", "warning", "info")
# a per-sample weight that varies more than this across levels is an imbalance
LEVEL_WEIGHT_RATIO = 10.0
# share of the squared classification gradient from negatives above which they dominate (count
# imbalance alone, ~97% in a sparse healthy batch, stays below it)
BACKGROUND_SHARE = 0.99
# the gradient share counts as explained by sample counts when the positives' part of it is at least
# this fraction of their share of the samples
BACKGROUND_COUNT_SLACK = 0.5
# 10x the max_norm=35 MMDetection suggests for clipping
EXPLODING_NORM = 350.0
VANISHING_NORM = 1e-6

FIX = {
    "nan-empty-mean": "normalize every level by one shared avg_factor = max(total sampled, 1) (profile 'fixed', as "
    "MMDetection's avg_factor) instead of a per-level mean; an empty level then adds 0 with a live graph",
    "input": "the features are already non-finite: look upstream of the heads (backbone/FPN BatchNorm eps, fp16 overflow, "
    "input normalization, learning rate)",
    "weights": "training had diverged before this checkpoint: restart from an earlier one with a lower LR, a longer warmup "
    "or gradient clipping (max_norm=35)",
    "outputs": "lower the learning rate or enable gradient clipping (max_norm=35); check fp16 overflow of logits and deltas",
    "proposals": "proposals decoded to Inf/NaN: clip dw/dh at log(1000/16) when decoding and lower the learning rate",
    "targets": "drop GT boxes with x2 <= x1 or y2 <= y1 (or under 1 px) after the augmentation pipeline, before the loss",
    "per-sample loss": "compute the losses in float32 and check the logits' magnitude",
    "level loss": "compute the losses in float32; the per-level sum overflowed",
    "gradients": "a loss with an undefined gradient at 0 (smooth-L1 with beta 0 written as 0.5 d^2 / beta): use an exact L1",
    "degenerate-gt": "drop boxes with x2 <= x1 or y2 <= y1 after the augmentation pipeline (torchvision asserts this; a "
    "zero-size box gives log(0) regression targets)",
    "nonfinite-gt": "find the augmentation (or annotation conversion) that produces NaN/Inf coordinates and drop or "
    "fix those boxes before the loss; clip boxes to the image after every geometric transform",
    "gt-outside-image": "clip boxes to the image after resizing, and check they are rescaled with the image",
    "gt-xywh-suspected": "convert (x, y, w, h) to (x1, y1, x2, y2): x2 = x + w, y2 = y + h",
    "labels-one-based": "subtract 1 from the labels: the dump wants foreground classes 0..K-1 (torchvision's label j is class j-1 here)",
    "label-out-of-range": "map dataset categories to 0..K-1 for the checkpoint's K classes (check the dataset's classes and num_classes)",
    "empty-gt-image": "nothing to fix if background images are intended: they add negatives only (Detectron2 drops them unless "
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS=False)",
    "no-positive-level": "normal for one small batch; if it holds over many batches, match the level's anchor sizes to the objects",
    "gt-without-positive": "add anchor sizes or ratios that fit this box, or lower the RPN assigner's min_pos_iou",
    "gt-matches-no-anchor": "clip or drop boxes that overlap no anchor (outside the image or zero size): under torchvision/"
    "Detectron2 low-quality matching every anchor becomes positive",
    "background-dominance": "balance positives and negatives: a shared avg_factor (profile 'fixed') or a positive weight; a "
    "per-level mean gives negatives of sparse levels huge weights",
    "background-dominance-counts": "few positives for the sampler budget: normal for images with few objects; if it persists, "
    "raise the sampler's positive_fraction or add positives (smaller/more anchors)",
    "level-weight-imbalance": "use one shared avg_factor (profile 'fixed') so every sample weighs the same on every level",
    "exploding-gradient": "enable gradient clipping (max_norm=35, norm_type=2) and scale the learning rate to the batch "
    "(lr 0.02 is for 16 images)",
    "no-gradient": "a parameter without gradient differs between ranks under DDP (the known hang with empty-GT images): "
    "keep every level and head in the graph with zero-weighted terms (profile 'fixed' does), or set "
    "find_unused_parameters",
    "vanishing-gradient": "the loss barely moves the heads: check loss weights and that the normalizer is not far larger "
    "than the number of samples",
    "nonfinite-weights": "training diverged before this checkpoint: take an earlier checkpoint and lower the LR or enable clipping",
    "nonfinite-features": "the NaN/Inf comes from upstream of the heads: check the backbone/FPN (BatchNorm with tiny batches, "
    "FrozenBN eps), fp16, and the input normalization",
    "unsafe-pickle-global": "do not open this file with torch.load(weights_only=False) or pickle: it tries to run "
    "code on loading. Get the weights from a source you trust; lossdoctor read only its tensors",
    "collapse-to-background": "the classifier predicts background everywhere: compare profiles (a per-level mean over-weights "
    "negatives), check labels against the background column, lower the LR",
}


@dataclass
class Finding:
    severity: str
    code: str
    message: str
    fix: str
    head: str | None = None
    level: str | None = None
    profile: str | None = None
    image: int | None = None
    evidence: dict = field(default_factory=dict)


def _f(severity, code, message, fix_key=None, **kw) -> Finding:
    return Finding(severity, code, message, FIX[fix_key or code], **kw)


def _data_findings(r: Replay) -> list[Finding]:
    out = []
    for s in r.batch.suspicions:
        sev = {
            "degenerate-gt": "error",
            "gt-xywh-suspected": "error",
            "nonfinite-features": "error",
            "nonfinite-gt": "error",
            "gt-outside-image": "warning",
            "empty-gt-image": "info",
        }[s.code]
        out.append(
            _f(
                sev,
                s.code,
                s.message,
                image=s.image,
                level=s.level,
                evidence={
                    **s.evidence,
                    **({"box": s.box} if s.box is not None and "box" not in s.evidence else {}),
                },
            )
        )
    out += _no_usable_gt(r)
    k = r.heads.num_classes
    dropped = r.dropped_labels
    if dropped:
        labels = [lab for img in r.batch.gt_labels for lab in img.tolist()]
        bad = sorted({d[2] for d in dropped})
        one_based = min(labels) >= 1 and bad == [k]
        where = (
            f"column {k}, the background of this {r.heads.layout} checkpoint"
            if r.heads.background == "last"
            else f"beyond the last class {k - 1}"
        )
        if one_based:
            out.append(
                _f(
                    "error",
                    "labels-one-based",
                    f"labels run 1..{max(labels)}: they look 1-based; label {k} lands on {where}, and every class is shifted by one",
                    image=dropped[0][0],
                    evidence={
                        "min_label": min(labels),
                        "max_label": max(labels),
                        "num_classes": k,
                        "dropped": len(dropped),
                    },
                )
            )
        else:
            out.append(
                _f(
                    "error",
                    "label-out-of-range",
                    f"{len(dropped)} GT boxes have labels {bad} outside 0..{k - 1}: they were left out of the replay",
                    image=dropped[0][0],
                    evidence={
                        "labels": bad,
                        "num_classes": k,
                        "boxes": [[i, j] for i, j, _ in dropped[:20]],
                    },
                )
            )
    for what, replaced in (("checkpoint", r.heads.replaced), ("batch", r.batch.replaced)):
        code = [x.name for x in replaced if x.code]
        if code:
            out.append(
                _f(
                    "error",
                    "unsafe-pickle-global",
                    f"the {what} file names {', '.join(code)}, code that unpickling would have run; lossdoctor "
                    "put an inert placeholder in its place and did not run it",
                    evidence={"file": what, "globals": code},
                )
            )
    bad_params = [
        r.heads.keys[name.split(".")[0]] + "." + name.split(".")[1]
        for name, t in r.heads.params.items()
        if not bool(t.detach().isfinite().all())
    ]
    if bad_params:
        out.append(
            _f(
                "error",
                "nonfinite-weights",
                f"non-finite checkpoint weights: {', '.join(bad_params)}",
                evidence={"params": bad_params},
            )
        )
    return out


def _no_usable_gt(r: Replay) -> list[Finding]:
    """Images whose boxes were all left out of the replay (the batch already names empty and
    all-ignored images)."""
    named = {s.image for s in r.batch.suspicions if s.code == "empty-gt-image"}
    out = []
    for im in r.images:
        if im.gt > 0 or im.image in named:
            continue
        parts = [
            (im.gt_ignored, "ignored"),
            (im.gt_bad_label, f"labelled outside 0..{r.heads.num_classes - 1}"),
            (im.gt_nonfinite, "non-finite"),
        ]
        why = ", ".join(f"{n} {what}" for n, what in parts if n)
        out.append(
            _f(
                "info",
                "empty-gt-image",
                f"image {im.image} has no usable GT box ({why}), so it trains as an image without objects",
                image=im.image,
                evidence={
                    "ignored": im.gt_ignored,
                    "bad_label": im.gt_bad_label,
                    "nonfinite": im.gt_nonfinite,
                },
            )
        )
    return out


def _matching_findings(r: Replay) -> list[Finding]:
    out = []
    if sum(im.gt for im in r.images):
        for lvl in r.rpn:
            cand = int((lvl.labels == 1).sum())
            if cand == 0:
                size = r.config.anchors.sizes[r.batch.levels.index(lvl.name)]
                out.append(
                    _f(
                        "info",
                        "no-positive-level",
                        f"no anchor of {lvl.name} (sizes {list(size)} px) is positive for any GT in this batch",
                        head="rpn",
                        level=lvl.name,
                        evidence={"anchor_sizes": list(size), "gt_sizes": _gt_size_range(r)},
                    )
                )
    for i, (best, gts) in enumerate(zip(r.gt_best_iou, r.gt_boxes)):
        for g in range(gts.shape[0]):
            j = int(r.gt_sources[i][g])
            b = float(best[g])
            if b == 0:
                out.append(
                    _f(
                        "error" if r.config.rpn_matcher.style != "mmdet" else "warning",
                        "gt-matches-no-anchor",
                        f"image {i} box {j} {[round(v, 1) for v in gts[g].tolist()]} overlaps no anchor (best IoU 0)"
                        + (
                            f": low-quality matching makes all {r.images[i].rpn_pos_candidates} candidate anchors positive"
                            if r.config.rpn_matcher.style != "mmdet"
                            else ""
                        ),
                        head="rpn",
                        image=i,
                        evidence={"box": j, "rpn_pos_candidates": r.images[i].rpn_pos_candidates},
                    )
                )
        hit = r.gt_has_pos[i].tolist()
        for g in range(gts.shape[0]):
            if not hit[g] and float(best[g]) > 0:
                j = int(r.gt_sources[i][g])
                out.append(
                    _f(
                        "warning",
                        "gt-without-positive",
                        f"image {i} box {j} gets no positive anchor (best IoU {float(best[g]):.2f} < min_pos_iou)",
                        head="rpn",
                        image=i,
                        evidence={"box": j, "best_iou": float(best[g])},
                    )
                )
    return out


def _gt_size_range(r: Replay) -> list[float]:
    sizes = [
        float(((b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)).sqrt().min())
        for b in r.gt_boxes
        if b.shape[0]
    ]
    tops = [
        float(((b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)).sqrt().max())
        for b in r.gt_boxes
        if b.shape[0]
    ]
    return [round(min(sizes), 1), round(max(tops), 1)] if sizes else []


def _origin_findings(origins: list[Origin]) -> list[Finding]:
    out = []
    for o in origins:
        code = "nan-empty-mean" if o.stage == "normalizer" else "nonfinite-loss"
        term = {"cls": "loss_cls", "bbox": "loss_bbox", "grad": "gradient"}[o.term]
        msg = (
            f"{o.profile}: {o.head} {term} at {o.level} is {o.kind}; first broken stage: {o.cause}"
        )
        out.append(
            _f(
                "error",
                code,
                msg,
                None if code == "nan-empty-mean" else o.stage,
                head=o.head,
                level=o.level,
                profile=o.profile,
                image=o.image,
                evidence={
                    "stage": o.stage,
                    "nan": o.nan,
                    "posinf": o.posinf,
                    "neginf": o.neginf,
                    "index": o.index,
                    "gt": o.gt,
                },
            )
        )
    return out


def _gradient_findings(r: Replay, grads: dict[str, ProfileGrads]) -> list[Finding]:
    out = []
    for name, g in grads.items():
        for head in ("rpn", "roi"):
            share = g.neg_share.get(head, math.nan)
            if share == share and share > BACKGROUND_SHARE:
                pos = sum(s.pos for s in r.samples[head])
                neg = sum(s.sampled for s in r.samples[head]) - pos
                counts = neg / max(pos + neg, 1)
                # equal per-sample gradients would give the count share; beyond it, the weighting amplifies negatives
                by_counts = 1 - share >= BACKGROUND_COUNT_SLACK * (1 - counts)
                msg = (
                    f"{name}: negatives carry {share:.1%} of the {head} classification gradient "
                    f"({neg} negatives vs {pos} positives sampled{': the counts alone explain it' if by_counts else ''})"
                )
                out.append(
                    _f(
                        "info" if by_counts else "warning",
                        "background-dominance",
                        msg,
                        "background-dominance-counts" if by_counts else None,
                        head=head,
                        profile=name,
                        evidence={
                            "neg_share": share,
                            "neg_count_share": counts,
                            "pos": pos,
                            "neg": neg,
                        },
                    )
                )
            weights = [
                l.sample_weight
                for l, s in zip(r.losses[name].levels[head], r.samples[head])
                if s.sampled > 0 and l.sample_weight > 0
            ]
            if len(weights) > 1 and max(weights) / min(weights) > LEVEL_WEIGHT_RATIO:
                levels = [s.name for s in r.samples[head] if s.sampled > 0]
                hi = levels[weights.index(max(weights))]
                lo = levels[weights.index(min(weights))]
                out.append(
                    _f(
                        "warning",
                        "level-weight-imbalance",
                        f"{name}: one {head} sample at {hi} weighs {max(weights) / min(weights):.0f}x one at {lo}",
                        head=head,
                        profile=name,
                        evidence={
                            "max_weight": max(weights),
                            "min_weight": min(weights),
                            "levels": [hi, lo],
                        },
                    )
                )
        if g.no_grad:
            params = [
                r.heads.keys[k.split(".")[0]] + "." + k.split(".")[1]
                for k in g.no_grad
                if "." in k and not k.startswith("rpn features")
            ]
            levels = [k.split()[-1] for k in g.no_grad if k.startswith("rpn features")]
            parts = ([f"parameters {', '.join(params)}"] if params else []) + (
                [f"the RPN features of {', '.join(levels)}"] if levels else []
            )
            out.append(
                _f(
                    "warning" if params else "info",
                    "no-gradient",
                    f"{name}: {' and '.join(parts)} received no gradient from this batch",
                    profile=name,
                    evidence={"params": params, "levels": levels},
                )
            )
        if g.total_norm == g.total_norm:
            if g.total_norm > EXPLODING_NORM:
                clip = (
                    f"; a clip at {g.max_norm} scales it by {g.clip_coef:.3g} to {g.clipped_norm:.3g}"
                    if g.max_norm
                    else ""
                )
                term, share = _dominant_term(g)
                what, head, by_pos = "", None, False
                if term:
                    head = term.split("_")[0]
                    first = r.losses[name].levels[head][0]
                    d = first.avg_factor_bbox if term.endswith("box") else first.avg_factor
                    pos, sampled = (
                        sum(s.pos for s in r.samples[head]),
                        sum(s.sampled for s in r.samples[head]),
                    )
                    by_pos = term.endswith("box") and d == pos and sampled > pos
                    unit = "positive " + ("anchors" if head == "rpn" else "RoIs")
                    what = f"; {share:.0%} of it from {term}, divided by {d:g}" + (
                        f", its {unit}, of {sampled} sampled" if by_pos else ""
                    )
                f = _f(
                    "warning",
                    "exploding-gradient",
                    f"{name}: total head gradient norm {g.total_norm:.3g} (pre-clip){what}{clip}",
                    head=head,
                    profile=name,
                    evidence={
                        "total_norm": g.total_norm,
                        "clip_coef": g.clip_coef,
                        "clipped_norm": g.clipped_norm,
                        "dominant_term": term,
                        "dominant_share": share,
                    },
                )
                if by_pos:
                    # a box loss averaged over a few positives: the normalizer, not the learning rate, is the cause
                    f.fix = (
                        f"divide {term} by all sampled samples (profile 'fixed'; MMDetection, torchvision and "
                        f"Detectron2 all do) instead of the positives; then {f.fix}"
                    )
                out.append(f)
            elif g.total_norm < VANISHING_NORM:
                out.append(
                    _f(
                        "warning",
                        "vanishing-gradient",
                        f"{name}: total head gradient norm {g.total_norm:.3g}",
                        profile=name,
                        evidence={"total_norm": g.total_norm},
                    )
                )
    return out


def _dominant_term(g: ProfileGrads) -> tuple[str | None, float]:
    """The loss term with the largest share of the squared gradient norm (3x3-conv parameters, not split, left out)."""
    sq = {
        t: sum(v[t] ** 2 for v in g.params.values() if v[t] == v[t])
        for t in ("rpn_cls", "rpn_box", "roi_cls", "roi_box")
    }
    total = sum(sq.values())
    if not total > 0:
        return None, math.nan
    term = max(sq, key=sq.get)
    return term, sq[term] / total


def _symptom_findings(r: Replay, s: Symptom) -> list[Finding]:
    with_gt = [i for i, im in enumerate(r.images) if im.gt > 0]
    if with_gt and all(s.detections[i] == 0 for i in with_gt):
        top = max(s.max_fg_score) if s.max_fg_score else 0.0
        return [
            _f(
                "error",
                "collapse-to-background",
                f"0 detections above score {s.score_thr} in every image with objects; the best foreground score is {top:.3g}",
                head="roi",
                evidence={"max_fg_score": top, "objectness_above_half": s.objectness_above_half},
            )
        ]
    return []


def findings(
    r: Replay, grads: dict[str, ProfileGrads], origins: list[Origin], s: Symptom
) -> list[Finding]:
    """Every finding, most severe first."""
    out = (
        _data_findings(r)
        + _origin_findings(origins)
        + _matching_findings(r)
        + _gradient_findings(r, grads)
        + _symptom_findings(r, s)
    )
    return sorted(out, key=lambda f: SEVERITIES.index(f.severity))
