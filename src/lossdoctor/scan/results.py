"""A scan's results at the edge: the JSON each replay writes to the results folder (a process
pool's or Ray's answer too), read back as typed :class:`DumpResult`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..inputs.errors import InputError
from ..inputs.files import atomic_write
from ..report.model import Report
from ..vocab import DumpStatus
from .dumps import Dump

RESULT_FORMAT = "lossdoctor.scan-result/1"


@dataclass(kw_only=True)
class DumpResult:
    """How one dump's replay ended: its report, or why it failed."""

    dump: Dump
    status: DumpStatus
    report: Report | None = None
    message: str | None = None
    seconds: float | None = None
    peak_rss_mib: float | None = None
    cached: bool = False  # read from an earlier scan's results


def load_result(path: Path) -> dict | None:
    """A result written by an earlier scan, or None if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == RESULT_FORMAT else None


def save_result(path: Path, result: dict) -> None:
    text = json.dumps(result, allow_nan=True, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def dump_result(dump: Dump, data: dict, cached: bool = False) -> DumpResult:
    """A result's data as a typed result of ``dump``; a report that does not read back (an
    earlier version's, a damaged file) is a failed dump saying so."""
    status = DumpStatus(data.get("status", DumpStatus.FAILED))
    out = DumpResult(
        dump=dump,
        status=status,
        message=data.get("message"),
        cached=cached,
        seconds=data.get("seconds"),
        peak_rss_mib=data.get("peak_rss_mib"),
    )
    if status is DumpStatus.OK:
        try:
            out.report = Report.from_dict(data.get("report"))
        except InputError as e:
            out.status, out.message = DumpStatus.FAILED, f"its result does not read back: {e}"
    return out
