"""Checks of the batch and the checkpoint as given: GT boxes and labels, what the loader
refused, non-finite weights."""

from __future__ import annotations

from ...inputs.finite import all_finite
from ...replay.engine import Replay
from ...replay.gt import DroppedLabel
from ...vocab import (
    Background,
    Framework,
)
from ..finding import Finding
from .base import EVIDENCE_ITEMS, Facts, _plural

EMPTY_GT_CAUSE = "images without a usable GT box train as images without objects"


def suspicions(code: str, cause: str):
    """A check that turns the batch's suspicions of ``code`` into hits, of one ``cause``."""

    def check(f: Facts) -> list[Finding]:
        out = []
        for s in f.replay.batch.suspicions:
            if s.code == code:
                extra = {"box": s.box} if s.box is not None and "box" not in s.evidence else {}
                ev = {**s.evidence, **extra}
                hit = Finding(
                    message=s.message, image=s.image, level=s.level, evidence=ev, cause=cause
                )
                out.append(hit)
        return out

    return check


DEGENERATE_CAUSE = "GT boxes with zero or negative width or height"


def degenerate_gt(f: Facts) -> list[Finding]:
    """Boxes without area, with what the RPN's matching made of them: a box that overlaps no
    anchor under low-quality matching makes every candidate anchor positive (said here, once,
    rather than as a second finding of the same box)."""
    r = f.replay
    every = r.config.rpn_matcher.every_candidate_positive_for_empty_overlap
    out = []
    for s, hit in zip(
        _of_code(r, "degenerate-gt"), suspicions("degenerate-gt", DEGENERATE_CAUSE)(f)
    ):
        used = (r.gt.sources[s.image] == s.box).nonzero().flatten().tolist()
        if every and used and float(r.rpn.images[s.image].gt_best[used[0]]) == 0:
            n = r.images[s.image].rpn_pos_candidates
            hit.message += (
                f"; it overlaps no anchor, so low-quality matching makes all {n} candidate "
                "anchors positive"
            )
            hit.evidence["rpn_pos_candidates"] = n
        out.append(hit)
    return out


def _of_code(r: Replay, code: str) -> list:
    return [s for s in r.batch.suspicions if s.code == code]


def empty_gt(f: Facts) -> list[Finding]:
    """Images without usable GT: none in the dump, all ignored, or all left out."""
    r = f.replay
    out = suspicions("empty-gt-image", EMPTY_GT_CAUSE)(f)
    named = {h.image for h in out}
    for im in r.images:
        if im.gt > 0 or im.image in named:
            continue
        parts = [
            (im.gt_ignored, "ignored"),
            (im.gt_bad_label, f"labelled outside {r.batch.label_space.span(r.heads.num_classes)}"),
            (im.gt_nonfinite, "non-finite"),
        ]
        why = ", ".join(f"{n} {what}" for n, what in parts if n)
        msg = (
            f"image {im.image} has no usable GT box ({why}), so it trains as an image without "
            "objects"
        )
        ev = {"ignored": im.gt_ignored, "bad_label": im.gt_bad_label, "nonfinite": im.gt_nonfinite}
        out.append(Finding(message=msg, image=im.image, evidence=ev, cause=EMPTY_GT_CAUSE))
    return out


def _label_facts(r: Replay) -> tuple[list[int], list[int], bool]:
    """All dump labels, the distinct dropped ones, and whether they look 1-based (in the dump's
    labels)."""
    labels = [lab for img in r.batch.gt_labels for lab in img.tolist()]
    bad = sorted({d.label for d in r.gt.dropped_labels})
    return labels, bad, bool(labels) and min(labels) >= 1 and bad == [r.heads.num_classes]


def labels_one_based(f: Facts) -> list[Finding]:
    """Labels 1..K: an error where label K collides with the background (or falls beyond the
    classifier); minor where the run is torchvision's (whose own labels are 1-based) and the
    labels never use class 0, the mark of its raw labels passed as they are. Labels are named as
    the run names them."""
    r = f.replay
    labels, _, one_based = _label_facts(r)
    k, space = r.heads.num_classes, r.batch.label_space
    if r.gt.dropped_labels and one_based:
        where = (
            f"lands on column {k}, the background of this {r.heads.layout} checkpoint"
            if r.heads.background is Background.LAST
            else f"is past the last class ({space.run(k - 1)})"
        )
        msg = (
            f"labels run {space.run(1)}..{space.run(max(labels))}: they look one too high; label "
            f"{space.run(k)} {where}, and every class is shifted by one"
        )
    elif _raw_torchvision_labels(r, labels):
        msg = (
            f"labels run {min(labels)}..{max(labels)} and never use class 0 in a torchvision run, "
            "whose own labels are 1-based (its label j is class j-1 here): if targets['labels'] "
            "were passed as they are, every class is shifted by one"
        )
    else:
        return []
    ev = {"min_label": space.run(min(labels)), "max_label": space.run(max(labels)),
          "num_classes": k, "dropped": len(r.gt.dropped_labels)}  # fmt: skip
    image = r.gt.dropped_labels[0].image if r.gt.dropped_labels else None
    return [Finding(message=msg, image=image, evidence=ev, minor=not one_based)]


