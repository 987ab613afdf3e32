"""Anchors, matcher, sampler, box coder, RoIAlign and level mapping against the reference notes."""

from __future__ import annotations

import math

import pytest
import torch

import factories as F
from lossdoctor.inputs.config import (
    AnchorConfig,
    CoderConfig,
    MatcherConfig,
    ProposalConfig,
    RoIPoolConfig,
    SamplerConfig,
    preset,
)
from lossdoctor.replay import boxes as B
from lossdoctor.replay import nms as N
from lossdoctor.replay.anchors import cell_anchors, level_anchors, level_strides
from lossdoctor.replay.matcher import IGNORED, NEGATIVE, POSITIVE, match
from lossdoctor.replay.proposals import image_proposals
from lossdoctor.replay.roi_align import map_levels, roi_align_torch
from lossdoctor.replay.sampler import sample
from lossdoctor.vocab import Ranking


def test_torchvision_cell_anchors_are_rounded_like_the_reference():
    # reference: P2 [-23,-11,23,11] [-16,-16,16,16] [-11,-23,11,23]; P6 [-362,-181,362,181] ...
    assert cell_anchors((32.0,), (0.5, 1.0, 2.0), True, False).tolist() == [
        [-23, -11, 23, 11],
        [-16, -16, 16, 16],
        [-11, -23, 11, 23],
    ]
    p6 = cell_anchors((512.0,), (0.5, 1.0, 2.0), True, False)
    assert p6[0].tolist() == [-362, -181, 362, 181] and p6[2].tolist() == [-181, -362, 181, 362]


def test_mmdet_detectron2_cell_anchors_are_not_rounded():
    a = cell_anchors((32.0,), (0.5, 1.0, 2.0), False, False)
    w = 32 / math.sqrt(0.5)
    assert a[0].tolist() == pytest.approx([-w / 2, -w / 4, w / 2, w / 4], rel=1e-6)  # 45.25 x 22.63


def test_anchor_order_is_y_x_a_with_zero_offset():
    cfg = AnchorConfig(sizes=((8.0,),), ratios=(1.0,))
    a = level_anchors(cfg, [4], [(2, 3)], (8, 12))[0]
    centres = ((a[:, :2] + a[:, 2:]) / 2).tolist()
    assert centres == [[0, 0], [4, 0], [8, 0], [0, 4], [4, 4], [8, 4]]


def test_torchvision_strides_come_from_padded_size_over_feature_size():
    # an 800 x 1216 input: P6 is 13 x 19, torchvision's stride is (800 // 13, 1216 // 19) = (61, 64)
    cfg = preset("torchvision").anchors
    assert level_strides(cfg, [64], [(13, 19)], (800, 1216)) == [(61, 64)]
    assert level_strides(preset("mmdet").anchors, [64], [(13, 19)], (800, 1216)) == [(64, 64)]


# torchvision's and MMDetection's RPN matchers, by their named differences
TV = MatcherConfig(fg_iou=0.7, bg_iou=0.3, low_quality=True)


def mmdet_rpn(min_iou: float) -> MatcherConfig:
    return MatcherConfig(
        fg_iou=0.7,
        bg_iou=0.3,
        low_quality=True,
        low_quality_min_iou=min_iou,
        low_quality_reassign=True,
        nan_positive=False,
    )


def _anchors():
    return torch.tensor(
        [[0, 0, 10, 10], [0, 0, 10, 20], [5, 0, 15, 10], [100, 100, 110, 110]], dtype=torch.float32
    )


def test_matcher_thresholds_and_ignore_band():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    m = match(gt, _anchors(), MatcherConfig(fg_iou=0.7, bg_iou=0.3, low_quality=False))
    # IoUs: 1.0, 0.5, 1/3, 0 → pos, ignored, ignored, neg
    assert m.labels.tolist() == [POSITIVE, IGNORED, IGNORED, NEGATIVE]
    assert m.gt_best.tolist() == [1.0]


def test_low_quality_match_torchvision_vs_mmdet_min_pos_iou():
    gt = torch.tensor([[0.0, 0.0, 10.0, 5.0]])  # best IoU 0.5 (anchor 0), below fg 0.7
    tv = match(gt, _anchors(), TV)
    mm = match(gt, _anchors(), mmdet_rpn(0.6))
    assert tv.labels[0] == POSITIVE  # low-quality match restores the best anchor
    assert mm.labels[0] != POSITIVE  # 0.5 < min_pos_iou 0.6: no positive at all


