"""Batch schema, suspicions, checkpoints (layouts, wrappers, safe loading), configs and profiles
from TOML."""

from __future__ import annotations

import os

import pytest
import torch

import factories as F
from lossdoctor import dump_batch, load_batch, load_checkpoint
from lossdoctor.inputs.batch import validate_batch
from lossdoctor.inputs.checkpoint import heads_from_state_dict
from lossdoctor.inputs.config import load_config
from lossdoctor.inputs.errors import InputError
from lossdoctor.inputs.layouts import LAYOUTS
from lossdoctor.inputs.profiles import BUILTIN, load_profile, profile_toml
from lossdoctor.vocab import BOX_CONVS, Layer, Ranking


def codes(batch):
    return sorted({s.code for s in batch.suspicions})


# ---- batch schema --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda d: d.pop("gt_labels"), "batch key 'gt_labels' is missing"),
        (
            lambda d: d.update(format="other/1"),
            "batch key 'format': expected 'lossdoctor.batch/1', found 'other/1'",
        ),
        (
            lambda d: d.update(image_sizes=[[64, 96]]),
            "batch key 'image_sizes': expected 2 [h, w] pairs",
        ),
        (
            lambda d: d["gt_boxes"].__setitem__(0, torch.zeros(2, 5)),
            "batch key 'gt_boxes[0]': expected a float Tensor[K, 4] (x1, y1, x2, y2), "
            "found Tensor[2, 5] float32",
        ),
        (
            lambda d: d["gt_labels"].__setitem__(1, torch.tensor([0.0, 1.0])),
            "batch key 'gt_labels[1]': expected an integer Tensor[K], found Tensor[2] float32",
        ),
        (
            lambda d: d["gt_labels"].__setitem__(1, torch.tensor([0])),
            "batch key 'gt_labels[1]': expected 2 labels (one per box)",
        ),
        (
            lambda d: d["features"].__setitem__("p3", torch.zeros(2, 4, 8, 12)),
            "batch key 'features.p3': expected N, C = [2, 8] like the first level",
        ),
        (
            lambda d: d.update(strides=[4, 8]),
            "batch key 'strides': expected 5 positive integers (one per level)",
        ),
        (lambda d: d.update(extra=1), "batch key 'extra': expected only the keys"),
        (
            lambda d: d.update(image_sizes=[[640, 96], [64, 96]]),
            "batch key 'image_sizes[0]': expected a size within the padded input",
        ),
    ],
)
def test_schema_violations_name_key_expected_and_found(mutate, needle):
    d = F.batch_dict()
    mutate(d)
    with pytest.raises(InputError) as e:
        validate_batch(d)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_healthy_batch_has_no_suspicion():
    assert codes(F.batch()) == []


