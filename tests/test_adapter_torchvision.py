"""The torchvision adapter against torchvision's real Faster R-CNN R50-FPN (skipped without
torchvision): a couple of training steps, a capture, and `lossdoctor inspect DIR` reproducing the
loss dict torchvision computed for that step."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import factories as F

tv = F.framework("torchvision")
from torchvision.models.detection import fasterrcnn_resnet50_fpn  # noqa: E402

from lossdoctor.adapters import torchvision as ld  # noqa: E402
from lossdoctor.cli import app  # noqa: E402
from lossdoctor.inputs.batch import load_batch  # noqa: E402
from lossdoctor.inputs.config import preset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EVERY = 10**6  # a sampler budget no batch reaches: torchvision keeps every candidate
TERMS = {"rpn_cls": "loss_objectness", "rpn_box": "loss_rpn_box_reg",
         "roi_cls": "loss_classifier", "roi_box": "loss_box_reg"}  # fmt: skip
REL = 1e-5


def small_model(**kw):
    torch.manual_seed(0)
    kw = {"rpn_batch_size_per_image": EVERY, "box_batch_size_per_image": EVERY, **kw}
    return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, min_size=128,
                                   max_size=192, **kw).train()  # fmt: skip


def batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    while True:
        images = [torch.rand(3, 120, 160, generator=g), torch.rand(3, 128, 144, generator=g)]
        targets = []
        for im in images:
            h, w = im.shape[1:]
            xy = torch.rand(3, 2, generator=g) * torch.tensor([w - 40, h - 40])
            boxes = torch.cat([xy, xy + torch.rand(3, 2, generator=g) * 30 + 10], 1)
            targets.append({"boxes": boxes, "labels": torch.randint(1, 4, (3,), generator=g)})
        yield images, targets


def train(model, steps, capture, data=None, opt=None):
    """``steps`` steps of a plain torchvision loop with ``capture.check`` → the last loss dict."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = batches() if data is None else data
    for step in range(steps):
        images, targets = next(data)
        loss_dict = model(images, targets)
        opt.zero_grad()
        sum(loss_dict.values()).backward()
        capture.check(step, loss_dict)
        opt.step()
    return loss_dict


def replayed_terms(folder) -> tuple[dict, dict]:
    r = CliRunner().invoke(app, ["inspect", str(folder), "--sample-all", "--json", "-", "-q"])
    assert r.exit_code in (0, 1), r.output
    rep = json.loads(r.stdout)
    own = rep["meta"]["run"]["profile"]
    row = next(x for x in rep["tables"]["profiles"] if x["profile"] == own)
    return rep, {t: row[t] for t in TERMS}


def test_capture_reproduces_torchvisions_losses(tmp_path):
    model = small_model()
    capture = ld.Capture(tmp_path, model, every=1)
    loss_dict = train(model, 2, capture)
    folder = capture.written[-1]
    assert folder.name == "step_000001"
    rep, got = replayed_terms(folder)
    assert rep["meta"]["run"] == {
        "profile": "torchvision",
        "source": "dump",
        "own": "torchvision",
        "framework": "torchvision",
    }
    assert rep["meta"]["batch"]["levels"] == ["p2", "p3", "p4", "p5", "p6"]
    for term, key in TERMS.items():
        want = float(loss_dict[key].detach())
        assert got[term] == pytest.approx(want, rel=REL), (term, got[term], want)


def test_dump_writes_what_the_hooked_forward_saw(tmp_path):
    model = small_model()
    capture = ld.Capture(tmp_path / "hooked", model, every=1)
    images, targets = next(batches())
    loss_dict = model(images, targets)
    sum(loss_dict.values()).backward()
    hooked = load_batch(capture.check(0, loss_dict) / "batch.pt")
    direct = load_batch(ld.dump(tmp_path / "direct", model, images, targets) / "batch.pt")
    for name in hooked.features:
        assert torch.allclose(hooked.features[name], direct.features[name], atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(hooked.proposals, direct.proposals))
    assert [lab.tolist() for lab in hooked.gt_labels] == [
        (t["labels"] - 1).tolist() for t in targets
    ]
    assert direct.meta["framework"] == "torchvision" and direct.meta["profile"] == "torchvision"


