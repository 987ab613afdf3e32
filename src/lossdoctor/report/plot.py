"""A matplotlib figure per report: for each head and level, positives/negatives, loss, feature
gradient norm and per-sample weight, old profile vs new."""

from __future__ import annotations

import math
from pathlib import Path

from ..inputs.files import atomic_write
from ..vocab import Head
from .build import ALL_LEVELS
from .model import Report
from .rows import LevelRow

DPI = 90
BAR_GROUP = 0.8  # width of a level's group of bars
# (value of a row, panel title, log scale)
PANELS = (
    (lambda r: r.loss_cls + r.loss_bbox, "loss (cls + bbox)", False),
    (lambda r: r.grad_feature, "|dL/d feature|", True),
    (lambda r: r.sample_weight, "per-sample weight (bars cls, ◆ box)", True),
)


def _shown(v, log: bool) -> float:
    """A bar's height: non-finite and (on a log axis) non-positive values are drawn as 0."""
    ok = isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not log)
    return v if ok else 0


def _counts(ax, rows: dict[str, LevelRow], levels: list[str], head: Head) -> None:
    x = range(len(levels))
    ax.bar(
        [i - 0.2 for i in x],
        [rows[lv].pos for lv in levels],
        0.4,
        label="positives",
        color="tab:green",
    )
    ax.bar(
        [i + 0.2 for i in x],
        [rows[lv].neg for lv in levels],
        0.4,
        label="negatives",
        color="tab:gray",
    )
    ax.set_yscale("symlog")
    ax.set_title(f"{head.upper()}: sampled per level")
    ax.legend(fontsize=8)


def _mark_nonfinite(ax, bars, values) -> None:
    for b, v in zip(bars, values):
        if isinstance(v, float) and not math.isfinite(v):
            label = "NaN" if v != v else "Inf"
            ax.annotate(
                label,
                (b.get_x() + b.get_width() / 2, 0),
                ha="center",
                va="bottom",
                color="red",
                fontsize=8,
                fontweight="bold",
                rotation=90,
            )


def _box_weights(ax, rows: dict[str, LevelRow], levels: list[str], xs, color) -> None:
    """The box term's per-sample weight as diamonds beside the classification bars."""
    pts = [(x, rows[lv].sample_weight_bbox) for x, lv in zip(xs, levels)]
    pts = [(x, v) for x, v in pts if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    if pts:
        ax.scatter(
            [a for a, _ in pts],
            [b for _, b in pts],
            marker="D",
            color=color,
            edgecolor="black",
            zorder=3,
            s=28,
        )


def _panel(ax, by_profile: dict, levels: list[str], head: Head, panel) -> None:
    value, title, log = panel
    width = BAR_GROUP / len(by_profile)
    for k, (p, rows) in enumerate(by_profile.items()):
        vals = [value(rows[lv]) for lv in levels]
        xs = [i - BAR_GROUP / 2 + width * (k + 0.5) for i in range(len(levels))]
        bars = ax.bar(xs, [_shown(v, log) for v in vals], width, label=p)
        if panel is PANELS[-1]:
            _box_weights(
                ax, rows, levels, xs, bars.patches[0].get_facecolor() if bars.patches else None
            )
        _mark_nonfinite(ax, bars, vals)
    if log:
        ax.set_yscale("log")
    ax.set_title(f"{head.upper()}: {title}")
    ax.legend(fontsize=8)


def plot(report: Report, path: str | Path, profiles: list[str] | None = None) -> None:
    """Write the figure as PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = profiles or report.profiles[:2]
    first = min((r.rank or 0 for r in report.tables.levels), default=0)
    rows = [  # one rank of a multi-rank step (the first), a cascade's first stage
        r
        for r in report.tables.levels
        if r.level != ALL_LEVELS and (r.rank or 0) == first and not r.stage
    ]
    heads = list(dict.fromkeys(r.head for r in rows))
    fig, axes = plt.subplots(
        len(heads),
        1 + len(PANELS),
        figsize=(16, 3.75 * len(heads)),
        constrained_layout=True,
        squeeze=False,
    )
    for ax_row, head in zip(axes, heads):
        by_profile = {
            p: {r.level: r for r in rows if r.head == head and r.profile == p} for p in profiles
        }
        levels = list(by_profile[profiles[0]])
        _counts(ax_row[0], by_profile[profiles[0]], levels, head)
        for ax, panel in zip(ax_row[1:], PANELS):
            _panel(ax, by_profile, levels, head, panel)
        for ax in ax_row:
            ax.set_xticks(range(len(levels)), levels)
    bt = report.meta.batch
    fig.suptitle(
        f"lossdoctor: {' vs '.join(profiles)} on {bt.path or 'batch'} ({bt.images} images)"
    )
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    plt.close(fig)
