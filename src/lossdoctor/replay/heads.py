"""The RPN head and the box head (two FCs + predictors), as pure functions of the weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..inputs.checkpoint import BOX_COORDS, HeadWeights
from ..vocab import Layer

# the RPN's 3x3 conv keeps the feature size
RPN_CONV_PADDING = 1


@dataclass(kw_only=True)
class RpnLevelOutput:
    """One level. hidden: Tensor[N, C, H, W] (after conv + ReLU); logits: Tensor[N, H*W*A];
    deltas: Tensor[N, H*W*A, 4], anchors ordered (y, x, a) like the anchor grid."""

    hidden: Tensor
    logits: Tensor
    deltas: Tensor


def rpn_hidden(feature: Tensor, w: HeadWeights) -> Tensor:
    """3x3 conv + ReLU: Tensor[N, C, H, W] → Tensor[N, C, H, W]."""
    conv = F.conv2d(
        feature, w.weight(Layer.RPN_CONV), w.bias(Layer.RPN_CONV), padding=RPN_CONV_PADDING
    )
    return F.relu(conv)


def rpn_predict(hidden: Tensor, w: HeadWeights) -> tuple[Tensor, Tensor]:
    """1x1 objectness and box convs → (logits Tensor[N, H*W*A], deltas Tensor[N, H*W*A, 4])."""
    n, _, h, wd = hidden.shape
    a = w.num_anchors
    logits = F.conv2d(hidden, w.weight(Layer.RPN_LOGITS), w.bias(Layer.RPN_LOGITS))
    logits = logits.permute(0, 2, 3, 1).reshape(n, -1)
    deltas = F.conv2d(hidden, w.weight(Layer.RPN_DELTAS), w.bias(Layer.RPN_DELTAS))
    deltas = deltas.view(n, a, BOX_COORDS, h, wd).permute(0, 3, 4, 1, 2).reshape(n, -1, BOX_COORDS)
    return logits, deltas


def rpn_head(feature: Tensor, w: HeadWeights) -> RpnLevelOutput:
    hidden = rpn_hidden(feature, w)
    logits, deltas = rpn_predict(hidden, w)
    return RpnLevelOutput(hidden=hidden, logits=logits, deltas=deltas)


def box_hidden(pooled: Tensor, w: HeadWeights) -> tuple[Tensor, Tensor]:
    """Tensor[R, C, P, P] → (after fc1 + ReLU, after fc2 + ReLU), each Tensor[R, F]."""
    h1 = F.relu(F.linear(pooled.flatten(1), w.weight(Layer.BOX_FC1), w.bias(Layer.BOX_FC1)))
    return h1, F.relu(F.linear(h1, w.weight(Layer.BOX_FC2), w.bias(Layer.BOX_FC2)))


def box_predict(hidden: Tensor, w: HeadWeights) -> tuple[Tensor, Tensor]:
    """Tensor[R, F] → (class logits Tensor[R, K+1], deltas Tensor[R, reg_classes, 4])."""
    cls = F.linear(hidden, w.weight(Layer.BOX_LOGITS), w.bias(Layer.BOX_LOGITS))
    reg = F.linear(hidden, w.weight(Layer.BOX_DELTAS), w.bias(Layer.BOX_DELTAS))
    return cls, reg.view(hidden.shape[0], reg.shape[1] // BOX_COORDS, BOX_COORDS)
