"""A catalogue of injected faults, each built from one healthy batch: the right finding fires at the
right level, stage and image, and the healthy batch has no error-severity finding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import factories as F
from lossdoctor.diagnose import diagnose
from lossdoctor.inputs.batch import validate_batch
from lossdoctor.inputs.checkpoint import heads_from_state_dict
from lossdoctor.inputs.config import preset
from lossdoctor.inputs.profiles import BUILTIN, TermSpec, fixed
from lossdoctor.replay.engine import replay
from lossdoctor.vocab import LossKind

SIZE = (512, 512)
# one GT per level, each exactly one anchor of that level (IoU 1): P2 32 px ... P6 512 px
HEALTHY_BOXES = [
    [84.0, 84.0, 116.0, 116.0],
    [168.0, 64.0, 232.0, 128.0],
    [256.0, 256.0, 384.0, 384.0],
    [128.0, 32.0, 384.0, 288.0],
    [0.0, 0.0, 512.0, 512.0],
]


def healthy_dict(n=2):
    boxes = [torch.tensor(HEALTHY_BOXES) for _ in range(n)]
    labels = [torch.tensor([0, 1, 2, 0, 1]) for _ in range(n)]
    return F.batch_dict(n=n, size=SIZE, boxes=boxes, labels=labels)


def run(d=None, cfg="torchvision", profiles=("legacy", "fixed"), sd=None):
    batch = validate_batch(d if d is not None else healthy_dict())
    heads = heads_from_state_dict(sd if sd is not None else F.state_dict())
    profs = [BUILTIN[p]() if isinstance(p, str) else p for p in profiles]
    return diagnose(replay(heads, batch, preset(cfg), profs))


def run_amp(d, sd=None, given=None, profiles=("legacy", "fixed")):
    """``run`` with the heads in the precision the dump records (or ``given``), diagnosed."""
    from lossdoctor.inputs.amp import amp_record, run_precision

    batch = validate_batch(d)
    choice = run_precision(given, amp_record(batch.meta), batch.feature_dtype)
    sd = sd if sd is not None else F.state_dict()
    heads = dataclasses.replace(heads_from_state_dict(sd), precision=choice.precision)
    profs = [BUILTIN[p]() for p in profiles]
    return diagnose(replay(heads, batch, preset("torchvision"), profs), precision=choice)


def _amp(d, **amp):
    d["meta"] = F.amp_meta(**amp)
    return d


def find(diag, code, **where):
    hits = [
        f
        for f in diag.findings
        if f.code == code and all(getattr(f, k) == v for k, v in where.items())
    ]
    assert hits, (
        f"{code} {where} not in {[(f.code, f.level, f.image, f.profile) for f in diag.findings]}"
    )
    return hits[0]


@pytest.mark.parametrize("cfg", ["torchvision", "mmdet", "detectron2"])
def test_healthy_batch_has_no_error(cfg):
    d = run(cfg=cfg, profiles=list(BUILTIN))
    assert [f.code for f in d.findings if f.severity == "error"] == []
    assert all(n > 0 for n in d.symptom.detections)
    # sorted most severe first
    order = [("error", "warning", "info").index(f.severity) for f in d.findings]
    assert order == sorted(order)


def test_nan_empty_mean_at_the_level_without_positive():
    d = healthy_dict()
    d["gt_boxes"] = [b[:4] for b in d["gt_boxes"]]  # drop the P6 object
    d["gt_labels"] = [lab[:4] for lab in d["gt_labels"]]
    diag = run(d)
    f = find(diag, "nan-empty-mean", profile="legacy", level="p6", head="rpn")
    assert f.evidence["stage"] == "normalizer" and f.evidence["nan"] == 1
    assert not [x for x in diag.findings if x.profile == "fixed" and x.severity == "error"]
    find(diag, "no-positive-level", level="p6")


@pytest.mark.parametrize("value,kind", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_nonfinite_features_are_the_origin(value, kind):
    d = healthy_dict()
    d["features"]["p4"][1, :, 10, 10] = value
    diag = run(
        d, profiles=("mmdet",), cfg="mmdet"
    )  # mmdet: every anchor enters the loss, sampled or not
    f = find(diag, "nonfinite-features", level="p4", image=1)
    assert f.evidence[kind] > 0 and f.evidence["nan" if kind == "inf" else "inf"] == 0
    o = find(diag, "nonfinite-loss", profile="mmdet", head="rpn", level="p4", image=1)
    assert o.evidence["stage"] == "input"
    assert o.evidence["nan" if kind == "nan" else "posinf"] > 0


def test_zero_width_gt_poisons_rpn_targets_with_inf_under_torchvision():
    """The only GT of image 1 has zero width (vision#2144's dummy box): IoU 0 with every anchor, so
    low-quality matching makes every anchor positive for it, and its dw target is log(0) = -inf."""
    d = healthy_dict()
    d["gt_boxes"][1] = torch.tensor([[300.0, 256.0, 300.0, 384.0]])
    d["gt_labels"][1] = torch.tensor([0])
    diag = run(d)
    # one finding for the box, with what matching made of it: every anchor positive
    g = find(diag, "degenerate-gt", image=1)
    anchors = sum(lv.anchors.shape[0] for lv in diag.replay.rpn.levels)
    assert g.evidence["rpn_pos_candidates"] == anchors and f"all {anchors} candidate" in g.message
    assert not [x for x in diag.findings if x.code == "gt-matches-no-anchor"]
    f = find(diag, "nonfinite-loss", profile="fixed", head="rpn")
    assert f.evidence["stage"] == "targets" and f.image == 1 and f.evidence["gt"] == 0
    assert f.evidence["neginf"] > 0 and f.evidence["nan"] == 0  # Inf, not NaN
    assert "log(0) from a zero-width GT box (image 1, box 0)" in f.message
    # the same box, added as a proposal, matches itself with IoU 0/0: NaN in the RoI head
    g = find(diag, "nonfinite-loss", profile="fixed", head="roi")
    assert g.evidence["stage"] == "targets" and g.image == 1 and g.evidence["nan"] > 0


def test_zero_width_gt_gives_nan_in_the_roi_head_under_mmdet():
    d = healthy_dict()
    d["gt_boxes"][1][2] = torch.tensor([300.0, 256.0, 300.0, 384.0])
    diag = run(d, cfg="mmdet", profiles=("mmdet",))
    f = find(diag, "nonfinite-loss", profile="mmdet", head="roi")
    assert f.evidence["stage"] == "targets" and f.image == 1 and f.evidence["gt"] == 2
    assert f.evidence["nan"] > 0  # mmdet matches the added GT to itself: log(0 / 0) = NaN
    # mmdet's min_pos_iou leaves a box of IoU 0 without positive anchors: nothing more to say
    assert "rpn_pos_candidates" not in find(diag, "degenerate-gt", image=1).evidence
    assert not [x for x in diag.findings if x.code == "gt-matches-no-anchor"]


def test_gt_outside_image():
    d = healthy_dict()
    d["gt_boxes"][0][0] = torch.tensor([480.0, 84.0, 600.0, 116.0])
    f = find(run(d), "gt-outside-image", image=0)
    assert f.evidence["box"] == [480.0, 84.0, 600.0, 116.0]


def test_gt_far_outside_matches_no_anchor_and_makes_every_anchor_positive():
    d = healthy_dict()
    d["gt_boxes"][1][1] = torch.tensor([2000.0, 2000.0, 2040.0, 2040.0])
    diag = run(d)
    f = find(diag, "gt-matches-no-anchor", image=1, severity="error")
    assert f.evidence["rpn_pos_candidates"] == sum(
        lv.anchors.shape[0] for lv in diag.replay.rpn.levels
    )


def _as_xywh(d):
    """Every box of the batch written as (x, y, w, h), as a COCO annotation is."""
    d["gt_boxes"] = [torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1) for b in d["gt_boxes"]]


def test_xywh_boxes_are_one_finding_per_image_not_a_degenerate_box_each():
    diag = run(_with(_as_xywh))
    inverted = [
        int(((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).sum()) for b in diag.replay.batch.gt_boxes
    ]
    for i, n in enumerate(inverted):
        if n:
            assert find(diag, "gt-xywh-suspected", image=i).evidence["inverted"] == n
    assert sum(inverted) >= 2
    assert not [f for f in diag.findings if f.code == "degenerate-gt"]


def test_a_box_with_swapped_corners_is_degenerate_not_xywh():
    diag = run(_with(_box(0, 2, [100.0, 100.0, 60.0, 80.0])))
    f = find(diag, "degenerate-gt", image=0)
    assert f.evidence["swapped"] == ["x1/x2", "y1/y2"] and f.evidence["width"] == -40.0
    assert "swapped corners" in f.message
    assert not [f for f in diag.findings if f.code == "gt-xywh-suspected"]
    one = run(_with(_box(0, 2, [100.0, 100.0, 60.0, 180.0])))
    assert find(one, "degenerate-gt", image=0).evidence["swapped"] == ["x1/x2"]


def test_one_based_labels():
    d = healthy_dict()
    d["gt_labels"] = [torch.tensor([1, 2, 3, 1, 2])] * 2  # 3 classes: label 3 does not exist
    f = find(run(d), "labels-one-based")
    assert f.evidence["max_label"] == 3 and f.evidence["num_classes"] == 3


def test_one_based_labels_collide_with_background_in_a_background_last_layout():
    sd = F.state_dict(reg_slots=3)
    from lossdoctor.inputs.layouts import LAYOUTS

    tv = {v[0]: k for k, v in LAYOUTS["torchvision"].items()}
    mm = {
        f"{LAYOUTS['mmdet'][tv[k.rsplit('.', 1)[0]]][0]}.{k.rsplit('.', 1)[1]}": v
        for k, v in sd.items()
    }
    d = healthy_dict()
    d["gt_labels"] = [torch.tensor([1, 2, 3, 1, 2])] * 2
    f = find(run(d, cfg="mmdet", sd=mm), "labels-one-based")
    assert "background" in f.message


def test_label_out_of_range():
    d = healthy_dict()
    d["gt_labels"][1] = torch.tensor([0, 7, 2, 0, 1])
    f = find(run(d), "label-out-of-range", image=1)
    assert f.evidence["labels"] == [7] and f.evidence["boxes"] == [[1, 1]]


def test_empty_gt_image():
    d = healthy_dict()
    d["gt_boxes"][1] = torch.zeros(0, 4)
    d["gt_labels"][1] = torch.zeros(0, dtype=torch.long)
    diag = run(d)
    assert find(diag, "empty-gt-image", image=1).severity == "info"


def test_gt_without_positive_under_mmdet_min_pos_iou():
    d = healthy_dict()
    d["gt_boxes"][0][0] = torch.tensor([100.0, 100.0, 102.0, 160.0])  # 2 x 60: best IoU < 0.3
    f = find(run(d, cfg="mmdet", profiles=("mmdet",)), "gt-without-positive", image=0)
    assert f.evidence["box"] == 0 and 0 < f.evidence["best_iou"] < 0.3


def test_background_dominance_and_level_weight_imbalance_under_legacy():
    diag = run()
    find(diag, "level-weight-imbalance", profile="legacy", head="rpn")
    assert not [
        f for f in diag.findings if f.code == "level-weight-imbalance" and f.profile == "fixed"
    ]
    d = healthy_dict()
    d["gt_boxes"] = [b[:1] for b in d["gt_boxes"]]
    d["gt_labels"] = [lab[:1] for lab in d["gt_labels"]]
    find(run(d), "background-dominance", profile="legacy", head="rpn")


def test_exploding_gradient():
    d = healthy_dict()
    for k in d["features"]:
        d["features"][k] = d["features"][k] * 1e4
    f = find(run(d, profiles=("fixed",)), "exploding-gradient", profile="fixed")
    assert f.evidence["total_norm"] > 350


def test_vanishing_gradient():
    tiny = dataclasses.replace(
        fixed(),
        name="tiny",
        **{
            t: TermSpec(
                "bce" if t == "rpn_cls" else "ce" if t == "roi_cls" else "l1",
                "sampled",
                weight=1e-12,
                floor=1.0,
            )
            for t in ("rpn_cls", "rpn_box", "roi_cls", "roi_box")
        },
    )
    find(run(profiles=(tiny,)), "vanishing-gradient", profile="tiny")


def test_nonfinite_weights():
    sd = F.state_dict()
    sd["rpn.head.cls_logits.weight"][1, 0, 0, 0] = float("nan")
    diag = run(sd=sd, profiles=("mmdet",), cfg="mmdet")
    f = find(diag, "nonfinite-weights")
    assert f.evidence["params"] == ["rpn.head.cls_logits.weight"]
    o = find(diag, "nonfinite-loss", profile="mmdet", head="rpn")
    assert o.evidence["stage"] == "weights"


def test_collapse_to_background():
    sd = F.state_dict()
    sd["roi_heads.box_predictor.cls_score.bias"][0] = 20.0  # background logit
    diag = run(sd=sd)
    f = find(diag, "collapse-to-background")
    assert diag.symptom.detections == [0, 0] and f.evidence["max_fg_score"] < 0.05


TORCHVISION_ADAPTER = {"framework": "torchvision", "adapter": "lossdoctor.adapters.torchvision"}


def _torchvision_labels(labels):
    """A torchvision capture: its labels (1..K, 0 the background) as the adapter dumps them."""

    def change(d):
        d["gt_labels"] = [torch.tensor(x) - 1 for x in labels]
        d["meta"] = dict(TORCHVISION_ADAPTER)

    return _with(change)


def test_torchvision_label_0_trains_the_rpn_and_the_roi_background():
    """torchvision's label 0 on a real box: an RPN object, a RoI background (no box loss)."""
    diag = run(_torchvision_labels([[1, 2, 3, 1, 2], [0, 2, 3, 1, 2]]))
    f = find(diag, "gt-labelled-background", image=1)
    assert f.evidence == {"label": 0, "num_classes": 3, "boxes": [[1, 0]]}
    assert "labelled 0" in f.message and "1..3" in f.message
    r = diag.replay
    assert r.gt.boxes[1].shape[0] == 5 and r.gt.dropped_labels == []
    assert r.gt.labels[1].tolist() == [-1, 1, 2, 0, 1]
    rpn_on_box0 = sum(int((lv.matched[1][lv.labels[1] == 1] == 0).sum()) for lv in r.rpn.levels)
    assert rpn_on_box0 > 0  # anchors matched to the label-0 box are RPN positives
    roi_img1 = r.roi.img == 1
    assert not bool((roi_img1 & (r.roi.gt_index == 0)).any())  # never a RoI positive
    # taking every candidate: the box added as its own proposal is there, as background
    every = replay(r.heads, r.batch, preset("torchvision"), [fixed()], sample_all=True).roi
    own = (every.img == 1) & every.is_gt & (every.boxes == r.gt.boxes[1][0]).all(1)
    assert int(own.sum()) == 1 and int(every.fg_class[own]) == -1
    codes = {x.code for x in diag.findings if x.severity != "info"}
    assert "label-out-of-range" not in codes and "labels-one-based" not in codes


def test_labels_are_named_as_the_run_names_them():
    diag = run(_torchvision_labels([[1, 2, 3, 1, 2], [1, 9, 3, 1, 2]]))
    f = find(diag, "label-out-of-range", image=1)
    assert f.evidence["labels"] == [9] and "label 9 outside 1..3" in f.message
    plain = find(run(_set("gt_labels", 1, torch.tensor([0, 9, 2, 0, 1]))), "label-out-of-range")
    assert plain.evidence["labels"] == [9] and "1 GT box has label 9 outside 0..2" in plain.message


def _no_gt(d):
    d["gt_boxes"] = [torch.zeros(0, 4)] * 2
    d["gt_labels"] = [torch.zeros(0, dtype=torch.long)] * 2


def test_no_gradient_only_where_the_loss_code_leaves_an_empty_term_out():
    """On an all-background batch the box terms are empty: a loss code that skips them leaves the
    box regressors without gradient (named); every framework's keeps them in the graph, so they
    get a zero gradient and nothing is said."""
    base = fixed()
    skip = dataclasses.replace(
        base,
        name="skips-empty",
        rpn_box=dataclasses.replace(base.rpn_box, empty_in_graph=False),
        roi_box=dataclasses.replace(base.roi_box, empty_in_graph=False),
    )
    diag = run(_with(_no_gt), profiles=(skip, "fixed", "torchvision", "mmdet", "detectron2"))
    f = find(diag, "no-gradient", profile="skips-empty")
    assert f.severity == "warning"
    want = [f"{m}.{k}" for m in ("rpn.head.bbox_pred", "roi_heads.box_predictor.bbox_pred")
            for k in ("weight", "bias")]  # fmt: skip
    assert sorted(f.evidence["params"]) == sorted(want) and f.evidence["levels"] == []
    assert [x.profile for x in diag.findings if x.code == "no-gradient"] == ["skips-empty"]
    for name in ("fixed", "torchvision", "detectron2"):  # a zero gradient, in the graph
        params = diag.grads[name].params
        assert params["box_deltas.weight"].total == 0 == params["rpn_deltas.weight"].total


def test_legacy_leaves_an_empty_level_and_an_empty_term_out_of_the_graph():
    """legacy's per-level means skip a level without samples: its features get no gradient (an
    info), and with no GT its box regressors none (a warning)."""
    diag = run(_with(_no_gt), profiles=("legacy", "fixed"))
    f = find(diag, "no-gradient", profile="legacy")
    assert "roi_heads.box_predictor.bbox_pred.weight" in f.evidence["params"]
    assert not [x for x in diag.findings if x.code == "no-gradient" and x.profile == "fixed"]


def _rows(diag):
    from lossdoctor.report.build import level_rows

    return [
        (r.profile, r.head, r.level, r.pos, r.neg, r.loss_cls, r.loss_bbox)
        for r in level_rows(diag)
    ]


def test_nonfinite_gt_is_named_and_left_out_of_the_replay():
    """Image 1 gains a NaN box and a box whose x2 is -inf: the finding names both, says which one
    torchvision's degenerate check (x2 <= x1 or y2 <= y1) stops on, and the replay is exactly the
    replay of the batch without them."""
    clean = healthy_dict()
    d = healthy_dict()
    bad = torch.tensor([[float("nan"), 10.0, 50.0, 60.0], [20.0, 20.0, -float("inf"), 80.0]])
    d["gt_boxes"][1] = torch.cat([d["gt_boxes"][1][:2], bad, d["gt_boxes"][1][2:]])
    d["gt_labels"][1] = torch.tensor([0, 1, 2, 2, 2, 0, 1])
    diag, ref = run(d), run(clean)
    f = find(diag, "nonfinite-gt", image=1, severity="error")
    assert f.evidence["boxes"] == [2, 3] and f.evidence["torchvision_asserts"] == [False, True]
    assert "stops on 1 of them and lets 1 through" in f.message
    assert diag.replay.images[1].gt == 5 and diag.replay.images[1].gt_nonfinite == 2
    assert _rows(diag) == _rows(ref)
    assert not [x for x in diag.findings if x.code == "nonfinite-loss"]


def test_all_ignored_image_trains_as_an_image_without_gt():
    ignored, empty = healthy_dict(), healthy_dict()
    ignored["gt_ignore"] = [torch.zeros(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool)]
    empty["gt_boxes"][1], empty["gt_labels"][1] = (
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.long),
    )
    diag = run(ignored)
    f = find(diag, "empty-gt-image", image=1)
    assert "all 5 GT boxes are marked ignored" in f.message and f.severity == "info"
    assert diag.replay.images[1].gt == 0 and diag.replay.images[1].gt_ignored == 5
    assert _rows(diag) == _rows(run(empty))


