"""MMDetection's shipped two-stage configs (and a few one-stage ones), each built from its own
config file (random init, 3 classes, samplers taking every candidate, a synthetic batch of
crowded GT): one training step captured and replayed term by term equal to mmdet's own loss
dict, or refused by name at capture, ``check``, ``inspect`` and ``config-from`` (never replayed
wrong, never an internal error). Each outcome is a row of docs/coverage.md's table
(``LOSSDOCTOR_COVERAGE``)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from typer.testing import CliRunner

import factories as F

mmdet = F.framework("mmdet")
F.framework("mmengine")
from mmdet.registry import MODELS  # noqa: E402
from mmengine.config import Config  # noqa: E402
from test_adapter_mmdet import (  # noqa: E402, F401 (the RoIAlign fixtures apply here too)
    CONFIGS,
    EVERY,
    data_batch,
    mask_roi_align,
    masked,
    roi_align,
)

from lossdoctor.adapters import mmdet as ld  # noqa: E402
from lossdoctor.cli import app  # noqa: E402
from lossdoctor.inputs.checkpoint import heads_from_state_dict  # noqa: E402
from lossdoctor.inputs.errors import InputError  # noqa: E402

REL = 1e-5
DENSE_TERMS = {"dense_cls": "loss_cls", "dense_box": "loss_bbox", "dense_ctr": "loss_centerness"}
TERMS = {"rpn_cls": "loss_rpn_cls", "rpn_box": "loss_rpn_bbox", "roi_cls": "loss_cls",
         "roi_box": "loss_bbox", "roi_mask": "loss_mask"}  # fmt: skip

# config → (outcome, the words a refusal must carry)
MODELS_TRIED = {
    "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py": ("exact", ""),
    "faster_rcnn/faster-rcnn_r50-caffe_fpn_1x_coco.py": ("exact", ""),
    "faster_rcnn/faster-rcnn_r50-caffe-dc5_1x_coco.py": ("exact", ""),
    "pafpn/faster-rcnn_r50_pafpn_1x_coco.py": ("exact", ""),
    "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py": ("exact", ""),
    "cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py": ("exact", ""),
    "cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py": ("partial", ""),
    "faster_rcnn/faster-rcnn_r50_fpn_giou_1x_coco.py": ("exact", ""),
    "faster_rcnn/faster-rcnn_r50_fpn_iou_1x_coco.py": ("exact", ""),
    "faster_rcnn/faster-rcnn_r50_fpn_bounded-iou_1x_coco.py": ("exact", ""),
    "faster_rcnn/faster-rcnn_r50_fpn_ciou_1x_coco.py": ("exact", ""),
    "faster_rcnn/faster-rcnn_r50_fpn_ohem_1x_coco.py": ("exact", ""),
    "faster_rcnn/faster-rcnn_r50_fpn_soft-nms_1x_coco.py": ("refused", "soft_nms"),
    "faster_rcnn/faster-rcnn_r50_fpn_fcos-rpn_1x_coco.py": ("refused", "FCOSHead"),
    "faster_rcnn/faster-rcnn_r50-caffe_c4-1x_coco.py": ("exact", ""),
    "libra_rcnn/libra-faster-rcnn_r50_fpn_1x_coco.py": ("exact", ""),
    "gn/mask-rcnn_r50_fpn_gn-all_2x_coco.py": ("exact", ""),
    "gn+ws/faster-rcnn_r50_fpn_gn-ws-all_1x_coco.py": ("exact", ""),
    "double_heads/dh-faster-rcnn_r50_fpn_1x_coco.py": ("exact", ""),
    "dynamic_rcnn/dynamic-rcnn_r50_fpn_1x_coco.py": ("exact", ""),
    "sort/faster-rcnn_r50_fpn_8xb2-4e_mot17halftrain_test-mot17halfval.py": ("exact", ""),
    "pisa/faster-rcnn_r50_fpn_pisa_1x_coco.py": ("refused", "PISARoIHead"),
    "sabl/sabl-faster-rcnn_r50_fpn_1x_coco.py": ("refused", "SABLHead"),
    "rpn/rpn_r50_fpn_1x_coco.py": ("refused", "RPN, a proposal network without RoI heads"),
    "retinanet/retinanet_r50_fpn_1x_coco.py": ("exact", ""),
    "fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py": ("exact", ""),
    "fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py": ("exact", ""),
    "atss/atss_r50_fpn_1x_coco.py": ("exact", ""),
    "gfl/gfl_r50_fpn_1x_coco.py": ("refused", "GFLHead"),
}


# configs whose RoI sampler mines hard examples: it takes this many RoIs per image (fewer than
# the candidates, so the mining decides which), and the replay is not told --sample-all
MINED = {"faster_rcnn/faster-rcnn_r50_fpn_ohem_1x_coco.py": 64}


def _trained_dynamic(model) -> None:
    """Dynamic R-CNN as some iterations into training: its live assigner thresholds and SmoothL1
    beta moved off train_cfg's, and updated again right after this step's loss (interval 1), so
    only the values the forward trained with reproduce its losses."""
    roi = model.roi_head
    for key in ("pos_iou_thr", "neg_iou_thr", "min_pos_iou"):
        setattr(roi.bbox_assigner, key, 0.55)
    roi.bbox_head.loss_bbox.beta = 0.3
    roi.train_cfg.dynamic_rcnn.update_iter_interval = 1


# the state a model is put in before its step (what a running training loop has changed)
PREPARED = {"dynamic_rcnn/dynamic-rcnn_r50_fpn_1x_coco.py": _trained_dynamic}


def _set(cfg, key: str, value) -> None:
    for part in cfg if isinstance(cfg, list) else [cfg]:
        if part is not None and key in part:
            part[key] = value


def model_config(path: str):
    """The config's model with 3 classes, random init and samplers that take every candidate."""
    cfg = Config.fromfile(os.path.join(CONFIGS, path))
    m = cfg.model
    m.backbone.init_cfg = None
    m.pop("init_cfg", None)  # (a whole pretrained detector, as SORT's config loads)
    if m.get("roi_head", {}).get("shared_head") is not None:  # (a C4 head's pretrained res5)
        m.roi_head.shared_head.init_cfg = None
    for name in ("bbox_head", "mask_head"):
        _set(m.get("roi_head", {}).get(name), "num_classes", 3)
    _set(m.get("bbox_head"), "num_classes", 3)
    train = m.get("train_cfg") or {}
    for stage in ("rpn", "rcnn"):
        for part in train.get(stage) if isinstance(train.get(stage), list) else [train.get(stage)]:
            if part is not None and part.get("sampler") is not None:
                _set(part.sampler, "num", MINED.get(path, EVERY) if stage == "rcnn" else EVERY)
                _set(part.sampler, "neg_pos_ub", -1)  # (a bound draws the negatives at random)
    return m


