"""The symptom: what the checkpoint would detect on this batch in test mode."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs.checkpoint import BOX_COORDS, HeadWeights
from ..inputs.config import CoderConfig, DetectorConfig
from ..replay.boxes import decode_in_image, keep_min_size
from ..replay.cascade import stage_config
from ..replay.engine import Replay
from ..replay.heads import box_head
from ..replay.nms import RANKINGS
from ..replay.proposals import image_proposals
from ..replay.roi import RoiStage, pool_rois
from ..replay.roi_align import map_levels
from ..vocab import Background, CascadeScores

# an anchor counts as "objectness > 0.5" when its logit is above this
HALF_PROBABILITY_LOGIT = 0.0


@dataclass(kw_only=True)
class Symptom:
    score_thr: float
    detections: list[int]  # per image
    max_fg_score: list[float]  # per image, before the threshold
    objectness_above_half: float  # fraction of anchors (all levels and images) with sigmoid > 0.5
    boxes: list[Tensor]
    scores: list[Tensor]
    labels: list[Tensor]  # foreground class 0..K-1


@dataclass(kw_only=True)
class _Scored:
    """Test-mode RoIs of the batch (a cascade's as its last stage sees them): rois Tensor[M, 4],
    img Tensor[M], per-class foreground probabilities Tensor[M, K], deltas Tensor[M,
    reg_classes, 4] and the box coder that decodes them."""

    rois: Tensor
    img: Tensor
    fg_prob: Tensor
    deltas: Tensor
    coder: CoderConfig


def _test_rois(r: Replay) -> tuple[Tensor, Tensor]:
    """Test-mode proposals of every image → (rois Tensor[M, 4], image index Tensor[M])."""
    levels = r.rpn.levels
    anchors = [lv.anchors for lv in levels]
    props, img = [], []
    for i, size in enumerate(r.batch.image_sizes):
        logits = [lv.out.logits.detach()[i] for lv in levels]
        deltas = [lv.out.deltas.detach()[i] for lv in levels]
        cfg = r.config
        p, _, _ = image_proposals(
            logits, deltas, anchors, size, cfg.test_proposals, cfg.rpn_coder, cfg.ranking
        )
        props.append(p)
        img.append(torch.full((p.shape[0],), i, dtype=torch.long))
    return torch.cat(props), torch.cat(img)


def _training_rows(roi: RoiStage, rois: Tensor, img: Tensor, levels: Tensor) -> Tensor:
    """For each test-mode RoI, the training RoI with the same image, box and pooling level, whose
    box-head outputs are the same function of the same values (row index, -1 where none) →
    Tensor[M]. Under --sample-all most test RoIs are training ones."""
    boxes = map(tuple, roi.boxes.detach().tolist())
    seen = {key: i for i, key in enumerate(zip(roi.img.tolist(), roi.level.tolist(), boxes))}
    keys = zip(img.tolist(), levels.tolist(), map(tuple, rois.tolist()))
    return torch.tensor([seen.get(key, -1) for key in keys], dtype=torch.long)


def _stage_outputs(r: Replay, k: int, rois: Tensor, img: Tensor) -> tuple[Tensor, Tensor]:
    """Box-head stage ``k`` on test-mode RoIs, with detached weights and features → (class
    logits Tensor[M, K+1], deltas Tensor[M, reg_classes, 4]); the first stage's outputs for the
    RoIs the training replay already pooled are taken from it."""
    cfg, heads, first = r.config, r.heads.stage(k).detached(), r.roi
    n = first.num_levels
    strides, feats = r.batch.strides[:n], [f.detach() for f in r.features[:n]]
    levels = map_levels(rois, strides, cfg.roi_pool)
    # a BatchNorm normalizes by the batch in training, by its running statistics in test mode
    reuse = k == 0 and not (heads.box_batch_norm and cfg.head_norm.batch_stats)
    row = _training_rows(first, rois, img, levels) if reuse else torch.full_like(img, -1)
    cls = first.cls_logits.detach().new_empty(rois.shape[0], first.cls_logits.shape[1])
    reg = first.deltas.detach().new_empty(rois.shape[0], *first.deltas.shape[1:])
    hit, fresh = (row >= 0).nonzero().flatten(), (row < 0).nonzero().flatten()
    cls[hit], reg[hit] = first.cls_logits.detach()[row[hit]], first.deltas.detach()[row[hit]]
    if fresh.numel():
        pooled = pool_rois(feats, strides, rois[fresh], img[fresh], levels[fresh], heads, cfg)
        out = box_head(*pooled, heads, cfg, train=False)
        cls[fresh], reg[fresh] = out.cls, out.deltas
    return cls, reg


def _refine(r: Replay, rois: Tensor, img: Tensor, deltas: Tensor, coder: CoderConfig) -> Tensor:
    """A cascade stage's test-mode RoIs moved by its class-agnostic regression and clipped to
    their images (where the coder clips): the next stage's RoIs (none dropped, as both
    frameworks do at test time)."""
    out = torch.empty_like(rois)
    for i, size in enumerate(r.batch.image_sizes):
        at = img == i
        out[at] = decode_in_image(deltas[at, 0], rois[at], coder, size)
    return out


def _stage_coder(cfg: DetectorConfig, k: int) -> CoderConfig:
    return stage_config(cfg, k).roi_coder if k else cfg.roi_coder


def _score(r: Replay, rois: Tensor, img: Tensor) -> _Scored:
    """The box head on test-mode RoIs. A cascade runs each stage on the RoIs the stage before it
    refined and joins the stages' class scores as its framework does (``cascade.scores``); the
    boxes are the last stage's regression of its own RoIs."""
    cfg, heads = r.config, r.heads
    mean_probs = cfg.cascade.scores is CascadeScores.MEAN_PROBABILITIES
    cls, reg = _stage_outputs(r, 0, rois, img)
    joined = torch.softmax(cls, -1) if mean_probs else cls
    for k in range(1, heads.num_stages):
        rois = _refine(r, rois, img, reg, _stage_coder(cfg, k - 1))
        cls, reg = _stage_outputs(r, k, rois, img)
        joined = joined + (torch.softmax(cls, -1) if mean_probs else cls)
    # one stage: its own softmax either way (a mean of one is exact)
    joined = joined / heads.num_stages
    probs = joined if mean_probs else torch.softmax(joined, -1)
    first_fg = 1 if heads.background is Background.FIRST else 0
    fg_cols = torch.arange(heads.num_classes) + first_fg
    coder = _stage_coder(cfg, heads.num_stages - 1)
    return _Scored(rois=rois, img=img, fg_prob=probs[:, fg_cols], deltas=reg, coder=coder)


