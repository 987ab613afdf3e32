"""The MMDetection one-stage presets against MMDetection's own dense heads (skipped without
MMDetection): each head built from its shipped config at random init, the same features; mmdet's
per-level loss lists against the replay's per-level terms of the run's own profile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import factories as F

mmdet = F.framework("mmdet")
F.framework("mmengine")
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from lossdoctor.inputs.dense import dense_preset  # noqa: E402
from lossdoctor.inputs.dense_weights import dense_weights, find_dense_layout  # noqa: E402
from lossdoctor.replay.dense import dense_replay  # noqa: E402
from lossdoctor.vocab import Part  # noqa: E402

REL = 1e-5
CLASSES = 5
SIZE = (128, 160)
STRIDES = (8, 16, 32, 64, 128)
CONFIGS = Path(mmdet.__file__).parent / ".mim" / "configs"
register_all_modules()

# preset → (config, mmdet's loss keys for cls, box, ctr)
CASES = {
    "mmdet-retinanet": ("retinanet/retinanet_r50_fpn_1x_coco.py", ("loss_cls", "loss_bbox")),
    "mmdet-fcos": (
        "fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py",
        ("loss_cls", "loss_bbox", "loss_centerness"),
    ),
    "mmdet-fcos-giou": (
        "fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py",
        ("loss_cls", "loss_bbox", "loss_centerness"),
    ),
    "mmdet-atss": ("atss/atss_r50_fpn_1x_coco.py", ("loss_cls", "loss_bbox", "loss_centerness")),
}


def _head(config: str):
    cfg = Config.fromfile(str(CONFIGS / config)).model
    head = cfg.bbox_head
    head.update(num_classes=CLASSES, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model = MODELS.build(head)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.03 if p.dim() > 1 else 0.1))
    return model.train()


def _inputs(seed: int, n: int, empty, channels: int):
    g = torch.Generator().manual_seed(seed)
    h, w = SIZE
    feats = [torch.randn(n, channels, -(-h // s), -(-w // s), generator=g) for s in STRIDES]
    boxes, labels = [], []
    for i in range(n):
        k = 0 if i in empty else 4
        xy = torch.rand(k, 2, generator=g) * torch.tensor([100.0, 80.0])
        wh = 10 + torch.rand(k, 2, generator=g) * torch.tensor([60.0, 50.0])
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=torch.tensor([159.0, 127.0]))], 1))
        labels.append(torch.randint(0, CLASSES, (k,), generator=g))
    return feats, boxes, labels


def _mm_losses(head, feats, boxes, labels) -> dict[str, list[float]]:
    outs = head(feats)
    gts = [InstanceData(bboxes=b, labels=lab) for b, lab in zip(boxes, labels)]
    metas = [dict(img_shape=SIZE, pad_shape=SIZE, batch_input_shape=SIZE) for _ in boxes]
    losses = head.loss_by_feat(*outs, gts, metas)
    return {k: [float(x.detach()) for x in (v if isinstance(v, list) else [v])]
            for k, v in losses.items()}  # fmt: skip


def _replay(head, preset: str, feats, boxes, labels):
    sd = {f"bbox_head.{k}": v for k, v in head.state_dict().items()}
    batch = F.dense_batch_of(feats, boxes, labels, SIZE)
    cfg = dense_preset(preset)
    r = dense_replay(dense_weights(sd, find_dense_layout(sd)), batch, cfg, [cfg.profile])
    return r.losses[cfg.profile.name]


@pytest.mark.parametrize("preset", list(CASES))
@pytest.mark.parametrize("empty", [(), (1,), (0, 1)])
def test_mmdet_dense_per_level_losses_match_the_replay(preset, empty):
    config, keys = CASES[preset]
    head = _head(config)
    feats, boxes, labels = _inputs(21, 2, empty, head.in_channels)
    want = _mm_losses(head, feats, boxes, labels)
    got = _replay(head, preset, feats, boxes, labels)
    for key, part in zip(keys, (Part.CLS, Part.BOX, Part.CTR)):
        levels = [float(lv.terms[part]) for lv in got.levels]
        if len(want[key]) == 1:  # a head that sums its levels (FCOS)
            levels = [sum(levels)]
        assert levels == pytest.approx(want[key], rel=REL, abs=1e-7), (key, levels, want[key])
    assert sum(want[keys[0]]) > 0.1


@pytest.mark.parametrize("preset", list(CASES))
def test_config_from_prints_the_dense_config_inspect_takes(tmp_path, preset):
    """`config-from mmdet` on a one-stage config prints its dense head's config as TOML, which
    `--config` reads back to the preset's own numbers."""
    from typer.testing import CliRunner

    from lossdoctor.cli import app
    from lossdoctor.inputs.dense import load_dense_config

    r = CliRunner().invoke(app, ["config-from", "mmdet", str(CONFIGS / CASES[preset][0])])
    assert r.exit_code == 0, r.output
    (tmp_path / "d.toml").write_text(r.stdout)
    got, want = load_dense_config(tmp_path / "d.toml"), dense_preset(preset)
    assert got.kind is want.kind and got.profile == want.profile
    assert (got.box_loss, got.regress_ranges) == (want.box_loss, want.regress_ranges)
    # (the live generator's scales are float32)
    sizes = [s for level in got.anchors.sizes for s in level]
    assert sizes == pytest.approx([s for level in want.anchors.sizes for s in level], rel=1e-6)