def test_an_image_whose_labels_are_all_out_of_range_has_no_usable_gt():
    d = healthy_dict()
    d["gt_labels"][1] = torch.tensor([5, 6, 7, 5, 6])
    diag = run(d)
    f = find(diag, "empty-gt-image", image=1)
    assert f.evidence == {"ignored": 0, "bad_label": 5, "nonfinite": 0}
    assert "5 labelled outside 0..2" in f.message
    find(diag, "label-out-of-range", image=1)


# ---- the rule table: every rule has a fault that fires it ------------------------------------


def _drop_p6(d):
    d["gt_boxes"] = [b[:4] for b in d["gt_boxes"]]
    d["gt_labels"] = [lab[:4] for lab in d["gt_labels"]]
    return d


def _with(change):
    d = healthy_dict()
    change(d)
    return d


def _unsafe():
    from lossdoctor.inputs.torchfile import Replaced

    batch = validate_batch(healthy_dict())
    heads = heads_from_state_dict(F.state_dict(), replaced=[Replaced("posix.system", True)])
    return diagnose(replay(heads, batch, preset("torchvision"), [fixed()]))


def _tiny_weights():
    kinds = {"rpn_cls": LossKind.BCE, "roi_cls": LossKind.CE}
    specs = {
        t: TermSpec(kinds.get(t, LossKind.L1), "sampled", weight=1e-12, floor=1.0)
        for t in ("rpn_cls", "rpn_box", "roi_cls", "roi_box")
    }
    return run(profiles=(dataclasses.replace(fixed(), name="tiny", **specs),))