def test_the_default_models_config_is_the_preset():
    live = ld.detector_config(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None))
    assert dataclasses.replace(live, name="torchvision") == preset("torchvision")


def test_the_live_config_follows_the_model():
    model = small_model(rpn_fg_iou_thresh=0.6, box_score_thresh=0.2, rpn_pre_nms_top_n_train=300)
    cfg = ld.detector_config(model)
    assert cfg.rpn_matcher.fg_iou == 0.6 and cfg.test.score_thr == 0.2
    assert cfg.train_proposals.pre_nms_top_n == 300 and cfg.rpn_sampler.batch_size == EVERY


def test_readme_recipe_runs(tmp_path, monkeypatch):
    """The README's torchvision recipe, executed as written, on a small model."""
    text = (ROOT / "README.md").read_text()
    recipe = re.search(r"<!-- recipe: torchvision -->\n```python\n(.*?)```", text, re.S).group(1)
    model = small_model()
    data = batches()
    loader = [next(data) for _ in range(3)]
    monkeypatch.chdir(tmp_path)
    scope = {"model": model, "loader": loader,
             "optimizer": torch.optim.SGD(model.parameters(), lr=1e9)}  # fmt: skip
    exec(recipe, scope)  # noqa: S102
    written = sorted(p.name for p in (tmp_path / "lossdoctor-dumps").iterdir())
    assert written, "the recipe captured nothing"
    rep, _ = replayed_terms(tmp_path / "lossdoctor-dumps" / written[0])
    reason = rep["meta"]["batch"]["meta"]["reason"]
    assert "gradient norm" in reason or "non-finite" in reason


@pytest.mark.parametrize("kind", ["initialized", "uniform images", "saturated"])
def test_own_proposals_are_torchvisions_ties_included(tmp_path, kind):
    """Uniform images make every interior location of a level score alike; saturated logits
    (about 40) differ while their probabilities, which torchvision's NMS sorts, are all 1.0."""
    model = small_model()
    images, targets = next(batches())
    if kind == "uniform images":
        images = [torch.full_like(x, 0.5) for x in images]
    if kind == "saturated":
        with torch.no_grad():
            model.rpn.head.cls_logits.weight.mul_(50)
            model.rpn.head.cls_logits.bias.add_(40)
    F.assert_own_proposals_are_dumped(ld.dump(tmp_path, model, images, targets))


def masked_batches(seed=2):
    """Images with GT boxes and masks (each mask an ellipse inside its box, so targets vary)."""
    for images, targets in batches(seed):
        for im, t in zip(images, targets):
            h, w = im.shape[1:]
            ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            masks = []
            for x1, y1, x2, y2 in t["boxes"].tolist():
                cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
                masks.append(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1)
            t["masks"] = torch.stack(masks).to(torch.uint8)
        yield images, targets


