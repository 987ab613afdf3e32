"""Catch the batch that broke a training run: a hook for plain PyTorch training loops.

    capture = lossdoctor.Capture("lossdoctor-dumps", model)
    for step, (images, targets) in enumerate(loader):
        feats = model.backbone(images)                     # the FPN outputs that feed the heads
        loss = compute_loss(model, feats, targets)
        loss.backward()
        capture.check(step, loss, features=feats, image_sizes=sizes, gt_boxes=boxes,
                      gt_labels=labels)
        optimizer.step(); optimizer.zero_grad()

At the first step whose loss is non-finite, the first whose gradient is non-finite, the first whose
total gradient norm exceeds ``grad_norm_above`` (if set: catches an explosion before it turns into
NaN), and with ``every=N`` every N steps, it writes ``DIR/step_000123/batch.pt`` and
``checkpoint.pt`` (the weights that produced this loss: call it before ``optimizer.step()``),
atomically, and prints the ``lossdoctor inspect`` command.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from .inputs.batch import dump_batch
from .inputs.files import save_torch


class Capture:
    """Writes a checkpoint + batch dump when training goes wrong (once per kind of trouble), or
    every ``every`` steps."""

    def __init__(
        self,
        directory: str | Path,
        model: torch.nn.Module,
        *,
        every: int | None = None,
        once: bool = True,
        grad_norm_above: float | None = None,
        extra_args: str = "",
        stream=None,
    ):
        self.directory = Path(directory)
        self.model = model
        self.every = every
        self.once = once
        self.grad_norm_above = grad_norm_above
        self.extra_args = extra_args
        self.stream = stream if stream is not None else sys.stderr
        self.written: list[Path] = []
        self._caught: set[str] = set()

    def triggers(self, loss) -> list[tuple[str, str]]:
        """Every kind of trouble at this step, as (kind, reason): "loss" or "grad" (non-finite),
        "norm" (too large)."""
        out = []
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            out.append(("loss", f"non-finite loss ({value})"))
        sq, bad = 0.0, None
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            if bad is None and not bool(torch.isfinite(p.grad).all()):
                bad = name
            sq += float(p.grad.detach().double().pow(2).sum())
        if bad is not None:
            out.append(("grad", f"non-finite gradient in {bad}"))
        elif self.grad_norm_above is not None and math.sqrt(sq) > self.grad_norm_above:
            out.append(
                ("norm", f"gradient norm {math.sqrt(sq):.3g} above {self.grad_norm_above:g}")
            )
        return out

    def _reason(self, step: int, loss) -> str | None:
        """Why this step is dumped, or None: new trouble (one dump covers every kind of trouble
        of its step: a NaN loss with NaN gradients is one event), or the period."""
        hits = self.triggers(loss)
        new = [h for h in hits if not (self.once and h[0] in self._caught)]
        self._caught.update(k for k, _ in hits)
        if new:
            return "; ".join(r for _, r in hits)
        if self.every is not None and step % self.every == 0:
            return f"every {self.every} steps"
        return None

    def check(self, step: int, loss, *, meta: dict | None = None, **batch) -> Path | None:
        """Call once per step, after ``backward()`` and before ``optimizer.step()``, with the
        batch as :func:`~lossdoctor.dump_batch` takes it (features, image_sizes, gt_boxes,
        gt_labels, ...). Returns the dump folder if one was written."""
        reason = self._reason(step, loss)
        if reason is None:
            return None
        folder = self.directory / f"step_{step:06d}"
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        info = {"step": step, "reason": reason, **(meta or {})}
        info["loss"] = value if math.isfinite(value) else str(value)
        batch["features"] = {k: v.detach() for k, v in batch["features"].items()}
        dump_batch(folder / "batch.pt", meta=info, **batch)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        save_torch(state, folder / "checkpoint.pt")
        self.written.append(folder)
        extra = f" {self.extra_args}" if self.extra_args else ""
        cmd = f"lossdoctor inspect {folder / 'checkpoint.pt'} {folder / 'batch.pt'}{extra}"
        message = f"lossdoctor: {reason} at step {step}; wrote {folder}\n  inspect it with: {cmd}"
        print(message, file=self.stream)
        return folder