def test_suspicious_content_is_accepted_and_recorded():
    boxes = [torch.tensor([[8.0, 10.0, 8.0, 50.0], [50.0, 5.0, 200.0, 30.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([0, 1]), torch.zeros(0, dtype=torch.long)]
    d = F.batch_dict(boxes=boxes, labels=labels)
    d["features"]["p4"][1, 0, 0, 0] = float("inf")
    b = validate_batch(d)
    found = {(s.code, s.image, s.box, s.level) for s in b.suspicions}
    assert ("degenerate-gt", 0, 0, None) in found
    assert ("gt-outside-image", 0, 1, None) in found
    assert ("empty-gt-image", 1, None, None) in found
    assert ("nonfinite-features", 1, None, "p4") in found
    nf = next(s for s in b.suspicions if s.code == "nonfinite-features")
    assert nf.evidence == {"nan": 0, "inf": 1, "images": [1]}


def test_xywh_boxes_are_suspected():
    xywh = torch.tensor([[10.0, 12.0, 20.0, 8.0], [40.0, 30.0, 30.0, 20.0]])  # x2 < x1 read as xyxy
    b = F.batch(boxes=[xywh, xywh], labels=[torch.tensor([0, 1])] * 2)
    assert "gt-xywh-suspected" in codes(b)
    assert "degenerate-gt" not in codes(b)  # one finding for the batch's convention


def test_dump_batch_roundtrip_is_atomic_and_validates(tmp_path):
    d = F.batch_dict()
    path = tmp_path / "b.pt"
    dump_batch(
        path,
        features=d["features"],
        image_sizes=d["image_sizes"],
        gt_boxes=d["gt_boxes"],
        gt_labels=d["gt_labels"],
        strides=d["strides"],
        meta={"iteration": 5000},
    )
    b = load_batch(path)
    assert (
        b.meta == {"iteration": 5000} and b.strides == [4, 8, 16, 32, 64] and b.pad_size == (64, 96)
    )
    assert torch.equal(b.features["p3"], d["features"]["p3"])
    with pytest.raises(InputError):
        dump_batch(
            tmp_path / "bad.pt",
            features=d["features"],
            image_sizes=d["image_sizes"],
            gt_boxes=d["gt_boxes"],
            gt_labels=d["gt_labels"][:1],
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt"]  # nothing half-written


def _dump(path, **kw):
    d = F.batch_dict()
    args = dict(features=d["features"], image_sizes=d["image_sizes"], gt_boxes=d["gt_boxes"],
                gt_labels=d["gt_labels"], strides=d["strides"])  # fmt: skip
    return dump_batch(path, **{**args, **kw})


@pytest.mark.parametrize("container", [tuple, list])
def test_dump_batch_takes_a_tuple_or_list_of_features(tmp_path, container):
    feats = list(F.batch_dict()["features"].values())
    b = _dump(tmp_path / "b.pt", features=container(feats))
    assert b.levels == ["p2", "p3", "p4", "p5", "p6"]
    assert torch.equal(load_batch(tmp_path / "b.pt").features["p4"], feats[2])
    # named from the first stride (2^K -> pK)
    b = _dump(tmp_path / "c.pt", features=container(feats[1:]), strides=[8, 16, 32, 64])
    assert b.levels == ["p3", "p4", "p5", "p6"]


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(features={1, 2}), "batch key 'features': expected a dict level -> Tensor[N, C, H, W],"
         " or a list/tuple of them finest first, found set {1, 2}"),
        (dict(features=torch.zeros(2, 8, 16, 24)), "batch key 'features': expected a dict level ->"
         " Tensor[N, C, H, W], or a list/tuple of them finest first, found Tensor[2, 8, 16, 24]"),
        (dict(gt_boxes=torch.zeros(2, 4)), "batch key 'gt_boxes': expected a list with one Tensor"
         " per image, found Tensor[2, 4] float32"),
        (dict(image_sizes=[64, 96]), "batch key 'image_sizes': expected a list of [h, w] pairs"),
        (dict(strides=["four"]), "batch key 'strides': expected a list of integer strides"),
        (dict(pad_size=None, strides=None, gt_labels=5), "batch key 'gt_labels': expected a list"),
    ],
)  # fmt: skip
def test_dump_batch_refuses_other_containers(tmp_path, kw, message):
    with pytest.raises(InputError) as e:
        _dump(tmp_path / "b.pt", **kw)
    assert str(e.value).startswith(message)
    assert not any(tmp_path.iterdir())


def test_default_strides_from_level_names_and_pad_size():
    d = F.batch_dict()
    d.pop("strides")
    assert validate_batch(d).strides == [4, 8, 16, 32, 64]
    d["features"] = {f"l{i}": v for i, v in enumerate(d["features"].values())}
    d["pad_size"] = [64, 96]
    assert validate_batch(d).strides == [4, 8, 16, 32, 64]


def test_not_a_batch_file(tmp_path):
    p = tmp_path / "x.pt"
    p.write_text("hello")
    with pytest.raises(InputError, match="is not a lossdoctor batch dump"):
        load_batch(p)
    with pytest.raises(InputError, match="does not exist"):
        load_batch(tmp_path / "missing.pt")


# ---- checkpoints ---------------------------------------------------------------------------


def test_native_layout_shapes_give_channels_anchors_classes():
    h = F.heads(channels=8, anchors=3, classes=5)
    assert (h.channels, h.num_anchors, h.num_classes, h.pool_size, h.bg_col, h.reg_classes) == (
        8,
        3,
        5,
        7,
        0,
        6,
    )
    agnostic = F.heads(classes=5, reg_slots=1)
    assert agnostic.reg_classes == 1


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"state_dict": sd, "meta": {}},
    ],
)
def test_checkpoint_wrappers(tmp_path, wrap):
    p = tmp_path / "c.pt"
    torch.save(wrap(F.state_dict()), p)
    assert load_checkpoint(p).layout == "torchvision"


