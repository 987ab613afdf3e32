"""The Detectron2 adapter against Detectron2's real Faster R-CNN R50-FPN (skipped without
detectron2): training steps in a SimpleTrainer with the README's hook and in a loop of our own,
captures, and `lossdoctor inspect DIR` reproducing the loss dict Detectron2 computed."""

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

detectron2 = F.framework("detectron2")
from detectron2 import model_zoo  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from lossdoctor.adapters import detectron2 as ld  # noqa: E402
from lossdoctor.cli import app  # noqa: E402
from lossdoctor.inputs.batch import load_batch  # noqa: E402
from lossdoctor.inputs.config import load_config, preset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
EVERY = 10**6  # a sampler budget no batch reaches: every candidate is sampled
TERMS = {"rpn_cls": "loss_rpn_cls", "rpn_box": "loss_rpn_loc", "roi_cls": "loss_cls",
         "roi_box": "loss_box_reg"}  # fmt: skip
REL = 1e-5


def build(config=CONFIG, every=True, norm=None):
    cfg = config_of(config, every, norm)
    torch.manual_seed(0)
    return build_model(cfg).train()


def config_of(config=CONFIG, every=True, norm=None):
    cfg = get_cfg()
    cfg.merge_from_file(config)
    if norm is not None:
        cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    cfg.MODEL.PIXEL_STD = [57.375, 57.12, 58.395]  # inputs of unit scale for an untrained model
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    if every:
        cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = EVERY
    return cfg


def batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    while True:
        out = []
        for h, w in ((120, 160), (128, 144)):
            xy = torch.rand(3, 2, generator=g) * torch.tensor([w - 40, h - 40])
            boxes = Boxes(torch.cat([xy, xy + torch.rand(3, 2, generator=g) * 30 + 10], 1))
            inst = Instances(
                (h, w), gt_boxes=boxes, gt_classes=torch.randint(0, 3, (3,), generator=g)
            )
            out.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst,
                        "height": h, "width": w})  # fmt: skip
        yield out


def assert_reproduces(folder, losses: dict) -> None:
    r = CliRunner().invoke(app, ["inspect", str(folder), "--sample-all", "--json", "-", "-q"])
    assert r.exit_code in (0, 1), r.output
    rep = json.loads(r.stdout)
    run = rep["meta"]["run"]
    assert {k: run[k] for k in ("profile", "source", "own", "framework")} == {
        "profile": "detectron2",
        "source": "dump",
        "own": "detectron2",
        "framework": "detectron2",
    }
    recorded = load_batch(Path(folder) / "batch.pt").meta
    assert (run["step"], run["rank"]) == (recorded["step"], recorded.get("rank"))
    row = next(x for x in rep["tables"]["profiles"] if x["profile"] == "detectron2")
    for term, key in TERMS.items():
        want = float(losses[key])
        assert row[term] == pytest.approx(want, rel=REL), (term, row[term], want)


def test_readme_hook_in_a_simple_trainer(tmp_path, monkeypatch):
    """The README's two lines, executed as written, with a SimpleTrainer."""
    text = (ROOT / "README.md").read_text()
    recipe = re.search(r"<!-- recipe: detectron2 -->\n```python\n(.*?)```", text, re.S).group(1)
    model = build()
    data = batches()
    trainer = SimpleTrainer(
        model, iter([next(data) for _ in range(2)]), torch.optim.SGD(model.parameters(), lr=0.01)
    )
    monkeypatch.chdir(tmp_path)
    exec(
        recipe.replace("grad_norm_above=1000", "grad_norm_above=1000, every=1"),
        {"trainer": trainer},
    )  # noqa: S102
    trainer.train(0, 2)
    dumps = tmp_path / "lossdoctor-dumps"
    assert sorted(p.name for p in dumps.iterdir()) == ["step_000000", "step_000001"]
    folder = dumps / "step_000001"
    assert_reproduces(folder, load_batch(folder / "batch.pt").meta["losses"])


