"""The dense (one-stage) head: hand-computed focal loss, centerness and normalizers, every
framework's divisor on a batch without positives, Detectron2's EMA over three steps, the JSON
rows a user compares with a framework's loss dict, the findings, and refusals by name."""

from __future__ import annotations

import json
import math

import pytest
import torch

import factories as F
from lossdoctor.api import inspect
from lossdoctor.inputs.batch import validate_batch
from lossdoctor.inputs.dense import EMA_INITIAL, FIXED, LEGACY, dense_preset
from lossdoctor.inputs.dense_weights import dense_weights, find_dense_layout
from lossdoctor.replay.dense import centerness, dense_replay, ema_update, focal_loss
from lossdoctor.report.model import Report
from lossdoctor.vocab import Part

PRESETS = {
    "torchvision-retinanet": ("torchvision", "retinanet", False, 9),
    "torchvision-fcos": ("torchvision", "fcos", True, 1),
    "detectron2-retinanet": ("detectron2", "retinanet", False, 9),
    "mmdet-retinanet": ("mmdet", "retinanet", False, 9),
    "mmdet-fcos": ("mmdet", "fcos", True, 1),
    "mmdet-atss": ("mmdet", "atss", True, 1),
}


def _replay(preset, boxes=None, ema_before=None, profiles=None, **kw):
    layout, kind, norm, anchors = PRESETS[preset]
    sd = F.dense_state_dict(layout, kind, norm=norm, anchors=anchors, **kw)
    b = validate_batch(F.dense_batch_dict(boxes=boxes))
    cfg = dense_preset(preset)
    w = dense_weights(sd, find_dense_layout(sd))
    return dense_replay(w, b, cfg, profiles or [cfg.profile, FIXED, LEGACY], ema_before=ema_before)


def test_focal_loss_by_hand():
    logits = torch.tensor([0.0, 0.0, 2.0, -1.0])
    target = torch.tensor([1.0, 0.0, 0.0, 1.0])
    got = focal_loss(logits, target, 0.25, 2.0)
    p = 1 / (1 + math.exp(1.0))  # sigmoid(-1)
    want = [
        0.25 * 0.5**2 * math.log(2),  # positive at p = 0.5
        0.75 * 0.5**2 * math.log(2),  # negative at p = 0.5
        0.75 * (1 / (1 + math.exp(-2))) ** 2 * math.log(1 + math.exp(2)),  # a confident miss
        0.25 * (1 - p) ** 2 * -math.log(p),
    ]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_centerness_by_hand():
    # l, t, r, b = 2, 3, 6, 3 → sqrt(2/6 * 3/3); a centred point → 1
    got = centerness(torch.tensor([[2.0, 3.0, 6.0, 3.0], [4.0, 4.0, 4.0, 4.0]]))
    assert got.tolist() == pytest.approx([math.sqrt(1 / 3), 1.0])


def test_ema_normalizer_over_three_steps():
    steps = [(10, 91.0), (0, 82.0), (40, 77.8)]  # 0.9 x before + 0.1 x max(pos, 1)
    before = None
    for pos, want in steps:
        before = ema_update(before, pos, 0.9)
        assert before == pytest.approx(want)
    assert ema_update(None, 0, 0.9) == pytest.approx(0.9 * EMA_INITIAL + 0.1)


def _all_negative_focal(r) -> float:
    """Σ over every anchor and class of (1 - α) p^γ (-log(1 - p)): the focal loss of
    negatives, computed here from the head's logits."""
    total = 0.0
    for lv in r.levels:
        p = torch.sigmoid(lv.out.logits.detach().double())
        total += float((0.75 * p**2 * -torch.log1p(-p)).sum())
    return total


