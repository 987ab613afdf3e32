"""Mask R-CNN's mask term and Cascade R-CNN's stages, worked out by hand: mask targets by each
framework's rule, the mask normalization (zero positive RoIs included), how a cascade refines and
resamples its RoIs, stage loss weights and Detectron2's feature-gradient scale."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import factories as F
from lossdoctor.diagnose import diagnose
from lossdoctor.inputs.batch import validate_batch
from lossdoctor.inputs.checkpoint import heads_from_state_dict
from lossdoctor.inputs.config import MaskConfig, preset
from lossdoctor.inputs.profiles import BUILTIN, EPS32, TermSpec
from lossdoctor.replay.boxes import decode
from lossdoctor.replay.engine import replay
from lossdoctor.replay.mask import mask_targets
from lossdoctor.vocab import Head, LossKind, MaskTarget, Normalizer, Term

LEFT_HALF = torch.zeros(1, 10, 10, dtype=torch.bool)
LEFT_HALF[0, :, :5] = True


@pytest.mark.parametrize(
    "rule,want",
    [
        # aligned RoIAlign: bin 0 averages columns 0-4 (1), bin 1 columns 5-9 (0); >= 0.5
        (MaskTarget.DETECTRON2, [[1.0, 0.0], [1.0, 0.0]]),
        (MaskTarget.MMDET, [[1.0, 0.0], [1.0, 0.0]]),
        # not aligned: samples at x = 0.5 .. 4.5, the last halfway into column 5: (4 + 0.5) / 5
        (MaskTarget.TORCHVISION, [[0.9, 0.0], [0.9, 0.0]]),
    ],
)
def test_mask_targets_by_rule(rule, want):
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    got = mask_targets(LEFT_HALF, box, torch.tensor([0]), MaskConfig(mask_size=2, target=rule))
    assert torch.allclose(got[0], torch.tensor(want), atol=1e-6)


def test_mmdet_clips_the_roi_to_the_mask_and_detectron2_does_not():
    box = torch.tensor([[-10.0, 0.0, 10.0, 10.0]])  # half outside, on the left
    which = torch.tensor([0])
    mm = mask_targets(LEFT_HALF, box, which, MaskConfig(mask_size=2, target=MaskTarget.MMDET))
    d2 = mask_targets(LEFT_HALF, box, which, MaskConfig(mask_size=2, target=MaskTarget.DETECTRON2))
    assert mm[0].tolist() == [[1.0, 0.0], [1.0, 0.0]]  # as if the box were [0, 0, 10, 10]
    assert d2[0].tolist() == [[0.0, 1.0], [0.0, 1.0]]  # bin 0 is outside, bin 1 the left half


def _mask_batch(ignore=None):
    """Two images; the proposals are exactly the GT boxes, whose masks fill them: every positive
    RoI's target is all ones under the aligned rule."""
    d = F.batch_dict()
    d["gt_masks"] = F.box_masks(d["gt_boxes"], tuple(d["image_sizes"][0]))
    d["proposals"] = [b.clone() for b in d["gt_boxes"]]
    if ignore is not None:
        d["gt_ignore"] = ignore
    return validate_batch(d)


def _constant_mask_head(logit: float) -> dict:
    """Zero mask weights and a logits bias: every mask pixel's logit is ``logit``."""
    sd = F.mask_state_dict()
    for k, v in sd.items():
        if ".mask_head." in k or ".mask_predictor." in k:
            sd[k] = torch.zeros_like(v)
    sd["roi_heads.mask_predictor.mask_fcn_logits.bias"] = torch.full((4,), logit)
    return sd


