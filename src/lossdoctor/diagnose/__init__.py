"""Diagnose: gradients, NaN/Inf origins, the detection symptom, and findings over the replay."""

from __future__ import annotations

from dataclasses import dataclass

from ..replay.engine import Replay
from .findings import Finding, findings
from .gradients import ProfileGrads, gradients
from .nan_trace import Origin, trace
from .symptom import Symptom, symptom


@dataclass
class Diagnosis:
    replay: Replay
    grads: dict[str, ProfileGrads]
    origins: list[Origin]
    symptom: Symptom
    findings: list[Finding]


def diagnose(r: Replay, score_thr: float | None = None) -> Diagnosis:
    """Gradients, NaN/Inf origins, the symptom and the findings of one replay."""
    g = gradients(r)
    o = trace(r, g)
    s = symptom(r, score_thr)
    return Diagnosis(r, g, o, s, findings(r, g, o, s))
