"""Checks of the gradients: the background's share, level weight imbalance, terms without
gradient, exploding and vanishing norms."""

from __future__ import annotations

import math

from ...replay.engine import Replay
from ...vocab import (
    TERMS,
    Part,
    Term,
)
from ..finding import Finding
from ..gradients import ProfileGrads
from ..nan_trace import UNITS
from .base import Facts

# a per-sample weight that varies more than this across levels is an imbalance
LEVEL_WEIGHT_RATIO = 10.0


# share of the squared classification gradient from negatives above which they dominate (count
# imbalance alone, ~97% in a sparse healthy batch, stays below it)
BACKGROUND_SHARE = 0.99


# the gradient share counts as explained by sample counts when the positives' part of it is at
# least this fraction of their share of the samples
BACKGROUND_COUNT_SLACK = 0.5


# 10x the max_norm=35 MMDetection suggests for clipping
EXPLODING_NORM = 350.0


# one SGD step moving the heads' weights by more than this share of their norm explodes
EXPLODING_STEP = 0.1


VANISHING_NORM = 1e-6


def background_dominance(f: Facts) -> list[Finding]:
    """Negatives carry nearly all the classification gradient; minor when the counts explain it."""
    r, out = f.replay, []
    for name, g in f.grads.items():
        for head, samples in r.samples.items():
            share = g.neg_share.get(head, math.nan)
            if not (share == share and share > BACKGROUND_SHARE):
                continue
            pos = sum(s.pos for s in samples)
            neg = sum(s.sampled for s in samples) - pos
            counts = neg / max(pos + neg, 1)
            # equal per-sample gradients give the count share; beyond it, weighting amplifies
            by_counts = 1 - share >= BACKGROUND_COUNT_SLACK * (1 - counts)
            tail = ": the counts alone explain it" if by_counts else ""
            msg = (
                f"{name}: negatives carry {share:.1%} of the {head} classification gradient "
                f"({neg} negatives vs {pos} positives sampled{tail})"
            )
            ev = {"neg_share": share, "neg_count_share": counts, "pos": pos, "neg": neg}
            out.append(Finding(message=msg, head=head, profile=name, evidence=ev, minor=by_counts))
    return out


def level_weight_imbalance(f: Facts) -> list[Finding]:
    r, out = f.replay, []
    for name, pl in r.losses.items():
        for head, samples in r.samples.items():
            used = [(lv, s) for lv, s in zip(pl.levels[head], samples) if s.sampled > 0]
            weights = [lv.sample_weight for lv, _ in used if lv.sample_weight > 0]
            if len(weights) < 2 or max(weights) / min(weights) <= LEVEL_WEIGHT_RATIO:
                continue
            levels = [s.name for lv, s in used if lv.sample_weight > 0]
            hi, lo = levels[weights.index(max(weights))], levels[weights.index(min(weights))]
            ratio = max(weights) / min(weights)
            msg = f"{name}: one {head} sample at {hi} weighs {ratio:.0f}x one at {lo}"
            ev = {"max_weight": max(weights), "min_weight": min(weights), "levels": [hi, lo]}
            out.append(Finding(message=msg, head=head, profile=name, evidence=ev))
    return out


def no_gradient(f: Facts) -> list[Finding]:
    """Parameters (or RPN feature levels: minor) that got no gradient from this batch."""
    out = []
    for name, g in f.grads.items():
        params = [f.replay.heads.file_key(n) for n in g.no_grad_params]
        levels = g.no_grad_levels
        if not params and not levels:
            continue
        parts = ([f"parameters {', '.join(params)}"] if params else []) + (
            [f"the RPN features of {', '.join(levels)}"] if levels else []
        )
        msg = f"{name}: {' and '.join(parts)} received no gradient from this batch"
        ev = {"params": params, "levels": levels}
        out.append(Finding(message=msg, profile=name, evidence=ev, minor=not params))
    return out