def test_the_mask_term_is_the_mean_pixel_bce_under_every_framework():
    b = 0.7
    per_pixel = math.log1p(math.exp(-b))  # BCE(b, 1) = softplus(-b)
    per_roi = TermSpec(LossKind.BCE, Normalizer.POS)  # a mean over RoIs instead of pixels
    profiles = [BUILTIN[p]() for p in ("torchvision", "mmdet", "detectron2", "legacy", "fixed")]
    profiles.append(dataclasses.replace(BUILTIN["fixed"](), name="per-roi", roi_mask=per_roi))
    heads = heads_from_state_dict(_constant_mask_head(b))
    r = replay(heads, _mask_batch(), preset("detectron2-mask"), profiles, sample_all=True)
    assert r.mask.targets.eq(1).all() and r.mask.rows.numel() == 8  # 4 GT x 2 (proposal + GT)
    for p in profiles[:-1]:
        assert float(r.losses[p.name].term(Term.ROI_MASK).detach()) == pytest.approx(
            per_pixel, rel=1e-6
        )
    assert float(r.losses["per-roi"].term(Term.ROI_MASK).detach()) == pytest.approx(
        28 * 28 * per_pixel, rel=1e-6
    )
    rows = r.losses["torchvision"].levels[Head.MASK]
    assert sum(lv.avg_factor for lv in rows[:1]) == 8 * 28 * 28


def test_no_positive_roi_gives_zero_or_nan_by_profile_and_a_finding():
    ignored = [torch.ones(2, dtype=torch.bool)] * 2  # no usable GT: no positive RoI
    heads = heads_from_state_dict(F.mask_state_dict())
    profiles = [BUILTIN["torchvision"](), BUILTIN["legacy"]()]
    r = replay(heads, _mask_batch(ignored), preset("detectron2-mask"), profiles)
    assert r.mask.rows.numel() == 0
    assert float(r.losses["torchvision"].term(Term.ROI_MASK).detach()) == 0.0
    assert math.isnan(float(r.losses["legacy"].term(Term.ROI_MASK).detach()))
    d = diagnose(r)
    # legacy skips the empty term (no gradient); torchvision keeps it (a zero one): said once
    skipped = [f for f in d.findings if f.code == "mask-branch-skipped"]
    assert [f.profile for f in skipped] == ["legacy"]


def _cascade(layout: str, config, **replay_kw):
    heads = heads_from_state_dict(F.cascade_state_dict(layout))
    batch = validate_batch(F.batch_dict())
    return replay(heads, batch, config, [BUILTIN["mmdet"](), BUILTIN["fixed"]()], **replay_kw)


def test_mmdet_cascade_drops_the_added_gt_then_adds_it_again():
    r = _cascade("mmdet", preset("mmdet-cascade"), sample_all=True)
    first, second = r.roi_stages[0], r.roi_stages[1]
    gt = sum(b.shape[0] for b in r.gt.boxes)
    assert int(first.is_gt.sum()) == int(second.is_gt.sum()) == gt
    assert second.boxes.shape[0] == first.boxes.shape[0]  # R - G refined, G added back
    # stage 1's candidates are stage 0's non-GT RoIs moved by its regression (weights 10,10,5,5)
    keep = ~first.is_gt
    moved = decode(first.deltas.detach()[keep, 0], first.boxes[keep], (10.0, 10.0, 5.0, 5.0),
                   math.log(1000 / 16), True)  # fmt: skip
    h, w = r.batch.image_sizes[0]
    moved = torch.stack([moved[:, 0].clamp(0, w), moved[:, 1].clamp(0, h),
                         moved[:, 2].clamp(0, w), moved[:, 3].clamp(0, h)], 1)  # fmt: skip
    got = torch.tensor(sorted(map(tuple, second.boxes[~second.is_gt].tolist())))
    want = torch.tensor(sorted(map(tuple, moved.tolist())))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)


def test_detectron2_cascade_refines_every_roi_and_samples_no_more():
    r = _cascade("detectron2", preset("detectron2-cascade"))
    first, second = r.roi_stages[0], r.roi_stages[1]
    assert int(second.is_gt.sum()) == 0  # no GT added after the first stage
    assert second.boxes.shape[0] == first.boxes.shape[0]  # every RoI, none sampled away
    assert second.img_pos[0] + second.img_neg[0] == int((first.img == 0).sum())


