"""Rewrite the documentation's generated parts: python scripts/update_readme.py

The README's "What it says" is an excerpt of the real output of `lossdoctor inspect` on
fixtures/collapse, 120 columns wide. docs/report.md's finding catalogue is generated from the
rule table (src/lossdoctor/diagnose/findings.py), and docs/coverage.md's coverage table is what
the model-zoo tests recorded in docs/coverage (see scripts/test-frameworks.sh), summed up in
the README;
tests/test_architecture.py fails when a copy differs.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lossdoctor.report.explain import CATALOGUE_BEGIN, CATALOGUE_END, catalogue_markdown  # noqa: E402

EXCERPT_BEGIN, EXCERPT_END = "<!-- what-it-says -->", "<!-- /what-it-says -->"
EXCERPT_ARGS = ["inspect", "fixtures/collapse"]
# the excerpt shows this many findings, and leaves out the RPN table
SHOWN_FINDINGS = 2
SEVERITIES = ("error ", "warning ", "info ")


def _output(args: list[str] = EXCERPT_ARGS) -> str:
    from typer.testing import CliRunner

    from lossdoctor.cli import app

    os.chdir(ROOT)
    r = CliRunner().invoke(app, args, env={"NO_COLOR": "1", "COLUMNS": "120"})
    assert r.exit_code == 0, r.output
    return "\n".join(line.rstrip() for line in r.stdout.splitlines())


def _cut_findings(section: str, shown: int = SHOWN_FINDINGS) -> tuple[str, int]:
    """The findings table up to its ``shown``-th finding, and how many there are."""
    lines, starts = section.splitlines(), []
    for k, line in enumerate(lines):
        if line.startswith(SEVERITIES):
            starts.append(k)
    if len(starts) <= shown:
        return section, len(starts)
    return "\n".join(lines[: starts[shown]] + ["…"]), len(starts)


def excerpt() -> str:
    sections = _output().split("\n\n")
    header, symptom = sections[0], sections[1]
    findings = next(s for s in sections if s.startswith("Findings"))
    roi = next(s for s in sections if s.startswith("ROI head"))
    totals = next(s for s in sections if s.startswith("Totals"))
    shown, n = _cut_findings(findings)
    body = "\n\n".join([header, symptom, shown, roi, totals])
    intro = textwrap.fill(
        f"`lossdoctor {' '.join(EXCERPT_ARGS)}`, a step of the reproduction's `legacy` run "
        f"captured by the hook just before its weights turned NaN (excerpt: {SHOWN_FINDINGS} of "
        f"{n} findings, the RPN table left out):",
        width=100,
    )
    return f"{EXCERPT_BEGIN}\n{intro}\n\n```\n{body}\n```\n{EXCERPT_END}"


AMP_BEGIN, AMP_END = "<!-- amp-excerpt -->", "<!-- /amp-excerpt -->"
AMP_ARGS = ["inspect", "fixtures/amp-nan"]
AMP_PROFILE = "fixed "  # the run's own profile


def _finding_lines(findings: str, code: str) -> list[str]:
    """One finding's lines of the findings table, without its fix."""
    lines = findings.splitlines()
    start = next(k for k, line in enumerate(lines) if line.split()[1:2] == [code])
    out = [lines[start]]
    for line in lines[start + 1 :]:
        if line.strip().startswith("fix:") or line.startswith(SEVERITIES):
            break
        out.append(line)
    return out


def amp_excerpt() -> str:
    """`lossdoctor inspect fixtures/amp-nan`, cut to its precision line, the overflow finding and
    the run's profile's terms next to fp32 (docs/mixed-precision.md has more)."""
    sections = _output(AMP_ARGS).split("\n\n")
    header = sections[0].splitlines()
    k = next(i for i, line in enumerate(header) if line.startswith("precision"))
    findings = next(s for s in sections if s.startswith("Findings"))
    drift = next(s for s in sections if s.startswith("loss terms, fp16")).splitlines()
    own = [line for line in drift[3:] if line.startswith(AMP_PROFILE) and " roi_" in line]
    body = "\n".join([*header[k:], "…", *_finding_lines(findings, "fp16-forward-overflow"), "…",
                      *drift[:3], *own])  # fmt: skip
    return f"{AMP_BEGIN}\n```\n$ lossdoctor {' '.join(AMP_ARGS)}\n{body}\n```\n{AMP_END}"


