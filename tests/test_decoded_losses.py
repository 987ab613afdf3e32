"""Box losses on decoded boxes (MMDetection's reg_decoded_bbox with GIoULoss, IoULoss, DIoULoss,
CIoULoss): each per-box loss worked out by hand from its definition, the RoI box term of a replay
equal to the decoded boxes' loss summed and normalized as the profile says (their gradients are
checked against autograd with every other profile in test_gradients.py), and profiles that would
run them where the replay cannot refused."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import factories as F
from lossdoctor.inputs.config import preset
from lossdoctor.inputs.errors import InputError
from lossdoctor.inputs.profiles import EPS32, TermSpec, mmdet
from lossdoctor.replay.boxes import decode
from lossdoctor.replay.engine import replay
from lossdoctor.replay.losses import (
    DECODED_LOSSES,
    bounded_iou_loss,
    ciou_d2_loss,
    ciou_loss,
    diou_d2_loss,
    diou_loss,
    giou_d2_loss,
    giou_loss,
    iou_loss,
)
from lossdoctor.vocab import DECODED_BOX_LOSSES, LossKind, Normalizer, Term

EPS = 1e-6  # mmdet's default eps of these losses


def box(*xs: float) -> torch.Tensor:
    return torch.tensor([xs], dtype=torch.float64)


def test_every_decoded_loss_kind_has_a_loss():
    assert set(DECODED_LOSSES) == set(DECODED_BOX_LOSSES)


def test_giou_and_iou_by_hand():
    # two 2x2 squares overlapping in a 1x1 square: union 7, enclosing box 3x3
    a, g = box(0, 0, 2, 2), box(1, 1, 3, 3)
    assert float(giou_loss(a, g)) == pytest.approx(1 - (1 / 7 - (9 - 7) / 9), rel=1e-12)
    assert float(iou_loss(a, g)) == pytest.approx(-math.log(1 / 7), rel=1e-12)
    # disjoint boxes: IoU 0, floored at eps under the log; GIoU below 0
    far = box(10, 10, 12, 12)
    assert float(iou_loss(a, far)) == pytest.approx(-math.log(EPS), rel=1e-12)
    assert float(giou_loss(a, far)) == pytest.approx(1 - (0 - (144 - 8) / 144), rel=1e-12)
    # a zero-area pair: the union and the enclosing area are floored at eps, nothing is NaN
    dot = box(5, 5, 5, 5)
    assert math.isfinite(float(giou_loss(dot, dot))) and math.isfinite(float(iou_loss(dot, dot)))


def test_diou_by_hand():
    a, g = box(0, 0, 2, 2), box(1, 1, 3, 3)
    iou = 1 / (7 + EPS)
    # centres (1, 1) and (2, 2): squared distance 2; enclosing diagonal squared 3^2 + 3^2
    want = 1 - (iou - 2 / (18 + EPS))
    assert float(diou_loss(a, g)) == pytest.approx(want, rel=1e-12)


def test_ciou_by_hand():
    a, g = box(0, 0, 4, 2), box(0, 0, 4, 3)  # IoU 8 / 12 > 0.5: the aspect term counts
    iou = 8 / (12 + EPS)
    v = 4 / math.pi**2 * (math.atan(4 / (3 + EPS)) - math.atan(4 / (2 + EPS))) ** 2
    alpha = v / (1 - iou + v)
    distance = 0.5**2 / (4**2 + 3**2 + EPS)  # centres (2, 1) and (2, 1.5)
    assert float(ciou_loss(a, g)) == pytest.approx(1 - (iou - (distance + alpha * v)), rel=1e-12)
    # same aspect ratio: v = 0 and CIoU is DIoU
    s, t = box(0, 0, 2, 2), box(1, 1, 3, 3)
    assert float(ciou_loss(s, t)) == pytest.approx(float(diou_loss(s, t)), rel=1e-12)
    # IoU below 0.5: alpha is 0 whatever the aspect
    lo, hi = box(0, 0, 4, 1), box(0, 0, 1, 4)
    assert float(ciou_loss(lo, hi)) == pytest.approx(float(diou_loss(lo, hi)), rel=1e-12)


def test_bounded_iou_by_hand():
    """Per coordinate 1 - (w - 2|dx|) / (w + 2|dx| + eps) for the centres (floored at 0) and
    1 - min(w / (w' + eps), w' / (w + eps)) for the sizes, each smoothed with beta, summed."""
    eps, beta = 1e-3, 0.2
    a, g = box(1, 0, 5, 2), box(0, 0, 4, 4)  # centre dx 1, dy -1; w 4 vs 4, h 2 vs 4
    dx = 1 - (4 - 2) / (4 + 2 + eps)
    dy = 1 - (4 - 2) / (4 + 2 + eps)
    dw = 1 - min(4 / (4 + eps), 4 / (4 + eps))
    dh = 1 - min(4 / (2 + eps), 2 / (4 + eps))

    def smooth(x):
        return 0.5 * x * x / beta if x < beta else x - 0.5 * beta

    want = sum(smooth(x) for x in (dx, dy, dw, dh))
    assert float(bounded_iou_loss(a, g, beta)) == pytest.approx(want, rel=1e-12)
    # a centre offset beyond half the GT's size bounds that coordinate's IoU at 0: loss 1 - beta/2
    far = box(10, 0, 14, 4)
    assert float(bounded_iou_loss(far, g, beta)) == pytest.approx(1 - beta / 2, rel=1e-5)


def test_a_bounded_iou_term_needs_a_positive_beta():
    with pytest.raises(InputError, match="needs its beta > 0"):
        dataclasses.replace(mmdet(), roi_box=TermSpec(LossKind.BOUNDED_IOU, beta=0.0))


D2_EPS = 1e-7  # Detectron2's (fvcore's): added, not a floor


def test_detectron2s_variants_by_hand():
    a, g = box(0, 0, 2, 2), box(1, 1, 3, 3)
    iou = 1 / (7 + D2_EPS)
    assert float(giou_d2_loss(a, g)) == pytest.approx(1 - (iou - 2 / (9 + D2_EPS)), rel=1e-12)
    assert float(diou_d2_loss(a, g)) == pytest.approx(1 - iou + 2 / (18 + D2_EPS), rel=1e-12)
    # CIoU: no IoU gate (IoU 1/7 here), alpha with eps, no clamp
    lo, hi = box(0, 0, 4, 1), box(0, 0, 1, 4)
    iou = 1 / (7 + D2_EPS)
    v = 4 / math.pi**2 * (math.atan(1 / 4) - math.atan(4)) ** 2
    alpha = v / (1 - iou + v + D2_EPS)
    distance = (1.5**2 + 1.5**2) / (4**2 + 4**2 + D2_EPS)  # centres (2, .5) and (.5, 2)
    want = 1 - iou + distance + alpha * v
    assert float(ciou_d2_loss(lo, hi)) == pytest.approx(want, rel=1e-12)
    # where mmdet's gate is shut (IoU <= 0.5) Detectron2's CIoU still adds alpha v to its DIoU
    extra = float(ciou_d2_loss(lo, hi) - diou_d2_loss(lo, hi))
    assert extra == pytest.approx(alpha * v, rel=1e-9) and extra > 0.01


def _decoded_profile(kind: LossKind, weight: float = 10.0):
    base = mmdet()
    beta = 0.2 if kind is LossKind.BOUNDED_IOU else 0.0
    spec = dataclasses.replace(base.roi_box, loss=kind, beta=beta, weight=weight)
    return dataclasses.replace(base, name=f"mmdet-{kind}", roi_box=spec)


@pytest.mark.parametrize("kind", DECODED_BOX_LOSSES)
def test_the_roi_box_term_is_the_decoded_boxes_loss(kind):
    """roi_box = weight * sum over the positive RoIs of loss(decode(delta, RoI), GT) / (sampled
    RoIs + eps), as mmdet's bbox head divides by bbox_targets.size(0); the deltas of each
    positive's class slot, the coder mmdet's (clamped both ways)."""
    cfg = preset("mmdet")
    p = _decoded_profile(kind)
    r = replay(F.heads(), F.batch(), cfg, [p], seed=0, sample_all=True)
    roi = r.roi
    pos = (roi.fg_class >= 0).nonzero().flatten()
    assert pos.numel() > 0, "the fixture needs positive RoIs"
    pred = roi.deltas[pos, r.heads.reg_slot(roi.fg_class[pos])].detach().double()
    c = cfg.roi_coder
    boxes = decode(pred, roi.boxes[pos].double(), c.weights, c.clip, clip_both=True)
    per_box = DECODED_LOSSES[kind](boxes, roi.gt_boxes[pos].double(), p.roi_box.beta)
    sampled = sum(s.sampled for s in r.samples["roi"])
    assert p.roi_box.normalizer is Normalizer.SAMPLED and sampled == roi.boxes.shape[0]
    want = 10.0 * float(per_box.sum()) / (sampled + EPS32)
    got = float(r.losses[p.name].term(Term.ROI_BOX))
    assert got == pytest.approx(want, rel=1e-5)
    # the GT boxes are the matched ones: the encoded targets decode back to them
    back = decode(roi.targets[pos].double(), roi.boxes[pos].double(), c.weights, 1e9)
    assert torch.allclose(back, roi.gt_boxes[pos].double(), atol=1e-3)


def test_a_decoded_loss_on_the_rpn_is_refused():
    base = mmdet()
    with pytest.raises(InputError, match="rpn_box 'giou' on decoded boxes is replayed for the RoI"):
        dataclasses.replace(base, rpn_box=TermSpec(LossKind.GIOU))


def test_a_profile_toml_takes_a_decoded_loss(tmp_path):
    from lossdoctor.inputs.profiles import load_profile

    path = tmp_path / "giou.toml"
    path.write_text('base = "mmdet"\n[roi_box]\nloss = "giou"\nweight = 10.0\n')
    prof = load_profile(path)
    assert prof.roi_box.loss is LossKind.GIOU and prof.roi_box.weight == 10.0


def test_the_default_what_if_keeps_the_runs_decoded_box_loss():
    """A run trained with GIoU on decoded boxes: the default what-if (fixed) normalizes the
    run's GIoU loss, not a smooth-L1 on deltas; delta losses are the what-if's own."""
    from lossdoctor.api import run_profiles
    from lossdoctor.inputs.dataclass_toml import to_dict
    from lossdoctor.inputs.profiles import fixed

    run = dataclasses.replace(mmdet(), roi_box=TermSpec("giou", "sampled", weight=10.0))
    batch = dataclasses.replace(F.batch(), meta={"profile": to_dict(run)})
    own, whatif, source = run_profiles(batch)
    assert source == "dump" and whatif.name == "fixed"
    assert (whatif.roi_box.loss, whatif.roi_box.weight) == ("giou", 10.0)
    assert whatif.roi_box.normalizer == fixed().roi_box.normalizer
    assert whatif.rpn_box == fixed().rpn_box  # the run's L1 on deltas: the what-if's own
    assert "with the run's roi_box giou" in whatif.summary
    _, chosen, _ = run_profiles(batch, new="fixed")  # asked for by name: as it is
    assert chosen == fixed()
