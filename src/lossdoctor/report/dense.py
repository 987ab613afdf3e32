"""A one-stage detector's report: the dense head's rows in the same tables as the two-stage ones
(head ``dense``; an ``all`` row per profile with the totals a framework's loss dict shows)."""

from __future__ import annotations

import datetime
import math

import torch

from .. import __version__
from ..diagnose.dense import DenseDiagnosis, LevelGrads
from ..replay.dense import DENSE_PARTS, DenseLevel, DenseLevelLoss, ema_update
from ..vocab import DenseNormalizer, Head, Part, term_of
from .build import ALL_LEVELS, _batch_meta, _common, _share, sha256
from .meta import CheckpointMeta, DenseMeta, ReportMeta, SymptomMeta
from .model import Report
from .rows import ImageRow, LevelRow, ParamRow, ProfileRow, ReportTables


def _f(t) -> float:
    return float(t.detach())


def _weight(w: float, d: float) -> float:
    return w / d if d else math.nan


def _row(name, level: str, counts, ll_terms, factors, weights, g: LevelGrads, total, ctr,
         origin: str, nonfinite: int) -> LevelRow:  # fmt: skip
    anchors, pos, neg, ign = counts
    cls, box = ll_terms[Part.CLS], ll_terms[Part.BOX]
    c = ll_terms[Part.CTR]
    return LevelRow(
        profile=name,
        head=Head.DENSE,
        level=level,
        anchors=anchors,
        pos=pos,
        neg=neg,
        ignored=ign,
        sampled=pos + neg,
        avg_factor=factors[Part.CLS],
        sample_weight=_weight(weights[Part.CLS], factors[Part.CLS]),
        loss_cls=cls,
        loss_bbox=box,
        loss_share=_share(cls + box + c, total),
        grad_feature=g.feature,
        grad_logits_pos=g.logits_pos,
        grad_logits_neg=g.logits_neg,
        grad_deltas=g.deltas,
        nonfinite=nonfinite,
        nan_origin=origin,
        avg_factor_bbox=factors[Part.BOX],
        sample_weight_bbox=_weight(weights[Part.BOX], factors[Part.BOX]),
        loss_ctr=c if ctr else None,
        avg_factor_ctr=factors[Part.CTR] if ctr else None,
    )


def _counts(lv: DenseLevel) -> tuple[int, int, int, int]:
    return (lv.labels.numel(), int(lv.positive.sum()), int(lv.negative.sum()),
            int((~lv.positive & ~lv.negative).sum()))  # fmt: skip


def _nonfinite(lv: DenseLevel, ll: DenseLevelLoss) -> int:
    ts = [lv.focal, lv.box, lv.ctr_loss, *ll.terms.values()]
    return sum(int((~torch.isfinite(t.detach())).sum()) for t in ts)


def level_rows(d: DenseDiagnosis) -> list[LevelRow]:
    r, ctr = d.replay, d.replay.weights.has_ctr
    out = []
    for name, losses in r.losses.items():
        total = _f(losses.total)
        spec = losses.profile
        weights = {part: term.weight for part, term in spec.terms.items()}
        rows = []
        for k, (lv, ll) in enumerate(zip(r.levels, losses.levels)):
            terms = {p: _f(t) for p, t in ll.terms.items()}
            rows.append(_row(name, lv.name, _counts(lv), terms, ll.avg_factor, weights,
                             d.grads[name][k], total, ctr, d.origins[name][lv.name],
                             _nonfinite(lv, ll)))  # fmt: skip
        terms = {p: _f(losses.term(p)) for p in DENSE_PARTS}
        factors = {p: _common(ll.avg_factor[p] for ll in losses.levels) for p in DENSE_PARTS}
        sq = {a: math.sqrt(sum(getattr(g, a) ** 2 for g in d.grads[name]))
              for a in ("feature", "logits_pos", "logits_neg", "deltas")}  # fmt: skip
        counts = tuple(sum(c) for c in zip(*(_counts(lv) for lv in r.levels)))
        origin = next((o for o in d.origins[name].values() if o), "")
        rows.append(_row(name, ALL_LEVELS, counts, terms, factors, weights, LevelGrads(**sq),
                         total, ctr, origin, sum(x.nonfinite for x in rows)))  # fmt: skip
        out += rows
    return out


