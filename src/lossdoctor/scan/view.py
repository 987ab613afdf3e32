"""The scan on the terminal (what it covered, the first step of each finding, the failed dumps),
its progress bar, and its timeline figure."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console, Group
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from ..inputs.files import atomic_write
from ..report.build import ALL_LEVELS
from ..report.model import ScanReport
from ..report.render import SEVERITY_STYLE, STACKED_FINDINGS_BELOW, WIDTH, _table, indented, num
from ..vocab import BOX_TERMS, Head, Severity
from .timeline import failed

DPI = 90


def _steps(report: ScanReport) -> str:
    steps = sorted({r.step for r in report.tables.dumps if r.step is not None})
    ranks = sorted({r.rank for r in report.tables.dumps if r.rank is not None})
    span = (
        f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}" if steps else ""
    )
    return ", ".join(
        x for x in (span, f"ranks {ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else "") if x
    )


def summary(report: ScanReport) -> Text:
    m = report.meta.scan
    errors = len(failed(report))
    backend = f"Ray ({m.ray})" if m.ray else f"{m.workers} workers x {m.threads} threads"
    t = Text()
    t.append("Scan  ", style="bold")
    scanned = ", ".join(m.inputs) + (f" on --batch {m.batch}" if m.batch else "")
    steps = _steps(report)
    t.append(f"{scanned}: {m.dumps} dump{'s' * (m.dumps != 1)}"
             f"{f' ({steps})' if steps else ''}; {m.cached} from earlier results in "
             f"{m.results}; {backend}")  # fmt: skip
    if errors:
        t.append(f"; {errors} failed", style="bold red")
    return t


def _runs(report: ScanReport) -> list:
    return list(dict.fromkeys(r.run for r in report.tables.dumps))


# the first message's column keeps at least this many characters, else the table is stacked
MESSAGE_MIN = 30


def _first_seen_lines(report: ScanReport, runs: bool) -> Group:
    lines = [Text("First step of each finding (most severe first)", style="bold")]
    for r in report.tables.first_seen:
        line = Text(str(r.severity), style=SEVERITY_STYLE[r.severity])
        rank = "" if r.rank is None else f", rank {r.rank}"
        where = f" of {r.run}" if runs else ""
        line.append(f"  {r.code}", style="bold")
        line.append(f"  step {num(r.step).plain}{where}{rank}; {r.dumps} dump")
        line.append("s" * (r.dumps != 1))
        lines += [line, indented(r.message)]
    if not report.tables.first_seen:
        lines.append(Text("  no finding"))
    return Group(*lines)


def first_seen_table(report: ScanReport, width: int = WIDTH):
    """The first step of each finding, per run where the scan covers several (stacked below
    STACKED_FINDINGS_BELOW columns)."""
    runs = len(_runs(report)) > 1
    rows = report.tables.first_seen
    cells = {
        "severity": lambda r: r.severity, "code": lambda r: r.code, "run": lambda r: r.run,
        "step": lambda r: r.step, "rank": lambda r: r.rank, "dumps": lambda r: r.dumps,
    }  # fmt: skip
    fixed = [
        max([len(name)] + [len(str(cells[name](r))) for r in rows])
        for name in ("severity", "code", *(("run",) if runs else ()), "step", "rank", "dumps")
    ]
    if width < STACKED_FINDINGS_BELOW or sum(fixed) + 2 * len(fixed) + MESSAGE_MIN > width:
        return _first_seen_lines(report, runs)
    t = _table("First step of each finding (most severe first)")
    names = ("severity", "code", *(("run",) if runs else ()), "step", "rank", "dumps",
             "first message")  # fmt: skip
    for name in names:
        t.add_column(
            name, no_wrap=name != "first message", ratio=1 if name == "first message" else None
        )
    for r in rows:
        rank = "all" if r.rank is None else str(r.rank)
        where = (str(r.run),) if runs else ()
        t.add_row(Text(str(r.severity), style=SEVERITY_STYLE[r.severity]), r.code, *where,
                  num(r.step), rank, num(r.dumps), r.message)  # fmt: skip
    if not rows:
        t.add_row(*[""] * (len(names) - 1), "no finding")
    return t


def errors_table(report: ScanReport):
    t = _table("Failed dumps")
    for name in ("step", "rank", "message"):
        t.add_column(name, no_wrap=name != "message")
    for r in failed(report):
        t.add_row(num(r.step), "" if r.rank is None else str(r.rank), r.message or "")
    return t


def render_scan(report: ScanReport, out: Console) -> None:
    out.print(summary(report))
    out.print()
    out.print(first_seen_table(report, out.width))
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


def _series(points: list[tuple[int | None, object]]) -> tuple[list, list, list]:
    """(steps, mean over ranks of the values, the steps where a value is NaN/Inf) of
    (step, value) points."""
    by_step: dict = {}
    bad = set()
    for step, v in points:
        if step is None:
            continue
        if isinstance(v, (int, float)) and math.isfinite(v):
            by_step.setdefault(step, []).append(v)
        elif isinstance(v, float):
            bad.add(step)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], sorted(bad)


def _line(ax, points: list[tuple[int | None, object]], label: str) -> None:
    """One series, its NaN/Inf steps as red crosses at the top of the axis."""
    steps, values, bad = _series(points)
    (line,) = ax.plot(steps, values, marker=".", label=label)
    if bad:
        ax.plot(bad, [1.0] * len(bad), "x", color=line.get_color(), markersize=9,
                markeredgecolor="red", transform=ax.get_xaxis_transform(), clip_on=False,
                label=f"{label}: NaN/Inf")  # fmt: skip


def _draw_runs(axes, report: ScanReport) -> str | None:
    """Every run's series on the three axes; returns the profile of the positives' axis."""
    totals, timeline = report.tables.totals, report.tables.timeline
    profiles = list(dict.fromkeys(r.row.profile for r in totals))
    own = profiles[0] if profiles else None
    levels = list(dict.fromkeys(r.row.level for r in timeline if r.row.level != ALL_LEVELS))
    runs = _runs(report)
    for run in runs:
        name = f"{Path(run).name} " if run and len(runs) > 1 else ""
        for p in profiles:
            mine = [r for r in totals if r.at.run == run and r.row.profile == p]
            for term in BOX_TERMS:
                points = [(r.at.step, getattr(r.row, term.value)) for r in mine]
                _line(axes[0], points, f"{name}{p} {term}")
            _line(axes[1], [(r.at.step, r.row.grad_total_norm) for r in mine], f"{name}{p}")
        for lv in levels:
            points = [(r.at.step, r.row.pos) for r in timeline
                      if (r.at.run, r.row.profile, r.row.head, r.row.level)
                      == (run, own, Head.RPN, lv)]  # fmt: skip
            _line(axes[2], points, f"{name}{lv}")
    return own


def _draw_scales(ax, report: ScanReport) -> None:
    """Each run's recorded loss scale over the steps, the steps its scaler skipped and those
    the replay says overflow."""
    runs = _runs(report)
    for run in runs:
        rows = [r for r in report.tables.scales if r.at.run == run and r.at.step is not None]
        name = f"{Path(run).name} " if run and len(runs) > 1 else ""
        _line(ax, [(r.at.step, r.loss_scale) for r in rows], f"{name}loss scale")
        for flag, marker in (("found_inf", "o"), ("overflows", "x")):
            hits = [r for r in rows if getattr(r, flag) and r.loss_scale]
            ax.plot([r.at.step for r in hits], [r.loss_scale for r in hits], marker,
                    color="red", fillstyle="none", label=f"{name}{flag}")  # fmt: skip
    ax.set_yscale("log", base=2)


def plot_timeline(report: ScanReport, path: str | Path) -> None:
    """Loss terms, gradient norms and RPN positives per level over the steps (mean over ranks)
    for every run and profile, NaN/Inf steps as red crosses, and the first step of each error
    finding marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    scales = report.tables.scales
    panels = 4 if scales else 3
    fig, axes = plt.subplots(panels, 1, figsize=(12, 10 + 3 * (panels - 3)),
                             constrained_layout=True, sharex=True)  # fmt: skip
    own = _draw_runs(axes, report)
    if scales:
        _draw_scales(axes[3], report)
    for r in report.tables.first_seen:
        if r.severity is Severity.ERROR and r.step is not None:
            for ax in axes:
                ax.axvline(r.step, color="red", alpha=0.3)
    titles = (
        "loss terms (log)",
        "total head gradient norm (log)",
        f"RPN positives ({own})",
        "loss scale (log; o: the run skipped the step, x: the replay says it overflows)",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=4)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[-1].set_xlabel("step (red line: first step of an error finding; x: NaN/Inf)")
    m = report.meta.scan
    fig.suptitle(f"lossdoctor scan of {', '.join(m.inputs)}: {m.dumps} dumps")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    plt.close(fig)
