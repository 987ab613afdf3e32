"""What the gradients are reported as (per level, per parameter, per profile) and the small
helpers every head's backward shares: norms, vector-Jacobian products, term coefficients."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...inputs.finite import all_finite
from ...inputs.profiles import LossProfile, TermSpec
from ...replay.engine import Replay
from ...replay.samples import LevelSamples
from ...vocab import (
    PER_LEVEL_NORMALIZERS,
    Empty,
    Head,
    Layer,
    Part,
    Term,
)


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


def _out_weights(r: Replay) -> Tensor:
    """The 1x1 convs' weights stacked, Tensor[5A, C]: (objectness, deltas) by input channel."""
    return torch.cat(
        [r.heads.weight(x).detach().flatten(1) for x in (Layer.RPN_LOGITS, Layer.RPN_DELTAS)]
    )


def _hidden_grad(r: Replay, lvl: int, g_logits: Tensor, g_deltas: Tensor) -> Tensor:
    """∂L/∂hidden Tensor[N, C, H, W] of level ``lvl`` from its output gradients, through the
    1x1 convs as a channel-first matmul ([N, 5A, HW] → [N, C, HW])."""
    n, c, h, w = r.rpn.levels[lvl].out.hidden.shape
    g = torch.cat([x.reshape(n, h * w, -1).transpose(1, 2) for x in (g_logits, g_deltas)], 1)
    return torch.matmul(_out_weights(r).T, g).view(n, c, h, w)


def _finite(*ts: Tensor) -> bool:
    return all(all_finite(t) for t in ts)


def _zeros_for_none(grads, like: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def _dot(a: Tensor, b: Tensor) -> float:
    """<a, b> summed in float64 (no float64 copy of either)."""
    return float((a * b).sum(dtype=torch.float64))


def _gram_norm_sq(g: Tensor, gram: Tensor) -> Tensor:
    """||g^T X||_F^2 from the Gram matrix X X^T (a 0-d tensor, so it sums like a squared norm)."""
    if g.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64)
    return ((g @ g.T).double() * gram.double()).sum().clamp(min=0)


def _term_norm(g: Tensor | None, split: bool) -> float:
    if g is None:
        return 0.0 if split else math.nan
    return math.sqrt(float(g)) if g.dim() == 0 else _norm(g)


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
