"""Detectron2's model-zoo configs (two-stage, and RetinaNet), each built from its own yaml (random
init, 3 classes, samplers taking every candidate, a synthetic batch of crowded GT): one training
step captured and replayed term by term equal to Detectron2's own loss dict, or refused by name at
capture, ``check``, ``inspect`` and ``config-from`` (never replayed wrong, never an internal
error). Each outcome is a row of docs/coverage.md's table (``LOSSDOCTOR_COVERAGE``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from typer.testing import CliRunner

import factories as F

detectron2 = F.framework("detectron2")
from detectron2 import model_zoo  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from lossdoctor.adapters import detectron2 as ld  # noqa: E402
from lossdoctor.cli import app  # noqa: E402

EVERY = 10**6  # a sampler budget no batch reaches: every candidate is sampled
REL = 1e-5
DENSE_TERMS = {"dense_cls": "loss_cls", "dense_box": "loss_box_reg"}
TERMS = {"rpn_cls": "loss_rpn_cls", "rpn_box": "loss_rpn_loc", "roi_cls": "loss_cls",
         "roi_box": "loss_box_reg", "roi_mask": "loss_mask"}  # fmt: skip

# config → (outcome, the words a refusal must carry)
MODELS_TRIED = {
    "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml": ("exact", ""),
    "COCO-Detection/faster_rcnn_R_50_DC5_1x.yaml": ("exact", ""),
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml": ("exact", ""),
    "COCO-InstanceSegmentation/mask_rcnn_R_50_DC5_1x.yaml": ("exact", ""),
    "Misc/mask_rcnn_R_50_FPN_1x_cls_agnostic.yaml": ("exact", ""),
    "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml": ("exact", ""),
    "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml": ("exact", ""),
    "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml": ("partial", ""),
    "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml": ("exact", ""),
    "COCO-Detection/rpn_R_50_FPN_1x.yaml": ("refused", "ProposalNetwork"),
    "COCO-Detection/retinanet_R_50_FPN_1x.yaml": ("exact", ""),
}


def config_of(path: str):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(path))
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    cfg.MODEL.PIXEL_STD = [57.375, 57.12, 58.395]  # inputs of unit scale for an untrained model
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = EVERY
    if cfg.MODEL.RESNETS.NORM == "SyncBN":
        cfg.MODEL.RESNETS.NORM = "BN"
    return cfg


def build(path: str):
    torch.manual_seed(0)
    return build_model(config_of(path)).train()


def crowded_batch(seed: int) -> list[dict]:
    """Two images, 6 GT each (3 boxes and a near-duplicate of each), with masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in ((120, 160), (128, 144)):
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w - 40, h - 40])
        base = torch.cat([xy, xy + torch.rand(3, 2, generator=g) * 30 + 10], 1)
        boxes = torch.cat([base, base + torch.tensor([3.0, 2.0, 4.0, 1.0])])
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        masks = torch.stack([(xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= (y1 + y2) / 2 + 4)
                             for x1, y1, x2, y2 in boxes.tolist()])  # fmt: skip
        inst = Instances((h, w), gt_boxes=Boxes(boxes), gt_masks=BitMasks(masks),
                         gt_classes=torch.randint(0, 3, (6,), generator=g))  # fmt: skip
        out.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst,
                    "height": h, "width": w})  # fmt: skip
    return out


def one_step(model, capture) -> dict:
    with EventStorage(0):
        losses = model(crowded_batch(5))
        sum(losses.values()).backward()
        if capture is not None:
            capture.check(0, losses)
    return {k: float(v.detach()) for k, v in losses.items()}


def _replayed(folder, losses: dict) -> dict:
    rep = F.inspect_json(folder, "--sample-all")
    own = rep["meta"]["run"]["profile"]
    row = next(x for x in rep["tables"]["profiles"] if x["profile"] == own)
    # (a term the replay names as not replayed has no value)
    terms = DENSE_TERMS if rep["meta"].get("dense") else TERMS
    want = {t: losses[k] for t, k in terms.items() if k in losses and row.get(t) is not None}
    got = {t: row[t] for t in want}
    for r in rep["tables"]["levels"]:
        k = r["stage"]
        at = (r["profile"], r["head"], r["level"]) == (own, "roi", "all")
        if at and f"loss_cls_stage{k}" in losses:
            for col, key in (("loss_cls", "loss_cls_stage"), ("loss_bbox", "loss_box_reg_stage")):
                got[f"{key}{k}"], want[f"{key}{k}"] = r[col], losses[f"{key}{k}"]
    return F.relative_gaps(got, want)


