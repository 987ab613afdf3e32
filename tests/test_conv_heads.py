"""Heads built of conv blocks (torchvision's v2 models, MMDetection's and Detectron2's GN heads):
the replay's forward against the same layers built from torch.nn, weight standardization by hand,
and the checks a config must pass for them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import factories as F
from lossdoctor.inputs.checkpoint import check_fit, heads_from_state_dict
from lossdoctor.inputs.config import HeadNormConfig, preset
from lossdoctor.inputs.errors import InputError
from lossdoctor.replay.heads import box_hidden, rpn_hidden, standardized
from lossdoctor.replay.mask import mask_head


def _sequential_box_head(sd: dict, convs: int, fcs: int, norm: str, groups: int) -> nn.Sequential:
    """torchvision's FastRCNNConvFCHead from torch.nn modules, loaded with ``sd``'s weights."""
    blocks = []
    for _ in range(convs):
        n = nn.BatchNorm2d(8) if norm == "bn" else nn.GroupNorm(groups, 8)
        blocks.append(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), n, nn.ReLU()))
    blocks.append(nn.Flatten())
    width = 8 * 7 * 7
    for _ in range(fcs):
        blocks += [nn.Linear(width, 32), nn.ReLU()]
        width = 32
    head = nn.Sequential(*blocks)
    own = {k[len("roi_heads.box_head.") :]: v for k, v in sd.items() if ".box_head." in k}
    head.load_state_dict(own, strict=False)
    return head


@pytest.mark.parametrize("norm,fcs", [("bn", 1), ("gn", 1), ("bn", 2)])
def test_box_head_is_the_torch_modules_forward(norm, fcs):
    sd = F.v2_state_dict(norm=norm, fcs=fcs)
    heads = heads_from_state_dict(sd)
    cfg = HeadNormConfig(groups=4)
    module = _sequential_box_head(sd, 4, fcs, norm, 4)
    pooled = torch.randn(6, 8, 7, 7, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    module.eval()  # BatchNorm by its running statistics: the test-mode (symptom) forward
    frozen = module(pooled)
    assert torch.allclose(box_hidden(pooled, heads, cfg, train=False)[1], frozen, atol=1e-6)
    module.train()  # (this forward moves the module's running statistics: last)
    want = module(pooled)
    assert torch.allclose(box_hidden(pooled, heads, cfg)[1], want, atol=1e-6)
    if norm == "bn":  # the two modes differ: the batch's statistics are not the running ones
        assert not torch.allclose(want, frozen, atol=1e-3)


def test_frozen_batch_norm_uses_its_running_statistics():
    sd = F.v2_state_dict(norm="bn")
    heads = heads_from_state_dict(sd)
    pooled = torch.randn(5, 8, 7, 7, generator=torch.Generator().manual_seed(4))
    frozen = box_hidden(pooled, heads, HeadNormConfig(batch_stats=False))[1]
    assert torch.allclose(frozen, box_hidden(pooled, heads, HeadNormConfig(), train=False)[1])


def test_two_rpn_convs_each_with_relu():
    sd = F.v2_state_dict()
    heads = heads_from_state_dict(sd)
    x = torch.randn(2, 8, 9, 11, generator=torch.Generator().manual_seed(5))
    h = x
    for i in (0, 1):
        w, b = sd[f"rpn.head.conv.{i}.0.weight"], sd[f"rpn.head.conv.{i}.0.bias"]
        h = torch.relu(nn.functional.conv2d(h, w, b, padding=1))
    assert torch.allclose(rpn_hidden(x, heads), h, atol=1e-6)


def test_mask_head_blocks_with_batch_norm():
    sd = F.v2_state_dict(mask=True)
    heads = heads_from_state_dict(sd)
    pooled = torch.randn(3, 8, 14, 14, generator=torch.Generator().manual_seed(6))
    x = pooled
    for i in range(4):
        p = f"roi_heads.mask_head.{i}"
        x = nn.functional.conv2d(x, sd[f"{p}.0.weight"], None, padding=1)
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        x = (x - mean[:, None, None]) / (var[:, None, None] + 1e-5).sqrt()
        x = torch.relu(x * sd[f"{p}.1.weight"][:, None, None] + sd[f"{p}.1.bias"][:, None, None])
    hidden, _ = mask_head(pooled, heads, HeadNormConfig())
    assert torch.allclose(hidden[3], x, atol=1e-5)


def test_weight_standardization_by_hand():
    """Each output channel: (w - mean) / (unbiased std + eps). Channel 0: 1, 2, 3, 6 → mean 3,
    unbiased std sqrt((4 + 1 + 0 + 9) / 3); channel 1 constant 2 → std 0: (w - 2) / eps = 0."""
    w = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])
    std = (14 / 3) ** 0.5
    want0 = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-5)
    got = standardized(w, 1e-5)
    assert torch.allclose(got[0].flatten(), want0) and torch.equal(got[1], torch.zeros(1, 2, 2))


def test_group_norm_groups_must_divide_the_channels():
    heads = heads_from_state_dict(F.v2_state_dict(norm="gn"))
    cfg = dataclasses.replace(preset("torchvision"), head_norm=HeadNormConfig(groups=3))
    with pytest.raises(InputError, match=r"groups 3 does not divide the 8 channels of 'roi_heads"):
        check_fit(heads, F.batch(), cfg)
    check_fit(heads, F.batch(), dataclasses.replace(cfg, head_norm=HeadNormConfig(groups=4)))


def test_a_bias_may_be_missing_only_where_a_norm_follows():
    sd = F.v2_state_dict()
    del sd["rpn.head.conv.1.0.bias"]
    with pytest.raises(InputError, match="'rpn.head.conv.1.0.bias' is missing"):
        heads_from_state_dict(sd)
    sd = F.v2_state_dict(norm="none")
    del sd["roi_heads.box_head.2.0.bias"]
    with pytest.raises(InputError, match="'roi_heads.box_head.2.0.bias' is missing"):
        heads_from_state_dict(sd)


def _bottleneck_reference(sd: dict, prefix: str, x: torch.Tensor, first: bool, in_1x1: bool):
    """One res5 block from torch.nn modules (Detectron2's keys), BatchNorms in eval mode."""

    def conv_bn(name, x, **kw):
        w = sd[f"{prefix}.{name}.weight"]
        conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], bias=False, **kw)
        bn = nn.BatchNorm2d(w.shape[0]).eval()
        conv.weight.data = w
        for k in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, k).data = sd[f"{prefix}.{name}.norm.{k}"]
        return bn(conv(x))

    s = 2 if first else 1
    out = torch.relu(conv_bn("conv1", x, stride=s if in_1x1 else 1))
    out = torch.relu(conv_bn("conv2", out, stride=1 if in_1x1 else s, padding=1))
    out = conv_bn("conv3", out)
    return torch.relu(out + (conv_bn("shortcut", x, stride=2) if first else x))


