"""The checks behind the findings: each looks at the replay's numbers and returns hits. The rule
table (``findings.RULES``) gives every check its code, severity, evidence fields and fix."""

from ..finding import Finding
from .base import EARLY_STEPS, Facts
from .detections import COLLAPSED_FRACTION, chance, collapse, untrained_or_collapsed
from .gradients import (
    EXPLODING_NORM,
    EXPLODING_STEP,
    background_dominance,
    exploding,
    level_weight_imbalance,
    no_gradient,
    vanishing,
)
from .inputs import (
    degenerate_gt,
    empty_gt,
    gt_labelled_background,
    label_out_of_range,
    labels_one_based,
    nonfinite_weights,
    suspicions,
    unsafe_globals,
)
from .matching import WITHOUT_POS_SHARE, matches_no_anchor, no_positive_level, without_positive
from .origins import empty_mean, nonfinite_loss
from .precision import forward_overflow, loss_drift, scale_collapsed, scale_overflow
from .proposals import FUNNEL_KEYS, STARVED_SHARE, no_proposals, positives_starved
from .stages import STAGE_MIN_POS, empty_mask, mask_branch_skipped, stage_starved

__all__ = [
    "forward_overflow",
    "loss_drift",
    "scale_collapsed",
    "scale_overflow",
    "EARLY_STEPS",
    "Facts",
    "Finding",
    "suspicions",
    "degenerate_gt",
    "empty_gt",
    "labels_one_based",
    "label_out_of_range",
    "gt_labelled_background",
    "unsafe_globals",
    "nonfinite_weights",
    "empty_mean",
    "nonfinite_loss",
    "WITHOUT_POS_SHARE",
    "no_positive_level",
    "matches_no_anchor",
    "without_positive",
    "STARVED_SHARE",
    "FUNNEL_KEYS",
    "no_proposals",
    "positives_starved",
    "STAGE_MIN_POS",
    "empty_mask",
    "mask_branch_skipped",
    "stage_starved",
    "EXPLODING_NORM",
    "EXPLODING_STEP",
    "background_dominance",
    "level_weight_imbalance",
    "no_gradient",
    "exploding",
    "vanishing",
    "COLLAPSED_FRACTION",
    "chance",
    "collapse",
    "untrained_or_collapsed",
]
