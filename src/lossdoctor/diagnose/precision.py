"""Mixed precision: what the replay in a low precision did that fp32 would not.

Per layer of the heads (and level for the RPN), the low-precision output against the same layer
in fp32 on the same input (overflowed and underflowed values, the largest |value| against the
dtype's range) and the largest |gradient| its low-precision copy carries at scale 1; from those,
the loss scaler's decision at the dump's scale and the largest safe scale; per term, the loss in
the low precision next to an fp32 replay of the same samples.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..inputs.amp import AmpRecord, PrecisionChoice, amp_record
from ..replay.cascade import stage_config
from ..replay.engine import Replay, replay
from ..replay.heads import box_head, rpn_head
from ..replay.mask import mask_head
from ..replay.precision import (
    MIN_LOSS_SCALE,
    RangeCount,
    abs_max,
    finite_max,
    largest_safe_scale,
    overflows_at,
    range_count,
)
from ..vocab import Head, Layer, Precision, Term

__all__ = ["MIN_LOSS_SCALE", "PrecisionDiag", "precision_diag"]

# a term's low-precision loss further than this (relative) from fp32 is a finding
DRIFT_TOLERANCE = 1e-2


@dataclass(frozen=True, kw_only=True)
class LayerRange:
    """One layer's output in the low precision: its head, RPN level (None for the RoI heads,
    which see every level at once), cascade stage, the terms it feeds, the forward's
    :class:`RangeCount` and ``grad_max``, the largest |gradient| of the output at scale 1 under
    the run's profile (nan or inf when non-finite, 0 when it gets none)."""

    head: Head
    level: str | None
    stage: int
    layer: Layer
    terms: tuple[Term, ...]
    forward: RangeCount
    grad_max: float


@dataclass(frozen=True, kw_only=True)
class ScalerVerdict:
    """The loss scaler at this batch: ``scale`` the dump's (None: not recorded); ``grad_max``
    the largest |gradient| of any low-precision tensor of the heads at scale 1, and ``where``
    the tensor it is in; ``safe_scale`` the largest power of two that does not overflow (None:
    none, inf: any); ``overflows`` whether the heads' gradients overflow at ``scale`` (the step
    a GradScaler skips); ``found_inf`` what the run's scaler found at this step, as recorded."""

    scale: float | None
    grad_max: float
    where: str
    safe_scale: float | None
    overflows: bool | None
    found_inf: bool | None

    @property
    def stuck(self) -> bool:
        """Halving the scale once does not clear the overflow: the next steps are skipped too."""
        if not self.overflows:
            return False
        return self.safe_scale is None or self.safe_scale < self.scale / 2


@dataclass(frozen=True, kw_only=True)
class TermDrift:
    """One term of one profile: its loss in the low precision and in fp32 on the same samples."""

    profile: str
    term: Term
    low: float
    fp32: float

    @property
    def relative(self) -> float:
        """|low - fp32| / |fp32|: 0 when both are the same non-finite value, inf when only one
        is non-finite."""
        if not (math.isfinite(self.low) and math.isfinite(self.fp32)):
            same = str(self.low) == str(self.fp32)
            return 0.0 if same else math.inf
        return abs(self.low - self.fp32) / max(abs(self.fp32), torch.finfo(torch.float32).tiny)


@dataclass(kw_only=True)
class PrecisionDiag:
    """The replay's precision (``choice``: which, from where, and the run's own), the dump's AMP
    record, the profile whose gradient the scale analysis takes, and the per-layer, scaler and
    per-term results (empty in fp32)."""

    choice: PrecisionChoice
    amp: AmpRecord
    profile: str | None = None
    layers: list[LayerRange] = field(default_factory=list)
    verdict: ScalerVerdict | None = None
    drift: list[TermDrift] = field(default_factory=list)

    @property
    def precision(self) -> Precision:
        return self.choice.precision

    @property
    def limit(self) -> float:
        return finite_max(self.precision)


@dataclass
class _Probe:
    """One layer's low-precision output (an fp32 copy in the graph) and its fp32 reference."""

    head: Head
    level: str | None
    stage: int
    layer: Layer
    terms: tuple[Term, ...]
    low: Tensor
    ref: Tensor


RPN_TERMS = (Term.RPN_CLS, Term.RPN_BOX)
ROI_TERMS = (Term.ROI_CLS, Term.ROI_BOX)


def _rpn_probes(r: Replay, ref_heads) -> list[_Probe]:
    out = []
    conv = r.heads.rpn_convs[-1]
    for lv, feature in zip(r.rpn.levels, r.features):
        ref = rpn_head(feature.detach(), ref_heads)
        for layer, terms, low, want in (
            (conv, RPN_TERMS, lv.out.hidden, ref.hidden),
            (Layer.RPN_LOGITS, (Term.RPN_CLS,), lv.out.logits, ref.logits),
            (Layer.RPN_DELTAS, (Term.RPN_BOX,), lv.out.deltas, ref.deltas),
        ):
            out.append(_Probe(Head.RPN, lv.name, 0, layer, terms, low, want))
    return out


