"""The rows of the report's tables, as typed records.

A table is a list of these dataclasses in memory; only ``serialize`` turns them into the flat
dicts of the JSON and CSV (the column names are an interface, see docs/report.md) and back.
Fields marked ``extra`` follow the documented columns; a per-rank row's ``rank`` is written first,
and only in the report of a multi-rank step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..diagnose.finding import Finding
from ..vocab import DumpStatus, GradTerm, Head, Layer, Part, Precision, Scope, Severity, Term


def _extra(default=None):
    return field(default=default, metadata={"extra": True})


def columns(cls) -> tuple[str, ...]:
    """The documented columns of a row type, in order."""
    return tuple(f.name for f in dataclasses.fields(cls) if "extra" not in f.metadata)


@dataclass(kw_only=True)
class PerRank:
    """A row of a table that a multi-rank step's report carries for every rank."""

    rank: int | None = field(default=None, metadata={"extra": True, "omit_none": True})


@dataclass(kw_only=True)
class LevelRow(PerRank):
    """One (profile, head, level) of the ``levels`` table, or the head's ``all`` row."""

    profile: str
    head: Head
    level: str
    anchors: int
    pos: int
    neg: int
    ignored: int
    sampled: int
    avg_factor: float
    sample_weight: float
    loss_cls: float
    loss_bbox: float
    loss_share: float
    grad_feature: float
    grad_logits_pos: float
    grad_logits_neg: float
    grad_deltas: float
    nonfinite: int
    nan_origin: str
    avg_factor_bbox: float = _extra(float("nan"))
    sample_weight_bbox: float = _extra(float("nan"))
    neg_share: float = _extra(float("nan"))
    stage: int = _extra(0)  # the cascade stage of a RoI level
    loss_mask: float = _extra(0.0)  # the mask head's rows: the mask term at this level
    # a dense head's rows (FCOS/ATSS): the centerness term and what it was divided by
    loss_ctr: float | None = field(default=None, metadata={"extra": True, "omit_none": True})
    avg_factor_ctr: float | None = field(default=None, metadata={"extra": True, "omit_none": True})


@dataclass(kw_only=True)
class ImageRow(PerRank):
    image: int
    gt: int
    gt_without_pos: int
    detections: int
    max_fg_score: float
    gt_ignored: int = _extra(0)
    gt_bad_label: int = _extra(0)
    gt_nonfinite: int = _extra(0)
    gt_best_iou_min: float = _extra(float("nan"))
    gt_best_iou_mean: float = _extra(float("nan"))
    rpn_pos_candidates: int = _extra(0)
    rpn_pos: int = _extra(0)
    rpn_neg: int = _extra(0)
    proposals: int = _extra(0)
    proposals_nonfinite: int = _extra(0)
    roi_pos: int = _extra(0)
    roi_neg: int = _extra(0)


@dataclass(kw_only=True)
class ParamRow(PerRank):
    """One head parameter under one profile: its gradient norm per loss term and in total."""

    profile: str
    param: str
    shape: str
    rpn_cls: float
    rpn_box: float
    roi_cls: float
    roi_box: float
    total: float
    roi_mask: float = _extra(float("nan"))
    # a one-stage detector's terms (its rpn_* and roi_* are NaN)
    dense_cls: float | None = field(default=None, metadata={"extra": True, "omit_none": True})
    dense_box: float | None = field(default=None, metadata={"extra": True, "omit_none": True})
    dense_ctr: float | None = field(default=None, metadata={"extra": True, "omit_none": True})


@dataclass(kw_only=True)
class ProfileRow(PerRank):
    profile: str
    loss_total: float
    rpn_cls: float
    rpn_box: float
    roi_cls: float
    roi_box: float
    grad_total_norm: float
    max_norm: float | None
    clip_coef: float
    grad_clipped_norm: float
    rpn_neg_share: float | None
    roi_neg_share: float | None
    no_grad: list[str]  # the parameters (and RPN feature levels) that got no gradient
    roi_mask: float | None = _extra()
    # a one-stage detector's terms (its rpn_* and roi_* are null)
    dense_cls: float | None = field(default=None, metadata={"extra": True, "omit_none": True})
    dense_box: float | None = field(default=None, metadata={"extra": True, "omit_none": True})
    dense_ctr: float | None = field(default=None, metadata={"extra": True, "omit_none": True})


@dataclass(kw_only=True)
class OriginRow(PerRank):
    profile: str
    head: Head
    level: str
    term: Part | GradTerm  # the part of the head's loss, or the gradient
    stage: str
    nan: int
    posinf: int
    neginf: int
    image: int | None
    index: int | None
    gt: int | None
    cause: str
    box_stage: int = _extra(0)


@dataclass(kw_only=True)
class LayerRangeRow(PerRank):
    """One head layer's output in the replay's low precision (the ``precision`` table): its
    largest |value| in fp32 against the dtype's ``limit``, the values that overflowed (finite in
    fp32, not in the low precision) and underflowed (nonzero in fp32, 0 in it) of ``values``,
    and the largest |gradient| of the output at scale 1 under the run's profile (``level`` is
    ``all`` for the RoI heads, which see every level at once)."""

    precision: Precision
    head: Head
    level: str
    stage: int
    layer: Layer
    terms: list[Term]
    max_abs: float
    limit: float
    overflow: int
    underflow: int
    values: int
    grad_max: float