def test_old_torchvision_conv_key_and_module_prefix(tmp_path):
    sd = F.state_dict()
    sd = {("module." + k).replace("rpn.head.conv.0.0", "rpn.head.conv"): v for k, v in sd.items()}
    p = tmp_path / "c.pt"
    torch.save(sd, p)
    assert load_checkpoint(p).keys["rpn_conv"] == "rpn.head.conv"


@pytest.mark.parametrize("layout,bg", [("mmdet", 3), ("detectron2", 3)])
def test_other_layouts_put_background_last(layout, bg):
    sd = F.state_dict(reg_slots=3)
    tv = {v[0]: k for k, v in LAYOUTS["torchvision"].items()}
    out = {}
    for key, t in sd.items():
        prefix, kind = key.rsplit(".", 1)
        out[f"{LAYOUTS[layout][tv[prefix]][0]}.{kind}"] = t
    h = heads_from_state_dict(out)
    assert h.layout == layout and h.bg_col == bg and h.reg_classes == 3
    assert h.fg_logit(torch.tensor([0, 2])).tolist() == [0, 2] and h.reg_slot(
        torch.tensor([2])
    ).tolist() == [2]


def test_shape_mismatch_names_both_shapes():
    sd = F.state_dict()
    sd["rpn.head.bbox_pred.weight"] = torch.zeros(8, 8, 1, 1)
    with pytest.raises(InputError, match=r"has shape \[8, 8, 1, 1\], expected \[12, 8, 1, 1\]"):
        heads_from_state_dict(sd)


def test_no_heads_found():
    with pytest.raises(InputError, match="no RPN or RoI head found"):
        heads_from_state_dict({"backbone.conv1.weight": torch.zeros(1)})


def _renamed(sd: dict, old: str, new: str) -> dict:
    return {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in sd.items()}


def _with(sd: dict, **tensors) -> dict:
    return {**sd, **{k.replace("__", "."): v for k, v in tensors.items()}}


def _conv(c: int, norm: bool = True) -> dict:
    """A 3x3 conv's tensors (no bias where a norm follows it)."""
    w = {"weight": torch.randn(c, c, 3, 3, generator=torch.Generator().manual_seed(c))}
    return w if norm else {**w, "bias": torch.zeros(c)}


def _block(c: int, batch_norm: bool = True) -> dict:
    """torchvision's Conv2dNormActivation: conv ``0``, norm ``1``."""
    stats = {"running_mean": torch.zeros(c), "running_var": torch.ones(c)} if batch_norm else {}
    norm = {"weight": torch.ones(c), "bias": torch.zeros(c), **stats}
    return {**{f"0.{k}": t for k, t in _conv(c).items()}, **{f"1.{k}": t for k, t in norm.items()}}


# (a change to a replayable torchvision state_dict, the words its refusal must carry)
REFUSED_DESIGNS = [
    # a third RPN conv (torchvision's v2 models have two)
    (
        lambda sd: {
            **sd,
            **{
                f"rpn.head.conv.{i}.0.{k}": t
                for i in (1, 2)
                for k, t in _conv(8, norm=False).items()
            },
        },
        "RPN head with more than 2 convs",
    ),
    # a torchvision v2 box head with 5 conv blocks
    (
        lambda sd: {
            **{k: v for k, v in sd.items() if ".box_head." not in k},
            **{f"roi_heads.box_head.{i}.{k}": t for i in range(5) for k, t in _block(8).items()},
            "roi_heads.box_head.6.weight": torch.zeros(32, 392),
            "roi_heads.box_head.6.bias": torch.zeros(32),
        },
        "FastRCNNConvFCHead with more than 4 convs",
    ),
    # an unknown extra layer inside the box head: named by its module, never ignored
    (lambda sd: {**sd, "roi_heads.box_head.fc6_norm.weight": torch.ones(32)}, "fc6_norm"),
    # a BatchNorm's statistics inside a replayed layer's module are extra too
    (lambda sd: {**sd, "roi_heads.box_head.fc7.bn.running_var": torch.ones(32)}, "fc7.bn"),
]


