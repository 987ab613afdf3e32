"""Gradient norms per profile, level, head output and parameter, split by loss term.

Cost: every profile's loss is a weighted sum of the same per-sample losses, so the derivative of
each per-sample loss at the head outputs is computed once (autograd through the loss alone) and
each profile only rescales it. The 1x1 RPN convs and the box head are then differentiated by hand,
term by term, which is cheap (fc1's weight-gradient norm uses ``||G^T X||^2 = <G G^T, X X^T>``
with ``X X^T`` shared by every term and profile). The expensive parts, the 3x3 RPN conv and
RoIAlign, get one backward per profile and head, not one per term (the 3x3 conv's parameters are
therefore reported as a total, not split by term), and less where the gradient is sparse:

- the RPN conv's backward visits only the locations with a sampled anchor (``sparse_conv``);
  where most are sampled (``--sample-all``), the sampled negatives' dense backward is computed
  once and scaled by each profile, and the positives' stays sparse;
- a box-head stage with few positive RoIs among many is split the same way: the background
  RoIs' backward once, the positive RoIs' per profile, cross terms joining the norms;
- a mask term that is a multiple of the summed pixel BCE scales one shared backward.

Each shortcut is taken only where every value is finite (a NaN must spread as autograd spreads
it) and is tested equal to the plain backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..inputs.checkpoint import BOX_COORDS, HeadWeights
from ..inputs.finite import all_finite
from ..inputs.profiles import LossProfile, TermSpec
from ..replay.engine import Replay
from ..replay.mask import mask_params
from ..replay.normalize import LevelLoss, staged
from ..replay.roi import RoiStage
from ..replay.roi_align import multiscale_roi_align
from ..replay.rpn import RpnLevel
from ..replay.samples import LevelSamples
from ..vocab import (
    BIAS,
    BOX_LAYERS,
    LAYER_TERMS,
    MASK_LAYERS,
    PER_LEVEL_NORMALIZERS,
    RPN_LAYERS,
    TERMS,
    WEIGHT,
    Empty,
    Head,
    Layer,
    Part,
    Term,
    param,
)
from .sparse_conv import ConvGrads, relu_backward, sparse_conv_grads, worth_it

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing
CLIP_EPS = 1e-6
# a box-head stage is split into a shared backward and sparse ones per profile where at most this
# share of its RoIs is positive (--sample-all: about 5%; sampled: up to 25%)
ROI_SPLIT_SHARE = 0.125


@dataclass(kw_only=True)
class LevelGrads:
    """Norms for one (head, level) under one profile."""

    head: Head
    level: str
    feature: float  # ||dL_head / d feature_l||
    logits_pos: float
    logits_neg: float
    deltas: float
    neg_share: float  # share of ||dL_cls / d logits||^2 from negative (and unsampled) samples
    nonfinite: int  # non-finite gradient entries at this level's head outputs
    stage: int = 0  # the cascade stage of a RoI level


@dataclass(kw_only=True)
class ParamNorms:
    """One head parameter's gradient norm per loss term (NaN where not split: the 3x3 RPN conv)
    and in total."""

    by_term: dict[Term, float]
    total: float


@dataclass(kw_only=True)
class ProfileGrads:
    profile: str
    levels: list[LevelGrads]
    params: dict[str, ParamNorms]  # by canonical parameter name
    total_norm: float
    max_norm: float | None
    clip_coef: float
    clipped_norm: float
    neg_share: dict[Head, float] = field(default_factory=dict)
    no_grad_params: list[str] = field(default_factory=list)  # canonical names, no gradient
    no_grad_levels: list[str] = field(default_factory=list)  # RPN features without gradient


def _norm(t: Tensor) -> float:
    """L2 norm accumulated in float64 (no float64 copy of the tensor)."""
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) if t.numel() else 0.0


def _sq(t: Tensor) -> float:
    return _norm(t) ** 2


def _vjp(outputs: list[Tensor], inputs: list[Tensor], grads: list[Tensor], **kw):
    """``autograd.grad(outputs, inputs, grads)`` as the backward of the scalar
    ``sum(<output, grad>)``, whose derivative at each output is its grad exactly; autograd's own
    grad_outputs path costs a 0.4 s import on its first use."""
    total = sum((o * g).sum() for o, g in zip(outputs, grads))
    return torch.autograd.grad(total, inputs, retain_graph=True, **kw)


def _share(neg_sq: float, pos_sq: float) -> float:
    total = neg_sq + pos_sq
    return neg_sq / total if total > 0 else math.nan


def _nonfinite(*ts: Tensor) -> int:
    return int(sum((~torch.isfinite(t)).sum() for t in ts))


class _StageShared:
    """One box-head stage's per-sample derivatives and fc1 Gram matrix, computed once for all
    profiles."""

    def __init__(self, roi: RoiStage):
        self.roi = roi
        self._box, self._ce, self._gram, self.neg = {}, None, None, None
        self._pooled_finite: bool | None = None
        self.pos_pooled: Tensor | None = None  # the positive RoIs pooled again (the split)

    def pooled_finite(self) -> bool:
        if self._pooled_finite is None:
            self._pooled_finite = all_finite(self.roi.pooled)
        return self._pooled_finite

    @property
    def gram(self) -> Tensor:
        """X X^T of the fc1 inputs, Tensor[R, R], shared by fc1's norms."""
        if self._gram is None:
            x = self.roi.pooled.detach().flatten(1)
            self._gram = x @ x.T if x.shape[0] else x.new_zeros(0, 0)
        return self._gram

    def box(self, lvl: int, spec: TermSpec) -> Tensor:
        key = (lvl, spec.loss, spec.beta)
        if key not in self._box:
            self._box[key] = _box_grad(self.roi.samples[lvl], spec)
        return self._box[key]

    def ce(self) -> Tensor:
        if self._ce is None:
            roi = self.roi
            self._ce = (
                torch.autograd.grad(roi.ce.sum(), roi.cls_logits, retain_graph=True)[0]
                if roi.ce.numel()
                else roi.cls_logits.detach().clone()
            )
        return self._ce


