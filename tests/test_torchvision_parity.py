"""The torchvision preset and profile against the real torchvision modules (skipped without
torchvision).

Run with torchvision installed, e.g. ``pip install torch==2.14.1 torchvision==0.29.1`` in a separate
environment. Sampling budgets are made large enough that torchvision keeps every candidate, which is
what ``sample_all`` does, so both sides see the same samples.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import factories as F

tv = F.framework("torchvision")
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.models.detection.roi_heads import RoIHeads  # noqa: E402
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign, nms, roi_align  # noqa: E402

from lossdoctor.inputs.config import preset  # noqa: E402
from lossdoctor.inputs.profiles import builtin  # noqa: E402
from lossdoctor.replay.anchors import level_anchors  # noqa: E402
from lossdoctor.replay.engine import replay  # noqa: E402
from lossdoctor.replay.nms import nms as nms_torch  # noqa: E402
from lossdoctor.replay.roi_align import roi_align_torch  # noqa: E402

ALL = 10**6  # a sampler budget no batch reaches: torchvision then keeps every candidate


def tv_modules(sd, channels, classes, pool=7, hidden=32):
    anchor_gen = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    head = RPNHead(channels, 3)
    rpn = RegionProposalNetwork(
        anchor_gen,
        head,
        0.7,
        0.3,
        ALL,
        0.5,
        dict(training=2000, testing=1000),
        dict(training=2000, testing=1000),
        0.7,
    )
    roi = RoIHeads(
        MultiScaleRoIAlign(["0", "1", "2", "3"], pool, 2),
        TwoMLPHead(channels * pool * pool, hidden),
        FastRCNNPredictor(hidden, classes + 1),
        0.5,
        0.5,
        ALL,
        0.25,
        None,
        0.05,
        0.5,
        100,
    )
    own = dict(sd)
    head.load_state_dict(
        {k[len("rpn.head.") :]: v for k, v in own.items() if k.startswith("rpn.head.")}
    )
    roi.box_head.load_state_dict(
        {
            k[len("roi_heads.box_head.") :]: v
            for k, v in own.items()
            if k.startswith("roi_heads.box_head.")
        }
    )
    roi.box_predictor.load_state_dict(
        {
            k[len("roi_heads.box_predictor.") :]: v
            for k, v in own.items()
            if k.startswith("roi_heads.box_predictor.")
        }
    )
    return rpn.train(), roi.train()


def make_case(seed, size=(200, 320), n=2):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    boxes, labels = [], []
    for _ in range(n):
        k = 4
        wh = torch.rand(k, 2, generator=g) * 120 + 16
        xy = torch.rand(k, 2, generator=g) * (torch.tensor([w, h]) - wh)
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, 3, (k,), generator=g))
    return F.batch_dict(n=n, channels=16, size=size, seed=seed, boxes=boxes, labels=labels)


def tv_losses(d: dict, sd: dict) -> tuple[list, dict, dict]:
    """torchvision's RPN, then its RoI stage on the RPN's own proposals, on the case ``d`` →
    (the proposals, detached, as float; the RPN losses; the RoI losses). Runs under whatever
    autocast the caller has entered."""
    rpn, roi = tv_modules(sd, 16, 3)
    n = len(d["image_sizes"])
    pad = (d["features"]["p2"].shape[2] * 4, d["features"]["p2"].shape[3] * 4)
    images = ImageList(torch.zeros(n, 3, *pad), [tuple(s) for s in d["image_sizes"]])
    feats = OrderedDict(zip(["0", "1", "2", "3", "pool"], d["features"].values()))
    targets = [{"boxes": b, "labels": lab + 1} for b, lab in zip(d["gt_boxes"], d["gt_labels"])]
    proposals, rpn_losses = rpn(images, feats, targets)
    props = [p.detach().float() for p in proposals]
    _, roi_losses = roi(feats, props, images.image_sizes, targets)
    return props, rpn_losses, roi_losses


@pytest.mark.parametrize("seed", [0, 1])
def test_torchvision_losses_match(seed):
    d = make_case(seed)
    sd = F.state_dict(channels=16, classes=3, seed=seed, std=0.05)
    # torchvision's RoI stage on its own proposals; lossdoctor replays the same proposals
    proposals, rpn_losses, roi_losses = tv_losses(d, sd)

    from lossdoctor.inputs.batch import validate_batch
    from lossdoctor.inputs.checkpoint import heads_from_state_dict

    d["proposals"] = proposals
    batch = validate_batch(d)
    r = replay(
        heads_from_state_dict(sd),
        batch,
        preset("torchvision"),
        [builtin("torchvision")],
        sample_all=True,
    )
    t = r.losses["torchvision"].terms
    assert t["rpn_cls"].item() == pytest.approx(rpn_losses["loss_objectness"].item(), rel=1e-5)
    assert t["rpn_box"].item() == pytest.approx(rpn_losses["loss_rpn_box_reg"].item(), rel=1e-5)
    assert t["roi_cls"].item() == pytest.approx(roi_losses["loss_classifier"].item(), rel=1e-5)
    assert t["roi_box"].item() == pytest.approx(roi_losses["loss_box_reg"].item(), rel=1e-4)

    # and our own proposals are torchvision's
    d.pop("proposals")
    r2 = replay(
        heads_from_state_dict(sd),
        validate_batch(d),
        preset("torchvision"),
        [builtin("torchvision")],
        sample_all=True,
    )
    assert [im.proposals for im in r2.images] == [p.shape[0] for p in proposals]


def tie_case(kind: str, size: tuple[int, int]):
    """A batch and heads whose objectness scores tie: ``constant`` features make every interior
    location of a level score alike; ``saturated`` logits (about 40) differ while their
    probabilities are all 1.0."""
    d = make_case(0, size)
    sd = F.state_dict(channels=16, classes=3, seed=0, std=0.05)
    if kind == "constant":
        for name, f in d["features"].items():
            d["features"][name] = f.mean((2, 3), keepdim=True).expand_as(f).contiguous()
    if kind == "saturated":
        sd["rpn.head.cls_logits.weight"] = sd["rpn.head.cls_logits.weight"] * 50
        sd["rpn.head.cls_logits.bias"] = sd["rpn.head.cls_logits.bias"] + 40
    return d, sd


# 32x48 images give < 1000 candidates (one shifted NMS), 200x320 give more (one NMS per level)
@pytest.mark.parametrize("size", [(32, 48), (200, 320)])
@pytest.mark.parametrize("kind", ["random", "constant", "saturated"])
def test_own_proposals_are_torchvisions_ties_included(kind, size):
    from lossdoctor.inputs.batch import validate_batch
    from lossdoctor.inputs.checkpoint import heads_from_state_dict
    from lossdoctor.replay.proposals import rpn_proposals

    d, sd = tie_case(kind, size)
    rpn, _ = tv_modules(sd, 16, 3)
    n = len(d["image_sizes"])
    pad = (d["features"]["p2"].shape[2] * 4, d["features"]["p2"].shape[3] * 4)
    images = ImageList(torch.zeros(n, 3, *pad), [tuple(s) for s in d["image_sizes"]])
    feats = OrderedDict(zip(["0", "1", "2", "3", "pool"], d["features"].values()))
    targets = [{"boxes": b, "labels": lab + 1} for b, lab in zip(d["gt_boxes"], d["gt_labels"])]
    with torch.no_grad():
        theirs, _ = rpn(images, feats, targets)
    ours = rpn_proposals(heads_from_state_dict(sd), validate_batch(d), preset("torchvision"))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_anchors_match_torchvision_including_p6_stride():
    gen = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    shapes = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    images = ImageList(torch.zeros(1, 3, 800, 1216), [(800, 1216)])
    ref = gen(images, [torch.zeros(1, 1, h, w) for h, w in shapes])[0]
    ours = torch.cat(
        level_anchors(preset("torchvision").anchors, [4, 8, 16, 32, 64], shapes, (800, 1216))
    )
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("sampling_ratio,aligned", [(2, False), (0, True)])
def test_pure_roi_align_matches_compiled(sampling_ratio, aligned):
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 8, 25, 38, generator=g)
    xy = torch.rand(300, 2, generator=g) * 150
    rois = torch.cat([xy, xy + torch.rand(300, 2, generator=g) * 120 + 0.5], 1)
    img = torch.randint(0, 2, (300,), generator=g)
    ref = roi_align(
        feat, torch.cat([img[:, None].float(), rois], 1), 7, 0.125, sampling_ratio, aligned
    )
    assert torch.allclose(
        roi_align_torch(feat, rois, img, 0.125, 7, sampling_ratio, aligned), ref, atol=1e-5
    )


def test_pure_nms_matches_compiled():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2000, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand(2000, 2, generator=g) * 80 + 1], 1)
    scores = torch.rand(2000, generator=g)
    assert torch.equal(nms_torch(boxes, scores, 0.7), nms(boxes, scores, 0.7))


# measured on these cases: fp16 and bf16 within 3e-7 relative of torchvision's own autocast
# losses (both run the same ops under CPU autocast; what remains is summation order)
AUTOCAST_REL = 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_torchvision_autocast_losses_match(seed, dtype):
    """torchvision's RPN and RoI heads under torch.autocast("cpu", dtype) against the replay in
    that precision on the same features and proposals; the fp32 replay is further off."""
    import dataclasses

    from lossdoctor.inputs.batch import validate_batch
    from lossdoctor.inputs.checkpoint import heads_from_state_dict
    from lossdoctor.vocab import Precision

    d = make_case(seed)
    sd = F.state_dict(channels=16, classes=3, seed=seed, std=0.05)
    with torch.autocast("cpu", dtype=dtype):
        props, rpn_losses, roi_losses = tv_losses(d, sd)
    d["proposals"] = props
    batch = validate_batch(d)
    want = {"rpn_cls": rpn_losses["loss_objectness"],
            "rpn_box": rpn_losses["loss_rpn_box_reg"],
            "roi_cls": roi_losses["loss_classifier"],
            "roi_box": roi_losses["loss_box_reg"]}  # fmt: skip
    precision = Precision.FP16 if dtype is torch.float16 else Precision.BF16
    gaps = {}
    for p in (precision, Precision.FP32):
        heads = dataclasses.replace(heads_from_state_dict(sd), precision=p)
        r = replay(heads, batch, preset("torchvision"), [builtin("torchvision")], sample_all=True)
        t = r.losses["torchvision"].terms
        gaps[p] = {k: abs(t[k].item() - v.item()) / abs(v.item()) for k, v in want.items()}
    assert max(gaps[precision].values()) <= AUTOCAST_REL, gaps
    # the low precision is what torchvision computed: fp32 is further from it on some term
    assert max(gaps[Precision.FP32].values()) > 10 * max(gaps[precision].values()), gaps