@pytest.mark.parametrize("change,words", REFUSED_DESIGNS)
def test_a_head_design_not_replayed_is_refused_by_name(change, words):
    with pytest.raises(InputError, match=f"{words}.*not replayed yet"):
        heads_from_state_dict(change(F.state_dict()))


def test_mmdet_and_detectron2_designs_are_named():
    mm = F.cascade_state_dict("mmdet", stages=1)
    shared = {**mm, "roi_head.bbox_head.shared_convs.4.conv.weight": torch.zeros(8, 8, 3, 3)}
    with pytest.raises(InputError, match="more than 4 shared convs: not replayed yet"):
        heads_from_state_dict(shared)
    double = {k: v for k, v in mm.items() if ".shared_fcs." not in k}
    double["roi_head.bbox_head.fc_branch.0.weight"] = torch.zeros(32, 392)
    with pytest.raises(InputError, match="DoubleConvFCBBoxHead"):
        heads_from_state_dict(double)
    d2 = F.cascade_state_dict("detectron2", stages=1)
    c4 = {k: v for k, v in d2.items() if ".box_head." not in k}
    c4["roi_heads.res5.0.conv1.weight"] = torch.zeros(8, 8, 1, 1)
    with pytest.raises(InputError, match="Res5ROIHeads"):
        heads_from_state_dict(c4)


def _v2(sd: dict, convs: int = 4) -> dict:
    """``sd`` with torchvision's v2 heads: two RPN convs, a box head of ``convs`` conv blocks
    with BatchNorm then one fc, a mask-free model."""
    out = {k: v for k, v in sd.items() if ".box_head." not in k and "rpn.head.conv" not in k}
    for i in (0, 1):
        out |= {f"rpn.head.conv.{i}.0.{k}": t for k, t in _conv(8, norm=False).items()}
    for i in range(convs):
        out |= {f"roi_heads.box_head.{i}.{k}": t for k, t in _block(8).items()}
    fc = {"weight": torch.randn(32, 392), "bias": torch.zeros(32)}
    return out | {f"roi_heads.box_head.{convs + 1}.{k}": t for k, t in fc.items()}


def test_torchvision_v2_heads_are_found():
    h = heads_from_state_dict(_v2(F.state_dict()))
    assert h.rpn_convs == [Layer.RPN_CONV, Layer.RPN_CONV2]
    assert h.box_convs == list(BOX_CONVS) and h.box_fcs == [Layer.BOX_FC1]
    assert h.keys[Layer.BOX_FC1] == "roi_heads.box_head.5"
    assert h.keys[Layer.BOX_NORM4] == "roi_heads.box_head.3.1"
    assert h.running(Layer.BOX_NORM1) is not None and h.bias(Layer.BOX_CONV1) is None
    assert h.pool_size == 7 and not h.plain_box_head and h.box_batch_norm
    # the running statistics are not parameters (no gradient is reported for them)
    assert not [n for n in h.params if "running" in n] and len(h.buffers) == 8
    assert "box head (4 convs with BatchNorm, 1 fc," in h.replayed()


