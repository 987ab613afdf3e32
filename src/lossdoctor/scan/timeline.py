"""The scan's report: every dump's levels over runs, steps and ranks (the timeline), the findings
of every dump and across the ranks of each step, the first step each finding appears at in each
run, and the dumps that failed."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch

from .. import __version__
from ..diagnose.finding import Finding
from ..inputs.errors import InputError
from ..report.meta import ScanInfo, ScanMeta
from ..report.model import Report, ScanReport
from ..report.ranks import combine_ranks
from ..report.rows import (
    At,
    DumpFindingRow,
    DumpRow,
    FirstSeenRow,
    LevelRow,
    LossScaleRow,
    ScanTables,
    StepRankRow,
    TimelineRow,
    TotalsRow,
)
from ..vocab import DumpStatus
from .results import DumpResult


@dataclass(kw_only=True)
class _Done:
    """One replayed dump: where it sits, and its report."""

    at: At
    report: Report


def _placed(result: DumpResult) -> _Done:
    """A result's report, at the run, step and rank its dump records (else its folders')."""
    report = result.report
    rec, d = report.meta.batch.dump, result.dump
    at = At(run=rec.run if rec.run is not None else d.run,
            step=rec.step if rec.step is not None else d.step,
            rank=rec.rank if rec.rank is not None else d.rank)  # fmt: skip
    return _Done(at=at, report=report)


def _matches(f: Finding, row: LevelRow) -> bool:
    """A finding is raised at a levels row when it names no other profile, head or level."""
    return (
        f.profile in (None, row.profile)
        and f.head in (None, row.head)
        and (f.level in (None, row.level) or row.level == "all")
    )


def _add_dump(t: ScanTables, d: _Done) -> None:
    rep = d.report
    for row in rep.tables.levels:
        codes = sorted({f.code for f in rep.findings if _matches(f, row)})
        t.timeline.append(TimelineRow(at=d.at, row=row, findings=codes))
    t.totals += [TotalsRow(at=d.at, row=row) for row in rep.tables.profiles]
    t.dump_findings += [DumpFindingRow.of(d.at, f) for f in rep.findings]
    p = rep.meta.precision
    if p is not None and (p.precision.low or p.loss_scale is not None):
        t.scales.append(LossScaleRow(at=d.at, precision=p.precision, loss_scale=p.loss_scale,
                                     skipped_before=p.skipped, found_inf=p.found_inf,
                                     overflows=p.overflows, safe_scale=p.safe_scale))  # fmt: skip


def _add_step(t: ScanTables, run, step, done: list[_Done]) -> None:
    """The findings across the ranks of one step of a run, and its ranks table."""
    at = At(run=run, step=step, rank=None)
    ranks = [d.at.rank for d in done]
    try:
        if None in ranks or len(set(ranks)) < len(ranks):
            raise InputError(
                f"step {step} of {run} has {len(done)} dumps of ranks "
                f"{', '.join('none' if r is None else str(r) for r in ranks)}: one dump per rank "
                "(as rank_K folders or meta rank), or scan the runs apart"
            )
        joined = combine_ranks({d.at.rank: d.report for d in done})
    except InputError as e:
        t.dumps.append(DumpRow(run=run, step=step, rank=None, checkpoint="", batch="",
                               status=DumpStatus.FAILED, message=str(e)))  # fmt: skip
        return
    t.ranks += [StepRankRow(run=run, step=step, row=row) for row in joined.tables.ranks or []]
    across = [f for f in joined.findings if f.rank is None and f.code.startswith("rank-")]
    t.dump_findings += [DumpFindingRow.of(at, f) for f in across]


def first_seen(rows: list[DumpFindingRow]) -> list[FirstSeenRow]:
    """Per run and finding code: the first step (and rank) it appears at, its worst severity
    there and how many dumps (or steps, for the findings across ranks) raise it."""
    seen: dict[tuple, FirstSeenRow] = {}
    where: dict[tuple, set] = {}
    key = lambda r: (r.at.run or "", r.at.step is None, r.at.step or 0,  # noqa: E731
                     r.at.rank or 0, r.severity.rank)  # fmt: skip
    for r in sorted(rows, key=key):
        code = (r.at.run, r.code)
        where.setdefault(code, set()).add((r.at.step, r.at.rank))
        if code not in seen:
            seen[code] = FirstSeenRow(run=r.at.run, code=r.code, severity=r.severity,
                                      step=r.at.step, rank=r.at.rank,
                                      message=r.message)  # fmt: skip
    for code, v in seen.items():
        v.dumps = len(where[code])
    order = lambda v: (v.severity.rank, v.run or "", v.step or 0)  # noqa: E731
    return sorted(seen.values(), key=order)


def _dump_row(result: DumpResult, placed: _Done | None) -> DumpRow:
    """A dump's row, at the step and rank its dump records where it was read."""
    d = result.dump
    at = placed.at if placed is not None else At(run=d.run, step=d.step, rank=d.rank)
    return DumpRow(run=at.run, step=at.step, rank=at.rank, checkpoint=d.checkpoint,
                   batch=d.batch, status=result.status, message=result.message,
                   seconds=result.seconds, peak_rss_mib=result.peak_rss_mib,
                   cached=result.cached)  # fmt: skip


def scan_report(results: list[DumpResult], info: ScanInfo) -> ScanReport:
    """The report of a scan from its dumps' results (in dump order)."""
    placed = [_placed(r) if r.status is DumpStatus.OK else None for r in results]
    t = ScanTables(dumps=[_dump_row(r, d) for r, d in zip(results, placed)])
    done = [d for d in placed if d is not None]
    for d in done:
        _add_dump(t, d)
    steps: dict = {}
    for d in done:
        steps.setdefault((d.at.run, d.at.step), []).append(d)
    for (run, step), at in steps.items():
        if len(at) > 1:
            _add_step(t, run, step, at)
    t.first_seen = first_seen(t.dump_findings)
    meta = ScanMeta(
        lossdoctor=__version__,
        torch=torch.__version__,
        scan=info,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    return ScanReport(meta=meta, tables=t)


def failed(report: ScanReport) -> list[DumpRow]:
    return [r for r in report.tables.dumps if r.status is not DumpStatus.OK]