def _nan_weight():
    sd = F.state_dict()
    sd["rpn.head.cls_logits.weight"][1, 0, 0, 0] = float("nan")
    return run(sd=sd, profiles=("mmdet",), cfg="mmdet")


def _masked(change, ignore=None):
    """A Mask R-CNN replay of the healthy batch, its GT masks (the boxes, filled) changed."""
    d = healthy_dict()
    d["gt_masks"] = [change(m) for m in F.box_masks(d["gt_boxes"], SIZE)]
    if ignore is not None:
        d["gt_ignore"] = ignore
    return run(d, sd=F.mask_state_dict())


def _starved_cascade():
    """Detectron2's cascade with later stages at IoU 0.95, and a first stage whose regression
    moves every box by a tenth of its size: no refined box reaches IoU 0.95."""
    cfg = preset("detectron2-cascade")
    cfg = dataclasses.replace(cfg, cascade=dataclasses.replace(cfg.cascade, ious=(0.95, 0.95)))
    sd = F.cascade_state_dict("detectron2")
    sd["roi_heads.box_predictor.0.bbox_pred.bias"] = torch.tensor([1.0, 1.0, 0.5, 0.5])
    heads = heads_from_state_dict(sd)
    return diagnose(replay(heads, validate_batch(healthy_dict()), cfg, [fixed()]))


