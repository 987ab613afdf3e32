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
from ..vocab import FailOn, Severity
from .rows import FINDING_KEYS, GROUP_KEYS, LevelRow

REPORT_FORMAT = "lossdoctor.report/1"
LEVELS, IMAGES = "levels", "images"


@dataclass
class Report:
    """Metadata, tidy tables (lists of flat row dicts, see ``rows``) and findings."""

    meta: dict
    tables: dict[str, list[dict]]
    findings: list[dict] = field(default_factory=list)  # every finding row
    groups: list[dict] = field(default_factory=list)  # one finding per cause (see GroupRow)

    def __post_init__(self):
        if not self.groups:  # a report of rows only: each row its own group
            self.groups = [_single(k, f) for k, f in enumerate(self.findings)]

    # ---- access ------------------------------------------------------------------------
    def table(self, name: str):
        """One table as a pandas DataFrame (columns in report order)."""
        import pandas as pd

        return pd.DataFrame(self.tables.get(name, []))

    def levels(self) -> list[LevelRow]:
        """The ``levels`` table as typed rows."""
        return [LevelRow.from_dict(r) for r in self.tables.get(LEVELS, [])]

    @property
    def profiles(self) -> list[str]:
        return list(self.meta.get("profiles", {}))

    def worst_severity(self) -> Severity | None:
        found = {Severity(f["severity"]) for f in self.findings}
        return min(found, key=lambda s: s.rank) if found else None

    def fails(self, fail_on: FailOn | str) -> bool:
        """True when a finding at or above ``fail_on`` (error / warning / never) exists."""
        return FailOn(fail_on).fails(self.worst_severity())

    # ---- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": REPORT_FORMAT,
            "meta": self.meta,
            "tables": self.tables,
            "findings": self.findings,
            "groups": self.groups,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=True, default=_jsonable)

    @classmethod
    def from_dict(cls, data) -> Report:
        if not isinstance(data, dict) or "format" not in data:
            raise InputError("not a lossdoctor report: no 'format' key; write one with --json")
        if data["format"] != REPORT_FORMAT:
            raise InputError(
                f"report format {data['format']!r} is not {REPORT_FORMAT!r}; re-run lossdoctor "
                "inspect --json with this version"
            )
        for key, kind in (("meta", dict), ("tables", dict), ("findings", list)):
            if not isinstance(data.get(key), kind):
                raise InputError(
                    f"report key '{key}' is missing or not a {kind.__name__}; "
                    "write the report with --json"
                )
        for name, rows in data["tables"].items():
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise InputError(
                    f"report table '{name}' is not a list of rows; write the report with --json"
                )
        if not all(
            isinstance(f, dict) and f.get("severity") in set(Severity) for f in data["findings"]
        ):
            raise InputError(
                "a finding of the report has no known severity; write the report with --json"
            )
        groups = data.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise InputError("report key 'groups' is not a list of findings; write it with --json")
        return cls(data["meta"], data["tables"], data["findings"], groups)

    @classmethod
    def load(cls, path: str | Path) -> Report:
        text = read_text(path, "report")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path} is not JSON ({e.msg} at line {e.lineno}); "
                "pass a report written with --json"
            ) from None
        return cls.from_dict(data)

    def save_json(self, path: str | Path) -> None:
        text = self.to_json()
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    # ---- CSV ---------------------------------------------------------------------------
    def csv_text(self, name: str = LEVELS) -> str:
        return csv_text(self.tables.get(name, []))

    def save_csv(self, path: str | Path, name: str = LEVELS) -> None:
        text = self.csv_text(name)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def save_csv_dir(self, directory: str | Path) -> list[Path]:
        """Every table as ``DIR/<table>.csv``, and the findings as ``DIR/findings.csv``."""
        d = Path(directory)
        written = []
        for name in self.tables:
            self.save_csv(d / f"{name}.csv", name)
            written.append(d / f"{name}.csv")
        for name, rows, empty in (("findings", self.findings, FINDING_KEYS),
                                  ("groups", self.groups, GROUP_KEYS)):  # fmt: skip
            text = csv_text(rows) if rows else ",".join(empty) + "\n"
            atomic_write(d / f"{name}.csv", lambda tmp, t=text: Path(tmp).write_text(t, "utf-8"))
            written.append(d / f"{name}.csv")
        return written


def _single(k: int, f: dict) -> dict:
    """The group of one finding row."""
    where = {
        "profiles": [f["profile"]] if f.get("profile") else [],
        "heads": [f["head"]] if f.get("head") else [],
        "levels": [f["level"]] if f.get("level") else [],
        "terms": [f["term"]] if f.get("term") else [],
        "images": [f["image"]] if f.get("image") is not None else [],
        "ranks": [f["rank"]] if f.get("rank") is not None else [],
    }
    return {"severity": f.get("severity"), "code": f.get("code"), "scope": f.get("scope"),
            "message": f.get("message", ""), "fix": f.get("fix", ""), "count": 1, "rows": [k],
            "where": where, "evidence": [f.get("evidence", {})]}  # fmt: skip


def csv_text(rows: list[dict]) -> str:
    """Rows as CSV text: the columns of the first rows in order, then any that come later."""
    buf = io.StringIO()
    cols = _columns(rows)
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _csv_value(row.get(k)) for k in cols})
    return buf.getvalue()


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
