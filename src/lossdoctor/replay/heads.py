"""The RPN head and the box head (two FCs + predictors), as pure functions of the weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..inputs.checkpoint import HeadWeights


@dataclass
class RpnLevelOutput:
    """One level. hidden: Tensor[N, C, H, W] (after conv + ReLU); logits: Tensor[N, H*W*A];
    deltas: Tensor[N, H*W*A, 4], anchors ordered (y, x, a) like the anchor grid."""

    hidden: Tensor
    logits: Tensor
    deltas: Tensor


def rpn_hidden(feature: Tensor, w: HeadWeights) -> Tensor:
    """3x3 conv + ReLU: Tensor[N, C, H, W] → Tensor[N, C, H, W]."""
    p = w.params
    return F.relu(F.conv2d(feature, p["rpn_conv.weight"], p["rpn_conv.bias"], padding=1))


def rpn_predict(hidden: Tensor, w: HeadWeights) -> tuple[Tensor, Tensor]:
    """1x1 objectness and box convs → (logits Tensor[N, H*W*A], deltas Tensor[N, H*W*A, 4])."""
    p = w.params
    n, _, h, wd = hidden.shape
    a = w.num_anchors
    logits = (
        F.conv2d(hidden, p["rpn_cls.weight"], p["rpn_cls.bias"]).permute(0, 2, 3, 1).reshape(n, -1)
    )
    deltas = F.conv2d(hidden, p["rpn_reg.weight"], p["rpn_reg.bias"])
    deltas = deltas.view(n, a, 4, h, wd).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
    return logits, deltas


def rpn_head(feature: Tensor, w: HeadWeights) -> RpnLevelOutput:
    hidden = rpn_hidden(feature, w)
    logits, deltas = rpn_predict(hidden, w)
    return RpnLevelOutput(hidden, logits, deltas)


def box_hidden(pooled: Tensor, w: HeadWeights) -> tuple[Tensor, Tensor]:
    """Tensor[R, C, P, P] → (after fc1 + ReLU, after fc2 + ReLU), each Tensor[R, F]."""
    p = w.params
    h1 = F.relu(F.linear(pooled.flatten(1), p["fc1.weight"], p["fc1.bias"]))
    return h1, F.relu(F.linear(h1, p["fc2.weight"], p["fc2.bias"]))


def box_predict(hidden: Tensor, w: HeadWeights) -> tuple[Tensor, Tensor]:
    """Tensor[R, F] → (class logits Tensor[R, K+1], deltas Tensor[R, reg_classes, 4])."""
    p = w.params
    cls = F.linear(hidden, p["cls.weight"], p["cls.bias"])
    reg = F.linear(hidden, p["reg.weight"], p["reg.bias"])
    return cls, reg.view(hidden.shape[0], reg.shape[1] // 4, 4)
