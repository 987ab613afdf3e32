"""The mask head's gradients: one shared backward of the summed pixel BCE, scaled by each
profile where its mask term is a multiple of it, else the profile's own."""

from __future__ import annotations

import math

from ...inputs.profiles import LossProfile
from ...replay.engine import Replay
from ...replay.mask import mask_params
from ...vocab import (
    Head,
    Term,
)
from .base import LevelGrads, _HeadGrads, _nonfinite, _norm, _ParamGrad
from .roi import _shared_factor
from .shared import _Shared, mask_backward


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
