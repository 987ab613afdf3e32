"""Findings across the ranks of one step: the rules that need every rank's replay at once.

Under DDP each rank normalizes its own batch and the gradients are averaged, so a sample on rank r
weighs ``weight / (D_r * world_size)`` in the step's gradient, and a parameter that gets no
gradient on one rank but does on another leaves DDP waiting (the empty-GT hang).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..vocab import Head, Part, Severity, term_of
from .dense import DENSE_RULES
from .finding import Finding
from .findings import RULES, Rule, to_finding
from .groups import frame

# one rank's samples weighing more than this many times another's is a skew
RANK_SKEW = 10.0


@dataclass(kw_only=True)
class RankLevel:
    """One (profile, head, level) of one rank: per part (cls over the sampled, box over the
    positives), how many samples, the normalizer, and a sample's weight in the step's averaged
    gradient, weight / (D_r * world_size)."""

    samples: dict[Part, int]
    avg_factor: dict[Part, float]
    sample_weight: dict[Part, float]


@dataclass(kw_only=True)
class RankView:
    """What the cross-rank checks read of one rank's replay."""

    rank: int
    images: int
    images_with_gt: int
    levels: dict[tuple[str, Head, str], RankLevel] = field(default_factory=dict)
    no_grad: dict[str, list[str]] = field(default_factory=dict)  # profile -> params, levels


def rank_empty_gt(ranks: list[RankView]) -> list[Finding]:
    return [
        Finding(
            message=f"rank {v.rank}: none of its {v.images} images has a usable GT box, so its "
            "whole batch trains as background and its positive terms are empty",
            evidence={"rank": v.rank, "images": v.images},
            cause="a rank whose whole batch has no usable GT",
        )
        for v in ranks
        if v.images_with_gt == 0
    ]


def _graph_gaps(ranks: list[RankView], profile: str) -> dict[tuple, list[str]]:
    """(ranks with a gradient, ranks without) → what differs so, under one profile."""
    gaps: dict[tuple, list[str]] = {}
    missing = {v.rank: set(v.no_grad.get(profile, [])) for v in ranks}
    for thing in sorted(set().union(*missing.values())):
        without = tuple(r for r, m in missing.items() if thing in m)
        if len(without) < len(ranks):
            with_ = tuple(r for r in missing if r not in without)
            gaps.setdefault((with_, without), []).append(thing)
    return gaps


def rank_graph_differs(ranks: list[RankView]) -> list[Finding]:
    out = []
    for profile in dict.fromkeys(p for v in ranks for p in v.no_grad):
        for (with_, without), things in _graph_gaps(ranks, profile).items():
            msg = (
                f"{profile}: {', '.join(things)} get a gradient on ranks {list(with_)} and none on "
                f"ranks {list(without)}: where the loss code leaves an empty term out of the "
                "graph, DDP without find_unused_parameters waits for them"
            )
            ev = {"params": things, "ranks_with": list(with_), "ranks_without": list(without)}
            out.append(Finding(message=msg, profile=profile, evidence=ev))
    return out


def _skew(key: tuple, part: Part, at: dict[int, RankLevel]) -> Finding | None:
    used = {r: x for r, x in at.items() if x.samples[part] > 0 and x.sample_weight[part] > 0}
    if len(used) < 2:
        return None
    weight = {r: x.sample_weight[part] for r, x in used.items()}
    hi, lo = max(weight, key=weight.get), min(weight, key=weight.get)
    ratio = weight[hi] / weight[lo]
    if not ratio > RANK_SKEW:
        return None
    profile, head, level = key
    d = {str(r): x.avg_factor[part] for r, x in used.items()}
    msg = (
        f"{profile}: one {head} {part} sample at {level} on rank {hi} weighs {ratio:.0f}x one on "
        f"rank {lo} (avg_factor {d[str(hi)]:g} vs {d[str(lo)]:g})"
    )
    return Finding(message=msg, head=head, level=level, profile=profile, term=term_of(head, part),
                   evidence={"ranks": [hi, lo], "ratio": ratio, "avg_factors": d},
                   cause=f"one rank's samples weigh over {RANK_SKEW:g}x another's")  # fmt: skip


def rank_normalizer_skew(ranks: list[RankView]) -> list[Finding]:
    out = []
    for key in dict.fromkeys(k for v in ranks for k in v.levels):
        at = {v.rank: v.levels[key] for v in ranks if key in v.levels}
        out += [h for part in (Part.CLS, Part.BOX) if (h := _skew(key, part, at))]
    return out


W = Severity.WARNING
RANK_RULES: tuple[Rule, ...] = (
    Rule(
        code="rank-graph-differs",
        severity=W,
        check=rank_graph_differs,
        summary="parameters or feature levels that get a gradient on some ranks and none on "
        "others: the DDP hang, where the loss code leaves empty terms out of the graph",
        evidence=("params", "ranks_with", "ranks_without"),
        fix="make an empty term a zero that stays in the graph (pred.sum() * 0, as profile "
        "'fixed' does) on every rank, or set find_unused_parameters=True",
    ),
    Rule(
        code="rank-empty-gt",
        severity=W,
        check=rank_empty_gt,
        summary="a rank whose whole batch has no usable GT: it takes the empty-GT graph",
        evidence=("rank", "images"),
        fix="shuffle so no rank draws only background images, and keep every head in the graph "
        "with zero-weighted terms (profile 'fixed')",
    ),
    Rule(
        code="rank-normalizer-skew",
        severity=W,
        check=rank_normalizer_skew,
        summary=f"one rank's samples weigh over {RANK_SKEW:g}x another's in the step's gradient: "
        "each rank divides by its own count",
        evidence=("ranks", "ratio", "avg_factors"),
        fix="all-reduce the normalizer across ranks (avg_factor = reduce_mean(count), as "
        "MMDetection's heads do) so a sample weighs the same on every rank",
    ),
)
# every rule: those of one replay, those across the ranks of a step, a one-stage head's
ALL_RULES: tuple[Rule, ...] = RULES + RANK_RULES + DENSE_RULES


def rank_findings(per_rank: list[Finding], views: list[RankView], own: str | None,
                  profiles: list[str]) -> list[Finding]:  # fmt: skip
    """A step's findings: every rank's own (``rank`` set), then those across its ranks, framed by
    the run's own profile ``own``; most severe first."""
    across = [to_finding(rule, hit) for rule in RANK_RULES for hit in rule.check(views)]
    across = frame(across, own, [p for p in profiles if p != own])
    return sorted(per_rank + across, key=lambda f: f.severity.rank)