def loop_of_our_own(model, capture, momentum: float = 0.0):
    """Two SGD steps with the capture checked after each backward → (last capture, loss dict)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum)
    data = batches()
    with EventStorage(0):
        for step in range(2):
            loss_dict = model(next(data))
            opt.zero_grad()
            sum(loss_dict.values()).backward()
            folder = capture.check(step, loss_dict)
            opt.step()
    return folder, loss_dict


def test_capture_in_a_loop_of_our_own(tmp_path):
    model = build()
    folder, loss_dict = loop_of_our_own(model, ld.Capture(tmp_path, model, every=1), momentum=0.9)
    assert_reproduces(folder, loss_dict)


def test_dump_writes_what_the_hooked_forward_saw(tmp_path):
    model = build()
    capture = ld.Capture(tmp_path / "hooked", model, every=1)
    inputs = next(batches())
    with EventStorage(0):
        loss_dict = model(inputs)
        sum(loss_dict.values()).backward()
        hooked = load_batch(capture.check(0, loss_dict) / "batch.pt")
        direct = load_batch(ld.dump(tmp_path / "direct", model, inputs) / "batch.pt")
    for name in hooked.features:
        assert torch.allclose(hooked.features[name], direct.features[name], atol=1e-5)
    assert all(torch.allclose(a, b) for a, b in zip(hooked.proposals, direct.proposals))
    assert [lab.tolist() for lab in hooked.gt_labels] == [
        x["instances"].gt_classes.tolist() for x in inputs
    ]
    assert hooked.levels == ["p2", "p3", "p4", "p5", "p6"] and hooked.strides == [4, 8, 16, 32, 64]


def test_detectron2s_own_config_is_the_preset(tmp_path):
    config, profile = ld.config_from_file(CONFIG)
    assert dataclasses.replace(config, name="detectron2") == preset("detectron2")
    assert profile == "detectron2"
    r = CliRunner().invoke(app, ["config-from", "detectron2", CONFIG])
    assert r.exit_code == 0, r.output
    (tmp_path / "det.toml").write_text(r.stdout)
    assert dataclasses.replace(load_config(tmp_path / "det.toml"), name="detectron2") == preset(
        "detectron2"
    )


def test_a_smooth_l1_beta_becomes_a_profile_table():
    model = build()
    model.roi_heads.box_predictor.smooth_l1_beta = 0.5
    table = ld.profile(model)
    assert table["roi_box"]["loss"] == "smooth_l1" and table["roi_box"]["beta"] == 0.5
    assert table["rpn_box"]["loss"] == "l1" and table["rpn_cls"]["normalizer"] == "budget"


@pytest.mark.parametrize("kind", ["initialized", "uniform images", "saturated"])
def test_own_proposals_are_detectron2s_ties_included(tmp_path, kind):
    """Uniform images make every interior location of a level score alike; saturated logits
    (about 40) differ while their probabilities would all be 1.0 (Detectron2 ranks logits)."""
    model = build()
    inputs = next(batches())
    if kind == "uniform images":
        inputs = [dict(x, image=torch.full_like(x["image"], 128.0)) for x in inputs]
    if kind == "saturated":
        head = model.proposal_generator.rpn_head.objectness_logits
        with torch.no_grad():
            head.weight.mul_(50)
            head.bias.add_(40)
    F.assert_own_proposals_are_dumped(ld.dump(tmp_path, model, inputs))


MASK_CONFIG = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
CASCADE_CONFIG = model_zoo.get_config_file("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml")


def masked(batch: list[dict]) -> list[dict]:
    """GT masks (ellipses in the boxes) on every image, as BitMasks."""
    from detectron2.structures import BitMasks

    for x in batch:
        inst = x["instances"]
        h, w = inst.image_size
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        ms = []
        for x1, y1, x2, y2 in inst.gt_boxes.tensor.tolist():
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            ms.append(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1)
        inst.gt_masks = BitMasks(torch.stack(ms))
    return batch


def _steps(model, tmp_path, make, lr=0.001):
    """Two steps of a loop of our own on ``make(batch)``, captured at each → (the capture, the
    last loss dict)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    capture = ld.Capture(tmp_path, model, every=1, optimizer=opt)
    data = batches()
    with EventStorage(0):
        for step in range(2):
            loss_dict = model(make(next(data)))
            opt.zero_grad()
            sum(loss_dict.values()).backward()
            capture.check(step, loss_dict)
            opt.step()
    return capture, loss_dict