def build(path: str, init: bool = True):
    """The config's model in train mode; ``init``: its own initialization (a C4 config's shared
    head would download weights for it: refused models are not initialized)."""
    torch.manual_seed(0)
    model = MODELS.build(model_config(path))
    if init:
        model.init_weights()
    return model.train()


def crowded(step: int) -> dict:
    """The adapter tests' batch with each GT box duplicated a few pixels off (so the assigners'
    low-quality passes tie and reassign), with masks."""
    batch = data_batch(step)
    for ds in batch["data_samples"]:
        gt = ds.gt_instances
        near = gt[:]
        near.bboxes = gt.bboxes.clone()
        near.bboxes.tensor.add_(torch.tensor([3.0, 2.0, 4.0, 1.0]))
        ds.gt_instances = gt.cat([gt, near])
    return masked(batch)


def one_step(model, capture) -> dict:
    data = model.data_preprocessor(crowded(0), True)
    losses = model(**data, mode="loss")
    loss, log_vars = model.parse_losses(losses)
    loss.backward()
    if capture is not None:
        capture.check(0, losses)
    return {k: float(v) for k, v in log_vars.items()}


def _version() -> str:
    return mmdet.__version__


def _replayed(folder, losses: dict, mined: bool = False) -> dict:
    """Each replayed term's relative gap to mmdet's (a cascade's per stage)."""
    rep = F.inspect_json(folder) if mined else F.inspect_json(folder, "--sample-all")
    own = rep["meta"]["run"]["profile"]
    row = next(x for x in rep["tables"]["profiles"] if x["profile"] == own)
    terms = DENSE_TERMS if rep["meta"].get("dense") else TERMS
    want = {t: losses[k] for t, k in terms.items() if k in losses}
    got = {t: row[t] for t in want}
    for r in rep["tables"]["levels"]:
        stage = f"s{r['stage']}"
        at = (r["profile"], r["head"], r["level"]) == (own, "roi", "all")
        if at and f"{stage}.loss_cls" in losses:
            for col in ("loss_cls", "loss_bbox"):
                got[f"{stage}.{col}"], want[f"{stage}.{col}"] = r[col], losses[f"{stage}.{col}"]
    return F.relative_gaps(got, want)


