"""One step across ranks: every rank's report in one, the ``ranks`` table (each rank's normalizer
next to an all-reduced one) and the findings that need every rank at once."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from statistics import fmean

from ..diagnose.groups import group
from ..diagnose.ranks import RankLevel, RankView, rank_findings
from ..inputs.errors import InputError
from ..vocab import Head, Part, term_of
from .build import ALL_LEVELS
from .meta import RankMeta
from .model import Report
from .rows import LevelRow, RankRow, ReportTables


def _agreed(reports: dict[int, Report]) -> None:
    """The ranks of a step come from one run and one step: same world size, levels, heads."""
    facts = {
        "world_size": lambda r: r.meta.batch.dump.world_size,
        "levels": lambda r: r.meta.batch.levels,
        "channels": lambda r: r.meta.heads.channels if r.meta.heads is not None else None,
        "classes": lambda r: (r.meta.heads or r.meta.dense).classes,
        "one-stage config": lambda r: r.meta.dense.preset if r.meta.dense is not None else None,
        "profiles": lambda r: r.profiles,
    }
    first = min(reports)
    for rank, rep in sorted(reports.items()):
        for what, get in facts.items():
            if get(rep) != get(reports[first]):
                raise InputError(
                    f"rank {rank} has {what} {get(rep)} where rank {first} has "
                    f"{get(reports[first])}: the rank dumps of a step must come from one run"
                )
    world = reports[first].meta.batch.dump.world_size
    missing = sorted(set(range(world or len(reports))) - set(reports))
    if missing or (world is not None and len(reports) != world):
        raise InputError(
            f"the step has dumps of ranks {sorted(reports)} of world size {world}: rank "
            f"{missing[0] if missing else max(reports)} is missing or extra; inspect one rank's "
            "folder alone, or capture every rank at this step"
        )


def _rescaled(loss: float, d: float, mean: float, n: int) -> float:
    """A level's loss under another normalizer: its sum (0 without samples) over ``mean``."""
    if n == 0:
        return 0.0
    return loss * d / mean if d > 0 and mean > 0 else math.nan


def _weight(rep: Report, profile: str, head: Head, part: Part) -> float:
    if rep.meta.dense is not None:
        spec = rep.meta.dense.profiles[profile]
        return spec.terms[part].weight
    return rep.meta.profiles[profile].term(term_of(head, part)).weight


def _per_sample(weight: float, d: float, world: int) -> float:
    return weight / (d * world) if d > 0 else math.inf


def _by_level(reports: dict[int, Report]) -> dict[tuple, dict[int, LevelRow]]:
    """(profile, head, level) → rank → its levels row (the ``all`` rows left out)."""
    by_key: dict[tuple, dict[int, LevelRow]] = {}
    for rank, rep in reports.items():
        for x in rep.tables.levels:
            if x.level != ALL_LEVELS:
                by_key.setdefault((x.profile, x.head, x.level), {})[rank] = x
    return by_key


def _rank_row(rank: int, key: tuple, x: LevelRow, mean: dict, rep: Report, world: int) -> RankRow:
    profile, head, level = key
    w = {part: _weight(rep, profile, head, part) for part in (Part.CLS, Part.BOX)}
    return RankRow(
        rank=rank, profile=profile, head=head, level=level, pos=x.pos, neg=x.neg,
        sampled=x.sampled, avg_factor=x.avg_factor, global_avg_factor=mean[Part.CLS],
        loss_cls=x.loss_cls, loss_bbox=x.loss_bbox,
        global_loss_cls=_rescaled(x.loss_cls, x.avg_factor, mean[Part.CLS], x.sampled),
        global_loss_bbox=_rescaled(x.loss_bbox, x.avg_factor_bbox, mean[Part.BOX], x.pos),
        sample_weight=_per_sample(w[Part.CLS], x.avg_factor, world),
        global_sample_weight=_per_sample(w[Part.CLS], mean[Part.CLS], world),
        avg_factor_bbox=x.avg_factor_bbox, global_avg_factor_bbox=mean[Part.BOX],
        sample_weight_bbox=_per_sample(w[Part.BOX], x.avg_factor_bbox, world),
        global_sample_weight_bbox=_per_sample(w[Part.BOX], mean[Part.BOX], world),
    )  # fmt: skip


def rank_rows(reports: dict[int, Report]) -> list[RankRow]:
    """Per (rank, profile, head, level): the rank's avg_factor and the mean over ranks."""
    out = []
    for key, at in _by_level(reports).items():
        mean = {
            Part.CLS: fmean(x.avg_factor for x in at.values()),
            Part.BOX: fmean(x.avg_factor_bbox for x in at.values()),
        }
        out += [_rank_row(r, key, x, mean, reports[r], len(reports)) for r, x in sorted(at.items())]
    return out


def _view(rank: int, rep: Report, ranks_table: list[RankRow]) -> RankView:
    images = rep.tables.images
    v = RankView(
        rank=rank,
        images=len(images),
        images_with_gt=sum(1 for im in images if im.gt > 0),
        no_grad={p.profile: list(p.no_grad) for p in rep.tables.profiles},
    )
    for row in (x for x in ranks_table if x.rank == rank):
        v.levels[(row.profile, row.head, row.level)] = RankLevel(
            samples={Part.CLS: row.sampled, Part.BOX: row.pos},
            avg_factor={Part.CLS: row.avg_factor, Part.BOX: row.avg_factor_bbox},
            sample_weight={Part.CLS: row.sample_weight, Part.BOX: row.sample_weight_bbox},
        )
    return v


def rank_views(reports: dict[int, Report], ranks_table: list[RankRow]) -> list[RankView]:
    return [_view(r, rep, ranks_table) for r, rep in sorted(reports.items())]


def _per_rank(reports: dict[int, Report], table: Callable[[ReportTables], list]) -> list:
    """One table of every rank's report, each row with its rank."""
    return [replace(row, rank=r) for r, rep in sorted(reports.items())
            for row in table(rep.tables)]  # fmt: skip


def combine_ranks(reports: dict[int, Report]) -> Report:
    """The report of one step from the reports of its ranks (rank → report)."""
    _agreed(reports)
    first = reports[min(reports)]
    ranks = rank_rows(reports)
    tables = ReportTables(
        levels=_per_rank(reports, lambda t: t.levels),
        images=_per_rank(reports, lambda t: t.images),
        params=_per_rank(reports, lambda t: t.params),
        profiles=_per_rank(reports, lambda t: t.profiles),
        origins=_per_rank(reports, lambda t: t.origins),
        ranks=ranks,
        precision=_per_rank(reports, lambda t: t.precision),
        drift=_per_rank(reports, lambda t: t.drift),
    )
    per_rank = [replace(f, rank=r) for r, rep in sorted(reports.items()) for f in rep.findings]
    findings = rank_findings(per_rank, rank_views(reports, ranks), first.meta.own, first.profiles)
    meta = replace(
        first.meta,
        ranks=[RankMeta(rank=r, batch=rep.meta.batch, symptom=rep.meta.symptom)
               for r, rep in sorted(reports.items())],
        world_size=len(reports),
    )  # fmt: skip
    return Report(meta=meta, tables=tables, findings=findings,
                  groups=group(findings, first.meta.batch.levels))  # fmt: skip