def test_gt_overlapping_no_anchor_makes_every_anchor_positive_under_torchvision_matching():
    # reference edge case: the low-quality pass matches every anchor whose IoU equals the GT's
    # max, 0
    gt = torch.tensor([[2000.0, 2000.0, 2010.0, 2010.0]])
    tv = match(gt, _anchors(), TV)
    mm = match(gt, _anchors(), mmdet_rpn(0.3))
    assert (tv.labels == POSITIVE).all()
    assert (mm.labels == NEGATIVE).all()


def test_mmdet_low_quality_later_gt_wins():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    gt = torch.tensor(
        [[0.0, 0.0, 10.0, 4.0], [0.0, 0.0, 4.0, 10.0]]
    )  # both best-match anchor 0 at IoU 0.4
    mm = match(gt, anchors, mmdet_rpn(0.3))
    tv = match(gt, anchors, TV)
    assert mm.labels[0] == POSITIVE and mm.gt[0] == 1  # later GT wins
    assert tv.labels[0] == POSITIVE and tv.gt[0] == 0  # its own argmax (first max)


def test_chunked_iou_equals_dense(monkeypatch):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + torch.rand(500, 2, generator=g) * 40 + 1], 1)
    gt = anchors[::50] + 0.5
    dense = match(gt, anchors, MatcherConfig())
    monkeypatch.setattr(B, "IOU_CHUNK_ELEMENTS", 37)  # many tiny chunks
    chunked = match(gt, anchors, MatcherConfig())
    assert torch.equal(dense.labels, chunked.labels) and torch.equal(dense.gt, chunked.gt)
    assert torch.equal(dense.gt_best, chunked.gt_best)


def test_sampler_budget_and_seed():
    labels = torch.tensor([POSITIVE] * 300 + [NEGATIVE] * 1000 + [IGNORED] * 10, dtype=torch.int8)
    cfg = SamplerConfig(256, 0.5)
    pos, neg = sample(labels, cfg, torch.Generator().manual_seed(3))
    assert (pos.numel(), neg.numel()) == (128, 128)
    pos2, neg2 = sample(labels, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(pos, pos2) and torch.equal(neg, neg2)
    few = torch.tensor([POSITIVE] * 5 + [NEGATIVE] * 1000, dtype=torch.int8)
    pos, neg = sample(few, cfg, torch.Generator().manual_seed(0))
    assert (pos.numel(), neg.numel()) == (5, 251)  # negatives fill the budget
    pos, neg = sample(few, cfg, None, sample_all=True)
    assert (pos.numel(), neg.numel()) == (5, 1000)


def test_encode_decode_roundtrip_and_zero_width_gives_minus_inf():
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    gt = torch.tensor([[2.0, 3.0, 14.0, 19.0]])
    d = B.encode(gt, ref, (10.0, 10.0, 5.0, 5.0))
    # dx = 10 * (8 - 5) / 10 = 3; dy = 10 * (11 - 10) / 20 = 0.5; dw = 5 ln(12/10); dh = 5 ln(16/20)
    assert d[0].tolist() == pytest.approx(
        [3.0, 0.5, 5 * math.log(1.2), 5 * math.log(0.8)], rel=1e-6
    )
    assert torch.allclose(
        B.decode(d, ref, (10.0, 10.0, 5.0, 5.0), math.log(1000 / 16)), gt, atol=1e-5
    )
    z = B.encode(torch.tensor([[5.0, 5.0, 5.0, 9.0]]), ref, (1, 1, 1, 1))
    assert z[0, 2] == -math.inf


def test_decode_clamps_dw_upper_only_unless_clip_both():
    ref = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    d = torch.tensor([[0.0, 0.0, 100.0, -100.0]])
    clip = math.log(1000 / 16)
    one = B.decode(d, ref, (1, 1, 1, 1), clip)
    both = B.decode(d, ref, (1, 1, 1, 1), clip, clip_both=True)
    assert (one[0, 2] - one[0, 0]).item() == pytest.approx(1000 / 16, rel=1e-5)
    assert (one[0, 3] - one[0, 1]).item() == pytest.approx(math.exp(-100), abs=1e-30)
    assert (both[0, 3] - both[0, 1]).item() == pytest.approx(16 / 1000, rel=1e-4)


def test_nms_keeps_highest_and_suppresses_overlaps():
    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], dtype=torch.float32
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # IoU(3, 0) = 100 / 105, IoU(3, 1) = 81 / 124 (> 0.5): 3 suppresses both
    assert N.nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert N.nms(boxes, scores, 0.5, stable=False).tolist() == [3, 2]
    groups = torch.tensor([0, 1, 0, 0])
    for rule in N.RANKINGS.values():
        assert rule.batched_nms(boxes, scores, groups, 0.5).tolist() == [3, 1, 2]


