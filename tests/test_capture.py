"""The capture hook in a real training loop that is made to go NaN."""

from __future__ import annotations

import io
import math

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