def test_stage_loss_weights_by_hand():
    r = _cascade("mmdet", preset("mmdet-cascade"))
    for k, weight in ((1, 0.5), (2, 0.25)):
        stage = r.roi_stages[k]
        want = float(stage.ce.sum()) / (stage.ce.numel() + EPS32) * weight
        assert float(sum(lv.loss_cls for lv in r.losses["mmdet"].stages[k - 1])) == pytest.approx(
            want, rel=1e-6
        )
    total = sum(float(sum(lv.loss_cls for lv in rows)) for rows in
                [r.losses["mmdet"].levels[Head.ROI], *r.losses["mmdet"].stages])  # fmt: skip
    assert float(r.losses["mmdet"].term(Term.ROI_CLS)) == pytest.approx(total, rel=1e-6)


def test_detectron2_scales_each_stages_feature_gradient():
    cfg = preset("detectron2-cascade")
    plain = dataclasses.replace(
        cfg, cascade=dataclasses.replace(cfg.cascade, feature_grad_scale=1.0)
    )
    scaled, unscaled = (diagnose(_cascade("detectron2", c)) for c in (cfg, plain))

    def feature(d, stage):
        return [row.feature for row in d.grads["fixed"].levels
                if row.head == Head.ROI and row.stage == stage]  # fmt: skip

    for k in range(3):
        for a, b in zip(feature(scaled, k), feature(unscaled, k)):
            assert a == pytest.approx(b / 3, rel=1e-5)


@pytest.mark.parametrize("ignored", [False, True], ids=["positives", "no-positive"])
def test_mask_gradients_shared_by_profiles_are_each_profiles_own(monkeypatch, ignored):
    """A mask term that is the summed pixel BCE times one factor scales one shared backward;
    it equals each profile's own backward, a per-level normalizer and empty sets included."""
    import importlib

    G = importlib.import_module("lossdoctor.diagnose.gradients")
    M = importlib.import_module("lossdoctor.diagnose.gradients.mask")

    per_level = TermSpec(LossKind.BCE, Normalizer.LEVEL_POS)
    profiles = [BUILTIN[p]() for p in ("torchvision", "mmdet", "legacy", "fixed")]
    profiles.append(dataclasses.replace(BUILTIN["fixed"](), name="per-level", roi_mask=per_level))
    ignore = [torch.ones(2, dtype=torch.bool)] * 2 if ignored else None
    heads = heads_from_state_dict(F.mask_state_dict())
    r = replay(heads, _mask_batch(ignore), preset("detectron2-mask"), profiles, sample_all=True)
    shared = G.gradients(r)
    if not ignored:  # both paths are taken
        assert M._mask_coef(r, profiles[0]) > 0 and M._mask_coef(r, profiles[-1]) is None
    monkeypatch.setattr(M, "_mask_coef", lambda r, p: None)
    own = G.gradients(r)
    for p in profiles:
        a, b = shared[p.name], own[p.name]
        for x, y in zip(a.levels, b.levels):
            for field in ("feature", "logits_pos"):
                assert getattr(x, field) == pytest.approx(getattr(y, field), rel=1e-5, nan_ok=True)
        for key, y in b.params.items():
            assert a.params[key].total == pytest.approx(y.total, rel=1e-5, nan_ok=True), key