def test_stable_nms_keeps_the_first_of_tied_duplicates():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3 + [[50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert N.nms(boxes, scores, 0.7).tolist() == [0, 3]


def test_saturated_probabilities_tie_where_logits_do_not():
    # sigmoid(18) and sigmoid(20) are both 1.0 in float32: ranked by probability (torchvision,
    # mmdet) the two levels' best boxes tie and the first level's survives the top-1 cut; ranked
    # by logit (Detectron2) the higher logit does
    assert torch.sigmoid(torch.tensor([18.0, 20.0])).tolist() == [1.0, 1.0]
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[50.0, 50.0, 60.0, 60.0]])]
    logits, deltas = [torch.tensor([18.0]), torch.tensor([20.0])], [torch.zeros(1, 4)] * 2
    cfg, coder = ProposalConfig(pre_nms_top_n=1, post_nms_top_n=1), CoderConfig()
    kept = {
        r: image_proposals(logits, deltas, anchors, (100, 100), cfg, coder, r)[1].tolist()
        for r in Ranking
    }
    assert kept == {Ranking.DETECTRON2: [20.0], Ranking.TORCHVISION: [18.0], Ranking.MMDET: [18.0]}


def test_mmdet_sorts_only_levels_it_truncates():
    logits = torch.tensor([0.1, 0.9, 0.5])
    mm, tv = N.RANKINGS[Ranking.MMDET], N.RANKINGS[Ranking.TORCHVISION]
    assert mm.preselect(logits, 3).tolist() == [0, 1, 2]  # kept in anchor order
    assert mm.preselect(logits, 2).tolist() == [1, 2]
    assert tv.preselect(logits, 3).tolist() == [1, 2, 0]


def test_rankings_agree_without_ties():
    g = torch.Generator().manual_seed(3)
    for n in (300, 2000):  # below and above both frameworks' shift/split sizes for torchvision
        xy = torch.rand(n, 2, generator=g) * 200
        boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 60 + 4], 1)
        scores, groups = torch.rand(n, generator=g), torch.randint(0, 5, (n,), generator=g)
        kept = [r.batched_nms(boxes, scores, groups, 0.6) for r in N.RANKINGS.values()]
        by_group = torch.cat(
            [
                idx[N.nms(boxes[idx], scores[idx], 0.6)]
                for g_ in range(5)
                for idx in [(groups == g_).nonzero().flatten()]
            ]
        )
        expect = by_group[scores[by_group].argsort(descending=True)]
        for k in kept:
            assert torch.equal(k, expect)


def test_tied_scores_follow_each_frameworks_path():
    # 1200 disjoint boxes (4800 coordinates), scores with many ties: torchvision re-sorts its
    # per-group results with torch's default sort; mmcv runs one NMS of shifted boxes in the
    # same unstable order; below 1000 boxes torchvision's one shifted NMS keeps index order on ties
    n = 1200
    boxes = torch.arange(n)[:, None] * 20.0 + torch.tensor([0.0, 0.0, 10.0, 10.0])
    scores = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(0)).float()
    groups = torch.arange(n) % 5
    unstable = scores.sort(descending=True).indices
    stable = scores.sort(descending=True, stable=True).indices
    assert not torch.equal(unstable, stable)  # the case is only telling if the sorts differ
    assert torch.equal(N.torchvision_batched_nms(boxes, scores, groups, 0.5), unstable)
    assert torch.equal(N.mmcv_batched_nms(boxes, scores, groups, 0.5), unstable)
    few = N.torchvision_batched_nms(boxes[:900], scores[:900], groups[:900], 0.5)
    assert torch.equal(few, scores[:900].sort(descending=True, stable=True).indices)


