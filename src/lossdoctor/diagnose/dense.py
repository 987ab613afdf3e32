"""The diagnosis of a dense replay: gradients per level and profile, where a NaN/Inf first
appears, the detections the head makes on the batch, and the one-stage findings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..inputs.dense import DenseConfig
from ..replay.boxes import clip_to_image, decode
from ..replay.dense import (
    DELTA_CLIP,
    DENSE_PARTS,
    DenseLosses,
    DenseReplay,
    ema_update,
    linear_decode,
)
from ..replay.nms import mmcv_batched_nms, torchvision_batched_nms
from ..vocab import (
    DenseCoder,
    DenseLayer,
    DenseNormalizer,
    Framework,
    Head,
    Part,
    Scope,
    Severity,
    Stage,
    Term,
    term_of,
)
from .finding import Finding
from .findings import Rule, to_finding

# the prior probability every framework initializes the classifier bias to (-log((1 - p) / p))
PRIOR_PROB = 0.01
PRIOR_BIAS = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
# a classifier whose mean prior is this many times the usual one starts with a huge focal loss
PRIOR_FACTOR = 5.0
# Detectron2's EMA normalizer "lags" when it is off the batch's own count by more than this factor
EMA_LAG = 2.0
# the box term's centerness normalizer is "near 0" below this (MMDetection floors it at 1e-6)
CTR_SMALL = 1.0


@dataclass(kw_only=True)
class LevelGrads:
    """One (profile, level): the L2 norms of the profile's total loss gradient."""

    feature: float
    logits_pos: float
    logits_neg: float
    deltas: float


@dataclass(kw_only=True)
class DenseSymptom:
    score_thr: float
    detections: list[int]
    max_fg_score: list[float]


@dataclass(kw_only=True)
class DenseDiagnosis:
    replay: DenseReplay
    own: str  # the run's own profile
    grads: dict[str, list[LevelGrads]]
    # profile → canonical parameter → its gradient's norm (None: no gradient, out of the graph)
    param_norms: dict[str, dict[str, float | None]]
    # profile → term → canonical parameter → the norm of that term's gradient
    term_norms: dict[str, dict[Part, dict[str, float | None]]]
    origins: dict[str, dict[str, str]]  # profile → level → the first stage a NaN/Inf shows in
    symptom: DenseSymptom
    findings: list[Finding] = field(default_factory=list)


def _norm(t: Tensor | None) -> float:
    return 0.0 if t is None or t.numel() == 0 else float(t.detach().double().norm())


def _sum(grads) -> Tensor | None:
    """The sum of the terms' gradients of one tensor (None where no term reaches it)."""
    found = [g for g in grads if g is not None]
    return sum(found[1:], found[0]) if found else None


def _params(r: DenseReplay) -> dict[str, Tensor]:
    return dict(r.weights.params) | {f"scale{i}": s for i, s in enumerate(r.weights.scales)}


def profile_grads(r: DenseReplay, losses: DenseLosses):
    """One backward per term (each reaches its own tower only) → (per-level gradient norms of
    the profile's total, its per-parameter norms, and each term's per-parameter norms). The
    total's gradients are the sums of the terms'."""
    outs, params = [lv.out for lv in r.levels], _params(r)
    wrt = [*r.features, *(o.logits for o in outs), *(o.deltas for o in outs), *params.values()]
    by_part = {}
    for part in DENSE_PARTS if r.weights.has_ctr else DENSE_PARTS[:2]:
        term = losses.term(part)
        by_part[part] = (
            torch.autograd.grad(term, wrt, retain_graph=True, allow_unused=True)
            if term.requires_grad else [None] * len(wrt)
        )  # fmt: skip
    grads = [_sum(gs) for gs in zip(*by_part.values())]
    n = len(outs)
    levels = [
        LevelGrads(
            feature=_norm(f),
            logits_pos=_norm(None if lg is None else lg[lv.positive]),
            logits_neg=_norm(None if lg is None else lg[lv.negative]),
            deltas=_norm(d),
        )
        for lv, f, lg, d in zip(r.levels, grads[:n], grads[n : 2 * n], grads[2 * n : 3 * n])
    ]
    total = {name: (None if g is None else _norm(g)) for name, g in zip(params, grads[3 * n :])}
    terms = {
        part: {name: (None if g is None else _norm(g)) for name, g in zip(params, gs[3 * n :])}
        for part, gs in by_part.items()
    }
    return levels, total, terms