def refused_by_name(tmp_path, model, config_file: str, words: str) -> list:
    """The capture, the checkpoint's reader and ``config-from`` each name what is not replayed
    (exit 2); → the capture's warnings."""
    with pytest.warns(RuntimeWarning, match="not replayed yet") as said:
        ld.Capture(tmp_path, model, every=1)
    assert any(words in str(w.message) for w in said), [str(w.message) for w in said]
    try:  # a head design is refused from the checkpoint alone too (a loss cannot be)
        heads_from_state_dict(model.state_dict())
    except InputError as e:
        assert "not replayed yet" in str(e), str(e)
    r = CliRunner().invoke(app, ["config-from", "mmdet", config_file])
    assert r.exit_code == 2 and words in r.output and "not replayed yet" in r.output, r.output
    return list(said)


@pytest.mark.parametrize("path", list(MODELS_TRIED))
def test_every_config_is_replayed_exactly_or_refused_by_name(tmp_path, path):
    outcome, words = MODELS_TRIED[path]
    name = os.path.basename(path).removesuffix(".py")
    model = build(path, init=outcome != "refused")
    if outcome == "refused":  # (what a refused model's training and captures do: the adapter tests)
        said = refused_by_name(tmp_path, model, os.path.join(CONFIGS, path), words)
        F.record_coverage("mmdet", _version(), name, outcome, F.refusal(said, words))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a replayable model: no warning
        capture = ld.Capture(tmp_path, model, every=1)
    PREPARED.get(path, lambda m: None)(model)  # after the capture started, as in a training run
    losses = one_step(model, capture)
    if path in PREPARED:  # the head moved its thresholds after the loss: the test means something
        assert model.roi_head.bbox_assigner.pos_iou_thr != 0.55
    dense = getattr(model, "rpn_head", None) is None
    if not dense:  # (the RPN coder's border, its NMS)
        F.assert_own_proposals_are_dumped(capture.written[0])
    gaps = _replayed(capture.written[0], losses, path in MINED)
    assert gaps and max(gaps.values()) <= REL, gaps
    terms = DENSE_TERMS if dense else TERMS
    replayed = {k for k in losses if k.endswith(("loss_mask",)) and "roi_mask" in gaps} | {
        terms[t] for t in gaps if t in terms
    }
    left = sorted(k for k in losses if k.startswith(("loss_", "s")) and k not in replayed
                  and k not in gaps and "acc" not in k)  # fmt: skip
    assert bool(left) == (outcome == "partial"), left
    detail = f"max rel. gap {max(gaps.values()):.1e} over {len(gaps)} terms"
    if left:
        detail += f"; not replayed: {', '.join(left)}"
    F.record_coverage("mmdet", _version(), name, outcome, detail)


def test_a_cascade_of_conv_heads_is_refused_by_name(tmp_path):
    """Cascade R-CNN whose stages are GN conv heads (the replay runs each stage as a 2-fc head):
    refused naming the stage's head, never replayed with the wrong layers."""
    cfg = Config.fromfile(os.path.join(CONFIGS, "cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py"))
    for head in cfg.model.roi_head.bbox_head:
        head.update(type="Shared4Conv1FCBBoxHead", conv_out_channels=256,
                    norm_cfg=dict(type="GN", num_groups=32, requires_grad=True))  # fmt: skip
    cfg.model.backbone.init_cfg = None
    path = tmp_path / "cascade-gn-heads.py"
    cfg.dump(str(path))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).train()
    refused_by_name(tmp_path / "dump", model, str(path), "cascade stage 0's box head")