def test_level_mappers_follow_their_formulas():
    side = torch.tensor([50.0, 111.0, 112.0, 223.9, 224.0, 447.0, 448.0, 2000.0])
    rois = torch.stack([torch.zeros_like(side), torch.zeros_like(side), side, side], 1)
    strides = [4, 8, 16, 32]
    tv = map_levels(rois, strides, RoIPoolConfig(mapper="torchvision"))
    mm = map_levels(rois, strides, RoIPoolConfig(mapper="mmdet"))
    # torchvision: floor(4 + log2(s / 224) + 1e-6) - 2; mmdet: floor(log2(s / 56 + 1e-6))
    want_tv = [min(max(math.floor(4 + math.log2(s / 224) + 1e-6), 2), 5) - 2 for s in side.tolist()]
    want_mm = [min(max(math.floor(math.log2(s / 56 + 1e-6)), 0), 3) for s in side.tolist()]
    assert tv.tolist() == want_tv and mm.tolist() == want_mm
    assert want_mm[1:3] == [0, 1]  # 111 -> P2, 112 -> P3


def _roi_align_kernel(feat, box, scale, pooled, sampling_ratio, aligned):
    """torchvision's CPU roi_align kernel, transcribed point by point."""
    c, h, w = feat.shape
    off = 0.5 if aligned else 0.0
    sw, sh = box[0] * scale - off, box[1] * scale - off
    rw, rh = box[2] * scale - off - sw, box[3] * scale - off - sh
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    bh, bw = rh / pooled, rw / pooled
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / pooled)
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pooled)
    count = max(gh * gw, 1)
    out = torch.zeros(c, pooled, pooled, dtype=torch.float64)
    for ph in range(pooled):
        for pw in range(pooled):
            acc = torch.zeros(c, dtype=torch.float64)
            for iy in range(gh):
                y = sh + ph * bh + (iy + 0.5) * bh / gh
                for ix in range(gw):
                    x = sw + pw * bw + (ix + 0.5) * bw / gw
                    if y < -1.0 or y > h or x < -1.0 or x > w:
                        continue
                    yy, xx = max(y, 0.0), max(x, 0.0)
                    yl, xl = int(yy), int(xx)
                    if yl >= h - 1:
                        yh = yl = h - 1
                        yy = float(yl)
                    else:
                        yh = yl + 1
                    if xl >= w - 1:
                        xh = xl = w - 1
                        xx = float(xl)
                    else:
                        xh = xl + 1
                    ly, lx = yy - yl, xx - xl
                    acc += (
                        (1 - ly) * (1 - lx) * feat[:, yl, xl]
                        + (1 - ly) * lx * feat[:, yl, xh]
                        + ly * (1 - lx) * feat[:, yh, xl]
                        + ly * lx * feat[:, yh, xh]
                    )
            out[:, ph, pw] = acc / count
    return out


@pytest.mark.parametrize("sampling_ratio,aligned", [(2, False), (0, True), (0, False), (1, True)])
def test_roi_align_matches_the_kernel(sampling_ratio, aligned):
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 9, 11, generator=g)
    rois = torch.tensor(
        [
            [3.0, 4.0, 30.0, 25.0],
            [-6.0, -3.0, 10.0, 8.0],
            [20.0, 14.0, 47.0, 38.0],
            [5.0, 5.0, 5.5, 5.2],
            [0, 0, 60, 40],
        ]
    )
    img = torch.tensor([0, 1, 1, 0, 1])
    got = roi_align_torch(feat, rois, img, 0.25, 4, sampling_ratio, aligned)
    for r in range(rois.shape[0]):
        want = _roi_align_kernel(
            feat[img[r]].double(), rois[r].tolist(), 0.25, 4, sampling_ratio, aligned
        )
        assert torch.allclose(got[r].double(), want, atol=1e-5), r


@pytest.mark.parametrize("sampling_ratio,aligned", [(2, False), (0, True)])
def test_roi_align_backward_passes_gradcheck(sampling_ratio, aligned):
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[3.0, 4.0, 17.0, 20.0], [-3.0, -2.0, 9.0, 8.0], [10.0, 2.0, 27.0, 23.0]],
        dtype=torch.float64,
    )
    img = torch.tensor([0, 1, 1])
    assert torch.autograd.gradcheck(
        lambda f: roi_align_torch(f, rois, img, 0.25, 3, sampling_ratio, aligned), (feat,)
    )


