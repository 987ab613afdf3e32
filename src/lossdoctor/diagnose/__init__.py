"""Diagnose: gradients, NaN/Inf origins, the detection symptom, and findings over the replay."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..replay.engine import Replay
from .checks import Facts
from .findings import Finding, findings
from .gradients import gradients
from .nan_trace import trace
from .symptom import symptom


@dataclass(kw_only=True)
class Diagnosis(Facts):
    """The replay, its gradients, NaN/Inf origins and symptom, and the findings over them."""

    findings: list[Finding] = field(default_factory=list)


def diagnose(r: Replay, score_thr: float | None = None) -> Diagnosis:
    """Gradients, NaN/Inf origins, the symptom and the findings of one replay."""
    g = gradients(r)
    d = Diagnosis(replay=r, grads=g, origins=trace(r, g), symptom=symptom(r, score_thr))
    d.findings = findings(d)
    return d
