"""The backward of the RPN's 3x3 conv + ReLU where its output gradient is sparse.

The RPN losses see only sampled anchors (256 per image by default), so the gradient at the conv's
output is non-zero at a few hundred of a level's locations. Autograd's dense backward spends the
same work on every location; here only the locations with a non-zero (or non-finite) gradient are
visited: ``dW = G^T P`` and ``dX = fold(G W)`` over their input patches ``P``. Where most
locations are live (``--sample-all``) or the inputs are not finite (a 0 x NaN must poison the
gradient as autograd's would), the caller falls back to autograd. The caller finds the live
locations and their gradients from the head outputs' gradients, never forming the dense map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# the RPN conv's kernel and padding ("same" 3x3)
KERNEL = 3
PADDING = 1
# above this share of live locations autograd's dense backward is the cheaper one
DENSE_SHARE = 0.05


@dataclass(kw_only=True)
class ConvGrads:
    """One level's conv gradients: the input gradient's norm (accumulated in float64), the weight
    gradient Tensor[C_out, C_in, 3, 3] and the bias gradient Tensor[C_out]; from the sparse path
    also the input gradient's non-zero rows ``dx`` Tensor[U, C_in] at ``at`` Tensor[U, 3] (n, y,
    x)."""

    feature: float
    weight: Tensor
    bias: Tensor
    dx: Tensor | None = None
    at: Tensor | None = None


def relu_backward(grad: Tensor, out: Tensor) -> Tensor:
    """Through the ReLU as autograd's threshold_backward: zero where the output is <= 0 (a NaN
    output passes its gradient on). Any shape, the two alike."""
    return torch.where(out <= 0, torch.zeros(()), grad)


def _patch_index(loc: Tensor, height: int, width: int) -> Tensor:
    """Flat indices into the padded map Tensor[N, H+2, W+2] of each location's 3x3 window →
    Tensor[V, 9]."""
    n, y, x = loc.unbind(1)
    d = torch.arange(KERNEL)
    ys = y[:, None, None] + d[None, :, None]
    xs = x[:, None, None] + d[None, None, :]
    wp = width + 2 * PADDING
    return ((n[:, None, None] * (height + 2 * PADDING) + ys) * wp + xs).reshape(-1, KERNEL**2)


def sparse_conv_grads(x: Tensor, g: Tensor, weight: Tensor, loc: Tensor) -> ConvGrads:
    """The conv's gradients from its pre-ReLU output gradient, non-zero only at ``loc``
    Tensor[V, 3] (n, y, x) where it is ``g`` Tensor[V, C_out], for input ``x`` Tensor[N, C_in, H,
    W]."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    if loc.shape[0] == 0:
        return ConvGrads(feature=0.0, weight=torch.zeros_like(weight), bias=weight.new_zeros(c_out),
                         dx=x.new_zeros(0, c_in), at=loc)  # fmt: skip
    index = _patch_index(loc, h, w)  # [K, 9]
    dw = torch.matmul(g.T, _patches(x, index, h, w).reshape(g.shape[0], -1))  # [C_out, 9 * C_in]
    dw = dw.view(c_out, KERNEL, KERNEL, c_in).permute(0, 3, 1, 2)
    w_t = weight.detach().permute(0, 2, 3, 1).reshape(c_out, -1)  # [C_out, 9 * C_in]
    contrib = torch.matmul(g, w_t).view(-1, c_in)  # [K * 9, C_in]
    where, slot = torch.unique(index.flatten(), return_inverse=True)
    dx = contrib.new_zeros(where.numel(), c_in).index_add_(0, slot, contrib)
    at = _pixels(where, h, w)
    inside = (at[:, 1:] >= 0).all(1) & (at[:, 1] < h) & (at[:, 2] < w)
    dx, at = dx[inside], at[inside]
    norm = float(torch.linalg.vector_norm(dx, dtype=torch.float64)) if dx.numel() else 0.0
    return ConvGrads(feature=norm, weight=dw, bias=g.sum(0), dx=dx, at=at)


def _patches(x: Tensor, index: Tensor, height: int, width: int) -> Tensor:
    """The input windows at ``index`` Tensor[V, 9] of :func:`_patch_index` → Tensor[V * 9, C_in],
    zeros in the padding; gathered from ``x`` Tensor[N, C_in, H, W] as it is (no padded copy of
    the map)."""
    n, y, xx = _pixels(index.flatten(), height, width).unbind(1)
    inside = (y >= 0) & (y < height) & (xx >= 0) & (xx < width)
    rows = x.detach()[n, :, y.clamp(0, height - 1), xx.clamp(0, width - 1)]
    return torch.where(inside[:, None], rows, torch.zeros(()))


def _pixels(flat: Tensor, height: int, width: int) -> Tensor:
    """Flat indices of the padded map → (n, y, x) in the unpadded one, Tensor[U, 3] (padding
    falls outside 0..H-1, 0..W-1)."""
    wp, hp = width + 2 * PADDING, height + 2 * PADDING
    return torch.stack([flat // (wp * hp), (flat // wp) % hp - PADDING, flat % wp - PADDING], 1)


def worth_it(live: int, x: Tensor) -> bool:
    """Visiting ``live`` locations of ``x`` Tensor[N, C, H, W] is cheaper than the dense
    backward (the caller also makes sure every input is finite)."""
    n, _, h, w = x.shape
    return live <= DENSE_SHARE * n * h * w
