"""What a dump records of mixed precision: the autocast dtype its forward ran in and the
GradScaler's state at that step (``meta["amp"]``), and the precision a replay takes from them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..vocab import PRECISION_OF_DTYPE, Precision, PrecisionSource

# meta["amp"] keys: what each must be
AMP_KEYS = ("dtype", "loss_scale", "growth_tracker", "skipped", "found_inf")


def precision_named(value) -> Precision | None:
    """``fp16``, ``float16``, ``torch.float16``, ``half`` ... → Precision; None if none."""
    if not isinstance(value, str):
        return None
    text = value.removeprefix("torch.").lower()
    return PRECISION_OF_DTYPE.get(text) or next((p for p in Precision if p == text), None)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _scale(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf


AMP_CHECKS = {
    "dtype": (lambda v: precision_named(v) is not None, "fp32, fp16, bf16 or a torch dtype name"),
    "loss_scale": (_scale, "a finite number >= 0 (the GradScaler's scale at this step)"),
    "growth_tracker": (_count, "an integer >= 0 (steps since the scale last changed)"),
    "skipped": (_count, "an integer >= 0 (steps the scaler skipped so far)"),
    "found_inf": (lambda v: isinstance(v, bool), "true or false"),
}


def amp_problem(value) -> tuple[str, str, object] | None:
    """The first key of a ``meta["amp"]`` record that breaks the schema: (key, expected,
    found); None when it is sound."""
    if not isinstance(value, dict):
        return "", "a dict with " + ", ".join(AMP_KEYS), value
    for key, (ok, expected) in AMP_CHECKS.items():
        if value.get(key) is not None and not ok(value[key]):
            return f".{key}", expected, value[key]
    return None


@dataclass(frozen=True, kw_only=True)
class AmpRecord:
    """The dump's mixed precision: ``dtype`` the autocast type of its forward (None: not
    recorded), ``loss_scale`` the GradScaler's scale the step's gradients carry,
    ``growth_tracker`` its steps since the scale last changed, ``skipped`` the steps it skipped
    so far (as the capture counted them), ``found_inf`` whether the scaler found a non-finite
    gradient at this step (the step it skips)."""

    dtype: Precision | None = None
    loss_scale: float | None = None
    growth_tracker: int | None = None
    skipped: int | None = None
    found_inf: bool | None = None


def amp_record(meta: dict) -> AmpRecord:
    """The record of a validated meta; older captures' ``autocast`` and ``loss_scale`` keys
    (and the loss scale the gradient norms were divided by) stand in for missing fields."""
    amp = meta.get("amp") or {}
    norms = meta.get("grad_norm") if isinstance(meta.get("grad_norm"), dict) else {}
    scale = next((v for v in (amp.get("loss_scale"), meta.get("loss_scale"),
                              norms.get("loss_scale")) if _scale(v)), None)  # fmt: skip
    return AmpRecord(
        dtype=precision_named(amp.get("dtype")) or precision_named(meta.get("autocast")),
        loss_scale=None if scale is None else float(scale),
        growth_tracker=amp.get("growth_tracker"),
        skipped=amp.get("skipped"),
        found_inf=amp.get("found_inf"),
    )


@dataclass(frozen=True, kw_only=True)
class PrecisionChoice:
    """The precision a replay runs in, where it came from, and the run's own (what the dump
    records, else fp32): a replay in another precision is a what-if."""

    precision: Precision
    source: PrecisionSource
    run: Precision

    @property
    def is_run(self) -> bool:
        return self.precision is self.run


def _recorded(amp: AmpRecord, feature_dtype: str) -> tuple[Precision, PrecisionSource]:
    if amp.dtype is not None:
        return amp.dtype, PrecisionSource.DUMP
    dumped = precision_named(feature_dtype)
    if dumped is not None and dumped.low:
        return dumped, PrecisionSource.FEATURES
    return Precision.FP32, PrecisionSource.DEFAULT


def run_precision(given: Precision | None, amp: AmpRecord, feature_dtype: str) -> PrecisionChoice:
    """The precision to replay in: ``given``, else the dump's autocast dtype, else the low
    precision its features were dumped in, else fp32."""
    run, source = _recorded(amp, feature_dtype)
    if given is None:
        return PrecisionChoice(precision=run, source=source, run=run)
    return PrecisionChoice(precision=given, source=PrecisionSource.GIVEN, run=run)
