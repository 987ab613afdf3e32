"""Catch the batch that broke a training run: a hook for plain PyTorch training loops.

    capture = lossdoctor.Capture("lossdoctor-dumps", model)
    for step, (images, targets) in enumerate(loader):
        feats = model.backbone(images)                     # the FPN outputs that feed the heads
        loss = compute_loss(model, feats, targets)
        loss.backward()
        capture.check(step, loss, features=feats, image_sizes=sizes, gt_boxes=boxes, gt_labels=labels)
        optimizer.step(); optimizer.zero_grad()

At the first step whose loss or any gradient is non-finite (and, with ``every=N``, every N steps)
it writes ``DIR/step_000123/batch.pt`` and ``checkpoint.pt`` (the weights that produced this loss:
call it before ``optimizer.step()``), atomically, and prints the ``lossdoctor inspect`` command.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from .inputs.batch import dump_batch
from .inputs.files import save_torch


class Capture:
    """Writes a checkpoint + batch dump when training goes non-finite (once), or every ``every`` steps."""

    def __init__(self, directory: str | Path, model: torch.nn.Module, *, every: int | None = None,
                 once: bool = True, extra_args: str = "", stream=None):
        self.directory = Path(directory)
        self.model = model
        self.every = every
        self.once = once
        self.extra_args = extra_args
        self.stream = stream if stream is not None else sys.stderr
        self.written: list[Path] = []
        self._caught_nonfinite = False

    def nonfinite_reason(self, loss) -> str | None:
        """Why this step is non-finite (loss or the first parameter whose gradient is), or None."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            return f"non-finite loss ({value})"
        for name, p in self.model.named_parameters():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return f"non-finite gradient in {name}"
        return None

    def check(self, step: int, loss, *, features, image_sizes, gt_boxes, gt_labels, meta: dict | None = None, **batch) -> Path | None:
        """Call once per step, after ``backward()`` and before ``optimizer.step()``. Returns the dump folder if one was written."""
        reason = self.nonfinite_reason(loss)
        if reason is not None and self.once and self._caught_nonfinite:
            reason = None
        periodic = self.every is not None and step % self.every == 0
        if reason is None and not periodic:
            return None
        if reason is not None:
            self._caught_nonfinite = True
        folder = self.directory / f"step_{step:06d}"
        info = {"step": step, "reason": reason or f"every {self.every} steps", **(meta or {})}
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        info["loss"] = value if math.isfinite(value) else str(value)
        dump_batch(folder / "batch.pt", features={k: v.detach() for k, v in features.items()}, image_sizes=image_sizes,
                   gt_boxes=gt_boxes, gt_labels=gt_labels, meta=info, **batch)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        save_torch(state, folder / "checkpoint.pt")
        self.written.append(folder)
        cmd = f"lossdoctor inspect {folder / 'checkpoint.pt'} {folder / 'batch.pt'}{' ' + self.extra_args if self.extra_args else ''}"
        print(f"lossdoctor: {info['reason']} at step {step}; wrote {folder}\n  inspect it with: {cmd}", file=self.stream)
        return folder
