"""A COCO-scale synthetic batch and checkpoint: 2 images padded to 800 x 1216, P2-P6 with 256
channels, 80 classes, torchvision layout. Shared by the benchmark scripts."""

from __future__ import annotations

import torch

from lossdoctor.inputs.batch import BATCH_FORMAT, validate_batch
from lossdoctor.inputs.checkpoint import heads_from_state_dict

PAD = (800, 1216)
STRIDES = (4, 8, 16, 32, 64)
CHANNELS = 256
CLASSES = 80


def coco_heads(seed: int = 0):
    return heads_from_state_dict(coco_state_dict(seed))


def coco_state_dict(seed: int = 0) -> dict:
    """Faster R-CNN heads in torchvision's layout, small random weights."""
    g = torch.Generator().manual_seed(seed)
    c, a, k, f = CHANNELS, 3, CLASSES, 1024

    def rnd(*shape, std=0.01):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "rpn.head.conv.0.0.weight": rnd(c, c, 3, 3, std=0.02),
        "rpn.head.conv.0.0.bias": rnd(c),
        "rpn.head.cls_logits.weight": rnd(a, c, 1, 1),
        "rpn.head.cls_logits.bias": rnd(a),
        "rpn.head.bbox_pred.weight": rnd(4 * a, c, 1, 1),
        "rpn.head.bbox_pred.bias": rnd(4 * a),
        "roi_heads.box_head.fc6.weight": rnd(f, c * 49, std=0.005),
        "roi_heads.box_head.fc6.bias": rnd(f),
        "roi_heads.box_head.fc7.weight": rnd(f, f, std=0.03),
        "roi_heads.box_head.fc7.bias": rnd(f),
        "roi_heads.box_predictor.cls_score.weight": rnd(k + 1, f),
        "roi_heads.box_predictor.cls_score.bias": rnd(k + 1),
        "roi_heads.box_predictor.bbox_pred.weight": rnd(4 * (k + 1), f, std=0.001),
        "roi_heads.box_predictor.bbox_pred.bias": rnd(4 * (k + 1)),
    }
    return sd


def coco_batch(gt_per_image: int = 100, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = PAD
    feats = {}
    for s in STRIDES:
        feats[f"p{s.bit_length() - 1}"] = torch.randn(
            2, CHANNELS, -(-h // s), -(-w // s), generator=g
        )
    sizes = [[800, 1199], [736, 1216]]
    boxes, labels = [], []
    for ih, iw in sizes:
        wh = torch.exp(torch.rand(gt_per_image, 2, generator=g) * 5.5 + 2.0)  # 7 .. 600 px
        xy = torch.rand(gt_per_image, 2, generator=g) * (torch.tensor([iw, ih]) - wh).clamp(min=1)
        boxes.append(
            torch.cat([xy, xy + wh], 1).clamp(
                max=torch.tensor([iw, ih, iw, ih], dtype=torch.float32)
            )
        )
        labels.append(torch.randint(0, CLASSES, (gt_per_image,), generator=g))
    return validate_batch(
        {
            "format": BATCH_FORMAT,
            "features": feats,
            "image_sizes": sizes,
            "pad_size": list(PAD),
            "strides": list(STRIDES),
            "gt_boxes": boxes,
            "gt_labels": labels,
        }
    )


def timed_inspect(*args, **kw) -> tuple[float, dict]:
    """Seconds of one library ``inspect(*args, **kw)``, and of each of its phases."""
    import time

    from lossdoctor import inspect

    marks: list = []
    t0 = time.perf_counter()
    inspect(*args, on_phase=lambda p: marks.append((p, time.perf_counter())), **kw)
    end = time.perf_counter()
    ends = [t for _, t in marks[1:]] + [end]
    return end - t0, {p.name.lower(): b - a for (p, a), b in zip(marks, ends)}
