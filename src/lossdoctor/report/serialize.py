"""The report at the edge: typed records to the JSON and CSV forms and back.

This module alone reads and writes the dicts of those forms; everything else works on the typed
rows, findings and meta. A report is written as ``lossdoctor.report/2``; the reader also takes
``lossdoctor.report/1`` (whose ``profiles`` rows spelled ``no_grad`` as one ``;``-joined string).
A scan is written as ``lossdoctor.scan/2``.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import functools
import io
import json
import math
import types
import typing

from ..diagnose.finding import Finding
from ..diagnose.groups import FindingGroup
from ..inputs.config import DetectorConfig
from ..inputs.dataclass_toml import from_dict as toml_from_dict
from ..inputs.dataclass_toml import to_dict as toml_to_dict
from ..inputs.errors import InputError
from ..inputs.profiles import LossProfile
from .meta import BatchMeta, DumpRecord, NormsSeen, ReportMeta
from .rows import ReportTables

REPORT_FORMAT = "lossdoctor.report/2"
PREVIOUS_REPORT_FORMAT = "lossdoctor.report/1"
SCAN_FORMAT = "lossdoctor.scan/2"
# the finding columns, in the order the JSON and findings.csv give them
FINDING_COLUMNS = ("severity", "code", "head", "level", "profile", "image", "message", "evidence",
                   "fix", "term", "scope", "note", "group", "cause", "rank")  # fmt: skip
GROUP_COLUMNS = ("severity", "code", "scope", "message", "fix", "count", "rows", "where",
                 "evidence")  # fmt: skip
# records written with (and read by) their own TOML-compatible dict form
TOML_RECORDS = (DetectorConfig, LossProfile)
REWRITE = "write the report with lossdoctor inspect --json"


# ---- typed → plain ---------------------------------------------------------------------------
def plain(obj):
    """A typed record (a dataclass, enum member, list or dict of them) → JSON-safe data: fields
    marked ``flatten`` merge into their parent, ``internal`` and ``derived`` ones are left out,
    ``omit_none`` / ``omit_empty`` ones only where set."""
    if isinstance(obj, TOML_RECORDS):
        return toml_to_dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            v, m = getattr(obj, f.name), f.metadata
            if m.get("internal") or m.get("derived") or _omitted(v, m):
                continue
            if m.get("flatten"):
                out.update(plain(v))
            else:
                out[f.name] = plain(v)
        return out
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [plain(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    return obj


def _omitted(v, m) -> bool:
    return (m.get("omit_none") and v is None) or bool(m.get("omit_empty") and not v)


def tables_plain(tables) -> dict[str, list[dict]]:
    """A report's (or scan's) tables by name, each a list of flat row dicts."""
    return plain(tables)


def finding_plain(f: Finding, group: int | None = None) -> dict:
    """A finding row in the documented column order, with the index of its group (where it has
    one)."""
    d = {**plain(f), "group": group}
    return {k: d.get(k) for k in FINDING_COLUMNS if k != "group" or group is not None}


def group_plain(g: FindingGroup, findings: list[Finding]) -> dict:
    d = plain(g)
    d.update(count=len(g.rows), evidence=[findings[k].evidence for k in g.rows])
    return {k: d[k] for k in GROUP_COLUMNS}


def report_plain(meta: ReportMeta, tables: ReportTables, findings: list[Finding],
                 groups: list[FindingGroup]) -> dict:  # fmt: skip
    return {
        "format": REPORT_FORMAT,
        "meta": plain(meta),
        "tables": tables_plain(tables),
        **report_plain_findings(findings, groups),
    }


def findings_csv(findings: list[Finding], groups: list[FindingGroup]) -> dict[str, str]:
    """``findings.csv`` and ``groups.csv`` (name → text), with their header when empty."""
    data = report_plain_findings(findings, groups)
    return {
        "findings": csv_text(data["findings"], FINDING_COLUMNS),
        "groups": csv_text(data["groups"], GROUP_COLUMNS),
    }


def report_plain_findings(findings: list[Finding], groups: list[FindingGroup]) -> dict:
    group_of = {k: g for g, grp in enumerate(groups) for k in grp.rows}
    return {
        "findings": [finding_plain(f, group_of.get(k, 0)) for k, f in enumerate(findings)],
        "groups": [group_plain(g, findings) for g in groups],
    }


def scan_plain(meta, tables) -> dict:
    return {"format": SCAN_FORMAT, "meta": plain(meta), "tables": tables_plain(tables)}


def to_json(data: dict) -> str:
    return json.dumps(data, indent=1, allow_nan=True, default=_jsonable)


def _jsonable(v):
    """Fallback for values json cannot write (tensors, numpy scalars, paths, ...)."""
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


# ---- plain → typed ---------------------------------------------------------------------------
@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


SCALARS = {
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _bad(where: str, what: str, value) -> InputError:
    return InputError(f"report {where}: expected {what}, found {str(value)[:60]!r}; {REWRITE}")


def _union(tp, value, where: str):
    if value is None:
        if type(None) not in typing.get_args(tp):
            raise _bad(where, "a value", value)
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    for arg in args:
        try:
            return parse(arg, value, where)
        except InputError:
            pass
    if all(_is_enum(a) for a in args):
        raise _bad(where, "one of " + ", ".join(m.value for a in args for m in a), value)
    return parse(args[0], value, where)  # raises the first type's error


def _is_enum(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def parse(tp, value, where: str):
    """``value`` (from JSON) as type ``tp``; one clear InputError where it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _union(tp, value, where)
    if origin in (list, dict) or tp in (list, dict):
        return _container(tp, origin or tp, value, where)
    if _is_enum(tp):
        try:
            return tp(value)
        except ValueError:
            raise _bad(where, f"one of {', '.join(m.value for m in tp)}", value) from None
    if tp in TOML_RECORDS:
        return toml_from_dict(tp, _mapping(value, where), f"report {where}")
    if dataclasses.is_dataclass(tp):
        return record(tp, _mapping(value, where), where)
    if tp in SCALARS:
        fits, what = SCALARS[tp]
        if not fits(value):
            raise _bad(where, what, value)
        return float(value) if tp is float else value
    return value


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise _bad(where, "an object", value)
    return value