@pytest.mark.parametrize("preset", list(PRESETS))
def test_no_positives_each_framework_divides_by_what_it_does(preset):
    r = _replay(preset, boxes=[torch.zeros(0, 4)] * 2, ema_before=50.0)
    neg = _all_negative_focal(r)
    n = 2
    divisor = {
        "torchvision-retinanet": n * 1.0,  # per image max(1, 0) = 1, averaged over 2 images
        "torchvision-fcos": 1.0,  # max(1, num_fg)
        "detectron2-retinanet": 0.9 * 50.0 + 0.1 * 1,  # the EMA moves towards max(pos, 1)
        "mmdet-retinanet": n * 1.0 + 1.1920928955078125e-07,  # Σ_img max(#pos, 1) + eps
        "mmdet-fcos": 1.0 + 1.1920928955078125e-07,  # max(reduce_mean(0), 1.0) + eps
        "mmdet-atss": n * 1.0 + 1.1920928955078125e-07,  # reduce_mean(sum max(#pos, 1)) + eps
    }[preset]
    own = r.losses[preset]
    assert float(own.term(Part.CLS)) == pytest.approx(neg / divisor, rel=1e-5)
    assert float(own.term(Part.BOX)) == 0.0 and float(own.term(Part.CTR)) == 0.0
    assert float(r.losses["fixed"].term(Part.CLS)) == pytest.approx(neg, rel=1e-5)
    assert math.isinf(float(r.losses["legacy"].term(Part.CLS)))  # x / 0 on every level
    assert math.isnan(float(r.losses["legacy"].term(Part.BOX)))  # 0 / 0


def test_centerness_weighted_box_term_is_divided_by_the_centerness_sum():
    r = _replay("mmdet-fcos")
    pos = [lv.positive for lv in r.levels]
    ctr = torch.cat([lv.ctr_target[p] for lv, p in zip(r.levels, pos)])
    # the unweighted per-positive IoU loss, from the decoded boxes, by hand: -log IoU
    box = torch.cat([(lv.box[p] / lv.ctr_target[p]).detach() for lv, p in zip(r.levels, pos)])
    assert ctr.numel() > 10 and bool((ctr > 0).all()) and bool((ctr <= 1).all())
    want = float((box * ctr).sum() / (ctr.sum() + 1.1920928955078125e-07))
    assert float(r.losses["mmdet-fcos"].term(Part.BOX)) == pytest.approx(want, rel=1e-5)
    # fixed divides the same weighted sum by the positives instead
    fixed = float((box * ctr).sum()) / ctr.numel()
    assert float(r.losses["fixed"].term(Part.BOX)) == pytest.approx(fixed, rel=1e-5)


def test_per_image_normalizer_of_torchvision_retinanet():
    boxes = [torch.tensor([[8.0, 10.0, 60.0, 70.0]]),
             torch.tensor([[8.0, 10.0, 60.0, 70.0], [70.0, 20.0, 150.0, 100.0]])]  # fmt: skip
    r = _replay("torchvision-retinanet", boxes=boxes)
    pos = r.positives.sum(1).tolist()
    assert pos[0] < pos[1]
    per_image = [sum(float(lv.focal[i].sum()) for lv in r.levels) for i in range(2)]
    want = sum(s / max(1, p) for s, p in zip(per_image, pos)) / 2
    assert float(r.losses["torchvision-retinanet"].term(Part.CLS)) == pytest.approx(want, rel=1e-5)
    fixed = sum(per_image) / sum(pos)
    assert float(r.losses["fixed"].term(Part.CLS)) == pytest.approx(fixed, rel=1e-5)


def _capture(tmp_path, preset, meta=None, boxes=None, **kw):
    layout, kind, norm, anchors = PRESETS[preset]
    folder = tmp_path / preset
    folder.mkdir()
    torch.save(F.dense_state_dict(layout, kind, norm=norm, anchors=anchors, **kw),
               folder / "checkpoint.pt")  # fmt: skip
    d = F.dense_batch_dict(boxes=boxes)
    if meta:
        d["meta"] = meta
    torch.save(d, folder / "batch.pt")
    return folder