@pytest.mark.parametrize("config", [MASK_CONFIG, CASCADE_CONFIG], ids=["mask", "cascade-mask"])
def test_mask_and_cascade_reproduce_detectron2s_losses(tmp_path, config):
    """Mask R-CNN's loss_mask, and Cascade Mask R-CNN's three stages (loss_cls_stageK,
    loss_box_reg_stageK) and its mask head on the first stage's RoIs."""
    model = build(config)
    capture, loss_dict = _steps(model, tmp_path, masked, lr=0.01)
    folder = capture.written[-1]
    r = CliRunner().invoke(app, ["inspect", str(folder), "--sample-all", "--json", "-", "-q"])
    assert r.exit_code in (0, 1), r.output
    rep = json.loads(r.stdout)
    assert rep["meta"]["run"]["profile"] == "detectron2"
    row = next(x for x in rep["tables"]["profiles"] if x["profile"] == "detectron2")
    assert row["roi_mask"] == pytest.approx(float(loss_dict["loss_mask"]), rel=REL)
    for term in ("rpn_cls", "rpn_box"):
        assert row[term] == pytest.approx(float(loss_dict[TERMS[term]]), rel=REL)
    stages = model.roi_heads.num_cascade_stages if config == CASCADE_CONFIG else 1
    suffix = [f"_stage{k}" for k in range(stages)] if stages > 1 else [""]
    levels = rep["tables"]["levels"]
    for k, end in enumerate(suffix):
        want = ("detectron2", "roi", k, "all")
        (stage,) = [x for x in levels if (x["profile"], x["head"], x["stage"], x["level"]) == want]
        assert stage["loss_cls"] == pytest.approx(float(loss_dict["loss_cls" + end]), rel=REL)
        assert stage["loss_bbox"] == pytest.approx(float(loss_dict["loss_box_reg" + end]), rel=REL)


def test_cascade_config_file_is_the_preset():
    config, profile = ld.config_from_file(CASCADE_CONFIG)
    assert dataclasses.replace(config, name="detectron2-cascade") == preset("detectron2-cascade")
    assert profile == "detectron2"


def test_polygon_masks_are_rasterized_over_the_image(tmp_path):
    """PolygonMasks (Detectron2's default mask format) are dumped as whole-image bitmaps; the
    replayed loss_mask then differs from Detectron2's per-RoI rasterization by a little."""
    from detectron2.structures import PolygonMasks

    model = build(MASK_CONFIG)
    inputs = next(batches())
    for x in inputs:
        polys = [[[x1, y1, x2, y1, x2, y2, x1, y2]]
                 for x1, y1, x2, y2 in x["instances"].gt_boxes.tensor.tolist()]  # fmt: skip
        x["instances"].gt_masks = PolygonMasks(polys)
    capture = ld.Capture(tmp_path, model, every=1)
    with EventStorage(0):
        loss_dict = model(inputs)
        sum(loss_dict.values()).backward()
        folder = capture.check(0, loss_dict)
    batch = load_batch(folder / "batch.pt")
    for masks, x in zip(batch.gt_masks, inputs):
        inst = x["instances"]
        assert masks.dtype == torch.bool and masks.shape == (len(inst), *inst.image_size)
        for mask, (x1, y1, x2, y2) in zip(masks, inst.gt_boxes.tensor.tolist()):
            w, h = x2 - x1, y2 - y1  # a rectangle fills its box, up to the pixels on its edge
            assert abs(int(mask.sum()) - w * h) <= 2 * (w + h) + 4
    r = CliRunner().invoke(app, ["inspect", str(folder), "--sample-all", "--json", "-", "-q"])
    row = next(
        x for x in json.loads(r.stdout)["tables"]["profiles"] if x["profile"] == "detectron2"
    )
    assert row["roi_mask"] == pytest.approx(float(loss_dict["loss_mask"]), rel=0.05)