def _background_bias(bias: float, d=None):
    """The classifier's background bias raised: every foreground score drops (chance is 1/4)."""
    sd = F.state_dict()
    sd["roi_heads.box_predictor.cls_score.bias"][0] = bias
    return run(d, sd=sd)


def _background_collapse():
    return _background_bias(20.0)


def _box(i, j, box):
    def change(d):
        d["gt_boxes"][i][j] = torch.tensor(box)

    return change


def _set_labels(labels):
    return _with(lambda d: d.update(gt_labels=[torch.tensor(labels)] * 2))


def _set(key, i, value):
    return _with(lambda d: d[key].__setitem__(i, value))


def _one_gt_each():
    return _with(
        lambda d: d.update(
            gt_boxes=[b[:1] for b in d["gt_boxes"]], gt_labels=[x[:1] for x in d["gt_labels"]]
        )
    )


NAN, INF = float("nan"), float("inf")
# proposals in a corner, far from every GT box
FAR = torch.tensor([[0.0, 0.0, 4.0, 4.0], [500.0, 0.0, 508.0, 6.0]])
ALL_IGNORED = [torch.zeros(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool)]
ALL_IGNORED_BOTH = [torch.ones(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool)]
FAULTS = {
    "unsafe-pickle-global": _unsafe,
    "nonfinite-gt": lambda: run(_with(_box(0, 1, [NAN, 1.0, 30.0, 40.0]))),
    "degenerate-gt": lambda: run(_with(_box(1, 2, [300.0, 256.0, 300.0, 384.0]))),
    "gt-xywh-suspected": lambda: run(_with(_as_xywh)),
    "nonfinite-features": lambda: run(_with(lambda d: d["features"]["p3"][0, 0, 1, 1].fill_(INF))),
    "labels-one-based": lambda: run(_set_labels([1, 2, 3, 1, 2])),
    "label-out-of-range": lambda: run(_set("gt_labels", 1, torch.tensor([0, 9, 2, 0, 1]))),
    "gt-labelled-background": lambda: run(_torchvision_labels([[1, 2, 3, 1, 2], [0, 2, 3, 1, 2]])),
    "nonfinite-weights": _nan_weight,
    "nan-empty-mean": lambda: run(_drop_p6(healthy_dict())),
    "nonfinite-loss": _nan_weight,
    "gt-matches-no-anchor": lambda: run(_with(_box(1, 1, [2000.0, 2000.0, 2040.0, 2040.0]))),
    "collapse-to-background": _background_collapse,
    "gt-outside-image": lambda: run(_with(_box(0, 0, [480.0, 84.0, 600.0, 116.0]))),
    "gt-without-positive": lambda: run(
        _with(_box(0, 0, [100.0, 100.0, 102.0, 160.0])), cfg="mmdet", profiles=("mmdet",)
    ),
    "background-dominance": lambda: run(_one_gt_each()),
    "level-weight-imbalance": lambda: run(),
    "exploding-gradient": lambda: run(
        _with(lambda d: [v.mul_(1e4) for v in d["features"].values()]), profiles=("fixed",)
    ),
    "vanishing-gradient": _tiny_weights,
    "no-gradient": lambda: run(_with(_no_gt), profiles=("legacy",)),
    "empty-gt-image": lambda: run(_with(lambda d: d.update(gt_ignore=ALL_IGNORED))),
    "no-positive-level": lambda: run(_drop_p6(healthy_dict())),
    "untrained-or-collapsed": lambda: _background_bias(5.0),
    "mask-box-mismatch": lambda: _masked(lambda m: m.flip(-1)),
    "empty-mask": lambda: _masked(lambda m: torch.cat([m[:1] & False, m[1:]])),
    "mask-branch-skipped": lambda: _masked(lambda m: m, ignore=ALL_IGNORED_BOTH),
    "cascade-stage-starved": _starved_cascade,
    "no-proposals": lambda: run(_with(lambda d: [f[1].fill_(NAN) for f in d["features"].values()])),
    "rpn-positives-starved": lambda: run(_with(lambda d: d.update(proposals=[FAR, FAR]))),
    "fp16-forward-overflow": lambda: run_amp(
        *F.overflow_case(_amp(healthy_dict()), F.state_dict())
    ),
    "loss-scale-overflow": lambda: run_amp(_amp(healthy_dict(), scale=2.0**24)),
    "loss-scale-collapsed": lambda: run_amp(_amp(healthy_dict(), scale=2.0**-3, skipped=19)),
    "low-precision-loss-drift": lambda: run_amp(
        _amp(healthy_dict()), F.offset_logits(F.state_dict(), std=0.1)
    ),
}


