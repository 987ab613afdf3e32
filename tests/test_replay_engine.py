"""Replay invariants: NaN semantics, shared normalizers, seeds, bad labels, MMDetection's leak."""

from __future__ import annotations

import math

import pytest
import torch

import factories as F
from lossdoctor.inputs.batch import validate_batch
from lossdoctor.inputs.config import preset
from lossdoctor.inputs.profiles import BUILTIN
from lossdoctor.replay.engine import replay
from lossdoctor.vocab import Term

ALL = [p() for p in BUILTIN.values()]
SHARED = ("fixed", "mmdet", "torchvision", "detectron2")


def run(batch=None, cfg="torchvision", seed=0, sample_all=False, profiles=ALL, heads=None):
    return replay(
        heads or F.heads(),
        batch or F.batch(),
        preset(cfg),
        profiles,
        seed=seed,
        sample_all=sample_all,
    )


def vals(r, profile, head, kind):
    return [float(getattr(lv, f"loss_{kind}").detach()) for lv in r.losses[profile].levels[head]]


@pytest.mark.parametrize("cfg", ["torchvision", "mmdet", "detectron2"])
def test_legacy_is_nan_exactly_at_levels_without_positive_and_fixed_is_finite(cfg):
    r = run(cfg=cfg)
    pos = [s.pos for s in r.samples["rpn"]]
    assert 0 in pos and any(pos), "the fixture must have levels with and without positives"
    legacy_box = vals(r, "legacy", "rpn", "bbox")
    assert [math.isnan(v) for v in legacy_box] == [p == 0 for p in pos]
    assert all(math.isfinite(v) for v in vals(r, "legacy", "rpn", "cls"))
    for name in SHARED:
        for head in ("rpn", "roi"):
            for kind in ("cls", "bbox"):
                assert all(math.isfinite(v) for v in vals(r, name, head, kind)), (name, head, kind)
    assert math.isfinite(r.losses["fixed"].total.item())


@pytest.mark.parametrize("name", SHARED)
def test_shared_normalizer_levels_add_up_to_the_whole_batch_loss(name):
    r = run()
    prof = r.losses[name]
    for head in ("rpn", "roi"):
        lv = prof.levels[head]
        assert len({x.avg_factor for x in lv}) == 1
        d = lv[0].avg_factor
        # the whole-batch loss computed at once: sum of every sampled per-sample loss / D
        samples = r.samples[head]
        whole = sum(s.cls_loss.sum().item() for s in samples) / d
        assert sum(vals(r, name, head, "cls")) == pytest.approx(whole, rel=1e-5)
        assert prof.term(Term(f"{head}_cls")).item() == pytest.approx(whole, rel=1e-5)


def test_fixed_avg_factor_is_total_sampled_and_legacy_per_level():
    r = run()
    rpn = r.losses["fixed"].levels["rpn"]
    total = sum(s.sampled for s in r.samples["rpn"])
    assert {x.avg_factor for x in rpn} == {float(total)}
    legacy = r.losses["legacy"].levels["rpn"]
    assert [x.avg_factor for x in legacy] == [float(s.sampled) for s in r.samples["rpn"]]
    assert [x.avg_factor_bbox for x in legacy] == [float(s.pos) for s in r.samples["rpn"]]


def test_mmdet_rpn_avg_factor_is_per_image_floored_sum():
    b = F.batch(
        boxes=[torch.tensor([[8.0, 10.0, 40.0, 50.0]]), torch.zeros(0, 4)],
        labels=[torch.tensor([0]), torch.zeros(0, dtype=torch.long)],
    )
    r = run(b, cfg="mmdet")
    im = r.images
    assert im[1].rpn_pos == 0
    want = max(im[0].rpn_pos, 1) + max(im[0].rpn_neg, 1) + 1 + im[1].rpn_neg
    assert r.losses["mmdet"].levels["rpn"][0].avg_factor == pytest.approx(want + 1.1920929e-07)


def _level_numbers(r):
    """Every profile's per-level counts and loss values."""
    return [
        (name, head, s.name, s.pos, s.sampled, ll.loss_cls.item(), ll.loss_bbox.item())
        for name, pl in r.losses.items()
        for head, levels in pl.levels.items()
        for s, ll in zip(r.samples[head], levels)
    ]


