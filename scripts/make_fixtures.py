"""Regenerate fixtures/ bit for bit: python scripts/make_fixtures.py [--only-faults]

- fixtures/toy.toml: the toy detector's config (every dump records it too, as meta["config"],
  with the profile its run trained with: each fixture replays as shipped, with no flag)
- fixtures/healthy: the toy detector trained 300 steps under `fixed` (seed 0), and a held-out
  batch: the first held-out draw (seeds 777, 778, ...) in which every FPN level has a positive
  anchor
- fixtures/first-nan and fixtures/collapse: the `legacy` run (seed 0) in a loop without a NaN check,
  as written by the capture hook during training: first-nan is its first non-finite loss (step 0),
  collapse the first step whose gradient norm exceeded 1000, a few steps before its weights
  turned NaN and its held-out detections dropped to 0
- fixtures/amp-nan: the toy detector trained under `fixed` (seed 0) with CPU mixed precision
  (float16 autocast, GradScaler) at lr 0.2 without warmup: the capture hook's first non-finite
  loss, which the box head's float16 overflow makes (an fp32 replay of it is finite)
- fixtures/retinanet-nan: a tiny RetinaNet (torchvision's key names) trained with each level's
  terms divided by that level's own positives (`legacy`, seed 7): the capture hook's first
  non-finite loss, at the first batch with no positive anchor on P5
- fixtures/faults/*: the healthy batch with one fault each (image without GT, zero-width GT box,
  1-based labels, NaN in one level's features), on its first two images, each a capture
  directory whose checkpoint.pt links to fixtures/healthy/checkpoint.pt

Runs single-threaded so the float reductions, and so the files, are the same on every machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import dataclasses  # noqa: E402

from lossdoctor.capture import Capture  # noqa: E402
from lossdoctor.inputs.batch import Batch, dump_batch, load_batch  # noqa: E402
from lossdoctor.inputs.dataclass_toml import dumps_toml  # noqa: E402
from lossdoctor.inputs.dense import LEGACY  # noqa: E402
from lossdoctor.inputs.files import save_torch  # noqa: E402
from lossdoctor.inputs.profiles import fixed, legacy  # noqa: E402
from lossdoctor.replay.engine import replay  # noqa: E402
from lossdoctor.toy.data import batches  # noqa: E402
from lossdoctor.toy.dense import TinyRetinaNet, dense_loss, toy_dense_table  # noqa: E402
from lossdoctor.toy.model import (  # noqa: E402
    STRIDES,
    TinyDetector,
    live_heads,
    toy_config,
    toy_config_table,
)
from lossdoctor.toy.train import make_batch, train  # noqa: E402
from lossdoctor.vocab import Precision  # noqa: E402

CHECKPOINT = "checkpoint.pt"
HEALTHY_STEPS = 300
COLLAPSE_STEPS = 400
EXPLOSION_NORM = 1000.0
HELD_OUT_FIRST_SEED = 777
HELD_OUT_IMAGES = 4


def write_config(out: Path) -> None:
    out.write_text(
        "# The toy detector of scripts/make_fixtures.py: torchvision rules, anchors 8-128 px.\n"
        + dumps_toml(toy_config_table())
    )


def save_dump(path: Path, batch: Batch, meta: dict) -> None:
    dump_batch(
        path,
        features={k: v.detach() for k, v in batch.features.items()},
        image_sizes=batch.image_sizes,
        gt_boxes=batch.gt_boxes,
        gt_labels=batch.gt_labels,
        strides=batch.strides,
        pad_size=batch.pad_size,
        meta=meta,
    )


def healthy(out: Path) -> None:
    model, hist = train(fixed(), HEALTHY_STEPS, 0, eval_every=HEALTHY_STEPS, log=print)
    model.eval()
    from lossdoctor.toy.model import live_heads

    for seed in range(HELD_OUT_FIRST_SEED, HELD_OUT_FIRST_SEED + 500):
        images, sizes, boxes, labels = next(batches(seed, HELD_OUT_IMAGES))
        with torch.no_grad():
            b = make_batch(model, images, sizes, boxes, labels)
        r = replay(live_heads(model), b, toy_config(), [fixed()])
        if all(s.pos > 0 for s in r.rpn.samples):
            break
    out.mkdir(parents=True, exist_ok=True)
    save_torch({k: v.detach() for k, v in model.state_dict().items()}, out / "checkpoint.pt")
    save_dump(
        out / "batch.pt",
        b,
        {
            "source": f"toy detector, fixed profile, {HEALTHY_STEPS} steps, seed 0",
            "held_out_seed": seed,
            "sample_seed": 0,
            "profile": fixed().name,
            "config": toy_config_table(),
        },
    )
    print(f"healthy: held-out seed {seed}; held-out recall {hist.detections[-1][2]:.2f}")


def collapse(root: Path, scratch: Path) -> None:
    _, hist = train(
        legacy(),
        COLLAPSE_STEPS,
        0,
        stop_on_nonfinite=False,
        capture_dir=scratch,
        capture_norm=EXPLOSION_NORM,
        log=print,
    )
    reasons = {p: load_batch(p / "batch.pt").meta["reason"] for p in hist.captured}
    first = next((p for p, why in reasons.items() if why.startswith("non-finite loss")), None)
    blowup = next(
        (p for p, why in reasons.items() if "gradient norm" in why or "non-finite gradient" in why),
        None,
    )
    for name, folder in (("first-nan", first), ("collapse", blowup)):
        if folder is None:
            print(f"{name}: the legacy run never triggered it; not written")
            continue
        (root / name).mkdir(parents=True, exist_ok=True)
        for f in ("checkpoint.pt", "batch.pt"):
            shutil.copyfile(folder / f, root / name / f)
        print(f"{name}: {folder.name}: {reasons[folder]}")
    print(
        f"legacy run: held-out detections {hist.detections[-1][1]}, "
        f"recall {hist.detections[-1][2]:.2f} after {COLLAPSE_STEPS} steps"
    )


AMP_STEPS = 200
AMP_LR = 0.2
AMP_BATCH = 4


def keep(capture: Path, fixture: Path) -> None:
    """A capture directory's two files, copied to a fixture folder."""
    fixture.mkdir(parents=True, exist_ok=True)
    for f in ("checkpoint.pt", "batch.pt"):
        shutil.copyfile(capture / f, fixture / f)
    print(f"{fixture.name}: {capture.name}: {load_batch(capture / 'batch.pt').meta['reason']}")


