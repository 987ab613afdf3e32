"""The run's own loss first, and one finding per cause.

Every hit of every rule is a finding row. Once the report knows the profile the run trained with,
:func:`frame` tells the run's problems from the what-if's: a row under a what-if profile that the
run's own profile does not share is what switching would introduce (info, never an error of the
run), and a row of the run's profile that a what-if does not share says that switching removes
it. :func:`group` then makes one finding of the rows of one code, scope and cause, naming every
level, term, profile and image it covers; the rows stay in the report's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..vocab import GradTerm, Head, Scope, Severity, Term
from .finding import Finding

# a group lists at most this many distinct fixes
MAX_FIXES = 3


@dataclass(kw_only=True)
class Where:
    """What the rows of a group cover, each list in first-seen order (images and ranks sorted)."""

    profiles: list[str] = field(default_factory=list)
    heads: list[Head] = field(default_factory=list)
    levels: list[str] = field(default_factory=list)
    terms: list[Term | GradTerm] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class FindingGroup:
    """The rows of one code, scope and cause (``rows``: their indices in the findings)."""

    severity: Severity
    code: str
    scope: Scope | None
    message: str
    fix: str
    rows: list[int]
    where: Where = field(default_factory=Where)


def _key(f: Finding) -> tuple:
    """What makes two rows under different profiles the same problem."""
    return (f.code, f.head, f.level, f.image, f.term, f.evidence.get("stage"))


def _without_profile(f: Finding) -> str:
    prefix = f"{f.profile}: "
    return f.message[len(prefix) :] if f.message.startswith(prefix) else f.message


def _introduced(f: Finding, own: str) -> Finding:
    f.scope, f.severity = Scope.WHAT_IF, Severity.INFO
    f.message = f"{f.profile} would introduce: {_without_profile(f)}"
    f.fix = f"nothing to fix in this run (it trains with {own}); if you switch to {f.profile}: " + (
        f.fix
    )
    return f


def frame(rows: list[Finding], own: str | None, what_ifs: list[str]) -> list[Finding]:
    """Scope every row by the run's own profile ``own``; None (unknown) leaves rows as they are."""
    if own is None:
        return rows
    keys = {p: {_key(f) for f in rows if f.profile == p} for p in (own, *what_ifs)}
    for f in rows:
        if f.profile is not None and f.profile != own and _key(f) not in keys[own]:
            _introduced(f, own)
            continue
        f.scope = Scope.RUN
        removers = [w for w in what_ifs if f.profile == own and _key(f) not in keys[w]]
        if removers:
            f.note = f"switching to {' or '.join(removers)} removes it"
    return sorted(rows, key=lambda f: f.severity.rank)


def _distinct(values) -> list:
    return list(dict.fromkeys(v for v in values if v is not None))


def span(levels: list[str], order: list[str]) -> str:
    """Levels as a range where they run unbroken in the batch's order (p3-p6), else a list."""
    at = [order.index(lv) if lv in order else -1 for lv in levels]
    if len(levels) > 2 and -1 not in at and sorted(at) == list(range(min(at), max(at) + 1)):
        return f"{order[min(at)]}-{order[max(at)]}"
    return ", ".join(levels)


def _where(rows: list[Finding]) -> Where:
    return Where(
        profiles=_distinct(f.profile for f in rows),
        heads=_distinct(f.head for f in rows),
        levels=_distinct(f.level for f in rows),
        terms=_distinct(f.term for f in rows),
        images=sorted(_distinct(f.image for f in rows)),
        ranks=sorted(_distinct(f.rank for f in rows)),
    )


def where_text(where: Where, order: list[str]) -> str:
    """``p3-p6; rpn_cls, roi_box; images 0, 1; legacy, fixed`` (what a group covers)."""
    parts = [
        span(where.levels, order) if where.levels else "",
        ", ".join(map(str, where.terms or where.heads)),
        _numbered("image", where.images),
        _numbered("rank", where.ranks),
        ", ".join(where.profiles),
    ]
    return "; ".join(p for p in parts if p)


def _numbered(what: str, values: list) -> str:
    """``image 1`` / ``images 0, 1`` / nothing."""
    if not values:
        return ""
    return f"{what} {values[0]}" if len(values) == 1 else f"{what}s {', '.join(map(str, values))}"


def _message(rows: list[Finding], where: Where, order: list[str]) -> str:
    notes = _distinct(f.note or None for f in rows)
    tail = f"; {notes[0]}" if len(notes) == 1 and all(f.note for f in rows) else ""
    if len(rows) == 1:
        return rows[0].message + tail
    return f"{rows[0].cause} ({where_text(where, order)}){tail}"


def group(rows: list[Finding], level_order: list[str]) -> list[FindingGroup]:
    """One group per (code, scope, severity, cause), in the rows' order; a row without a cause is
    a group of its own unless another row says exactly the same."""
    members: dict[tuple, list[int]] = {}
    for k, f in enumerate(rows):
        members.setdefault((f.code, f.scope, f.severity, f.cause or f.message), []).append(k)
    out = []
    for (code, scope, severity, _), idx in members.items():
        chosen = [rows[k] for k in idx]
        where = _where(chosen)
        fixes = _distinct(f.fix for f in chosen)[:MAX_FIXES]
        out.append(
            FindingGroup(
                severity=severity,
                code=code,
                scope=scope,
                message=_message(chosen, where, level_order),
                fix=" / ".join(fixes),
                rows=idx,
                where=where,
            )
        )
    return out
