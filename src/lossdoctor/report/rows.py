"""The rows of the report's tables, as typed records.

A table is a list of flat dicts in the JSON and CSV (the column names are an interface, see
docs/report.md); in code, rows are built and read as these dataclasses, so a column is named once,
here.
Fields marked ``extra`` follow the documented columns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..inputs.errors import InputError
from ..vocab import Head


def _extra(default=None):
    return field(default=default, metadata={"extra": True})


class Row:
    """A table row: to and from the flat dict the JSON carries (unknown keys are kept aside)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise InputError(
                f"a {cls.__name__} of the report lacks a column ({e}); re-run --json"
            ) from None

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        """The documented columns, in order."""
        return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("extra"))


@dataclass(kw_only=True)
class LevelRow(Row):
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


@dataclass(kw_only=True)
class ImageRow(Row):
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
class ParamRow(Row):
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


@dataclass(kw_only=True)
class ProfileRow(Row):
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
    rpn_neg_share: float
    roi_neg_share: float
    no_grad: str
    roi_mask: float | None = _extra()


@dataclass(kw_only=True)
class OriginRow(Row):
    profile: str
    head: Head
    level: str
    term: str
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
class FindingRow(Row):
    severity: str
    code: str
    head: str | None
    level: str | None
    profile: str | None
    image: int | None
    message: str
    evidence: dict
    fix: str
    term: str | None = _extra()
    scope: str | None = _extra()  # run / what-if, once the run's own profile is known
    note: str = _extra("")  # what switching profile would do to it
    group: int = _extra(0)  # its index in the report's groups
    cause: str | None = _extra()  # what the rows of its group share
    rank: int | None = _extra()  # the rank whose dump it was found in (multi-rank steps)


@dataclass(kw_only=True)
class RankRow(Row):
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
class GroupRow(Row):
    """One finding per cause: the finding rows of one code, scope and cause."""

    severity: str
    code: str
    scope: str | None
    message: str
    fix: str
    count: int
    rows: list[int]
    where: dict
    evidence: list


LEVEL_COLUMNS = LevelRow.columns()
IMAGE_COLUMNS = ImageRow.columns()
FINDING_KEYS = FindingRow.columns()
GROUP_KEYS = GroupRow.columns()
RANK_COLUMNS = RankRow.columns()
