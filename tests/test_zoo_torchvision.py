"""Every detection model torchvision ships, from its own builder (random init, a synthetic batch
of crowded GT, samplers taking every candidate): captured from one training step and replayed
term by term equal to torchvision's own loss dict, or refused by name at capture, ``check`` and
``inspect`` (never replayed wrong, never an internal error). Each outcome is a row of
docs/coverage.md's table (``LOSSDOCTOR_COVERAGE``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import factories as F

tv = F.framework("torchvision")
from torchvision.models import detection as D  # noqa: E402

from lossdoctor.adapters import torchvision as ld  # noqa: E402
from lossdoctor.inputs.checkpoint import heads_from_state_dict  # noqa: E402
from lossdoctor.inputs.errors import InputError  # noqa: E402

EVERY = 10**6  # a sampler budget no batch reaches: torchvision keeps every candidate
REL = 1e-5
CLASSES = 4  # torchvision counts the background
KEYPOINTS = 17
TERMS = {"rpn_cls": "loss_objectness", "rpn_box": "loss_rpn_box_reg",
         "roi_cls": "loss_classifier", "roi_box": "loss_box_reg"}  # fmt: skip
# a one-stage model's terms (FCOS has centerness)
DENSE_TERMS = {"dense_cls": "classification", "dense_box": "bbox_regression",
               "dense_ctr": "bbox_ctrness"}  # fmt: skip
SMALL = {"min_size": 160, "max_size": 224}
TWO_STAGE = {"rpn_batch_size_per_image": EVERY, "box_batch_size_per_image": EVERY}

# builder → (outcome, the words a refusal must carry)
MODELS = {
    "fasterrcnn_resnet50_fpn": ("exact", ""),
    "fasterrcnn_mobilenet_v3_large_fpn": ("exact", ""),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("exact", ""),
    "maskrcnn_resnet50_fpn": ("exact", ""),
    "keypointrcnn_resnet50_fpn": ("partial", ""),
    "fasterrcnn_resnet50_fpn_v2": ("exact", ""),
    "maskrcnn_resnet50_fpn_v2": ("exact", ""),
    "retinanet_resnet50_fpn": ("exact", ""),
    "retinanet_resnet50_fpn_v2": ("exact", ""),
    "fcos_resnet50_fpn": ("exact", ""),
    "ssdlite320_mobilenet_v3_large": ("refused", "a one-stage detector"),
}


def build(name: str):
    torch.manual_seed(0)
    two_stage = name.startswith(("faster", "mask", "keypoint"))
    kw = {**SMALL, **TWO_STAGE} if two_stage else SMALL
    if name.startswith("ssd"):
        kw = {}
    if name.startswith("keypoint"):
        kw["num_keypoints"] = KEYPOINTS
    builder = getattr(D, name)
    return builder(weights=None, weights_backbone=None, num_classes=CLASSES, **kw).train()


def crowded_batch(seed: int, masks: bool, keypoints: bool):
    """Two images with 6 GT boxes each, several overlapping (so the low-quality passes tie)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for h, w in ((150, 200), (160, 176)):
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w - 60, h - 60])
        wh = torch.rand(3, 2, generator=g) * 40 + 12
        base = torch.cat([xy, xy + wh], 1)
        shifted = base + torch.rand(3, 4, generator=g) * 8  # near-duplicates of the first three
        boxes = torch.cat([base, shifted])
        t = {"boxes": boxes, "labels": torch.randint(1, CLASSES, (6,), generator=g)}
        if masks:
            t["masks"] = _ellipses(boxes, h, w)
        if keypoints:
            u = torch.rand(6, KEYPOINTS, 2, generator=g)
            lo, size = boxes[:, None, :2], (boxes[:, None, 2:] - boxes[:, None, :2])
            t["keypoints"] = torch.cat([lo + u * size, torch.ones(6, KEYPOINTS, 1)], 2)
        images.append(torch.rand(3, h, w, generator=g))
        targets.append(t)
    return images, targets


def _ellipses(boxes, h: int, w: int):
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    out = []
    for x1, y1, x2, y2 in boxes.tolist():
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        out.append(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1)
    return torch.stack(out).to(torch.uint8)


def step(model, name: str, capture) -> dict:
    """One training step of a plain loop, checked by ``capture`` → torchvision's loss dict."""
    images, targets = crowded_batch(3, "mask" in name, "keypoint" in name)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_dict = model(images, targets)
    opt.zero_grad()
    sum(loss_dict.values()).backward()
    if capture is not None:
        capture.check(0, loss_dict)
    return {k: float(v.detach()) for k, v in loss_dict.items()}


def _version() -> str:
    return tv.__version__.split("+")[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_builder_is_replayed_exactly_or_refused_by_name(tmp_path, name):
    outcome, words = MODELS[name]
    model = build(name)
    if outcome == "refused":
        with pytest.warns(RuntimeWarning, match="not replayed yet") as said:
            capture = ld.Capture(tmp_path, model, every=1)
        assert any(words in str(w.message) for w in said), [str(w.message) for w in said]
        losses = step(model, name, capture)  # the run goes on
        assert all(v == v for v in losses.values())
        if capture.written:  # two-stage: its captures are written and refused by name
            F.assert_refused_by_name(capture.written[0], words)
        with pytest.raises(InputError, match="not replayed yet"):
            heads_from_state_dict(model.state_dict())  # the checkpoint alone is refused too
        F.record_coverage("torchvision", _version(), name, outcome, F.refusal(said, words))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a replayable model: no warning
        capture = ld.Capture(tmp_path, model, every=1)
    losses = step(model, name, capture)
    row = F.replay_terms(capture.written[0])
    keys = {**TERMS, "roi_mask": "loss_mask"} if "loss_mask" in losses else TERMS
    if "classification" in losses:
        keys = {t: k for t, k in DENSE_TERMS.items() if k in losses}
    want = {t: losses[k] for t, k in keys.items()}
    gaps = F.relative_gaps(row, want)
    assert max(gaps.values()) <= REL, gaps
    left = sorted(set(losses) - set(keys.values()))
    assert left == (["loss_keypoint"] if outcome == "partial" else []), left
    detail = f"max rel. gap {max(gaps.values()):.1e} over {len(want)} terms"
    if left:
        detail += f"; not replayed: {', '.join(left)}"
    F.record_coverage("torchvision", _version(), name, outcome, detail)
