"""Compare two sides: two profiles of one report, or two reports (all profiles they share).

Each metric is shown side by side with its change: a ratio ``new / old``, or the words
"NaN → finite", "finite → NaN" (Inf likewise) where finiteness changes. A level-less value (the
``all`` row's normalizer under a per-level profile) is "per level", not NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..diagnose.finding import Finding
from ..vocab import (
    BOX_TERMS,
    PER_LEVEL_NORMALIZERS,
    TERM_PARTS,
    DenseNormalizer,
    FailOn,
    Head,
    Part,
    Precision,
)
from .build import ALL_LEVELS
from .model import Report, write_text
from .serialize import comparison_plain, comparison_rows, csv_text, to_json

# levels-table columns compared per (head, level)
METRICS = (
    "pos", "neg", "sampled", "avg_factor", "sample_weight", "loss_cls", "loss_bbox", "loss_share",
    "grad_feature", "grad_logits_pos", "grad_logits_neg", "grad_deltas", "nonfinite", "nan_origin",
)  # fmt: skip
# profiles-table columns compared per profile
TOTALS = ("loss_total", *(t.value for t in BOX_TERMS), "grad_total_norm", "grad_clipped_norm")
SAME = "="
# values closer than this (relative) are the same number: float32 sums in another order
SAME_REL = 1e-6
# the all row's columns that a per-level normalizer leaves without one value, by the term part
# whose normalizer they show
PER_LEVEL_COLUMNS = {
    Part.CLS: ("avg_factor", "sample_weight"),
    Part.BOX: ("avg_factor_bbox", "sample_weight_bbox"),
}
PER_LEVEL = "per level"


@dataclass(kw_only=True)
class Change:
    """One metric on both sides: of a (head, level) row, or of the profile totals (no head)."""

    head: Head | None = field(default=None, metadata={"omit_none": True})
    level: str | None = field(default=None, metadata={"omit_none": True})
    metric: str
    old: object
    new: object
    change: str


@dataclass(kw_only=True)
class Comparison:
    """One side against the other: per (head, level) metric rows, profile totals, and the
    findings that appear (only in new) or disappear (only in old)."""

    old: str  # label of the old side
    new: str
    rows: list[Change]
    totals: list[Change]
    appeared: list[Finding]
    disappeared: list[Finding]

    @property
    def changed(self) -> bool:
        moved = any(r.change != SAME for r in self.rows + self.totals)
        return bool(self.appeared or self.disappeared) or moved


@dataclass(kw_only=True)
class CompareResult:
    """What ``lossdoctor.compare`` returns: the comparisons, the new side's report and profile
    (for ``fails``), and the replayed report when two profiles were compared on a batch."""

    comparisons: list[Comparison]
    new_report: Report
    new_profile: str | None = None
    report: Report | None = None
    warnings: list[str] = field(default_factory=list)  # why the two sides may not compare

    def to_dict(self) -> dict:
        return comparison_plain(self.warnings, self.comparisons)

    def to_json(self) -> str:
        return to_json(self.to_dict())

    def csv_text(self) -> str:
        return csv_text(comparison_rows(self.comparisons))

    def save_json(self, path: str | Path) -> None:
        write_text(path, self.to_json())

    def save_csv(self, path: str | Path) -> None:
        write_text(path, self.csv_text())

    def fails(self, fail_on: FailOn | str) -> bool:
        """Whether the new side has a finding at or above ``fail_on``."""
        found = {
            f.severity for f in self.new_report.findings
            if self.new_profile is None or f.profile in (None, self.new_profile)
        }  # fmt: skip
        return FailOn(fail_on).fails(min(found, key=lambda x: x.rank) if found else None)


def _state(v) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "value"
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Inf"
    return "finite"


def _dash(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v in (None, "") else str(v)


def change(old, new) -> str:
    """How ``new`` differs from ``old``: "=", "x0.5", "NaN → finite", "finite → Inf", "a → b"."""
    so, sn = _state(old), _state(new)
    if old == new or so == sn == "NaN":
        return SAME
    if "value" in (so, sn):
        return f"{_dash(old)} → {_dash(new)}"
    if so != sn:
        return f"{so} → {sn}"
    if so == "Inf" or abs(new - old) <= SAME_REL * max(abs(old), abs(new)):
        return SAME
    if old == 0:
        return "0 → nonzero"
    ratio = f"{new / old:.3g}"
    return f"x{new / old:.6g}" if ratio == "1" else f"x{ratio}"


def _level_less(report: Report, profile: str) -> set[tuple[Head, str]]:
    """(head, column) of the all row that have no single value under ``profile``: those of a
    term whose normalizer counts each level on its own."""
    dense = report.meta.dense.profiles.get(profile) if report.meta.dense else None
    if dense is not None:
        return {
            (Head.DENSE, column)
            for part, spec in dense.terms.items()
            if spec.normalizer is DenseNormalizer.LEVEL_POS
            for column in PER_LEVEL_COLUMNS.get(part, ())
        }
    spec = report.meta.profiles.get(profile)
    if spec is None:
        return set()
    return {
        (head, column)
        for term, (head, part) in TERM_PARTS.items()
        if head is not Head.DENSE and spec.term(term).normalizer in PER_LEVEL_NORMALIZERS
        for column in PER_LEVEL_COLUMNS.get(part, ())
    }


def _values(report: Report, profile: str) -> dict[tuple[Head, str], dict]:
    """(head, level) → metric → its value under ``profile`` (PER_LEVEL where it has none)."""
    less = _level_less(report, profile)
    return {
        (r.head, r.level): {
            m: PER_LEVEL if r.level == ALL_LEVELS and (r.head, m) in less else getattr(r, m)
            for m in METRICS
        }
        for r in report.tables.levels
        if r.profile == profile
    }


def _totals(report: Report, profile: str) -> dict:
    row = next((r for r in report.tables.profiles if r.profile == profile), None)
    return {} if row is None else {m: getattr(row, m) for m in TOTALS}


def _findings(report: Report, profile: str) -> dict:
    """The findings that concern ``profile`` (its own and the profile-free ones), keyed without
    the profile."""
    return {
        (f.severity, f.code, f.head, f.level, f.image): f
        for f in report.findings
        if f.profile in (None, profile)
    }


def _change(head: Head | None, level: str | None, m: str, old, new) -> Change:
    return Change(head=head, level=level, metric=m, old=old, new=new, change=change(old, new))


def compare_profiles(
    old: Report, old_profile: str, new: Report, new_profile: str, labels: tuple[str, str] = ("", "")
) -> Comparison:
    """One profile of ``old`` against one profile of ``new`` (the same report for two profiles).
    ``labels`` prefix each side's profile name (the report files, say)."""
    a, b = _values(old, old_profile), _values(new, new_profile)
    rows = [_change(*key, m, a[key][m], b[key][m]) for key in a if key in b for m in METRICS]
    ta, tb = _totals(old, old_profile), _totals(new, new_profile)
    totals = [_change(None, None, m, ta.get(m), tb.get(m)) for m in TOTALS if ta or tb]
    fa, fb = _findings(old, old_profile), _findings(new, new_profile)
    return Comparison(
        old=f"{labels[0]}:{old_profile}" if labels[0] else old_profile,
        new=f"{labels[1]}:{new_profile}" if labels[1] else new_profile,
        rows=rows,
        totals=totals,
        appeared=[f for k, f in fb.items() if k not in fa],
        disappeared=[f for k, f in fa.items() if k not in fb],
    )


