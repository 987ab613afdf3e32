"""Anchors per FPN level, in each framework's convention."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..inputs.config import AnchorConfig


def cell_anchors(sizes, ratios, round_: bool, size_major: bool) -> Tensor:
    """Anchors centred on (0, 0) → Tensor[A, 4]; ratio = h / w, w = size / sqrt(r),
    h = size * sqrt(r)."""
    pairs = (
        [(s, r) for s in sizes for r in ratios]
        if size_major
        else [(s, r) for r in ratios for s in sizes]
    )
    base = []
    for size, ratio in pairs:
        w = size / math.sqrt(ratio)
        h = size * math.sqrt(ratio)
        base.append([-w / 2, -h / 2, w / 2, h / 2])
    t = torch.tensor(base, dtype=torch.float64)
    # torchvision rounds half to even (torch.round) and computes in float32 first.
    return t.float().round() if round_ else t.float()


def grid_anchors(
    cell: Tensor, height: int, width: int, stride_h: float, stride_w: float, offset: float
) -> Tensor:
    """All anchors of one level → Tensor[H * W * A, 4], ordered (y, x, a)."""
    ys = (torch.arange(height, dtype=torch.float32) + offset) * stride_h
    xs = (torch.arange(width, dtype=torch.float32) + offset) * stride_w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([xx, yy, xx, yy], -1).reshape(-1, 1, 4)
    return (shifts + cell[None]).reshape(-1, 4)


def level_strides(
    cfg: AnchorConfig, strides: list[int], shapes: list[tuple[int, int]], pad_size
) -> list[tuple[float, float]]:
    """(stride_h, stride_w) per level; torchvision's are padded_size // feature_size per axis."""
    if cfg.stride_from_size:
        return [(pad_size[0] // h, pad_size[1] // w) for h, w in shapes]
    return [(s, s) for s in strides]


def level_anchors(
    cfg: AnchorConfig, strides: list[int], shapes: list[tuple[int, int]], pad_size
) -> list[Tensor]:
    """Anchors of every level → list of Tensor[H_l * W_l * A, 4]."""
    if len(cfg.sizes) < len(shapes):
        raise ValueError(
            f"the config has anchor sizes for {len(cfg.sizes)} levels, the batch has {len(shapes)}"
        )
    out = []
    for sizes, (h, w), (sh, sw) in zip(
        cfg.sizes, shapes, level_strides(cfg, strides, shapes, pad_size)
    ):
        out.append(
            grid_anchors(
                cell_anchors(sizes, cfg.ratios, cfg.round, cfg.size_major), h, w, sh, sw, cfg.offset
            )
        )
    return out


def inside_flags(anchors: Tensor, image_size, border: float) -> Tensor | None:
    """mmdet's ``anchor_inside_flags``: anchors (Tensor[M, 4]) within the image (h, w) widened by
    ``border`` → Tensor[M] bool; None when the border is off (< 0)."""
    if border < 0:
        return None
    h, w = image_size
    return (
        (anchors[:, 0] >= -border)
        & (anchors[:, 1] >= -border)
        & (anchors[:, 2] < w + border)
        & (anchors[:, 3] < h + border)
    )


def valid_flags(
    cfg: AnchorConfig, strides: list[int], shapes, image_size, num_anchors: int
) -> list[Tensor] | None:
    """mmdet's valid flags for one image: locations inside ceil(pad_shape / stride) → list of
    Tensor[H*W*A] bool."""
    if cfg.valid_pad_divisor <= 0:
        return None
    d = cfg.valid_pad_divisor
    ph = math.ceil(image_size[0] / d) * d
    pw = math.ceil(image_size[1] / d) * d
    out = []
    for s, (h, w) in zip(strides, shapes):
        vh, vw = min(math.ceil(ph / s), h), min(math.ceil(pw / s), w)
        m = torch.zeros(h, w, dtype=torch.bool)
        m[:vh, :vw] = True
        out.append(m[:, :, None].expand(h, w, num_anchors).reshape(-1))
    return out