def test_cascade_symptom_is_detectron2s_inference(tmp_path):
    """The symptom of a captured Cascade Mask R-CNN step is what Detectron2's inference detects
    with the same weights on the same images: per image the number of detections and the top
    score (three stages on each other's refined boxes, probabilities averaged)."""
    model = build(CASCADE_CONFIG)
    capture = ld.Capture(tmp_path, model, every=1)
    inputs = masked(next(batches()))
    with EventStorage(0):
        loss_dict = model(inputs)
        sum(loss_dict.values()).backward()
        folder = capture.check(0, loss_dict)
    model.eval()
    with torch.no_grad():
        outs = model.inference(inputs, do_postprocess=False)
    F.assert_symptom_is(folder, [x.scores for x in outs])


def _no_objects(batch):
    """The same images with no object at all (an all-background batch)."""
    for x in batch:
        x["instances"] = x["instances"][:0]
    return batch


@pytest.mark.parametrize("config", [CONFIG, CASCADE_CONFIG], ids=["faster", "cascade-mask"])
@pytest.mark.parametrize("batch", ["ordinary", "all-background"])
def test_a_healthy_run_raises_no_alarm(tmp_path, config, batch):
    """A healthy Detectron2 run (its config's samplers): no warning and no error, on an ordinary
    batch and on one with no object. The backbone normalizes its features (BatchNorm, as a
    pretrained FrozenBN backbone does): a random-init one under FrozenBN has features in the
    hundreds, and one step of a Cascade R-CNN at lr 1e-4 then drives every foreground score to
    1e-5 (a collapse lossdoctor reports, and Detectron2's inference shows)."""
    make = masked if config == CASCADE_CONFIG else (lambda b: b)
    if batch != "ordinary":
        make = (lambda m: lambda b: _no_objects(m(b)))(make)
    capture, _ = _steps(build(config, every=False, norm="BN"), tmp_path, make)
    for folder in capture.written:
        assert F.alarms(F.inspect_json(folder)) == [], folder.name


def test_a_box_with_swapped_corners_is_one_finding(tmp_path):
    """Detectron2 trains on a box with swapped corners; its capture names the corners."""

    def swapped(batch):
        boxes = batch[0]["instances"].gt_boxes.tensor
        boxes[1] = boxes[1][[2, 3, 0, 1]]
        return batch

    folder = _steps(build(), tmp_path, swapped)[0].written[0]  # the step the box first enters
    (alarm,) = F.alarms(F.inspect_json(folder))
    assert alarm[:2] == ("error", "degenerate-gt") and "x1/x2 and y1/y2" in alarm[2]