def dominant_term(g: ProfileGrads) -> tuple[Term | None, float]:
    """The loss term with the largest share of the squared gradient norm (the 3x3 conv, not
    split by term, left out; the mask term where the heads have a mask head)."""
    sq = {
        t: sum(v.by_term[t] ** 2 for v in g.params.values() if v.by_term[t] == v.by_term[t])
        for t in TERMS
    }
    total = sum(sq.values())
    if not total > 0:
        return None, math.nan
    term = max(sq, key=sq.get)
    return term, sq[term] / total


def _divided_by(r: Replay, name: str, term: Term, share: float) -> tuple[str, str]:
    """What the dominant term is divided by; a sharper fix when it is a box loss averaged over a
    few positives (the normalizer, not the learning rate, is then the cause)."""
    head = term.head
    first = r.losses[name].levels[head][0]
    d = first.avg_factor_bbox if term.part is Part.BOX else first.avg_factor
    pos = sum(s.pos for s in r.samples[head])
    sampled = sum(s.sampled for s in r.samples[head])
    by_pos = term.part is Part.BOX and d == pos and sampled > pos
    what = f"; {share:.0%} of it from {term}, divided by {d:g}"
    if not by_pos:
        return what, ""
    first_step = (
        f"divide {term} by all sampled samples (profile 'fixed'; MMDetection, torchvision and "
        "Detectron2 all do) instead of the positives; then "
    )
    return what + f", its positive {UNITS[head]}, of {sampled} sampled", first_step


def _step_share(r: Replay, g: ProfileGrads) -> float | None:
    """How far one SGD step at the recorded learning rate moves the heads, as a share of their
    weights' norm (the clipped gradient where the profile clips); None without a recorded lr."""
    lr = r.batch.meta.get("lr")
    weights = math.sqrt(
        sum(float(t.detach().double().square().sum()) for t in r.heads.params.values())
    )
    if lr is None or not weights > 0:
        return None
    return lr * g.clipped_norm / weights


def _exploding(r: Replay, g: ProfileGrads) -> tuple[bool, float | None]:
    """Whether a profile's gradient explodes: a step moving the heads by over EXPLODING_STEP of
    their norm where the lr is recorded (a norm alone says little: it scales with the features),
    else a norm over EXPLODING_NORM."""
    if not g.total_norm == g.total_norm:
        return False, None
    share = _step_share(r, g)
    if share is None:
        return g.total_norm > EXPLODING_NORM, None
    return share > EXPLODING_STEP, share


def exploding(f: Facts) -> list[Finding]:
    out = []
    for name, g in f.grads.items():
        explodes, share_of_weights = _exploding(f.replay, g)
        if not explodes:
            continue
        clip = ""
        if g.max_norm:
            clip = (
                f"; a clip at {g.max_norm} scales it by {g.clip_coef:.3g} to {g.clipped_norm:.3g}"
            )
        term, share = dominant_term(g)
        what, first_step = _divided_by(f.replay, name, term, share) if term else ("", "")
        msg = f"{name}: total head gradient norm {g.total_norm:.3g} (pre-clip){what}{clip}"
        if share_of_weights is not None:
            lr = f.replay.batch.meta["lr"]
            msg += (
                f"; one step at lr {lr:g} moves the heads by {share_of_weights:.0%} of their norm"
            )
        ev = {
            "step_share": share_of_weights,
            "total_norm": g.total_norm,
            "clip_coef": g.clip_coef,
            "clipped_norm": g.clipped_norm,
            "dominant_term": term,
            "dominant_share": share,
        }
        head = term.head if term else None
        out.append(
            Finding(message=msg, head=head, profile=name, evidence=ev, fix_prefix=first_step)
        )
    return out


def vanishing(f: Facts) -> list[Finding]:
    return [
        Finding(
            message=f"{name}: total head gradient norm {g.total_norm:.3g}",
            profile=name,
            evidence={"total_norm": g.total_norm},
        )
        for name, g in f.grads.items()
        if g.total_norm == g.total_norm and g.total_norm < VANISHING_NORM
    ]
