"""The Report: typed meta, tables and findings, with a lossless JSON form (``serialize``).

JSON: ``{"format": "lossdoctor.report/2", "meta": {...}, "tables": {name: [row, ...]},
"findings": [finding, ...], "groups": [group, ...]}`` (docs/report.md). Non-finite numbers are
written as JSON ``NaN`` / ``Infinity`` (as Python's json and pandas read them), so a report reads
back exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..diagnose.finding import Finding
from ..diagnose.groups import FindingGroup, Where
from ..inputs.errors import InputError
from ..inputs.files import atomic_write, read_text
from ..vocab import FailOn, Severity
from . import serialize as s
from .meta import ReportMeta, ScanMeta
from .rows import ReportTables, ScanTables


def write_text(path: str | Path, text: str) -> None:
    """``text`` to ``path``, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class Tabled:
    """What a report and a scan share: their tables as DataFrames, JSON and CSV files."""

    tables: ReportTables | ScanTables

    def to_dict(self) -> dict:
        raise NotImplementedError

    def extra_csv(self) -> dict[str, str]:
        """CSV files beside the tables' (name → text)."""
        return {}

    def table(self, name: str):
        """One table as a pandas DataFrame (columns in report order)."""
        import pandas as pd

        return pd.DataFrame(s.tables_plain(self.tables).get(name, []))

    def to_json(self) -> str:
        return s.to_json(self.to_dict())

    def save_json(self, path: str | Path) -> None:
        write_text(path, self.to_json())

    def csv_text(self, name: str = "levels") -> str:
        return s.csv_text(s.tables_plain(self.tables).get(name, []))

    def save_csv(self, path: str | Path, name: str = "levels") -> None:
        write_text(path, self.csv_text(name))

    def save_csv_dir(self, directory: str | Path) -> list[Path]:
        """Every table as ``DIR/<table>.csv``, and the extra files (a report's findings)."""
        d = Path(directory)
        texts = {name: s.csv_text(rows) for name, rows in s.tables_plain(self.tables).items()}
        written = []
        for name, text in {**texts, **self.extra_csv()}.items():
            write_text(d / f"{name}.csv", text)
            written.append(d / f"{name}.csv")
        return written


@dataclass
class Report(Tabled):
    """Meta, tables of typed rows, every finding row and one group per cause."""

    meta: ReportMeta
    tables: ReportTables
    findings: list[Finding] = field(default_factory=list)
    groups: list[FindingGroup] = field(default_factory=list)

    def __post_init__(self):
        if not self.groups:  # a report of rows only: each row its own group
            self.groups = [_single(k, f) for k, f in enumerate(self.findings)]

    @property
    def profiles(self) -> list[str]:
        if self.meta.dense is not None:
            return list(self.meta.dense.profiles)
        return list(self.meta.profiles)

    @property
    def is_step(self) -> bool:
        """Whether this is the report of one step across ranks."""
        return self.tables.ranks is not None

    def worst_severity(self) -> Severity | None:
        found = {f.severity for f in self.findings}
        return min(found, key=lambda x: x.rank) if found else None

    def fails(self, fail_on: FailOn | str) -> bool:
        """True when a finding at or above ``fail_on`` (error / warning / never) exists."""
        return FailOn(fail_on).fails(self.worst_severity())

    def to_dict(self) -> dict:
        return s.report_plain(self.meta, self.tables, self.findings, self.groups)

    def extra_csv(self) -> dict[str, str]:
        return s.findings_csv(self.findings, self.groups)

    @classmethod
    def from_dict(cls, data) -> Report:
        return cls(*s.report_parts(data))

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


@dataclass
class ScanReport(Tabled):
    """A scan: how it ran, and its tables (see ``rows.ScanTables``)."""

    meta: ScanMeta
    tables: ScanTables

    def to_dict(self) -> dict:
        return s.scan_plain(self.meta, self.tables)

    def worst_severity(self) -> Severity | None:
        found = {r.severity for r in self.tables.first_seen}
        return min(found, key=lambda x: x.rank) if found else None

    def fails(self, fail_on: FailOn | str) -> bool:
        return FailOn(fail_on).fails(self.worst_severity())


def _single(k: int, f: Finding) -> FindingGroup:
    """The group of one finding row."""
    where = Where(
        profiles=[f.profile] if f.profile else [],
        heads=[f.head] if f.head else [],
        levels=[f.level] if f.level else [],
        terms=[f.term] if f.term else [],
        images=[f.image] if f.image is not None else [],
        ranks=[f.rank] if f.rank is not None else [],
    )
    return FindingGroup(severity=f.severity, code=f.code, scope=f.scope, message=f.message,
                        fix=f.fix, rows=[k], where=where)  # fmt: skip
