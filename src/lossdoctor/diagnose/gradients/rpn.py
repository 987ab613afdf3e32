"""The RPN's gradients: the 1x1 convs by hand, term by term; the 3x3 conv and the features by
one backward per profile, sparse where few locations have a sampled anchor."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...inputs.checkpoint import BOX_COORDS
from ...inputs.profiles import LossProfile
from ...replay.engine import Replay
from ...replay.normalize import LevelLoss
from ...replay.rpn import RpnLevel
from ...vocab import (
    BIAS,
    LAYER_TERMS,
    RPN_LAYERS,
    WEIGHT,
    Head,
    Layer,
    Term,
    param,
)
from ..sparse_conv import ConvGrads, relu_backward, sparse_conv_grads, worth_it
from .base import (
    LevelGrads,
    _coef,
    _dot,
    _finite,
    _HeadGrads,
    _hidden_grad,
    _left_out,
    _nonfinite,
    _norm,
    _out_weights,
    _ParamGrad,
    _share,
    _sq,
    _vjp,
)
from .shared import _Shared


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
