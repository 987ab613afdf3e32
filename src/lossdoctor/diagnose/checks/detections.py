"""Checks of the symptom: the detections on the batch, collapse and an untrained head."""

from __future__ import annotations

from ...replay.engine import Replay
from ...vocab import (
    Head,
)
from ..finding import Finding
from .base import EARLY_STEPS, Facts, _step

# a best foreground score below this fraction of chance is a collapse at any step: an untrained
# head scores at chance, and its first steps (the background bias growing) lower that by about one
# order of magnitude, not three
COLLAPSED_FRACTION = 1e-3


def chance(r: Replay) -> float:
    """A foreground class's score from an uninformed classifier: a uniform softmax over the K
    classes and background, 1 / (K + 1)."""
    return 1.0 / (r.heads.num_classes + 1)


def _nothing_detected(f: Facts) -> float | None:
    """The best foreground score when no image with objects has a detection, else None."""
    r, s = f.replay, f.symptom
    with_gt = [i for i, im in enumerate(r.images) if im.gt > 0]
    if not with_gt or any(s.detections[i] for i in with_gt):
        return None
    return max(s.max_fg_score) if s.max_fg_score else 0.0


def _collapsed(f: Facts) -> tuple[float, float, int | None] | None:
    """(best score, chance, step) when nothing is detected and the scores say collapse: far
    below chance, or below it after the steps a detector needs to start detecting."""
    top = _nothing_detected(f)
    if top is None:
        return None
    ch, step = chance(f.replay), _step(f.replay)
    far_below = top < COLLAPSED_FRACTION * ch
    trained_below = step is not None and step >= EARLY_STEPS and top < ch
    return (top, ch, step) if far_below or trained_below else None


def collapse(f: Facts) -> list[Finding]:
    found = _collapsed(f)
    if found is None:
        return []
    top, ch, step = found
    s = f.symptom
    at = f" at step {step}" if step is not None else ""
    msg = (
        f"0 detections above score {s.score_thr} in every image with objects{at}; the best "
        f"foreground score is {top:.3g}, chance is {ch:.3g} (1/{f.replay.heads.num_classes + 1})"
    )
    ev = {"max_fg_score": top, "chance": ch, "step": step,
          "objectness_above_half": s.objectness_above_half}  # fmt: skip
    return [Finding(message=msg, head=Head.ROI, evidence=ev)]


def untrained_or_collapsed(f: Facts) -> list[Finding]:
    """Nothing detected with scores below chance, and no step to say whether the head has
    trained: an untrained head and a collapsed one look alike here."""
    top = _nothing_detected(f)
    r = f.replay
    if top is None or _step(r) is not None or _collapsed(f) or top >= chance(r):
        return []
    msg = (
        f"0 detections above score {f.symptom.score_thr} in every image with objects and "
        f"foreground scores below chance (best {top:.3g}, chance {chance(r):.3g}): an untrained "
        "head (its background bias grows first) or a collapsed one"
    )
    ev = {"max_fg_score": top, "chance": chance(r), "step": None}
    return [Finding(message=msg, head=Head.ROI, evidence=ev)]