def image_rows(d: DenseDiagnosis) -> list[ImageRow]:
    r = d.replay
    out = []
    for i in range(r.batch.num_images):
        hit = torch.zeros(r.gt.boxes[i].shape[0], dtype=torch.bool)
        for lv in r.levels:
            hit[lv.matched[i][lv.positive[i]]] = True
        out.append(ImageRow(
            image=i, gt=r.gt.boxes[i].shape[0], gt_without_pos=int((~hit).sum()),
            detections=d.symptom.detections[i], max_fg_score=d.symptom.max_fg_score[i],
            gt_ignored=int(r.batch.gt_ignore[i].sum()),
            gt_bad_label=sum(1 for x in r.gt.dropped_labels if x.image == i),
            gt_nonfinite=int((~torch.isfinite(r.batch.gt_boxes[i]).all(1)).sum()),
        ))  # fmt: skip
    return out


def profile_rows(d: DenseDiagnosis) -> list[ProfileRow]:
    out = []
    for name, losses in d.replay.losses.items():
        norms = d.param_norms[name]  # None: no gradient at all (out of the graph)
        total_norm = math.sqrt(sum(v * v for v in norms.values() if v is not None))
        nan = math.nan
        out.append(ProfileRow(
            profile=name, loss_total=_f(losses.total), rpn_cls=nan, rpn_box=nan, roi_cls=nan,
            roi_box=nan, grad_total_norm=total_norm, max_norm=None, clip_coef=1.0,
            grad_clipped_norm=total_norm, rpn_neg_share=None, roi_neg_share=None,
            no_grad=sorted(k for k, v in norms.items() if v is None),
            dense_cls=_f(losses.term(Part.CLS)), dense_box=_f(losses.term(Part.BOX)),
            dense_ctr=_f(losses.term(Part.CTR)) if d.replay.weights.has_ctr else None,
        ))  # fmt: skip
    return out


def _nan_if_none(v: float | None) -> float:
    return math.nan if v is None else v


def param_rows(d: DenseDiagnosis) -> list[ParamRow]:
    """Per profile and head parameter: its gradient's norm under each term and in total."""
    w, out = d.replay.weights, []
    shapes = {n: t.shape for n, t in w.params.items()} | {
        f"scale{i}": s.shape for i, s in enumerate(w.scales)
    }
    for name, by_term in d.term_norms.items():
        nan = math.nan
        for p, shape in shapes.items():
            # a term whose graph does not reach the parameter gives it 0
            terms = {term_of(Head.DENSE, part): v[p] or 0.0 for part, v in by_term.items()}
            out.append(ParamRow(
                profile=name, param=p, shape="x".join(map(str, shape)) or "scalar",
                rpn_cls=nan, rpn_box=nan, roi_cls=nan, roi_box=nan,
                total=_nan_if_none(d.param_norms[name][p]),
                **{t.value: v for t, v in terms.items()},
            ))  # fmt: skip
    return out


def _dense_meta(d: DenseDiagnosis) -> DenseMeta:
    r, w = d.replay, d.replay.weights
    pos = int(r.positives.sum())
    uses_ema = any(
        spec.normalizer is DenseNormalizer.EMA
        for losses in r.losses.values()
        for spec in (losses.profile.cls, losses.profile.box)
    )
    return DenseMeta(
        preset=r.config.name,
        kind=w.kind,
        classes=w.num_classes,
        anchors=w.num_anchors,
        convs=w.num_convs,
        norm=w.norm,
        centerness=w.has_ctr,
        box_loss=r.config.box_loss,
        profiles={n: losses.profile for n, losses in r.losses.items()},
        positives=pos,
        ctr_sum=float(r.ctr_sums.sum()),
        pseudo=int(r.positives.sum(1).clamp(min=1).sum()),
        world_pos=None if r.world is None else r.world.pos,
        world_ctr_sum=None if r.world is None else r.world.ctr_sum,
        world_pseudo=None if r.world is None else r.world.pseudo,
        ema_before=r.ema_before,
        ema=ema_update(r.ema_before, pos, r.config.ema_momentum) if uses_ema else None,
    )


def build_dense_report(d: DenseDiagnosis, checkpoint_path=None, batch_path=None) -> Report:
    r = d.replay
    meta = ReportMeta(
        lossdoctor=__version__,
        torch=torch.__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        checkpoint=CheckpointMeta(
            path=str(checkpoint_path) if checkpoint_path else None,
            sha256=sha256(checkpoint_path),
            layout=r.weights.layout.layout,
        ),
        batch=_batch_meta(r.batch, batch_path),
        heads=None,
        config=None,
        profiles={},
        seed=0,
        sample_all=True,
        symptom=SymptomMeta(
            score_thr=d.symptom.score_thr,
            detections=list(d.symptom.detections),
            max_fg_score=list(d.symptom.max_fg_score),
            objectness_above_half=math.nan,
        ),
        dense=_dense_meta(d),
    )
    tables = ReportTables(levels=level_rows(d), images=image_rows(d), params=param_rows(d),
                          profiles=profile_rows(d), origins=[])  # fmt: skip
    return Report(meta=meta, tables=tables, findings=d.findings)
