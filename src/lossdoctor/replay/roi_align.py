"""Multi-scale RoIAlign in pure torch, with each framework's level mapping.

The bilinear sampling follows torchvision's ``roi_align`` kernel exactly (sample points, the
-1/size bounds, edge handling, averaging over the sampling grid). The weights of one output bin
factor into a y part and an x part, so each RoI is pooled as ``Wy @ F[window] @ Wx^T`` over a
gathered window instead of point by point.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..inputs.config import RoIPoolConfig
from ..vocab import Mapper
from .boxes import box_area

# RoIs pooled per gather: bounds the gathered tensor (RoIs x rows x cols x channels); small blocks
# stay in cache and are reused by the allocator (large ones page-fault on every chunk).
ROI_CHUNK_ELEMENTS = 1 << 20
# Adaptive sampling (sampling_ratio 0) takes ceil(bin / 1 px) points per bin side; beyond this
# many (a RoI over 7 x 32 = 224 feature pixels wide, only from broken boxes) it takes this many, so
# memory stays bounded. The frameworks' kernels would loop over every point.
MAX_ADAPTIVE_GRID = 32


def _torchvision_level(scale: Tensor, cfg: RoIPoolConfig) -> Tensor:
    return torch.floor(cfg.canonical_level + torch.log2(scale / cfg.canonical_scale) + 1e-6)


def _detectron2_level(scale: Tensor, cfg: RoIPoolConfig) -> Tensor:
    return torch.floor(cfg.canonical_level + torch.log2(scale / cfg.canonical_scale + 1e-8))


def _mmdet_level(scale: Tensor, cfg: RoIPoolConfig) -> Tensor:
    return torch.floor(torch.log2(scale / cfg.finest_scale + 1e-6))


# mapper → (level of each RoI from sqrt(area), whether level 0 is the finest RoI level itself
# rather than log2 of its stride)
MAPPERS = {
    Mapper.TORCHVISION: (_torchvision_level, False),
    Mapper.DETECTRON2: (_detectron2_level, False),
    Mapper.MMDET: (_mmdet_level, True),
}


def map_levels(rois: Tensor, strides: list[int], cfg: RoIPoolConfig) -> Tensor:
    """Pooling level index (0 = finest RoI level) of each RoI (Tensor[R, 4]) → Tensor[R] int64.

    torchvision: floor(4 + log2(sqrt(area) / 224) + 1e-6); Detectron2: floor(4 + log2(sqrt(area)
    / 224 + 1e-8)); mmdet: floor(log2(sqrt(area) / 56 + 1e-6)); clamped to the levels used.
    Non-finite results (inverted boxes give sqrt of a negative area) go to the finest level.
    """
    n = len(strides)
    level, zero_based = MAPPERS[cfg.mapper]
    lvl = level(torch.sqrt(box_area(rois)), cfg)
    # levels by stride, as the frameworks map them: levels that share a stride (torchvision's
    # MobileNet FPN) all map to the first of them
    k_min = 0 if zero_based else int(round(math.log2(strides[0])))
    k_max = k_min + n - 1 if zero_based else int(round(math.log2(strides[n - 1])))
    lvl = torch.nan_to_num(lvl, nan=float(k_min), posinf=float(k_max), neginf=float(k_min))
    return (lvl.clamp(k_min, k_max) - k_min).long().clamp(max=n - 1)


def _axis_weights(
    start: Tensor, bin_size: Tensor, grid: int, pooled: int, size: int
) -> tuple[Tensor, Tensor]:
    """Sample rows (or cols) of one axis → (idx Tensor[R, S*2g] int64, W Tensor[R, S, S*2g]).

    W[r, p, j] is the weight of gathered row j in output bin p (bilinear weight / grid).
    """
    r = start.shape[0]
    p = torch.arange(pooled, dtype=start.dtype)
    k = torch.arange(grid, dtype=start.dtype) + 0.5
    pos = (
        start[:, None, None]
        + p[None, :, None] * bin_size[:, None, None]
        + k[None, None, :] * bin_size[:, None, None] / grid
    )
    inside = (pos >= -1.0) & (pos <= size)
    # a point outside the map (or not finite: a huge RoI) weighs 0; give it a valid row all the same
    pos = torch.where(inside, pos, torch.zeros_like(pos)).clamp(min=0)
    low = pos.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    pos = torch.where(edge, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    w = torch.cat([1 - frac, frac], -1) * inside.repeat(1, 1, 2).to(pos.dtype) / grid  # [R, P, 2g]
    idx = torch.cat([low, high], -1).reshape(r, -1)
    dense = (torch.eye(pooled, dtype=w.dtype)[None, :, :, None] * w[:, :, None, :]).reshape(
        r, pooled, -1
    )
    return idx, dense


class _Gather(torch.autograd.Function):
    """out[r] = Wy[r] @ F[flat[r]] @ Wx[r]^T, in chunks, with a backward that accumulates every
    chunk into one feature gradient (autograd's index_select backward would allocate a zeroed
    copy of the whole map per chunk)."""

    @staticmethod
    def forward(ctx, flat_feat, flat, wy, wx, rows, cols):
        c = flat_feat.shape[1]
        step = max(1, ROI_CHUNK_ELEMENTS // (rows * cols * c))
        out = []
        for s in range(0, flat.shape[0], step):
            g = flat_feat.index_select(0, flat[s : s + step].reshape(-1)).view(-1, rows, cols, c)
            g = g.to(wy.dtype)  # a no-op for float maps; masks are gathered as bool
            t = torch.einsum("rpa,rabc->rpbc", wy[s : s + step], g)
            out.append(torch.einsum("rpbc,rqb->rcpq", t, wx[s : s + step]))
        ctx.save_for_backward(flat, wy, wx)
        ctx.shape, ctx.rows, ctx.cols = flat_feat.shape, rows, cols
        return torch.cat(out) if out else flat_feat.new_zeros(0, c, wy.shape[1], wx.shape[1])

    @staticmethod
    def backward(ctx, grad_out):
        flat, wy, wx = ctx.saved_tensors
        rows, cols = ctx.rows, ctx.cols
        grad = grad_out.new_zeros(ctx.shape)
        c = ctx.shape[1]
        step = max(1, ROI_CHUNK_ELEMENTS // (rows * cols * c))
        for s in range(0, flat.shape[0], step):
            t = torch.einsum("rcpq,rqb->rpbc", grad_out[s : s + step], wx[s : s + step])
            g = torch.einsum("rpa,rpbc->rabc", wy[s : s + step], t)
            grad.index_add_(0, flat[s : s + step].reshape(-1), g.reshape(-1, c))
        return grad, None, None, None, None, None


def _pool_group(
    feat: Tensor,
    img: Tensor,
    ys: Tensor,
    xs: Tensor,
    bh: Tensor,
    bw: Tensor,
    gh: int,
    gw: int,
    pooled: int,
) -> Tensor:
    """RoIs sharing one sampling grid (gh, gw) → Tensor[R, C, S, S]. feat: Tensor[N, H, W, C]."""
    _, h, w, c = feat.shape
    iy, wy = _axis_weights(ys.detach(), bh.detach(), gh, pooled, h)
    ix, wx = _axis_weights(xs.detach(), bw.detach(), gw, pooled, w)
    rows, cols = iy.shape[1], ix.shape[1]
    # one flat row index per (RoI, sample row, sample col): index_select copies whole channel rows
    flat = ((img[:, None, None] * h + iy[:, :, None]) * w + ix[:, None, :]).reshape(
        img.shape[0], -1
    )
    dtype = _pooled_dtype(feat)
    return _Gather.apply(feat.reshape(-1, c), flat, wy.to(dtype), wx.to(dtype), rows, cols)


def _pooled_dtype(feat: Tensor) -> torch.dtype:
    """A float map pools in its own type; a bool or uint8 one (GT masks, never converted whole)
    in the default float type."""
    return feat.dtype if feat.is_floating_point() else torch.get_default_dtype()


def roi_align_level(
    feat: Tensor,
    rois: Tensor,
    img: Tensor,
    scale: float,
    pooled: int,
    sampling_ratio: int,
    aligned: bool,
    max_grid: int = MAX_ADAPTIVE_GRID,
) -> Tensor:
    """RoIAlign on one level. feat: Tensor[N, C, H, W]; rois: Tensor[R, 4] in input pixels;
    img: Tensor[R] image index → Tensor[R, C, S, S] (a bool or uint8 map pools as floats, without
    a float copy of the map). ``max_grid`` caps the adaptive sampling grid. Always this kernel,
    even where torchvision is installed: on a few CPU cores it is several times faster than
    torchvision's compiled one, forward and backward."""
    if rois.shape[0] == 0:
        return (
            feat.new_zeros(0, feat.shape[1], pooled, pooled) + 0 * feat.sum()
        )  # keeps the level in the graph
    return roi_align_torch(feat, rois, img, scale, pooled, sampling_ratio, aligned, max_grid)


