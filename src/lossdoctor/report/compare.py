"""Compare two sides: two profiles of one report, or two reports (all profiles they share).

Each metric is shown side by side with its change: a ratio ``new / old``, or the words
"NaN → finite", "finite → NaN" (Inf likewise) where finiteness changes. A level-less value (the
``all`` row's normalizer under a per-level profile) is "per level", not NaN.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..inputs.files import atomic_write
from ..vocab import BOX_TERMS, PER_LEVEL_NORMALIZERS, TERM_PARTS, FailOn, Part
from .build import ALL_LEVELS
from .model import Report, csv_text

COMPARE_FORMAT = "lossdoctor.compare/1"
# levels-table columns compared per (head, level)
METRICS = (
    "pos", "neg", "sampled", "avg_factor", "sample_weight", "loss_cls", "loss_bbox", "loss_share",
    "grad_feature", "grad_logits_pos", "grad_logits_neg", "grad_deltas", "nonfinite", "nan_origin",
)  # fmt: skip
# profiles-table columns compared per profile
TOTALS = ("loss_total", *(t.value for t in BOX_TERMS), "grad_total_norm", "grad_clipped_norm")
FINDING_KEY = ("severity", "code", "head", "level", "image")
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
class Comparison:
    """One side against the other: per (head, level) metric rows, profile totals, and the
    findings that appear (only in new) or disappear (only in old)."""

    old: str  # label of the old side
    new: str
    rows: list[dict]  # {"head", "level", "metric", "old", "new", "change"}
    totals: list[dict]  # {"metric", "old", "new", "change"}
    appeared: list[dict]
    disappeared: list[dict]

    @property
    def changed(self) -> bool:
        moved = any(r["change"] != SAME for r in self.rows + self.totals)
        return bool(self.appeared or self.disappeared) or moved

    def to_dict(self) -> dict:
        return {
            "format": COMPARE_FORMAT,
            "old": self.old,
            "new": self.new,
            "rows": self.rows,
            "totals": self.totals,
            "appeared": self.appeared,
            "disappeared": self.disappeared,
        }


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
        return {
            "format": COMPARE_FORMAT,
            "warnings": self.warnings,
            "comparisons": [c.to_dict() for c in self.comparisons],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=True, default=str)

    def csv_text(self) -> str:
        rows = [
            {"old_side": c.old, "new_side": c.new, **r}
            for c in self.comparisons
            for r in c.totals + c.rows
        ]
        return csv_text(rows)

    def save_json(self, path: str | Path) -> None:
        text = self.to_json()
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def save_csv(self, path: str | Path) -> None:
        text = self.csv_text()
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def fails(self, fail_on: FailOn | str) -> bool:
        """Whether the new side has a finding at or above ``fail_on``."""
        keep = [
            f for f in self.new_report.findings
            if self.new_profile is None or f.get("profile") in (None, self.new_profile)
        ]  # fmt: skip
        return Report(self.new_report.meta, {}, keep).fails(fail_on)


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


def _level_less(report: Report, profile: str) -> set[tuple[str, str]]:
    """(head, column) of the all row that have no single value under ``profile``: those of a
    term whose normalizer counts each level on its own."""
    specs = report.meta.get("profiles", {}).get(profile, {})
    return {
        (head.value, column)
        for term, (head, part) in TERM_PARTS.items()
        if (specs.get(term.value) or {}).get("normalizer") in PER_LEVEL_NORMALIZERS
        for column in PER_LEVEL_COLUMNS.get(part, ())
    }


def _rows(report: Report, profile: str) -> dict:
    rows = {(r.head, r.level): r.to_dict() for r in report.levels() if r.profile == profile}
    for head, column in _level_less(report, profile):
        row = rows.get((head, ALL_LEVELS))
        if row is not None and column in row:
            row[column] = PER_LEVEL
    return rows


def _totals(report: Report, profile: str) -> dict:
    return next((r for r in report.tables.get("profiles", []) if r.get("profile") == profile), {})


def _findings(report: Report, profile: str) -> dict:
    """The findings that concern ``profile`` (its own and the profile-free ones), keyed without
    the profile."""
    return {
        tuple(f.get(k) for k in FINDING_KEY): f
        for f in report.findings
        if f.get("profile") in (None, profile)
    }


def compare_profiles(
    old: Report, old_profile: str, new: Report, new_profile: str, labels: tuple[str, str] = ("", "")
) -> Comparison:
    """One profile of ``old`` against one profile of ``new`` (the same report for two profiles).
    ``labels`` prefix each side's profile name (the report files, say)."""
    a, b = _rows(old, old_profile), _rows(new, new_profile)
    rows = [
        {"head": key[0], "level": key[1], "metric": m, "old": a[key].get(m), "new": b[key].get(m),
         "change": change(a[key].get(m), b[key].get(m))}
        for key in a if key in b
        for m in METRICS
    ]  # fmt: skip
    ta, tb = _totals(old, old_profile), _totals(new, new_profile)
    totals = [
        {"metric": m, "old": ta.get(m), "new": tb.get(m), "change": change(ta.get(m), tb.get(m))}
        for m in TOTALS
        if m in ta or m in tb
    ]
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


def _sha(report: Report, what: str) -> str | None:
    return (report.meta.get(what) or {}).get("sha256")


def _config_name(report: Report) -> str | None:
    return (report.meta.get("config") or {}).get("name")


def run_differences(old: Report, new: Report) -> list[str]:
    """Why two reports may not be two views of one run: a comparison of them mixes causes."""
    out = []
    ck, bt = (
        (_sha(old, "checkpoint"), _sha(new, "checkpoint")),
        (_sha(old, "batch"), _sha(new, "batch")),
    )
    if None not in ck + bt and ck[0] != ck[1] and bt[0] != bt[1]:
        out.append(
            f"the reports share neither checkpoint (sha256 {ck[0][:12]} vs {ck[1][:12]}) nor "
            f"batch ({bt[0][:12]} vs {bt[1][:12]}): each change mixes the model's and the data's"
        )
    if old.meta.get("config") != new.meta.get("config"):
        out.append(
            f"the reports replay different detector configs ({_config_name(old)} vs "
            f"{_config_name(new)}): a change may be the config's, not the normalization's"
        )
    return out