def _first_nonfinite(r: DenseReplay, losses: DenseLosses, k: int) -> str:
    """The first stage at which level ``k`` holds a NaN/Inf (empty when it has none)."""
    lv, ll = r.levels[k], losses.levels[k]
    out = [lv.out.logits, lv.out.deltas] + ([lv.out.ctr] if lv.out.ctr is not None else [])
    steps = [
        (Stage.INPUT, [r.features[k]]),
        (Stage.WEIGHTS, list(r.weights.params.values()) + list(r.weights.scales)),
        (Stage.OUTPUTS, out),
        (Stage.PER_SAMPLE, [lv.focal, lv.box, lv.ctr_loss]),
        (Stage.LEVEL_LOSS, list(ll.terms.values())),
    ]
    for stage, ts in steps:
        if any(not bool(torch.isfinite(t.detach()).all()) for t in ts):
            if stage is Stage.LEVEL_LOSS and any(d == 0 for d in ll.avg_factor.values()):
                return str(Stage.NORMALIZER)
            return str(stage)
    return ""


def dense_symptom(r: DenseReplay, score_thr: float | None = None) -> DenseSymptom:
    """Each image's detections after the framework's post-processing (score threshold, top-k
    per level, decode, clip, class-wise NMS, the per-image cap)."""
    t = r.config.test
    thr = t.score_thr if score_thr is None else score_thr
    dets, best = [], []
    with torch.no_grad():
        for i, size in enumerate(r.batch.image_sizes):
            boxes, scores, labels = [], [], []
            top = 0.0
            for lv in r.levels:
                s = torch.sigmoid(lv.out.logits[i].detach())
                if lv.out.ctr is not None:  # FCOS/ATSS score: sqrt(cls x centerness)
                    s = torch.sqrt(s * torch.sigmoid(lv.out.ctr[i].detach())[:, None])
                top = max(top, float(s.max()) if s.numel() else 0.0)
                flat = s.flatten()
                keep = (flat > thr).nonzero().flatten()
                keep = keep[flat[keep].topk(min(t.topk, keep.numel())).indices]
                k = s.shape[1]
                anchors, idx = lv.anchors[keep // k], keep // k
                pred = lv.out.deltas[i, idx].detach()
                b = _decode(r.config, pred, anchors)
                boxes.append(clip_to_image(b, size))
                scores.append(flat[keep])
                labels.append(keep % k)
            b, s, lab = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            nms = (
                mmcv_batched_nms
                if r.config.framework is Framework.MMDET
                else torchvision_batched_nms
            )
            kept = nms(b, s, lab, t.nms_iou)[: t.detections_per_img]
            dets.append(int(kept.numel()))
            best.append(top)
    return DenseSymptom(score_thr=thr, detections=dets, max_fg_score=best)


def _decode(config: DenseConfig, pred: Tensor, anchors: Tensor) -> Tensor:
    if config.coder is DenseCoder.DISTANCES:
        return linear_decode(pred, anchors, config.distances_in_strides)
    return decode(pred, anchors, config.delta_weights, DELTA_CLIP, config.delta_clip_both)


# ---- findings ----------------------------------------------------------------------------------


def _pos(r: DenseReplay) -> Tensor:
    return r.positives


def no_positives(d: DenseDiagnosis) -> list[Finding]:
    """Images (or the whole batch) without a positive: what each profile divides by then."""
    r, pos = d.replay, _pos(d.replay)
    out = []
    per_image = pos.sum(1)
    if int(per_image.sum()) == 0:
        divs = {name: ls.levels[0].avg_factor[Part.CLS] for name, ls in r.losses.items()}
        shown = ", ".join(f"{n}: {_num(v)}" for n, v in divs.items())
        out.append(Finding(
            message=f"no positive anchor in the whole batch: the classification term is all "
            f"negatives, divided by {shown}",
            head=Head.DENSE, term=Term.DENSE_CLS,
            evidence={"images": r.batch.num_images, "divided_by": divs},
        ))  # fmt: skip
        return out
    for i in (per_image == 0).nonzero().flatten().tolist():
        out.append(Finding(
            message=f"image {i} has no positive anchor (GT boxes: {r.gt.boxes[i].shape[0]}); "
            "its negatives still enter the classification term",
            head=Head.DENSE, image=i, term=Term.DENSE_CLS, minor=True,
            evidence={"gt": r.gt.boxes[i].shape[0]}, cause="image-without-positives",
        ))  # fmt: skip
    return out


def empty_level_nan(d: DenseDiagnosis) -> list[Finding]:
    """A per-level normalizer on a level without positives: 0/0."""
    out = []
    pos = _pos(d.replay).sum(0)
    for name, losses in d.replay.losses.items():
        for k, ll in enumerate(losses.levels):
            zero = [p for p, v in ll.avg_factor.items() if v == 0]
            if not zero:
                continue
            out.append(Finding(
                message=f"level {ll.level} has {int(pos[k])} positives and profile {name} "
                "divides its terms by them: 0/0 = NaN (box), x/0 = Inf (cls)",
                head=Head.DENSE, level=ll.level, profile=name, term=term_of(Head.DENSE, zero[0]),
                evidence={"pos": int(pos[k]), "terms": [str(term_of(Head.DENSE, p)) for p in zero]},
                cause="level-normalizer-zero",
            ))  # fmt: skip
    return out


def ctr_normalizer_small(d: DenseDiagnosis) -> list[Finding]:
    """The box term divided by a centerness sum near 0 (few, off-centre positives)."""
    r = d.replay
    uses = [n for n, ls in r.losses.items() if ls.profile.box.normalizer is DenseNormalizer.CTR_SUM]
    total, pos = float(r.ctr_sums.sum()), int(_pos(r).sum())
    if not uses or pos == 0 or total >= CTR_SMALL:
        return []
    return [Finding(
        message=f"the box term is divided by the positives' centerness targets summed: "
        f"{total:.3g} over {pos} positives; each positive's box loss is weighted x{1 / total:.3g}",
        head=Head.DENSE, term=Term.DENSE_BOX, profile=uses[0],
        evidence={"ctr_sum": total, "pos": pos},
    )]  # fmt: skip


def prior_bias(d: DenseDiagnosis) -> list[Finding]:
    """The classifier's bias gives a prior far above the focal-loss init (0.01)."""
    w = d.replay.weights
    bias = w.tensor(DenseLayer.LOGITS, "bias")
    if bias is None or not bool(torch.isfinite(bias).all()):
        return []
    prior = float(torch.sigmoid(bias.detach()).mean())
    if prior <= PRIOR_FACTOR * PRIOR_PROB:
        return []
    r = d.replay
    own = r.losses[d.own]
    neg = float(sum((lv.focal * lv.negative).sum() for lv in r.levels))
    share = neg / float(sum(lv.focal.sum() for lv in r.levels) or 1.0)
    return [Finding(
        message=f"the classifier's mean prior is {prior:.3g} (bias {float(bias.mean()):.3g}); "
        f"focal-loss heads start at {PRIOR_PROB} (bias {PRIOR_BIAS:.3g}). "
        f"Negatives make {share:.0%} of the classification term over {w.num_classes} classes "
        f"(= {_num(float(own.term(Part.CLS)))})",
        head=Head.DENSE, term=Term.DENSE_CLS,
        evidence={"prior": prior, "expected": PRIOR_PROB, "classes": w.num_classes,
                  "neg_share": share},
    )]  # fmt: skip


def ema_lag(d: DenseDiagnosis) -> list[Finding]:
    """Detectron2's running normalizer far from this batch's own positive count."""
    r = d.replay
    uses = [n for n, ls in r.losses.items() if ls.profile.cls.normalizer is DenseNormalizer.EMA]
    if not uses:
        return []
    pos = float(_pos(r).sum())
    ema = ema_update(r.ema_before, pos, r.config.ema_momentum)
    own = max(pos, 1.0)
    factor = max(ema / own, own / ema)
    if factor <= EMA_LAG:
        return []
    known = "recorded" if r.ema_before is not None else "assumed 100 (the first step)"
    return [Finding(
        message=f"the loss is divided by the running normalizer {ema:.4g} (before: {known}), "
        f"while this batch has {int(pos)} positives: every term is x{own / ema:.3g} of what "
        "the batch's own count gives",
        head=Head.DENSE, term=Term.DENSE_CLS, profile=uses[0],
        evidence={"ema": ema, "ema_before": r.ema_before, "pos": int(pos), "factor": factor},
    )]  # fmt: skip


# normalizers that count the rank's own batch (they change with the number of GPUs)
BATCH_COUNTS = (DenseNormalizer.POS, DenseNormalizer.POS_PER_IMAGE, DenseNormalizer.MMDET_PSEUDO,
                DenseNormalizer.CTR_SUM, DenseNormalizer.EMA)  # fmt: skip


def world_size_dependence(d: DenseDiagnosis) -> list[Finding]:
    """A dump of a multi-rank run: the run's normalizer either counts each rank's own batch (the
    loss scale changes with the GPU count) or averages the count over ranks, which one dump
    alone cannot give."""
    r = d.replay
    world = r.batch.meta.get("world_size")
    if not isinstance(world, int) or isinstance(world, bool) or world < 2:
        return []
    terms = {term_of(Head.DENSE, part): spec
             for part, spec in r.losses[d.own].profile.terms.items()
             if part is not Part.CTR or r.weights.has_ctr}  # fmt: skip
    local = [t for t, s in terms.items() if s.normalizer in BATCH_COUNTS and not s.reduced]
    reduced = [t for t, s in terms.items() if s.reduced]
    out = []
    if local:
        out.append(Finding(
            message=f"world size {world}: {d.own} divides {', '.join(local)} by this rank's own "
            "count, so a sample's weight in the averaged gradient changes with the number of "
            "GPUs and with how the positives fall across ranks",
            head=Head.DENSE, profile=d.own, term=local[0],
            evidence={"world_size": world, "terms": [str(t) for t in local]},
        ))  # fmt: skip
    if reduced and r.world is None:
        out.append(Finding(
            message=f"world size {world}: {d.own} divides {', '.join(reduced)} by the count "
            "averaged over the ranks; this dump alone gives its own count (inspect the step "
            "folder of every rank's capture for the step's exact normalizer)",
            head=Head.DENSE, profile=d.own, term=reduced[0], minor=True,
            evidence={"world_size": world, "terms": [str(t) for t in reduced]},
        ))  # fmt: skip
    return out


def nonfinite_loss(d: DenseDiagnosis) -> list[Finding]:
    out = []
    for name, levels in d.origins.items():
        for level, stage in levels.items():
            if stage and stage != Stage.NORMALIZER:  # a zero normalizer has its own rule
                out.append(Finding(
                    message=f"level {level} of profile {name}: the first NaN/Inf is at {stage}",
                    head=Head.DENSE, level=level, profile=name,
                    evidence={"stage": stage}, cause=stage,
                ))  # fmt: skip
    return out


def _num(v: float) -> str:
    return f"{v:.4g}"


W, E, I = Severity.WARNING, Severity.ERROR, Severity.INFO  # noqa: E741
DENSE_RULES: tuple[Rule, ...] = (
    Rule(
        code="dense-nonfinite",
        evidence=("stage",),
        severity=E,
        summary="a NaN/Inf in the dense head's losses, traced to its first stage",
        fix="fix the stage named: the input features (upstream), the weights (an earlier step), "
        "the outputs (overflow), the per-sample losses (targets) or the normalizer (0/0)",
        check=nonfinite_loss,
    ),
    Rule(
        code="dense-level-normalizer-zero",
        evidence=("pos", "terms"),
        severity=E,
        summary="a level without positives divided by its own positive count (0/0 = NaN)",
        fix="divide every level by the batch's positives with a floor of 1 (the fixed profile; "
        "torchvision's max(1, num_fg), MMDetection's max(reduce_mean(num_pos), 1.0))",
        check=empty_level_nan,
    ),
    Rule(
        code="dense-no-positives",
        evidence=("images", "divided_by", "gt"),
        severity=W,
        minor=I,
        summary="a batch (warning) or an image (info) without a positive anchor",
        fix="check the GT of these images (empty, ignored, out of the image) and the anchor "
        "sizes against the GT sizes; every framework floors the normalizer at 1, so the "
        "classification loss is the negatives' sum",
        check=no_positives,
    ),
    Rule(
        code="dense-ctr-normalizer-small",
        evidence=("ctr_sum", "pos"),
        severity=W,
        summary="the box term divided by a centerness sum near 0",
        fix="few positives, all off-centre: check center_sampling and the regress ranges against "
        "the GT sizes; a floor of 1 on the centerness sum (ATSS's clamp) bounds the weight",
        check=ctr_normalizer_small,
    ),
    Rule(
        code="dense-prior-bias",
        evidence=("prior", "expected", "classes", "neg_share"),
        severity=W,
        summary="the classifier's bias init is far from the focal-loss prior (0.01)",
        fix="initialize the classification bias to -log((1 - 0.01) / 0.01) = -4.6 (prior_prob "
        "0.01, bias_prob in MMDetection's init_cfg); with many classes, negatives dominate "
        "the loss otherwise",
        check=prior_bias,
    ),
    Rule(
        code="dense-world-size",
        severity=W,
        minor=I,
        evidence=("world_size", "terms"),
        summary="a multi-rank run's dump: a per-rank normalizer (warning: results change with "
        "the GPU count) or a reduced one replayed from one rank (info)",
        fix="divide by the positives averaged over ranks (reduce_mean(num_pos), floored at 1: "
        "profile fixed; MMDetection FCOS/ATSS do); for a reduced one, capture every rank at the "
        "step and inspect the step folder",
        check=world_size_dependence,
    ),
    Rule(
        code="dense-ema-normalizer-lag",
        evidence=("ema", "ema_before", "pos", "factor"),
        severity=W,
        summary="Detectron2's running (EMA) normalizer is more than 2x off the batch's positives",
        fix="expected after a jump in positives per batch (new data, a crop change); it catches "
        "up over ~10 steps (momentum 0.9). If it persists, compare with the fixed profile",
        check=ema_lag,
    ),
)


def dense_findings(d: DenseDiagnosis) -> list[Finding]:
    """Every rule's findings; one found only under the what-if profile is its problem (info)."""
    out = []
    for rule in DENSE_RULES:
        for f in (to_finding(rule, hit) for hit in rule.check(d)):
            f.scope = Scope.RUN if f.profile in (None, d.own) else Scope.WHAT_IF
            if f.scope is Scope.WHAT_IF:
                f.severity = Severity.INFO
                f.note = f"only under the what-if profile {f.profile}"
            out.append(f)
    return sorted(out, key=lambda f: f.severity.rank)


def diagnose_dense(r: DenseReplay, own: str, score_thr: float | None = None) -> DenseDiagnosis:
    grads, params, terms, origins = {}, {}, {}, {}
    for name, losses in r.losses.items():
        grads[name], params[name], terms[name] = profile_grads(r, losses)
        origins[name] = {lv.name: _first_nonfinite(r, losses, k) for k, lv in enumerate(r.levels)}
    d = DenseDiagnosis(replay=r, own=own, grads=grads, param_norms=params, term_norms=terms,
                       origins=origins, symptom=dense_symptom(r, score_thr))  # fmt: skip
    d.findings = dense_findings(d)
    return d