def _box_grad(s, spec: TermSpec) -> Tensor:
    """∂(sum of per-sample box losses)/∂ predictions, Tensor[P, 4]."""
    loss = s.box_loss(spec)
    if not loss.numel():
        return s.box_pred.detach().new_zeros(0, BOX_COORDS)
    return torch.autograd.grad(loss.sum(), s.box_pred, retain_graph=True)[0]


@dataclass(kw_only=True)
class _NegConv:
    """One level's conv backward from its negatives alone: ∂/∂feature Tensor[N, C, H, W], its
    squared norm, ∂/∂weight and ∂/∂bias."""

    dx: Tensor
    sq: float
    weight: Tensor
    bias: Tensor


class _Shared:
    """Per-sample derivatives at the head outputs, computed once for all profiles."""

    def __init__(self, r: Replay):
        self.r = r
        self._bce, self._box, self._neg, self._mask = {}, {}, {}, None
        self._finite: list[bool] | None = None
        self._conv_weight_finite: bool | None = None
        self.stages = [_StageShared(roi) for roi in r.roi_stages]

    def features_finite(self) -> list[bool]:
        """Per level: every feature value is finite."""
        if self._finite is None:
            self._finite = [all_finite(f) for f in self.r.features]
        return self._finite

    def conv_finite(self, lvl: int) -> bool:
        """Level ``lvl``'s 3x3 conv has finite inputs and weights (a sparse backward then gives
        autograd's numbers)."""
        if self._conv_weight_finite is None:
            self._conv_weight_finite = all_finite(self.r.heads.weight(Layer.RPN_CONV))
        return self.features_finite()[lvl] and self._conv_weight_finite

    def neg_conv(self, lvl: int) -> _NegConv:
        """The 3x3 conv's backward of level ``lvl``'s sampled negatives' BCE derivatives."""
        if lvl not in self._neg:
            level, r = self.r.rpn.levels[lvl], self.r
            neg = torch.where(level.sampled & ~level.positive, self.bce(lvl), torch.zeros(()))
            gh = _hidden_grad(r, lvl, neg, torch.zeros_like(level.out.deltas.detach()))
            conv = [r.heads.weight(Layer.RPN_CONV), r.heads.bias(Layer.RPN_CONV)]
            dx, dw, db = _vjp([level.out.hidden], [r.features[lvl], *conv], [gh])
            self._neg[lvl] = _NegConv(dx=dx, sq=_sq(dx), weight=dw, bias=db)
        return self._neg[lvl]

    def mask_sum_grads(self) -> tuple[list[Tensor], list[float]]:
        """:func:`mask_backward` of the mask head's summed pixel BCE, once for all profiles: the
        gradients of the parameters and the selected logits, and each level's feature gradient
        norm."""
        if self._mask is None:
            grads = mask_backward(self.r, sum(s.cls_loss.sum() for s in self.r.mask.samples))
            k = len(grads) - self.r.roi.num_levels
            # the feature gradients (dense maps) are kept as their norms only
            self._mask = grads[:k], [_norm(g) for g in grads[k:]]
        return self._mask

    def bce(self, lvl: int) -> Tensor:
        if lvl not in self._bce:
            level = self.r.rpn.levels[lvl]
            self._bce[lvl] = torch.autograd.grad(
                level.bce.sum(), level.out.logits, retain_graph=True
            )[0]
        return self._bce[lvl]

    def box(self, head: Head, lvl: int, spec: TermSpec) -> Tensor:
        """The RPN's box-loss derivatives at one level (the RoI stages keep their own)."""
        key = (lvl, spec.loss, spec.beta)
        if key not in self._box:
            self._box[key] = _box_grad(self.r.samples[head][lvl], spec)
        return self._box[key]