@pytest.mark.parametrize("in_1x1", [True, False])
def test_res5_head_is_the_torch_modules_forward(in_1x1):
    """A C4 model's box head: res5's three blocks with frozen BatchNorms, then the mean over
    the 7 x 7 output, in training mode too (frozen)."""
    from lossdoctor.inputs.config import Res5Config

    sd = F.c4_state_dict()
    heads = heads_from_state_dict(sd)
    pooled = torch.randn(5, 8, 14, 14, generator=torch.Generator().manual_seed(7))
    x = pooled
    for b in range(3):
        x = _bottleneck_reference(sd, f"roi_heads.res5.{b}", x, b == 0, in_1x1)
    assert x.shape[-2:] == (7, 7)
    res5 = Res5Config(stride_in_1x1=in_1x1)
    h1, got = box_hidden(pooled, heads, HeadNormConfig(), res5=res5)
    assert torch.equal(h1, got) and torch.allclose(got, x.mean((2, 3)), atol=1e-5)


def test_a_c4_mask_head_is_named_not_replayed():
    """A C4 model's mask head runs on res5's output, not on pooled features: left out by name."""
    sd = F.c4_state_dict()
    sd["roi_heads.mask_head.deconv.weight"] = torch.zeros(16, 8, 2, 2)
    sd["roi_heads.mask_head.deconv.bias"] = torch.zeros(8)
    sd["roi_heads.mask_head.predictor.weight"] = torch.zeros(3, 8, 1, 1)
    sd["roi_heads.mask_head.predictor.bias"] = torch.zeros(3)
    heads = heads_from_state_dict(sd)
    assert not heads.has_mask
    assert heads.unreplayed == ["roi_heads.mask_head (a mask head on res5's features: C4)"]


