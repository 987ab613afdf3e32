"""The sparse backward of the RPN's 3x3 conv + ReLU gives autograd's gradients: the input
gradient's norm, the weight and bias gradients, at live locations on the border and inside, over
several images; and the diagnosis gives the same norms whichever path it takes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lossdoctor.diagnose import sparse_conv as sc


def autograd_conv(x, w, b, grad_hidden):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    hidden = F.relu(F.conv2d(x, w, b, padding=1))
    gx, gw, gb = torch.autograd.grad(hidden, [x, w, b], grad_hidden)
    return hidden.detach(), gx, gw, gb


def case(seed: int, live: list[tuple[int, int, int]], n=2, c=6, h=7, w=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight, bias = torch.randn(c, c, 3, 3, generator=g), torch.randn(c, generator=g)
    grad_hidden = torch.zeros(n, c, h, w)
    for i, y, xx in live:
        grad_hidden[i, :, y, xx] = torch.randn(c, generator=g)
    return x, weight, bias, grad_hidden


LIVE = {
    "corners": [(0, 0, 0), (0, 6, 8), (1, 0, 8), (1, 6, 0)],
    "overlapping": [(0, 3, 4), (0, 3, 5), (0, 4, 4), (1, 2, 2)],
    "one": [(1, 5, 1)],
    "none": [],
}


@pytest.mark.parametrize("name", list(LIVE))
def test_sparse_backward_is_autograds(name):
    x, weight, bias, grad_hidden = case(len(name), LIVE[name])
    hidden, gx, gw, gb = autograd_conv(x, weight, bias, grad_hidden)
    loc = torch.tensor(LIVE[name], dtype=torch.long).reshape(-1, 3)
    n, y, xx = loc.unbind(1)
    rows = sc.relu_backward(grad_hidden[n, :, y, xx], hidden[n, :, y, xx])
    got = sc.sparse_conv_grads(x, rows, weight, loc)
    assert got.feature == pytest.approx(float(gx.double().norm()), rel=1e-6, abs=1e-12)
    assert torch.allclose(got.weight, gw, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.bias, gb, rtol=1e-5, atol=1e-6)


def test_relu_passes_a_nan_output_on_as_autograd_does():
    hidden = torch.tensor([[[[float("nan"), 0.0, -1.0, 2.0]]]])
    grad = torch.ones_like(hidden)
    assert sc.relu_backward(grad, hidden).flatten().tolist() == [1.0, 0.0, 0.0, 1.0]


def test_dense_inputs_go_to_autograd():
    x = torch.zeros(2, 3, 10, 10)  # 200 locations: sparse up to DENSE_SHARE of them
    assert sc.worth_it(int(200 * sc.DENSE_SHARE), x)
    assert not sc.worth_it(int(200 * sc.DENSE_SHARE) + 1, x)


@pytest.mark.parametrize("sample_all", [False, True])
def test_diagnosis_is_the_same_either_way(monkeypatch, sample_all):
    """The toy healthy fixture's gradient norms three ways: every level sparse; every level split
    into the negatives' dense backward (shared by the profiles, scaled by each) and the
    positives' sparse one; every level by autograd."""
    import importlib

    from lossdoctor.api import resolve_inputs
    from lossdoctor.inputs.profiles import builtin
    from lossdoctor.replay.engine import replay

    G = importlib.import_module("lossdoctor.diagnose.gradients")
    rpn = importlib.import_module("lossdoctor.diagnose.gradients.rpn")
    files = ("fixtures/healthy/checkpoint.pt", "fixtures/healthy/batch.pt")
    heads, batch, cfg = resolve_inputs(*files, "fixtures/toy.toml", False)
    profiles = [builtin(p) for p in ("legacy", "fixed", "mmdet", "detectron2")]
    r = replay(heads, batch, cfg, profiles, sample_all=sample_all)
    monkeypatch.setattr(sc, "DENSE_SHARE", 1.0)
    sparse = G.gradients(r)
    monkeypatch.setattr(sc, "DENSE_SHARE", -1.0)
    split = G.gradients(r)
    monkeypatch.setattr(rpn, "_split_level", lambda *a: None)
    dense = G.gradients(r)
    for other in (sparse, split):
        _same(other, dense)


def _same(sparse, dense):
    for name in dense:
        for a, b in zip(sparse[name].levels, dense[name].levels):
            assert a.feature == pytest.approx(b.feature, rel=1e-5, abs=1e-12)
        for key, b in dense[name].params.items():
            assert sparse[name].params[key].total == pytest.approx(b.total, rel=1e-5, abs=1e-12)