def _geometry(
    rois: Tensor, scale: float, pooled: int, sampling_ratio: int, aligned: bool, max_grid: int
):
    """Each RoI's top-left corner and bin size in feature pixels, and its sampling grid:
    (x1, y1, bin_w, bin_h, grid_h, grid_w), each Tensor[R]."""
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 0] * scale - offset, rois[:, 1] * scale - offset
    rw = rois[:, 2] * scale - offset - x1
    rh = rois[:, 3] * scale - offset - y1
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    if sampling_ratio > 0:
        gh = gw = torch.full((rois.shape[0],), sampling_ratio, dtype=torch.long)
    else:
        gh = torch.ceil(rh / pooled).nan_to_num(0).clamp(0, max_grid).long()
        gw = torch.ceil(rw / pooled).nan_to_num(0).clamp(0, max_grid).long()
    return x1, y1, rw / pooled, rh / pooled, gh, gw


def roi_align_torch(
    feat: Tensor,
    rois: Tensor,
    img: Tensor,
    scale: float,
    pooled: int,
    sampling_ratio: int,
    aligned: bool,
    max_grid: int = MAX_ADAPTIVE_GRID,
) -> Tensor:
    """The pure-torch RoIAlign behind :func:`roi_align_level` (same arguments and result)."""
    _, c, h, _ = feat.shape
    out = feat.new_zeros(rois.shape[0], c, pooled, pooled, dtype=_pooled_dtype(feat))
    x1, y1, bw, bh, gh, gw = _geometry(rois, scale, pooled, sampling_ratio, aligned, max_grid)
    feat_hwc = feat.permute(0, 2, 3, 1).contiguous()  # gathers read whole channel vectors
    keys = gh * (max_grid + 1) + gw
    pieces = []
    # visit RoIs in (image, top edge) order so each chunk gathers from one band of the map
    band = img.double() * (h * 2 + 4) + y1.detach().double().nan_to_num(0).clamp(-h - 2, h + 2)
    for key in keys.unique().tolist():
        idx = (keys == key).nonzero().flatten()
        idx = idx[band[idx].argsort()]
        a, b = int(gh[idx[0]]), int(gw[idx[0]])
        if a == 0 or b == 0:
            continue  # no sample point: the kernel outputs 0
        group = _pool_group(feat_hwc, img[idx], y1[idx], x1[idx], bh[idx], bw[idx], a, b, pooled)
        pieces.append((idx, group))
    if not pieces:  # no RoI has a sample point: zeros, still in the graph (reading no value)
        return out + feat.reshape(-1)[:0].sum()
    return _scatter_rows(out, pieces)


