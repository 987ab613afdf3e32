"""What the adapters share: level names and strides from feature sizes, and writing a capture
directory from a framework's forward."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ..capture import BATCH_FILE, CHECKPOINT_FILE, Capture
from ..inputs.batch import dump_batch
from ..inputs.config import DetectorConfig
from ..inputs.dataclass_toml import to_dict
from ..inputs.files import save_torch


def level_names(features: list[Tensor], pad_size: tuple[int, int]) -> tuple[list[str], list[int]]:
    """FPN levels named pK by their nominal stride 2^K (padded size over feature size, rounded to
    a power of 2), finest first → (names, strides)."""
    strides = [2 ** round(math.log2(pad_size[0] / f.shape[-2])) for f in features]
    return [f"p{int(math.log2(s))}" for s in strides], strides


def run_meta(framework: str, profile, config: DetectorConfig, meta: dict | None) -> dict:
    """What an adapter dump records about the run (a caller's ``meta`` has the last word);
    ``adapter`` says the GT was converted to lossdoctor's conventions by the adapter."""
    own = {"framework": framework, "adapter": f"{__package__}.{framework}", "profile": profile}
    return {**own, "config": to_dict(config), **(meta or {})}


def write_dump(out_dir: str | Path, state_dict: dict, batch: dict, meta: dict) -> Path:
    """A capture directory from one forward: the model's state_dict and the batch."""
    folder = Path(out_dir)
    dump_batch(folder / BATCH_FILE, meta=meta, **batch)
    save_torch({k: v.detach().cpu() for k, v in state_dict.items()}, folder / CHECKPOINT_FILE)
    return folder


def unwrap(model):
    """The model inside a (Distributed)DataParallel wrapper (mmengine's and Detectron2's subclass
    torch's), else the model: its hooks, weights and config are the inner model's."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


class HookedCapture(Capture):
    """A :class:`~lossdoctor.Capture` that finds the batch in what forward hooks recorded during
    the step's own forward, so the training loop stays as it is: construct it once, call
    ``check(step, loss_dict)`` after ``backward()``."""

    def __init__(self, directory, model, **kw):
        super().__init__(directory, unwrap(model), **kw)
        self.seen: dict = {}
        self.handles = []

    def hook(self, module: torch.nn.Module, name: str, pick=lambda args, kwargs, out: out) -> None:
        """Record ``pick(args, kwargs, output)`` of ``module``'s forward as ``seen[name]``; a
        ``pick`` that returns None records nothing."""

        def record(_module, args, kwargs, output):
            value = pick(args, kwargs, output)
            if value is not None:
                self.seen[name] = value

        self.handles.append(module.register_forward_hook(record, with_kwargs=True))

    def remove(self) -> None:
        """Stop recording (the hooks are removed from the model)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def batch_from_forward(self) -> tuple[dict, dict]:
        """The dump_batch arguments and extra meta for the recorded forward (per framework)."""
        raise NotImplementedError

    def check(self, step: int, loss, *, meta: dict | None = None) -> Path | None:
        """Call once per step after ``backward()`` and before ``optimizer.step()``, with the
        framework's loss dict. Returns the folder written, if any."""
        why = self.reason(step, loss)
        try:
            if why is None:
                return None
            batch, extra = self.batch_from_forward()
            return self.write(step, why, loss, batch, {**extra, **(meta or {})})
        finally:
            self.seen.clear()  # hold no tensor of this step past its backward
