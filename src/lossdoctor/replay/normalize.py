"""Each profile's normalization of the shared per-sample losses (see ``inputs.profiles``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..inputs.profiles import LossProfile
from ..vocab import BOX_TERMS, Head, Part, Term, term_of
from .losses import normalize
from .samples import HeadCounts, LevelSamples


@dataclass(kw_only=True)
class LevelLoss:
    """One (profile, head, level): its terms and what they were divided by (for the mask head,
    ``loss_mask`` with its normalizer and weight in ``avg_factor`` and ``sample_weight``)."""

    level: str
    loss_cls: Tensor
    loss_bbox: Tensor
    avg_factor: float
    avg_factor_bbox: float
    sample_weight: float
    sample_weight_bbox: float
    loss_mask: Tensor = field(default_factory=lambda: torch.zeros(()))
    stage: int = 0  # the cascade stage of a RoI level


PART_LOSS = {Part.CLS: "loss_cls", Part.BOX: "loss_bbox", Part.MASK: "loss_mask"}


@dataclass(kw_only=True)
class ProfileLosses:
    profile: LossProfile
    levels: dict[Head, list[LevelLoss]]
    stages: list[list[LevelLoss]] = field(default_factory=list)  # a cascade's later RoI stages

    def rows(self, head: Head) -> list[LevelLoss]:
        """A head's level losses, a cascade's later stages after the first for the RoI head."""
        later = [lv for stage in self.stages for lv in stage] if head is Head.ROI else []
        return list(self.levels.get(head, [])) + later

    def term(self, term: Term) -> Tensor:
        """A term's total over its head's levels and stages (graph attached)."""
        attr = PART_LOSS[term.part]
        return sum((getattr(lv, attr) for lv in self.rows(term.head)), torch.zeros(()))

    @property
    def terms(self) -> dict[Term, Tensor]:
        mask = (Term.ROI_MASK,) if Head.MASK in self.levels else ()
        return {t: self.term(t) for t in (*BOX_TERMS, *mask)}

    @property
    def total(self) -> Tensor:
        return sum(self.terms.values())


def _weight_per_sample(weight: float, d: float) -> float:
    return weight / d if d else float("nan")


def _mask_level_loss(s: LevelSamples, lvl: int, p: LossProfile, counts: HeadCounts) -> LevelLoss:
    """The mask term at one level: the positive RoIs' summed pixel BCE over the normalizer."""
    spec, zero = p.roi_mask, torch.zeros(())
    loss, d = normalize(s.cls_loss.sum(), spec, counts.count(spec.normalizer, lvl))
    return LevelLoss(level=s.name, loss_cls=zero, loss_bbox=zero, loss_mask=loss, avg_factor=d,
                     avg_factor_bbox=math.nan, sample_weight=_weight_per_sample(spec.weight, d),
                     sample_weight_bbox=math.nan)  # fmt: skip


def _level_loss(s: LevelSamples, lvl: int, head: Head, p: LossProfile, counts: HeadCounts):
    if head is Head.MASK:
        return _mask_level_loss(s, lvl, p, counts)
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


def staged(profile: LossProfile, weight: float) -> LossProfile:
    """The profile with its RoI terms weighted by a cascade stage's loss weight."""
    if weight == 1.0:
        return profile
    return dataclasses.replace(
        profile,
        roi_cls=dataclasses.replace(profile.roi_cls, weight=profile.roi_cls.weight * weight),
        roi_box=dataclasses.replace(profile.roi_box, weight=profile.roi_box.weight * weight),
    )


def _head_losses(samples, counts, head: Head, p: LossProfile, stage: int = 0) -> list[LevelLoss]:
    out = [_level_loss(s, lvl, head, p, counts) for lvl, s in enumerate(samples)]
    for lv in out:
        lv.stage = stage
    return out


def profile_losses(
    samples: dict[Head, list[LevelSamples]],
    counts: dict[Head, HeadCounts],
    profile: LossProfile,
    stages: tuple = (),
    first_weight: float = 1.0,
) -> ProfileLosses:
    """Normalize the shared per-sample losses under one profile. ``stages``: a cascade's later
    stages as (samples, counts, loss weight); ``first_weight`` weighs the first stage."""
    levels = {
        head: _head_losses(per_level, counts[head], head,
                           staged(profile, first_weight) if head is Head.ROI else profile)
        for head, per_level in samples.items()
    }  # fmt: skip
    later = [
        _head_losses(s, c, Head.ROI, staged(profile, w), stage=k)
        for k, (s, c, w) in enumerate(stages, start=1)
    ]
    return ProfileLosses(profile=profile, levels=levels, stages=later)