def _scatter_rows(out: Tensor, pieces: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Rows ``v`` of each (idx, v) piece placed at rows ``idx`` of ``out`` (rows in no piece keep
    ``out``'s value), with one concatenation and one gather instead of a copy per piece."""
    if not pieces:
        return out
    order = torch.cat([i for i, _ in pieces])
    if order.numel() == out.shape[0]:
        return torch.cat([v for _, v in pieces]).index_select(0, order.argsort())
    return out.index_copy(0, order, torch.cat([v for _, v in pieces]))


def multiscale_roi_align(
    features: list[Tensor],
    strides: list[int],
    rois: Tensor,
    img: Tensor,
    levels: Tensor,
    pooled: int,
    cfg: RoIPoolConfig,
) -> Tensor:
    """Pool each RoI from its mapped level → Tensor[R, C, S, S]; every level stays in the graph."""
    n, c = features[0].shape[:2]
    pieces, keep_alive = [], []
    for lvl, (feat, stride) in enumerate(zip(features, strides)):
        idx = (levels == lvl).nonzero().flatten()
        pooled_l = roi_align_level(
            feat, rois[idx], img[idx], 1.0 / stride, pooled, cfg.sampling_ratio, cfg.aligned
        )
        if idx.numel():
            pieces.append((idx, pooled_l))
        else:
            keep_alive.append(
                pooled_l.sum()
            )  # 0 * sum keeps an unused level in the graph, as mmdet does
    out = _scatter_rows(features[0].new_zeros(rois.shape[0], c, pooled, pooled), pieces)
    return out + 0 * sum(keep_alive) if keep_alive else out