def compare_reports(
    old: Report,
    new: Report,
    old_profile: str | None = None,
    new_profile: str | None = None,
    labels: tuple[str, str] = ("old", "new"),
) -> list[Comparison]:
    """Compare two reports: the named profiles, or every profile present in both."""
    if old_profile or new_profile:
        return [
            compare_profiles(
                old, old_profile or new_profile, new, new_profile or old_profile, labels
            )
        ]
    shared = [p for p in old.profiles if p in new.profiles]
    return [compare_profiles(old, p, new, p, labels) for p in shared]


def _precision(r: Report) -> Precision:
    return r.meta.precision.precision if r.meta.precision is not None else Precision.FP32


def run_differences(old: Report, new: Report) -> list[str]:
    """Why two reports may not be two views of one run: a comparison of them mixes causes."""
    out = []
    ck = (old.meta.checkpoint.sha256, new.meta.checkpoint.sha256)
    bt = (old.meta.batch.sha256, new.meta.batch.sha256)
    if None not in ck + bt and ck[0] != ck[1] and bt[0] != bt[1]:
        out.append(
            f"the reports share neither checkpoint (sha256 {ck[0][:12]} vs {ck[1][:12]}) nor "
            f"batch ({bt[0][:12]} vs {bt[1][:12]}): each change mixes the model's and the data's"
        )
    precisions = [_precision(r) for r in (old, new)]
    if precisions[0] != precisions[1]:
        out.append(
            f"the reports replay the heads in different precisions ({precisions[0]} vs "
            f"{precisions[1]}): each change is the precision's as well"
        )
    if old.meta.config != new.meta.config:
        out.append(
            f"the reports replay different detector configs ({old.meta.config.name} vs "
            f"{new.meta.config.name}): a change may be the config's, not the normalization's"
        )
    return out