@pytest.mark.parametrize("path", list(MODELS_TRIED))
def test_every_config_is_replayed_exactly_or_refused_by_name(tmp_path, path):
    outcome, words = MODELS_TRIED[path]
    name = path.split("/")[-1].removesuffix(".yaml")
    model = build(path)
    version = detectron2.__version__
    if outcome == "refused":
        with pytest.warns(RuntimeWarning, match="not replayed yet") as said:
            capture = ld.Capture(tmp_path, model, every=1)
        assert any(words in str(w.message) for w in said), [str(w.message) for w in said]
        one_step(model, capture)  # the run goes on
        if capture.written:
            F.assert_refused_by_name(capture.written[0], words)
        cfg_file = model_zoo.get_config_file(path)
        r = CliRunner().invoke(app, ["config-from", "detectron2", cfg_file])
        assert r.exit_code == 2 and words in r.output and "not replayed yet" in r.output, r.output
        F.record_coverage("detectron2", version, name, outcome, F.refusal(said, words))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a replayable model: no warning
        capture = ld.Capture(tmp_path, model, every=1)
    losses = one_step(model, capture)
    gaps = _replayed(capture.written[0], losses)
    assert gaps and max(gaps.values()) <= REL, gaps
    terms = DENSE_TERMS if "loss_box_reg" in losses and "loss_rpn_cls" not in losses else TERMS
    covered = set(gaps) | {terms[t] for t in gaps if t in terms}
    left = sorted(set(losses) - covered)
    assert left == (["loss_mask"] if outcome == "partial" else []), left
    detail = f"max rel. gap {max(gaps.values()):.1e} over {len(gaps)} terms"
    if left:
        detail += f"; not replayed: {', '.join(left)}"
    F.record_coverage("detectron2", version, name, outcome, detail)


def test_retinanet_steps_replay_with_the_ema_normalizer_they_ran_with(tmp_path):
    """Three RetinaNet steps in a row (the second without GT, so the running normalizer drops):
    each capture records the normalizer before its step, and replays Detectron2's losses."""
    model = build("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    capture = ld.Capture(tmp_path, model, every=1, max_captures=3)
    seen = []
    for step in range(3):
        batch = crowded_batch(5 + step)
        if step == 1:
            for x in batch:
                x["instances"] = x["instances"][:0]
        with EventStorage(step):
            losses = model(batch)
            sum(losses.values()).backward()
            capture.check(step, losses)
        seen.append({k: float(v.detach()) for k, v in losses.items()})
    assert len(capture.written) == 3
    recorded = [F.inspect_json(d)["meta"]["dense"] for d in capture.written]
    assert recorded[0]["ema_before"] is None and recorded[1]["ema_before"] is not None
    assert recorded[2]["ema"] < recorded[1]["ema_before"]  # pulled down by the empty step
    for folder, want in zip(capture.written, seen):
        gaps = _replayed(folder, want)
        assert set(gaps) == {"dense_cls", "dense_box"} and max(gaps.values()) <= REL, gaps


def test_a_cascade_of_conv_heads_is_refused_by_name(tmp_path):
    """Cascade R-CNN with 4-conv + 1-fc GN box heads (as the zoo's X152 cascade has; the replay
    runs each stage as a 2-fc head): refused naming the stage's head at capture and config-from,
    and the run goes on."""
    cfg = config_of("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml")
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 4, 1
    cfg.MODEL.ROI_BOX_HEAD.NORM = "GN"
    torch.manual_seed(0)
    model = build_model(cfg).train()
    words = "cascade stage 0's box head FastRCNNConvFCHead with 4 convs and 1 fcs with a norm"
    with pytest.warns(RuntimeWarning, match="not replayed yet") as said:
        capture = ld.Capture(tmp_path / "dumps", model, every=1)
    assert any(words in str(w.message) for w in said), [str(w.message) for w in said]
    one_step(model, capture)
    path = tmp_path / "cascade-gn-heads.yaml"
    path.write_text(cfg.dump())
    r = CliRunner().invoke(app, ["config-from", "detectron2", str(path)])
    assert r.exit_code == 2 and words in r.output, r.output
