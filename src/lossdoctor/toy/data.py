"""Synthetic shapes: rectangles, ellipses and triangles of 3 classes on noise, sizes spanning
every FPN level."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CLASSES = ("rectangle", "ellipse", "triangle")
SIZES = (128, 160, 192)  # image sides
OBJECT_SIDE = (5.0, 110.0)  # object sides (px), log-uniform: tiny ones only P2 anchors can catch
EMPTY_FRACTION = 0.15  # images with no object
MAX_OBJECTS = 4
PAD_DIVISOR = 32


@dataclass
class Sample:
    image: Tensor  # [3, H, W]
    boxes: Tensor  # [K, 4] x1, y1, x2, y2
    labels: Tensor  # [K] 0..2


def _shape_mask(kind: int, h: int, w: int, box: list[float]) -> Tensor:
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    x1, y1, x2, y2 = box
    inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
    if kind == 0:
        return inside
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    if kind == 1:
        return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    # triangle: apex at top centre, base at the bottom
    t = (ys - y1) / (y2 - y1)
    return inside & ((xs - cx).abs() <= t * rx)


def sample(g: torch.Generator) -> Sample:
    """One image, drawn from ``g`` (deterministic for a given generator state)."""
    h = SIZES[int(torch.randint(len(SIZES), (1,), generator=g))]
    w = SIZES[int(torch.randint(len(SIZES), (1,), generator=g))]
    image = torch.rand(3, h, w, generator=g) * 0.3
    boxes, labels = [], []
    if float(torch.rand(1, generator=g)) >= EMPTY_FRACTION:
        n = int(torch.randint(1, MAX_OBJECTS + 1, (1,), generator=g))
        lo, hi = torch.log(torch.tensor(OBJECT_SIDE))
        for _ in range(n):
            side = torch.exp(lo + (hi - lo) * torch.rand(2, generator=g))
            bw, bh = min(float(side[0]), w - 2.0), min(float(side[1]), h - 2.0)
            x1 = float(torch.rand(1, generator=g)) * (w - bw)
            y1 = float(torch.rand(1, generator=g)) * (h - bh)
            kind = int(torch.randint(len(CLASSES), (1,), generator=g))
            color = torch.rand(3, generator=g) * 0.6 + 0.4
            box = [x1, y1, x1 + bw, y1 + bh]
            m = _shape_mask(kind, h, w, box)
            image[:, m] = color[:, None]
            boxes.append(box)
            labels.append(kind)
    return Sample(
        image,
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.long),
    )


def collate(
    samples: list[Sample],
) -> tuple[Tensor, list[tuple[int, int]], list[Tensor], list[Tensor]]:
    """Pad to a common size (a multiple of 32) → (images [N, 3, H, W], sizes, boxes, labels)."""
    h = max(s.image.shape[1] for s in samples)
    w = max(s.image.shape[2] for s in samples)
    h, w = -(-h // PAD_DIVISOR) * PAD_DIVISOR, -(-w // PAD_DIVISOR) * PAD_DIVISOR
    images = torch.zeros(len(samples), 3, h, w)
    for i, s in enumerate(samples):
        images[i, :, : s.image.shape[1], : s.image.shape[2]] = s.image
    return (
        images,
        [tuple(s.image.shape[1:]) for s in samples],
        [s.boxes for s in samples],
        [s.labels for s in samples],
    )


def batch_of(features: dict, images, sizes, boxes, labels, strides, meta=None):
    """A replay Batch of a collated batch and its features (which keep their graph)."""
    from ..inputs.batch import Batch

    return Batch(
        features=features,
        image_sizes=list(sizes),
        pad_size=tuple(images.shape[-2:]),
        strides=list(strides),
        gt_boxes=list(boxes),
        gt_labels=list(labels),
        gt_ignore=[torch.zeros(b.shape[0], dtype=torch.bool) for b in boxes],
        meta=dict(meta or {}),
    )


def batches(seed: int, size: int):
    """An endless, reproducible stream of collated batches."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield collate([sample(g) for _ in range(size)])
