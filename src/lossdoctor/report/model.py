"""The Report: metadata + tidy tables + findings, with a lossless JSON form.

JSON: ``{"format": "lossdoctor.report/1", "meta": {...}, "tables": {name: [row, ...]},
"findings": [finding, ...]}``. Non-finite numbers are written as JSON ``NaN`` / ``Infinity``
(as Python's json and pandas read them), so a report reads back exactly.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..inputs.errors import InputError
from ..inputs.files import atomic_write, read_text

REPORT_FORMAT = "lossdoctor.report/1"
LEVEL_COLUMNS = (
    "profile",
    "head",
    "level",
    "anchors",
    "pos",
    "neg",
    "ignored",
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
IMAGE_COLUMNS = ("image", "gt", "gt_without_pos", "detections", "max_fg_score")
FINDING_KEYS = (
    "severity",
    "code",
    "head",
    "level",
    "profile",
    "image",
    "message",
    "evidence",
    "fix",
)
SEVERITIES = ("error", "warning", "info")


@dataclass
class Report:
    meta: dict
    tables: dict[str, list[dict]]
    findings: list[dict] = field(default_factory=list)

    # ---- access ------------------------------------------------------------------------
    def table(self, name: str):
        """One table as a pandas DataFrame (columns in report order)."""
        import pandas as pd

        return pd.DataFrame(self.tables.get(name, []))

    @property
    def profiles(self) -> list[str]:
        return list(self.meta.get("profiles", {}))

    def worst_severity(self) -> str | None:
        found = [f["severity"] for f in self.findings]
        return next((s for s in SEVERITIES if s in found), None)

    def fails(self, fail_on: str) -> bool:
        """True when a finding at or above ``fail_on`` (error / warning / never) exists."""
        if fail_on == "never":
            return False
        worst = self.worst_severity()
        return worst is not None and SEVERITIES.index(worst) <= SEVERITIES.index(fail_on)

    # ---- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": REPORT_FORMAT,
            "meta": self.meta,
            "tables": self.tables,
            "findings": self.findings,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=True, default=_jsonable)

    @classmethod
    def from_dict(cls, data) -> Report:
        if not isinstance(data, dict) or "format" not in data:
            raise InputError("not a lossdoctor report: no 'format' key; write one with --json")
        if data["format"] != REPORT_FORMAT:
            raise InputError(
                f"report format {data['format']!r} is not {REPORT_FORMAT!r}; re-run lossdoctor inspect --json with this version"
            )
        for key in ("meta", "tables", "findings"):
            if key not in data:
                raise InputError(f"report key '{key}' is missing; write the report with --json")
        return cls(data["meta"], data["tables"], data["findings"])

    @classmethod
    def load(cls, path: str | Path) -> Report:
        text = read_text(path, "report")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path} is not JSON ({e.msg} at line {e.lineno}); pass a report written with --json"
            ) from None
        return cls.from_dict(data)

    def save_json(self, path: str | Path) -> None:
        text = self.to_json()
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    # ---- CSV ---------------------------------------------------------------------------
    def csv_text(self, name: str = "levels") -> str:
        rows = self.tables.get(name, [])
        buf = io.StringIO()
        cols = _columns(rows)
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: _csv_value(row.get(k)) for k in cols})
        return buf.getvalue()

    def save_csv(self, path: str | Path, name: str = "levels") -> None:
        text = self.csv_text(name)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def save_csv_dir(self, directory: str | Path) -> list[Path]:
        """Every table as ``DIR/<table>.csv``, and the findings as ``DIR/findings.csv``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        written = []
        for name in self.tables:
            self.save_csv(d / f"{name}.csv", name)
            written.append(d / f"{name}.csv")
        flat = [
            {
                **{k: f.get(k) for k in FINDING_KEYS if k != "evidence"},
                "evidence": json.dumps(f.get("evidence"), default=_jsonable),
            }
            for f in self.findings
        ]
        text = (
            Report(self.meta, {"findings": flat}).csv_text("findings")
            if flat
            else ",".join(FINDING_KEYS) + "\n"
        )
        atomic_write(d / "findings.csv", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        written.append(d / "findings.csv")
        return written


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        for k in row:
            if k not in cols:
                cols.append(k)
    return cols


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=_jsonable)
    return v


def _jsonable(v):
    """Fallback for values json cannot write (tensors, numpy scalars, paths, ...)."""
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)