# ---- capture in the field: every trainer -------------------------------------------------------


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer as users subclass it: its data loader and writers replaced
    (the small batches above; no event files), the rest its own."""

    data: list = []

    @classmethod
    def build_train_loader(cls, cfg):
        return cls.data

    def build_writers(self):
        return []


def default_trainer(tmp_path, steps=2, lr=0.001, config=CONFIG, **solver):
    cfg = config_of(config)
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.OUTPUT_DIR, cfg.SOLVER.IMS_PER_BATCH = str(tmp_path / "out"), 2
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR, cfg.SOLVER.WARMUP_ITERS = steps, lr, 0
    cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD, cfg.DATASETS.TEST = 10**6, 0, ()
    (tmp_path / "out").mkdir()
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    data = batches()
    Trainer.data = [next(data) for _ in range(steps)]
    torch.manual_seed(0)
    return Trainer(cfg)


def readme_hook(trainer, tmp_path, monkeypatch, extra: str = "") -> Path:
    """The README's lines, executed as written (``extra`` options added to the hook's)."""
    text = (ROOT / "README.md").read_text()
    recipe = re.search(r"<!-- recipe: detectron2 -->\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(recipe.replace("grad_norm_above=1000", f"grad_norm_above=1000{extra}"),
         {"trainer": trainer})  # noqa: S102  # fmt: skip
    return tmp_path / "lossdoctor-dumps"


@pytest.mark.parametrize("on", ["default", "inner"], ids=["DefaultTrainer", "its-inner-trainer"])
def test_readme_hook_in_a_default_trainer(tmp_path, monkeypatch, on):
    """DefaultTrainer runs its steps in an inner SimpleTrainer: the hook captures whether it is
    registered on the DefaultTrainer (as the README says) or on that inner trainer."""
    trainer = default_trainer(tmp_path)
    target = trainer if on == "default" else trainer._trainer
    dumps = readme_hook(target, tmp_path, monkeypatch, ", every=1")
    trainer.train()
    assert sorted(p.name for p in dumps.iterdir()) == ["step_000000", "step_000001"]
    folder = dumps / "step_000001"
    meta = load_batch(folder / "batch.pt").meta
    assert meta["optimizer"] == "SGD" and meta["lr"] == pytest.approx(0.001)
    assert meta["framework_version"] == detectron2.__version__
    assert_reproduces(folder, meta["losses"])


def test_readme_hook_in_a_default_trainer_on_a_retinanet(tmp_path, monkeypatch):
    """The README's two lines on a RetinaNet's DefaultTrainer: each step is captured with the
    running normalizer before it, and replays Detectron2's loss_cls and loss_box_reg."""
    config = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    trainer = default_trainer(tmp_path, config=config)
    dumps = readme_hook(trainer, tmp_path, monkeypatch, ", every=1")
    trainer.train()
    assert sorted(p.name for p in dumps.iterdir()) == ["step_000000", "step_000001"]
    for folder, before in ((dumps / "step_000000", None), (dumps / "step_000001", float)):
        meta = load_batch(folder / "batch.pt").meta
        rep = F.inspect_json(folder)
        assert rep["meta"]["dense"]["preset"] == "detectron2-retinanet"
        ema_before = rep["meta"]["dense"]["ema_before"]
        assert ema_before is None if before is None else isinstance(ema_before, float)
        row = next(r for r in rep["tables"]["profiles"] if r["profile"] == "detectron2-retinanet")
        assert row["dense_cls"] == pytest.approx(meta["losses"]["loss_cls"], rel=1e-5)
        assert row["dense_box"] == pytest.approx(meta["losses"]["loss_box_reg"], rel=1e-5)


def _norms(trainer) -> dict:
    """The test's own whole-model gradient norm at each optimizer step (by iteration)."""
    seen, inner = {}, trainer._trainer

    def record(*_):
        grads = [p.grad for p in inner.model.parameters() if p.grad is not None]
        seen[inner.iter] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))

    inner.optimizer.register_step_pre_hook(record)
    return seen


def test_a_blow_up_in_a_default_trainer_is_captured_before_detectron2_stops(tmp_path, monkeypatch):
    """An absurd LR: each step over the norm is written, and so is the step Detectron2 stops
    at (a non-finite loss after backward, or FloatingPointError inside the forward)."""
    trainer = default_trainer(tmp_path, steps=8, lr=2.0)
    norms = _norms(trainer)
    dumps = readme_hook(trainer, tmp_path, monkeypatch, ", max_captures=8")
    with pytest.raises(FloatingPointError):
        trainer.train()
    stop = trainer.iter
    over = [k for k, n in norms.items() if n > 1000]
    assert over and over[0] < stop
    assert sorted(p.name for p in dumps.iterdir()) == [f"step_{k:06d}" for k in [*over, stop]]
    first = load_batch(dumps / f"step_{over[0]:06d}" / "batch.pt").meta
    assert first["trigger"]["kind"] == "grad-norm"
    assert first["grad_norm"]["model"] == pytest.approx(norms[over[0]], rel=1e-6)
    last = load_batch(dumps / f"step_{stop:06d}" / "batch.pt").meta
    assert last["trigger"]["kind"] in ("loss-not-finite", "exception")