def _conv_bn(sd: dict, conv: str, bn: str, x: torch.Tensor, **kw) -> torch.Tensor:
    """A bias-free conv and a BatchNorm in training mode, from torch.nn modules."""
    w = sd[f"{conv}.weight"]
    module = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], bias=False, **kw)
    norm = nn.BatchNorm2d(w.shape[0]).train()
    module.weight.data = w
    norm.weight.data, norm.bias.data = sd[f"{bn}.weight"], sd[f"{bn}.bias"]
    return norm(module(x))


def test_double_head_is_the_torch_modules_forward():
    """MMDetection's DoubleConvFCBBoxHead: fcs on the RoIs classify; the regression branch, on
    the RoIs scaled by 1.3 about their centres, is a residual block (3x3 + 1x1, a 1x1 identity
    projection), the bottlenecks, then the average over the RoI."""
    import dataclasses

    from lossdoctor.replay.boxes import scaled_about_centre
    from lossdoctor.replay.heads import box_head

    sd = F.double_head_state_dict()
    heads = heads_from_state_dict(sd)
    g = torch.Generator().manual_seed(8)
    pooled, pooled_reg = torch.randn(6, 8, 7, 7, generator=g), torch.randn(6, 8, 7, 7, generator=g)
    b = "roi_head.bbox_head"
    r = f"{b}.res_block"
    out = torch.relu(_conv_bn(sd, f"{r}.conv1.conv", f"{r}.conv1.bn", pooled_reg, padding=1))
    out = _conv_bn(sd, f"{r}.conv2.conv", f"{r}.conv2.bn", out)
    x = torch.relu(
        out + _conv_bn(sd, f"{r}.conv_identity.conv", f"{r}.conv_identity.bn", pooled_reg)
    )
    for k in range(2):
        p = f"{b}.conv_branch.{k}"
        y = torch.relu(_conv_bn(sd, f"{p}.conv1", f"{p}.bn1", x))
        y = torch.relu(_conv_bn(sd, f"{p}.conv2", f"{p}.bn2", y, padding=1))
        x = torch.relu(_conv_bn(sd, f"{p}.conv3", f"{p}.bn3", y) + x)
    want_reg = nn.functional.linear(
        x.mean((2, 3)), sd[f"{b}.fc_reg.weight"], sd[f"{b}.fc_reg.bias"]
    )
    h = pooled.flatten(1)
    for j in (0, 1):
        h = torch.relu(
            nn.functional.linear(h, sd[f"{b}.fc_branch.{j}.weight"], sd[f"{b}.fc_branch.{j}.bias"])
        )
    want_cls = nn.functional.linear(h, sd[f"{b}.fc_cls.weight"], sd[f"{b}.fc_cls.bias"])
    got = box_head(pooled, pooled_reg, heads, preset("mmdet"))
    assert torch.allclose(got.cls, want_cls, atol=1e-5)
    assert torch.allclose(got.deltas.flatten(1), want_reg, atol=1e-5)
    # RoIs scaled about their centres: (10, 20)-(30, 60) by 1.3 → (7, 14)-(33, 66)
    assert scaled_about_centre(torch.tensor([[10.0, 20.0, 30.0, 60.0]]), 1.3).tolist() == [
        pytest.approx([7.0, 14.0, 33.0, 66.0])
    ]
    assert dataclasses.replace(preset("mmdet")).roi_pool.reg_scale == 1.3
