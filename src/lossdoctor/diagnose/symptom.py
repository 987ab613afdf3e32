"""The symptom: what the checkpoint would detect on this batch in test mode."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..replay.boxes import batched_nms, clip_to_image, decode, keep_min_size
from ..replay.engine import Replay
from ..replay.heads import box_hidden, box_predict
from ..replay.proposals import image_proposals
from ..replay.roi_align import map_levels, multiscale_roi_align


@dataclass
class Symptom:
    score_thr: float
    detections: list[int]  # per image
    max_fg_score: list[float]  # per image, before the threshold
    objectness_above_half: float  # fraction of anchors (all levels and images) with sigmoid > 0.5
    boxes: list[Tensor]
    scores: list[Tensor]
    labels: list[Tensor]  # foreground class 0..K-1


def symptom(r: Replay, score_thr: float | None = None) -> Symptom:
    """Test-mode proposals → box head → softmax → score > thr → per-class NMS → top-k per image."""
    cfg = r.config
    thr = cfg.test.score_thr if score_thr is None else score_thr
    heads = r.heads
    with torch.no_grad():
        logits = [o.out.logits.detach() for o in r.rpn]
        deltas = [o.out.deltas.detach() for o in r.rpn]
        above = sum(int((l > 0).sum()) for l in logits) / max(1, sum(l.numel() for l in logits))
        anchors = [o.anchors for o in r.rpn]
        props, img = [], []
        for i, size in enumerate(r.batch.image_sizes):
            p, _, _ = image_proposals(
                [l[i] for l in logits],
                [d[i] for d in deltas],
                anchors,
                size,
                cfg.test_proposals,
                cfg.rpn_coder,
            )
            props.append(p)
            img.append(torch.full((p.shape[0],), i, dtype=torch.long))
        rois, img = torch.cat(props), torch.cat(img)
        n_levels = len(r.samples["roi"])
        strides = r.batch.strides[:n_levels]
        feats = [f.detach() for f in r.features[:n_levels]]
        detached = type(heads)(
            {k: v.detach() for k, v in heads.params.items()},
            heads.layout,
            heads.keys,
            heads.background,
        )
        pooled = multiscale_roi_align(
            feats,
            strides,
            rois,
            img,
            map_levels(rois, strides, cfg.roi_pool),
            heads.pool_size,
            cfg.roi_pool,
        )
        cls, reg = box_predict(box_hidden(pooled, detached)[1], detached)
        prob = torch.softmax(cls, -1)
        k = heads.num_classes
        fg_cols = torch.arange(k) + (1 if heads.background == "first" else 0)
        fg_prob = prob[:, fg_cols]  # [M, K]
        slots = heads.reg_slot(torch.arange(k))
        out_boxes, out_scores, out_labels, dets, best = [], [], [], [], []
        for i, size in enumerate(r.batch.image_sizes):
            sel = img == i
            sc = fg_prob[sel]
            best.append(float(sc.max()) if sc.numel() else 0.0)
            m = sc.shape[0]
            d = reg[sel][:, slots].reshape(-1, 4)  # [M*K, 4]
            ref = rois[sel].repeat_interleave(k, 0)
            boxes = clip_to_image(
                decode(d, ref, cfg.roi_coder.weights, cfg.roi_coder.clip, cfg.roi_coder.clip_both),
                size,
            )
            scores = sc.reshape(-1)
            labels = torch.arange(k).repeat(m)
            keep = (scores > thr).nonzero().flatten()
            keep = keep[keep_min_size(boxes[keep], cfg.test.min_box_size, True)]
            keep = keep[torch.isfinite(boxes[keep]).all(1)]
            keep = keep[batched_nms(boxes[keep], scores[keep], labels[keep], cfg.test.nms_iou)][
                : cfg.test.detections_per_img
            ]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
            out_labels.append(labels[keep])
            dets.append(int(keep.numel()))
    return Symptom(thr, dets, best, above, out_boxes, out_scores, out_labels)
