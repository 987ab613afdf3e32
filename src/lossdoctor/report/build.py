"""Build a :class:`Report` from a diagnosis: the tables' rows are made here, from the replay's
typed results (the engine builds no rows)."""

from __future__ import annotations

import datetime
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..diagnose import Diagnosis
from ..diagnose.checks import chance
from ..diagnose.gradients import LevelGrads, ProfileGrads
from ..replay.normalize import LevelLoss, ProfileLosses
from ..replay.samples import LevelSamples
from ..vocab import BOX_TERMS, GRADIENT_TERM, Head, Part, PrecisionSource, Term, term_of
from .meta import BatchMeta, CheckpointMeta, HeadsMeta, PrecisionMeta, ReportMeta, SymptomMeta
from .model import Report
from .rows import (
    DriftRow,
    ImageRow,
    LayerRangeRow,
    LevelRow,
    OriginRow,
    ParamRow,
    ProfileRow,
    ReportTables,
)
from .serialize import dump_record

ALL_LEVELS = "all"


def sha256(path: str | Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plain(v):
    """Batch meta → JSON-safe values."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _nonfinite(t) -> int:
    return int((~torch.isfinite(t.detach())).sum())


def _share(part: float, total: float) -> float:
    return part / total if total != 0 and total == total else math.nan


def _common(values) -> float:
    """A head-wide value: the one all levels share, or NaN when they differ."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else math.nan


@dataclass(kw_only=True)
class _LevelCtx:
    """What one (profile, head) contributes to its level rows."""

    profile: str
    head: Head
    pl: ProfileLosses
    grads: dict[str, LevelGrads]
    origins: dict[str, str]
    stage: int = 0


def _losses(s: LevelSamples, ll: LevelLoss, c: _LevelCtx) -> list:
    """The per-sample and level losses whose non-finite values a row counts."""
    if c.head is Head.MASK:
        return [s.cls_loss, ll.loss_mask]
    box_spec = c.pl.profile.term(term_of(c.head, Part.BOX))
    return [s.cls_loss, s.box_loss(box_spec), ll.loss_cls, ll.loss_bbox]


def _level_row(c: _LevelCtx, s: LevelSamples, ll: LevelLoss, total: float) -> LevelRow:
    g = c.grads[s.name]
    nonfinite = sum(_nonfinite(t) for t in _losses(s, ll, c))
    cls, box = float(ll.loss_cls.detach()), float(ll.loss_bbox.detach())
    mask = float(ll.loss_mask.detach())
    return LevelRow(
        profile=c.profile,
        head=c.head,
        level=s.name,
        anchors=s.candidates,
        pos=s.pos,
        neg=s.sampled - s.pos,
        ignored=s.ignored,
        sampled=s.sampled,
        avg_factor=ll.avg_factor,
        sample_weight=ll.sample_weight,
        loss_cls=cls,
        loss_bbox=box,
        loss_share=_share(cls + box + mask, total),
        grad_feature=g.feature,
        grad_logits_pos=g.logits_pos,
        grad_logits_neg=g.logits_neg,
        grad_deltas=g.deltas,
        nonfinite=nonfinite + g.nonfinite,
        nan_origin=c.origins.get(s.name, ""),
        avg_factor_bbox=ll.avg_factor_bbox,
        sample_weight_bbox=ll.sample_weight_bbox,
        neg_share=g.neg_share,
        stage=c.stage,
        loss_mask=mask,
    )


def _root_sum_sq(rows: list[LevelRow], attr: str) -> float:
    return math.sqrt(sum(getattr(r, attr) ** 2 for r in rows))


def _summed(losses: list[LevelLoss], attr: str) -> float:
    return float(sum((getattr(lv, attr) for lv in losses), torch.zeros(())).detach())


def _all_row(c: _LevelCtx, rows: list[LevelRow], losses: list[LevelLoss], total: float,
             neg_share: float) -> LevelRow:  # fmt: skip
    """The head's (or stage's) totals: counts summed, a normalizer only where every level
    shares one."""
    cls, box = _summed(losses, "loss_cls"), _summed(losses, "loss_bbox")
    mask = _summed(losses, "loss_mask")
    used = [r for r in rows if r.sampled > 0]
    return LevelRow(
        profile=c.profile,
        head=c.head,
        level=ALL_LEVELS,
        anchors=sum(r.anchors for r in rows),
        pos=sum(r.pos for r in rows),
        neg=sum(r.neg for r in rows),
        ignored=sum(r.ignored for r in rows),
        sampled=sum(r.sampled for r in rows),
        avg_factor=_common(r.avg_factor for r in rows),
        sample_weight=_common(r.sample_weight for r in used),
        loss_cls=cls,
        loss_bbox=box,
        loss_share=_share(cls + box + mask, total),
        grad_feature=_root_sum_sq(rows, "grad_feature"),
        grad_logits_pos=_root_sum_sq(rows, "grad_logits_pos"),
        grad_logits_neg=_root_sum_sq(rows, "grad_logits_neg"),
        grad_deltas=_root_sum_sq(rows, "grad_deltas"),
        nonfinite=sum(r.nonfinite for r in rows),
        nan_origin=next((r.nan_origin for r in rows if r.nan_origin), ""),
        avg_factor_bbox=_common(r.avg_factor_bbox for r in rows),
        sample_weight_bbox=_common(r.sample_weight_bbox for r in used),
        neg_share=neg_share,
        stage=c.stage,
        loss_mask=mask,
    )


def _stage_rows(d: Diagnosis, name: str, head: Head, stage: int, pg: ProfileGrads):
    """The level rows and the ``all`` row of one head (or one cascade stage of the RoI head)."""
    r, pl = d.replay, d.replay.losses[name]
    samples = r.roi_stages[stage].samples if head is Head.ROI else r.samples[head]
    losses = pl.stages[stage - 1] if stage else pl.levels[head]
    origins: dict[str, str] = {}
    for o in d.origins:
        if (o.profile, o.head, o.box_stage) == (name, head, stage):
            origins.setdefault(o.level, o.stage)
    grads = {g.level: g for g in pg.levels if (g.head, g.stage) == (head, stage)}
    c = _LevelCtx(profile=name, head=head, pl=pl, origins=origins, grads=grads, stage=stage)
    total = float(pl.total.detach())
    rows = [_level_row(c, s, ll, total) for s, ll in zip(samples, losses)]
    return rows + [_all_row(c, rows, losses, total, pg.neg_share.get(head, math.nan))]


def _head_rows(d: Diagnosis, name: str, head: Head, pg: ProfileGrads) -> list[LevelRow]:
    stages = range(len(d.replay.roi_stages)) if head is Head.ROI else (0,)
    return [row for k in stages for row in _stage_rows(d, name, head, k, pg)]


def level_rows(d: Diagnosis) -> list[LevelRow]:
    """The ``levels`` table: per (profile, head, level), then an ``all`` row per (profile, head)."""
    return [
        row
        for name, pg in d.grads.items()
        for head in d.replay.samples
        for row in _head_rows(d, name, head, pg)
    ]


def image_rows(d: Diagnosis) -> list[ImageRow]:
    s = d.symptom
    return [
        ImageRow(**vars(im), detections=dets, max_fg_score=best)
        for im, dets, best in zip(d.replay.images, s.detections, s.max_fg_score)
    ]


def _terms(d: Diagnosis) -> tuple:
    """The loss terms of this replay: the four, and the mask term with a mask head."""
    return (*BOX_TERMS, Term.ROI_MASK) if d.replay.mask is not None else BOX_TERMS


def param_rows(d: Diagnosis) -> list[ParamRow]:
    heads = d.replay.heads
    out = []
    for name, pg in d.grads.items():
        for key, norms in pg.params.items():
            shape = "x".join(str(x) for x in heads.params[key].shape)
            row = ParamRow(
                profile=name,
                param=heads.file_key(key),
                shape=shape,
                total=norms.total,
                **{t.value: norms.by_term[t] for t in _terms(d)},
            )
            out.append(row)
    return out


def _no_grad(d: Diagnosis, g: ProfileGrads) -> list[str]:
    levels = [f"{Head.RPN} features {lvl}" for lvl in g.no_grad_levels]
    return levels + [d.replay.heads.file_key(p) for p in g.no_grad_params]


def profile_rows(d: Diagnosis) -> list[ProfileRow]:
    out = []
    for name, pl in d.replay.losses.items():
        g = d.grads[name]
        row = ProfileRow(
            profile=name,
            loss_total=float(pl.total.detach()),
            **{t.value: float(v.detach()) for t, v in pl.terms.items()},
            grad_total_norm=g.total_norm,
            max_norm=g.max_norm,
            clip_coef=g.clip_coef,
            grad_clipped_norm=g.clipped_norm,
            rpn_neg_share=g.neg_share.get(Head.RPN),
            roi_neg_share=g.neg_share.get(Head.ROI),
            no_grad=_no_grad(d, g),
        )
        out.append(row)
    return out


def origin_rows(d: Diagnosis) -> list[OriginRow]:
    return [
        OriginRow(
            profile=o.profile,
            head=o.head,
            level=o.level,
            term=o.part or GRADIENT_TERM,
            stage=o.stage,
            nan=o.nan,
            posinf=o.posinf,
            neginf=o.neginf,
            image=o.image,
            index=o.index,
            gt=o.gt,
            cause=o.cause,
            box_stage=o.box_stage,
        )
        for o in d.origins
    ]


def _batch_meta(b, path) -> BatchMeta:
    meta = plain(b.meta)
    return BatchMeta(
        path=str(path) if path else None,
        sha256=sha256(path),
        images=b.num_images,
        levels=list(b.levels),
        strides=list(b.strides),
        pad_size=list(b.pad_size),
        image_sizes=[list(x) for x in b.image_sizes],
        meta=meta,
        replaced=[x.name for x in b.replaced],
        dump=dump_record(meta),
    )


def _heads_meta(h) -> HeadsMeta:
    return HeadsMeta(channels=h.channels, anchors=h.num_anchors, classes=h.num_classes,
                     background=h.background, pool=h.pool_size,
                     reg_classes=h.reg_classes)  # fmt: skip


def _symptom_meta(d: Diagnosis) -> SymptomMeta:
    s = d.symptom
    return SymptomMeta(
        score_thr=s.score_thr,
        detections=list(s.detections),
        max_fg_score=list(s.max_fg_score),
        objectness_above_half=s.objectness_above_half,
        chance=chance(d.replay),
        step=dump_record(d.replay.batch.meta).step,
    )


def _meta(d: Diagnosis, checkpoint_path, batch_path) -> ReportMeta:
    r, h = d.replay, d.replay.heads
    return ReportMeta(
        lossdoctor=__version__,
        torch=torch.__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        checkpoint=CheckpointMeta(
            path=str(checkpoint_path) if checkpoint_path else None,
            sha256=sha256(checkpoint_path),
            layout=h.layout,
            replaced=[x.name for x in h.replaced],
            unreplayed=list(h.unreplayed),
        ),
        batch=_batch_meta(r.batch, batch_path),
        heads=_heads_meta(h),
        config=r.config,
        profiles={name: pl.profile for name, pl in r.losses.items()},
        seed=r.seed,
        sample_all=r.sample_all,
        symptom=_symptom_meta(d),
    )


def precision_rows(d: Diagnosis) -> list[LayerRangeRow]:
    p = d.precision
    if p is None:
        return []
    return [
        LayerRangeRow(precision=p.precision, head=x.head, level=x.level or ALL_LEVELS,
                      stage=x.stage, layer=x.layer, terms=list(x.terms),
                      max_abs=x.forward.max_abs, limit=p.limit, overflow=x.forward.overflow,
                      underflow=x.forward.underflow, values=x.forward.numel,
                      grad_max=x.grad_max)
        for x in p.layers
    ]  # fmt: skip


def drift_rows(d: Diagnosis) -> list[DriftRow]:
    p = d.precision
    if p is None:
        return []
    return [DriftRow(precision=p.precision, profile=x.profile, term=x.term, loss=x.low,
                     loss_fp32=x.fp32, relative=x.relative) for x in p.drift]  # fmt: skip


def _precision_meta(d: Diagnosis) -> PrecisionMeta | None:
    """Recorded for a low-precision replay, or one asked for."""
    p = d.precision
    if p is None or not (p.precision.low or p.choice.source is PrecisionSource.GIVEN):
        return None
    v, a = p.verdict, p.amp
    return PrecisionMeta(
        precision=p.precision, source=p.choice.source, run=p.choice.run,
        loss_scale=a.loss_scale, growth_tracker=a.growth_tracker, skipped=a.skipped,
        found_inf=a.found_inf,
        grad_max=None if v is None else v.grad_max,
        grad_max_in=None if v is None else v.where,
        safe_scale=None if v is None else v.safe_scale,
        overflows=None if v is None else v.overflows,
    )  # fmt: skip


def build_report(d: Diagnosis, checkpoint_path=None, batch_path=None) -> Report:
    tables = ReportTables(
        levels=level_rows(d),
        images=image_rows(d),
        params=param_rows(d),
        profiles=profile_rows(d),
        origins=origin_rows(d),
        precision=precision_rows(d),
        drift=drift_rows(d),
    )
    meta = _meta(d, checkpoint_path, batch_path)
    meta.precision = _precision_meta(d)
    return Report(meta=meta, tables=tables, findings=d.findings, groups=d.groups)
