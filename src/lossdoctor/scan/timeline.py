"""The scan's report: every dump's levels over runs, steps and ranks (the timeline), the findings
of every dump and across the ranks of each step, the first step each finding appears at in each
run, and the dumps that failed."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..inputs.errors import InputError
from ..report.model import Report
from ..report.ranks import combine_ranks
from ..vocab import DumpStatus, Severity

# what a finding row keeps in the scan's dump_findings table
FINDING_COLUMNS = ("severity", "code", "scope", "profile", "head", "level", "image", "term",
                   "message")  # fmt: skip
SCAN_FORMAT = "lossdoctor.scan/1"


@dataclass(kw_only=True)
class _Done:
    """One replayed dump: where it sits, and its report."""

    run: str | None
    step: int | None
    rank: int | None  # None: an unranked (single-process) dump
    report: Report

    def at(self) -> dict:
        return {"run": self.run, "step": self.step, "rank": self.rank}


@dataclass(kw_only=True)
class _Tables:
    dumps: list[dict] = field(default_factory=list)
    timeline: list[dict] = field(default_factory=list)
    totals: list[dict] = field(default_factory=list)
    dump_findings: list[dict] = field(default_factory=list)
    ranks: list[dict] = field(default_factory=list)


def _placed(result: dict) -> _Done:
    """A result's report, at the run, step and rank its dump records (else its folders')."""
    report = Report.from_dict(result["report"])
    meta, d = report.meta["batch"].get("meta") or {}, result["dump"]
    run = meta["run"] if isinstance(meta.get("run"), str) else d.get("run")
    return _Done(run=run, step=meta.get("step", d["step"]), rank=meta.get("rank", d["rank"]),
                 report=report)  # fmt: skip


def _matches(f: dict, row: dict) -> bool:
    """A finding is raised at a levels row when it names no other profile, head or level."""
    return all(
        f.get(k) is None or f.get(k) == row.get(k) or (k == "level" and row[k] == "all")
        for k in ("profile", "head", "level")
    )


def _findings_rows(at: dict, findings: list[dict]) -> list[dict]:
    return [{**at, **{k: f.get(k) for k in FINDING_COLUMNS}} for f in findings]


def _add_dump(t: _Tables, d: _Done) -> None:
    rep = d.report
    for row in rep.tables.get("levels", []):
        codes = sorted({f["code"] for f in rep.findings if _matches(f, row)})
        t.timeline.append({**d.at(), **row, "findings": codes})
    t.totals += [{**d.at(), **row} for row in rep.tables.get("profiles", [])]
    t.dump_findings += _findings_rows(d.at(), rep.findings)


def _add_step(t: _Tables, run, step, done: list[_Done]) -> None:
    """The findings across the ranks of one step of a run, and its ranks table."""
    at = {"run": run, "step": step, "rank": None}
    ranks = [d.rank for d in done]
    try:
        if None in ranks or len(set(ranks)) < len(ranks):
            raise InputError(
                f"step {step} of {run} has {len(done)} dumps of ranks "
                f"{', '.join('none' if r is None else str(r) for r in ranks)}: one dump per rank "
                "(as rank_K folders or meta rank), or scan the runs apart"
            )
        joined = combine_ranks({d.rank: d.report for d in done})
    except InputError as e:
        t.dumps.append({**at, "status": DumpStatus.FAILED, "message": str(e)})
        return
    t.ranks += [{"run": run, "step": step, **row} for row in joined.tables["ranks"]]
    across = [f for f in joined.findings if f.get("rank") is None and f["code"].startswith("rank-")]
    t.dump_findings += _findings_rows(at, across)


def first_seen(rows: list[dict]) -> list[dict]:
    """Per run and finding code: the first step (and rank) it appears at, its worst severity
    there and how many dumps (or steps, for the findings across ranks) raise it."""
    seen: dict[tuple, dict] = {}
    where: dict[tuple, set] = {}
    key = lambda r: (r.get("run") or "", r["step"] is None, r["step"] or 0,  # noqa: E731
                     r["rank"] or 0, Severity(r["severity"]).rank)  # fmt: skip
    for r in sorted(rows, key=key):
        code = (r.get("run"), r["code"])
        where.setdefault(code, set()).add((r["step"], r["rank"]))
        if code not in seen:
            seen[code] = {"run": r.get("run"), "code": r["code"], "severity": r["severity"],
                          "step": r["step"], "rank": r["rank"],
                          "message": r["message"]}  # fmt: skip
    for code, v in seen.items():
        v["dumps"] = len(where[code])
    order = lambda v: (Severity(v["severity"]).rank, v["run"] or "", v["step"] or 0)  # noqa: E731
    return sorted(seen.values(), key=order)


def _dump_row(result: dict, placed: _Done | None) -> dict:
    """A dump's row, at the step and rank its dump records where it was read."""
    d = result["dump"]
    at = {"run": d.get("run"), "step": d["step"], "rank": d["rank"]}
    if placed is not None:
        at = placed.at()
    return {**at, "checkpoint": d["checkpoint"],
            "batch": d["batch"], "status": result["status"], "message": result.get("message"),
            "seconds": result.get("seconds"), "peak_rss_mib": result.get("peak_rss_mib"),
            "cached": result.get("cached", False)}  # fmt: skip


def scan_report(results: list[dict], meta: dict) -> Report:
    """The report of a scan from its dumps' results (in dump order)."""
    placed = [_placed(r) if r["status"] == DumpStatus.OK else None for r in results]
    t = _Tables(dumps=[_dump_row(r, d) for r, d in zip(results, placed)])
    done = [d for d in placed if d is not None]
    for d in done:
        _add_dump(t, d)
    steps: dict = {}
    for d in done:
        steps.setdefault((d.run, d.step), []).append(d)
    for (run, step), at in steps.items():
        if len(at) > 1:
            _add_step(t, run, step, at)
    tables = {"dumps": t.dumps, "timeline": t.timeline, "totals": t.totals,
              "dump_findings": t.dump_findings, "first_seen": first_seen(t.dump_findings),
              "ranks": t.ranks}  # fmt: skip
    info = {"lossdoctor": __version__, "torch": torch.__version__, "format": SCAN_FORMAT,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "scan": meta, "profiles": {}}  # fmt: skip
    return Report(meta=info, tables=tables)


def failed(report: Report) -> list[dict]:
    return [r for r in report.tables.get("dumps", []) if r["status"] != DumpStatus.OK]
