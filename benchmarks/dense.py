"""Cost of ``inspect`` on a one-stage detector next to one training step of its dense head.

    python benchmarks/dense.py [--repeat 3] [--gt 20] [--kind retinanet|fcos]

A COCO-scale RetinaNet (or FCOS) head in torchvision's layout (4 convs per tower, 256 channels,
80 classes, 9 anchors; FCOS: GroupNorm, 1 point) on 2 images padded to 800 x 1216, P3-P7. Run
alternating in this one process:

- ``step``: one training step of the same head on the same features: torchvision's own
  ``RetinaNetHead``/``FCOSHead`` forward, ``compute_loss`` and ``backward()`` when torchvision
  is importable; without it, lossdoctor's replay of the run's own profile and one backward
  stands in (the script says which it ran).
- ``inspect``: the library's ``inspect`` (two profiles, gradients per level and per term, NaN
  trace, symptom, findings, the report) on the capture written to disk.

Prints the medians, their ratio, and where inspect spends its time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from common import timed_inspect  # noqa: E402

import factories as F  # noqa: E402

PAD = (800, 1216)
STRIDES = (8, 16, 32, 64, 128)
CHANNELS, CLASSES = 256, 80


def capture(folder: Path, kind: str, gt: int) -> tuple[dict, dict]:
    """A capture directory of the COCO-scale head and batch → (state_dict, batch dict)."""
    fcos = kind == "fcos"
    sd = F.dense_state_dict("torchvision", kind, channels=CHANNELS, classes=CLASSES,
                            anchors=1 if fcos else 9, convs=4, norm=fcos, std=0.01)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    h, w = PAD
    boxes = []
    for _ in range(2):
        xy = torch.rand(gt, 2, generator=g) * torch.tensor([w - 200.0, h - 200.0])
        wh = 16 + torch.rand(gt, 2, generator=g) * 180
        boxes.append(torch.cat([xy, xy + wh], 1))
    d = F.dense_batch_dict(n=2, channels=CHANNELS, size=PAD, boxes=boxes,
                           labels=[torch.randint(0, CLASSES, (gt,), generator=g)] * 2)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "checkpoint.pt")
    torch.save(d, folder / "batch.pt")
    return sd, d


def _tv_step(kind: str, sd: dict, d: dict):
    """torchvision's head: forward, compute_loss, backward (None without torchvision)."""
    try:
        from torchvision.models.detection import fcos, retinanet
        from torchvision.models.detection.image_list import ImageList
    except ImportError:
        return None
    if kind == "fcos":
        head = fcos.FCOSHead(CHANNELS, 1, CLASSES)
        gen = retinanet.AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * 5)
    else:
        head = retinanet.RetinaNetHead(CHANNELS, 9, CLASSES)
        gen = retinanet._default_anchorgen()
    head.load_state_dict({k.removeprefix("head."): v for k, v in sd.items()})
    feats = [f.requires_grad_(True) for f in d["features"].values()]
    images = ImageList(torch.zeros(2, 3, *PAD), [PAD] * 2)
    targets = [dict(boxes=b, labels=lab) for b, lab in zip(d["gt_boxes"], d["gt_labels"])]
    backbone = torch.nn.Identity()
    backbone.out_channels = CHANNELS
    model = (fcos.FCOS if kind == "fcos" else retinanet.RetinaNet)(
        backbone, CLASSES, anchor_generator=gen, head=head
    )

    def step():
        out = head(feats)
        anchors = gen(images, feats)
        if kind == "fcos":
            per_level = [f.shape[2] * f.shape[3] for f in feats]
            losses = model.compute_loss(targets, out, anchors, per_level)
        else:
            losses = model.compute_loss(targets, out, anchors)
        sum(losses.values()).backward()

    return step


def _own_step(folder: Path):
    """lossdoctor's replay of the run's own profile and one backward, as a stand-in."""
    from lossdoctor.dense import inspect_dense  # noqa: F401 (the same code inspect runs)
    from lossdoctor.inputs.batch import load_batch
    from lossdoctor.inputs.checkpoint import OneStageCheckpoint, load_checkpoint
    from lossdoctor.inputs.dense import dense_preset
    from lossdoctor.inputs.dense_weights import dense_weights
    from lossdoctor.replay.dense import dense_replay

    try:
        load_checkpoint(folder / "checkpoint.pt")
    except OneStageCheckpoint as e:
        w = dense_weights(e.state_dict, e.layout)
    b = load_batch(folder / "batch.pt")
    cfg = dense_preset("torchvision-fcos" if w.has_ctr else "torchvision-retinanet")

    def step():
        dense_replay(w, b, cfg, [cfg.profile]).losses[cfg.profile.name].total.backward()

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gt", type=int, default=20)
    ap.add_argument("--kind", choices=("retinanet", "fcos"), default="retinanet")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cap"
        sd, d = capture(folder, args.kind, args.gt)
        step = _tv_step(args.kind, sd, d)
        which = "torchvision's head" if step is not None else "lossdoctor's replay (no torchvision)"
        step = step or _own_step(folder)
        step()  # warm-up
        timed_inspect(folder)
        steps, runs, phases = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            step()
            steps.append(time.perf_counter() - t0)
            total, by_phase = timed_inspect(folder)
            runs.append(total)
            phases.append(by_phase)
    s, i = statistics.median(steps), statistics.median(runs)
    print(f"{args.kind}, 2 images {PAD[0]}x{PAD[1]}, P3-P7 x {CHANNELS}, {CLASSES} classes, "
          f"{args.gt} GT per image; medians of {args.repeat}")  # fmt: skip
    print(f"step ({which}): {s:.2f} s")
    print(f"inspect: {i:.2f} s ({i / s:.2f}x the step)")
    print("inspect by phase: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases[-1].items()))


if __name__ == "__main__":
    main()