@dataclass(kw_only=True)
class _ParamGrad:
    """A parameter's gradient per term (a tensor, or a 0-d squared norm for fc1's weight), and
    its total where the terms are not summed (the 3x3 conv, fc1's weight)."""

    by_term: dict[Term, Tensor] = field(default_factory=dict)
    total: Tensor | None = None

    def add(self, term: Term, g: Tensor) -> None:
        self.by_term[term] = self.by_term[term] + g if term in self.by_term else g


@dataclass(kw_only=True)
class _HeadGrads:
    levels: list[LevelGrads]
    params: dict[str, _ParamGrad]
    neg_share: float
    no_grad_levels: list[str] = field(default_factory=list)
    sq: tuple[float, float] = (0.0, 0.0)  # squared classification gradient of (pos, neg)


def _coef(spec: TermSpec, d: float) -> float:
    """d loss / d numerator: weight / D, or the empty-set cases of ``replay.losses.normalize``."""
    if d == 0:
        return 0.0 if spec.empty is Empty.ZERO else math.inf * spec.weight
    return spec.weight / d


def _rpn_outputs(lvl: int, level: RpnLevel, loss: LevelLoss, p: LossProfile, sh: _Shared):
    """∂L/∂logits Tensor[N, A_l] and ∂L/∂deltas Tensor[N, A_l, 4] of one level."""
    weight = torch.where(level.positive, p.pos_weight, 1.0) * _coef(p.rpn_cls, loss.avg_factor)
    g = sh.bce(lvl) * weight
    if p.unsampled_leak:
        g_logits = g * level.sampled
    else:
        g_logits = torch.where(level.sampled, g, torch.zeros(()))
    img, anc = level.positive.nonzero(as_tuple=True)
    g_deltas = torch.zeros_like(level.out.deltas.detach())
    g_box = sh.box(Head.RPN, lvl, p.rpn_box) * _coef(p.rpn_box, loss.avg_factor_bbox)
    g_deltas[img, anc] = g_box
    if p.unsampled_leak:  # 0 * inf = NaN, as the weight-multiply does
        g_deltas = g_deltas + level.out.deltas.detach() * 0
    return g_logits, g_deltas


