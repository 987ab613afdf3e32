"""Train the tiny detector under a loss profile, computing losses with lossdoctor's replay code."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..inputs.batch import Batch
from ..inputs.profiles import LossProfile
from ..replay.engine import replay
from .data import batches
from .model import STRIDES, TinyDetector, live_heads, toy_config

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
    feats = model.features(images)
    return Batch(
        features=feats,
        image_sizes=list(sizes),
        pad_size=tuple(images.shape[-2:]),
        strides=list(STRIDES),
        gt_boxes=list(boxes),
        gt_labels=list(labels),
        gt_ignore=[torch.zeros(b.shape[0], dtype=torch.bool) for b in boxes],
        meta=dict(meta or {}),
    )


def held_out(seed: int = 10_000, size: int = 8):
    """A fixed evaluation batch (never trained on)."""
    return next(batches(seed, size))


def evaluate(model: TinyDetector, data) -> tuple[int, float]:
    """(detections above the score threshold, recall: GTs found by a same-class detection at IoU >= 0.5)."""
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
    ("Loss is nan, stopping training") and Detectron2 (FloatingPointError) do; otherwise the step is
    taken with whatever gradient backward produced, as a loop without a check would.
    ``capture_dir``: a :class:`~lossdoctor.capture.Capture` writes the first non-finite step there.
    """
    from ..capture import Capture

    torch.manual_seed(seed)
    model = TinyDetector()
    capture = (
        Capture(capture_dir, model, extra_args=capture_args, grad_norm_above=capture_norm)
        if capture_dir is not None
        else None
    )
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    cfg = toy_config()
    hist = History(profile.name, seed)
    evaluation = held_out()
    stream = batches(seed, batch_size)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        images, sizes, boxes, labels = next(stream)
        b = make_batch(model, images, sizes, boxes, labels)
        r = replay(live_heads(model), b, cfg, [profile], seed=step)
        loss = r.losses[profile.name].total
        opt.zero_grad()
        loss.backward()
        value = float(loss.detach())
        hist.steps.append(step)
        hist.loss.append(value)
        if capture is not None:
            capture.check(
                step,
                loss,
                features=b.features,
                image_sizes=sizes,
                gt_boxes=boxes,
                gt_labels=labels,
                strides=list(STRIDES),
                meta={"sample_seed": step, "profile": profile.name, "train_seed": seed},
            )
        if not math.isfinite(value) and hist.broke_at is None:
            hist.broke_at = step
            if log:
                log(f"{profile.name} seed {seed}: non-finite loss at step {step}")
            if stop_on_nonfinite:
                break
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            hist.detections.append((step + 1, *evaluate(model, evaluation)))
            model.train()
            if log:
                _, dets, rec = hist.detections[-1]
                log(
                    f"{profile.name} seed {seed} step {step + 1}: loss {value:.4g}, held-out detections {dets}, recall {rec:.2f}"
                )
    if capture is not None:
        hist.captured = list(capture.written)
    if not hist.detections or hist.detections[-1][0] != len(hist.steps):
        model.eval()
        hist.detections.append((len(hist.steps), *evaluate(model, evaluation)))
    return model, hist
