"""The box head's gradients per stage: the predictors and fcs by hand (a conv head by autograd),
term by term; RoIAlign's feature gradient by one backward per profile, split into the shared
background RoIs and the sparse positives where positives are few."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...inputs.checkpoint import HeadWeights
from ...inputs.profiles import LossProfile, TermSpec
from ...replay.engine import Replay
from ...replay.normalize import LevelLoss, staged
from ...replay.roi import RoiStage
from ...replay.roi_align import multiscale_roi_align
from ...vocab import (
    BIAS,
    WEIGHT,
    Head,
    Layer,
    Term,
    param,
)
from .base import (
    LevelGrads,
    _coef,
    _dot,
    _finite,
    _gram_norm_sq,
    _HeadGrads,
    _nonfinite,
    _norm,
    _ParamGrad,
    _share,
    _sq,
    _vjp,
    _zeros_for_none,
)
from .shared import _Shared, _StageShared

# a box-head stage is split into a shared backward and sparse ones per profile where at most this
# share of its RoIs is positive (--sample-all: about 5%; sampled: up to 25%)
ROI_SPLIT_SHARE = 0.125


@dataclass(kw_only=True)
class _StageView:
    """One box-head stage under one profile: its RoIs and weights, its level losses, the profile
    as the stage weighs its terms, and its shared derivatives."""

    k: int
    roi: RoiStage
    heads: HeadWeights
    losses: list[LevelLoss]
    p: LossProfile
    sh: _StageShared
    features_finite: list[bool]


def _stage_view(r: Replay, p: LossProfile, sh: _Shared, k: int) -> _StageView:
    pl, cascade = r.losses[p.name], r.config.cascade
    weight = (
        (cascade.stage0_loss_weight if r.stages else 1.0)
        if k == 0
        else (cascade.loss_weights[k - 1])
    )
    return _StageView(k=k, roi=r.roi_stages[k], heads=r.heads.stage(k),
                      losses=pl.levels[Head.ROI] if k == 0 else pl.stages[k - 1],
                      p=staged(p, weight), sh=sh.stages[k],
                      features_finite=sh.features_finite())  # fmt: skip


def _roi_outputs(v: _StageView) -> tuple[Tensor, Tensor]:
    """∂L/∂class logits Tensor[R, K+1] and ∂L/∂deltas Tensor[R, reg_classes, 4]."""
    roi, p = v.roi, v.p
    fg = roi.fg_class >= 0
    c_cls = torch.tensor([_coef(p.roi_cls, lv.avg_factor) for lv in v.losses])
    c_cls = c_cls[roi.level] if roi.level.numel() else torch.zeros(0)
    g_cls = v.sh.ce() * (torch.where(fg, p.pos_weight, 1.0) * c_cls)[:, None]
    g_reg = torch.zeros_like(roi.deltas.detach())
    pos_rows = fg.nonzero().flatten()
    for lvl, loss in enumerate(v.losses):
        rows = pos_rows[roi.level[pos_rows] == lvl]
        if rows.numel():
            g = v.sh.box(lvl, p.roi_box) * _coef(p.roi_box, loss.avg_factor_bbox)
            g_reg[rows, v.heads.reg_slot(roi.fg_class[rows])] = g
    return g_cls, g_reg


def _backprop(heads: HeadWeights, layer: Layer, g_out: Tensor, h1: Tensor, h2: Tensor, k: int):
    """One predictor's output gradient Tensor[R, O] back through the box head (hidden
    activations h1, h2 Tensor[R, F] of the same rows) → (the gradients of the predictor, fc2 and
    fc1's bias by canonical name, ∂L/∂(fc1 output) Tensor[R, F])."""
    gp2 = (g_out @ heads.weight(layer).detach()) * (h2 > 0)
    gp1 = (gp2 @ heads.weight(Layer.BOX_FC2).detach()) * (h1 > 0)
    grads = {
        param(layer, WEIGHT, k): g_out.T @ h2, param(layer, BIAS, k): g_out.sum(0),
        param(Layer.BOX_FC2, WEIGHT, k): gp2.T @ h1, param(Layer.BOX_FC2, BIAS, k): gp2.sum(0),
        param(Layer.BOX_FC1, BIAS, k): gp1.sum(0),
    }  # fmt: skip
    return grads, gp1


# each term of the box head and the predictor its gradient enters by
ROI_OUTPUTS = ((Term.ROI_CLS, Layer.BOX_LOGITS), (Term.ROI_BOX, Layer.BOX_DELTAS))


def _box_head(v: _StageView, g_cls: Tensor, g_reg: Tensor, params: dict) -> Tensor:
    """The box head's parameter gradients by term, by hand → ∂L/∂(fc1 input) summed over terms."""
    heads, h1, h2, k = v.heads, v.roi.hidden1.detach(), v.roi.hidden.detach(), v.k
    gp1_total = None
    for (term, layer), g_out in zip(ROI_OUTPUTS, (g_cls, g_reg.flatten(1))):
        grads, gp1 = _backprop(heads, layer, g_out, h1, h2, k)
        for name, g in grads.items():
            params[name].add(term, g)
        params[param(Layer.BOX_FC1, WEIGHT, k)].by_term[term] = _gram_norm_sq(gp1, v.sh.gram)
        gp1_total = gp1 if gp1_total is None else gp1_total + gp1
    params[param(Layer.BOX_FC1, WEIGHT, k)].total = _gram_norm_sq(gp1_total, v.sh.gram)
    return gp1_total @ heads.weight(Layer.BOX_FC1).detach()


def _box_head_autograd(v: _StageView, g_cls: Tensor, g_reg: Tensor, params: dict, feats):
    """A box head with convs (and norms), one fc, res5 or a double head: the predictors'
    gradients by hand, the rest by one autograd backward per term → ∂L/∂feature per level
    (None where a level gets none). A BatchNorm in training joins the RoIs, so no RoI is
    differentiated apart from the others."""
    heads, k, roi = v.heads, v.k, v.roi
    predictors = {param(x, kind, k) for _, x in ROI_OUTPUTS for kind in (WEIGHT, BIAS)}
    body = [n for n in heads.box_params(k) if n not in predictors]
    inputs = [heads.params[n] for n in body]
    outs: dict[int, tuple[Tensor, Tensor]] = {}  # each trunk's output and its gradient
    for (term, layer), g_out in zip(ROI_OUTPUTS, (g_cls, g_reg.flatten(1))):
        hidden = roi.hidden if term is Term.ROI_CLS else roi.hidden_reg
        params[param(layer, WEIGHT, k)].add(term, g_out.T @ hidden.detach())
        params[param(layer, BIAS, k)].add(term, g_out.sum(0))
        g_hidden = g_out @ heads.weight(layer).detach()
        for name, g in zip(body, _vjp([hidden], inputs, [g_hidden], allow_unused=True)):
            params[name].add(term, torch.zeros_like(heads.params[name]) if g is None else g)
        seen = outs.get(id(hidden))
        outs[id(hidden)] = (hidden, g_hidden if seen is None else seen[1] + g_hidden)
    hs, gs = zip(*outs.values())
    return _vjp(list(hs), feats, list(gs), allow_unused=True)


def _stage_params(v: _StageView) -> dict[str, _ParamGrad]:
    return {name: _ParamGrad() for name in v.heads.box_params(v.k)}


def _roi_dense(v: _StageView, features: list[Tensor]):
    """One stage by its own backward: (parameter gradients, ∂L/∂class logits, ∂L/∂deltas, the
    feature gradient norm per level)."""
    params = _stage_params(v)
    g_cls, g_reg = _roi_outputs(v)
    feats = list(features[: v.roi.num_levels])
    if v.heads.plain_box_head:
        g_pooled = _box_head(v, g_cls, g_reg, params).view_as(v.roi.pooled)
        g_feat = _vjp([v.roi.pooled], feats, [g_pooled], allow_unused=True)
    else:
        g_feat = _box_head_autograd(v, g_cls, g_reg, params, feats)
    return params, g_cls, g_reg, [_norm(gf) if gf is not None else 0.0 for gf in g_feat]


@dataclass(kw_only=True)
class _NegRoi:
    """One stage's box head and RoIAlign backward from its background RoIs' CE derivatives
    alone (unscaled): gradients of the classifier, fc2 and fc1's bias by name; fc1's weight
    gradient Tensor[F, D] and its squared norm; per level ∂/∂feature and its squared norm."""

    params: dict[str, Tensor]
    fc1: Tensor
    fc1_sq: float
    feats: list[Tensor]
    feats_sq: list[float]


def _neg_roi(v: _StageView, feats: list[Tensor]) -> _NegRoi:
    roi = v.roi
    g = torch.where((roi.fg_class < 0)[:, None], v.sh.ce(), torch.zeros(()))
    h1, h2 = roi.hidden1.detach(), roi.hidden.detach()
    grads, gp1 = _backprop(v.heads, Layer.BOX_LOGITS, g, h1, h2, v.k)
    fc1 = gp1.T @ roi.pooled.detach().flatten(1)
    g_pooled = (gp1 @ v.heads.weight(Layer.BOX_FC1).detach()).view_as(roi.pooled)
    g_feat = _zeros_for_none(_vjp([roi.pooled], feats, [g_pooled], allow_unused=True), feats)
    return _NegRoi(params=grads, fc1=fc1, fc1_sq=_sq(fc1), feats=g_feat,
                   feats_sq=[_sq(x) for x in g_feat])  # fmt: skip


def _shared_factor(spec: TermSpec, rows: list[LevelLoss]) -> float | None:
    """d term / d (its per-sample losses' sum) where every level shares it (a normalizer over
    the whole batch or stage, as every built-in profile's) and it is finite, else None."""
    coefs = {_coef(spec, row.avg_factor) for row in rows}
    c = coefs.pop() if len(coefs) == 1 else math.nan
    return c if math.isfinite(c) else None


def _sparse_pool_grads(r: Replay, v: _StageView, rows: Tensor, g: Tensor, feats: list[Tensor]):
    """∂/∂feature per level of ``g`` Tensor[P, D] at the pooled features of the RoIs ``rows``
    alone: those RoIs pooled again (once for every profile) and differentiated, so the cost
    follows P, not R."""
    roi, cfg = v.roi, r.config
    if v.sh.pos_pooled is None:
        boxes, strides = roi.boxes[rows].detach(), r.batch.strides[: len(feats)]
        v.sh.pos_pooled = multiscale_roi_align(
            feats,
            strides,
            boxes,
            roi.img[rows],
            roi.level[rows],
            v.heads.pool_side(cfg.res5.pool_size),
            cfg.roi_pool,
        )
    pooled = v.sh.pos_pooled
    scale = cfg.cascade.feature_grad_scale if cfg.cascade.later_stages else 1.0
    out = _zeros_for_none(_vjp([pooled], feats, [g.view_as(pooled)], allow_unused=True), feats)
    return out if scale == 1.0 else [x * scale for x in out]


def _roi_split(r: Replay, v: _StageView, features: list[Tensor]):
    """One stage as ``a`` times the background RoIs' backward, shared by every profile (``a``:
    this profile's d loss / d CE sum), plus the positive RoIs' classification and box gradients
    on those rows alone; cross terms join the norms. None where a value is not finite or the
    levels are normalized apart. Returns what :func:`_roi_dense` does."""
    roi, k = v.roi, v.k
    many = int((roi.fg_class >= 0).sum()) > ROI_SPLIT_SHARE * roi.img.numel()
    if not v.heads.plain_box_head or len(r.losses) < 2 or many:
        return None  # one profile, or many positive RoIs: each profile's own backward is cheaper
    feats = list(features[: roi.num_levels])
    a = _shared_factor(v.p.roi_cls, v.losses)
    g_cls, g_reg = _roi_outputs(v)
    finite = all(v.features_finite[: roi.num_levels])
    if a is None or not (finite and v.sh.pooled_finite() and _finite(g_cls, g_reg)):
        return None
    v.sh.neg = v.sh.neg or _neg_roi(v, feats)
    base, fg = v.sh.neg, (roi.fg_class >= 0).nonzero().flatten()
    h1, h2, x = roi.hidden1.detach()[fg], roi.hidden.detach()[fg], roi.pooled.detach()[fg]
    params, gp1_sum, m_sum = _stage_params(v), 0, 0
    for (term, layer), g_out in zip(ROI_OUTPUTS, (g_cls[fg], g_reg[fg].flatten(1))):
        grads, gp1 = _backprop(v.heads, layer, g_out, h1, h2, k)
        shared = a if term is Term.ROI_CLS else 0.0
        for name, g in grads.items():
            params[name].add(term, g + shared * base.params[name] if shared else g)
        m = gp1.T @ x.flatten(1)
        sq = shared**2 * base.fc1_sq + 2 * shared * _dot(base.fc1, m) + _sq(m) if shared else _sq(m)
        params[param(Layer.BOX_FC1, WEIGHT, k)].by_term[term] = torch.tensor(sq)
        gp1_sum, m_sum = gp1_sum + gp1, m_sum + m
    total = a * a * base.fc1_sq + 2 * a * _dot(base.fc1, m_sum) + _sq(m_sum)
    params[param(Layer.BOX_FC1, WEIGHT, k)].total = torch.tensor(total)
    g_pooled = gp1_sum @ v.heads.weight(Layer.BOX_FC1).detach()
    fp = _sparse_pool_grads(r, v, fg, g_pooled, feats)
    norms = []
    for nsq, n, f in zip(base.feats_sq, base.feats, fp):
        # only the locations inside the positive RoIs' windows: float64 sums over those alone
        i, y, xx = (f != 0).any(1).nonzero().unbind(1)
        fv = f[i, :, y, xx]
        dot, sq = _dot(n[i, :, y, xx], fv), _sq(fv)
        norms.append(math.sqrt(max(a * a * nsq + 2 * a * dot + sq, 0.0)))
    return params, g_cls, g_reg, norms


def _roi(r: Replay, v: _StageView, features: list[Tensor]) -> _HeadGrads:
    """One stage's RoI norms: outputs and box head by hand, then the backward through RoIAlign
    (and any gradient scale of the stage's pooled features), split where it can be."""
    roi = v.roi
    split = _roi_split(r, v, features)
    params, g_cls, g_reg, norms = split if split is not None else _roi_dense(v, features)
    fg, rows, neg_sq, pos_sq = roi.fg_class >= 0, [], 0.0, 0.0
    for lvl, (s, norm) in enumerate(zip(roi.samples, norms)):
        at = roi.level == lvl
        pos, neg = _sq(g_cls[at & fg]), _sq(g_cls[at & ~fg])
        pos_sq, neg_sq = pos_sq + pos, neg_sq + neg
        rows.append(
            LevelGrads(
                head=Head.ROI,
                level=s.name,
                feature=norm,
                logits_pos=math.sqrt(pos),
                logits_neg=math.sqrt(neg),
                deltas=_norm(g_reg[at]),
                neg_share=_share(neg, pos),
                nonfinite=_nonfinite(g_cls[at], g_reg[at]),
                stage=v.k,
            )
        )
    return _HeadGrads(levels=rows, params=params, neg_share=_share(neg_sq, pos_sq),
                      sq=(pos_sq, neg_sq))  # fmt: skip


def _roi_stages(r: Replay, p: LossProfile, sh: _Shared) -> _HeadGrads:
    """Every box-head stage's norms, as one head: levels of each stage, parameters of each."""
    stages = [_roi(r, _stage_view(r, p, sh, k), r.features) for k in range(len(r.roi_stages))]
    pos_sq, neg_sq = (sum(g.sq[i] for g in stages) for i in (0, 1))
    return _HeadGrads(
        levels=[row for g in stages for row in g.levels],
        params={name: acc for g in stages for name, acc in g.params.items()},
        neg_share=_share(neg_sq, pos_sq),
    )
