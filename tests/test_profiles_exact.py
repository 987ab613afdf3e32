"""Each profile against its framework's formulas (reference notes), on hand-built cases.

The heads are wired so that the features *are* the head outputs: the RPN conv is an identity
(centre tap) followed by ReLU, each signed value v is stored as the channel pair (relu(v),
relu(-v)), and the 1x1 convs take their difference. The box head has zero weights, so every RoI
gets the class logits ``Z`` and deltas ``B`` from the biases. Expected values are computed below
in plain Python floats, from the formulas, independently of the library.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from factories import TV_KEYS
from lossdoctor.inputs.batch import BATCH_FORMAT, validate_batch
from lossdoctor.inputs.checkpoint import heads_from_state_dict
from lossdoctor.inputs.config import DetectorConfig, preset, replace
from lossdoctor.inputs.profiles import BUILTIN, EPS32
from lossdoctor.replay.engine import replay
from lossdoctor.vocab import Term

STRIDES = (4, 8)
SIZES = (8.0, 16.0)
GRID = ((4, 4), (2, 2))  # 16 x 16 image
IMAGE = 16
Z = [0.3, -0.2, 0.9, 0.1]  # class logits, background first (torchvision layout)
B = [0.05 * k - 0.3 for k in range(16)]  # 4 x (K + 1) deltas
CHANNELS = 10
POOL = 7
HIDDEN = 4


def make_heads():
    w = torch.zeros(CHANNELS, CHANNELS, 3, 3)
    for c in range(CHANNELS):
        w[c, c, 1, 1] = 1.0
    cls = torch.zeros(1, CHANNELS, 1, 1)
    cls[0, 0, 0, 0], cls[0, 1, 0, 0] = 1.0, -1.0
    reg = torch.zeros(4, CHANNELS, 1, 1)
    for k in range(4):
        reg[k, 2 * (k + 1), 0, 0], reg[k, 2 * (k + 1) + 1, 0, 0] = 1.0, -1.0
    sd = {}
    parts = {
        "rpn_conv": (w, torch.zeros(CHANNELS)),
        "rpn_cls": (cls, torch.zeros(1)),
        "rpn_reg": (reg, torch.zeros(4)),
        "fc1": (torch.zeros(HIDDEN, CHANNELS * POOL * POOL), torch.zeros(HIDDEN)),
        "fc2": (torch.zeros(HIDDEN, HIDDEN), torch.zeros(HIDDEN)),
        "cls": (torch.zeros(4, HIDDEN), torch.tensor(Z)),
        "reg": (torch.zeros(16, HIDDEN), torch.tensor(B)),
    }
    for part, (wt, b) in parts.items():
        sd[f"{TV_KEYS[part]}.weight"], sd[f"{TV_KEYS[part]}.bias"] = wt, b
    return heads_from_state_dict(sd)


def config(base: str) -> DetectorConfig:
    cfg = preset(base)
    anchors = replace(
        cfg.anchors,
        sizes=((SIZES[0],), (SIZES[1],)),
        ratios=(1.0,),
        stride_from_size=False,
        valid_pad_divisor=0,
    )
    return replace(cfg, anchors=anchors)


def anchors_py():
    """Level → list of anchors [x1, y1, x2, y2], row-major, centres at (x * s, y * s)."""
    out = []
    for s, size, (h, w) in zip(STRIDES, SIZES, GRID):
        out.append(
            [
                [x * s - size / 2, y * s - size / 2, x * s + size / 2, y * s + size / 2]
                for y in range(h)
                for x in range(w)
            ]
        )
    return out


def outputs_py(n, seed=1):
    """Chosen logits and deltas: [image][level][anchor] -> (logit, (dx, dy, dw, dh))."""
    rnd = random.Random(seed)
    return [
        [
            [
                (rnd.uniform(-3, 3), tuple(rnd.uniform(-1, 1) for _ in range(4)))
                for _ in range(h * w)
            ]
            for h, w in GRID
        ]
        for _ in range(n)
    ]


def make_batch(outs, gt_boxes, gt_labels, proposals):
    n = len(outs)
    feats = {}
    for lvl, (h, w) in enumerate(GRID):
        f = torch.zeros(n, CHANNELS, h, w)
        for i in range(n):
            for a, (logit, d) in enumerate(outs[i][lvl]):
                y, x = divmod(a, w)
                for j, v in enumerate((logit,) + d):
                    f[i, 2 * j, y, x] = max(v, 0.0)
                    f[i, 2 * j + 1, y, x] = max(-v, 0.0)
        feats[f"p{lvl + 2}"] = f
    return validate_batch(
        {
            "format": BATCH_FORMAT,
            "features": feats,
            "image_sizes": [[IMAGE, IMAGE]] * n,
            "strides": list(STRIDES),
            "gt_boxes": [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in gt_boxes],
            "gt_labels": [torch.tensor(lab, dtype=torch.long) for lab in gt_labels],
            "proposals": [torch.tensor(p, dtype=torch.float32).reshape(-1, 4) for p in proposals],
        }
    )


# ---- the reference formulas, in plain Python ------------------------------------------------


def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def encode(g, r, wts):
    rw, rh = r[2] - r[0], r[3] - r[1]
    gw, gh = g[2] - g[0], g[3] - g[1]
    return [
        wts[0] * ((g[0] + gw / 2) - (r[0] + rw / 2)) / rw,
        wts[1] * ((g[1] + gh / 2) - (r[1] + rh / 2)) / rh,
        wts[2] * math.log(gw / rw),
        wts[3] * math.log(gh / rh),
    ]


def bce(x, y):
    return max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))


def sl1(d, beta):
    d = abs(d)
    return d if beta < 1e-5 else (0.5 * d * d / beta if d < beta else d - 0.5 * beta)


def ce(z, t):
    m = max(z)
    return m + math.log(sum(math.exp(v - m) for v in z)) - z[t]


def inside(a, border):
    """mmdet's anchor_inside_flags for one anchor of the IMAGE x IMAGE image."""
    return border < 0 or (
        a[0] >= -border and a[1] >= -border and a[2] < IMAGE + border and a[3] < IMAGE + border
    )