def _container(tp, origin, value, where: str):
    args = typing.get_args(tp)
    if origin is list:
        if not isinstance(value, list):
            raise _bad(where, "a list", value)
        return [parse(args[0], v, f"{where}[{i}]") if args else v for i, v in enumerate(value)]
    value = _mapping(value, where)
    return {k: parse(args[1], v, f"{where}.{k}") for k, v in value.items()} if args else value


def record(cls, d: dict, where: str):
    """A typed record from a flat dict: its ``flatten`` fields from the same dict, missing
    fields at their defaults (a field without one is an error), unknown keys ignored."""
    hints, kwargs = _hints(cls), {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("derived"):
            continue
        if f.metadata.get("flatten"):
            kwargs[f.name] = record(hints[f.name], d, where)
        elif f.name in d:
            kwargs[f.name] = parse(hints[f.name], d[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InputError(f"report {where} has no '{f.name}'; {REWRITE}")
    obj = cls(**kwargs)
    if isinstance(obj, BatchMeta):
        obj.dump = dump_record(obj.meta)
    return obj


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


# how a capture writes a non-finite number (JSON-safe) in the meta
NONFINITE_WORDS = ("nan", "inf", "-inf")


def _number(v) -> float | None:
    if isinstance(v, str) and v.lower() in NONFINITE_WORDS:
        return float(v)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def dump_record(meta: dict) -> DumpRecord:
    """What the report reads of a dump's meta; a value of another type than documented is taken
    as absent (the dump is the user's)."""
    seen = meta.get("grad_norm")
    norms = None
    if isinstance(seen, dict) and seen:
        norms = NormsSeen(model=_number(seen.get("model")), heads=_number(seen.get("heads")),
                          loss_scale=_number(seen.get("loss_scale")))  # fmt: skip
    return DumpRecord(
        step=_int(meta.get("step")),
        iteration=_int(meta.get("iteration")),
        rank=_int(meta.get("rank")),
        world_size=_int(meta.get("world_size")),
        run=meta["run"] if isinstance(meta.get("run"), str) else None,
        reason=meta["reason"] if isinstance(meta.get("reason"), str) else None,
        grad_norm=norms,
    )


def _upgrade_v1(data: dict) -> dict:
    """A ``lossdoctor.report/1`` dict in the current form: ``no_grad`` as a list."""
    tables = dict(data["tables"])
    rows = tables.get("profiles")
    if isinstance(rows, list):
        tables["profiles"] = [
            {**r, "no_grad": [x for x in r["no_grad"].split(";") if x]}
            if isinstance(r, dict) and isinstance(r.get("no_grad"), str)
            else r
            for r in rows
        ]
    return {**data, "tables": tables}


def report_parts(data) -> tuple:
    """A report's JSON data (this version's or the previous one's) → (meta, tables, findings,
    groups); one InputError naming what is wrong otherwise."""
    if not isinstance(data, dict) or "format" not in data:
        raise InputError(f"not a lossdoctor report: no 'format' key; {REWRITE}")
    if data["format"] == SCAN_FORMAT:
        raise InputError("this is the report of a scan, not of one dump; pass an inspect report")
    if data["format"] not in (REPORT_FORMAT, PREVIOUS_REPORT_FORMAT):
        raise InputError(
            f"report format {data['format']!r} is not {REPORT_FORMAT!r} (or "
            f"{PREVIOUS_REPORT_FORMAT!r}); re-run lossdoctor inspect --json with this version"
        )
    if data["format"] == PREVIOUS_REPORT_FORMAT and isinstance(data.get("tables"), dict):
        data = _upgrade_v1(data)
    for key, kind in (("meta", dict), ("tables", dict), ("findings", list)):
        if not isinstance(data.get(key), kind):
            raise InputError(f"report key '{key}' is missing or not a {kind.__name__}; {REWRITE}")
    meta = record(ReportMeta, data["meta"], "meta")
    tables = record(ReportTables, data["tables"], "tables")
    findings = [_finding(f, f"findings[{k}]") for k, f in enumerate(data["findings"])]
    groups = parse(list[FindingGroup], data.get("groups") or [], "groups")
    return meta, tables, findings, groups


def _finding(d, where: str) -> Finding:
    """A finding row: its severity and code are required (the rest has defaults)."""
    for key in ("severity", "code"):
        if key not in _mapping(d, where):
            raise InputError(f"report {where} has no '{key}'; {REWRITE}")
    return record(Finding, d, where)


# ---- CSV -------------------------------------------------------------------------------------
def csv_text(rows: list[dict], empty: tuple[str, ...] = ()) -> str:
    """Rows as CSV text: the columns of the first rows in order, then any that come later
    (``empty``: the header of a table without rows)."""
    if not rows and empty:
        return ",".join(empty) + "\n"
    buf = io.StringIO()
    cols = list(dict.fromkeys(k for row in rows for k in row))
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _csv_value(row.get(k)) for k in cols})
    return buf.getvalue()


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


# ---- comparisons -----------------------------------------------------------------------------
COMPARE_FORMAT = "lossdoctor.compare/1"


def comparison_plain(warnings: list[str], comparisons: list) -> dict:
    """A comparison's JSON: each comparison's changes, and its findings that appear or
    disappear as finding rows (without a group)."""
    return {
        "format": COMPARE_FORMAT,
        "warnings": list(warnings),
        "comparisons": [
            {"old": c.old, "new": c.new, "rows": plain(c.rows), "totals": plain(c.totals),
             "appeared": [finding_plain(f) for f in c.appeared],
             "disappeared": [finding_plain(f) for f in c.disappeared]}
            for c in comparisons
        ],
    }  # fmt: skip


def comparison_rows(comparisons: list) -> list[dict]:
    """Every change of every comparison as one CSV row, its sides first."""
    return [{"old_side": c.old, "new_side": c.new, **plain(r)}
            for c in comparisons for r in c.totals + c.rows]  # fmt: skip
