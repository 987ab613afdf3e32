"""Each profile's normalization of the shared per-sample losses (see ``inputs.profiles``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs.profiles import LossProfile
from ..vocab import BOX_TERMS, Head, Part, Term, term_of
from .losses import normalize
from .samples import HeadCounts, LevelSamples


@dataclass(kw_only=True)
class LevelLoss:
    """One (profile, head, level): the two terms and what they were divided by."""

    level: str
    loss_cls: Tensor
    loss_bbox: Tensor
    avg_factor: float
    avg_factor_bbox: float
    sample_weight: float
    sample_weight_bbox: float


@dataclass(kw_only=True)
class ProfileLosses:
    profile: LossProfile
    levels: dict[Head, list[LevelLoss]]

    def term(self, term: Term) -> Tensor:
        """A term's total over its head's levels (graph attached)."""
        attr = {Part.CLS: "loss_cls", Part.BOX: "loss_bbox"}[term.part]
        return sum((getattr(lv, attr) for lv in self.levels[term.head]), torch.zeros(()))

    @property
    def terms(self) -> dict[Term, Tensor]:
        return {t: self.term(t) for t in BOX_TERMS}

    @property
    def total(self) -> Tensor:
        return sum(self.terms.values())


def _weight_per_sample(weight: float, d: float) -> float:
    return weight / d if d else float("nan")


def _level_loss(s: LevelSamples, lvl: int, head: Head, p: LossProfile, counts: HeadCounts):
    cls_spec, box_spec = p.term(term_of(head, Part.CLS)), p.term(term_of(head, Part.BOX))
    w = torch.where(s.cls_pos, p.pos_weight, 1.0)
    cls_num = (s.cls_loss * w).sum()
    box_num = s.box_loss(box_spec).sum()
    if p.unsampled_leak:
        cls_num, box_num = cls_num + s.cls_leak, box_num + s.box_leak
    loss_cls, d_cls = normalize(cls_num, cls_spec, counts.count(cls_spec.normalizer, lvl))
    loss_box, d_box = normalize(box_num, box_spec, counts.count(box_spec.normalizer, lvl))
    return LevelLoss(
        level=s.name,
        loss_cls=loss_cls,
        loss_bbox=loss_box,
        avg_factor=d_cls,
        avg_factor_bbox=d_box,
        sample_weight=_weight_per_sample(cls_spec.weight, d_cls),
        sample_weight_bbox=_weight_per_sample(box_spec.weight, d_box),
    )


def profile_losses(
    samples: dict[Head, list[LevelSamples]], counts: dict[Head, HeadCounts], profile: LossProfile
) -> ProfileLosses:
    """Normalize the shared per-sample losses under one profile."""
    levels = {
        head: [_level_loss(s, lvl, head, profile, counts[head]) for lvl, s in enumerate(per_level)]
        for head, per_level in samples.items()
    }
    return ProfileLosses(profile=profile, levels=levels)
