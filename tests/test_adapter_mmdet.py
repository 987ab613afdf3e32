"""The MMDetection adapter against mmdet 3.x's real Faster R-CNN R50-FPN (skipped without mmdet):
training steps in a loop and inside an mmengine Runner, captures, and `lossdoctor inspect DIR`
reproducing the loss dict mmdet computed for that step, with RandomSampler and PseudoSampler.

Where mmcv's compiled ops are absent (mmcv-lite with a stub), mmcv's RoIAlign is routed to
lossdoctor's kernel, which is tested against torchvision's separately.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import factories as F

mmdet = F.framework("mmdet")
F.framework("mmengine")
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.structures.bbox import HorizontalBoxes  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from lossdoctor.adapters import mmdet as ld  # noqa: E402
from lossdoctor.cli import app  # noqa: E402
from lossdoctor.inputs.batch import load_batch  # noqa: E402
from lossdoctor.inputs.config import load_config, preset  # noqa: E402
from lossdoctor.replay.roi_align import roi_align_torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE = os.path.join(
    os.path.dirname(mmdet.__file__), ".mim/configs/faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
)
EVERY = 10**6  # a sampler budget no batch reaches: RandomSampler keeps every candidate
TERMS = {
    "rpn_cls": "loss_rpn_cls",
    "rpn_box": "loss_rpn_bbox",
    "roi_cls": "loss_cls",
    "roi_box": "loss_bbox",
}
REL = 1e-5
register_all_modules()


@pytest.fixture(autouse=True)
def roi_align(monkeypatch):
    """mmcv-lite has no compiled RoIAlign: pool with lossdoctor's kernel instead."""
    ext = importlib.import_module("mmcv._ext")
    if getattr(ext, "MMCV_EXT_IS_STUB", False):
        ops = importlib.import_module("mmcv.ops.roi_align")

        def forward(self, feat, rois):
            size, ratio = self.output_size[0], self.sampling_ratio
            img = rois[:, 0].long()
            return roi_align_torch(
                feat, rois[:, 1:], img, self.spatial_scale, size, ratio, self.aligned
            )

        monkeypatch.setattr(ops.RoIAlign, "forward", forward)


def model_config(rpn_sampler="RandomSampler"):
    cfg = Config.fromfile(BASE)
    cfg.model.backbone.init_cfg = None
    cfg.model.roi_head.bbox_head.num_classes = 3
    if rpn_sampler == "PseudoSampler":
        cfg.model.train_cfg.rpn.sampler = dict(type="PseudoSampler")
    else:
        cfg.model.train_cfg.rpn.sampler.num = EVERY
    cfg.model.train_cfg.rcnn.sampler.num = EVERY
    return cfg


def build(rpn_sampler="RandomSampler"):
    torch.manual_seed(0)
    model = MODELS.build(model_config(rpn_sampler).model)
    model.init_weights()
    return model.train()


def sample(i: int, ignored: int = 0) -> dict:
    g = torch.Generator().manual_seed(i)
    h, w = (120, 160) if i % 2 else (128, 144)
    xy = torch.rand(3 + ignored, 2, generator=g) * torch.tensor([w - 40, h - 40])
    boxes = torch.cat([xy, xy + torch.rand(3 + ignored, 2, generator=g) * 30 + 10], 1)
    labels = torch.randint(0, 3, (3 + ignored,), generator=g)
    ds = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
    ds.gt_instances = InstanceData(bboxes=HorizontalBoxes(boxes[:3]), labels=labels[:3])
    ds.ignored_instances = InstanceData(bboxes=HorizontalBoxes(boxes[3:]), labels=labels[3:])
    return dict(inputs=(torch.rand(3, h, w, generator=g) * 255).to(torch.uint8), data_samples=ds)


def data_batch(step: int, ignored: int = 0) -> dict:
    items = [sample(2 * step + k, ignored) for k in (0, 1)]
    return {
        "inputs": [x["inputs"] for x in items],
        "data_samples": [x["data_samples"] for x in items],
    }


def replayed(folder) -> tuple[dict, dict]:
    r = CliRunner().invoke(app, ["inspect", str(folder), "--sample-all", "--json", "-", "-q"])
    assert r.exit_code in (0, 1), r.output
    rep = json.loads(r.stdout)
    own = rep["meta"]["run"]["profile"]
    return rep, next(x for x in rep["tables"]["profiles"] if x["profile"] == own)


