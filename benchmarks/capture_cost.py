"""What a capture costs in a torchvision training loop (needs torchvision): the seconds and MB of
a capture with the whole checkpoint and with the heads only, and the per-step overhead of
checking and of ``keep_previous``, as ratios to one training step measured in the same run.

    python benchmarks/capture_cost.py [--size 800] [--steps 3]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import torch


def _step(model, opt, images, targets, capture=None, k=0):
    loss_dict = model(images, targets)
    opt.zero_grad()
    sum(loss_dict.values()).backward()
    t = time.perf_counter()
    folder = capture.check(k, loss_dict) if capture is not None else None
    checked = time.perf_counter() - t
    opt.step()
    return folder, checked


def _mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from lossdoctor.adapters import torchvision as ld

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91,
                                    min_size=args.size, max_size=args.size).train()  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    images = [torch.rand(3, args.size, args.size) for _ in range(2)]
    boxes = torch.tensor([[10.0, 20.0, 200.0, 220.0], [300.0, 300.0, 500.0, 450.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2])} for _ in images]
    _step(model, opt, images, targets)  # warm-up
    t = time.perf_counter()
    for _ in range(args.steps):
        _step(model, opt, images, targets)
    step = (time.perf_counter() - t) / args.steps
    print(f"one training step (2 images, {args.size}x{args.size}): {step:.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        for weights in ("whole-model", "heads"):
            cap = ld.Capture(Path(tmp) / weights, model, every=1, weights=weights,
                             stream=io.StringIO())  # fmt: skip
            folder, took = _step(model, opt, images, targets, cap)
            print(f"capture, weights={weights}: {took / step:.2f}x a step, {_mb(folder):.0f} MB")
            cap.remove()
        for keep in (False, True):
            cap = ld.Capture(Path(tmp) / f"keep{keep}", model, keep_previous=keep,
                             stream=io.StringIO())  # fmt: skip
            took = sum(_step(model, opt, images, targets, cap, k)[1] for k in range(args.steps))
            held = sum(
                v.numel() * v.element_size() for v in (cap.held.heads if cap.held else {}).values()
            )
            kept = f", {held / 2**20:.0f} MB of heads' weights held" if keep else ""
            ratio = took / args.steps / step
            print(f"check per step, keep_previous={keep}: {ratio:.3f}x a step{kept}")
            cap.remove()


if __name__ == "__main__":
    main()