def _box_probes(r: Replay, ref_heads) -> list[_Probe]:
    out = []
    fcs = r.heads.box_fcs
    for k, st in enumerate(r.roi_stages):
        cfg = r.config if k == 0 else stage_config(r.config, k)
        pooled_reg = None if st.pooled_reg is None else st.pooled_reg.detach()
        ref = box_head(st.pooled.detach(), pooled_reg, ref_heads.stage(k), cfg)
        pairs = [(Layer.BOX_LOGITS, (Term.ROI_CLS,), st.cls_logits, ref.cls),
                 (Layer.BOX_DELTAS, (Term.ROI_BOX,), st.deltas, ref.deltas)]  # fmt: skip
        if fcs:
            pairs[:0] = [(fcs[0], ROI_TERMS, st.hidden1, ref.hidden1)]
            if len(fcs) > 1:
                pairs[1:1] = [(fcs[-1], ROI_TERMS, st.hidden, ref.hidden)]
        out += [_Probe(Head.ROI, None, k, *p) for p in pairs]
    return out


def _mask_probes(r: Replay, ref_heads) -> list[_Probe]:
    if r.mask is None:
        return []
    hidden, logits = mask_head(r.mask.pooled.detach(), ref_heads, r.config.head_norm)
    layers = [*r.heads.mask_convs, Layer.MASK_DECONV, Layer.MASK_LOGITS]
    lows, refs = [*r.mask.hidden, r.mask.all_logits], [*hidden, logits]
    terms = (Term.ROI_MASK,)
    return [_Probe(Head.MASK, None, 0, x, terms, a, b) for x, a, b in zip(layers, lows, refs)]


def _probes(r: Replay) -> list[_Probe]:
    """Every layer output the diagnosis follows, with its fp32 reference (no graph)."""
    ref_heads = dataclasses.replace(r.heads, precision=Precision.FP32)
    with torch.no_grad():
        return [*_rpn_probes(r, ref_heads), *_box_probes(r, ref_heads), *_mask_probes(r, ref_heads)]


def _grads(total: Tensor, tensors: list[Tensor]) -> list[Tensor | None]:
    """d total / d each tensor (None where it does not reach), the graph kept."""
    live = [i for i, t in enumerate(tensors) if t.requires_grad]
    if not total.requires_grad or not live:
        return [None] * len(tensors)
    got = torch.autograd.grad(total, [tensors[i] for i in live], retain_graph=True,
                              allow_unused=True)  # fmt: skip
    out: list[Tensor | None] = [None] * len(tensors)
    for i, g in zip(live, got):
        out[i] = g
    return out


def _worst(named: list[tuple[str, float]]) -> tuple[str, float]:
    """The entry with the largest value, a non-finite one first."""
    bad = [(n, v) for n, v in named if not math.isfinite(v)]
    if bad:
        return bad[0]
    return max(named, key=lambda nv: nv[1], default=("", 0.0))


def _verdict(p: Precision, amp: AmpRecord, named: list[tuple[str, float]]) -> ScalerVerdict:
    where, m = _worst(named)
    scale = amp.loss_scale
    return ScalerVerdict(
        scale=scale,
        grad_max=m,
        where=where,
        safe_scale=largest_safe_scale(m, p),
        overflows=None if scale is None else overflows_at(scale, m, p),
        found_inf=amp.found_inf,
    )


def _drift(r: Replay) -> list[TermDrift]:
    """Each profile's terms replayed in fp32 on the same RoI candidates and seed (so the same
    samples), next to the low-precision ones."""
    heads = dataclasses.replace(r.heads, precision=Precision.FP32)
    batch = dataclasses.replace(r.batch, proposals=[p.detach() for p in r.proposals])
    profiles = [pl.profile for pl in r.losses.values()]
    with torch.no_grad():
        ref = replay(heads, batch, r.config, profiles, seed=r.seed, sample_all=r.sample_all)
    out = []
    for name, pl in r.losses.items():
        want = ref.losses[name].terms
        out += [TermDrift(profile=name, term=t, low=float(v.detach()), fp32=float(want[t]))
                for t, v in pl.terms.items()]  # fmt: skip
    return out


def precision_diag(r: Replay, run_profile: str | None, choice: PrecisionChoice) -> PrecisionDiag:
    """The precision diagnosis of a replay whose heads ran in a low precision (in fp32: only
    what precision it was and why)."""
    p = r.heads.precision
    d = PrecisionDiag(choice=choice, amp=amp_record(r.batch.meta))
    if not p.low:
        return d
    d.profile = run_profile if run_profile in r.losses else next(iter(r.losses))
    probes = _probes(r)
    params = sorted(r.heads.params.items())
    inputs = [*r.features, *(st.pooled for st in r.roi_stages)]
    if r.mask is not None:
        inputs.append(r.mask.pooled)
    tensors = [pr.low for pr in probes] + [t for _, t in params] + inputs
    grads = _grads(r.losses[d.profile].total, tensors)
    out_grads = grads[: len(probes)]
    d.layers = [
        LayerRange(head=pr.head, level=pr.level, stage=pr.stage, layer=pr.layer,
                   terms=pr.terms, forward=range_count(pr.low, pr.ref), grad_max=abs_max(g))
        for pr, g in zip(probes, out_grads)
    ]  # fmt: skip
    named = [(_probe_name(pr), abs_max(g)) for pr, g in zip(probes, out_grads)]
    named += [(n, abs_max(g)) for (n, _), g in zip(params, grads[len(probes) :])]
    feats = grads[len(probes) + len(params) :]
    named += [(f"{lv} features", abs_max(g)) for lv, g in zip(r.batch.levels, feats)]
    named += [("the pooled RoI features", abs_max(g)) for g in feats[len(r.features) :]]
    d.verdict = _verdict(p, d.amp, named)
    d.drift = _drift(r)
    return d


def _probe_name(pr: _Probe) -> str:
    where = pr.level if pr.level is not None else (f"stage {pr.stage}" if pr.stage else "")
    return f"{pr.layer} output" + (f" at {where}" if where else "")