@dataclass(kw_only=True)
class DriftRow(PerRank):
    """One (profile, term): its loss in the replay's low precision and in fp32 on the same
    samples (the ``drift`` table)."""

    precision: Precision
    profile: str
    term: Term
    loss: float
    loss_fp32: float
    relative: float


@dataclass(kw_only=True)
class RankRow:
    """One (rank, profile, head, level) of a multi-rank step: the rank's own normalizer and
    loss, and what an avg_factor all-reduced across ranks (reduce_mean) would make of them.
    ``sample_weight`` is a classification sample's weight in the step's gradient, which DDP
    averages over the ranks: term weight / (avg_factor * world_size); ``*_bbox`` the same for the
    box term, over the positives."""

    rank: int
    profile: str
    head: Head
    level: str
    pos: int
    neg: int
    sampled: int
    avg_factor: float
    global_avg_factor: float
    loss_cls: float
    loss_bbox: float
    global_loss_cls: float
    global_loss_bbox: float
    sample_weight: float
    global_sample_weight: float
    avg_factor_bbox: float
    global_avg_factor_bbox: float
    sample_weight_bbox: float
    global_sample_weight_bbox: float


@dataclass(kw_only=True)
class DumpRow:
    """One dump of a scan: where it sits, what it was replayed from and how that ended."""

    run: str | None
    step: int | None
    rank: int | None
    checkpoint: str
    batch: str
    status: DumpStatus
    message: str | None = None
    seconds: float | None = None
    peak_rss_mib: float | None = None
    cached: bool = False


@dataclass(kw_only=True)
class At:
    """Where a scan's row comes from: the run, step and rank of its dump (rank None: every rank
    of the step, or an unranked dump)."""

    run: str | None
    step: int | None
    rank: int | None


FLAT = {"flatten": True}


@dataclass(kw_only=True)
class TimelineRow:
    """A levels row of one dump of a scan, with the codes of the findings raised at it."""

    at: At = field(metadata=FLAT)
    row: LevelRow = field(metadata=FLAT)
    findings: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class TotalsRow:
    """A profiles row of one dump of a scan."""

    at: At = field(metadata=FLAT)
    row: ProfileRow = field(metadata=FLAT)


@dataclass(kw_only=True)
class LossScaleRow:
    """The loss scaler at one dump of a scan (dumps replayed in a low precision, or with a
    recorded scale): the precision, the recorded scale and steps skipped before it, whether the
    run's scaler skipped this step (``found_inf``, as recorded) and whether the replay says the
    heads' gradients overflow at that scale, with the largest safe scale."""

    at: At = field(metadata=FLAT)
    precision: Precision
    loss_scale: float | None
    skipped_before: int | None
    found_inf: bool | None
    overflows: bool | None
    safe_scale: float | None


@dataclass(kw_only=True)
class DumpFindingRow:
    """A finding of one dump (or across the ranks of one step) of a scan."""

    at: At = field(metadata=FLAT)
    severity: Severity
    code: str
    scope: Scope | None
    profile: str | None
    head: Head | None
    level: str | None
    image: int | None
    term: Term | GradTerm | None
    message: str

    @classmethod
    def of(cls, at: At, f: Finding) -> DumpFindingRow:
        return cls(at=at, severity=f.severity, code=f.code, scope=f.scope, profile=f.profile,
                   head=f.head, level=f.level, image=f.image, term=f.term,
                   message=f.message)  # fmt: skip


@dataclass(kw_only=True)
class FirstSeenRow:
    """Per run and finding code of a scan: the first step (and rank) it appears at."""

    run: str | None
    code: str
    severity: Severity
    step: int | None
    rank: int | None
    message: str
    dumps: int = 0  # how many dumps (or steps, for findings across ranks) raise it


@dataclass(kw_only=True)
class StepRankRow:
    """A ranks row of one multi-rank step of a scan."""

    run: str | None
    step: int | None
    row: RankRow = field(metadata=FLAT)


@dataclass(kw_only=True)
class ReportTables:
    """The tables of a report (``ranks`` only in a multi-rank step's)."""

    levels: list[LevelRow] = field(default_factory=list)
    images: list[ImageRow] = field(default_factory=list)
    params: list[ParamRow] = field(default_factory=list)
    profiles: list[ProfileRow] = field(default_factory=list)
    origins: list[OriginRow] = field(default_factory=list)
    ranks: list[RankRow] | None = field(default=None, metadata={"omit_none": True})
    # a low-precision replay's: per layer its range, per term its drift from fp32
    precision: list[LayerRangeRow] = field(default_factory=list, metadata={"omit_empty": True})
    drift: list[DriftRow] = field(default_factory=list, metadata={"omit_empty": True})


@dataclass(kw_only=True)
class ScanTables:
    """The tables of a scan: its dumps, every dump's levels and totals over the steps, the
    findings of every dump, the first step of each, and the ranks of each multi-rank step."""

    dumps: list[DumpRow] = field(default_factory=list)
    timeline: list[TimelineRow] = field(default_factory=list)
    totals: list[TotalsRow] = field(default_factory=list)
    dump_findings: list[DumpFindingRow] = field(default_factory=list)
    first_seen: list[FirstSeenRow] = field(default_factory=list)
    ranks: list[StepRankRow] = field(default_factory=list)
    scales: list[LossScaleRow] = field(default_factory=list, metadata={"omit_empty": True})