def _rpn_level(lvl: int, r: Replay, p: LossProfile, sh: _Shared, params: dict):
    """One level's output norms and 1x1-conv gradients → (row, squared classification gradient
    of (pos, neg), ∂L/∂logits Tensor[N, A_l] and ∂L/∂deltas Tensor[N, A_l, 4])."""
    level = r.rpn.levels[lvl]
    g_logits, g_deltas = _rpn_outputs(lvl, level, r.losses[p.name].levels[Head.RPN][lvl], p, sh)
    n, _, h, w = level.out.hidden.shape
    a = r.heads.num_anchors
    # channel-first [N, outputs, H*W], so the 1x1 convs' gradients are batched matmuls
    gl = g_logits.view(n, h * w, a).transpose(1, 2)
    gd = g_deltas.view(n, h * w, BOX_COORDS * a).transpose(1, 2)
    hid_t = level.out.hidden.detach().flatten(2).transpose(1, 2)  # [N, H*W, C]
    for layer, term, g in (
        (Layer.RPN_LOGITS, Term.RPN_CLS, gl),
        (Layer.RPN_DELTAS, Term.RPN_BOX, gd),
    ):
        params[param(layer, WEIGHT)].add(term, torch.matmul(g, hid_t).sum(0)[:, :, None, None])
        params[param(layer, BIAS)].add(term, g.sum((0, 2)))
    pos, neg = _sq(g_logits[level.positive]), _sq(g_logits[~level.positive])
    row = LevelGrads(
        head=Head.RPN,
        level=level.name,
        feature=math.nan,
        logits_pos=math.sqrt(pos),
        logits_neg=math.sqrt(neg),
        deltas=_norm(g_deltas),
        neg_share=_share(neg, pos),
        nonfinite=_nonfinite(g_logits, g_deltas),
    )
    return row, (pos, neg), (g_logits, g_deltas)


def _out_weights(r: Replay) -> Tensor:
    """The 1x1 convs' weights stacked, Tensor[5A, C]: (objectness, deltas) by input channel."""
    return torch.cat(
        [r.heads.weight(x).detach().flatten(1) for x in (Layer.RPN_LOGITS, Layer.RPN_DELTAS)]
    )


def _live(r: Replay, lvl: int, g_logits: Tensor, g_deltas: Tensor) -> tuple[Tensor, Tensor]:
    """(image, location) of level ``lvl``'s locations with a non-zero (or NaN) output gradient,
    each Tensor[K], in (n, y, x) order; from ∂L/∂logits Tensor[N, A_l], ∂L/∂deltas Tensor[N,
    A_l, 4]."""
    n, _, h, w = r.rpn.levels[lvl].out.hidden.shape
    logits, deltas = ((g.reshape(n, h * w, -1) != 0).any(2) for g in (g_logits, g_deltas))
    return (logits | deltas).nonzero(as_tuple=True)


def _live_rows(r: Replay, lvl: int, g_logits: Tensor, g_deltas: Tensor, live):
    """The 3x3 conv's pre-ReLU output gradient at the ``live`` locations of :func:`_live` alone
    (the dense map is never formed) → (at Tensor[V, 3] (n, y, x), rows Tensor[V, C]); rows the
    ReLU zeroes whole are left out."""
    hidden = r.rpn.levels[lvl].out.hidden.detach()
    n, _, h, w = hidden.shape
    img, s = live
    gl, gd = g_logits.reshape(n, h * w, -1)[img, s], g_deltas.reshape(n, h * w, -1)[img, s]
    y, x = s // w, s % w
    rows = relu_backward(torch.cat([gl, gd], 1) @ _out_weights(r), hidden[img, :, y, x])
    keep = (rows != 0).any(1)
    return torch.stack([img, y, x], 1)[keep], rows[keep]


def _hidden_grad(r: Replay, lvl: int, g_logits: Tensor, g_deltas: Tensor) -> Tensor:
    """∂L/∂hidden Tensor[N, C, H, W] of level ``lvl`` from its output gradients, through the
    1x1 convs as a channel-first matmul ([N, 5A, HW] → [N, C, HW])."""
    n, c, h, w = r.rpn.levels[lvl].out.hidden.shape
    g = torch.cat([x.reshape(n, h * w, -1).transpose(1, 2) for x in (g_logits, g_deltas)], 1)
    return torch.matmul(_out_weights(r).T, g).view(n, c, h, w)


def _finite(*ts: Tensor) -> bool:
    return all(all_finite(t) for t in ts)