def amp_nan(root: Path, scratch: Path) -> None:
    """A mixed-precision loop as a user writes it: the backbone under float16 autocast, the
    heads in float16 (lossdoctor's replay as the loss, as the toy's training does), a
    GradScaler, SGD at lr 0.2 without warmup, and the capture hook's first non-finite loss."""
    torch.manual_seed(0)
    model = TinyDetector()
    opt = torch.optim.SGD(model.parameters(), lr=AMP_LR, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    capture = Capture(scratch, model, optimizer=opt, scaler=scaler, max_captures=1)
    stream, profile = batches(0, AMP_BATCH), fixed()
    for step in range(AMP_STEPS):
        images, sizes, boxes, labels = next(stream)
        with torch.autocast("cpu", dtype=torch.float16):
            b = make_batch(model, images, sizes, boxes, labels)
        features = dict(b.features)
        b.features = {k: v.float() for k, v in features.items()}
        heads = dataclasses.replace(live_heads(model), precision=Precision.FP16)
        loss = replay(heads, b, toy_config(), [profile], seed=step).losses[profile.name].total
        opt.zero_grad()
        scaler.scale(loss).backward()
        meta = {"sample_seed": step, "profile": profile.name, "config": toy_config_table()}
        folder = capture.check(step, loss, features=features, image_sizes=sizes, gt_boxes=boxes,
                               gt_labels=labels, strides=list(STRIDES), meta=meta)  # fmt: skip
        if folder is not None:
            return keep(folder, root / "amp-nan")
        scaler.step(opt)
        scaler.update()
    print("amp-nan: the mixed-precision run never broke; not written")


DENSE_SEED, DENSE_BATCH, DENSE_STEPS, DENSE_LR, DENSE_WARMUP = 7, 8, 200, 0.01, 50


def retinanet_nan(root: Path, scratch: Path) -> None:
    """The tiny RetinaNet trained as naive code does it: each level's focal and box sums divided
    by that level's own positives (profile legacy). It trains until a batch without a positive
    on one level, whose 0/0 (and x/0) the capture hook catches."""
    torch.manual_seed(0)
    model = TinyRetinaNet()
    opt = torch.optim.SGD(model.parameters(), lr=DENSE_LR, momentum=0.9, weight_decay=1e-4)
    capture = Capture(scratch, model, optimizer=opt, max_captures=1)
    stream = batches(DENSE_SEED, DENSE_BATCH)
    meta = {"train_seed": DENSE_SEED, "dense": {"config": toy_dense_table(), "profile": "legacy"}}
    for step in range(DENSE_STEPS):
        for g in opt.param_groups:
            g["lr"] = DENSE_LR * min(1.0, (step + 1) / DENSE_WARMUP)
        images, sizes, boxes, labels = data = next(stream)
        loss, b = dense_loss(model, data, LEGACY)
        opt.zero_grad()
        loss.backward()
        folder = capture.check(step, loss, features=b.features, image_sizes=sizes,
                               gt_boxes=boxes, gt_labels=labels, strides=b.strides,
                               meta=meta)  # fmt: skip
        if folder is not None:
            return keep(folder, root / "retinanet-nan")
        opt.step()
    print("retinanet-nan: the run never broke; not written")


def faults(healthy_batch: Path, out: Path) -> None:
    """One fault each, derived from the healthy batch (deterministic, no training)."""
    base = load_batch(healthy_batch)

    def derive(name: str, edit) -> None:
        b = load_batch(healthy_batch)
        # the first two images are all a fault needs; keeps the files small
        b.features = {k: v[:2].clone() for k, v in b.features.items()}
        b.image_sizes, b.gt_boxes, b.gt_labels = b.image_sizes[:2], b.gt_boxes[:2], b.gt_labels[:2]
        edit(b)
        save_dump(out / name / "batch.pt", b, {**base.meta, "fault": name})
        link = out / name / CHECKPOINT
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..", "..", "healthy", CHECKPOINT))

    def no_gt(b):
        b.gt_boxes[1] = torch.zeros(0, 4)
        b.gt_labels[1] = torch.zeros(0, dtype=torch.long)

    def zero_width(b):
        box = b.gt_boxes[0][0]
        box[2] = box[0]

    def one_based(b):
        b.gt_labels[:] = [lab + 1 for lab in b.gt_labels]

    def nan_features(b):
        b.features["p4"][1, :, 2:4, 2:4] = float("nan")

    derive("no-gt-image", no_gt)
    derive("zero-width-box", zero_width)
    derive("one-based-labels", one_based)
    derive("nan-features-p4", nan_features)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "fixtures"))
    ap.add_argument(
        "--only-faults",
        action="store_true",
        help="re-derive fixtures/faults from the healthy batch only",
    )
    ap.add_argument("--only-amp", action="store_true", help="write fixtures/amp-nan only")
    ap.add_argument("--only-dense", action="store_true", help="write fixtures/retinanet-nan only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / ".capture"
    if args.only_amp or args.only_dense:
        (amp_nan if args.only_amp else retinanet_nan)(out, scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        return
    if not args.only_faults:
        write_config(out / "toy.toml")
        healthy(out / "healthy")
        collapse(out, scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        amp_nan(out, scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        retinanet_nan(out, scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    faults(out / "healthy" / "batch.pt", out / "faults")


if __name__ == "__main__":
    main()
