"""The scan on the terminal (what it covered, the first step of each finding, the failed dumps),
its progress bar, and its timeline figure."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from ..inputs.files import atomic_write
from ..report.model import Report
from ..report.render import SEVERITY_STYLE, _table, num
from ..vocab import BOX_TERMS, Head, Severity
from .timeline import failed

DPI = 90


def _steps(report: Report) -> str:
    steps = sorted({r["step"] for r in report.tables["dumps"] if r["step"] is not None})
    ranks = sorted({r["rank"] or 0 for r in report.tables["dumps"] if r["rank"] is not None})
    span = (
        f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}" if steps else ""
    )
    return ", ".join(
        x for x in (span, f"ranks {ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else "") if x
    )


def summary(report: Report) -> Text:
    m = report.meta["scan"]
    errors = len(failed(report))
    backend = (
        f"Ray ({m['ray']})" if m["ray"] else f"{m['workers']} workers x {m['threads']} threads"
    )
    t = Text()
    t.append("Scan  ", style="bold")
    scanned = ", ".join(m["inputs"]) + (f" on --batch {m['batch']}" if m.get("batch") else "")
    steps = _steps(report)
    t.append(f"{scanned}: {m['dumps']} dump{'s' * (m['dumps'] != 1)}"
             f"{f' ({steps})' if steps else ''}; {m['cached']} from earlier results in "
             f"{m['results']}; {backend}")  # fmt: skip
    if errors:
        t.append(f"; {errors} failed", style="bold red")
    return t


def first_seen_table(report: Report):
    t = _table("First step of each finding (most severe first)")
    for name in ("severity", "code", "step", "rank", "dumps", "first message"):
        t.add_column(
            name, no_wrap=name != "first message", ratio=1 if name == "first message" else None
        )
    for r in report.tables["first_seen"]:
        rank = "all" if r["rank"] is None else str(r["rank"])
        t.add_row(Text(str(r["severity"]), style=SEVERITY_STYLE[Severity(r["severity"])]),
                  r["code"], num(r["step"]), rank, num(r["dumps"]), r["message"])  # fmt: skip
    if not report.tables["first_seen"]:
        t.add_row("", "", "", "", "", "no finding")
    return t


def errors_table(report: Report):
    t = _table("Failed dumps")
    for name in ("step", "rank", "message"):
        t.add_column(name, no_wrap=name != "message")
    for r in failed(report):
        t.add_row(num(r["step"]), "" if r["rank"] is None else str(r["rank"]), r["message"] or "")
    return t


def render_scan(report: Report, out: Console) -> None:
    out.print(summary(report))
    out.print()
    out.print(first_seen_table(report))
    if failed(report):
        out.print()
        out.print(errors_table(report))


def progress_bar(console: Console, enabled: bool) -> Progress:
    """A bar with the dumps done and the time left, on a terminal only (transient)."""
    return Progress(
        TextColumn("lossdoctor scan"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=True, disable=not (enabled and console.is_terminal),
    )  # fmt: skip


def _series(rows: list[dict], x: str, y: str, where: dict) -> tuple[list, list]:
    """(steps, mean over ranks of ``y``) for the rows matching ``where``."""
    by_step: dict = {}
    for r in rows:
        if r.get(x) is not None and all(r.get(k) == v for k, v in where.items()):
            v = r.get(y)
            if isinstance(v, (int, float)) and math.isfinite(v):
                by_step.setdefault(r[x], []).append(v)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def plot_timeline(report: Report, path: str | Path) -> None:
    """Loss terms, gradient norms and RPN positives per level over the steps (mean over ranks),
    with the first step of each error finding marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals, timeline = report.tables["totals"], report.tables["timeline"]
    profiles = list(dict.fromkeys(r["profile"] for r in totals))
    fig, axes = plt.subplots(3, 1, figsize=(12, 10), constrained_layout=True, sharex=True)
    for p in profiles[:2]:
        for term in BOX_TERMS:
            axes[0].plot(*_series(totals, "step", term.value, {"profile": p}), marker=".",
                         label=f"{p} {term}")  # fmt: skip
        axes[1].plot(
            *_series(totals, "step", "grad_total_norm", {"profile": p}), marker=".", label=p
        )
    levels = list(dict.fromkeys(r["level"] for r in timeline if r["level"] != "all"))
    own = profiles[0] if profiles else None
    for lv in levels:
        where = {"profile": own, "head": Head.RPN, "level": lv}
        axes[2].plot(*_series(timeline, "step", "pos", where), marker=".", label=lv)
    for r in report.tables["first_seen"]:
        if r["severity"] == Severity.ERROR and r["step"] is not None:
            for ax in axes:
                ax.axvline(r["step"], color="red", alpha=0.3)
    titles = ("loss terms (log)", "total head gradient norm (log)", f"RPN positives ({own})")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=4)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].set_xlabel("step (red: first step of an error finding)")
    fig.suptitle(f"lossdoctor scan: {report.meta['scan']['dumps']} dumps")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    plt.close(fig)