def test_nonfinite_rpn_outputs_raise_in_the_forward_and_are_captured(tmp_path, monkeypatch):
    """An Inf weight in the RPN's delta layer: Detectron2 raises FloatingPointError inside the
    forward; the capture holds that batch, and its replay names the weight."""
    trainer = default_trainer(tmp_path)
    dumps = readme_hook(trainer, tmp_path, monkeypatch)
    with torch.no_grad():
        trainer.model.proposal_generator.rpn_head.anchor_deltas.weight[0, 0, 0, 0] = math.inf
    with pytest.raises(FloatingPointError, match="Inf/NaN"):
        trainer.train()
    (folder,) = dumps.iterdir()
    meta = load_batch(folder / "batch.pt").meta
    assert folder.name == "step_000000" and meta["trigger"]["kind"] == "exception"
    assert meta["trigger"]["value"].startswith("FloatingPointError: Predicted boxes or scores")
    rep = F.inspect_json(folder)
    assert "nonfinite-weights" in {f["code"] for f in rep["findings"]}


def test_amp_trainer_captures_the_unscaled_norm(tmp_path, monkeypatch):
    """AMPTrainer asserts CUDA: on the CPU only that check is patched; its GradScaler is the CPU
    one (passed as AMPTrainer takes it). after_backward sees the scaled gradients: the capture
    divides the scale out, as the optimizer sees them after the scaler unscales."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = build()
    data = batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer = AMPTrainer(model, [next(data) for _ in range(2)], opt, grad_scaler=scaler)
    norms = {}

    def record(*_):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms[trainer.iter] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))

    opt.register_step_pre_hook(record)
    dumps = readme_hook(trainer, tmp_path, monkeypatch, ", every=1")
    trainer.train(0, 2)
    for k in range(2):
        meta = load_batch(dumps / f"step_{k:06d}" / "batch.pt").meta
        assert meta["grad_norm"]["loss_scale"] == 2.0**10
        assert meta["grad_norm"]["model"] == pytest.approx(norms[k], rel=1e-5)
        # the scaler's state at the step, and the autocast dtype AMPTrainer's forward ran in
        amp = meta["amp"]
        assert (amp["loss_scale"], amp["found_inf"], amp["skipped"]) == (2.0**10, False, 0)
        assert amp["dtype"] == meta["autocast"] == "float16"


@pytest.mark.parametrize("loss_type", ["giou", "diou", "ciou"])
def test_a_roi_box_loss_on_decoded_boxes_is_replayed(tmp_path, loss_type):
    """BBOX_REG_LOSS_TYPE giou / diou / ciou of the RoI head: every term of Detectron2's loss dict
    reproduced (the box loss on the boxes the deltas decode to, against the GT boxes)."""
    model = build()
    model.roi_heads.box_predictor.box_reg_loss_type = loss_type
    folder, loss_dict = loop_of_our_own(model, ld.Capture(tmp_path, model, every=1))
    assert load_batch(folder / "batch.pt").meta["profile"]["roi_box"]["loss"] == f"{loss_type}_d2"
    assert_reproduces(folder, loss_dict)


def test_a_model_it_cannot_replay_trains_on(tmp_path, monkeypatch):
    """A GIoU loss in the RPN: said once when the hook is registered, the run goes to its end,
    captures are written, and inspect refuses them with the same message."""
    trainer = default_trainer(tmp_path)
    trainer._trainer.model.proposal_generator.box_reg_loss_type = "giou"
    with pytest.warns(RuntimeWarning, match="cannot be replayed.*giou"):
        dumps = readme_hook(trainer, tmp_path, monkeypatch, ", every=1")
        trainer.train()
    assert trainer.iter == 2 and sorted(p.name for p in dumps.iterdir()) == [
        "step_000000", "step_000001"
    ]  # fmt: skip
    r = CliRunner().invoke(app, ["inspect", str(dumps / "step_000000")])
    assert r.exit_code == 2 and "cannot be replayed" in r.output and "giou" in r.output