def _split_level(r: Replay, p: LossProfile, sh: _Shared, lvl: int, outs) -> ConvGrads | None:
    """A dense level's conv backward as ``alpha`` times the negatives' backward, shared by every
    profile (alpha: this profile's d loss / d BCE sum), plus a sparse backward of the positives'
    classification and box gradients; None where a value is not finite."""
    level, x, w = r.rpn.levels[lvl], r.features[lvl], r.heads.weight(Layer.RPN_CONV)
    g_logits, g_deltas = outs
    alpha = _coef(p.rpn_cls, r.losses[p.name].levels[Head.RPN][lvl].avg_factor)
    if not (math.isfinite(alpha) and sh.conv_finite(lvl) and _finite(g_logits, g_deltas)):
        return None
    pos = torch.where(level.positive, g_logits, torch.zeros(()))
    at, rows = _live_rows(r, lvl, pos, g_deltas, _live(r, lvl, pos, g_deltas))
    s = sparse_conv_grads(x, rows, w, at)
    base = sh.neg_conv(lvl)
    n, y, xx = s.at.unbind(1)
    cross = _dot(base.dx[n, :, y, xx], s.dx)
    sq = alpha**2 * base.sq + 2 * alpha * cross + s.feature**2
    return ConvGrads(feature=math.sqrt(max(sq, 0.0)), weight=alpha * base.weight + s.weight,
                     bias=alpha * base.bias + s.bias)  # fmt: skip


def _sparse_levels(r: Replay, sh: _Shared, outs: list) -> dict[int, ConvGrads]:
    """The levels whose conv backward is cheaper visiting only their live locations, done so
    (``outs``: each level's ∂L/∂logits and ∂L/∂deltas)."""
    w = r.heads.weight(Layer.RPN_CONV)
    out = {}
    for lvl, (g_logits, g_deltas) in enumerate(outs):
        live = _live(r, lvl, g_logits, g_deltas)
        if worth_it(live[0].numel(), r.features[lvl]) and sh.conv_finite(lvl):
            at, rows = _live_rows(r, lvl, g_logits, g_deltas, live)
            out[lvl] = sparse_conv_grads(r.features[lvl], rows, w, at)
    return out


def _rpn_conv_params(r: Replay) -> list[str]:
    """The RPN's 3x3 convs' parameters, by canonical name, in order."""
    names = (param(c, kind) for c in r.heads.rpn_convs for kind in (WEIGHT, BIAS))
    return [n for n in names if n in r.heads.params]


def _rpn_conv(r: Replay, p: LossProfile, sh: _Shared, done) -> tuple[list[float], list[Tensor]]:
    """The 3x3 convs' backward for every level → (feature gradient norm per level, the
    gradients of :func:`_rpn_conv_params`). With one conv: sparse where that is cheaper, else
    split into the negatives' backward shared by the profiles and the positives' sparse one; one
    autograd backward for the rest (every level, with two convs)."""
    outs = [o for _, _, o in done]
    one = len(r.heads.rpn_convs) == 1
    sparse = _sparse_levels(r, sh, outs) if one else {}
    for lvl in range(len(done)):
        split = None if lvl in sparse or not one else _split_level(r, p, sh, lvl, outs[lvl])
        if split is not None:
            sparse[lvl] = split
    dense = [lvl for lvl in range(len(outs)) if lvl not in sparse]
    names = _rpn_conv_params(r)
    totals = [torch.zeros_like(r.heads.params[n]) for n in names]
    for s in sparse.values():  # one conv: its weight, its bias
        totals = [totals[0] + s.weight, totals[1] + s.bias]
    norms = {lvl: s.feature for lvl, s in sparse.items()}
    if dense:
        grads = _vjp(
            [r.rpn.levels[lvl].out.hidden for lvl in dense],
            [r.features[lvl] for lvl in dense] + [r.heads.params[n] for n in names],
            [_hidden_grad(r, lvl, *outs[lvl]) for lvl in dense],
        )
        norms |= {lvl: _norm(gf) for lvl, gf in zip(dense, grads)}
        totals = [t + g for t, g in zip(totals, grads[len(dense) :])]
    return [norms[lvl] for lvl in range(len(outs))], totals