def test_same_seed_same_numbers_sample_all_ignores_seed():
    a, b, c = run(seed=5), run(seed=5), run(seed=6)
    assert _nan_equal(_level_numbers(a), _level_numbers(b))
    assert not _nan_equal(_level_numbers(a), _level_numbers(c))  # the RoI sampler draws differently
    x, y = run(seed=1, sample_all=True), run(seed=99, sample_all=True)
    assert _nan_equal(_level_numbers(x), _level_numbers(y))


def _nan_equal(rows_a, rows_b):
    def norm(v):
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    return [tuple(map(norm, r)) for r in rows_a] == [tuple(map(norm, r)) for r in rows_b]


def test_labels_out_of_range_are_left_out_and_recorded():
    boxes = [torch.tensor([[8.0, 10.0, 40.0, 50.0], [50.0, 5.0, 90.0, 30.0]])] * 2
    labels = [torch.tensor([0, 3]), torch.tensor([-1, 2])]  # 3 classes: 3 and -1 are unusable
    r = run(F.batch(boxes=boxes, labels=labels))
    assert [(d.image, d.box, d.label) for d in r.gt.dropped_labels] == [(0, 1, 3), (1, 0, -1)]
    assert [im.gt for im in r.images] == [1, 1]
    assert [im.gt_bad_label for im in r.images] == [1, 1]


def test_mmdet_leak_nan_from_an_unsampled_anchor():
    """A NaN output at anchors nobody samples: mmdet's weight-multiply makes the level NaN,
    indexing does not."""
    d = F.batch_dict()
    d["features"]["p6"][0, :, 0, 0] = float("nan")  # every P6 output at one location becomes NaN
    batch = validate_batch(d)
    profiles = [BUILTIN["mmdet"](), BUILTIN["torchvision"]()]
    lvl = 4
    for seed in range(50):  # the first seed whose draw leaves the poisoned anchors out
        r = replay(F.heads(), batch, preset("mmdet"), profiles, seed=seed)
        nan_anchor = ~torch.isfinite(r.rpn.levels[lvl].out.logits)
        if nan_anchor.any() and not (nan_anchor & r.rpn.levels[lvl].sampled).any():
            break
    else:
        pytest.fail("no seed left the poisoned anchors unsampled")
    mm = r.losses["mmdet"].levels["rpn"][lvl]
    tv = r.losses["torchvision"].levels["rpn"][lvl]
    assert math.isnan(mm.loss_cls.item()) and math.isnan(mm.loss_bbox.item())
    assert math.isfinite(tv.loss_cls.item()) and math.isfinite(tv.loss_bbox.item())


def test_empty_batch_of_gt_still_replays():
    b = F.batch(boxes=[torch.zeros(0, 4)] * 2, labels=[torch.zeros(0, dtype=torch.long)] * 2)
    r = run(b)
    assert all(im.rpn_pos == 0 and im.roi_pos == 0 for im in r.images)
    assert math.isnan(r.losses["legacy"].term(Term.ROI_BOX).item())
    assert r.losses["fixed"].term(Term.ROI_BOX).item() == 0.0
    assert r.losses["detectron2"].term(Term.RPN_BOX).item() == 0.0


def test_every_normalizer_has_a_count():
    """The normalizer table covers the whole vocabulary; each count worked out by hand."""
    from lossdoctor.replay.samples import COUNTS, HeadCounts
    from lossdoctor.vocab import Normalizer

    assert set(COUNTS) == set(Normalizer)
    c = HeadCounts(
        sampled=[10, 6], pos=[3, 0], budget=512, img_pos=[3, 0], img_neg=[7, 6], pixels=28 * 28
    )
    want = {
        Normalizer.LEVEL_SAMPLED: 6,
        Normalizer.LEVEL_POS: 0,
        Normalizer.SAMPLED: 16,
        Normalizer.POS: 3,
        Normalizer.BUDGET: 512,
        Normalizer.MMDET_SAMPLER: (3 + 7) + (1 + 6),
        Normalizer.MMDET_PSEUDO: 3 + 1,
        Normalizer.MASK_PIXELS: 3 * 28 * 28,  # the positive RoIs' mask pixels
    }
    assert {n: c.count(n, 1) for n in Normalizer} == want