def test_every_rule_has_a_fault_case():
    from lossdoctor.diagnose.findings import BY_CODE

    assert set(FAULTS) == set(BY_CODE)


@pytest.mark.parametrize("code", list(FAULTS))
def test_each_rule_fires_on_its_fault_with_declared_evidence(code):
    from lossdoctor.diagnose.findings import BY_CODE

    diag = FAULTS[code]()
    hits = [f for f in diag.findings if f.code == code]
    assert hits, f"{code} did not fire; found {sorted({f.code for f in diag.findings})}"
    for f in diag.findings:
        rule = BY_CODE[f.code]  # every emitted code is declared
        assert set(f.evidence) <= set(rule.evidence), (f.code, set(f.evidence) - set(rule.evidence))
        assert f.severity in (rule.severity, rule.minor)


@pytest.mark.parametrize(
    "meta,fires",
    [
        ({"framework": "torchvision"}, True),  # raw torchvision labels passed by hand
        ({}, False),  # nothing says the labels were torchvision's
        ({"framework": "mmdet"}, False),  # 0-based natively
        (
            {"framework": "torchvision", "adapter": "lossdoctor.adapters.torchvision"},
            False,
        ),  # converted
    ],
)
def test_raw_torchvision_labels_are_caught_when_the_framework_is_known(meta, fires):
    """torchvision's labels of 3 classes run 1..3; a batch holding only its classes 1 and 2 passed
    as they are looks valid (0..2) to the replay: only knowing the run is torchvision's shows it."""
    d = healthy_dict()
    d["gt_labels"] = [torch.tensor([1, 2, 1, 2, 1])] * 2
    d["meta"] = meta
    hits = [f for f in run(d).findings if f.code == "labels-one-based"]
    assert bool(hits) == fires
    if fires:
        assert hits[0].severity == "warning" and "torchvision" in hits[0].message


