"""The samples of one (head, level) that enter the losses, and what the normalizers count."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ..inputs.profiles import TermSpec
from ..vocab import Normalizer
from .losses import box_loss


@dataclass(kw_only=True)
class LevelSamples:
    """The samples of one (head, level) that enter the losses.

    cls_loss: Tensor[S] per-sample classification loss of the sampled samples; cls_pos: Tensor[S]
    bool; box_pred / box_target: Tensor[P, 4] of the sampled positives; cls_leak / box_leak: 0 or
    NaN, what unsampled predictions add under weight-multiply semantics (0 * inf = NaN; RPN only).
    """

    name: str
    candidates: int
    ignored: int
    cls_loss: Tensor
    cls_pos: Tensor
    box_pred: Tensor
    box_target: Tensor
    cls_leak: Tensor
    box_leak: Tensor
    _box_cache: dict = field(default_factory=dict, repr=False)

    @property
    def sampled(self) -> int:
        return int(self.cls_pos.numel())

    @property
    def pos(self) -> int:
        return int(self.cls_pos.sum())

    def box_loss(self, term: TermSpec) -> Tensor:
        """Per-positive box loss Tensor[P] under the term's loss kind (cached per kind)."""
        key = (term.loss, term.beta)
        if key not in self._box_cache:
            self._box_cache[key] = box_loss(self.box_pred, self.box_target, term.loss, term.beta)
        return self._box_cache[key]


@dataclass(kw_only=True)
class HeadCounts:
    """What the normalizers count, for one head: per level, and per image."""

    sampled: list[int]  # per level
    pos: list[int]  # per level
    budget: int  # sampler batch size x images
    img_pos: list[int]
    img_neg: list[int]

    def count(self, normalizer: Normalizer, level: int) -> float:
        """The count ``normalizer`` divides by at ``level``."""
        return COUNTS[normalizer](self, level)


def _mmdet_sampler(c: HeadCounts) -> int:
    return sum(max(p, 1) + max(n, 1) for p, n in zip(c.img_pos, c.img_neg))


# One entry per Normalizer member (a test checks that every member has one).
COUNTS = {
    Normalizer.LEVEL_SAMPLED: lambda c, level: c.sampled[level],
    Normalizer.LEVEL_POS: lambda c, level: c.pos[level],
    Normalizer.SAMPLED: lambda c, level: sum(c.sampled),
    Normalizer.POS: lambda c, level: sum(c.pos),
    Normalizer.BUDGET: lambda c, level: c.budget,
    Normalizer.MMDET_SAMPLER: lambda c, level: _mmdet_sampler(c),
    Normalizer.MMDET_PSEUDO: lambda c, level: sum(max(p, 1) for p in c.img_pos),
}


def head_counts(
    samples: list[LevelSamples], budget: int, img_pos: list[int], img_neg: list[int]
) -> HeadCounts:
    return HeadCounts(
        sampled=[s.sampled for s in samples],
        pos=[s.pos for s in samples],
        budget=budget,
        img_pos=img_pos,
        img_neg=img_neg,
    )
