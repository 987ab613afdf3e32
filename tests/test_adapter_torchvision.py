"""The torchvision adapter against torchvision's real Faster R-CNN R50-FPN (skipped without
torchvision): a couple of training steps, a capture, and `lossdoctor inspect DIR` reproducing the
loss dict torchvision computed for that step."""

from __future__ import annotations

import dataclasses
import json
import math
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
        "step": 1,  # the step the hook recorded (the capture folder's name says it too)
        "rank": None,
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


def recipe(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(f"<!-- recipe: {name} -->\n```python\n(.*?)```", text, re.S).group(1)


def test_readme_recipe_runs(tmp_path, monkeypatch):
    """The README's torchvision recipe, executed as written, on a small model at an absurd LR."""
    model = small_model()
    data = batches()
    loader = [next(data) for _ in range(3)]
    monkeypatch.chdir(tmp_path)
    scope = {"model": model, "loader": loader,
             "optimizer": torch.optim.SGD(model.parameters(), lr=1e9)}  # fmt: skip
    exec(recipe("torchvision"), scope)  # noqa: S102
    written = sorted(p.name for p in (tmp_path / "lossdoctor-dumps").iterdir())
    assert written, "the recipe captured nothing"
    rep, _ = replayed_terms(tmp_path / "lossdoctor-dumps" / written[0])
    reason = rep["meta"]["batch"]["meta"]["reason"]
    assert "gradient norm" in reason or "non-finite" in reason


@pytest.mark.parametrize("builder", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn"])
def test_readme_recipe_runs_a_one_stage_model(tmp_path, monkeypatch, builder):
    """The README's torchvision recipe, as written but capturing every step, on a RetinaNet and
    an FCOS: each capture replays the step's classification and box losses."""
    import torchvision.models.detection as D

    torch.manual_seed(0)
    model = getattr(D, builder)(weights=None, weights_backbone=None, num_classes=4,
                                min_size=128, max_size=192).train()  # fmt: skip
    data = batches()
    monkeypatch.chdir(tmp_path)
    scope = {"model": model, "loader": [next(data) for _ in range(2)],
             "optimizer": torch.optim.SGD(model.parameters(), lr=0.001)}  # fmt: skip
    exec(recipe("torchvision").replace("grad_norm_above=1000", "every=1"), scope)  # noqa: S102
    folder = tmp_path / "lossdoctor-dumps" / "step_000001"
    losses = {k: float(v.detach()) for k, v in scope["loss_dict"].items()}  # the last step's
    rep = F.inspect_json(folder)
    own = rep["meta"]["run"]["profile"]
    row = next(r for r in rep["tables"]["profiles"] if r["profile"] == own)
    assert row["dense_cls"] == pytest.approx(losses["classification"], rel=1e-5)
    assert row["dense_box"] == pytest.approx(losses["bbox_regression"], rel=1e-5)


def test_readme_amp_recipe_runs(tmp_path, monkeypatch):
    """The README's mixed-precision recipe on the CPU (``device = "cpu"``), as written but for a
    periodic capture: its GradScaler's default scale is divided out and recorded."""
    model = small_model()
    data = batches()
    monkeypatch.chdir(tmp_path)
    scope = {"model": model, "loader": [next(data)], "torch": torch, "device": "cpu",
             "optimizer": torch.optim.SGD(model.parameters(), lr=0.01)}  # fmt: skip
    exec(recipe("torchvision-amp").replace("grad_norm_above=1000", "every=1"), scope)  # noqa: S102
    meta = _meta(tmp_path / "lossdoctor-dumps" / "step_000000")
    assert meta["autocast"] == "float16" and meta["grad_norm"]["loss_scale"] == 2.0**16


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
    """One rank of the README's DistributedDataParallel recipe (gloo, CPU), as written but for
    a periodic capture added to its options."""
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        model = small_model()
        data = batches(seed=rank + 1)
        scope = {"model": model, "loader": [next(data)], "torch": torch,
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.01)}  # fmt: skip
        os.chdir(out)
        exec(recipe("torchvision-ddp").replace("grad_norm_above=1000", "every=1"), scope)  # noqa: S102
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
    step = tmp_path / "lossdoctor-dumps" / "step_000000"
    folders = [step / f"rank_{k}" for k in range(world)] if world > 1 else [step]
    for folder in folders:
        batch = load_batch(folder / "batch.pt")
        assert batch.meta["framework"] == "torchvision" and batch.num_images == 2
        assert batch.meta["world_size"] == world and batch.meta["lr"] == 0.01
        weights = torch.load(folder / "checkpoint.pt", weights_only=True)
        assert not any(k.startswith("module.") for k in weights)
    rep = F.inspect_json(step)
    assert rep["meta"]["run"]["framework"] == "torchvision"


# ---- capture in the field ----------------------------------------------------------------------


def _norm(model) -> float:
    """The whole model's gradient norm, as a clip_grad_norm_ over every parameter sees it."""
    sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    return math.sqrt(sq)


def _meta(folder) -> dict:
    return load_batch(Path(folder) / "batch.pt").meta


def test_a_blow_up_is_captured_over_the_norm_and_at_the_first_nonfinite_step(tmp_path):
    """An absurd LR: every step over ``grad_norm_above`` or non-finite is written while the
    budget lasts, each with the trigger and the norms it saw."""
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=50.0)
    capture = ld.Capture(tmp_path, model, grad_norm_above=1000, optimizer=opt, max_captures=3)
    data, seen = batches(), []
    for step in range(6):
        images, targets = next(data)
        loss_dict = model(images, targets)
        opt.zero_grad()
        sum(loss_dict.values()).backward()
        finite = all(math.isfinite(float(v.detach())) for v in loss_dict.values())
        seen.append((_norm(model), finite))
        capture.check(step, loss_dict)
        opt.step()
    over = [k for k, (n, ok) in enumerate(seen) if ok and n > 1000]
    bad = [k for k, (_, ok) in enumerate(seen) if not ok]
    assert over and bad and over[0] < bad[0], seen
    trouble = sorted(set(over) | set(bad))[:3]
    assert over[0] in trouble and bad[0] in trouble
    assert [p.name for p in capture.written] == [f"step_{k:06d}" for k in trouble]
    first = _meta(tmp_path / f"step_{over[0]:06d}")
    assert first["trigger"]["kind"] == "grad-norm" and first["trigger"]["threshold"] == 1000
    assert first["trigger"]["value"] == pytest.approx(seen[over[0]][0], rel=1e-6)
    norms = first["grad_norm"]
    assert norms["model"] == pytest.approx(seen[over[0]][0], rel=1e-6)
    assert 0 < norms["heads"] < norms["model"]
    assert first["lr"] == 50.0 and first["optimizer"] == "SGD"
    assert first["framework_version"] == tv.__version__
    nan = _meta(tmp_path / f"step_{bad[0]:06d}")
    assert nan["trigger"]["kind"] == "loss-not-finite" and nan["reason"].startswith("non-finite")
    # the report says why the dump exists, with the norms the capture saw
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / f"step_{over[0]:06d}")]).output
    assert "captured    because gradient norm" in out and "heads" in out


