"""Catch the batch that broke a training run: a hook for plain PyTorch training loops.

    capture = lossdoctor.Capture("lossdoctor-dumps", model, grad_norm_above=1000)
    for step, (images, sizes, boxes, labels) in enumerate(loader):
        feats = model.fpn(images)                        # the FPN outputs that feed the heads
        loss = compute_loss(model, feats, boxes, labels)
        optimizer.zero_grad(); loss.backward()
        capture.check(step, loss, features=feats, image_sizes=sizes, gt_boxes=boxes,
                      gt_labels=labels)
        optimizer.step()

At the first step whose loss is non-finite, the first whose gradient is non-finite, the first whose
total gradient norm exceeds ``grad_norm_above`` (if set: catches an explosion before it turns into
NaN), and with ``every=N`` every N steps, it writes a capture directory
``DIR/step_000123/{checkpoint.pt,batch.pt}`` (the weights that produced this loss: call it before
``optimizer.step()``), atomically, and prints the ``lossdoctor inspect`` command. Under
``torch.distributed`` each rank writes ``DIR/step_000123/rank_K/``; the ranks share one
``checkpoint.pt`` of the step (DDP keeps their weights equal).

The framework adapters (``lossdoctor.adapters``) subclass it: their ``check`` takes the
framework's loss dict and finds the batch in what their forward hooks recorded.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from .inputs.batch import dump_batch
from .inputs.files import save_torch

CHECKPOINT_FILE, BATCH_FILE = "checkpoint.pt", "batch.pt"


def step_folder(directory: str | Path, step: int, rank: int | None, world_size: int | None) -> Path:
    """Where one step's capture goes: ``DIR/step_000123``, or its ``rank_K`` for several ranks."""
    folder = Path(directory) / f"step_{step:06d}"
    return folder / f"rank_{rank}" if world_size and world_size > 1 else folder


def distributed() -> tuple[int | None, int | None]:
    """(rank, world_size) when torch.distributed runs, else (None, None)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None, None


def loss_value(loss) -> float:
    """A loss (tensor, number, or a framework's dict of them) as one number."""
    if isinstance(loss, dict):
        return sum(loss_value(v) for k, v in loss.items() if "loss" in k)
    if isinstance(loss, (list, tuple)):
        return sum(loss_value(v) for v in loss)
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def loss_dict(loss) -> dict[str, float]:
    """A framework's loss dict as plain numbers (each list of per-level losses summed)."""
    if not isinstance(loss, dict):
        return {}
    return {str(k): loss_value(v) for k, v in loss.items() if "loss" in str(k)}


class Capture:
    """Writes a checkpoint + batch dump when training goes wrong (once per kind of trouble), or
    every ``every`` steps. ``optimizer`` (optional) records the learning rate."""

    framework = "custom"

    def __init__(
        self, directory: str | Path, model: torch.nn.Module, *, every: int | None = None,
        once: bool = True, grad_norm_above: float | None = None, extra_args: str = "",
        stream=None, optimizer=None, meta: dict | None = None,
    ):  # fmt: skip
        self.directory = Path(directory)
        self.model = model
        self.every, self.once, self.grad_norm_above = every, once, grad_norm_above
        self.extra_args = extra_args
        self.stream = stream if stream is not None else sys.stderr
        self.optimizer = optimizer
        self.meta = dict(meta or {})
        self.written: list[Path] = []
        self._caught: set[str] = set()

    def _grads(self) -> tuple[float, str | None]:
        """The total squared gradient norm, and the first parameter with a non-finite gradient."""
        sq, bad = 0.0, None
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                if bad is None and not bool(torch.isfinite(p.grad).all()):
                    bad = name
                sq += float(p.grad.detach().double().pow(2).sum())
        return sq, bad

    def triggers(self, loss) -> list[tuple[str, str]]:
        """Every kind of trouble at this step, as (kind, reason): "loss" or "grad" (non-finite),
        "norm" (too large)."""
        out = []
        value = loss_value(loss)
        if not math.isfinite(value):
            out.append(("loss", f"non-finite loss ({value})"))
        sq, bad = self._grads()
        if bad is not None:
            out.append(("grad", f"non-finite gradient in {bad}"))
        elif self.grad_norm_above is not None and math.sqrt(sq) > self.grad_norm_above:
            out.append(
                ("norm", f"gradient norm {math.sqrt(sq):.3g} above {self.grad_norm_above:g}")
            )
        return out

    def reason(self, step: int, loss) -> str | None:
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
        why = self.reason(step, loss)
        if why is None:
            return None
        return self.write(step, why, loss, batch, meta)

    def run_meta(self, step: int, why: str, loss) -> dict:
        """What the dump records about the run at this step."""
        rank, world = distributed()
        value = loss_value(loss)
        info = {"framework": self.framework, "step": step, "reason": why, **self.meta}
        info["loss"] = value if math.isfinite(value) else str(value)
        losses = {k: v for k, v in loss_dict(loss).items() if math.isfinite(v)}
        extra = {"rank": rank, "world_size": world, "losses": losses or None}
        if self.optimizer is not None:
            extra["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return {**info, **{k: v for k, v in extra.items() if v is not None}}

    def write(self, step: int, why: str, loss, batch: dict, meta: dict | None = None) -> Path:
        """Write this step's capture directory (the shared checkpoint of the step, this rank's
        batch) and print the command that inspects it."""
        info = {**self.run_meta(step, why, loss), **(meta or {})}
        folder = step_folder(self.directory, step, info.get("rank"), info.get("world_size"))
        batch = {**batch, "features": _detached(batch["features"])}
        dump_batch(folder / BATCH_FILE, meta=info, **batch)
        self._write_checkpoint(folder)
        self.written.append(folder)
        extra = f" {self.extra_args}" if self.extra_args else ""
        print(f"lossdoctor: {why} at step {step}; wrote {folder}\n  inspect it with: "
              f"lossdoctor inspect {folder}{extra}", file=self.stream)  # fmt: skip
        return folder

    def _write_checkpoint(self, folder: Path) -> None:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if folder.name.startswith("rank_"):  # one checkpoint per step, linked from each rank
            save_torch(state, folder.parent / CHECKPOINT_FILE)
            link = folder / CHECKPOINT_FILE
            if not link.exists():
                os.symlink(os.path.join("..", CHECKPOINT_FILE), link)
            return
        save_torch(state, folder / CHECKPOINT_FILE)


def _detached(features):
    if isinstance(features, dict):
        return {k: v.detach() for k, v in features.items()}
    return [v.detach() for v in features]