def _rpn(r: Replay, p: LossProfile, sh: _Shared) -> _HeadGrads:
    """RPN norms: per level by hand, then the backward through the 3x3 conv for every level."""
    names = [param(x, k) for x in RPN_LAYERS for k in (WEIGHT, BIAS)]
    params = {n: _ParamGrad() for n in names if n in r.heads.params}
    done = [_rpn_level(lvl, r, p, sh, params) for lvl in range(len(r.rpn.levels))]
    features, totals = _rpn_conv(r, p, sh, done)
    rows = [row for row, *_ in done]
    for row, norm in zip(rows, features):
        row.feature = norm
    for name, total in zip(_rpn_conv_params(r), totals):
        params[name].total = total
    pos_sq, neg_sq = sum(x for _, (x, _), _ in done), sum(y for _, (_, y), _ in done)
    idle = [
        row.level
        for lvl, row in enumerate(rows)
        if row.feature == 0 and _left_out(p, LAYER_TERMS[Layer.RPN_CONV], r.rpn.samples, lvl)
    ]
    return _HeadGrads(
        levels=rows, params=params, neg_share=_share(neg_sq, pos_sq), no_grad_levels=idle
    )


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


def _zeros_for_none(grads, like: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def _dot(a: Tensor, b: Tensor) -> float:
    """<a, b> summed in float64 (no float64 copy of either)."""
    return float((a * b).sum(dtype=torch.float64))


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


def mask_backward(r: Replay, loss: Tensor) -> list[Tensor]:
    """d loss / d (the mask head's parameters, its selected logits, the features)."""
    names = mask_params(r.heads)
    feats = list(r.features[: r.roi.num_levels])
    inputs = [r.heads.params[n] for n in names] + [r.mask.logits] + feats
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    return _zeros_for_none(grads, inputs)


def _mask_coef(r: Replay, p: LossProfile) -> float | None:
    """The positive factor every mask level shares under ``p``, or None."""
    c = _shared_factor(p.roi_mask, r.losses[p.name].levels[Head.MASK])
    return c if c is not None and c > 0 else None


def _mask(r: Replay, p: LossProfile, sh: _Shared) -> _HeadGrads:
    """The mask head's norms by autograd: the backward of the mask term to its parameters, its
    selected logits and the features (a level's RoIs read only their own level). A term that is
    the summed pixel BCE times one factor scales the backward shared by every profile."""
    m = r.mask
    names = mask_params(r.heads)
    c = _mask_coef(r, p)
    if c is None:
        grads = mask_backward(r, r.losses[p.name].term(Term.ROI_MASK))
        feats = [_norm(g) for g in grads[len(names) + 1 :]]
    else:
        shared, norms = sh.mask_sum_grads()
        grads, feats = [g * c for g in shared], [c * x for x in norms]
    params = {n: _ParamGrad(by_term={Term.ROI_MASK: g}) for n, g in zip(names, grads)}
    g_logits = grads[len(names)]
    level = r.roi.level[m.rows]
    rows = [
        LevelGrads(head=Head.MASK, level=s.name, feature=norm,
                   logits_pos=_norm(g_logits[level == lvl]), logits_neg=0.0, deltas=0.0,
                   neg_share=math.nan, nonfinite=_nonfinite(g_logits[level == lvl]))
        for lvl, (s, norm) in enumerate(zip(m.samples, feats))
    ]  # fmt: skip
    return _HeadGrads(levels=rows, params=params, neg_share=math.nan)


def _gram_norm_sq(g: Tensor, gram: Tensor) -> Tensor:
    """||g^T X||_F^2 from the Gram matrix X X^T (a 0-d tensor, so it sums like a squared norm)."""
    if g.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64)
    return ((g @ g.T).double() * gram.double()).sum().clamp(min=0)


def _term_norm(g: Tensor | None, split: bool) -> float:
    if g is None:
        return 0.0 if split else math.nan
    return math.sqrt(float(g)) if g.dim() == 0 else _norm(g)


