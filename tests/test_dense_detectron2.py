"""The Detectron2 RetinaNet preset against Detectron2's own RetinaNet (skipped without
Detectron2): its config's head at random init, the same features; three training steps in a row,
so its EMA normalizer moves, each replayed with the running value recorded before the step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import factories as F

d2 = F.framework("detectron2")
from detectron2.config import get_cfg  # noqa: E402
from detectron2.model_zoo import get_config_file  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, ImageList, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from lossdoctor.inputs.dense import EMA_INITIAL, dense_preset  # noqa: E402
from lossdoctor.inputs.dense_weights import dense_weights, find_dense_layout  # noqa: E402
from lossdoctor.replay.dense import dense_replay  # noqa: E402
from lossdoctor.vocab import Part  # noqa: E402

REL = 1e-5
CLASSES = 5
SIZE = (128, 160)
STRIDES = (8, 16, 32, 64, 128)


def _model():
    cfg = get_cfg()
    cfg.merge_from_file(get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RETINANET.NUM_CLASSES = CLASSES
    model = build_model(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.03 if p.dim() > 1 else 0.1))
    return model.train()


def _step_inputs(seed: int, n: int = 2, empty=()):
    g = torch.Generator().manual_seed(seed)
    h, w = SIZE
    feats = [torch.randn(n, 256, -(-h // s), -(-w // s), generator=g) for s in STRIDES]
    boxes, labels = [], []
    for i in range(n):
        k = 0 if i in empty else 3 + seed % 3
        xy = torch.rand(k, 2, generator=g) * torch.tensor([100.0, 80.0])
        wh = 10 + torch.rand(k, 2, generator=g) * torch.tensor([60.0, 50.0])
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=torch.tensor([159.0, 127.0]))], 1))
        labels.append(torch.randint(0, CLASSES, (k,), generator=g))
    return feats, boxes, labels


def _d2_losses(model, feats, boxes, labels) -> dict[str, float]:
    images = ImageList(torch.zeros(len(boxes), 3, *SIZE), [SIZE] * len(boxes))
    gts = []
    for b, lab in zip(boxes, labels):
        inst = Instances(SIZE)
        inst.gt_boxes, inst.gt_classes = Boxes(b), lab
        gts.append(inst)
    with EventStorage():
        out = model.forward_training(images, feats, model.head(feats), gts)
    return {k: float(v.detach()) for k, v in out.items()}


def _replay(model, feats, boxes, labels, before):
    sd = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    batch = F.dense_batch_of(feats, boxes, labels, SIZE)
    cfg = dense_preset("detectron2-retinanet")
    w = dense_weights(sd, find_dense_layout(sd))
    r = dense_replay(w, batch, cfg, [cfg.profile], ema_before=before)
    return r.losses[cfg.profile.name]


def test_detectron2_retinanet_losses_match_over_three_steps_of_its_ema_normalizer():
    model = _model()
    seen = []
    for step, empty in enumerate([(), (0, 1), (1,)]):
        before = getattr(model, "loss_normalizer", None)
        feats, boxes, labels = _step_inputs(11 + step, empty=empty)
        want = _d2_losses(model, feats, boxes, labels)
        got = _replay(model, feats, boxes, labels, before)
        assert float(got.term(Part.CLS)) == pytest.approx(want["loss_cls"], rel=REL)
        assert float(got.term(Part.BOX)) == pytest.approx(want["loss_box_reg"], rel=REL, abs=1e-8)
        # the divisor the replay reports is the model's updated running value
        assert got.levels[0].avg_factor[Part.CLS] == pytest.approx(model.loss_normalizer)
        seen.append(model.loss_normalizer)
    # a step without positives pulls the running value towards 1
    assert seen[1] == pytest.approx(0.9 * seen[0] + 0.1) and seen[0] != EMA_INITIAL
    assert Path(get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")).is_file()


def test_config_from_prints_the_retinanet_config_inspect_takes(tmp_path):
    from typer.testing import CliRunner

    from lossdoctor.cli import app
    from lossdoctor.inputs.dense import load_dense_config

    path = get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    r = CliRunner().invoke(app, ["config-from", "detectron2", path])
    assert r.exit_code == 0, r.output
    (tmp_path / "d.toml").write_text(r.stdout)
    got, want = load_dense_config(tmp_path / "d.toml"), dense_preset("detectron2-retinanet")
    assert (got.kind, got.box_loss, got.beta, got.profile) == (
        want.kind, want.box_loss, want.beta, want.profile)  # fmt: skip
    sizes = [s for level in got.anchors.sizes for s in level]
    assert sizes == pytest.approx([s for level in want.anchors.sizes for s in level], rel=1e-4)