def rpn_samples(outs, gts, border=-1.0, min_pos=0.0):
    """Per level: list of (image, logit, is_pos, box_loss_fn) for every sampled anchor (sample_all).

    Labels: IoU >= 0.7 or a GT's best anchor → positive; < 0.3 → negative; else ignored. Anchors
    outside the image by more than ``border`` (when >= 0) take no part at all; a GT's best anchor
    needs an IoU of ``min_pos`` (mmdet's min_pos_iou).
    """
    anchors = anchors_py()
    flat = [a for lvl in anchors for a in lvl if inside(a, border)]
    per_level = [[] for _ in anchors]
    for i, gt in enumerate(gts):
        best = [max(iou(g, a) for a in flat) for g in gt]
        for lvl, level_anchors in enumerate(anchors):
            for k, a in enumerate(level_anchors):
                logit, d = outs[i][lvl][k]
                if not inside(a, border):
                    continue
                if not gt:
                    per_level[lvl].append((i, logit, False, None))
                    continue
                ious = [iou(g, a) for g in gt]
                m = max(ious)
                j = ious.index(m)
                pos = m >= 0.7 or any(
                    abs(v - b) < 1e-12 and b >= min_pos for v, b in zip(ious, best)
                )
                if pos:
                    t = encode(gt[j], a, (1, 1, 1, 1))
                    per_level[lvl].append((i, logit, True, (d, t)))
                elif m < 0.3:
                    per_level[lvl].append((i, logit, False, None))
    return per_level


def expected(profile, outs, gts, labels, proposals, border=-1.0):
    """Per-level rpn (cls, box) and total roi (cls, box) under one profile, from the formulas."""
    n = len(outs)
    lv = rpn_samples(outs, gts, border, 0.3 if profile.startswith("mmdet") else 0.0)
    rpn_beta = {
        "legacy": 1 / 9,
        "fixed": 1 / 9,
        "torchvision": 1 / 9,
        "mmdet": 0.0,
        "mmdet-cascade": 1 / 9,
        "detectron2": 0.0,
    }[profile]
    roi_beta = 1.0 if profile == "mmdet-cascade" else rpn_beta
    mm = profile.startswith("mmdet")
    S = sum(len(s) for s in lv)
    pos_img = [sum(1 for s in lv for (i, _, p, _) in s if i == img and p) for img in range(n)]
    neg_img = [sum(1 for s in lv for (i, _, p, _) in s if i == img and not p) for img in range(n)]
    a_mm = sum(max(p, 1) + max(q, 1) for p, q in zip(pos_img, neg_img)) + EPS32
    rpn = []
    for s in lv:
        cls_sum = sum(bce(x, 1.0 if p else 0.0) for (_, x, p, _) in s)
        boxes = [sum(sl1(dd - tt, rpn_beta) for dd, tt in zip(*b)) for (_, _, p, b) in s if p]
        box_sum = sum(boxes)
        if profile == "legacy":
            rpn.append(
                (cls_sum / len(s) if s else math.nan, box_sum / len(boxes) if boxes else math.nan)
            )
        elif profile in ("fixed", "torchvision"):
            rpn.append((cls_sum / S, box_sum / S))
        elif mm:
            rpn.append((cls_sum / a_mm, box_sum / a_mm))
        else:  # detectron2: 256 N
            rpn.append((cls_sum / (256 * n), box_sum / (256 * n)))
    # RoI: candidates = proposals + GT (appended); IoU >= 0.5 → its GT's class, else background.
    ces, boxes = [], []
    for i in range(n):
        for r in proposals[i] + gts[i]:
            ious = [iou(g, r) for g in gts[i]]
            if ious and max(ious) >= 0.5:
                j = ious.index(max(ious))
                c = labels[i][j]
                ces.append(ce(Z, c + 1))
                t = encode(gts[i][j], r, (10, 10, 5, 5))
                pred = B[4 * (c + 1) : 4 * (c + 2)]
                boxes.append(sum(sl1(p - q, roi_beta) for p, q in zip(pred, t)))
            else:
                ces.append(ce(Z, 0))
    R, P = len(ces), len(boxes)
    cs, bs = sum(ces), sum(boxes)
    roi = {
        "legacy": (cs / R if R else math.nan, bs / P if P else math.nan),
        "fixed": (cs / max(R, 1), bs / max(R, 1)),
        "torchvision": (cs / R if R else math.nan, bs / R if R else math.nan),
        "mmdet": (cs / (max(R, 1) + EPS32), bs / (R + EPS32) if P else 0.0),
        "mmdet-cascade": (cs / (max(R, 1) + EPS32), bs / (R + EPS32) if P else 0.0),
        "detectron2": (cs / R if R else 0.0, bs / max(R, 1)),
    }[profile]
    return rpn, roi


