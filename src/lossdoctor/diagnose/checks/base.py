"""What a check reads (``Facts``) and returns (a list of ``Finding``), and the wording the checks
share."""

from __future__ import annotations

from dataclasses import dataclass

from ...replay.engine import Replay
from ..gradients import ProfileGrads
from ..nan_trace import Origin
from ..precision import PrecisionDiag
from ..symptom import Symptom

# steps before which detecting nothing is expected: a detector does not detect during its LR
# warmup (500 iterations in MMDetection, 1000 in torchvision's references)
EARLY_STEPS = 1000
# evidence lists are cut to this many entries
EVIDENCE_ITEMS = 20


@dataclass(kw_only=True)
class Facts:
    """What the checks read: the replay and the diagnosis built on it."""

    replay: Replay
    grads: dict[str, ProfileGrads]
    origins: list[Origin]
    symptom: Symptom
    precision: PrecisionDiag | None = None  # None: the precision was not diagnosed


def _plural(n: int, noun: str, show: bool = True) -> str:
    """``1 GT box``, ``2 GT boxes``; ``show=False`` leaves the count out."""
    word = noun if n == 1 else noun + ("es" if noun.endswith(("s", "x")) else "s")
    return f"{n} {word}" if show else word


def _step(r: Replay) -> int | None:
    step = r.batch.meta.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None
