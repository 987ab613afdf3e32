"""Loss profiles: how per-sample losses are reduced and normalized.

A profile has four terms (``rpn_cls``, ``rpn_box``, ``roi_cls``, ``roi_box``), and a fifth for a
mask head (``roi_mask``). Each term is::

    loss[level] = weight * sum_{i in S(level)} w_i * l_i / D        (D: the term's normalizer)

where ``l_i`` is the per-sample loss (BCE or CE for classification; L1 or smooth-L1 summed over
the 4 coordinates for boxes), ``S(level)`` the contributing samples of that level (sampled anchors
or RoIs for classification, sampled positives for boxes), ``w_i`` = ``pos_weight`` for positive
classification samples and 1 otherwise. The normalizer is::

    D = max(count, floor) + eps          if count > 0
    D = NaN-producing 0 or a live zero   if count == 0   (``empty`` = "nan" or "zero")

``empty_in_graph`` says whether the loss code keeps an empty term in the autograd graph (its
parameters then get a zero gradient, as every framework's loss does: a sum over an empty
selection, ``pred.sum() * 0``) or leaves it out (no gradient at all: the naive
``if n: loss += ...``, under DDP the empty-GT hang). An empty term's scope is its level for the
``level_*`` normalizers and the whole head otherwise.

and ``count`` is chosen by ``normalizer``:

=================  ===========================================================================
``level_sampled``  sampled samples of this level (a per-level mean)
``level_pos``      sampled positives of this level
``sampled``        sampled samples of the whole batch, all levels (RPN anchors or RoIs)
``pos``            sampled positives of the whole batch
``budget``         sampler batch size per image x images (Detectron2's RPN: 256 N)
``mmdet_sampler``  sum over images of max(#pos, 1) + max(#neg, 1) (MMDetection's RandomSampler)
``mmdet_pseudo``   sum over images of max(#pos, 1) (MMDetection's PseudoSampler)
``mask_pixels``    the positive RoIs' mask pixels: #pos x M x M (the mask term's mean)
=================  ===========================================================================

``unsampled_leak`` reproduces MMDetection's weight-multiply semantics: the RPN loss is summed
over every anchor with weight 0 for unsampled ones, so a non-finite prediction anywhere in a level
makes that level's loss NaN (0 * inf). The others index the sampled anchors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..vocab import (
    BOX_LOSSES,
    BOX_TERMS,
    CLS_LOSSES,
    DECODED_BOX_LOSSES,
    Empty,
    LossKind,
    Normalizer,
    Part,
    Term,
)
from .checks import as_member, check_range
from .dataclass_toml import dumps_toml, from_table, load_named, to_dict
from .errors import InputError

# float32 machine epsilon: MMDetection adds it to every avg_factor (weight_reduce_loss).
EPS32 = 1.1920928955078125e-07
SMOOTH_L1_TV_BETA = 1.0 / 9.0
# box losses undefined without a positive beta (the bounded IoU loss's smoothing, the balanced
# L1's switch point)
BETA_LOSSES = (LossKind.BOUNDED_IOU, LossKind.BALANCED_L1)


@dataclass(frozen=True)
class TermSpec:
    """One loss term: its per-sample loss and its normalization (validated on construction)."""

    loss: LossKind
    normalizer: Normalizer = Normalizer.SAMPLED
    beta: float = 0.0  # smooth-L1 transition point; < 1e-5 means plain L1 (as fvcore does)
    weight: float = 1.0
    floor: float = 0.0
    eps: float = 0.0
    empty: Empty = Empty.ZERO
    empty_in_graph: bool = True

    def __post_init__(self):
        object.__setattr__(self, "loss", as_member(LossKind, self.loss, "loss"))
        object.__setattr__(self, "normalizer", as_member(Normalizer, self.normalizer, "normalizer"))
        object.__setattr__(self, "empty", as_member(Empty, self.empty, "empty"))
        for name in ("beta", "weight", "floor", "eps"):
            check_range(getattr(self, name), name, 0.0)
        if not isinstance(self.empty_in_graph, bool):
            found = type(self.empty_in_graph).__name__
            raise InputError(f"empty_in_graph must be true or false, found {found}")


@dataclass(frozen=True)
class LossProfile:
    """How the four loss terms are normalized. See the module docstring for the formula."""

    name: str
    summary: str = ""
    rpn_cls: TermSpec = field(default_factory=lambda: TermSpec(LossKind.BCE))
    rpn_box: TermSpec = field(
        default_factory=lambda: TermSpec(LossKind.SMOOTH_L1, beta=SMOOTH_L1_TV_BETA)
    )
    roi_cls: TermSpec = field(default_factory=lambda: TermSpec(LossKind.CE))
    roi_box: TermSpec = field(
        default_factory=lambda: TermSpec(LossKind.SMOOTH_L1, beta=SMOOTH_L1_TV_BETA)
    )
    # Mask R-CNN: per-pixel BCE of each positive RoI's mask; all three frameworks take the mean
    # over the positive RoIs' pixels and give a zero with a graph when there is none
    roi_mask: TermSpec = field(
        default_factory=lambda: TermSpec(LossKind.BCE, Normalizer.MASK_PIXELS)
    )
    pos_weight: float = 1.0
    unsampled_leak: bool = False
    max_norm: float | None = None  # gradient clipping to simulate (total L2 norm), None = off

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"a profile needs a non-empty name, found {self.name!r}")
        for term in BOX_TERMS:
            spec = self.term(term)
            if not isinstance(spec, TermSpec):
                raise InputError(f"profile {self.name!r}: {term} is not a TermSpec")
            want = CLS_LOSSES if term.part is Part.CLS else BOX_LOSSES
            if spec.loss not in want:
                names = ", ".join(want)
                raise InputError(
                    f"profile {self.name!r}: {term} needs one of {names}, found {spec.loss!r}"
                )
        if self.rpn_cls.loss is not LossKind.BCE or self.roi_cls.loss is not LossKind.CE:
            raise InputError(f"profile {self.name!r}: rpn_cls must be 'bce' and roi_cls 'ce'")
        for term, spec in ((Term.RPN_BOX, self.rpn_box), (Term.ROI_BOX, self.roi_box)):
            if spec.loss in BETA_LOSSES and spec.beta <= 0:
                raise InputError(
                    f"profile {self.name!r}: {term} '{spec.loss}' needs its beta > 0, found "
                    f"{spec.beta}"
                )
        if self.rpn_box.loss in DECODED_BOX_LOSSES:
            raise InputError(
                f"profile {self.name!r}: rpn_box '{self.rpn_box.loss}' on decoded boxes is "
                "replayed for the RoI head only; use l1 or smooth_l1"
            )
        if not isinstance(self.roi_mask, TermSpec) or self.roi_mask.loss is not LossKind.BCE:
            raise InputError(f"profile {self.name!r}: roi_mask must be a 'bce' term")
        check_range(self.pos_weight, f"profile {self.name!r}: pos_weight", 0.0, open_low=True)
        if self.max_norm is not None:
            check_range(self.max_norm, f"profile {self.name!r}: max_norm", 0.0, open_low=True)

    def term(self, term: Term) -> TermSpec:
        return getattr(self, Term(term).value)


# box losses a what-if profile may put in place of the run's (delta losses of the same kind)
DELTA_LOSSES = (LossKind.L1, LossKind.SMOOTH_L1)


def with_losses_of(whatif: LossProfile, own: LossProfile) -> LossProfile:
    """``whatif``'s normalization of the run's own box losses where those are not delta L1 or
    smooth-L1 (an IoU loss on decoded boxes, a balanced L1): a what-if then changes how the
    loss is normalized, not which loss it is."""
    changes = {}
    for term in (Term.RPN_BOX, Term.ROI_BOX):
        mine = own.term(term)
        if mine.loss not in DELTA_LOSSES:
            changes[term.value] = replace(
                whatif.term(term), loss=mine.loss, beta=mine.beta, weight=mine.weight
            )
    if not changes:
        return whatif
    said = ", ".join(f"{t} {c.loss}" for t, c in changes.items())
    return replace(whatif, summary=f"{whatif.summary} (with the run's {said})", **changes)


def legacy() -> LossProfile:
    """The naive code: a per-level ``.mean()``.

    - rpn_cls[l] = mean over level l's sampled anchors of BCE; NaN if the level sampled none.
    - rpn_box[l] = mean over level l's sampled positives of sum_k SL1_{1/9}; NaN if it has none.
    - roi_cls    = plain mean CE over all sampled RoIs; NaN if there is none.
    - roi_box    = mean over positive RoIs of sum_k SL1_{1/9}; NaN if there is none.
    - roi_mask   = mean per-pixel BCE over the positive RoIs' masks; NaN if there is none.
    No floor, all weights 1. An empty term is left out of the graph (no gradient).
    """
    sl1 = SMOOTH_L1_TV_BETA
    naive = dict(empty=Empty.NAN, empty_in_graph=False)
    return LossProfile(
        name="legacy",
        summary="naive per-level mean; box loss over the level's positives; empty set -> NaN",
        rpn_cls=TermSpec(LossKind.BCE, Normalizer.LEVEL_SAMPLED, **naive),
        rpn_box=TermSpec(LossKind.SMOOTH_L1, Normalizer.LEVEL_POS, beta=sl1, **naive),
        roi_cls=TermSpec(LossKind.CE, Normalizer.SAMPLED, **naive),
        roi_box=TermSpec(LossKind.SMOOTH_L1, Normalizer.POS, beta=sl1, **naive),
        roi_mask=TermSpec(LossKind.BCE, Normalizer.MASK_PIXELS, **naive),
    )


def fixed() -> LossProfile:
    """The fix: one avg_factor per head = max(total sampled, 1), shared by levels and terms.

    - rpn_cls = sum over sampled anchors of BCE (positives x pos_weight) / max(S_rpn, 1)
    - rpn_box = sum over sampled positives of sum_k SL1_{1/9} / max(S_rpn, 1)
    - roi_cls = sum over sampled RoIs of CE / max(R, 1);  roi_box = sum_pos SL1_{1/9} / max(R, 1)
    An empty set gives 0 with a live graph.
    """
    sl1 = SMOOTH_L1_TV_BETA
    return LossProfile(
        name="fixed",
        summary="one avg_factor = max(total sampled, 1) per head, shared by levels and terms; "
        "empty -> 0",
        rpn_cls=TermSpec(LossKind.BCE, Normalizer.SAMPLED, floor=1.0),
        rpn_box=TermSpec(LossKind.SMOOTH_L1, Normalizer.SAMPLED, beta=sl1, floor=1.0),
        roi_cls=TermSpec(LossKind.CE, Normalizer.SAMPLED, floor=1.0),
        roi_box=TermSpec(LossKind.SMOOTH_L1, Normalizer.SAMPLED, beta=sl1, floor=1.0),
        roi_mask=TermSpec(LossKind.BCE, Normalizer.MASK_PIXELS, floor=1.0),
    )


def mmdet() -> LossProfile:
    """MMDetection 3.x Faster R-CNN (AnchorHead/RPNHead + BBoxHead).

    - A_rpn = sum_img max(#pos, 1) + max(#neg, 1)   (SamplingResult.avg_factor)
    - loss_rpn_cls[l]  = sum_i w_i BCE(x_i, y_i) / (A_rpn + eps32), w over all anchors
      (0 if unsampled)
    - loss_rpn_bbox[l] = sum_i b_i |d_i - t_i|_1 / (A_rpn + eps32); 0 if level l has no positive
    - loss_cls  = sum_j CE / (max(R, 1) + eps32) over the R sampled RoIs (background = last column)
    - loss_bbox = sum_{pos} |d - t|_1 / (R + eps32); 0 if the batch has no positive RoI
    """
    return LossProfile(
        name="mmdet",
        summary="MMDetection 3.x: avg_factor = sum_img max(pos,1)+max(neg,1) (+eps); L1 boxes",
        rpn_cls=TermSpec(LossKind.BCE, Normalizer.MMDET_SAMPLER, eps=EPS32),
        rpn_box=TermSpec(LossKind.L1, Normalizer.MMDET_SAMPLER, eps=EPS32),
        roi_cls=TermSpec(LossKind.CE, Normalizer.SAMPLED, floor=1.0, eps=EPS32),
        roi_box=TermSpec(LossKind.L1, Normalizer.SAMPLED, eps=EPS32),
        unsampled_leak=True,
    )


def mmdet_cascade() -> LossProfile:
    """MMDetection 3.x Cascade R-CNN (``cascade-rcnn_r50_fpn``): :func:`mmdet`'s normalizers with
    SmoothL1 boxes, beta 1/9 for the RPN and 1 for every stage's box head."""
    base = mmdet()
    return replace(
        base,
        name="mmdet-cascade",
        summary="MMDetection 3.x Cascade R-CNN: mmdet's avg_factors; SL1(1/9) RPN, SL1(1) boxes",
        rpn_box=replace(base.rpn_box, loss=LossKind.SMOOTH_L1, beta=SMOOTH_L1_TV_BETA),
        roi_box=replace(base.roi_box, loss=LossKind.SMOOTH_L1, beta=1.0),
    )


def torchvision() -> LossProfile:
    """torchvision ``RegionProposalNetwork.compute_loss`` and ``fastrcnn_loss``.

    - loss_objectness  = BCE mean over the n_s sampled anchors of the batch
    - loss_rpn_box_reg = sum_{pos} sum_k SL1_{1/9}(d - t) / n_s
    - loss_classifier  = CE mean over the R sampled RoIs (NaN if R = 0)
    - loss_box_reg     = sum_{pos} sum_k SL1_{1/9}(d - t) / R
    """
    sl1 = SMOOTH_L1_TV_BETA
    return LossProfile(
        name="torchvision",
        summary="torchvision: BCE mean over sampled anchors, SL1(1/9) sums / sampled count; "
        "CE mean",
        rpn_cls=TermSpec(LossKind.BCE, Normalizer.SAMPLED, empty=Empty.NAN),
        rpn_box=TermSpec(LossKind.SMOOTH_L1, Normalizer.SAMPLED, beta=sl1, empty=Empty.NAN),
        roi_cls=TermSpec(LossKind.CE, Normalizer.SAMPLED, empty=Empty.NAN),
        roi_box=TermSpec(LossKind.SMOOTH_L1, Normalizer.SAMPLED, beta=sl1, empty=Empty.NAN),
    )


def detectron2() -> LossProfile:
    """Detectron2 ``RPN.losses`` and ``FastRCNNOutputLayers.losses`` (SMOOTH_L1_BETA = 0: L1).

    - loss_rpn_cls = sum over sampled anchors of BCE / (256 N)
    - loss_rpn_loc = sum_{pos} |d - t|_1 / (256 N)
    - loss_cls     = CE mean over R sampled RoIs; 0 with a live graph if R = 0
    - loss_box_reg = sum_{pos} |d - t|_1 / max(R, 1)
    """
    return LossProfile(
        name="detectron2",
        summary="Detectron2: RPN sums / (256 x images); CE mean; L1 boxes / max(R, 1)",
        rpn_cls=TermSpec(LossKind.BCE, Normalizer.BUDGET),
        rpn_box=TermSpec(LossKind.L1, Normalizer.BUDGET),
        roi_cls=TermSpec(LossKind.CE, Normalizer.SAMPLED),
        roi_box=TermSpec(LossKind.L1, Normalizer.SAMPLED, floor=1.0),
    )


BUILTIN = {
    "legacy": legacy,
    "fixed": fixed,
    "mmdet": mmdet,
    "mmdet-cascade": mmdet_cascade,
    "torchvision": torchvision,
    "detectron2": detectron2,
}


def builtin(name: str) -> LossProfile:
    try:
        return BUILTIN[name]()
    except KeyError:
        raise InputError(
            f"unknown profile {name!r}; use one of {', '.join(BUILTIN)} or a profile .toml file"
        ) from None


def load_profile(spec: str | Path) -> LossProfile:
    """A built-in profile name, or a TOML file (its optional ``base`` names the profile it
    edits)."""
    return load_named(LossProfile, spec, BUILTIN, "fixed", "profile")


def profile_from_meta(value, where: str = "meta.profile") -> LossProfile:
    """The profile a dump records: a built-in name, or an inline table (its ``base`` defaults to
    ``fixed``; its ``name`` to "run")."""
    if isinstance(value, LossProfile):
        return value
    if isinstance(value, str):
        if value not in BUILTIN:
            names = ", ".join(BUILTIN)
            raise InputError(f"{where} {value!r} is not a built-in profile; use one of {names}")
        return BUILTIN[value]()
    if isinstance(value, dict):
        return from_table(LossProfile, value, BUILTIN, "fixed", where, "run")
    found = type(value).__name__
    raise InputError(f"{where}: expected a built-in profile name or a profile table, found {found}")


def profile_toml(profile: LossProfile) -> str:
    """The profile as editable TOML that :func:`load_profile` reads back."""
    return dumps_toml(to_dict(profile))