DENSE_BEGIN, DENSE_END = "<!-- dense-excerpt -->", "<!-- /dense-excerpt -->"
DENSE_ARGS = ["inspect", "fixtures/retinanet-nan"]


def dense_excerpt() -> str:
    """`lossdoctor inspect fixtures/retinanet-nan`, cut to its finding and the dense head's
    table (docs/one-stage.md has more)."""
    sections = _output(DENSE_ARGS).split("\n\n")
    findings = next(s for s in sections if s.startswith("Findings"))
    k = next(i for i, s in enumerate(sections) if s.startswith("DENSE head"))
    lines = sections[k].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(" "))  # the profile row
    table = [*lines[start:], "", sections[k + 1]]
    body = "\n".join(["…", *_finding_lines(findings, "dense-level-normalizer-zero"), "…",
                      *table])  # fmt: skip
    return f"{DENSE_BEGIN}\n```\n$ lossdoctor {' '.join(DENSE_ARGS)}\n{body}\n```\n{DENSE_END}"


COVERAGE_BEGIN, COVERAGE_END = "<!-- coverage -->", "<!-- /coverage -->"
COVERAGE_DIR = ROOT / "docs" / "coverage"
# where each generated part lives
README, REPORT_DOC, COVERAGE_DOC = (
    ROOT / "README.md",
    ROOT / "docs/report.md",
    ROOT / "docs/coverage.md",
)
FRAMEWORKS = ("torchvision", "mmdet", "detectron2")


def coverage_markdown(folder: Path = COVERAGE_DIR) -> str:
    """The coverage table of each framework the zoo tests recorded, in their order."""
    parts = [COVERAGE_BEGIN]
    for fw in FRAMEWORKS:
        rows = _records(folder, fw)
        if not rows:
            continue
        first = rows[0]
        parts.append(
            f"\n**{fw} {first['version']}** (torch {first['torch']}, tests run {first['date']}):\n"
        )
        parts.append("| model or config | replay | detail |\n|---|---|---|")
        parts += [f"| `{r['model']}` | {r['outcome']} | {r['detail']} |" for r in rows]
    parts.append(COVERAGE_END)
    return "\n".join(parts)


SUMMARY_BEGIN, SUMMARY_END = "<!-- coverage-summary -->", "<!-- /coverage-summary -->"
OUTCOMES = ("exact", "partial", "refused")


def _records(folder: Path, fw: str) -> list[dict]:
    path = folder / f"{fw}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def coverage_summary(folder: Path = COVERAGE_DIR) -> str:
    """The README's table: per framework, the models of each outcome, from the same records."""
    parts = [
        SUMMARY_BEGIN,
        "| framework (tests run) | " + " | ".join(OUTCOMES) + " |",
        "|---|" + "---|" * len(OUTCOMES),
    ]
    for fw in FRAMEWORKS:
        rows = _records(folder, fw)
        if not rows:
            continue
        cells = []
        for outcome in OUTCOMES:
            names = [f"`{r['model']}`" for r in rows if r["outcome"].startswith(outcome)]
            cells.append(", ".join(names) or "—")
        head = f"{fw} {rows[0]['version']}, torch {rows[0]['torch']} ({rows[0]['date']})"
        parts.append(f"| {head} | " + " | ".join(cells) + " |")
    parts.append(SUMMARY_END)
    return "\n".join(parts)


def _replace(text: str, begin: str, end: str, new: str) -> str:
    start, stop = text.index(begin), text.index(end) + len(end)
    return text[:start] + new + text[stop:]


def _rewrite(path: Path, begin: str, end: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    path.write_text(_replace(text, begin, end, new), encoding="utf-8")


def main() -> None:
    _rewrite(README, EXCERPT_BEGIN, EXCERPT_END, excerpt())
    _rewrite(README, AMP_BEGIN, AMP_END, amp_excerpt())
    _rewrite(README, DENSE_BEGIN, DENSE_END, dense_excerpt())
    _rewrite(REPORT_DOC, CATALOGUE_BEGIN, CATALOGUE_END, catalogue_markdown())
    _rewrite(README, SUMMARY_BEGIN, SUMMARY_END, coverage_summary())
    _rewrite(COVERAGE_DOC, COVERAGE_BEGIN, COVERAGE_END, coverage_markdown())
    print(
        "regenerated: README.md's excerpts and coverage summary, docs/report.md's catalogue, "
        "docs/coverage.md's table"
    )


if __name__ == "__main__":
    main()
