"""Findings: one declared table of rules over the replay's numbers.

Each :class:`Rule` names its code (an interface: users grep codes in CI), its severity (and the
lesser one some cases take), a one-line summary, the evidence fields its findings carry, its fix
and the check that finds it. ``lossdoctor explain`` and docs/report.md's catalogue are read
from this table; the stage causes of non-finite losses are in ``nan_trace.CAUSES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..vocab import Severity
from . import checks as c
from .finding import Finding
from .precision import DRIFT_TOLERANCE


@dataclass(frozen=True, kw_only=True)
class Rule:
    code: str
    severity: Severity
    summary: str
    evidence: tuple[str, ...]
    fix: str
    check: Callable[[c.Facts], list[Finding]]
    minor: Severity | None = None  # the severity of hits the check marks minor
    minor_fix: str | None = None  # their fix, where it differs


E, W, I = Severity.ERROR, Severity.WARNING, Severity.INFO  # noqa: E741
ORIGIN = ("stage", "nan", "posinf", "neginf", "index", "gt")

RULES: tuple[Rule, ...] = (
    Rule(
        code="unsafe-pickle-global",
        severity=E,
        check=c.unsafe_globals,
        summary="a file names code that unpickling would have run (it did not run)",
        evidence=("file", "globals"),
        fix="do not open this file with torch.load(weights_only=False) or pickle: it tries to run "
        "code on loading. Get the weights from a source you trust; lossdoctor read only its "
        "tensors",
    ),
    Rule(
        code="nonfinite-gt",
        severity=E,
        check=c.suspicions(
            "nonfinite-gt", "GT boxes with NaN/Inf coordinates, left out of the replay"
        ),
        summary="GT boxes with NaN/Inf coordinates (left out of the replay)",
        evidence=("boxes", "coordinates", "torchvision_asserts", "box"),
        fix="find the augmentation (or annotation conversion) that produces NaN/Inf coordinates "
        "and drop or fix those boxes before the loss; clip boxes to the image after every "
        "geometric transform",
    ),
    Rule(
        code="degenerate-gt",
        severity=E,
        check=c.degenerate_gt,
        summary="a GT box with zero width or height, or with swapped corners (x2 < x1, y2 < y1)",
        evidence=("box", "width", "height", "swapped", "rpn_pos_candidates"),
        fix="swap the corners named (x1 <-> x2, y1 <-> y2) where a transform flipped them, and "
        "drop zero-size boxes after the augmentation pipeline (torchvision asserts x2 > x1, "
        "y2 > y1; a zero-size box gives log(0) regression targets, and overlaps no anchor, so "
        "low-quality matching makes every anchor positive for it)",
    ),
    Rule(
        code="gt-xywh-suspected",
        severity=E,
        check=c.suspicions("gt-xywh-suspected", "GT boxes that look like (x, y, w, h)"),
        summary="GT boxes that look like (x, y, w, h) read as (x1, y1, x2, y2): many inverted, "
        "all fitting as (x, y, w, h)",
        evidence=("inverted", "boxes", "box"),
        fix="convert (x, y, w, h) to (x1, y1, x2, y2): x2 = x + w, y2 = y + h",
    ),
    Rule(
        code="nonfinite-features",
        severity=E,
        check=c.suspicions("nonfinite-features", "NaN/Inf values in the dumped FPN features"),
        summary="NaN/Inf values in the dumped FPN features",
        evidence=("nan", "inf", "images"),
        fix="the NaN/Inf comes from upstream of the heads: check the backbone/FPN (BatchNorm with "
        "tiny batches, FrozenBN eps), fp16, and the input normalization",
    ),
    Rule(
        code="labels-one-based",
        severity=E,
        minor=W,
        check=c.labels_one_based,
        summary="labels look 1-based: label K lands on the background or beyond (warning: a "
        "torchvision run whose labels never use class 0)",
        evidence=("min_label", "max_label", "num_classes", "dropped"),
        fix="subtract 1 from the labels: the dump wants foreground classes 0..K-1 (torchvision's "
        "label j is class j-1 here)",
    ),
    Rule(
        code="label-out-of-range",
        severity=E,
        check=c.label_out_of_range,
        summary="labels outside the run's K classes, named as the run names them (0..K-1; "
        "torchvision 1..K): left out of the replay",
        evidence=("labels", "num_classes", "boxes"),
        fix="map dataset categories to the checkpoint's K classes: 0..K-1 (MMDetection, "
        "Detectron2), 1..K with 0 the background (torchvision); check num_classes",
    ),
    Rule(
        code="gt-labelled-background",
        severity=E,
        check=c.gt_labelled_background,
        summary="GT boxes labelled with the run's background class (torchvision's 0): the RPN "
        "trains them as objects, the RoI head as background",
        evidence=("label", "num_classes", "boxes"),
        fix="torchvision's labels are 1..K (0 is the background): add 1 to 0-based dataset "
        "labels, or drop the boxes that should not be objects",
    ),
    Rule(
        code="nonfinite-weights",
        severity=E,
        check=c.nonfinite_weights,
        summary="non-finite weights in the checkpoint: the heads', or any other tensor's (the "
        "backbone and neck, scanned without running them)",
        evidence=("params", "modules", "values"),
        fix="training diverged before this checkpoint: take an earlier checkpoint and lower the "
        "LR or enable clipping",
    ),
    Rule(
        code="nan-empty-mean",
        severity=E,
        check=c.empty_mean,
        summary="a loss term is NaN because it averages over an empty set",
        evidence=ORIGIN,
        fix="normalize every level by one shared avg_factor = max(total sampled, 1) (profile "
        "'fixed', as MMDetection's avg_factor) instead of a per-level mean; an empty level then "
        "adds 0 with a live graph",
    ),
    Rule(
        code="nonfinite-loss",
        severity=E,
        check=c.nonfinite_loss,
        summary="a non-finite loss or gradient, with the first stage that broke",
        evidence=ORIGIN,
        fix="see the cause of its first broken stage (lossdoctor explain nonfinite-loss)",
    ),
    Rule(
        code="gt-matches-no-anchor",
        severity=E,
        minor=W,
        check=c.matches_no_anchor,
        summary="a GT box overlaps no anchor (error where low-quality matching then makes every "
        "anchor positive)",
        evidence=("box", "rpn_pos_candidates"),
        fix="clip or drop boxes that overlap no anchor (outside the image or zero size): under "
        "torchvision/Detectron2 low-quality matching every anchor becomes positive",
    ),
    Rule(
        code="collapse-to-background",
        severity=E,
        check=c.collapse,
        summary="0 detections in every image with objects, with foreground scores far below "
        f"chance 1/(K+1) (under {c.COLLAPSED_FRACTION:g} of it), or below it after "
        f"{c.EARLY_STEPS} steps",
        evidence=("max_fg_score", "chance", "step", "objectness_above_half"),
        fix="the classifier predicts background everywhere: compare profiles (a per-level mean "
        "over-weights negatives), check labels against the background column, lower the LR",
    ),
    Rule(
        code="untrained-or-collapsed",
        severity=W,
        check=c.untrained_or_collapsed,
        summary="0 detections and foreground scores below chance, and the dump does not say "
        "which step it is: an untrained head and a collapsed one look alike",
        evidence=("max_fg_score", "chance", "step"),
        fix=f"tell them apart by the step: a head in its first {c.EARLY_STEPS} or so steps (the "
        "LR warmup) does not detect yet; record meta['step'] (the adapters and Capture do), or "
        "inspect an earlier checkpoint: if that one detected, this one collapsed (compare "
        "profiles, check labels against the background column, lower the LR)",
    ),
    Rule(
        code="no-proposals",
        severity=E,
        check=c.no_proposals,
        summary="an image with GT got 0 proposals, and the step that removed them",
        evidence=(
            "gt",
            "anchors",
            "preselected",
            "finite",
            "large_enough",
            "scored",
            "kept",
            "dumped",
        ),  # fmt: skip
        fix="the RPN's outputs must give finite boxes of some size: lower the learning rate or "
        "enable gradient clipping (max_norm=35); clip dw/dh at log(1000/16) when decoding",
    ),
    Rule(
        code="mask-box-mismatch",
        severity=E,
        check=c.suspicions("mask-box-mismatch", "GT masks that do not sit in their boxes"),
        summary="a GT mask whose extent overlaps its box by less than IoU 0.5: boxes and masks "
        "out of step",
        evidence=("box", "mask_extent", "iou"),
        fix="apply every geometric augmentation (flip, crop, resize, rotate) to the masks and the "
        "boxes alike, and keep their order the same",
    ),
    Rule(
        code="empty-mask",
        severity=W,
        check=c.empty_mask,
        summary="positive RoIs whose mask target is all zeros",
        evidence=("rois", "boxes"),
        fix="check the masks of those GT boxes (empty after a crop, or a polygon that was not "
        "rasterized); drop instances whose mask is empty",
    ),
    Rule(
        code="mask-branch-skipped",
        severity=W,
        check=c.mask_branch_skipped,
        summary="a mask head, no positive RoI in the batch, and a loss code that leaves the empty "
        "mask term out of the graph (the DDP hang; the frameworks keep it in)",
        evidence=("positive_rois",),
        fix="keep the mask head in the graph on every rank with a zero-weighted term "
        "(mask_logits.sum() * 0, as torchvision and Detectron2 do), or set "
        "find_unused_parameters=True",
    ),
    Rule(
        code="cascade-stage-starved",
        severity=W,
        minor=I,
        check=c.stage_starved,
        summary=f"a later cascade stage with at most {c.STAGE_MIN_POS} positive RoI in an image "
        f"with objects (info in the first {c.EARLY_STEPS} steps, where the earlier stages do not "
        "regress yet)",
        evidence=("stage", "iou", "images", "positives", "previous"),
        fix="the earlier stages' boxes do not reach the stage's IoU: check their box loss "
        "weights (stage_loss_weights) and regression normalization, or lower the stage's IoU",
    ),
    Rule(
        code="gt-outside-image",
        severity=W,
        check=c.suspicions("gt-outside-image", "GT boxes reach outside their image"),
        summary="a GT box reaches outside its image",
        evidence=("box", "image_size"),
        fix="clip boxes to the image after resizing, and check they are rescaled with the image",
    ),
    Rule(
        code="gt-without-positive",
        severity=W,
        minor=I,
        check=c.without_positive,
        summary="a GT box gets no positive anchor (its best IoU is below min_pos_iou; info where "
        f"at most {c.WITHOUT_POS_SHARE:.0%} of the batch's GT boxes do, as small objects do)",
        evidence=("box", "best_iou"),
        fix="add anchor sizes or ratios that fit this box, or lower the RPN assigner's min_pos_iou",
    ),
    Rule(
        code="rpn-positives-starved",
        severity=W,
        minor=I,
        check=c.positives_starved,
        summary=f"fewer than {c.STARVED_SHARE:.0%} of the GT objects reach a RoI positive "
        "through an RPN proposal, and where they are lost: positive anchors, sampled positives, "
        "proposals covering them, RoI positives (info in the first "
        f"{c.EARLY_STEPS} steps, where the RPN does not localize yet)",
        evidence=(
            "gt",
            *c.FUNNEL_KEYS.values(),
            "lost_at",
            "positive_anchors_per_level",
        ),  # fmt: skip
        fix="see where the objects are lost (the fix names the stage)",
    ),
    Rule(
        code="background-dominance",
        severity=W,
        minor=I,
        check=c.background_dominance,
        summary="negatives carry > 99% of the squared classification gradient (info when the "
        "sample counts alone explain it)",
        evidence=("neg_share", "neg_count_share", "pos", "neg"),
        fix="balance positives and negatives: a shared avg_factor (profile 'fixed') or a positive "
        "weight; a per-level mean gives negatives of sparse levels huge weights",
        minor_fix="few positives for the sampler budget: normal for images with few objects; if "
        "it persists, raise the sampler's positive_fraction or add positives (smaller/more "
        "anchors)",
    ),
    Rule(
        code="level-weight-imbalance",
        severity=W,
        check=c.level_weight_imbalance,
        summary="one sample's weight varies more than 10x across FPN levels",
        evidence=("max_weight", "min_weight", "levels"),
        fix="use one shared avg_factor (profile 'fixed') so every sample weighs the same on every "
        "level",
    ),
    Rule(
        code="exploding-gradient",
        severity=W,
        check=c.exploding,
        summary=f"one SGD step at the recorded lr moves the heads by over {c.EXPLODING_STEP:.0%} "
        f"of their weights' norm; without a recorded lr, a total head gradient norm over "
        f"{c.EXPLODING_NORM:g} (10x the usual max_norm=35); with the term that carries it",
        evidence=(
            "step_share",
            "total_norm",
            "clip_coef",
            "clipped_norm",
            "dominant_term",
            "dominant_share",
        ),  # fmt: skip
        fix="enable gradient clipping (max_norm=35, norm_type=2) and scale the learning rate to "
        "the batch (lr 0.02 is for 16 images)",
    ),
    Rule(
        code="vanishing-gradient",
        severity=W,
        check=c.vanishing,
        summary="total head gradient norm < 1e-6",
        evidence=("total_norm",),
        fix="the loss barely moves the heads: check loss weights and that the normalizer is not "
        "far larger than the number of samples",
    ),
    Rule(
        code="no-gradient",
        severity=W,
        minor=I,
        check=c.no_gradient,
        summary="a head parameter outside the graph on this batch: its terms are empty and the "
        "profile's loss code leaves empty terms out (legacy; empty_in_graph = false), the DDP hang "
        "of empty-GT batches; the frameworks keep them in, a zero gradient, not reported (info "
        "when only a level's features got none)",
        evidence=("params", "levels"),
        fix="a parameter without gradient differs between ranks under DDP (the known hang with "
        "empty-GT images): keep every level and head in the graph with zero-weighted terms "
        "(profile 'fixed' does), or set find_unused_parameters",
    ),
    Rule(
        code="fp16-forward-overflow",
        severity=E,
        minor=I,
        check=c.forward_overflow,
        summary="a head layer's output overflows the low precision (fp16) where fp32's is finite: "
        "Inf in the forward under autocast, NaN after it; the first such layer of a head (per "
        "RPN level or cascade stage), with the layers after it (info for a what-if precision)",
        evidence=("layer", "overflowed", "values", "max_abs", "limit", "terms", "after", "stage"),
        fix="keep that layer in fp32 (run it under torch.autocast(enabled=False) on .float() "
        "inputs, as the frameworks keep their losses), or bring its inputs into range: "
        "normalize the FPN outputs (GroupNorm in the neck) or lower the learning rate that blew "
        "the features up; bf16 has fp32's range",
    ),
    Rule(
        code="loss-scale-overflow",
        severity=W,
        minor=I,
        check=c.scale_overflow,
        summary="at the dump's loss scale the heads' gradients overflow fp16, so GradScaler skips "
        "the step; with the largest safe scale, and whether halving once clears it (info) or "
        "the scale is stuck; or the run skipped a step whose overflow is outside the heads",
        evidence=("loss_scale", "grad_max", "in", "safe_scale", "found_inf", "skipped"),
        fix="a one-off needs nothing (the scaler halves the scale); a stuck one: find the "
        "gradient named (a loss term whose gradient is large per sample, an unnormalized sum), "
        "clip before the scaler's unscale_ no further, or start GradScaler at the safe scale "
        "(init_scale)",
    ),
    Rule(
        code="loss-scale-collapsed",
        severity=E,
        minor=I,
        check=c.scale_collapsed,
        summary="the recorded GradScaler scale is below 1: the run has skipped step after step, "
        "and its gradients underflow in fp16",
        evidence=("loss_scale", "floor", "skipped", "safe_scale"),
        fix="find what overflows at every step (the loss-scale-overflow and fp16-forward-overflow "
        "findings of a captured step say which layer or gradient); keep that op in fp32, or "
        "train it in bf16",
    ),
    Rule(
        code="low-precision-loss-drift",
        severity=W,
        minor=I,
        check=c.loss_drift,
        summary=f"a term's loss in the low precision differs from fp32's on the same samples by "
        f"over {DRIFT_TOLERANCE:.0%}",
        evidence=("low", "fp32", "relative", "tolerance"),
        fix="the term's logits or deltas lose too much in the low precision: keep the layer that "
        "feeds it (named by the per-layer table) in fp32, or compute the loss from .float() "
        "outputs",
    ),
    Rule(
        code="empty-gt-image",
        severity=I,
        check=c.empty_gt,
        summary="an image without usable GT (none, all ignored, or all left out): negatives only",
        evidence=("ignored", "bad_label", "nonfinite"),
        fix="nothing to fix if background images are intended: they add negatives only "
        "(Detectron2 drops them unless DATALOADER.FILTER_EMPTY_ANNOTATIONS=False)",
    ),
    Rule(
        code="no-positive-level",
        severity=I,
        check=c.no_positive_level,
        summary="no anchor of a level is positive for any GT in the batch",
        evidence=("anchor_sizes", "gt_sizes"),
        fix="normal for one small batch; if it holds over many batches, match the level's anchor "
        "sizes to the objects",
    ),
)
BY_CODE = {r.code: r for r in RULES}


def rule(code: str) -> Rule:
    """The rule of a finding code; an unknown code is a KeyError naming the known ones."""
    try:
        return BY_CODE[code]
    except KeyError:
        raise KeyError(f"unknown finding code {code!r}; known: {', '.join(BY_CODE)}") from None


def to_finding(r: Rule, h: Finding) -> Finding:
    """A check's finding completed by its rule: code, severity and fix."""
    severity = r.minor if h.minor and r.minor else r.severity
    fix = h.fix or (r.minor_fix if h.minor and r.minor_fix else r.fix)
    return replace(
        h,
        code=r.code,
        severity=severity,
        fix=h.fix_prefix + fix,
        fix_prefix="",
        minor=False,
        cause=h.cause or _profile_free(h),
    )


def _profile_free(h: Finding) -> str | None:
    """A profile's hit says ``"<profile>: ..."``: what follows is the same problem under every
    profile that says it word for word."""
    prefix = f"{h.profile}: "
    return h.message[len(prefix) :] if h.profile and h.message.startswith(prefix) else None


def findings(facts: c.Facts) -> list[Finding]:
    """Every rule's findings, most severe first (in table order within a severity)."""
    out = [to_finding(r, h) for r in RULES for h in r.check(facts)]
    return sorted(out, key=lambda f: f.severity.rank)