def test_a_degenerate_box_is_captured_when_torchvisions_assertion_fires(tmp_path):
    """The recipe unchanged: torchvision's assertion inside the forward writes the batch, and the
    error reaches the loop as it was."""
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    capture = ld.Capture(tmp_path, model, optimizer=opt)
    data = batches()
    with pytest.raises(AssertionError, match="positive height and width"):
        for step in range(3):
            images, targets = next(data)
            if step == 2:
                x1, y1, x2, y2 = targets[0]["boxes"][1].tolist()
                targets[0]["boxes"][1] = torch.tensor([x2, y2, x1, y1])
            loss_dict = model(images, targets)
            opt.zero_grad()
            sum(loss_dict.values()).backward()
            capture.check(step, loss_dict)
            opt.step()
    (folder,) = capture.written
    assert folder.name == "step_000002"
    trigger = _meta(folder)["trigger"]
    assert trigger["kind"] == "exception" and trigger["value"].startswith("AssertionError: All")
    (alarm,) = F.alarms(F.inspect_json(folder))
    assert alarm[:2] == ("error", "degenerate-gt")


def test_an_amp_loop_records_the_unscaled_norm_and_the_scale(tmp_path):
    """CPU autocast in float16 with torch.amp.GradScaler: the gradients carry the loss scale,
    the capture divides it out and records it."""
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    capture = ld.Capture(tmp_path, model, every=1, optimizer=opt, scaler=scaler)
    images, targets = next(batches())
    with torch.autocast("cpu", dtype=torch.float16):
        loss_dict = model(images, targets)
    opt.zero_grad()
    scaler.scale(sum(loss_dict.values())).backward()
    scaled = _norm(model)
    meta = _meta(capture.check(0, loss_dict))
    scaler.step(opt)
    scaler.update()
    assert meta["grad_norm"]["loss_scale"] == 2.0**10 and meta["loss_scale"] == 2.0**10
    assert meta["grad_norm"]["model"] == pytest.approx(scaled / 2.0**10, rel=1e-6)
    assert meta["autocast"] == "float16"
    # after scaler.unscale_ the gradients are plain: nothing more is divided
    with torch.autocast("cpu", dtype=torch.float16):
        loss_dict = model(*next(batches(seed=3)))
    opt.zero_grad()
    scaler.scale(sum(loss_dict.values())).backward()
    scaler.unscale_(opt)
    meta = _meta(capture.check(1, loss_dict))
    assert "loss_scale" not in meta["grad_norm"]
    assert meta["grad_norm"]["model"] == pytest.approx(_norm(model), rel=1e-6)