def _param_norms(acc: _ParamGrad) -> tuple[ParamNorms, float]:
    """Final norms of one parameter, and its squared total."""
    split = acc.total is None or acc.total.dim() == 0  # the 3x3 conv is not split by term
    by_term = {t: _term_norm(acc.by_term.get(t), split) for t in TERMS}
    if acc.total is not None:
        total_sq = float(acc.total) if acc.total.dim() == 0 else _sq(acc.total)
    else:
        total_sq = _sq(sum(acc.by_term.values(), torch.zeros(())))
    total = math.sqrt(total_sq) if total_sq == total_sq else math.nan
    return ParamNorms(by_term=by_term, total=total), total_sq


def _clip(total: float, max_norm: float | None) -> float:
    """The factor torch's clip_grad_norm_ scales the gradients by (NaN for a NaN norm)."""
    if total != total:
        return math.nan
    return 1.0 if max_norm is None else min(1.0, max_norm / (total + CLIP_EPS))


def _roi_stages(r: Replay, p: LossProfile, sh: _Shared) -> _HeadGrads:
    """Every box-head stage's norms, as one head: levels of each stage, parameters of each."""
    stages = [_roi(r, _stage_view(r, p, sh, k), r.features) for k in range(len(r.roi_stages))]
    pos_sq, neg_sq = (sum(g.sq[i] for g in stages) for i in (0, 1))
    return _HeadGrads(
        levels=[row for g in stages for row in g.levels],
        params={name: acc for g in stages for name, acc in g.params.items()},
        neg_share=_share(neg_sq, pos_sq),
    )


def _left_out(p: LossProfile, terms, samples: list[LevelSamples], level: int | None = None):
    """Whether every term of ``terms`` is empty and left out of the graph under ``p`` (its loss
    code skips an empty term: no gradient, where the frameworks give a zero one). A term's scope
    is ``level`` under a per-level normalizer, else all of ``samples``' levels."""
    for t in terms:
        spec = p.term(t)
        per_level = level is not None and spec.normalizer in PER_LEVEL_NORMALIZERS
        scope = [samples[level]] if per_level else samples
        count = sum(s.pos if t.part is Part.BOX else s.sampled for s in scope)
        if spec.empty_in_graph or count:
            return False
    return True


def _left_out_params(r: Replay, p: LossProfile) -> list[str]:
    """The head parameters outside the graph under ``p`` on this batch (canonical names)."""
    groups = [(RPN_LAYERS, r.rpn.samples, 0)]
    groups += [(BOX_LAYERS, st.samples, k) for k, st in enumerate(r.roi_stages)]
    if r.mask is not None:
        groups.append((MASK_LAYERS, r.mask.samples, 0))
    return [
        param(layer, kind, k)
        for layers, samples, k in groups
        for layer in layers
        if _left_out(p, LAYER_TERMS[layer], samples)
        for kind in (WEIGHT, BIAS)
    ]


def profile_gradients(r: Replay, p: LossProfile, shared: _Shared | None = None) -> ProfileGrads:
    """All gradient norms of one replayed profile."""
    sh = shared or _Shared(r)
    heads = {Head.RPN: _rpn(r, p, sh), Head.ROI: _roi_stages(r, p, sh)}
    if r.mask is not None:
        heads[Head.MASK] = _mask(r, p, sh)
    norms, total_sq = {}, 0.0
    for hg in heads.values():
        for name, acc in hg.params.items():
            norms[name], sq = _param_norms(acc)
            total_sq += sq
    total = math.sqrt(total_sq) if total_sq == total_sq else math.nan
    coef = _clip(total, p.max_norm)
    return ProfileGrads(
        profile=p.name,
        levels=[row for hg in heads.values() for row in hg.levels],
        params=norms,
        total_norm=total,
        max_norm=p.max_norm,
        clip_coef=coef,
        clipped_norm=total * coef,
        neg_share={h: hg.neg_share for h, hg in heads.items()},
        no_grad_params=[name for name in _left_out_params(r, p) if name in norms],
        no_grad_levels=heads[Head.RPN].no_grad_levels,
    )


def gradients(r: Replay) -> dict[str, ProfileGrads]:
    """Gradient norms for every replayed profile, sharing the per-sample derivatives."""
    sh = _Shared(r)
    return {name: profile_gradients(r, pl.profile, sh) for name, pl in r.losses.items()}