def _raw_torchvision_labels(r: Replay, labels: list[int]) -> bool:
    """A torchvision run whose dump kept the labels as given (no adapter shifted them to the
    dump's 0..K-1), and they never use class 0."""
    torchvision = r.batch.meta.get("framework") == Framework.TORCHVISION
    by_hand = torchvision and r.batch.label_space.offset == 0
    return by_hand and bool(labels) and min(labels) >= 1


def _boxes(dropped: list[DroppedLabel]) -> list[list[int]]:
    return [[d.image, d.box] for d in dropped[:EVIDENCE_ITEMS]]


def label_out_of_range(f: Facts) -> list[Finding]:
    r = f.replay
    dropped = r.gt.dropped_labels
    _, _, one_based = _label_facts(r)
    if not dropped or one_based:
        return []
    k, space = r.heads.num_classes, r.batch.label_space
    bad = sorted({space.run(d.label) for d in dropped})
    msg = (
        f"{_plural(len(dropped), 'GT box')} {'has' if len(dropped) == 1 else 'have'} "
        f"{_plural(len(bad), 'label', show=False)} {', '.join(map(str, bad))} outside "
        f"{space.span(k)}: left out of the replay"
    )
    ev = {"labels": bad, "num_classes": k, "boxes": _boxes(dropped)}
    return [Finding(message=msg, image=dropped[0].image, evidence=ev)]


def gt_labelled_background(f: Facts) -> list[Finding]:
    """GT boxes labelled with the run's background class (torchvision's 0): trained as objects
    by the RPN and as background by the RoI head, as the framework does."""
    r = f.replay
    marked = r.gt.background_labels
    if not marked:
        return []
    bg, k = r.batch.label_space.background, r.heads.num_classes
    n = len(marked)
    msg = (
        f"{_plural(n, 'GT box')} {'is' if n == 1 else 'are'} labelled {bg}, the background of "
        f"labels {r.batch.label_space.span(k)}: the RPN trains {'it' if n == 1 else 'them'} as "
        "an object, the RoI head as background (no class, no box loss), as the framework does"
    )
    ev = {"label": bg, "num_classes": k, "boxes": _boxes(marked)}
    return [Finding(message=msg, image=marked[0].image, evidence=ev)]


def unsafe_globals(f: Facts) -> list[Finding]:
    r, out = f.replay, []
    for what, replaced in (("checkpoint", r.heads.replaced), ("batch", r.batch.replaced)):
        code = [x.name for x in replaced if x.code]
        if code:
            msg = (
                f"the {what} file names {', '.join(code)}, code that unpickling would have run; "
                "lossdoctor put an inert placeholder in its place and did not run it"
            )
            out.append(Finding(message=msg, evidence={"file": what, "globals": code}))
    return out


def _module(key: str) -> str:
    return key.rsplit(".", 1)[0]


def nonfinite_weights(f: Facts) -> list[Finding]:
    """Non-finite head weights, and non-finite tensors anywhere else in the checkpoint (the
    backbone and neck are not replayed, but a NaN there is a NaN in every feature)."""
    heads, out = f.replay.heads, []
    bad = [heads.file_key(n) for n, t in heads.params.items() if not all_finite(t)]
    if bad:
        msg = f"non-finite head weights: {', '.join(bad)}"
        out.append(Finding(message=msg, evidence={"params": bad, "modules": {}, "values": 0}))
    modules: dict[str, int] = {}
    for key, n in heads.nonfinite_elsewhere.items():
        modules[_module(key)] = modules.get(_module(key), 0) + n
    if modules:
        shown = ", ".join(f"{m} ({n})" for m, n in list(modules.items())[:3])
        more = f" and {len(modules) - 3} more" if len(modules) > 3 else ""
        total = sum(modules.values())
        msg = (
            f"non-finite weights outside the heads: {shown}{more}; {total} NaN/Inf values in "
            f"{len(heads.nonfinite_elsewhere)} tensors of {len(modules)} modules, so every "
            "feature computed from them is suspect"
        )
        ev = {"params": [], "modules": dict(list(modules.items())[:EVIDENCE_ITEMS]),
              "values": total}  # fmt: skip
        out.append(Finding(message=msg, evidence=ev))
    return out