CASES = {
    # image 0: one GT that exactly covers a P2 anchor; image 1: no GT. P3 gets no positive.
    "normal": (
        [[[0.0, 0.0, 8.0, 8.0]], []],
        [[1], []],
        [[[1.0, 0.0, 9.0, 8.0], [8.0, 8.0, 16.0, 16.0]], [[0.0, 0.0, 8.0, 8.0]]],
    ),
    # two GTs in one image, one per level
    "two_levels": (
        [[[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 16.0, 16.0]]],
        [[2, 0]],
        [[[1.0, 1.0, 15.0, 15.0], [9.0, 9.0, 15.0, 16.0]]],
    ),
    # no GT anywhere: no RPN positive and no RoI positive
    "no_positive": ([[], []], [[], []], [[[0.0, 0.0, 8.0, 8.0]], [[4.0, 4.0, 12.0, 12.0]]]),
}


def close(a, b):
    if math.isnan(b):
        return math.isnan(a)
    return a == pytest.approx(b, rel=2e-5, abs=1e-7)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("profile", list(BUILTIN))
def test_profile_matches_reference_formula(case, profile):
    gts, labels, props = CASES[case]
    outs = outputs_py(len(gts))
    batch = make_batch(outs, gts, labels, props)
    cfg = config("mmdet" if profile.startswith("mmdet") else "torchvision")
    r = replay(make_heads(), batch, cfg, [BUILTIN[profile]()], sample_all=True)
    rpn, roi = expected(profile, outs, gts, labels, props)
    got = r.losses[profile]
    for lvl, (c, b) in enumerate(rpn):
        assert close(got.levels["rpn"][lvl].loss_cls.item(), c), (lvl, "rpn cls")
        assert close(got.levels["rpn"][lvl].loss_bbox.item(), b), (lvl, "rpn box")
    assert close(got.term(Term.ROI_CLS).item(), roi[0])
    assert close(got.term(Term.ROI_BOX).item(), roi[1])


def test_reference_cases_exercise_the_edge_cases():
    """The cases really contain what they claim: no-GT image, a level without positive, no RoI
    positive."""
    gts, labels, props = CASES["normal"]
    r = replay(
        make_heads(),
        make_batch(outputs_py(2), gts, labels, props),
        config("torchvision"),
        [BUILTIN["legacy"]()],
        sample_all=True,
    )
    assert r.images[1].gt == 0 and r.images[1].rpn_pos == 0
    assert [s.pos for s in r.samples["rpn"]] == [1, 0]
    gts, labels, props = CASES["no_positive"]
    r = replay(
        make_heads(),
        make_batch(outputs_py(2), gts, labels, props),
        config("torchvision"),
        [BUILTIN["legacy"]()],
        sample_all=True,
    )
    assert sum(s.pos for s in r.samples["roi"]) == 0


@pytest.mark.parametrize("border", [0.0, 2.0])
@pytest.mark.parametrize("case", list(CASES))
def test_allowed_border_leaves_crossing_anchors_out(case, border):
    """mmdet's allowed_border (Cascade R-CNN's RPN: 0): anchors crossing the image take part in
    neither assignment nor the losses; the avg_factor counts only the rest."""
    gts, labels, props = CASES[case]
    outs = outputs_py(len(gts))
    cfg = config("mmdet")
    cfg = replace(cfg, anchors=replace(cfg.anchors, allowed_border=border))
    r = replay(make_heads(), make_batch(outs, gts, labels, props), cfg, [BUILTIN["mmdet"]()],
               sample_all=True)  # fmt: skip
    rpn, _ = expected("mmdet", outs, gts, labels, props, border)
    full, _ = expected("mmdet", outs, gts, labels, props)
    assert rpn != full  # the border changes this case's numbers
    got = r.losses["mmdet"].levels["rpn"]
    for lvl, (c, b) in enumerate(rpn):
        assert close(got[lvl].loss_cls.item(), c) and close(got[lvl].loss_bbox.item(), b), lvl
    counted = sum(len(s) for s in rpn_samples(outs, gts, border, 0.3))
    assert sum(s.cls_loss.numel() for s in r.samples["rpn"]) == counted
