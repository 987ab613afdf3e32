"""Train the tiny detector under a loss profile, computing losses with lossdoctor's replay code."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..inputs.batch import Batch
from ..inputs.profiles import LossProfile
from ..replay.engine import replay
from .data import batch_of, batches
from .model import STRIDES, TinyDetector, live_heads, toy_config, toy_config_table

LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
WARMUP = 50


@dataclass
class History:
    profile: str
    seed: int
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    detections: list[tuple[int, int, float]] = field(
        default_factory=list
    )  # (step, held-out detections, recall)
    broke_at: int | None = None  # first step with a non-finite loss
    captured: list = field(default_factory=list)  # capture folders written, in order


def make_batch(model: TinyDetector, images, sizes, boxes, labels, meta=None) -> Batch:
    """A replay Batch whose features keep their graph to the backbone."""
    return batch_of(model.features(images), images, sizes, boxes, labels, STRIDES, meta)


def held_out(seed: int = 10_000, size: int = 8):
    """A fixed evaluation batch (never trained on)."""
    return next(batches(seed, size))


def evaluate(model: TinyDetector, data) -> tuple[int, float]:
    """(detections above the score threshold, recall: GTs found by a same-class detection at
    IoU >= 0.5)."""
    from ..diagnose.symptom import symptom
    from ..inputs.profiles import fixed
    from ..replay.boxes import box_iou

    images, sizes, boxes, labels = data
    with torch.no_grad():
        b = make_batch(model, images, sizes, boxes, labels)
    s = symptom(replay(live_heads(model), b, toy_config(), [fixed()]))
    found = total = 0
    for gt, lab, db, dl in zip(boxes, labels, s.boxes, s.labels):
        total += gt.shape[0]
        if gt.shape[0] and db.shape[0]:
            iou = box_iou(gt, db) * (lab[:, None] == dl[None, :])
            found += int((iou >= 0.5).any(1).sum())
    return sum(s.detections), found / max(total, 1)


@dataclass(kw_only=True)
class _Run:
    """One training run's state."""

    profile: LossProfile
    seed: int
    model: TinyDetector
    opt: torch.optim.Optimizer
    hist: History
    capture: object | None
    log: object | None


def _step(run: _Run, step: int, data) -> float:
    """One step up to backward (and the capture hook); returns the loss value."""
    for g in run.opt.param_groups:
        g["lr"] = LR * min(1.0, (step + 1) / WARMUP)
    images, sizes, boxes, labels = data
    b = make_batch(run.model, images, sizes, boxes, labels)
    r = replay(live_heads(run.model), b, toy_config(), [run.profile], seed=step)
    loss = r.losses[run.profile.name].total
    run.opt.zero_grad()
    loss.backward()
    value = float(loss.detach())
    run.hist.steps.append(step)
    run.hist.loss.append(value)
    if run.capture is not None:
        meta = {"sample_seed": step, "profile": run.profile.name, "train_seed": run.seed,
                "config": toy_config_table()}  # fmt: skip
        run.capture.check(
            step,
            loss,
            features=b.features,
            image_sizes=sizes,
            gt_boxes=boxes,
            gt_labels=labels,
            strides=list(STRIDES),
            meta=meta,
        )
    return value


def _evaluate(run: _Run, step: int, evaluation, value: float) -> None:
    run.model.eval()
    run.hist.detections.append((step, *evaluate(run.model, evaluation)))
    run.model.train()
    if run.log:
        _, dets, rec = run.hist.detections[-1]
        run.log(
            f"{run.profile.name} seed {run.seed} step {step}: loss {value:.4g}, "
            f"held-out detections {dets}, recall {rec:.2f}"
        )


def _setup(profile, seed, capture_dir, capture_args, capture_norm, log) -> _Run:
    from ..capture import Capture

    torch.manual_seed(seed)
    model = TinyDetector()
    capture = None
    if capture_dir is not None:
        capture = Capture(capture_dir, model, extra_args=capture_args, grad_norm_above=capture_norm)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    hist = History(profile.name, seed)
    return _Run(
        profile=profile, seed=seed, model=model, opt=opt, hist=hist, capture=capture, log=log
    )


def train(
    profile: LossProfile,
    steps: int,
    seed: int,
    *,
    batch_size: int = 4,
    stop_on_nonfinite: bool = True,
    capture_dir=None,
    capture_args: str = "",
    capture_norm: float | None = None,
    eval_every: int = 50,
    log=None,
) -> tuple[TinyDetector, History]:
    """SGD (lr 0.01, momentum 0.9, wd 1e-4, linear warmup) on synthetic shapes.

    ``stop_on_nonfinite`` stops at the first non-finite loss, as torchvision's reference engine
    ("Loss is nan, stopping training") and Detectron2 (FloatingPointError) do; otherwise the step
    is taken with whatever gradient backward produced, as a loop without a check would.
    ``capture_dir``: a :class:`~lossdoctor.capture.Capture` writes the first non-finite step there.
    """
    run = _setup(profile, seed, capture_dir, capture_args, capture_norm, log)
    model, opt, capture = run.model, run.opt, run.capture
    evaluation, stream = held_out(), batches(seed, batch_size)
    for step in range(steps):
        value = _step(run, step, next(stream))
        if not math.isfinite(value) and run.hist.broke_at is None:
            run.hist.broke_at = step
            if log:
                log(f"{profile.name} seed {seed}: non-finite loss at step {step}")
            if stop_on_nonfinite:
                break
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            _evaluate(run, step + 1, evaluation, value)
    if capture is not None:
        run.hist.captured = list(capture.written)
    if not run.hist.detections or run.hist.detections[-1][0] != len(run.hist.steps):
        model.eval()
        run.hist.detections.append((len(run.hist.steps), *evaluate(model, evaluation)))
    return model, run.hist