def test_mmdets_roi_low_quality_pass_ties_to_the_best_proposal_not_the_gt_itself():
    """Mask R-CNN's RoI assigner (match_low_quality, min_pos_iou 0.5): MMDetection assigns the
    proposals alone, then adds the GT. Proposal P overlaps A by 0.8 and B by 0.5, and is B's
    best proposal: the low-quality pass hands P to B (the later GT wins). Had the GT boxes been
    candidates, B's best IoU would be 1 (itself) and P would stay with A."""
    from lossdoctor.inputs.config import preset
    from lossdoctor.replay.roi import _sample_image

    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 2.0, 10.0, 12.0]])  # A, B
    props = torch.tensor([[0.0, 0.0, 10.0, 8.0]])  # P: IoU 80/100 with A, 60/120 with B
    labels = torch.tensor([0, 2])
    gen = torch.Generator().manual_seed(0)
    mask = _sample_image(props, gt, labels, preset("mmdet-mask"), gen, True)
    p = (mask.boxes == props[0]).all(1) & ~mask.is_gt
    assert mask.fg_class[p].tolist() == [2] and mask.gt_index[p].tolist() == [1]
    assert sorted(mask.gt_index[mask.is_gt].tolist()) == [0, 1]  # each GT its own match
    faster = _sample_image(props, gt, labels, preset("mmdet"), gen, True)  # no low-quality pass
    p = (faster.boxes == props[0]).all(1) & ~faster.is_gt
    assert faster.fg_class[p].tolist() == [0]


def test_hard_mining_takes_the_highest_losses_by_hand():
    """OHEM: 3 positives and 5 negatives, budget 4 at fraction 0.5 → the 2 positives and the 2
    negatives of highest loss; where a set fits its budget, all of it (no ranking asked)."""
    labels = torch.tensor([1, 0, 1, 0, -1, 0, 1, 0, 0])
    loss = torch.tensor([0.3, 2.0, 0.9, 0.1, 9.0, 1.5, 0.5, 0.2, 0.7])
    asked = []

    def hardness(idx, positive):
        asked.append(positive)
        return loss[idx]

    cfg = SamplerConfig(batch_size=4, pos_fraction=0.5, hard_mining=True)
    pos, neg = sample(labels, cfg, torch.Generator(), hardness=hardness)
    assert pos.tolist() == [2, 6] and neg.tolist() == [1, 5]
    pos, neg = sample(labels, SamplerConfig(batch_size=20, pos_fraction=0.5), None, False, hardness)
    assert pos.tolist() == [0, 2, 6] and neg.tolist() == [1, 3, 5, 7, 8]
    assert asked == [True, False]


def test_hard_mining_in_the_replay_samples_the_hardest_candidates():
    """With OHEM the sampled background RoIs of an image are those of highest classification
    loss among its background candidates, as the box head scores them without gradient."""
    import dataclasses

    from lossdoctor.inputs.config import preset
    from lossdoctor.inputs.profiles import fixed
    from lossdoctor.replay.engine import replay
    from lossdoctor.replay.roi import classification_loss

    base = preset("mmdet")
    cfg = dataclasses.replace(
        base, roi_sampler=dataclasses.replace(base.roi_sampler, batch_size=24, hard_mining=True)
    )
    r = replay(F.heads(), F.batch(), cfg, [fixed()])
    all_r = replay(F.heads(), F.batch(), cfg, [fixed()], sample_all=True)
    feats = r.features[: r.roi.num_levels]
    for i in range(r.batch.num_images):
        every = all_r.roi.img == i
        neg_all = all_r.roi.boxes[every & (all_r.roi.fg_class < 0)].detach()
        scores = classification_loss(
            r.heads, feats, r.batch.strides[: len(feats)], cfg, i, neg_all,
            torch.full((neg_all.shape[0],), -1),
        )  # fmt: skip
        mine = r.roi.img == i
        taken = r.roi.ce[mine & (r.roi.fg_class < 0)].detach()
        want = scores.topk(taken.numel()).values
        assert taken.numel() == 24 - int((mine & (r.roi.fg_class >= 0)).sum())
        assert torch.allclose(taken.sort(descending=True).values, want, atol=1e-6)


