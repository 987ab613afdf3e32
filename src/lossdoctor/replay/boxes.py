"""Box operations: area, IoU (chunked), encode/decode, clip. Boxes are (x1, y1, x2, y2)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..inputs.config import CoderConfig

# Elements of one IoU block (GT x anchors): bounds memory by this, not by anchors x GT.
IOU_CHUNK_ELEMENTS = 1 << 21


def box_area(boxes: Tensor) -> Tensor:
    """boxes (Tensor[N, 4]) → Tensor[N]; negative for inverted boxes, as in the frameworks."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: Tensor, b: Tensor, union_eps: float = 0.0) -> Tensor:
    """a (Tensor[G, 4]), b (Tensor[M, 4]) → Tensor[G, M].

    ``union_eps`` > 0 clamps the union from below (MMDetection, 1e-6); 0 divides plainly
    (torchvision, Detectron2).
    """
    # per axis, so no [G, M, 2] temporaries: the peak is a few [G, M] blocks
    iw = (torch.min(a[:, None, 2], b[None, :, 2]) - torch.max(a[:, None, 0], b[None, :, 0])).clamp_(
        min=0
    )
    ih = (torch.min(a[:, None, 3], b[None, :, 3]) - torch.max(a[:, None, 1], b[None, :, 1])).clamp_(
        min=0
    )
    inter = iw.mul_(ih)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    if union_eps > 0:
        union = union.clamp(min=union_eps)
    return inter / union


def iou_chunks(a: Tensor, b: Tensor, union_eps: float = 0.0, skip=None):
    """Yield (start, Tensor[G, m]) blocks of ``box_iou(a, b)`` over ``b``, each of bounded size.

    ``skip(k)`` true leaves block k out (it is not computed).
    """
    step = max(1, IOU_CHUNK_ELEMENTS // max(1, a.shape[0]))
    for k, start in enumerate(range(0, b.shape[0], step)):
        if skip is None or not skip(k):
            yield start, box_iou(a, b[start : start + step], union_eps)


def encode(gt: Tensor, ref: Tensor, weights) -> Tensor:
    """Regression targets of ``gt`` relative to ``ref`` (both Tensor[N, 4]) → Tensor[N, 4].

    dx = wx (gx - rx) / rw, dw = ww log(gw / rw); no +1, no clamp: a zero-width GT gives -inf.
    """
    wx, wy, ww, wh = weights
    rw = ref[:, 2] - ref[:, 0]
    rh = ref[:, 3] - ref[:, 1]
    rx = ref[:, 0] + 0.5 * rw
    ry = ref[:, 1] + 0.5 * rh
    gw = gt[:, 2] - gt[:, 0]
    gh = gt[:, 3] - gt[:, 1]
    gx = gt[:, 0] + 0.5 * gw
    gy = gt[:, 1] + 0.5 * gh
    return torch.stack(
        [
            wx * (gx - rx) / rw,
            wy * (gy - ry) / rh,
            ww * torch.log(gw / rw),
            wh * torch.log(gh / rh),
        ],
        1,
    )


def decode(deltas: Tensor, ref: Tensor, weights, clip: float, clip_both: bool = False) -> Tensor:
    """Apply deltas (Tensor[N, 4]) to ref boxes (Tensor[N, 4]) → Tensor[N, 4]; dw, dh capped
    at ``clip``."""
    wx, wy, ww, wh = weights
    rw = ref[:, 2] - ref[:, 0]
    rh = ref[:, 3] - ref[:, 1]
    rx = ref[:, 0] + 0.5 * rw
    ry = ref[:, 1] + 0.5 * rh
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw, dh = deltas[:, 2] / ww, deltas[:, 3] / wh
    lo = -clip if clip_both else None
    dw, dh = dw.clamp(min=lo, max=clip), dh.clamp(min=lo, max=clip)
    cx, cy = dx * rw + rx, dy * rh + ry
    w, h = torch.exp(dw) * rw, torch.exp(dh) * rh
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], 1)


def clip_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp x to [0, w] and y to [0, h]; size = (h, w)."""
    h, w = size
    x = boxes[:, 0::2].clamp(0, w)
    y = boxes[:, 1::2].clamp(0, h)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)


def decode_in_image(deltas: Tensor, ref: Tensor, coder: CoderConfig, size: tuple[int, int]):
    """deltas (Tensor[N, 4]) on ref (Tensor[N, 4]) → boxes Tensor[N, 4] decoded with ``coder``,
    clipped to the image ``size`` = (h, w) unless the coder keeps boxes across its border."""
    boxes = decode(deltas, ref, coder.weights, coder.clip, coder.clip_both)
    return clip_to_image(boxes, size) if coder.clip_border else boxes


def keep_min_size(boxes: Tensor, min_size: float, inclusive: bool) -> Tensor:
    """Indices of boxes with both sides >= min_size (inclusive) or > min_size."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (w >= min_size) & (h >= min_size) if inclusive else (w > min_size) & (h > min_size)
    return keep.nonzero().flatten()


def scaled_about_centre(boxes: Tensor, factor: float) -> Tensor:
    """Each box Tensor[N, 4] scaled by ``factor`` about its centre (MMDetection's roi_rescale)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    half = (boxes[:, 2:] - boxes[:, :2]) * factor * 0.5
    return torch.cat([centre - half, centre + half], 1)
