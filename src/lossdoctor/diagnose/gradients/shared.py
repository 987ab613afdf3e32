"""What every profile's backward shares: the per-sample loss derivatives at the head outputs,
computed once, the RPN conv's dense negatives and each box-head stage's Gram matrices."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...inputs.checkpoint import BOX_COORDS
from ...inputs.finite import all_finite
from ...inputs.profiles import TermSpec
from ...replay.engine import Replay
from ...replay.mask import mask_params
from ...replay.roi import RoiStage
from ...vocab import (
    Head,
    Layer,
)
from .base import _hidden_grad, _norm, _sq, _vjp, _zeros_for_none


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


def mask_backward(r: Replay, loss: Tensor) -> list[Tensor]:
    """d loss / d (the mask head's parameters, its selected logits, the features)."""
    names = mask_params(r.heads)
    feats = list(r.features[: r.roi.num_levels])
    inputs = [r.heads.params[n] for n in names] + [r.mask.logits] + feats
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    return _zeros_for_none(grads, inputs)