def test_a_model_it_cannot_replay_trains_on_and_inspect_refuses_its_captures(tmp_path):
    """Anchors with other aspect ratios per level: said once at construction, the loop runs to
    its end, captures are written, and inspect refuses them with the same message."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    ratios = ((0.5, 1.0, 2.0),) * 4 + ((1.0, 2.0, 0.5),)
    gen = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ratios)
    model = small_model(rpn_anchor_generator=gen)
    with pytest.warns(RuntimeWarning, match="cannot be replayed.*aspect ratios"):
        capture = ld.Capture(tmp_path, model, every=1)
    train(model, 2, capture)
    assert [p.name for p in capture.written] == ["step_000000", "step_000001"]
    r = CliRunner().invoke(app, ["inspect", str(capture.written[0])])
    assert r.exit_code == 2 and "cannot be replayed" in r.output and "aspect ratios" in r.output


def test_keep_previous_writes_the_step_before_a_nonfinite_one(tmp_path):
    """The step before the first NaN, held in memory with a copy of the heads' weights, is
    written when the NaN comes; its checkpoint holds the heads only."""
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=50.0)
    capture = ld.Capture(tmp_path, model, keep_previous=True, optimizer=opt)
    data, finite = batches(), []
    for step in range(4):
        loss_dict = model(*next(data))
        opt.zero_grad()
        sum(loss_dict.values()).backward()
        finite.append(all(math.isfinite(float(v.detach())) for v in loss_dict.values()))
        capture.check(step, loss_dict)
        opt.step()
    first_bad = finite.index(False)
    before = tmp_path / f"step_{first_bad - 1:06d}"
    assert capture.written[0] == before
    meta = _meta(before)
    assert (
        meta["trigger"]["kind"] == "step-before-not-finite" and meta["weights"]["saved"] == "heads"
    )
    weights = torch.load(before / "checkpoint.pt", weights_only=True)
    assert weights and all(k.startswith(("rpn.", "roi_heads.")) for k in weights)
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert F.inspect_json(before)["meta"]["batch"]["meta"]["step"] == first_bad - 1


def test_a_heads_only_capture_still_finds_nonfinite_weights_elsewhere(tmp_path):
    """weights="heads": the checkpoint holds the heads; a NaN in the backbone is still named,
    from the summary the capture wrote."""
    model = small_model()
    capture = ld.Capture(tmp_path, model, every=1, weights="heads")
    loss_dict = model(*next(batches()))
    sum(loss_dict.values()).backward()
    with torch.no_grad():
        model.backbone.fpn.layer_blocks[0][0].weight[0, 0, 0, 0] = float("nan")
    folder = capture.check(0, loss_dict)
    weights = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("backbone.") for k in weights)
    codes = {f["code"]: f for f in F.inspect_json(folder)["findings"]}
    assert "backbone.fpn.layer_blocks.0.0" in codes["nonfinite-weights"]["message"]
