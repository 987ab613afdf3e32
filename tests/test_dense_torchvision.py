"""The one-stage presets against torchvision's own RetinaNet (v1, v2) and FCOS (skipped without
torchvision): the same random-init head, the same features, the framework's loss dict against the
replay's terms of the run's own profile."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import factories as F

tv = F.framework("torchvision")
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.fcos import FCOS, FCOSHead  # noqa: E402
from torchvision.models.detection.retinanet import (  # noqa: E402
    RetinaNet,
    RetinaNetHead,
    _default_anchorgen,
)

from lossdoctor.inputs.dense import dense_preset  # noqa: E402
from lossdoctor.inputs.dense_weights import dense_weights, find_dense_layout  # noqa: E402
from lossdoctor.replay.dense import dense_replay  # noqa: E402
from lossdoctor.vocab import Part  # noqa: E402

REL = 1e-5
CHANNELS, CLASSES = 64, 5
SIZE = (128, 160)
STRIDES = (8, 16, 32, 64, 128)


class Features(torch.nn.Module):
    """A backbone that returns the given FPN features whatever the images."""

    def __init__(self, feats):
        super().__init__()
        self.feats, self.out_channels = feats, CHANNELS

    def forward(self, x):
        return OrderedDict((str(k), f) for k, f in enumerate(self.feats))


def _features(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = SIZE
    return [torch.randn(n, CHANNELS, -(-h // s), -(-w // s), generator=g) for s in STRIDES]


def _targets(n: int, seed: int, empty: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for i in range(n):
        k = 0 if i in empty else 4
        xy = torch.rand(k, 2, generator=g) * torch.tensor([100.0, 80.0])
        wh = 8 + torch.rand(k, 2, generator=g) * torch.tensor([60.0, 50.0])
        boxes = torch.cat([xy, (xy + wh).clamp(max=torch.tensor([159.0, 127.0]))], 1)
        labels = torch.randint(0, CLASSES, (k,), generator=g)
        out.append(dict(boxes=boxes, labels=labels))
    return out


def _randomize(model, seed: int) -> None:
    """Random weights far from the init, so every term is large and matched anchors vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.head.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 0.1))


def _tv_losses(model, feats, targets):
    model.train()
    model.backbone = Features(feats)
    images = [torch.zeros(3, *SIZE) for _ in targets]
    return {k: float(v.detach()) for k, v in model(images, [dict(t) for t in targets]).items()}


def _batch(feats, targets):
    return F.dense_batch_of(
        feats, [t["boxes"] for t in targets], [t["labels"] for t in targets], SIZE
    )


def _replay_terms(model, preset: str, feats, targets) -> dict[Part, float]:
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    lay = find_dense_layout(sd)
    cfg = dense_preset(preset)
    r = dense_replay(dense_weights(sd, lay), _batch(feats, targets), cfg, [cfg.profile])
    losses = r.losses[cfg.profile.name]
    return {p: float(losses.term(p)) for p in (Part.CLS, Part.BOX, Part.CTR)}


def _retinanet(v2: bool):
    anchors = _default_anchorgen()
    norm = (lambda c: torch.nn.GroupNorm(32, c)) if v2 else None
    head = RetinaNetHead(CHANNELS, anchors.num_anchors_per_location()[0], CLASSES, norm_layer=norm)
    if v2:
        head.regression_head._loss_type = "giou"
    model = RetinaNet(Features([]), CLASSES, min_size=SIZE[0], max_size=SIZE[1],
                      anchor_generator=anchors, head=head)  # fmt: skip
    _randomize(model, 3)
    return model


def _fcos():
    anchors = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))
    head = FCOSHead(CHANNELS, 1, CLASSES)
    model = FCOS(Features([]), CLASSES, min_size=SIZE[0], max_size=SIZE[1],
                 anchor_generator=anchors, head=head)  # fmt: skip
    _randomize(model, 4)
    return model


CASES = {
    "torchvision-retinanet": (lambda: _retinanet(False), ("classification", "bbox_regression")),
    "torchvision-retinanet-v2": (lambda: _retinanet(True), ("classification", "bbox_regression")),
    "torchvision-fcos": (_fcos, ("classification", "bbox_regression", "bbox_ctrness")),
}


@pytest.mark.parametrize("preset", list(CASES))
@pytest.mark.parametrize("empty", [(), (1,), (0, 1)])
def test_torchvision_dense_losses_match_the_replay(preset, empty):
    build, keys = CASES[preset]
    model = build()
    feats, targets = _features(2, 7), _targets(2, 7, empty)
    want = _tv_losses(model, feats, targets)
    got = _replay_terms(model, preset, feats, targets)
    assert want[keys[0]] > 0.1  # every image has negatives
    assert (want[keys[1]] > 0.01) == (len(empty) < 2)  # positives unless every image is empty
    for key, part in zip(keys, (Part.CLS, Part.BOX, Part.CTR)):
        assert got[part] == pytest.approx(want[key], rel=REL, abs=1e-7), (key, got, want)