@pytest.mark.parametrize("case", ["healthy", "mmdet-cascade", "detectron2-cascade"])
def test_roi_split_gives_each_profiles_own_gradients(monkeypatch, case):
    """The box head split into the background RoIs' backward (shared, scaled by each profile)
    and the positive RoIs' sparse one gives each profile's own norms: every level, output and
    parameter, by term and in total; cascade stage weights and Detectron2's gradient scale too."""
    import importlib

    from lossdoctor.api import resolve_inputs

    G = importlib.import_module("lossdoctor.diagnose.gradients")
    R = importlib.import_module("lossdoctor.diagnose.gradients.roi")
    weighted = dataclasses.replace(BUILTIN["fixed"](), name="pos-weighted", pos_weight=2.0)
    profiles = [BUILTIN["legacy"](), BUILTIN["mmdet"](), weighted]
    if case == "healthy":
        files = ("fixtures/healthy/checkpoint.pt", "fixtures/healthy/batch.pt")
        heads, batch, cfg = resolve_inputs(*files, "fixtures/toy.toml", False)
    else:
        heads = heads_from_state_dict(F.cascade_state_dict(case.split("-")[0]))
        batch, cfg = validate_batch(F.batch_dict()), preset(case)
    r = replay(heads, batch, cfg, profiles, sample_all=True)
    monkeypatch.setattr(R, "ROI_SPLIT_SHARE", 1.0)
    calls = []
    split = R._roi_split
    monkeypatch.setattr(R, "_roi_split", lambda *a: calls.append(split(*a)) or calls[-1])
    shared = G.gradients(r)
    assert any(c is not None for c in calls)  # the split was taken
    monkeypatch.setattr(R, "_roi_split", lambda *a: None)
    own = G.gradients(r)
    for p in profiles:
        a, b = shared[p.name], own[p.name]
        for x, y in zip(a.levels, b.levels):
            for field in ("feature", "logits_pos", "logits_neg", "deltas"):
                want = getattr(y, field)
                assert getattr(x, field) == pytest.approx(want, rel=2e-5, abs=1e-9, nan_ok=True)
        for key, y in b.params.items():
            for term, v in y.by_term.items():
                got = a.params[key].by_term[term]
                assert got == pytest.approx(v, rel=2e-5, abs=1e-9, nan_ok=True), (key, term)
            assert a.params[key].total == pytest.approx(y.total, rel=2e-5, nan_ok=True), key


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_of_a_bool_map_is_that_of_its_float_copy_bitwise(aligned):
    """GT masks are pooled as they are (bool), never copied whole to float: the same values."""
    from lossdoctor.replay.roi_align import roi_align_level

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 1, 50, 70, generator=g) > 0.5
    boxes = torch.tensor(
        [[3.2, 4.1, 40.5, 30.7], [0.0, 0.0, 70.0, 50.0], [10.0, 10.0, 11.0, 12.0],
         [-5.0, -3.0, 20.0, 60.0]]
    )  # fmt: skip
    which = torch.tensor([0, 1, 2, 1])
    got = roi_align_level(masks, boxes, which, 1.0, 28, 0, aligned, 72)
    assert got.dtype == torch.float32
    assert torch.equal(got, roi_align_level(masks.float(), boxes, which, 1.0, 28, 0, aligned, 72))


# each framework's per-stage box coder weights (MMDetection: 1 / its target stds)
CASCADE_CODERS = {
    "mmdet": [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0),
              (1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067)],
    "detectron2": [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)],
}  # fmt: skip


def _cascade_by_hand(sd, layout: str, r, rois, img):
    """Every stage's class logits and the last stage's RoIs and deltas, straight from the state
    dict: each stage pools the RoIs the stage before moved (decoded with that stage's coder,
    clipped to the image)."""
    import torch.nn.functional as tf

    from lossdoctor.inputs.layouts import CASCADE_LAYOUTS
    from lossdoctor.replay.boxes import clip_to_image
    from lossdoctor.replay.roi_align import map_levels, multiscale_roi_align
    from lossdoctor.vocab import Layer

    strides, pool = r.batch.strides[:4], r.config.roi_pool
    feats = [f.detach() for f in r.features[:4]]
    clip, deltas, logits = r.config.roi_coder, None, []
    for k in range(len(CASCADE_CODERS[layout])):
        keys = {x: key.format(k=k) for x, key in CASCADE_LAYOUTS[layout].items()}
        w = {x: (sd[f"{key}.weight"], sd[f"{key}.bias"]) for x, key in keys.items()}
        if deltas is not None:
            moved = decode(deltas, rois, CASCADE_CODERS[layout][k - 1], clip.clip, clip.clip_both)
            rois = torch.cat([clip_to_image(moved[img == i], s)
                              for i, s in enumerate(r.batch.image_sizes)])  # fmt: skip
        pooled = multiscale_roi_align(feats, strides, rois, img, map_levels(rois, strides, pool),
                                      7, pool).flatten(1)  # fmt: skip
        h = tf.relu(tf.linear(tf.relu(tf.linear(pooled, *w[Layer.BOX_FC1])), *w[Layer.BOX_FC2]))
        logits.append(tf.linear(h, *w[Layer.BOX_LOGITS]))
        deltas = tf.linear(h, *w[Layer.BOX_DELTAS])
    return logits, rois, deltas