@pytest.mark.parametrize("sample_all", [False, True])
@pytest.mark.parametrize("cfg", ["torchvision", "mmdet", "detectron2"])
def test_symptom_reusing_training_rois_is_the_fresh_symptom(monkeypatch, cfg, sample_all):
    """The test-mode RoIs the training replay already pooled (under --sample-all, nearly all)
    take its box-head outputs; the detections are those of pooling every RoI afresh."""
    import importlib

    S = importlib.import_module("lossdoctor.diagnose.symptom")
    r = replay(heads_from_state_dict(F.state_dict()), validate_batch(healthy_dict()),
               preset(cfg), [fixed()], sample_all=sample_all)  # fmt: skip
    rois, img = S._test_rois(r)
    levels = S.map_levels(rois, r.batch.strides[: r.roi.num_levels], r.config.roi_pool)
    row = S._training_rows(r.roi, rois, img, levels)
    hit = row >= 0
    assert torch.equal(r.roi.boxes.detach()[row[hit]], rois[hit])
    assert torch.equal(r.roi.level[row[hit]], levels[hit])
    if sample_all:
        assert hit.float().mean() > 0.5
    reused = S.symptom(r)
    monkeypatch.setattr(S, "_training_rows", lambda roi, rois, *_: torch.full((len(rois),), -1))
    fresh = S.symptom(r)
    assert reused.detections == fresh.detections and sum(fresh.detections) > 0
    assert reused.max_fg_score == pytest.approx(fresh.max_fg_score, rel=1e-6)
    for a, b in zip(reused.scores, fresh.scores):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(reused.labels, fresh.labels))


@pytest.mark.parametrize("share", [0.05, 0.2])
def test_exploding_with_a_recorded_lr_is_a_step_too_large_for_the_weights(share):
    """With the run's lr recorded, a gradient explodes when one SGD step moves the heads by over
    10% of their weights' norm (a norm alone scales with the features)."""
    sd = F.state_dict()
    weights = sum(float(t.double().square().sum()) for t in sd.values()) ** 0.5
    norm = run(profiles=("fixed",)).grads["fixed"].clipped_norm
    lr = share * weights / norm
    diag = run(_with(lambda d: d.update(meta={"lr": lr})), profiles=("fixed",), sd=sd)
    hits = [f for f in diag.findings if f.code == "exploding-gradient"]
    if share < 0.1:
        assert hits == []
    else:
        (f,) = hits
        assert f.evidence["step_share"] == pytest.approx(share, rel=1e-6)
        assert f"moves the heads by {share:.0%} of their norm" in f.message
