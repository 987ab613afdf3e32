"""One profile's gradients over every head: parameter norms by term, clipping as
``clip_grad_norm_`` does, what a profile leaves out of the graph; and every profile's."""

from __future__ import annotations

import math

import torch

from ...inputs.profiles import LossProfile
from ...replay.engine import Replay
from ...vocab import (
    BIAS,
    BOX_LAYERS,
    LAYER_TERMS,
    MASK_LAYERS,
    RPN_LAYERS,
    TERMS,
    WEIGHT,
    Head,
    param,
)
from .base import ParamNorms, ProfileGrads, _left_out, _ParamGrad, _sq, _term_norm
from .mask import _mask
from .roi import _roi_stages
from .rpn import _rpn
from .shared import _Shared

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing
CLIP_EPS = 1e-6


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
