"""Where the first NaN/Inf came from (the NaN trace's origins) and a non-finite loss."""

from __future__ import annotations

from ...vocab import (
    GRADIENT_TERM,
    Part,
    Stage,
    term_of,
)
from ..finding import Finding
from ..nan_trace import CAUSES, Origin
from .base import Facts

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


def _origin_hit(o: Origin, fix: str | None) -> Finding:
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
    return Finding(
        message=msg,
        head=o.head,
        level=o.level,
        profile=o.profile,
        image=o.image,
        term=term_of(o.head, o.part) if o.part else GRADIENT_TERM,
        evidence=ev,
        fix=fix or "",
        cause=f"{o.kind}, first broken at {o.stage}: {o.reason or STAGE_CAUSES[o.stage]}",
    )


def empty_mean(f: Facts) -> list[Finding]:
    return [_origin_hit(o, None) for o in f.origins if o.stage is Stage.NORMALIZER]


def nonfinite_loss(f: Facts) -> list[Finding]:
    return [_origin_hit(o, CAUSES[o.stage]) for o in f.origins if o.stage is not Stage.NORMALIZER]
