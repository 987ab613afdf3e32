"""Checks of a replay in a low precision (fp16, bf16): overflow in the forward, the loss
scaler's decision, a collapsed scale, and losses that drift from fp32. A precision other than
the run's own is a what-if: its findings are info."""

from __future__ import annotations

import math

from ...replay.precision import scale_text
from ..finding import Finding
from ..precision import DRIFT_TOLERANCE, MIN_LOSS_SCALE, LayerRange, PrecisionDiag
from .base import Facts


def _low(f: Facts) -> PrecisionDiag | None:
    p = f.precision
    return p if p is not None and p.precision.low else None


def _what_if(p: PrecisionDiag) -> str:
    """The message prefix of a what-if precision's finding (none for the run's own)."""
    return "" if p.choice.is_run else f"what-if {p.precision}: "


def _where(x: LayerRange) -> str:
    if x.level is not None:
        return f" at {x.level}"
    return f" (cascade stage {x.stage})" if x.stage else ""


def forward_overflow(f: Facts) -> list[Finding]:
    """The first layer of a head (at one RPN level, or one cascade stage) whose low-precision
    output overflows where fp32's is finite, with the layers after it that overflow too."""
    p = _low(f)
    if p is None:
        return []
    chains: dict[tuple, list[LayerRange]] = {}
    for x in p.layers:
        if x.forward.overflow:
            chains.setdefault((x.head, x.level, x.stage), []).append(x)
    return [_overflow_finding(p, xs) for xs in chains.values()]


def _overflow_finding(p: PrecisionDiag, xs: list[LayerRange]) -> Finding:
    x, after = xs[0], xs[1:]
    terms = list(dict.fromkeys(t for y in xs for t in y.terms))
    then = f"; after it {', '.join(y.layer for y in after)} overflow too" if after else ""
    msg = (
        f"{_what_if(p)}{x.layer} output{_where(x)}: {x.forward.overflow} of "
        f"{x.forward.numel} values overflow {p.precision} (fp32 reaches "
        f"{x.forward.max_abs:.4g}; {p.precision} holds {p.limit:g}){then}; feeding "
        f"{', '.join(terms)}"
    )
    ev = {"layer": x.layer, "overflowed": x.forward.overflow, "values": x.forward.numel,
          "max_abs": x.forward.max_abs, "limit": p.limit, "terms": terms,
          "after": [y.layer for y in after], "stage": x.stage}  # fmt: skip
    term = terms[0] if len(terms) == 1 else None
    return Finding(message=msg, head=x.head, level=x.level, term=term, evidence=ev,
                   minor=not p.choice.is_run)  # fmt: skip


def scale_overflow(f: Facts) -> list[Finding]:
    """The loss scale at which the heads' gradients overflow (GradScaler skips the step), and a
    step the run's scaler skipped for an overflow outside the heads."""
    p = _low(f)
    v = None if p is None else p.verdict
    if v is None or v.scale is None:
        return []
    ev = {"loss_scale": v.scale, "grad_max": v.grad_max, "in": v.where,
          "safe_scale": v.safe_scale, "found_inf": v.found_inf,
          "skipped": p.amp.skipped}  # fmt: skip
    if not v.overflows:
        if not v.found_inf:
            return []
        msg = (
            f"the run's GradScaler found a non-finite gradient at this step (loss scale "
            f"{v.scale:g}), but the heads' gradients stay finite at that scale (largest "
            f"|gradient| {v.grad_max:.3g}, safe up to {scale_text(v.safe_scale)}): the overflow is "
            "outside the heads (backbone or neck)"
        )
        fix = ("look for the overflow in the backbone and neck: run a step with "
               "torch.autograd.detect_anomaly, or keep their layers in fp32")  # fmt: skip
        return [Finding(message=msg, evidence=ev, fix=fix)]
    if v.safe_scale is None:
        tail = "their gradient is non-finite at scale 1 already: no scale is safe, every step "
        tail += "is skipped and the scale falls until it collapses"
    elif v.stuck:
        halvings = round(math.log2(v.scale / v.safe_scale))
        tail = (f"the largest safe scale is {scale_text(v.safe_scale)}: the scaler needs "
                f"{halvings} skipped steps in a row to get there")  # fmt: skip
    else:
        tail = (f"the largest safe scale is {scale_text(v.safe_scale)}: a one-off, the scaler's "
                "halving clears it")  # fmt: skip
    msg = (
        f"{_what_if(p)}at loss scale {v.scale:g} the heads' gradients overflow {p.precision} "
        f"(largest |gradient| {v.grad_max:.3g} in {v.where} at scale 1): GradScaler skips this "
        f"step; {tail}"
    )
    one_off = v.safe_scale is not None and not v.stuck
    return [Finding(message=msg, evidence=ev, cause="the scaled gradient overflows",
                    minor=one_off or not p.choice.is_run)]  # fmt: skip


def scale_collapsed(f: Facts) -> list[Finding]:
    """A recorded loss scale below MIN_LOSS_SCALE: the scale falls only on skipped steps, so
    the run has skipped many, and its gradients are scaled down into underflow."""
    p = _low(f)
    scale = None if p is None else p.amp.loss_scale
    if scale is None or scale >= MIN_LOSS_SCALE:
        return []
    v = p.verdict
    skipped = p.amp.skipped
    msg = (
        f"the loss scale has collapsed to {scale:g} (below {MIN_LOSS_SCALE:g})"
        + (f" after {skipped} skipped steps" if skipped else "")
        + ": the gradients are scaled down, their small values underflow to 0 in "
        f"{p.precision}, and the steps that overflow are skipped"
    )
    if v is not None and v.safe_scale is not None and v.safe_scale >= MIN_LOSS_SCALE:
        msg += f"; on this batch the heads take scales up to {scale_text(v.safe_scale)}"
    ev = {"loss_scale": scale, "floor": MIN_LOSS_SCALE, "skipped": skipped,
          "safe_scale": None if v is None else v.safe_scale}  # fmt: skip
    return [Finding(message=msg, evidence=ev, minor=not p.choice.is_run)]


def loss_drift(f: Facts) -> list[Finding]:
    """A term whose low-precision loss is further than DRIFT_TOLERANCE from fp32's."""
    p = _low(f)
    if p is None:
        return []
    out = []
    for d in p.drift:
        if d.relative <= DRIFT_TOLERANCE:
            continue
        apart = f"{d.relative:.2%} apart" if math.isfinite(d.relative) else "non-finite in one"
        msg = (
            f"{d.profile}: {_what_if(p)}{d.term} is {d.low:.6g} in {p.precision} and "
            f"{d.fp32:.6g} in fp32 on the same samples ({apart})"
        )
        ev = {"low": d.low, "fp32": d.fp32, "relative": d.relative,
              "tolerance": DRIFT_TOLERANCE}  # fmt: skip
        out.append(Finding(message=msg, head=d.term.head, profile=d.profile, term=d.term,
                           evidence=ev, minor=not p.choice.is_run))  # fmt: skip
    return out
