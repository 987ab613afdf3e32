"""What a finding code means, read from the rule table: for ``lossdoctor explain`` and the
catalogue in docs/report.md."""

from __future__ import annotations

from ..diagnose.findings import Rule
from ..diagnose.nan_trace import CAUSES
from ..diagnose.ranks import ALL_RULES

# docs/report.md's finding catalogue sits between these lines
CATALOGUE_BEGIN = "<!-- finding catalogue: generated from diagnose/findings.py RULES -->"
CATALOGUE_END = "<!-- end of finding catalogue -->"


def rule(code: str) -> Rule:
    """The rule of a finding code (one replay's or across ranks); KeyError names the closest
    known codes."""
    import difflib

    for r in ALL_RULES:
        if r.code == code:
            return r
    close = difflib.get_close_matches(code, [r.code for r in ALL_RULES], n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "no code is close to it"
    raise KeyError(f"unknown finding code {code!r}: {hint}")


def _severity(r: Rule) -> str:
    return f"{r.severity} (some cases {r.minor})" if r.minor else str(r.severity)


def explain(code: str) -> str:
    """The full text for one code: severity, summary, evidence fields, fix (and stage causes)."""
    r = rule(code)
    lines = [
        f"{r.code}  [{_severity(r)}]",
        f"  {r.summary}",
        f"  evidence: {', '.join(r.evidence)}",
        f"  fix: {r.fix}",
    ]
    if r.minor_fix:
        lines.append(f"  fix when {r.minor}: {r.minor_fix}")
    if r.code == "nonfinite-loss":
        lines.append("  the fix by first broken stage:")
        lines += [f"    {stage}: {fix}" for stage, fix in CAUSES.items()]
    return "\n".join(lines)


def listing() -> list[str]:
    """One line per code: code, severity, summary."""
    width = max(len(r.code) for r in ALL_RULES)
    return [f"{r.code:<{width}}  {r.severity:<7}  {r.summary}" for r in ALL_RULES]


def catalogue_markdown() -> str:
    """docs/report.md's catalogue: a table of every code, its severity, meaning and fix."""
    rows = ["| code | severity | what it means | evidence |", "|---|---|---|---|"]
    for r in ALL_RULES:
        rows.append(f"| `{r.code}` | {_severity(r)} | {r.summary} | {', '.join(r.evidence)} |")
    return "\n".join([CATALOGUE_BEGIN, *rows, CATALOGUE_END])
