"""Diagnose: gradients, NaN/Inf origins, the detection symptom, and findings over the replay."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..inputs.amp import PrecisionChoice
from ..replay.engine import Replay
from ..vocab import Phase
from .checks import Facts
from .findings import Finding, findings
from .gradients import gradients
from .groups import FindingGroup, frame, group
from .nan_trace import trace
from .precision import precision_diag
from .symptom import symptom


@dataclass(kw_only=True)
class Diagnosis(Facts):
    """The replay, its gradients, NaN/Inf origins and symptom, the findings over them (one row
    per hit) and their groups (one per cause). ``run_profile``: the profile the run trained
    with, when known; the others are what-ifs."""

    findings: list[Finding] = field(default_factory=list)
    groups: list[FindingGroup] = field(default_factory=list)
    run_profile: str | None = None


def _quiet(phase: Phase) -> None:
    pass


def diagnose(
    r: Replay,
    score_thr: float | None = None,
    *,
    run_profile: str | None = None,
    precision: PrecisionChoice | None = None,
    on_phase: Callable[[Phase], None] = _quiet,
) -> Diagnosis:
    """Gradients, NaN/Inf origins, the symptom and the findings of one replay. With
    ``run_profile`` (a replayed profile's name), findings are framed as the run's own or the
    what-if's; ``precision`` (the replay's, as chosen) adds the precision diagnosis;
    ``on_phase`` is told when each phase starts."""
    on_phase(Phase.GRADIENTS)
    g = gradients(r)
    on_phase(Phase.TRACE)
    origins = trace(r, g)
    on_phase(Phase.SYMPTOM)
    d = Diagnosis(replay=r, grads=g, origins=origins, symptom=symptom(r, score_thr))
    own = run_profile if run_profile in r.losses else None
    if precision is not None:
        if precision.precision.low:
            on_phase(Phase.PRECISION)
        d.precision = precision_diag(r, own, precision)
    on_phase(Phase.FINDINGS)
    what_ifs = [p for p in r.losses if p != own]
    d.run_profile = own
    d.findings = frame(findings(d), own, what_ifs)
    d.groups = group(d.findings, r.batch.levels)
    return d
