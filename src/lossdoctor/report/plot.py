"""A matplotlib figure per report: for each head and level, positives/negatives, loss, feature
gradient norm and per-sample weight, old profile vs new."""

from __future__ import annotations

import math
from pathlib import Path

from ..inputs.files import atomic_write
from .model import Report


def plot(report: Report, path: str | Path, profiles: list[str] | None = None) -> None:
    """Write the figure as PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = profiles or report.profiles[:2]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), constrained_layout=True)
    for row, head in enumerate(("rpn", "roi")):
        rows = [r for r in report.tables["levels"] if r["head"] == head and r["level"] != "all"]
        levels = list(dict.fromkeys(r["level"] for r in rows))
        x = list(range(len(levels)))
        first = {r["level"]: r for r in rows if r["profile"] == profiles[0]}
        ax = axes[row][0]
        ax.bar(
            [i - 0.2 for i in x],
            [first[l]["pos"] for l in levels],
            0.4,
            label="positives",
            color="tab:green",
        )
        ax.bar(
            [i + 0.2 for i in x],
            [first[l]["neg"] for l in levels],
            0.4,
            label="negatives",
            color="tab:gray",
        )
        ax.set_yscale("symlog")
        ax.set_title(f"{head.upper()}: sampled per level")
        ax.legend(fontsize=8)
        for col, (key, title, log) in enumerate(
            (
                ("loss", "loss (cls + bbox)", False),
                ("grad_feature", "|dL/d feature|", True),
                ("sample_weight", "per-sample weight (bars cls, ◆ box)", True),
            ),
            start=1,
        ):
            ax = axes[row][col]
            width = 0.8 / len(profiles)
            for k, p in enumerate(profiles):
                by = {r["level"]: r for r in rows if r["profile"] == p}
                vals = [
                    (by[l]["loss_cls"] + by[l]["loss_bbox"]) if key == "loss" else by[l][key]
                    for l in levels
                ]
                pos = [i - 0.4 + width * (k + 0.5) for i in x]
                finite = [
                    v
                    if isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not log)
                    else 0
                    for v in vals
                ]
                bars = ax.bar(pos, finite, width, label=p)
                if key == "sample_weight":
                    box = [by[l].get("sample_weight_bbox") for l in levels]
                    pts = [
                        (x_, v)
                        for x_, v in zip(pos, box)
                        if isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                    ]
                    if pts:
                        ax.scatter(
                            [a for a, _ in pts],
                            [b for _, b in pts],
                            marker="D",
                            color=bars.patches[0].get_facecolor(),
                            edgecolor="black",
                            zorder=3,
                            s=28,
                        )
                for b, v in zip(bars, vals):
                    if isinstance(v, float) and not math.isfinite(v):
                        ax.annotate(
                            "NaN" if v != v else "Inf",
                            (b.get_x() + b.get_width() / 2, 0),
                            ha="center",
                            va="bottom",
                            color="red",
                            fontsize=8,
                            fontweight="bold",
                            rotation=90,
                        )
            if log:
                ax.set_yscale("log")
            ax.set_title(f"{head.upper()}: {title}")
            ax.legend(fontsize=8)
        for ax in axes[row]:
            ax.set_xticks(x, levels)
    bt = report.meta["batch"]
    fig.suptitle(
        f"lossdoctor: {' vs '.join(profiles)} on {bt['path'] or 'batch'} ({bt['images']} images)"
    )
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