@pytest.mark.parametrize(
    "layout,conv,norm,fc",
    [
        ("mmdet", "roi_head.bbox_head.shared_convs.{i}.conv", "roi_head.bbox_head.shared_convs."
         "{i}.gn", "roi_head.bbox_head.shared_fcs.0"),
        ("detectron2", "roi_heads.box_head.conv{j}", "roi_heads.box_head.conv{j}.norm",
         "roi_heads.box_head.fc1"),
    ],
)  # fmt: skip
def test_group_norm_conv_heads_are_found(layout, conv, norm, fc):
    """MMDetection's Shared4Conv1FCBBoxHead and Detectron2's FastRCNNConvFCHead with GN."""
    sd = F.cascade_state_dict(layout, stages=1)
    for stage in ("bbox_head", "box_head", "box_predictor"):  # one stage: the plain head's keys
        sd = {k.replace(f".{stage}.0.", f".{stage}."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if ".shared_fcs." not in k and ".box_head.fc" not in k}
    for i in range(4):
        sd |= {f"{conv.format(i=i, j=i + 1)}.{k}": t for k, t in _conv(8).items()}
        sd |= {f"{norm.format(i=i, j=i + 1)}.{k}": torch.ones(8) for k in ("weight", "bias")}
    sd |= {f"{fc}.weight": torch.randn(32, 392), f"{fc}.bias": torch.zeros(32)}
    h = heads_from_state_dict(sd)
    assert h.box_convs == list(BOX_CONVS) and h.box_fcs == [Layer.BOX_FC1]
    assert h.running(Layer.BOX_NORM1) is None and not h.box_batch_norm
    assert "box head (4 convs with GroupNorm, 1 fc," in h.replayed()


def test_a_conv_heads_shapes_are_checked():
    sd = _v2(F.state_dict())
    sd["roi_heads.box_head.2.1.running_var"] = torch.ones(5)
    with pytest.raises(
        InputError, match=r"box_head.2.1.running_var' has shape \[5\], expected \[8\]"
    ):
        heads_from_state_dict(sd)
    sd = _v2(F.state_dict())
    sd["roi_heads.box_head.5.weight"] = torch.zeros(32, 400)
    with pytest.raises(InputError, match="not channels .8. x P x P"):
        heads_from_state_dict(sd)


def test_one_stage_checkpoints_are_named():
    for key, name in [
        ("head.classification_head.cls_logits.weight", "torchvision RetinaNet/FCOS"),
        ("bbox_head.retina_cls.weight", "MMDetection one-stage"),
        ("head.cls_score.weight", "Detectron2 RetinaNet"),
    ]:
        sd = {"backbone.body.conv1.weight": torch.zeros(1), key: torch.zeros(9, 8, 3, 3)}
        with pytest.raises(InputError, match=f"{name}.*one-stage detector: not replayed yet"):
            heads_from_state_dict(sd)


def test_a_keypoint_head_is_named_and_left_out():
    """Keypoint R-CNN's box terms are replayed; its keypoint head is named as not replayed."""
    sd = F.state_dict()
    sd["roi_heads.keypoint_head.0.weight"] = torch.zeros(8, 8, 3, 3)
    sd["roi_heads.keypoint_predictor.kps_score_lowres.weight"] = torch.zeros(8, 17, 4, 4)
    h = heads_from_state_dict(sd)
    assert h.unreplayed == [
        "roi_heads.keypoint_head (the keypoint head)",
        "roi_heads.keypoint_predictor (the keypoint predictor)",
    ]
    assert h.num_classes == 3


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_checkpoint_objects_are_replaced_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.path = marker
    p = tmp_path / "c.pt"
    torch.save({"state_dict": F.state_dict(), "meta": {"cfg": evil}}, p)
    h = load_checkpoint(p)
    assert not marker.exists()
    assert h.layout == "torchvision" and [(r.name, r.code) for r in h.replaced] == [
        ("posix.system", True)
    ]


# ---- configs and profiles ------------------------------------------------------------------


def test_profile_toml_roundtrip(tmp_path):
    for name, make in BUILTIN.items():
        p = tmp_path / f"{name}.toml"
        p.write_text(profile_toml(make()))
        assert load_profile(p) == make()


def test_profile_toml_overrides_a_base(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('base = "fixed"\npos_weight = 2.0\n[rpn_box]\nloss = "l1"\n')
    prof = load_profile(p)
    assert prof.name == "mine" and prof.pos_weight == 2.0 and prof.rpn_box.loss == "l1"
    assert prof.rpn_box.normalizer == "sampled" and prof.rpn_box.floor == 1.0


@pytest.mark.parametrize(
    "text,needle",
    [
        ("pos_wieght = 2.0", "unknown key 'pos_wieght'"),
        ('[rpn_box]\nnormalizer = "per_level"', "normalizer 'per_level' is unknown"),
        ('[rpn_box]\nloss = "ce"', "rpn_box needs one of l1, smooth_l1"),
        ('pos_weight = "x"', "expected a number"),
        ("pos_weight = ", "is not valid TOML"),
    ],
)
def test_bad_profile_toml(tmp_path, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(InputError, match=needle):
        load_profile(p)


def test_unknown_profile_and_preset_names():
    with pytest.raises(InputError, match="unknown profile 'legacyy'"):
        load_profile("legacyy")
    with pytest.raises(InputError, match="unknown detector preset 'yolo'"):
        load_config("yolo")


def test_config_toml_overrides_preset(tmp_path):
    p = tmp_path / "det.toml"
    p.write_text(
        'base = "mmdet"\n[rpn_sampler]\nbatch_size = 128\n[anchors]\nsizes = [[16.0], [32.0]]\n'
    )
    cfg = load_config(p)
    assert cfg.rpn_sampler.batch_size == 128 and cfg.rpn_sampler.pos_fraction == 0.5
    assert cfg.anchors.sizes == ((16.0,), (32.0,)) and cfg.anchors.valid_pad_divisor == 32


def test_config_ranking_is_a_named_framework(tmp_path):
    p = tmp_path / "det.toml"
    p.write_text('base = "torchvision"\nranking = "mmdet"\n')
    assert load_config(p).ranking == Ranking.MMDET
    p.write_text('ranking = "yolo"\n')
    with pytest.raises(InputError, match="ranking 'yolo' is unknown; use one of torchvision"):
        load_config(p)


@pytest.mark.parametrize("name", ["torchvision", "mmdet", "detectron2"])
def test_config_toml_roundtrip(tmp_path, name):
    from lossdoctor.inputs.config import preset
    from lossdoctor.inputs.dataclass_toml import dumps_toml, to_dict

    p = tmp_path / "c.toml"
    p.write_text(dumps_toml({"base": name, **to_dict(preset(name))}))
    assert load_config(p) == preset(name)


@pytest.mark.parametrize(
    "values, dtype, expected",
    [
        ([1.0, -2.0, 3.0], torch.float32, True),
        ([3e38] * 10, torch.float32, True),  # finite values whose sum overflows
        ([6e4] * 4, torch.float16, True),
        ([1.0, float("nan")], torch.float32, False),
        ([float("inf"), -float("inf")], torch.float32, False),
        ([3e38, 3e38, float("nan")], torch.float32, False),
        ([], torch.float32, True),
        ([1, 2], torch.int64, True),
    ],
)
def test_all_finite(values, dtype, expected):
    from lossdoctor.inputs.finite import all_finite

    t = torch.tensor(values, dtype=dtype)
    assert all_finite(t) is expected
    assert all_finite(t) == bool(torch.isfinite(t).all())


def test_mask_extents_by_hand():
    from lossdoctor.inputs.batch import _mask_extents

    m = torch.zeros(4, 6, 8, dtype=torch.bool)
    m[0, 1:3, 2:5] = True  # rows 1-2, cols 2-4
    m[1, 5, 7] = True  # the bottom-right pixel
    m[3, 0, 0] = m[3, 4, 6] = True  # two pixels: their box spans both
    assert _mask_extents(m) == [
        [2.0, 1.0, 5.0, 3.0],
        [7.0, 5.0, 8.0, 6.0],
        None,
        [0.0, 0.0, 7.0, 5.0],
    ]
    assert _mask_extents(torch.zeros(0, 6, 8, dtype=torch.bool)) == []