def test_balanced_l1_by_hand():
    """b = e^3 - 1 = 19.0855369: d = 0.5 → 0.5/b (0.5 b + 1) ln(0.5 b + 1) - 0.25 = 0.4005675;
    d = 2 (past beta 1) → 3 + 1.5 / b - 0.5 = 2.5785935; at d = beta both branches give
    0.5/b (b + 1) 3 - 0.5 = 1.0785935."""
    from lossdoctor.replay.losses import balanced_l1, box_loss
    from lossdoctor.vocab import LossKind

    d = torch.tensor([0.5, 2.0, 1.0 - 1e-6, 1.0])
    got = balanced_l1(d, 1.0)
    assert got[:2].tolist() == pytest.approx([0.4005675, 2.5785935], abs=1e-6)
    assert got[2:].tolist() == pytest.approx([1.0785935, 1.0785935], abs=2e-6)
    pred, target = torch.tensor([[0.5, -2.0, 0.0, 0.0]]), torch.zeros(1, 4)
    assert box_loss(pred, target, LossKind.BALANCED_L1, 1.0).item() == pytest.approx(
        2.979167, abs=1e-5
    )


def test_neg_pos_ub_bounds_the_negatives():
    labels = torch.tensor([1, 1] + [0] * 30)
    pos, neg = sample(labels, SamplerConfig(batch_size=256, neg_pos_ub=5), torch.Generator())
    assert pos.numel() == 2 and neg.numel() == 10
    pos, neg = sample(torch.tensor([0] * 30), SamplerConfig(neg_pos_ub=5), torch.Generator())
    assert pos.numel() == 0 and neg.numel() == 5  # at most 5 x max(1, 0)


def test_instance_balanced_positives():
    """8 positives on GT 0, one each on GT 1 and 2, budget 8: round(8 / 3) + 1 = 4 per GT at
    most (4 + 1 + 1), topped up to 8 from the rest (all GT 0's): 6, 1, 1."""
    from lossdoctor.replay.sampler import instance_balanced

    gt = torch.tensor([0] * 8 + [1, 2])
    for seed in range(5):
        got = instance_balanced(torch.arange(10), 8, gt, torch.Generator().manual_seed(seed))
        assert got.unique().numel() == 8
        assert torch.bincount(gt[got], minlength=3).tolist() == [6, 1, 1]
    # budget 6: 3 per GT at most (3 + 1 + 1 = 5), one more from GT 0
    got = instance_balanced(torch.arange(10), 6, gt, torch.Generator())
    assert torch.bincount(gt[got], minlength=3).tolist() == [4, 1, 1]


def test_iou_balanced_negatives():
    """Best IoU 1 (a positive): bins of width 2/3 from -1; budget 6 → 2 per bin at most. The 2
    negatives at IoU 0.4 (the top bin) are always taken, the rest drawn from those at 0.05."""
    from lossdoctor.replay.sampler import iou_balanced

    iou = torch.tensor([1.0] + [0.4, 0.4] + [0.05] * 20)
    neg = torch.arange(1, 23)
    for seed in range(5):
        got = iou_balanced(neg, 6, iou, 3, torch.Generator().manual_seed(seed))
        assert got.unique().numel() == 6 and {1, 2} <= set(got.tolist())
    assert iou_balanced(neg[:5], 6, iou, 3, None).tolist() == neg[:5].tolist()


def test_proposals_stay_across_the_border_where_the_coder_does_not_clip():
    """An anchor [-10, 90, 30, 130] on a 100 x 100 image with zero deltas: clipped to
    [0, 90, 30, 100] (area 300) by default; kept whole (area 1600) with clip_border=False, as
    MMDetection's coder with clip_border=False decodes it."""
    anchors, logits, deltas = (
        [torch.tensor([[-10.0, 90.0, 30.0, 130.0]])],
        [torch.tensor([1.0])],
        [torch.zeros(1, 4)],
    )
    cfg = ProposalConfig(pre_nms_top_n=1, post_nms_top_n=1)
    got = {
        border: image_proposals(
            logits, deltas, anchors, (100, 100), cfg, CoderConfig(clip_border=border), Ranking.MMDET
        )[0].tolist()
        for border in (True, False)
    }
    assert got == {True: [[0.0, 90.0, 30.0, 100.0]], False: [[-10.0, 90.0, 30.0, 130.0]]}