@pytest.mark.parametrize("preset", ["torchvision-fcos", "mmdet-retinanet"])
def test_json_all_rows_carry_the_framework_loss_dict_terms(tmp_path, preset):
    folder = _capture(tmp_path, preset)
    out = tmp_path / "r.json"
    F.invoke("inspect", str(folder), "--json", str(out), "--fail-on", "never")
    data = json.loads(out.read_text())
    rows = [r for r in data["tables"]["levels"] if r["head"] == "dense" and r["level"] == "all"]
    own = [r for r in rows if r["profile"] == preset]
    assert len(own) == 1 and data["meta"]["dense"]["preset"] == preset
    totals = next(r for r in data["tables"]["profiles"] if r["profile"] == preset)
    assert own[0]["loss_cls"] == pytest.approx(totals["dense_cls"])
    assert own[0]["loss_bbox"] == pytest.approx(totals["dense_box"])
    assert ("loss_ctr" in own[0]) == (preset == "torchvision-fcos")
    per_level = [r for r in data["tables"]["levels"] if r["profile"] == preset
                 and r["level"] != "all"]  # fmt: skip
    assert sum(r["loss_cls"] for r in per_level) == pytest.approx(own[0]["loss_cls"], rel=1e-6)
    assert sum(r["pos"] for r in per_level) == own[0]["pos"] > 0
    params = {r["param"]: r for r in data["tables"]["params"] if r["profile"] == preset}
    logits, deltas = params["dense_logits.weight"], params["dense_deltas.weight"]
    assert logits["total"] == pytest.approx(logits["dense_cls"]) and logits["dense_box"] == 0
    assert deltas["total"] == pytest.approx(deltas["dense_box"]) and deltas["dense_cls"] == 0
    tower = params["dense_box_conv1.weight"]  # the box tower feeds box (and centerness)
    parts = [tower["dense_box"], tower.get("dense_ctr", 0.0)]
    assert tower["total"] <= sum(parts) + 1e-9 and tower["dense_cls"] == 0
    back = Report.from_dict(data)
    assert back.profiles == [r["profile"] for r in data["tables"]["profiles"]]
    assert back.meta.dense.positives == own[0]["pos"]


def test_findings_of_one_stage_heads(tmp_path):
    report = inspect(_capture(tmp_path, "detectron2-retinanet", prior=0.5,
                              meta={"dense": {"loss_normalizer": 5000.0}}))  # fmt: skip
    codes = {f.code for f in report.findings}
    assert {"dense-prior-bias", "dense-ema-normalizer-lag"} <= codes
    lag = next(f for f in report.findings if f.code == "dense-ema-normalizer-lag")
    pos = report.meta.dense.positives
    assert lag.evidence["ema"] == pytest.approx(0.9 * 5000.0 + 0.1 * pos)
    assert report.meta.dense.ema == pytest.approx(lag.evidence["ema"])
    empty = inspect(_capture(tmp_path, "mmdet-retinanet", boxes=[torch.zeros(0, 4)] * 2))
    warn = [f for f in empty.findings if f.code == "dense-no-positives"]
    assert len(warn) == 1 and warn[0].severity == "warning"


def test_refusals_name_what_is_wrong(tmp_path):
    folder = _capture(tmp_path, "mmdet-retinanet")
    F.exit2(F.invoke("inspect", str(folder), "--config", "torchvision"), "two-stage config")
    F.exit2(F.invoke("inspect", str(folder), "--config", "mmdet-fcos"), "fcos head")
    checked = F.invoke("check", str(folder))
    assert checked.exit_code == 0 and "a one-stage retinanet head" in " ".join(
        checked.output.split()
    )
    F.exit2(F.invoke("check", str(folder), "--config", "torchvision-fcos"), "fcos head")
    bad = _capture(tmp_path, "detectron2-retinanet", meta={"dense": {"loss_normalizer": "x"}})
    F.exit2(F.invoke("inspect", str(bad)), "meta.dense.loss_normalizer")


