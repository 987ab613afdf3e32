"""The RPN head, the box head and the conv blocks they are built of, as pure functions of the
weights.

RPN head: one or two 3x3 convs + ReLU, then the objectness and box 1x1 convs. Box head: up to four
conv blocks (3x3 conv, its normalization where it has one, ReLU), then one or two fcs + ReLU,
then the predictors."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..inputs.checkpoint import BOX_COORDS, HeadWeights
from ..inputs.config import DetectorConfig, HeadNormConfig, Res5Config
from ..vocab import DH_RES, NORM_OF, RES5_BLOCKS, RES5_SHORTCUT, Layer
from .precision import autocast

# the RPN's 3x3 conv keeps the feature size
RPN_CONV_PADDING = 1
# res5's first block halves the RoI side
RES5_STRIDE = 2
DEFAULT_RES5 = Res5Config()


@dataclass(kw_only=True)
class RpnLevelOutput:
    """One level. hidden: Tensor[N, C, H, W] (after conv + ReLU); logits: Tensor[N, H*W*A];
    deltas: Tensor[N, H*W*A, 4], anchors ordered (y, x, a) like the anchor grid."""

    hidden: Tensor
    logits: Tensor
    deltas: Tensor


def rpn_hidden(feature: Tensor, w: HeadWeights) -> Tensor:
    """Each 3x3 conv + ReLU: Tensor[N, C, H, W] → Tensor[N, C, H, W]."""
    x = feature
    for conv in w.rpn_convs:
        x = F.relu(F.conv2d(x, w.weight(conv), w.bias(conv), padding=RPN_CONV_PADDING))
    return x.float()  # fp32 copies of the layers' outputs stay in the graph (see rpn_head)


def standardized(weight: Tensor, eps: float) -> Tensor:
    """MMDetection's ConvWS: each output channel's weights Tensor[O, I, k, k] less their mean,
    over their (unbiased) standard deviation + eps."""
    flat = weight.flatten(1)
    mean, std = flat.mean(1), flat.std(1)
    return (weight - mean[:, None, None, None]) / (std[:, None, None, None] + eps)


def head_norm(x: Tensor, w: HeadWeights, layer: Layer, cfg: HeadNormConfig, train: bool) -> Tensor:
    """A conv's normalization, Tensor[R, C, S, S] → same: GroupNorm, or BatchNorm by the batch's
    statistics in training (``cfg.batch_stats``) and by its running statistics otherwise."""
    if x.shape[0] == 0:
        return x
    weight, bias = w.weight(layer), w.bias(layer)
    running = w.running(layer)
    if running is None:
        return F.group_norm(x, cfg.groups, weight, bias, cfg.eps)
    batch = train and cfg.batch_stats
    mean, var = (None, None) if batch else running
    return F.batch_norm(x, mean, var, weight, bias, training=batch, eps=cfg.eps)


def conv_block(
    x: Tensor, w: HeadWeights, conv: Layer, cfg: HeadNormConfig, *, train: bool = True
) -> Tensor:
    """3x3 conv (its weights standardized where ``cfg.weight_std``), its normalization where the
    head has one, ReLU: Tensor[R, C, S, S] → Tensor[R, C', S, S]."""
    weight = w.weight(conv)
    if cfg.weight_std:
        weight = standardized(weight, cfg.weight_std_eps)
    x = F.conv2d(x, weight, w.bias(conv), padding=RPN_CONV_PADDING)
    norm = w.norm_of(conv)
    return F.relu(x if norm is None else head_norm(x, w, norm, cfg, train))


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
    """The RPN head on one level, its layers in the heads' precision; every output in fp32 (an
    exact copy of the low-precision values: the losses then compute in fp32, as autocast has
    them, and the next layer casts the copy back exactly, so the gradient of each copy is the
    one the low-precision backward carries)."""
    with autocast(w.precision):
        hidden = rpn_hidden(feature, w)
        logits, deltas = rpn_predict(hidden, w)
    return RpnLevelOutput(hidden=hidden.float(), logits=logits.float(), deltas=deltas.float())


def _res_conv(x: Tensor, w: HeadWeights, conv: Layer, cfg: HeadNormConfig, train: bool, **kw):
    """One conv of a res5 block and its norm (no ReLU)."""
    return head_norm(F.conv2d(x, w.weight(conv), w.bias(conv), **kw), w, NORM_OF[conv], cfg, train)


def res5_head(
    pooled: Tensor, w: HeadWeights, cfg: HeadNormConfig, res5: Res5Config, *, train: bool = True
) -> Tensor:
    """ResNet's res5 on the RoIs, then the mean over its output: Tensor[R, C, S, S] →
    Tensor[R, C']. Each bottleneck block: 1x1, 3x3, 1x1 convs with their norms, ReLU after the
    first two and after the sum with the shortcut (the first block's: a strided 1x1 conv)."""
    train = train and not res5.frozen_norm
    x = pooled
    for b, (c1, c2, c3) in enumerate(RES5_BLOCKS):
        stride = RES5_STRIDE if b == 0 else 1
        s1, s2 = (stride, 1) if res5.stride_in_1x1 else (1, stride)
        out = F.relu(_res_conv(x, w, c1, cfg, train, stride=s1))
        out = F.relu(_res_conv(out, w, c2, cfg, train, stride=s2, padding=RPN_CONV_PADDING))
        out = _res_conv(out, w, c3, cfg, train)
        short = _res_conv(x, w, RES5_SHORTCUT, cfg, train, stride=stride) if b == 0 else x
        x = F.relu(out + short)
    return x.mean((2, 3))


def box_hidden(
    pooled: Tensor,
    w: HeadWeights,
    cfg: HeadNormConfig,
    *,
    train: bool = True,
    res5: Res5Config = DEFAULT_RES5,
) -> tuple[Tensor, Tensor]:
    """Tensor[R, C, S, S] → (after fc1 + ReLU, after the last fc + ReLU), each Tensor[R, F]:
    the conv blocks first, where the head has them (in training mode unless ``train`` is
    false: a BatchNorm then uses its running statistics). A res5 head gives its pooled output
    as both."""
    if w.res5:
        hidden = res5_head(pooled, w, cfg, res5, train=train).float()
        return hidden, hidden
    x = pooled
    for conv in w.box_convs:
        x = conv_block(x, w, conv, cfg, train=train)
    fcs = w.box_fcs
    h1 = F.relu(F.linear(x.flatten(1), w.weight(fcs[0]), w.bias(fcs[0]))).float()
    hidden = h1
    for fc in fcs[1:]:
        hidden = F.relu(F.linear(hidden, w.weight(fc), w.bias(fc))).float()
    return h1, hidden


def box_predict(
    hidden: Tensor, w: HeadWeights, hidden_reg: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Tensor[R, F] (and a double head's regression features Tensor[R, F']) → (class logits
    Tensor[R, K+1], deltas Tensor[R, reg_classes, 4])."""
    hidden_reg = hidden if hidden_reg is None else hidden_reg
    cls = F.linear(hidden, w.weight(Layer.BOX_LOGITS), w.bias(Layer.BOX_LOGITS))
    reg = F.linear(hidden_reg, w.weight(Layer.BOX_DELTAS), w.bias(Layer.BOX_DELTAS))
    return cls, reg.view(hidden.shape[0], reg.shape[1] // BOX_COORDS, BOX_COORDS)


def _bottleneck(x: Tensor, w: HeadWeights, block, cfg: HeadNormConfig, train: bool) -> Tensor:
    """A bottleneck that keeps its input's width: 1x1, 3x3, 1x1 convs with norms, the sum."""
    c1, c2, c3 = block
    out = F.relu(_res_conv(x, w, c1, cfg, train))
    out = F.relu(_res_conv(out, w, c2, cfg, train, padding=RPN_CONV_PADDING))
    return F.relu(_res_conv(out, w, c3, cfg, train) + x)


def double_head_reg(pooled: Tensor, w: HeadWeights, cfg: HeadNormConfig, train: bool) -> Tensor:
    """A double head's regression branch on the scaled RoIs' features Tensor[R, C, S, S] →
    Tensor[R, C']: its residual block (3x3 and 1x1 convs, plus a 1x1 projection of the input),
    its bottlenecks, the mean over the RoI (MMDetection's AvgPool2d over the whole P x P)."""
    conv1, conv2, identity = DH_RES
    out = _res_conv(F.relu(_res_conv(pooled, w, conv1, cfg, train, padding=RPN_CONV_PADDING)),
                    w, conv2, cfg, train)  # fmt: skip
    x = F.relu(out + _res_conv(pooled, w, identity, cfg, train))
    for block in w.dh_blocks:
        x = _bottleneck(x, w, block, cfg, train)
    return x.mean((2, 3))


@dataclass(kw_only=True)
class BoxOutputs:
    """The box head on R RoIs: hidden1, hidden Tensor[R, F] (after fc1 and after the last fc; a
    res5 head's pooled output as both); hidden_reg Tensor[R, F'] what the box regressor takes
    (``hidden``, but a double head's regression branch); cls Tensor[R, K+1]; deltas
    Tensor[R, reg_classes, 4]."""

    hidden1: Tensor
    hidden: Tensor
    hidden_reg: Tensor
    cls: Tensor
    deltas: Tensor


def box_head(
    pooled: Tensor,
    pooled_reg: Tensor | None,
    w: HeadWeights,
    config: DetectorConfig,
    *,
    train: bool = True,
) -> BoxOutputs:
    """The whole box head on pooled RoIs Tensor[R, C, S, S] (and, for a double head, the same
    RoIs scaled for its regression branch), in training mode unless ``train`` is false; its
    layers in the heads' precision, its outputs in fp32 (as :func:`rpn_head`)."""
    with autocast(w.precision):
        hidden1, hidden = box_hidden(pooled, w, config.head_norm, train=train, res5=config.res5)
        hidden_reg = hidden
        if w.double_head:
            hidden_reg = double_head_reg(pooled_reg, w, config.head_norm, train)
        cls, deltas = box_predict(hidden, w, hidden_reg)
    return BoxOutputs(hidden1=hidden1.float(), hidden=hidden.float(),
                      hidden_reg=hidden_reg.float(), cls=cls.float(),
                      deltas=deltas.float())  # fmt: skip
