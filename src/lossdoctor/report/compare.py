"""Compare two sides: two profiles of one report, or two reports (all profiles they share).

Each metric is shown side by side with its change: a ratio ``new / old``, or the words
"NaN → finite", "finite → NaN" (Inf likewise) where finiteness changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .model import Report

METRICS = (
    "pos",
    "neg",
    "sampled",
    "avg_factor",
    "sample_weight",
    "loss_cls",
    "loss_bbox",
    "loss_share",
    "grad_feature",
    "grad_logits_pos",
    "grad_logits_neg",
    "grad_deltas",
    "nonfinite",
    "nan_origin",
)
TOTALS = (
    "loss_total",
    "rpn_cls",
    "rpn_box",
    "roi_cls",
    "roi_box",
    "grad_total_norm",
    "grad_clipped_norm",
)
FINDING_KEY = ("severity", "code", "head", "level", "image")


@dataclass
class Comparison:
    old: str  # label of the old side
    new: str
    rows: list[dict]  # {"head", "level", "metric", "old", "new", "change"}
    totals: list[dict]  # {"metric", "old", "new", "change"}
    appeared: list[dict]  # findings only in new
    disappeared: list[dict]  # findings only in old

    @property
    def changed(self) -> bool:
        return bool(self.appeared or self.disappeared) or any(
            r["change"] != "=" for r in self.rows + self.totals
        )

    def to_dict(self) -> dict:
        return {
            "format": "lossdoctor.compare/1",
            "old": self.old,
            "new": self.new,
            "rows": self.rows,
            "totals": self.totals,
            "appeared": self.appeared,
            "disappeared": self.disappeared,
        }


def _state(v) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "value"
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Inf"
    return "finite"


def change(old, new) -> str:
    """How ``new`` differs from ``old``: "=", "x0.5", "NaN → finite", "finite → Inf", "a → b"."""
    if old == new or (_state(old) == _state(new) == "NaN"):
        return "="
    so, sn = _state(old), _state(new)
    if "value" in (so, sn):
        return (
            f"{old if old not in (None, '') else '-'} → {new if new not in (None, '') else '-'}"
            if old != new
            else "="
        )
    if so != sn:
        return f"{so} → {sn}"
    if so == "Inf":
        return "="
    if old == 0:
        return "0 → nonzero" if new != 0 else "="
    return f"x{new / old:.3g}"


def _rows(report: Report, profile: str) -> dict:
    return {(r["head"], r["level"]): r for r in report.tables["levels"] if r["profile"] == profile}


def _totals(report: Report, profile: str) -> dict:
    return next((r for r in report.tables.get("profiles", []) if r["profile"] == profile), {})


def _findings(report: Report, profile: str) -> dict:
    """The findings that concern ``profile`` (its own and the profile-free ones), keyed without the profile."""
    return {
        tuple(f.get(k) for k in FINDING_KEY): f
        for f in report.findings
        if f.get("profile") in (None, profile)
    }


def compare_profiles(old: Report, old_profile: str, new: Report, new_profile: str) -> Comparison:
    """One profile of ``old`` against one profile of ``new`` (the same report for two profiles)."""
    a, b = _rows(old, old_profile), _rows(new, new_profile)
    rows = []
    for key in [k for k in a if k in b]:
        for m in METRICS:
            rows.append(
                {
                    "head": key[0],
                    "level": key[1],
                    "metric": m,
                    "old": a[key].get(m),
                    "new": b[key].get(m),
                    "change": change(a[key].get(m), b[key].get(m)),
                }
            )
    ta, tb = _totals(old, old_profile), _totals(new, new_profile)
    totals = [
        {"metric": m, "old": ta.get(m), "new": tb.get(m), "change": change(ta.get(m), tb.get(m))}
        for m in TOTALS
        if m in ta or m in tb
    ]
    fa, fb = _findings(old, old_profile), _findings(new, new_profile)
    label_a = old_profile if old is new else f"{old.meta.get('_label', 'old')}:{old_profile}"
    label_b = new_profile if old is new else f"{new.meta.get('_label', 'new')}:{new_profile}"
    return Comparison(
        label_a,
        label_b,
        rows,
        totals,
        [f for k, f in fb.items() if k not in fa],
        [f for k, f in fa.items() if k not in fb],
    )


def compare(
    old: Report, new: Report, old_profile: str | None = None, new_profile: str | None = None
) -> list[Comparison]:
    """Compare two reports: the named profiles, or every profile present in both."""
    if old_profile or new_profile:
        return [compare_profiles(old, old_profile or new_profile, new, new_profile or old_profile)]
    shared = [p for p in old.profiles if p in new.profiles]
    return [compare_profiles(old, p, new, p) for p in shared]
