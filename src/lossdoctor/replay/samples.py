"""The samples of one (head, level) that enter the losses, and what the normalizers count."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ..inputs.config import CoderConfig
from ..inputs.profiles import TermSpec
from ..vocab import DECODED_BOX_LOSSES, Normalizer
from .boxes import decode
from .losses import DECODED_LOSSES, box_loss


@dataclass(kw_only=True)
class LevelSamples:
    """The samples of one (head, level) that enter the losses.

    cls_loss: Tensor[B] per-sample classification loss of the sampled samples; cls_pos: Tensor[B]
    bool; box_pred / box_target: Tensor[P, 4] of the sampled positives; cls_leak / box_leak: 0 or
    NaN, what unsampled predictions add under weight-multiply semantics (0 * inf = NaN; RPN only).
    box_ref / box_gt: Tensor[P, 4] the positives' reference boxes and matched GT boxes, and
    box_coder the coder that decodes box_pred on box_ref (the RoI head's: the decoded-box losses).
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
    box_ref: Tensor | None = None
    box_gt: Tensor | None = None
    box_coder: CoderConfig | None = None
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
            self._box_cache[key] = (
                DECODED_LOSSES[term.loss](self.decoded(), self.box_gt, term.beta)
                if term.loss in DECODED_BOX_LOSSES
                else box_loss(self.box_pred, self.box_target, term.loss, term.beta)
            )
        return self._box_cache[key]

    def decoded(self) -> Tensor:
        """The boxes box_pred decodes to on box_ref, Tensor[P, 4] (in the graph of box_pred)."""
        c = self.box_coder
        return decode(self.box_pred, self.box_ref, c.weights, c.clip, c.clip_both)

    def targets_for(self, term: TermSpec) -> Tensor:
        """What the term's box loss compares the predictions with: the GT boxes for a
        decoded-box loss, the encoded targets otherwise."""
        return self.box_gt if term.loss in DECODED_BOX_LOSSES else self.box_target


@dataclass(kw_only=True)
class HeadCounts:
    """What the normalizers count, for one head: per level, and per image."""

    sampled: list[int]  # per level
    pos: list[int]  # per level
    budget: int  # sampler batch size x images
    img_pos: list[int]
    img_neg: list[int]
    with_neg: bool = True  # mmdet's avg_factor counts max(#neg, 1) per image too
    pixels: int = 1  # target pixels per sample (the mask head's M x M)

    def count(self, normalizer: Normalizer, level: int) -> float:
        """The count ``normalizer`` divides by at ``level``."""
        return COUNTS[normalizer](self, level)


def _mmdet_sampler(c: HeadCounts) -> int:
    """MMDetection's SamplingResult.avg_factor summed over images: max(#pos, 1), plus max(#neg, 1)
    where the sampler counts negatives (RandomSampler) and not where it does not (PseudoSampler)."""
    return sum(max(p, 1) + (max(n, 1) if c.with_neg else 0) for p, n in zip(c.img_pos, c.img_neg))


# One entry per Normalizer member (a test checks that every member has one).
COUNTS = {
    Normalizer.LEVEL_SAMPLED: lambda c, level: c.sampled[level],
    Normalizer.LEVEL_POS: lambda c, level: c.pos[level],
    Normalizer.SAMPLED: lambda c, level: sum(c.sampled),
    Normalizer.POS: lambda c, level: sum(c.pos),
    Normalizer.BUDGET: lambda c, level: c.budget,
    Normalizer.MMDET_SAMPLER: lambda c, level: _mmdet_sampler(c),
    Normalizer.MMDET_PSEUDO: lambda c, level: sum(max(p, 1) for p in c.img_pos),
    Normalizer.MASK_PIXELS: lambda c, level: sum(c.pos) * c.pixels,
}


def head_counts(samples: list[LevelSamples], cfg, images: int, img_pos, img_neg) -> HeadCounts:
    """What a head's normalizers count, given its sampler config ``cfg``."""
    return HeadCounts(
        sampled=[s.sampled for s in samples],
        pos=[s.pos for s in samples],
        budget=cfg.batch_size * images,
        img_pos=img_pos,
        img_neg=img_neg,
        with_neg=cfg.avg_factor_with_neg,
    )
