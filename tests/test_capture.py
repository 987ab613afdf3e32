"""The capture hook in a real training loop that is made to go NaN."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from lossdoctor import Capture, run_replay
from lossdoctor.inputs.batch import load_batch
from lossdoctor.inputs.profiles import fixed
from lossdoctor.replay.engine import replay
from lossdoctor.toy.data import batches
from lossdoctor.toy.model import STRIDES, TinyDetector, live_heads, toy_config
from lossdoctor.toy.train import make_batch

POISON_STEP = 3


def test_capture_writes_each_nonfinite_step_within_its_budget_and_it_replays(tmp_path):
    torch.manual_seed(0)
    model = TinyDetector()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    log = io.StringIO()
    capture = Capture(tmp_path / "dumps", model, stream=log, max_captures=2, optimizer=opt)
    stream = batches(0, 2)
    losses = []
    for step in range(POISON_STEP + 3):
        images, sizes, boxes, labels = next(stream)
        if step == POISON_STEP:
            images[1, :, 40, 40] = float(
                "nan"
            )  # a corrupt pixel: GroupNorm spreads it over the image
        b = make_batch(model, images, sizes, boxes, labels)
        r = replay(live_heads(model), b, toy_config(), [fixed()], seed=step)
        loss = r.losses["fixed"].total
        opt.zero_grad()
        loss.backward()
        capture.check(
            step,
            loss,
            features=b.features,
            image_sizes=sizes,
            gt_boxes=boxes,
            gt_labels=labels,
            strides=list(STRIDES),
            meta={"sample_seed": step},
        )
        losses.append({k: v.item() for k, v in r.losses["fixed"].terms.items()})
        opt.step()  # NaN weights from here on: every later step is non-finite too
    bad_steps = [i for i, t in enumerate(losses) if not all(math.isfinite(v) for v in t.values())]
    assert bad_steps[0] == POISON_STEP and len(bad_steps) > 1
    # every non-finite step is written until the budget of 2 is spent
    want = [f"step_{POISON_STEP:06d}", f"step_{POISON_STEP + 1:06d}"]
    assert [p.name for p in capture.written] == want
    assert sorted(p.name for p in (tmp_path / "dumps").iterdir()) == want
    folder = capture.written[0]
    assert f"lossdoctor inspect {folder}\n" in log.getvalue()
    dumped = load_batch(folder / "batch.pt")
    assert dumped.meta["step"] == POISON_STEP and dumped.meta["reason"].startswith(
        "non-finite loss"
    )
    trigger = dumped.meta["trigger"]
    assert trigger["kind"] == "loss-not-finite" and trigger["value"] == "nan"
    # the run's facts, from the optimizer given once
    assert dumped.meta["lr"] == 0.01 and dumped.meta["optimizer"] == "SGD"
    # the dump replays to the same losses: the same terms non-finite, the finite ones equal
    again = run_replay(
        folder / "checkpoint.pt",
        folder / "batch.pt",
        config=toy_config(),
        profiles=["fixed"],
        seed=dumped.meta["sample_seed"],
    )
    got = {k: v.item() for k, v in again.losses["fixed"].terms.items()}
    want = losses[POISON_STEP]
    for k in want:
        assert math.isfinite(got[k]) == math.isfinite(want[k]), k
        if math.isfinite(want[k]):
            assert got[k] == want[k] or abs(got[k] - want[k]) <= 1e-6 * abs(want[k]), k


def test_capture_every_n_steps(tmp_path):
    model = TinyDetector()
    cap = Capture(tmp_path, model, every=2, stream=io.StringIO())
    images, sizes, boxes, labels = next(batches(1, 2))
    feats = {k: v.detach() for k, v in model.features(images).items()}
    for step in range(5):
        cap.check(
            step,
            torch.tensor(1.0),
            features=feats,
            image_sizes=sizes,
            gt_boxes=boxes,
            gt_labels=labels,
            strides=list(STRIDES),
        )
    assert [p.name for p in cap.written] == ["step_000000", "step_000002", "step_000004"]


def test_capture_catches_a_gradient_explosion_before_it_is_nan(tmp_path):
    torch.manual_seed(0)
    model = TinyDetector()
    cap = Capture(tmp_path, model, grad_norm_above=1e3, stream=io.StringIO())
    stream = batches(2, 2)
    norms = []
    for step in range(4):
        images, sizes, boxes, labels = next(stream)
        b = make_batch(model, images, sizes, boxes, labels)
        loss = (
            replay(live_heads(model), b, toy_config(), [fixed()], seed=step).losses["fixed"].total
        )
        model.zero_grad()
        (loss * (1e6 if step == 2 else 1.0)).backward()  # a blow-up at step 2, finite all along
        norms.append(
            sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None).sqrt().item()
        )
        cap.check(
            step,
            loss,
            features=b.features,
            image_sizes=sizes,
            gt_boxes=boxes,
            gt_labels=labels,
            strides=list(STRIDES),
        )
    assert norms[2] > 1e3 > max(norms[:2] + norms[3:])
    assert [p.name for p in cap.written] == ["step_000002"]
    assert load_batch(cap.written[0] / "batch.pt").meta["reason"].startswith("gradient norm")


def _one_step(model, seed=3):
    images, sizes, boxes, labels = next(batches(seed, 2))
    b = make_batch(model, images, sizes, boxes, labels)
    loss = replay(live_heads(model), b, toy_config(), [fixed()], seed=0).losses["fixed"].total
    model.zero_grad()
    loss.backward()
    batch = dict(features=b.features, image_sizes=sizes, gt_boxes=boxes, gt_labels=labels,
                 strides=list(STRIDES))  # fmt: skip
    return loss, batch


def test_a_capture_that_fails_is_one_warning_and_the_loop_goes_on(tmp_path):
    """A batch the capture cannot write (no features): one RuntimeWarning, no exception, and no
    further capture is attempted."""
    model = TinyDetector()
    cap = Capture(tmp_path, model, every=1, stream=io.StringIO())
    loss, batch = _one_step(model)
    del batch["features"]
    with pytest.warns(RuntimeWarning, match="lossdoctor: capturing stopped at step 0"):
        assert cap.check(0, loss, **batch) is None
    loss, batch = _one_step(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cap.check(1, loss, **batch) is None
    assert not list(tmp_path.iterdir())


def test_a_heads_only_capture_replays_as_the_whole_one(tmp_path):
    """weights="heads": the checkpoint holds the heads' tensors only, the rest is summarized in
    the meta, and the replay is the whole checkpoint's to the bit."""
    model = TinyDetector()
    loss, batch = _one_step(model)
    light = Capture(tmp_path / "heads", model, every=1, weights="heads", stream=io.StringIO())
    whole = Capture(tmp_path / "whole", model, every=1, stream=io.StringIO())
    folders = [c.check(0, loss, **batch) for c in (light, whole)]
    saved = torch.load(folders[0] / "checkpoint.pt", weights_only=True)
    heads = {k for k in model.state_dict() if k.startswith(light.heads)}
    assert set(saved) == heads and heads != set(model.state_dict())
    meta = load_batch(folders[0] / "batch.pt").meta
    assert meta["weights"]["saved"] == "heads" and meta["weights"]["nonfinite_elsewhere"] == {}
    assert set(meta["weights"]["norms"]) == {k.rsplit(".", 1)[0] for k in model.state_dict()
                                             if k not in heads}  # fmt: skip
    want = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    assert meta["grad_norm"]["model"] == pytest.approx(want, rel=1e-9)
    a, b = (run_replay(f, None, config=toy_config(), profiles=["fixed"]) for f in folders)
    assert a.losses["fixed"].total.item() == b.losses["fixed"].total.item()


def test_heads_only_without_a_known_layout_keeps_every_tensor(tmp_path):
    """A model of no layout lossdoctor knows: nothing says which tensors are heads, so the
    whole state_dict is written and no heads' norm is recorded."""
    model = TinyDetector()
    loss, batch = _one_step(model)
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))
    other(torch.ones(1, 2)).sum().backward()
    cap = Capture(tmp_path, other, every=1, weights="heads", stream=io.StringIO())
    folder = cap.check(0, loss, **batch)
    assert load_batch(folder / "batch.pt").meta["grad_norm"]["heads"] is None
    assert set(torch.load(folder / "checkpoint.pt", weights_only=True)) == {"0.weight", "0.bias"}