def test_the_retinanet_fixture_names_the_empty_level():
    """fixtures/retinanet-nan: a tiny RetinaNet trained with per-level means (legacy), captured
    at its first non-finite loss: P5 had no positive, the run's own profile divides by 0 there,
    and fixed (the batch's positives) is finite on the same batch."""
    rep = inspect("fixtures/retinanet-nan")
    assert rep.meta.run.own == "legacy" and rep.meta.run.source == "dump"
    errors = [f for f in rep.findings if f.severity == "error"]
    assert [(f.code, f.level, f.profile) for f in errors] == [
        ("dense-level-normalizer-zero", "p5", "legacy")
    ]
    rows = {(r.profile, r.level): r for r in rep.tables.levels}
    assert rows["legacy", "p5"].pos == 0 and rows["legacy", "p5"].avg_factor == 0
    fixed = rows["fixed", "all"]
    assert math.isfinite(fixed.loss_cls) and fixed.avg_factor == fixed.pos == 38
    # the run's own divisor at p4 is that level's positives; fixed's is the batch's
    assert rows["legacy", "p4"].avg_factor == rows["legacy", "p4"].pos
    assert rep.meta.batch.meta["reason"].startswith("non-finite loss")


def test_the_readmes_one_stage_excerpt_is_what_inspect_prints():
    script = F.readme_script()
    F.assert_readme_part(script.DENSE_BEGIN, script.DENSE_END, script.dense_excerpt())


