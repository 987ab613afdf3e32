"""Gradient norms against plain autograd: one backward per term, norms computed the plain way."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import factories as F
from lossdoctor.diagnose.gradients import gradients
from lossdoctor.inputs.batch import validate_batch
from lossdoctor.inputs.config import HeadNormConfig, preset
from lossdoctor.inputs.profiles import BUILTIN, TermSpec, fixed
from lossdoctor.inputs.profiles import mmdet as mmdet_profile
from lossdoctor.replay.engine import replay

REL = 1e-5


def plain_norm(t):
    return 0.0 if t is None else t.double().norm().item()


def close(got, want):
    if math.isnan(want):
        return math.isnan(got)
    return abs(got - want) <= REL * max(abs(want), 1e-9)


PROFILES = [p() for p in BUILTIN.values()] + [
    dataclasses.replace(
        fixed(),
        name="weighted",
        pos_weight=2.0,
        rpn_box=TermSpec("l1", "level_pos", weight=3.0, empty="zero"),
        roi_cls=TermSpec("ce", "level_sampled", floor=1.0),
        max_norm=0.5,
    ),
    dataclasses.replace(
        mmdet_profile(), name="balanced-l1", roi_box=TermSpec("balanced_l1", "sampled", beta=1.0)
    ),
    # box losses on decoded boxes (mmdet's reg_decoded_bbox): autograd through the decoder
    *[
        dataclasses.replace(
            mmdet_profile(),
            name=f"decoded-{kind}",
            roi_box=TermSpec(kind, "sampled", weight=10.0),
        )
        for kind in ("giou", "iou", "diou", "ciou", "giou_d2", "diou_d2", "ciou_d2")
    ],
]


# the heads whose gradients are checked: the two-fc box head (by hand), and the heads with
# conv blocks and two RPN convs (torchvision v2 with BatchNorm, GroupNorm, one fc; autograd),
# a C4 model's res5 on one level (stride 16, 15 anchors per location), and MMDetection's double
# head (its regression branch on RoIs scaled by 1.3, BatchNorm in training)
HEADS = {
    "fc": lambda: F.state_dict(),
    "v2-bn": lambda: F.v2_state_dict(norm="bn", mask=True),
    "gn-2fc": lambda: F.v2_state_dict(norm="gn", convs=2, fcs=2),
    "c4": lambda: F.c4_state_dict(),
    "double-head": lambda: F.double_head_state_dict(),
}


def c4_config(base):
    """``base`` on one feature map: 5 anchor sizes at it, RoIs pooled from it."""
    anchors = dataclasses.replace(base.anchors, sizes=((32.0, 64.0, 128.0, 256.0, 512.0),))
    pool = dataclasses.replace(base.roi_pool, num_levels=1)
    return dataclasses.replace(base, anchors=anchors, roi_pool=pool)


@pytest.fixture(scope="module", params=list(HEADS))
def case(request):
    from lossdoctor.inputs.checkpoint import heads_from_state_dict

    heads = heads_from_state_dict(HEADS[request.param]())
    d = F.batch_dict(strides=(16,)) if heads.res5 else F.batch_dict()
    if heads.has_mask:
        d["gt_masks"] = F.box_masks(d["gt_boxes"], tuple(d["image_sizes"][0]))
    batch = validate_batch(d)
    config = dataclasses.replace(preset("mmdet"), head_norm=HeadNormConfig(groups=4))
    config = c4_config(config) if heads.res5 else config
    r = replay(heads, batch, config, PROFILES)
    return r, gradients(r)


@pytest.mark.parametrize("name", [p.name for p in PROFILES])
def test_param_norms_by_term_match_autograd(case, name):
    r, G = case
    g = G[name]
    params = r.heads.params
    terms = r.losses[name].terms
    for term, loss in terms.items():
        grads = torch.autograd.grad(
            loss, list(params.values()), retain_graph=True, allow_unused=True
        )
        for (key, _), grad in zip(params.items(), grads):
            got = g.params[key].by_term[term]
            if key.startswith("rpn_conv"):
                assert math.isnan(got)  # not split by term, by design
                continue
            assert close(got, plain_norm(grad)), (term, key, got, plain_norm(grad))
    total = sum(terms.values())
    grads = torch.autograd.grad(total, list(params.values()), retain_graph=True, allow_unused=True)
    for (key, _), grad in zip(params.items(), grads):
        assert close(g.params[key].total, plain_norm(grad)), key
    want_total = math.sqrt(sum(plain_norm(x) ** 2 for x in grads))
    assert close(g.total_norm, want_total)


@pytest.mark.parametrize("name", [p.name for p in PROFILES])
def test_level_norms_match_autograd(case, name):
    r, G = case
    rows = {(g.head, g.level): g for g in G[name].levels}
    terms = r.losses[name].terms
    for head in ("rpn", "roi"):
        loss = terms[f"{head}_cls"] + terms[f"{head}_box"]
        feats = torch.autograd.grad(loss, r.features, retain_graph=True, allow_unused=True)
        for s, gf in zip(r.samples[head], feats):
            assert close(rows[(head, s.name)].feature, plain_norm(gf)), (head, s.name)
    for lvl in r.rpn.levels:
        gl, gd = torch.autograd.grad(
            terms["rpn_cls"] + terms["rpn_box"], [lvl.out.logits, lvl.out.deltas], retain_graph=True
        )
        row = rows[("rpn", lvl.name)]
        assert close(row.logits_pos, plain_norm(gl[lvl.positive]))
        assert close(row.logits_neg, plain_norm(gl[~lvl.positive]))
        assert close(row.deltas, plain_norm(gd))
    roi = r.roi
    gc, gr = torch.autograd.grad(
        terms["roi_cls"] + terms["roi_box"], [roi.cls_logits, roi.deltas], retain_graph=True
    )
    fg = roi.fg_class >= 0
    for lvl, s in enumerate(r.samples["roi"]):
        at = roi.level == lvl
        row = rows[("roi", s.name)]
        assert close(row.logits_pos, plain_norm(gc[at & fg])) and close(
            row.logits_neg, plain_norm(gc[at & ~fg])
        )
        assert close(row.deltas, plain_norm(gr[at]))


def test_clip_factor_is_torch_clip_grad_norm(case):
    r, G = case
    g = G["weighted"]
    # torch.nn.utils.clip_grad_norm_ on copies of the gradients
    loss = r.losses["weighted"].total
    grads = torch.autograd.grad(loss, list(r.heads.params.values()), retain_graph=True)
    ps = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    for p, x in zip(ps, grads):
        p.grad = x.clone()
    pre = torch.nn.utils.clip_grad_norm_(ps, 0.5).item()
    post = math.sqrt(sum(p.grad.double().norm().item() ** 2 for p in ps))
    assert close(g.total_norm, pre) and close(g.clipped_norm, post)
    assert g.clip_coef == pytest.approx(0.5 / (pre + 1e-6), rel=1e-5)


def test_empty_mean_nan_loss_has_finite_gradient(case):
    """legacy's NaN box loss at a level without positives: the loss is NaN, its gradient is zero."""
    r, G = case
    if r.heads.res5:
        pytest.skip("one level, which has positives on this batch")
    assert math.isnan(r.losses["legacy"].total.item())
    assert math.isfinite(G["legacy"].total_norm)