def assert_reproduces(folder, losses: dict) -> None:
    rep, row = replayed(folder)
    assert rep["meta"]["run"]["framework"] == "mmdet"
    for term, key in TERMS.items():
        want = float(losses[key])
        assert row[term] == pytest.approx(want, rel=REL), (term, row[term], want)


def _train(model, tmp_path, batch_of):
    """Two training steps of ``model`` on ``batch_of(step)``, captured at each → (the last
    capture directory, the last step's log_vars)."""
    capture = ld.Capture(tmp_path, model, every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(2):
        data = model.data_preprocessor(batch_of(step), True)
        losses = model(**data, mode="loss")
        loss, log_vars = model.parse_losses(losses)
        opt.zero_grad()
        loss.backward()
        folder = capture.check(step, losses)
        opt.step()
    return folder, log_vars


@pytest.mark.parametrize("rpn_sampler", ["RandomSampler", "PseudoSampler"])
def test_capture_reproduces_mmdets_losses(tmp_path, rpn_sampler):
    folder, log_vars = _train(build(rpn_sampler), tmp_path, data_batch)
    assert_reproduces(folder, log_vars)
    meta = load_batch(folder / "batch.pt").meta
    assert meta["profile"] == "mmdet"
    assert meta["config"]["rpn_sampler"]["take_all"] is (rpn_sampler == "PseudoSampler")


def test_runner_hook_from_the_readme_lines(tmp_path):
    """The README's two config lines, in a config file read by mmengine, in a real Runner."""
    text = (ROOT / "README.md").read_text()
    lines = re.search(r"<!-- recipe: mmdet -->\n```python\n(.*?)```", text, re.S).group(1)
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(f"_base_ = {BASE!r}\n{lines}")
    cfg = Config.fromfile(str(cfg_file))
    assert [h["type"] for h in cfg.custom_hooks] == ["LossDoctorHook"]
    cfg.custom_hooks[0]["every"] = 1  # the README's triggers, and a periodic dump to test with
    run(tmp_path, model_config().model, cfg.custom_hooks)
    dumps = tmp_path / "work" / "lossdoctor-dumps"
    assert sorted(p.name for p in dumps.iterdir()) == ["step_000000", "step_000001"]
    folder = dumps / "step_000001"
    assert_reproduces(folder, load_batch(folder / "batch.pt").meta["losses"])


def run(tmp_path, model, hooks, iters=2, optim_wrapper=None, **kw):
    """A Runner training ``model`` (a config) for ``iters`` iterations on Shapes with ``hooks``."""
    from mmengine.runner import Runner

    wrapper = optim_wrapper or dict(optimizer=dict(type="SGD", lr=0.01, momentum=0.9))
    runner = Runner(
        model=model, work_dir=str(tmp_path / "work"), default_scope="mmdet",
        train_dataloader=dict(dataset=Shapes(), sampler=dict(type="DefaultSampler", shuffle=False),
                              batch_size=2, collate_fn=dict(type="pseudo_collate")),
        train_cfg=dict(by_epoch=False, max_iters=iters, val_interval=100),
        optim_wrapper=wrapper, custom_hooks=hooks, default_hooks=dict(checkpoint=None), **kw,
    )  # fmt: skip
    runner.train()
    return runner


def _small(path):
    cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None
    head = cfg.model.get("roi_head", {}).get("bbox_head") or cfg.model.bbox_head
    head.num_classes = 3
    return cfg.model


@pytest.mark.parametrize(
    "path, what",
    [("sabl/sabl-faster-rcnn_r50_fpn_1x_coco.py", "SABLHead"),
     ("gfl/gfl_r50_fpn_1x_coco.py", "GFLHead")],
    ids=["sabl", "gfl"],
)  # fmt: skip
def test_the_hook_never_stops_a_run_it_cannot_model(tmp_path, path, what):
    """MMDetection's own SABL and GFL configs train to the end with the hook: what it cannot
    replay is said once; the SABL captures are written and inspect refuses them with the same
    message (a GFL head is refused at construction: nothing is captured)."""
    hooks = [dict(type="LossDoctorHook", every=1)]
    with pytest.warns(RuntimeWarning, match=f"lossdoctor: .*{what}") as said:
        runner = run(tmp_path, _small(os.path.join(CONFIGS, path)), hooks)
    assert runner.iter == 2
    assert len([w for w in said if "lossdoctor" in str(w.message)]) == 1
    dumps = tmp_path / "work" / "lossdoctor-dumps"
    if what == "SABLHead":
        assert sorted(p.name for p in dumps.iterdir()) == ["step_000000", "step_000001"]
        r = CliRunner().invoke(app, ["inspect", str(dumps / "step_000000")])
        assert r.exit_code == 2 and "cannot be replayed" in r.output and what in r.output
    else:
        assert not dumps.exists()


@pytest.mark.parametrize("path", ["retinanet/retinanet_r50_fpn_1x_coco.py",
                                  "fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py",
                                  "atss/atss_r50_fpn_1x_coco.py"])  # fmt: skip
def test_a_one_stage_run_with_the_hook_is_captured_and_inspected(tmp_path, path):
    """RetinaNet and FCOS train under the Runner with the hook; every step is captured, and
    inspect replays each capture's dense head with the live model's config."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        runner = run(tmp_path, _small(os.path.join(CONFIGS, path)),
                     [dict(type="LossDoctorHook", every=1)])  # fmt: skip
    assert runner.iter == 2
    dumps = tmp_path / "work" / "lossdoctor-dumps"
    assert sorted(p.name for p in dumps.iterdir()) == ["step_000000", "step_000001"]
    rep = F.inspect_json(dumps / "step_000001")
    assert rep["meta"]["dense"]["preset"].startswith(
        ("mmdet-retinanet", "mmdet-fcos", "mmdet-atss")
    )
    rows = [r for r in rep["tables"]["levels"] if r["head"] == "dense" and r["level"] == "all"]
    assert len(rows) == 2 and rows[0]["pos"] > 0 and rows[0]["loss_cls"] > 0


class Norms:
    """The test's own record of each iteration: the whole model's gradient norm as the optimizer
    steps (after a loss scaler unscaled it; NaN where the scaler skipped the step) and whether
    the loss was finite."""

    def __init__(self):
        from mmengine.hooks import Hook

        norms, finite = {}, {}

        class Record(Hook):
            priority = "HIGHEST"

            def before_train(self, runner):
                def norm(*_):
                    grads = [p.grad for p in runner.model.parameters() if p.grad is not None]
                    sq = sum(float(g.double().pow(2).sum()) for g in grads)
                    norms[runner.iter] = math.sqrt(sq)

                runner.optim_wrapper.optimizer.register_step_pre_hook(norm)

            def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
                finite[runner.iter] = all(math.isfinite(float(v)) for v in outputs.values())

        self.hook, self.norms, self.finite = Record(), norms, finite

    @property
    def seen(self) -> list[tuple[float, bool]]:
        return [(self.norms.get(k, math.nan), ok) for k, ok in sorted(self.finite.items())]


def test_a_blow_up_in_the_runner_is_captured_over_the_norm_and_when_nonfinite(tmp_path):
    norms = Norms()
    hook = dict(type="LossDoctorHook", grad_norm_above=1000, max_captures=3)
    wrapper = dict(optimizer=dict(type="SGD", lr=50.0))
    run(tmp_path, model_config().model, [hook, norms.hook], iters=6, optim_wrapper=wrapper)
    seen = norms.seen
    over = [k for k, (n, ok) in enumerate(seen) if ok and n > 1000]
    bad = [k for k, (_, ok) in enumerate(seen) if not ok]
    assert over and bad and over[0] < bad[0], seen
    trouble = sorted(set(over) | set(bad))[:3]
    dumps = tmp_path / "work" / "lossdoctor-dumps"
    assert sorted(p.name for p in dumps.iterdir()) == [f"step_{k:06d}" for k in trouble]
    first = load_batch(dumps / f"step_{over[0]:06d}" / "batch.pt").meta
    assert first["trigger"]["kind"] == "grad-norm"
    assert first["grad_norm"]["model"] == pytest.approx(seen[over[0]][0], rel=1e-6)
    assert first["lr"] == 50.0 and first["optimizer"] == "SGD"
    assert first["framework_version"] == mmdet.__version__
    nan = load_batch(dumps / f"step_{bad[0]:06d}" / "batch.pt").meta
    assert nan["trigger"]["kind"] == "loss-not-finite"


@pytest.fixture
def amp_on_cpu(monkeypatch):
    """AmpOptimWrapper asserts a GPU and builds CUDA's GradScaler: on the CPU only its device
    check is patched, and its scaler is the CPU one (same class, torch.amp.GradScaler)."""
    from mmengine.optim.optimizer import amp_optimizer_wrapper as amp

    monkeypatch.setattr(amp, "is_cuda_available", lambda: True)
    monkeypatch.setattr(amp, "GradScaler", functools.partial(torch.amp.GradScaler, "cpu"))


def overflow():
    """An mmengine hook that makes one weight's gradient overflow at every step."""
    from mmengine.hooks import Hook

    class Overflow(Hook):
        def before_train(self, runner):
            weight = runner.model.rpn_head.rpn_cls.weight
            weight.register_hook(lambda g: torch.full_like(g, math.inf))

    return Overflow()


@pytest.mark.parametrize("overflows", [False, True], ids=["steps", "overflows"])
def test_amp_optim_wrapper_steps_are_captured_unscaled(tmp_path, amp_on_cpu, overflows):
    """AmpOptimWrapper (bfloat16 autocast, the one mmengine allows on the CPU): each step's
    capture divides the loss scale out (its norm equals the one the optimizer sees after the
    scaler unscales) and records the scale and the autocast dtype. An overflowing gradient (here
    one weight's) makes the scaler skip every step: each is still checked before it is skipped."""
    norms, scale = Norms(), 2.0**10
    hooks = [dict(type="LossDoctorHook", every=1), norms.hook] + ([overflow()] if overflows else [])
    wrapper = dict(type="AmpOptimWrapper", dtype="bfloat16", loss_scale=dict(init_scale=scale),
                   optimizer=dict(type="SGD", lr=0.01, momentum=0.9))  # fmt: skip
    run(tmp_path, model_config().model, hooks, iters=2, optim_wrapper=wrapper)
    dumps = tmp_path / "work" / "lossdoctor-dumps"
    assert sorted(p.name for p in dumps.iterdir()) == ["step_000000", "step_000001"]
    skipped = overflows
    assert len(norms.norms) == (0 if skipped else 2)
    for k, (norm, _) in enumerate(norms.seen):
        meta = load_batch(dumps / f"step_{k:06d}" / "batch.pt").meta
        assert meta["autocast"] == "bfloat16" and meta["grad_norm"]["loss_scale"] > 0
        if skipped:  # inf gradients under a scaler are the scaler's business, not a trigger
            assert meta["trigger"]["kind"] == "periodic"
            assert not math.isfinite(float(meta["grad_norm"]["model"]))
        else:
            assert meta["grad_norm"]["loss_scale"] == scale
            assert meta["grad_norm"]["model"] == pytest.approx(norm, rel=1e-5)


# measured on these steps: the RPN terms within 1e-7 relative of mmdet's bf16 loss dict (an fp32
# replay: 1e-5 to 1e-4 off). The RoI terms are not compared: mmcv-lite has no RoIAlign, and the
# kernel patched in for it pools in bf16 under autocast where mmcv's CUDA kernel and lossdoctor
# (as torchvision's autocast-registered roi_align) pool differently
AMP_REL = 1e-5
AMP_TERMS = ("rpn_cls", "rpn_box")


def test_amp_optim_wrapper_steps_replay_in_their_precision(tmp_path, amp_on_cpu):
    """AmpOptimWrapper's bfloat16 steps: the capture records meta["amp"] (dtype, scale, found_inf),
    the replay runs the heads in bfloat16 by default and reproduces mmdet's RPN losses of the
    step, closer than an fp32 replay of the same dump."""
    wrapper = dict(type="AmpOptimWrapper", dtype="bfloat16", loss_scale=dict(init_scale=2.0**10),
                   optimizer=dict(type="SGD", lr=0.01, momentum=0.9))  # fmt: skip
    run(tmp_path, model_config().model, [dict(type="LossDoctorHook", every=1)], iters=2,
        optim_wrapper=wrapper)  # fmt: skip
    for k in range(2):
        folder = tmp_path / "work" / "lossdoctor-dumps" / f"step_{k:06d}"
        meta = load_batch(folder / "batch.pt").meta
        assert meta["amp"]["dtype"] == "bfloat16" and meta["amp"]["found_inf"] is False
        assert meta["amp"]["loss_scale"] == 2.0**10
        want = {term: float(meta["losses"][TERMS[term]]) for term in AMP_TERMS}
        rep, row = replayed(folder)
        assert rep["meta"]["precision"]["precision"] == "bf16"
        low = F.relative_gaps({t: row[t] for t in want}, want)
        assert max(low.values()) <= AMP_REL, low
        fp32 = F.relative_gaps(F.replay_terms_with(folder, "--precision", "fp32"), want)
        assert max(fp32.values()) > 10 * max(low.values()), (fp32, low)


def test_accumulated_steps_say_which_micro_batch_was_captured(tmp_path):
    hook = dict(type="LossDoctorHook", every=1)
    wrapper = dict(optimizer=dict(type="SGD", lr=0.01), accumulative_counts=2)
    run(tmp_path, model_config().model, [hook], iters=4, optim_wrapper=wrapper)
    dumps = tmp_path / "work" / "lossdoctor-dumps"
    # the wrapper steps after iterations 1 and 3 (the second micro-batch of each pair)
    assert sorted(p.name for p in dumps.iterdir()) == ["step_000001", "step_000003"]
    meta = load_batch(dumps / "step_000001" / "batch.pt").meta
    assert meta["accumulation"]["micro_batches"] == 2 and meta["accumulation"]["captured"] == 2


def test_a_forward_that_raises_in_the_runner_is_captured_and_raised(tmp_path):
    """A forward raising inside the model (the RPN head, made to raise at iteration 1) is
    captured with what it had computed, and the error reaches the Runner unchanged."""
    from mmengine.hooks import Hook

    armed = {"now": False}

    def boom(module, args, out):
        if armed["now"]:
            raise FloatingPointError("boom inside the forward")

    class Arm(Hook):
        def before_train(self, runner):
            runner.model.rpn_head.rpn_conv.register_forward_hook(boom)

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            armed["now"] = runner.iter == 1

    hooks = [dict(type="LossDoctorHook"), Arm()]
    with pytest.raises(FloatingPointError, match="boom inside the forward"):
        run(tmp_path, model_config().model, hooks, iters=3)
    (folder,) = (tmp_path / "work" / "lossdoctor-dumps").iterdir()
    assert folder.name == "step_000001"
    meta = load_batch(folder / "batch.pt").meta
    assert meta["trigger"]["kind"] == "exception"
    assert meta["trigger"]["value"] == "FloatingPointError: boom inside the forward"
    assert F.inspect_json(folder)["meta"]["batch"]["levels"] == ["p2", "p3", "p4", "p5", "p6"]


class Shapes(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return sample(i)


def test_dump_writes_what_the_hooked_forward_saw(tmp_path):
    model = build()
    capture = ld.Capture(tmp_path / "hooked", model, every=1)
    batch = data_batch(0, ignored=1)
    losses = model(**model.data_preprocessor(batch, True), mode="loss")
    model.parse_losses(losses)[0].backward()
    hooked = load_batch(capture.check(0, losses) / "batch.pt")
    direct = load_batch(ld.dump(tmp_path / "direct", model, batch) / "batch.pt")
    for name in hooked.features:
        assert torch.allclose(hooked.features[name], direct.features[name], atol=1e-5)
    assert all(torch.allclose(a, b) for a, b in zip(hooked.proposals, direct.proposals))
    # ignored_instances are GT marked ignored; the replay leaves them out
    assert [ig.tolist() for ig in hooked.gt_ignore] == [[False, False, False, True]] * 2
    assert hooked.levels == ["p2", "p3", "p4", "p5", "p6"] and hooked.pad_size == (128, 160)


def test_mmdets_own_config_is_the_preset(tmp_path):
    config, profile = ld.config_from_file(BASE)
    assert dataclasses.replace(config, name="mmdet") == preset("mmdet") and profile == "mmdet"
    r = CliRunner().invoke(app, ["config-from", "mmdet", BASE])
    assert r.exit_code == 0, r.output
    (tmp_path / "det.toml").write_text(r.stdout)
    assert dataclasses.replace(load_config(tmp_path / "det.toml"), name="mmdet") == preset("mmdet")


def test_a_loss_setting_of_the_model_becomes_a_profile_table():
    cfg = model_config()
    cfg.model.rpn_head.loss_bbox = dict(type="SmoothL1Loss", beta=1.0 / 9.0, loss_weight=2.0)
    model = MODELS.build(cfg.model)
    table = ld.profile(model)
    assert table["rpn_box"]["loss"] == "smooth_l1" and table["rpn_box"]["weight"] == 2.0
    assert table["rpn_box"]["beta"] == pytest.approx(1 / 9) and table["roi_box"]["loss"] == "l1"


@pytest.mark.parametrize("kind", ["initialized", "uniform images", "saturated"])
def test_own_proposals_are_mmdets_ties_included(tmp_path, kind):
    """Uniform images make every interior location of a level score alike; saturated logits
    (about 40) differ while their probabilities, which mmdet sorts, are all 1.0."""
    model = build()
    batch = data_batch(0)
    if kind == "uniform images":
        batch["inputs"] = [torch.full_like(x, 128) for x in batch["inputs"]]
    if kind == "saturated":
        with torch.no_grad():
            model.rpn_head.rpn_cls.weight.mul_(50)
            model.rpn_head.rpn_cls.bias.add_(40)
    F.assert_own_proposals_are_dumped(ld.dump(tmp_path, model, batch))


CONFIGS = os.path.join(os.path.dirname(mmdet.__file__), ".mim/configs")
MASK_BASE = os.path.join(CONFIGS, "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py")
CASCADE_BASE = os.path.join(CONFIGS, "cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py")


@pytest.fixture(autouse=True)
def mask_roi_align(monkeypatch):
    """mmcv-lite has no compiled roi_align for the mask targets either: lossdoctor's kernel."""
    ext = importlib.import_module("mmcv._ext")
    if getattr(ext, "MMCV_EXT_IS_STUB", False):
        structures = importlib.import_module("mmdet.structures.mask.structures")

        def roi_align(feat, rois, out, scale, ratio, mode, aligned):
            return roi_align_torch(feat, rois[:, 1:], rois[:, 0].long(), scale, out[0], ratio,
                                   aligned, max_grid=4096)  # fmt: skip

        monkeypatch.setattr(structures, "roi_align", roi_align)


def _every(cfg):
    """Samplers that take every candidate, at every stage."""
    cfg.model.train_cfg.rpn.sampler.num = EVERY
    stages = cfg.model.train_cfg.rcnn
    for stage in stages if isinstance(stages, list) else [stages]:
        stage.sampler.num = EVERY
    return cfg


def build_from(path: str, every: bool = True):
    cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None
    heads = cfg.model.roi_head.bbox_head
    for head in heads if isinstance(heads, list) else [heads]:
        head.num_classes = 3
    if cfg.model.roi_head.get("mask_head") is not None:
        cfg.model.roi_head.mask_head.num_classes = 3
    torch.manual_seed(0)
    model = MODELS.build((_every(cfg) if every else cfg).model)
    model.init_weights()
    return model.train()


def masked(batch: dict) -> dict:
    """GT masks (ellipses in the boxes) on every data sample, as BitmapMasks."""
    import numpy as np
    from mmdet.structures.mask import BitmapMasks

    for ds in batch["data_samples"]:
        h, w = ds.metainfo["img_shape"]
        ys, xs = np.mgrid[0:h, 0:w] + 0.5
        ms = []
        for x1, y1, x2, y2 in ds.gt_instances.bboxes.tensor.tolist():
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            ms.append((((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).astype(np.uint8))
        ds.gt_instances.masks = BitmapMasks(np.stack(ms), h, w)
    return batch


def test_mask_rcnn_reproduces_mmdets_mask_loss(tmp_path):
    folder, log_vars = _train(build_from(MASK_BASE), tmp_path, lambda s: masked(data_batch(s)))
    assert_reproduces(folder, log_vars)
    _, row = replayed(folder)
    assert row["roi_mask"] == pytest.approx(float(log_vars["loss_mask"]), rel=REL)


def test_cascade_rcnn_reproduces_mmdets_stage_losses(tmp_path):
    folder, log_vars = _train(build_from(CASCADE_BASE), tmp_path, data_batch)
    rep, row = replayed(folder)
    for term, key in (("rpn_cls", "loss_rpn_cls"), ("rpn_box", "loss_rpn_bbox")):
        assert row[term] == pytest.approx(float(log_vars[key]), rel=REL)
    own = rep["meta"]["run"]["profile"]
    assert own == "mmdet-cascade"  # SmoothL1 boxes, recognised as the built-in profile
    for k in range(3):
        want = (own, "roi", k, "all")
        rows = rep["tables"]["levels"]
        (stage,) = [r for r in rows if (r["profile"], r["head"], r["stage"], r["level"]) == want]
        assert stage["loss_cls"] == pytest.approx(float(log_vars[f"s{k}.loss_cls"]), rel=REL)
        assert stage["loss_bbox"] == pytest.approx(float(log_vars[f"s{k}.loss_bbox"]), rel=REL)


@pytest.mark.parametrize(
    ("path", "name"), [(CASCADE_BASE, "mmdet-cascade"), (MASK_BASE, "mmdet-mask")]
)
def test_cascade_and_mask_config_files_are_the_presets(path, name):
    config, profile = ld.config_from_file(path)
    assert dataclasses.replace(config, name=name) == preset(name)
    assert profile == name.replace("-mask", "")


def test_cascade_symptom_is_mmdets_prediction(tmp_path):
    """The symptom of a captured Cascade R-CNN step is what mmdet's predict detects with the
    same weights on the same images: per image the number of detections and the top score
    (three stages on each other's refined boxes, logits averaged before the softmax)."""
    model = build_from(CASCADE_BASE)
    capture = ld.Capture(tmp_path, model, every=1)
    data = model.data_preprocessor(data_batch(0), True)
    losses = model(**data, mode="loss")
    model.parse_losses(losses)[0].backward()
    folder = capture.check(0, losses)
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(data_batch(0), False)
        outs = [x.pred_instances for x in model(**data, mode="predict")]
    F.assert_symptom_is(folder, [x.scores for x in outs])


def _no_objects(step: int) -> dict:
    """The step's images with no object at all (an all-background batch)."""
    batch = data_batch(step)
    for ds in batch["data_samples"]:
        ds.gt_instances = ds.gt_instances[:0]
        ds.ignored_instances = ds.ignored_instances[:0]
    return batch


@pytest.mark.parametrize("path", [BASE, CASCADE_BASE], ids=["faster", "cascade"])
@pytest.mark.parametrize("batch", ["ordinary", "all-background"])
def test_a_healthy_run_raises_no_alarm(tmp_path, path, batch):
    """A healthy MMDetection run (its config's samplers), two steps captured in a loop: no
    warning and no error, on an ordinary batch and on one with no object."""
    model = build_from(path, every=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    capture = ld.Capture(tmp_path, model, every=1, optimizer=opt)
    for step in range(2):
        data = model.data_preprocessor((_no_objects if batch != "ordinary" else data_batch)(step),
                                       True)  # fmt: skip
        losses = model(**data, mode="loss")
        loss, _ = model.parse_losses(losses)
        opt.zero_grad()
        loss.backward()
        capture.check(step, losses)
        opt.step()
    for folder in capture.written:
        assert F.alarms(F.inspect_json(folder)) == [], folder.name


def test_a_box_with_swapped_corners_is_one_finding(tmp_path):
    """MMDetection trains on a box with swapped corners; its capture names the corners."""
    model = build()

    def swapped(step):
        batch = data_batch(step)
        boxes = batch["data_samples"][0].gt_instances.bboxes.tensor
        boxes[1] = boxes[1][[2, 3, 0, 1]]
        return batch

    folder, _ = _train(model, tmp_path, swapped)
    (alarm,) = F.alarms(F.inspect_json(folder))
    assert alarm[:2] == ("error", "degenerate-gt") and "x1/x2 and y1/y2" in alarm[2]