def test_the_retinanet_fixture_regenerates_bit_for_bit(tmp_path):
    """The tiny RetinaNet's run (seconds): twice, the same bytes, at the same step."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for k in (1, 2):
        cmd = [sys.executable, str(root / "scripts/make_fixtures.py"), "--only-dense", "--out",
               str(tmp_path / f"run{k}")]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    for f in ("checkpoint.pt", "batch.pt"):
        a, b = (tmp_path / f"run{k}" / "retinanet-nan" / f for k in (1, 2))
        assert a.read_bytes() == b.read_bytes(), f
    again = inspect(tmp_path / "run1" / "retinanet-nan")
    assert again.meta.batch.dump.step == inspect("fixtures/retinanet-nan").meta.batch.dump.step


def _step_folder(tmp_path, preset, boxes_per_rank):
    layout, kind, norm, anchors = PRESETS[preset]
    sd = F.dense_state_dict(layout, kind, norm=norm, anchors=anchors)
    step = tmp_path / f"{preset}-step"
    for rank, boxes in enumerate(boxes_per_rank):
        folder = step / f"rank_{rank}"
        folder.mkdir(parents=True)
        torch.save(sd, folder / "checkpoint.pt")
        d = F.dense_batch_dict(boxes=boxes, seed=rank)
        d["meta"] = {"rank": rank, "world_size": len(boxes_per_rank), "step": 5}
        torch.save(d, folder / "batch.pt")
    return step


ONE_BOX = [torch.tensor([[70.0, 20.0, 150.0, 100.0]])] * 2
CROWDED = [torch.tensor([[8.0, 10.0, 60.0, 70.0], [70.0, 20.0, 150.0, 100.0],
                         [20.0, 60.0, 90.0, 120.0]])] * 2  # fmt: skip


def test_a_reduced_normalizer_divides_every_rank_by_the_mean_over_ranks(tmp_path):
    """MMDetection FCOS divides by max(reduce_mean(num_pos), 1): in a step of two ranks, each
    rank's terms are divided by the two ranks' mean, not its own count; the per-rank replay of
    a dump alone divides by its own."""
    step = _step_folder(tmp_path, "mmdet-fcos", [CROWDED, ONE_BOX])
    alone = [inspect(step / f"rank_{k}").meta.dense for k in (0, 1)]
    assert alone[0].positives > alone[1].positives > 0
    rep = inspect(step)
    mean = (alone[0].positives + alone[1].positives) / 2
    eps = 1.1920928955078125e-07
    for k in (0, 1):
        own = [r for r in rep.tables.levels
               if (r.rank, r.profile, r.level) == (k, "mmdet-fcos", "all")]  # fmt: skip
        assert own[0].avg_factor == pytest.approx(mean + eps)
        ctr_mean = (alone[0].ctr_sum + alone[1].ctr_sum) / 2
        assert own[0].avg_factor_bbox == pytest.approx(ctr_mean + eps, rel=1e-6)
    assert rep.meta.dense.world_pos == pytest.approx(mean)


def test_per_rank_normalizers_skew_a_step_and_the_ranks_table_says_so(tmp_path):
    """torchvision RetinaNet divides each image by its own positives: a rank with few positives
    weighs each of them far more than a crowded rank does; the ranks table puts each rank's
    normalizer next to the all-reduced one."""
    step = _step_folder(tmp_path, "torchvision-retinanet", [CROWDED, ONE_BOX])
    rep = inspect(step)
    rows = [r for r in rep.tables.ranks if r.profile == "torchvision-retinanet"]
    assert {r.rank for r in rows} == {0, 1} and all(r.head == "dense" for r in rows)
    for level in {r.level for r in rows}:
        at = [r for r in rows if r.level == level]
        mean = sum(r.avg_factor for r in at) / 2
        assert all(r.global_avg_factor == pytest.approx(mean) for r in at)
    assert rep.meta.world_size == 2


def test_a_multi_rank_dump_says_how_its_normalizer_depends_on_the_world_size(tmp_path):
    per_rank = inspect(_capture(tmp_path, "torchvision-retinanet", meta={"world_size": 4}))
    hit = [f for f in per_rank.findings if f.code == "dense-world-size"]
    assert len(hit) == 1 and hit[0].severity == "warning" and "own count" in hit[0].message
    reduced = inspect(_capture(tmp_path, "mmdet-fcos", meta={"world_size": 4, "rank": 1}))
    hit = [f for f in reduced.findings if f.code == "dense-world-size"]
    assert len(hit) == 1 and hit[0].severity == "info" and "step folder" in hit[0].message
    step = _step_folder(tmp_path, "mmdet-fcos", [CROWDED, ONE_BOX])
    assert not [f for f in inspect(step).findings if f.code == "dense-world-size"]
    alone = inspect(_capture(tmp_path, "detectron2-retinanet"))
    assert not [f for f in alone.findings if f.code == "dense-world-size"]


def _with(tmp_path, name, sd, batch=None):
    folder = tmp_path / name
    folder.mkdir()
    torch.save(sd, folder / "checkpoint.pt")
    torch.save(batch or F.dense_batch_dict(), folder / "batch.pt")
    return folder


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda sd: sd.__setitem__("head.classification_head.conv.1.0.weight",
                                   torch.zeros(32, 32, 1, 1)), "are 3x3"),
        (lambda sd: sd.__setitem__("head.regression_head.bbox_reg.weight",
                                   torch.zeros(35, 32, 3, 3)), "4 outputs per anchor"),
        (lambda sd: sd.__setitem__("head.classification_head.cls_logits.weight",
                                   torch.zeros(27, 16, 3, 3)), "does not fit"),
        (lambda sd: sd.pop("head.regression_head.conv.1.0.weight"), "towers have"),
    ],
    ids=["kernel", "deltas", "width", "towers"],
)  # fmt: skip
def test_a_malformed_dense_head_is_one_line_exit_2(tmp_path, edit, words):
    sd = F.dense_state_dict("torchvision", "retinanet")
    edit(sd)
    F.exit2(F.invoke("inspect", str(_with(tmp_path, "x", sd))), words)


def test_a_batch_of_other_levels_or_width_is_refused_by_name(tmp_path):
    sd = F.dense_state_dict("torchvision", "retinanet")
    two_stage = F.batch_dict(channels=32)  # p2-p6, strides 4-64
    F.exit2(F.invoke("inspect", str(_with(tmp_path, "a", sd, two_stage))), "strides [4, 8")
    narrow = F.dense_batch_dict(channels=16)
    F.exit2(F.invoke("inspect", str(_with(tmp_path, "b", sd, narrow))), "16 channels")
    gn = F.dense_state_dict("torchvision", "fcos", norm=True, anchors=1, channels=48)
    F.exit2(F.invoke("inspect", str(_with(tmp_path, "c", gn, F.dense_batch_dict(channels=48)))),
            "divisible by 32")  # fmt: skip


def test_nan_weights_of_a_dense_head_are_traced_to_the_weights(tmp_path):
    sd = F.dense_state_dict("mmdet", "retinanet")
    sd["bbox_head.retina_reg.weight"][0, 0, 0, 0] = float("nan")
    rep = inspect(_with(tmp_path, "n", sd))
    hits = [f for f in rep.findings if f.code == "dense-nonfinite"]
    assert hits and {f.evidence["stage"] for f in hits} == {"weights"}
    assert all(f.severity == "error" for f in hits if f.profile == "mmdet-retinanet")


def test_the_library_inspects_a_dense_head_in_memory():
    """``inspect(DenseWeights, Batch)``: the same report as from the files."""
    import lossdoctor

    sd = F.dense_state_dict("mmdet", "fcos", norm=True, anchors=1)
    w = lossdoctor.dense_weights(sd, lossdoctor.find_dense_layout(sd))
    b = validate_batch(F.dense_batch_dict())
    rep = lossdoctor.inspect(w, b, config="mmdet-fcos-giou")
    assert rep.meta.dense.preset == "mmdet-fcos-giou" and rep.meta.run.own == "mmdet-fcos-giou"
    r = lossdoctor.dense_replay(w, b, lossdoctor.dense_preset("mmdet-fcos-giou"), [FIXED])
    own_all = next(x for x in rep.tables.levels if (x.profile, x.level) == ("fixed", "all"))
    assert own_all.loss_bbox == pytest.approx(float(r.losses["fixed"].term(Part.BOX)))


def test_atss_assignment_by_hand():
    """Three anchors, one GT: IoUs 1, 1/3, 0, so the threshold is their mean + (unbiased) std
    = 0.444 + 0.509 = 0.954: only the first is positive."""
    from lossdoctor.replay.dense import _match_atss

    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    gt = torch.tensor([[0.0, 0, 10, 10]])
    ious = torch.tensor([1.0, 1 / 3, 0.0])
    assert float(ious.mean() + ious.std()) == pytest.approx(0.9536, abs=1e-4)
    assert _match_atss(gt, anchors, [3], topk=9).tolist() == [0, -1, -1]
    # with top-1 per level only the nearest anchor is a candidate: mean + std of one is NaN in
    # torch (std of one value), so no anchor passes, as in MMDetection
    assert _match_atss(gt, anchors, [3], topk=1).tolist() == [-1, -1, -1]


def test_the_gradients_summed_over_terms_are_the_totals():
    """The diagnosis backpropagates each term alone; their sum is the total's gradient, as one
    backward of the total gives it (FCOS: box and centerness share the box tower)."""
    from lossdoctor.diagnose.dense import profile_grads

    r = _replay("torchvision-fcos")
    losses = r.losses["torchvision-fcos"]
    levels, total, terms = profile_grads(r, losses)
    tower = r.weights.params["dense_box_conv1.weight"]
    direct = torch.autograd.grad(losses.total, [*r.features, tower], retain_graph=True)
    for lv, g in zip(levels, direct[:-1]):
        assert lv.feature == pytest.approx(float(g.double().norm()), rel=1e-5)
    assert total["dense_box_conv1.weight"] == pytest.approx(float(direct[-1].norm()), rel=1e-5)
    parts = terms[Part.BOX]["dense_box_conv1.weight"], terms[Part.CTR]["dense_box_conv1.weight"]
    assert parts[0] > 0 and parts[1] > 0 and terms[Part.CLS]["dense_box_conv1.weight"] is None


def test_scan_follows_one_stage_dumps_over_steps(tmp_path):
    """scan: the dense head's rows in the timeline of every dump, its findings first seen at
    their step, a step's ranks together."""
    from lossdoctor.scan import scan

    step = _step_folder(tmp_path, "torchvision-retinanet", [CROWDED, [torch.zeros(0, 4)] * 2])
    rep = F.as_json(scan([step, "fixtures/retinanet-nan"], results=tmp_path / "res", workers=1,
                         threads=1))  # fmt: skip
    timeline = rep["tables"]["timeline"]
    assert {r["head"] for r in timeline} == {"dense"}
    assert {(r["step"], r["rank"]) for r in timeline} == {(5, 0), (5, 1), (61, None)}
    first = {r["code"]: r["step"] for r in rep["tables"]["first_seen"]}
    assert first["dense-level-normalizer-zero"] == 61 and first["rank-normalizer-skew"] == 5