@pytest.mark.parametrize("layout", ["mmdet", "detectron2"])
def test_cascade_symptom_joins_the_stages_as_its_framework_does(layout):
    """In test mode MMDetection averages the stages' class logits and then takes the softmax;
    Detectron2 averages each stage's softmax. Both score the last stage's regression of the
    RoIs each stage refined for the next, with each stage's own weights and box coder."""
    import importlib

    S = importlib.import_module("lossdoctor.diagnose.symptom")
    sd = F.cascade_state_dict(layout)
    r = _cascade(layout, preset(f"{layout}-cascade"))
    rois, img = S._test_rois(r)
    assert torch.equal(img, img.sort().values)  # image by image, as the hand pass concatenates
    logits, last_rois, last_deltas = _cascade_by_hand(sd, layout, r, rois, img)
    stacked = torch.stack(logits)
    want = {
        "mmdet": stacked.mean(0).softmax(-1),
        "detectron2": stacked.softmax(-1).mean(0),
    }
    got = S._score(r, rois, img)
    assert torch.allclose(got.fg_prob, want[layout][:, :-1], rtol=1e-5, atol=1e-7)
    assert torch.allclose(got.rois, last_rois, rtol=1e-6, atol=1e-4)
    assert torch.allclose(got.deltas[:, 0], last_deltas, rtol=1e-5, atol=1e-6)
    assert got.coder.weights == pytest.approx(CASCADE_CODERS[layout][-1])
    other = {"mmdet": "detectron2", "detectron2": "mmdet"}[layout]
    assert not torch.allclose(want[layout], want[other], rtol=1e-3)  # the rules differ here
    assert S.symptom(r).detections  # the whole symptom runs on the cascade


def test_mmdets_per_stage_mask_heads_are_named_not_replayed(tmp_path):
    """MMDetection's Cascade Mask R-CNN has one mask head per stage: the report says they are
    there and not replayed, rather than leaving roi_mask empty without a word."""
    import json

    from typer.testing import CliRunner

    from lossdoctor import dump_batch
    from lossdoctor.cli import app

    sd = F.cascade_state_dict("mmdet")
    for k in range(3):
        sd[f"roi_head.mask_head.{k}.conv_logits.weight"] = torch.zeros(3, 8, 1, 1)
        sd[f"roi_head.mask_head.{k}.conv_logits.bias"] = torch.zeros(3)
    heads = heads_from_state_dict(sd)
    prefixes = [f"roi_head.mask_head.{k} (one mask head per cascade stage)" for k in range(3)]
    assert heads.unreplayed == prefixes and not heads.has_mask
    assert heads_from_state_dict(F.cascade_state_dict("mmdet")).unreplayed == []
    torch.save(sd, tmp_path / "ckpt.pt")
    b = F.batch_dict()
    dump_batch(tmp_path / "batch.pt", **{k: b[k] for k in ("features", "image_sizes",
               "gt_boxes", "gt_labels", "strides")})  # fmt: skip
    files = [str(tmp_path / "ckpt.pt"), str(tmp_path / "batch.pt"), "--config", "mmdet-cascade"]
    r = CliRunner().invoke(app, ["inspect", *files, "--json", str(tmp_path / "r.json")])
    assert r.exit_code in (0, 1), r.output
    assert f"not replayed: {', '.join(prefixes)}; their losses are not in the tables" in (
        " ".join(r.stdout.split())
    )
    meta = json.loads((tmp_path / "r.json").read_text())["meta"]
    assert meta["checkpoint"]["unreplayed"] == prefixes
