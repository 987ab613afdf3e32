"""Low precision: the heads' layers under CPU autocast, and the arithmetic of a dtype's range
that the overflow counters and the loss scaler's decision use.

A GradScaler multiplies the loss by its scale ``S`` (a power of two) before the backward; the
low-precision part of the backward then carries ``S * g`` for each gradient ``g``, which is
exact up to overflow (``|S * g|`` past the dtype's largest finite value gives Inf) and
underflow. So the step is skipped exactly when ``S * M`` overflows, ``M`` being the largest
|gradient| of the low-precision tensors at scale 1.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..vocab import Precision

DTYPES = {
    Precision.FP32: torch.float32,
    Precision.FP16: torch.float16,
    Precision.BF16: torch.bfloat16,
}
# GradScaler's scales are powers of two (init 2**16, growth 2, backoff 0.5)
SCALE_BASE = 2.0
# a loss scale below this has collapsed: the gradients are scaled down into underflow (the
# scale falls only on skipped steps)
MIN_LOSS_SCALE = 1.0


def finite_max(p: Precision) -> float:
    """The largest finite value of the precision's dtype (fp16: 65504)."""
    return float(torch.finfo(DTYPES[p]).max)


def tiny(p: Precision) -> float:
    """The smallest positive value the dtype holds (its smallest subnormal; fp16: 2**-24)."""
    info = torch.finfo(DTYPES[p])
    return float(info.smallest_normal) * float(info.eps)


# the ops autocast runs in the low precision that the heads use (the rest stay in fp32)
LOW_PRECISION_OPS = frozenset({
    F.conv2d, F.conv_transpose2d, F.linear, torch.conv2d, torch.conv_transpose2d,
    torch.matmul, torch.mm, torch.bmm, torch.addmm,
})  # fmt: skip


def rounded(t, p: Precision):
    """A float tensor rounded to ``p`` and held in fp32 (anything else as it is). The backward
    rounds the gradient the same way, as a cast does."""
    if isinstance(t, Tensor) and t.is_floating_point():
        return t.to(DTYPES[p]).to(torch.float32)
    return t


class _LowPrecision(TorchFunctionMode):
    """Autocast's low-precision ops as fp32-accumulating kernels compute them: inputs, weights
    and output rounded to the low precision, the products summed in fp32 (cuDNN and cuBLAS
    under autocast do the same; CPU fp16 kernels are reference code, many times slower)."""

    def __init__(self, p: Precision):
        super().__init__()
        self.p = p

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in LOW_PRECISION_OPS:
            return func(*args, **kwargs)
        args = [rounded(a, self.p) for a in args]
        kwargs = {k: rounded(v, self.p) for k, v in kwargs.items()}
        return rounded(func(*args, **kwargs), self.p)


def autocast(p: Precision):
    """The heads' layers in ``p`` (nothing for fp32): convs and linears in ``p`` with their
    outputs held in fp32, so what follows (the losses) computes in fp32 on the low-precision
    values, as under a training loop's ``torch.autocast``."""
    if not p.low:
        return contextlib.nullcontext()
    return _LowPrecision(p)


def rounds_finite(value: float, p: Precision) -> bool:
    """Whether ``value`` stays finite once rounded to ``p`` (fp16: below 65520)."""
    if not math.isfinite(value):
        return False
    return bool(torch.isfinite(torch.tensor(value, dtype=torch.float64).to(DTYPES[p])))


def overflows_at(scale: float, grad_max: float, p: Precision) -> bool:
    """Whether a backward scaled by ``scale`` overflows ``p``, given the largest |gradient|
    ``grad_max`` of its low-precision tensors at scale 1 (non-finite: at every scale)."""
    return not rounds_finite(scale * grad_max, p)


def largest_safe_scale(grad_max: float, p: Precision) -> float | None:
    """The largest power of two ``S`` at which ``S * grad_max`` stays finite in ``p``: the
    largest loss scale this batch takes without a skipped step. None: no scale is safe (the
    gradient is already non-finite at scale 1); inf: any scale is (no gradient)."""
    if not math.isfinite(grad_max):
        return None
    if grad_max == 0:
        return math.inf
    k = math.floor(math.log2(finite_max(p) / grad_max))
    while overflows_at(SCALE_BASE**k, grad_max, p):
        k -= 1
    while not overflows_at(SCALE_BASE ** (k + 1), grad_max, p):
        k += 1
    return SCALE_BASE**k


def scale_text(s: float | None) -> str:
    """A loss scale as the report says it: ``none`` (no safe one), ``any`` (inf), else ``%g``."""
    if s is None:
        return "none"
    return "any" if math.isinf(s) else f"{s:g}"


@dataclass(frozen=True, kw_only=True)
class RangeCount:
    """One tensor computed in a low precision against the same computed in fp32:
    ``max_abs`` the largest finite |value| in fp32, ``overflow`` the values finite in fp32 and
    not in low precision, ``underflow`` those nonzero in fp32 and 0 in low precision, ``numel``
    the values compared."""

    max_abs: float
    overflow: int
    underflow: int
    numel: int


def range_count(low: Tensor, ref: Tensor) -> RangeCount:
    """Compare ``low`` (a low-precision result, any float dtype) with ``ref`` (the same in fp32),
    element by element; both Tensor[...] of one shape."""
    low, ref = low.detach(), ref.detach().float()
    finite = torch.isfinite(ref)
    big = ref.abs().masked_fill(~finite, 0)
    return RangeCount(
        max_abs=float(big.max()) if big.numel() else 0.0,
        overflow=int((finite & ~torch.isfinite(low)).sum()),
        underflow=int(((low == 0) & (ref != 0) & finite).sum()),
        numel=ref.numel(),
    )


def abs_max(t: Tensor | None) -> float:
    """The largest |value| of a gradient (inf or nan when it has any non-finite one; 0 for
    None or empty)."""
    if t is None or t.numel() == 0:
        return 0.0
    t = t.detach()
    if not bool(torch.isfinite(t).all()):
        return math.nan if bool(torch.isnan(t).any()) else math.inf
    return float(t.abs().max())
