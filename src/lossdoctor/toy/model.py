"""The tiny detector: a 5-stage conv backbone, an FPN with P2-P6, and the native RPN and box
heads."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..inputs.checkpoint import heads_from_state_dict
from ..inputs.config import DetectorConfig, ProposalConfig, SamplerConfig, preset, replace
from ..inputs.dataclass_toml import to_dict
from ..vocab import BIAS, WEIGHT, Ranking, param

CHANNELS = 32
STRIDES = (4, 8, 16, 32, 64)
NUM_CLASSES = 3
POOL = 7
HIDDEN = 128
ANCHOR_SIZES = ((8.0,), (16.0,), (32.0,), (64.0,), (128.0,))


def toy_config() -> DetectorConfig:
    """torchvision's rules, scaled to 128-192 px images: anchors 8-128 px, smaller budgets.
    Proposals are ranked by logit (as Detectron2 does), which is how the reproduction ran."""
    base = preset("torchvision")
    return replace(
        base,
        name="toy",
        ranking=Ranking.DETECTRON2,
        anchors=replace(base.anchors, sizes=ANCHOR_SIZES),
        train_proposals=ProposalConfig(600, 300),
        test_proposals=ProposalConfig(300, 100),
        roi_sampler=SamplerConfig(128, 0.25, True),
    )


def toy_config_table() -> dict:
    """:func:`toy_config` as a TOML table and a dump's ``meta["config"]`` record it."""
    return {"base": "torchvision", **to_dict(toy_config())}


def _conv(cin, cout, stride):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.ReLU(inplace=True)
    )


class TinyDetector(nn.Module):
    """State-dict keys follow torchvision: ``backbone.*``, ``rpn.head.*``,
    ``roi_heads.box_head.fc6/fc7``, ``roi_heads.box_predictor.cls_score/bbox_pred`` (background
    in column 0)."""

    def __init__(self, channels: int = CHANNELS, classes: int = NUM_CLASSES):
        super().__init__()
        self.backbone = tiny_backbone(channels)
        self.rpn = nn.Module()
        self.rpn.head = nn.Module()
        self.rpn.head.conv = nn.Sequential(nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1)))
        a = 3
        self.rpn.head.cls_logits = nn.Conv2d(channels, a, 1)
        self.rpn.head.bbox_pred = nn.Conv2d(channels, 4 * a, 1)
        self.roi_heads = nn.Module()
        self.roi_heads.box_head = nn.Module()
        self.roi_heads.box_head.fc6 = nn.Linear(channels * POOL * POOL, HIDDEN)
        self.roi_heads.box_head.fc7 = nn.Linear(HIDDEN, HIDDEN)
        self.roi_heads.box_predictor = nn.Module()
        self.roi_heads.box_predictor.cls_score = nn.Linear(HIDDEN, classes + 1)
        self.roi_heads.box_predictor.bbox_pred = nn.Linear(HIDDEN, 4 * (classes + 1))
        for m in (self.rpn.head.conv[0][0], self.rpn.head.cls_logits, self.rpn.head.bbox_pred):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.roi_heads.box_predictor.cls_score.weight, std=0.01)
        nn.init.normal_(self.roi_heads.box_predictor.bbox_pred.weight, std=0.001)
        for m in (self.roi_heads.box_predictor.cls_score, self.roi_heads.box_predictor.bbox_pred):
            nn.init.zeros_(m.bias)

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """images [N, 3, H, W] (H, W multiples of 32) → {"p2": ..., "p6": ...}, each
        [N, C, H/s, W/s]."""
        return fpn_features(self.backbone, images)


def tiny_backbone(channels: int) -> nn.Module:
    """A 5-stage conv body (strides 2-32) and an FPN's lateral and output convs."""
    widths = (16, 24, 32, 48, 64)
    backbone = nn.Module()
    backbone.body = nn.ModuleList(
        [_conv(3, widths[0], 2)] + [_conv(a, b, 2) for a, b in zip(widths, widths[1:])]
    )
    backbone.lateral = nn.ModuleList([nn.Conv2d(w, channels, 1) for w in widths[1:]])
    backbone.output = nn.ModuleList([nn.Conv2d(channels, channels, 3, 1, 1) for _ in widths[1:]])
    return backbone


def fpn_features(backbone: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """images [N, 3, H, W] (H, W multiples of 32) → {"p2": ..., "p6": ...}, each
    [N, C, H/s, W/s]."""
    x = images
    stages = []
    for layer in backbone.body:
        x = layer(x)
        stages.append(x)
    c = stages[1:]  # strides 4, 8, 16, 32
    lat = [conv(t) for conv, t in zip(backbone.lateral, c)]
    for i in range(len(lat) - 2, -1, -1):
        lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
    outs = [o(t) for o, t in zip(backbone.output, lat)]
    outs.append(F.max_pool2d(outs[-1], 1, 2))
    return {f"p{k + 2}": t for k, t in enumerate(outs)}


def live_heads(model: TinyDetector):
    """HeadWeights whose tensors are the model's nn.Parameters (so training updates them)."""
    import dataclasses

    sd = dict(model.named_parameters())
    heads = heads_from_state_dict(
        {k: v.detach() for k, v in sd.items() if not k.startswith("backbone.")}
    )
    params = {}
    for layer, prefix in heads.keys.items():
        for kind in (WEIGHT, BIAS):
            params[param(layer, kind)] = sd[f"{prefix}.{kind}"]
    return dataclasses.replace(heads, params=params)