def test_mask_rcnn_capture_reproduces_torchvisions_five_losses(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, min_size=128,
                                  max_size=192, rpn_batch_size_per_image=EVERY,
                                  box_batch_size_per_image=EVERY).train()  # fmt: skip
    capture = ld.Capture(tmp_path, model, every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = masked_batches()
    for step in range(2):
        images, targets = next(data)
        loss_dict = model(images, targets)
        opt.zero_grad()
        sum(loss_dict.values()).backward()
        folder = capture.check(step, loss_dict)
        opt.step()
    rep, got = replayed_terms(folder)
    row = next(x for x in rep["tables"]["profiles"] if x["profile"] == "torchvision")
    assert row["roi_mask"] == pytest.approx(float(loss_dict["loss_mask"]), rel=REL)
    for term, key in TERMS.items():
        assert got[term] == pytest.approx(float(loss_dict[key].detach()), rel=REL), term
    assert {r["head"] for r in rep["tables"]["levels"]} == {"rpn", "roi", "mask"}


def _background(batches_):
    """The same images with no object at all (an all-background batch)."""
    for images, targets in batches_:
        for t in targets:
            t["boxes"], t["labels"] = t["boxes"][:0], t["labels"][:0]
            if "masks" in t:
                t["masks"] = t["masks"][:0]
        yield images, targets


def _model(kind):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    build = maskrcnn_resnet50_fpn if kind == "mask" else fasterrcnn_resnet50_fpn
    return build(weights=None, weights_backbone=None, num_classes=4, min_size=128,
                 max_size=192).train()  # fmt: skip


@pytest.mark.parametrize("kind", ["faster", "mask"])
@pytest.mark.parametrize("batch", ["ordinary", "all-background"])
def test_a_healthy_run_raises_no_alarm(tmp_path, kind, batch):
    """A healthy torchvision run (its default samplers; a learning rate a random-init Mask R-CNN
    stays stable under, which 0.01 is not: its mask loss goes from 0.7 to 52 in one step),
    captured in its own loop: no warning and no error, on an ordinary batch and on one with no
    object."""
    model = _model(kind)
    data = masked_batches() if kind == "mask" else batches()
    data = _background(data) if batch == "all-background" else data
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    capture = ld.Capture(tmp_path, model, every=1, optimizer=opt)
    train(model, 2, capture, data, opt=opt)
    for folder in capture.written:
        assert F.alarms(F.inspect_json(folder)) == [], folder.name


def test_label_0_is_one_finding_and_the_replay_matches_torchvisions_losses(tmp_path):
    """torchvision's label 0 on a real box (0-based dataset labels passed as they are): its RPN
    trains the box as an object, its RoI head as background; the replay does the same."""
    model = small_model()
    images, targets = next(batches())
    targets[1]["labels"] = torch.tensor([0, 2, 3])
    capture = ld.Capture(tmp_path, model, every=1)
    loss_dict = model(images, targets)
    sum(loss_dict.values()).backward()
    rep, got = replayed_terms(capture.check(0, loss_dict))
    for term, key in TERMS.items():
        assert got[term] == pytest.approx(float(loss_dict[key].detach()), rel=REL), term
    (alarm,) = F.alarms(rep)
    assert alarm[:2] == ("error", "gt-labelled-background") and "labelled 0" in alarm[2]


def test_a_box_with_swapped_corners_is_one_finding(tmp_path):
    """torchvision refuses the box in its forward; a dump of the batch names the corners."""
    model = small_model()
    images, targets = next(batches())
    x1, y1, x2, y2 = targets[0]["boxes"][1].tolist()
    targets[0]["boxes"][1] = torch.tensor([x2, y2, x1, y1])
    with pytest.raises(AssertionError, match="positive height and width"):
        model(images, targets)
    rep = F.inspect_json(ld.dump(tmp_path, model, images, targets, meta={"step": 0}))
    (alarm,) = F.alarms(rep)
    assert alarm[:2] == ("error", "degenerate-gt") and "x1/x2 and y1/y2" in alarm[2]


def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a DistributedDataParallel torchvision loop (gloo, CPU) with the recipe's
    capture on the wrapped model."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        model = DistributedDataParallel(small_model())
        capture = ld.Capture(out, model, every=1)
        images, targets = next(batches(seed=rank + 1))
        loss_dict = model(images, targets)
        sum(loss_dict.values()).backward()
        capture.check(0, loss_dict)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_a_ddp_wrapped_model_is_captured_on_each_rank(tmp_path, world):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    step = tmp_path / "step_000000"
    folders = [step / f"rank_{k}" for k in range(world)] if world > 1 else [step]
    for folder in folders:
        batch = load_batch(folder / "batch.pt")
        assert batch.meta["framework"] == "torchvision" and batch.num_images == 2
        weights = torch.load(folder / "checkpoint.pt", weights_only=True)
        assert not any(k.startswith("module.") for k in weights)
    rep = F.inspect_json(step)
    assert rep["meta"]["run"]["framework"] == "torchvision"
