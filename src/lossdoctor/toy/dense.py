"""The tiny one-stage detector: the tiny detector's backbone and FPN (P3-P6 used), and a
RetinaNet head under torchvision's key names, trained with lossdoctor's dense replay as its
loss."""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from ..inputs.batch import Batch
from ..inputs.dataclass_toml import to_dict
from ..inputs.dense import DenseConfig, DenseProfile, torchvision_retinanet
from ..inputs.dense_weights import DenseWeights, dense_weights, find_dense_layout
from ..replay.dense import dense_replay
from .data import batch_of
from .model import CHANNELS, NUM_CLASSES, fpn_features, tiny_backbone

LEVELS = ("p3", "p4", "p5")
DENSE_STRIDES = (8, 16, 32)
# three octave scales from 1.5x the stride (the objects are 5-110 px)
ANCHOR_BASE = 1.5
CONVS = 2
ANCHORS = 9
PRIOR = 0.01


def toy_dense_config() -> DenseConfig:
    """torchvision's RetinaNet rules with anchors scaled to 128-192 px images."""
    sizes = tuple(
        tuple(float(int(s * ANCHOR_BASE * 2 ** (k / 3))) for k in range(3)) for s in DENSE_STRIDES
    )
    base = torchvision_retinanet()
    return dataclasses.replace(base, name="toy-retinanet", strides=DENSE_STRIDES,
                               anchors=dataclasses.replace(base.anchors, sizes=sizes))  # fmt: skip


def toy_dense_table() -> dict:
    """:func:`toy_dense_config` as a dump's ``meta["dense"]["config"]`` records it."""
    return to_dict(toy_dense_config())


def _tower(channels: int) -> nn.Sequential:
    return nn.Sequential(
        *(nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.ReLU()) for _ in range(CONVS))
    )


class TinyRetinaNet(nn.Module):
    """State-dict keys follow torchvision's RetinaNet: ``head.classification_head.conv.K.0``,
    ``.cls_logits``, ``head.regression_head.conv.K.0``, ``.bbox_reg``."""

    def __init__(self, channels: int = CHANNELS, classes: int = NUM_CLASSES):
        super().__init__()
        self.backbone = tiny_backbone(channels)
        self.head = nn.Module()
        self.head.classification_head = nn.Module()
        self.head.classification_head.conv = _tower(channels)
        self.head.classification_head.cls_logits = nn.Conv2d(channels, ANCHORS * classes, 3, 1, 1)
        self.head.regression_head = nn.Module()
        self.head.regression_head.conv = _tower(channels)
        self.head.regression_head.bbox_reg = nn.Conv2d(channels, ANCHORS * 4, 3, 1, 1)
        for m in self.head.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.head.classification_head.cls_logits.bias,
                          -math.log((1 - PRIOR) / PRIOR))  # fmt: skip

    def features(self, images) -> dict:
        feats = fpn_features(self.backbone, images)
        return {k: feats[k] for k in LEVELS}


def live_dense(model: TinyRetinaNet) -> DenseWeights:
    """The dense head whose tensors are the model's nn.Parameters (training updates them)."""
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    w = dense_weights(sd, find_dense_layout(sd))
    live = dict(model.named_parameters())
    return dataclasses.replace(w, params={n: live[key] for n, key in w.keys.items()})


def dense_batch(model: TinyRetinaNet, images, sizes, boxes, labels) -> Batch:
    """A replay Batch whose features keep their graph to the backbone."""
    return batch_of(model.features(images), images, sizes, boxes, labels, DENSE_STRIDES)


def dense_loss(model: TinyRetinaNet, data, profile: DenseProfile):
    """One step's loss under ``profile`` → (loss, the Batch it was computed on)."""
    images, sizes, boxes, labels = data
    b = dense_batch(model, images, sizes, boxes, labels)
    r = dense_replay(live_dense(model), b, toy_dense_config(), [profile])
    return r.losses[profile.name].total, b