def _image_detections(s: _Scored, i: int, size, heads: HeadWeights, cfg: DetectorConfig):
    """One image's detections: decode per class, threshold, size filter, per-class NMS, top-k."""
    sel = s.img == i
    scores_all = s.fg_prob[sel]  # [M_i, K]
    k = heads.num_classes
    coder = s.coder
    d = s.deltas[sel][:, heads.reg_slot(torch.arange(k))].reshape(-1, BOX_COORDS)
    ref = s.rois[sel].repeat_interleave(k, 0)
    boxes = decode_in_image(d, ref, coder, size)
    scores, labels = scores_all.reshape(-1), torch.arange(k).repeat(scores_all.shape[0])
    keep = (scores > cfg.test.score_thr).nonzero().flatten()
    keep = keep[keep_min_size(boxes[keep], cfg.test.min_box_size, True)]
    keep = keep[torch.isfinite(boxes[keep]).all(1)]
    nms = RANKINGS[cfg.ranking].batched_nms
    keep = keep[nms(boxes[keep], scores[keep], labels[keep], cfg.test.nms_iou)]
    keep = keep[: cfg.test.detections_per_img]
    best = float(scores_all.max()) if scores_all.numel() else 0.0
    return boxes[keep], scores[keep], labels[keep], best


def symptom(r: Replay, score_thr: float | None = None) -> Symptom:
    """Test-mode proposals → box head (a cascade's stages, scores joined) → softmax → score > thr
    → per-class NMS → top-k per image.

    ``score_thr`` overrides the config's test threshold.
    """
    cfg = r.config
    if score_thr is not None:
        from ..inputs.config import replace

        cfg = replace(cfg, test=replace(cfg.test, score_thr=score_thr))
    with torch.no_grad():
        logits = [lv.out.logits.detach() for lv in r.rpn.levels]
        above = sum(int((x > HALF_PROBABILITY_LOGIT).sum()) for x in logits)
        total = max(1, sum(x.numel() for x in logits))
        scored = _score(r, *_test_rois(r))
        per_image = [
            _image_detections(scored, i, size, r.heads, cfg)
            for i, size in enumerate(r.batch.image_sizes)
        ]
    return Symptom(
        score_thr=cfg.test.score_thr,
        detections=[int(b.shape[0]) for b, _, _, _ in per_image],
        max_fg_score=[best for *_, best in per_image],
        objectness_above_half=above / total,
        boxes=[b for b, *_ in per_image],
        scores=[s for _, s, _, _ in per_image],
        labels=[lab for _, _, lab, _ in per_image],
    )
