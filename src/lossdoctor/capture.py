"""Catch the batch that broke a training run: a hook for plain PyTorch training loops.

    capture = lossdoctor.Capture("lossdoctor-dumps", model, grad_norm_above=1000)
    for step, (images, sizes, boxes, labels) in enumerate(loader):
        feats = model.fpn(images)                        # the FPN outputs that feed the heads
        loss = compute_loss(model, feats, boxes, labels)
        optimizer.zero_grad(); loss.backward()
        capture.check(step, loss, features=feats, image_sizes=sizes, gt_boxes=boxes,
                      gt_labels=labels)
        optimizer.step()

Each step whose loss is non-finite, whose gradient is non-finite, or whose whole-model gradient
norm exceeds ``grad_norm_above`` (if set: catches an explosion before it turns into NaN) is
written, up to ``max_captures`` of them; with ``every=N`` every N-th step is written as well.
A capture is a directory ``DIR/step_000123/{checkpoint.pt,batch.pt}`` (the weights that produced
this loss: call it before ``optimizer.step()``), written atomically; the command that inspects it
is printed. Under ``torch.distributed`` each rank writes ``DIR/step_000123/rank_K/``; the ranks
share one ``checkpoint.pt`` of the step (DDP keeps their weights equal).

A capture never raises into the training it watches: what goes wrong inside it is one
RuntimeWarning, and capturing stops. The framework adapters (``lossdoctor.adapters``) subclass
it: their ``check`` takes the framework's loss dict, finds the batch in what their forward hooks
recorded, and a forward that raises is captured from those hooks before the error goes on.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .inputs.batch import dump_batch
from .inputs.files import save_torch
from .inputs.layouts import find_keys
from .replay.precision import MIN_LOSS_SCALE
from .vocab import Layout, Trigger, Weights

CHECKPOINT_FILE, BATCH_FILE = "checkpoint.pt", "batch.pt"
# trouble captures written per run unless told otherwise
MAX_CAPTURES = 5
NONFINITE = (Trigger.NONFINITE_LOSS, Trigger.NONFINITE_GRAD)


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


def unwrap(model):
    """The model inside a (Distributed)DataParallel wrapper (mmengine's and Detectron2's subclass
    torch's), else the model: its hooks, weights and config are the inner model's."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


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


def head_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """The module prefixes of the layers ``inspect`` replays (RPN, box and mask heads, every
    cascade stage), found by the checkpoint layouts; empty for a model of another layout."""
    keys = dict.fromkeys(model.state_dict())
    for layout in Layout:
        found = find_keys(keys, layout)
        if found is not None:
            layers = [*found.keys.values(), *(p for s in found.stages for p in s.values())]
            return tuple(sorted(set(layers)))
    return ()


def is_head(name: str, heads: tuple[str, ...]) -> bool:
    return any(name.startswith(p + ".") for p in heads)


@dataclass(frozen=True)
class GradNorms:
    """The gradient at one step, divided by the loss scale it still carries (AMP)."""

    model: float  # every parameter's
    heads: float | None  # the replayed layers' (None: a model lossdoctor has no layout for)
    nonfinite: str | None  # the first parameter with a non-finite gradient
    scale: float | None = None  # the loss scale divided out

    def as_meta(self) -> dict:
        out = {"model": _number(self.model), "heads": _number(self.heads)}
        return {**out, "loss_scale": self.scale} if self.scale is not None else out


def grad_norms(model: torch.nn.Module, heads: tuple[str, ...], scale: float | None) -> GradNorms:
    """Whole-model and heads' gradient norms, unscaled by ``scale`` when given."""
    total = head = 0.0
    bad = None
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if bad is None and not bool(torch.isfinite(p.grad).all()):
            bad = name
        sq = float(p.grad.detach().double().pow(2).sum())
        total += sq
        head += sq if is_head(name, heads) else 0.0
    div = scale if scale else 1.0
    return GradNorms(math.sqrt(total) / div, math.sqrt(head) / div if heads else None, bad, scale)


def _number(v):
    return v if v is None or math.isfinite(v) else str(v)


@dataclass(frozen=True)
class Fired:
    """One trigger that fired at a step: its kind, the value it saw and the threshold."""

    kind: Trigger
    value: float | str | None
    threshold: float | None = None
    reason: str = ""

    def as_meta(self) -> dict:
        value = _number(self.value) if isinstance(self.value, float) else self.value
        return {"kind": self.kind, "value": value, "threshold": self.threshold,
                "reason": self.reason}  # fmt: skip


def periodic(step: int, every: int) -> Fired:
    """The trigger of a step written because it falls on the period."""
    return Fired(Trigger.PERIODIC, step, float(every), f"every {every} steps")


def fired_at(loss, norms: GradNorms, grad_norm_above: float | None, scaled: bool) -> list[Fired]:
    """Every kind of trouble at a step. Under a loss scaler a non-finite gradient is the
    scaler's (it skips the step and lowers the scale), not a trigger."""
    out = []
    value = loss_value(loss)
    if not math.isfinite(value):
        out.append(Fired(Trigger.NONFINITE_LOSS, value, None, f"non-finite loss ({value})"))
    if norms.nonfinite is not None:
        if not scaled:
            why = f"non-finite gradient in {norms.nonfinite}"
            out.append(Fired(Trigger.NONFINITE_GRAD, norms.model, None, why))
    elif grad_norm_above is not None and norms.model > grad_norm_above:
        why = f"gradient norm {norms.model:.3g} above {grad_norm_above:g}"
        out.append(Fired(Trigger.GRAD_NORM, norms.model, float(grad_norm_above), why))
    return out


def loss_scale(scaler, optimizer) -> float | None:
    """The scale a GradScaler's gradients still carry: None without one, or once
    ``scaler.unscale_(optimizer)`` has divided it out."""
    if scaler is None or not scaler.is_enabled():
        return None
    state = scaler._per_optimizer_states.get(id(optimizer)) if optimizer is not None else None
    if state is not None and getattr(state.get("stage"), "name", "") == "UNSCALED":
        return None
    return float(scaler.get_scale())


def autocast_dtype() -> str | None:
    """The dtype autocast runs in now (CUDA's, else the CPU's), or None when it is off."""
    for device in ("cuda", "cpu"):
        try:
            on = torch.is_autocast_enabled(device)
            dtype = torch.get_autocast_dtype(device)
        except (TypeError, AttributeError):  # torch < 2.4
            cpu = device == "cpu"
            on = torch.is_autocast_cpu_enabled() if cpu else torch.is_autocast_enabled()
            dtype = torch.get_autocast_cpu_dtype() if cpu else torch.get_autocast_gpu_dtype()
        if on:
            return str(dtype).replace("torch.", "")
    return None


def summarize_weights(state: dict, heads: tuple[str, ...]) -> dict:
    """What a heads-only checkpoint says of the rest: NaN/Inf values per tensor, and the norm
    of each module's tensors (enough for ``nonfinite-weights`` and to see a blown-up layer)."""
    bad, sq = {}, {}
    for key, t in state.items():
        if is_head(key, heads) or not t.is_floating_point():
            continue
        n = int((~torch.isfinite(t)).sum())
        if n:
            bad[key] = n
        module = key.rsplit(".", 1)[0]
        sq[module] = sq.get(module, 0.0) + float(t.detach().double().pow(2).sum())
    norms = {m: _number(math.sqrt(v)) for m, v in sq.items()}
    return {"saved": Weights.HEADS, "nonfinite_elsewhere": bad, "norms": norms}


def warn(what: str, error: BaseException, stacklevel: int = 3) -> None:
    """An observer's failure, said as one RuntimeWarning naming what it was doing."""
    message = f"lossdoctor: {what}: {type(error).__name__}: {error}"
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


@dataclass
class Held:
    """The last checked step, kept to be written if the next step is non-finite."""

    step: int
    loss: object
    batch: dict
    meta: dict
    norms: GradNorms
    heads: dict  # a copy of the heads' tensors at that step


class Capture:
    """Writes a checkpoint + batch capture at each step that goes wrong (up to ``max_captures``;
    ``once=True``: one per kind of trouble), and every ``every`` steps.

    ``optimizer`` records the learning rate and optimizer type; ``scaler`` (a GradScaler) is
    divided out of the gradient norms. ``weights="heads"`` writes only the heads' tensors (the
    rest summarized in the meta). ``keep_previous=True`` holds each step's batch and a copy of
    the heads' weights until the next check, and writes it when that step is non-finite.
    """

    framework = "custom"

    def __init__(
        self, directory: str | Path, model: torch.nn.Module, *, every: int | None = None,
        max_captures: int = MAX_CAPTURES, once: bool = False, grad_norm_above: float | None = None,
        weights: Weights | str = Weights.ALL, keep_previous: bool = False, optimizer=None,
        scaler=None, extra_args: str = "", stream=None, meta: dict | None = None,
    ):  # fmt: skip
        self.directory = Path(directory)
        self.model = unwrap(model)
        self.every, self.max_captures, self.once = every, max_captures, once
        self.grad_norm_above = grad_norm_above
        self.weights, self.keep_previous = Weights(weights), keep_previous
        self.optimizer, self.scaler = optimizer, scaler
        self.extra_args = extra_args
        self.stream = stream if stream is not None else sys.stderr
        self.meta = dict(meta or {})
        self.written: list[Path] = []
        self.heads = head_prefixes(self.model)
        self.trouble = 0  # trouble captures written
        self.next_step = 0  # the step a forward that raises belongs to
        self.failed = False
        self.held: Held | None = None
        self._kinds: set[Trigger] = set()
        self.skipped = 0  # steps the loss scaler skipped, counted by its scale falling
        self._last_scale: float | None = None

    # ---- the step ------------------------------------------------------------------------------

    def check(self, step: int, loss, *, meta: dict | None = None, **batch) -> Path | None:
        """Call once per step, after ``backward()`` and before ``optimizer.step()``, with the
        batch as :func:`~lossdoctor.dump_batch` takes it (features, image_sizes, gt_boxes,
        gt_labels, ...). Returns the folder written, if any; never raises."""
        return self.observe(
            f"step {step}", lambda: self.step(step, loss, lambda: (batch, {}), meta)
        )

    def observe(self, where: str, action):
        """``action()``, or None: a failure inside lossdoctor is one RuntimeWarning and stops
        capturing, never an error in the training it watches."""
        if self.failed:
            return None
        try:
            return action()
        except Exception as e:
            self.failed = True
            warn(f"capturing stopped at {where}", e, stacklevel=4)
            return None

    def step(self, step: int, loss, batch_of, meta: dict | None = None) -> Path | None:
        """Check one step; ``batch_of()`` → (dump_batch arguments, extra meta), asked only when
        the step is written or held."""
        self.next_step = step + 1
        self._count_skips()
        norms = self.norms()
        fired = fired_at(loss, norms, self.grad_norm_above, norms.scale is not None)
        fired += self.scale_collapsed()
        if self.held is not None and any(f.kind in NONFINITE for f in fired):
            self._write_held(step)
        self.held = None
        chosen = self.choose(step, fired)
        folder = None
        if chosen:
            batch, extra = batch_of()
            folder = self.write(step, chosen, loss, batch, {**extra, **(meta or {})}, norms)
        elif self.keep_previous and not fired:
            batch, extra = batch_of()
            self.held = Held(step, loss, batch, {**extra, **(meta or {})}, norms, self._heads())
        return folder

    def _scale(self) -> float | None:
        """The loss scaler's scale (None without an enabled one)."""
        if self.scaler is None or not self.scaler.is_enabled():
            return None
        return float(self.scaler.get_scale())

    def _count_skips(self) -> None:
        """A GradScaler lowers its scale only when it skips a step: each fall since the last
        check is a skipped step."""
        scale = self._scale()
        if scale is not None and self._last_scale is not None and scale < self._last_scale:
            self.skipped += 1
        self._last_scale = scale

    def scale_collapsed(self) -> list[Fired]:
        """The loss scale below MIN_LOSS_SCALE: the run skips step after step."""
        scale = self._scale()
        if scale is None or scale >= MIN_LOSS_SCALE:
            return []
        why = f"loss scale {scale:g} below {MIN_LOSS_SCALE:g} ({self.skipped} skipped steps seen)"
        return [Fired(Trigger.LOSS_SCALE_COLLAPSED, scale, MIN_LOSS_SCALE, why)]

    def amp_facts(self, norms: GradNorms | None) -> dict | None:
        """The loss scaler at this step, as ``meta["amp"]`` records it: its scale, growth
        tracker, the skipped steps counted so far, and whether this step's gradient is
        non-finite (the scaler skips it). None without an enabled scaler."""
        scale = self._scale()
        if scale is None:
            return None
        out = {"loss_scale": scale, "skipped": self.skipped}
        try:  # torch's GradScaler and its subclasses (mmengine's, Detectron2's)
            out["growth_tracker"] = int(self.scaler.state_dict()["_growth_tracker"])
        except (AttributeError, KeyError, TypeError, RuntimeError, ValueError):
            pass
        if norms is not None:
            out["found_inf"] = norms.nonfinite is not None
        return out

    def norms(self) -> GradNorms:
        return grad_norms(self.model, self.heads, loss_scale(self.scaler, self.optimizer))

    def choose(self, step: int, fired: list[Fired]) -> list[Fired]:
        """The triggers this step is written for: its trouble while the budget lasts (one
        capture covers every kind of trouble of its step), else the period."""
        new = [f for f in fired if not (self.once and f.kind in self._kinds)]
        self._kinds.update(f.kind for f in fired)
        if new and self.trouble < self.max_captures:
            return fired
        if self.every is not None and step % self.every == 0:
            return [periodic(step, self.every)]
        return []

    def _write_held(self, step: int) -> None:
        held = self.held
        if held.step != step - 1 or self.trouble >= self.max_captures:
            return
        why = Fired(Trigger.BEFORE_NONFINITE, step, None, f"the step before non-finite step {step}")
        self.write(held.step, [why], held.loss, held.batch, held.meta, held.norms, held.heads)

    def _heads(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()
                if is_head(k, self.heads)}  # fmt: skip

    # ---- a forward that raises -----------------------------------------------------------------

    def exception(self, error: BaseException, batch_of) -> Path | None:
        """Capture the batch of a forward that raised ``error`` (the training goes on to raise
        it unchanged); ``batch_of()`` gives what the forward had computed."""
        if self.failed or self.trouble >= self.max_captures:
            return None
        message = f"{type(error).__name__}: {error}".strip()
        fired = Fired(Trigger.EXCEPTION, message, None, f"{message.splitlines()[0]} in the forward")

        def write():
            batch, extra = batch_of()
            return self.write(self.next_step, [fired], None, batch, extra, None)

        return self.observe(f"the exception at step {self.next_step}", write)

    # ---- writing -------------------------------------------------------------------------------

    def run_meta(self, step: int, fired: list[Fired], loss, norms: GradNorms | None) -> dict:
        """What the capture records about the run at this step."""
        rank, world = distributed()
        info = {"framework": self.framework, "step": step, **self.meta}
        info["reason"] = "; ".join(f.reason for f in fired)
        info["trigger"] = fired[0].as_meta()
        if len(fired) > 1:
            info["triggers"] = [f.as_meta() for f in fired]
        extra = {"rank": rank, "world_size": world, **self.run_facts()}
        if loss is not None:
            value = loss_value(loss)
            extra["loss"] = value if math.isfinite(value) else str(value)
            losses = {k: v for k, v in loss_dict(loss).items() if math.isfinite(v)}
            extra["losses"] = losses or None
        if norms is not None:
            extra["grad_norm"] = norms.as_meta()
        extra["amp"] = self.amp_facts(norms)
        return {**info, **{k: v for k, v in extra.items() if v is not None}}

    def run_facts(self) -> dict:
        """The optimizer's learning rate and type, and the loss scale, as the run has them."""
        out = {"torch_version": torch.__version__.split("+")[0]}
        if self.optimizer is not None:
            out["lr"] = float(self.optimizer.param_groups[0]["lr"])
            out["optimizer"] = type(self.optimizer).__name__
        if self.scaler is not None and self.scaler.is_enabled():
            out["loss_scale"] = float(self.scaler.get_scale())
        return out

    def write(self, step, fired, loss, batch, meta=None, norms=None, heads=None) -> Path:
        """Write this step's capture directory (the shared checkpoint of the step, this rank's
        batch) and print the command that inspects it."""
        info = with_amp_dtype({**self.run_meta(step, fired, loss, norms), **(meta or {})})
        state = self.model.state_dict()
        if heads is not None:  # held from an earlier step: the rest of the model has moved on
            info["weights"], state = {"saved": Weights.HEADS}, heads
        elif self.weights is Weights.HEADS and self.heads:  # else no layout tells the heads
            info["weights"] = summarize_weights(state, self.heads)
            state = {k: v for k, v in state.items() if is_head(k, self.heads)}
        folder = step_folder(self.directory, step, info.get("rank"), info.get("world_size"))
        batch = {**batch, "features": _detached(batch["features"])}
        dump_batch(folder / BATCH_FILE, meta=info, **batch)
        self._write_checkpoint(folder, state)
        self.written.append(folder)
        self.trouble += any(f.kind.trouble for f in fired)
        extra = f" {self.extra_args}" if self.extra_args else ""
        print(f"lossdoctor: {info['reason']} at step {step}; wrote {folder}\n  inspect it with: "
              f"lossdoctor inspect {folder}{extra}", file=self.stream)  # fmt: skip
        return folder

    def _write_checkpoint(self, folder: Path, state: dict) -> None:
        state = {k: v.detach().cpu() for k, v in state.items()}
        if folder.name.startswith("rank_"):  # one checkpoint per step, linked from each rank
            save_torch(state, folder.parent / CHECKPOINT_FILE)
            link = folder / CHECKPOINT_FILE
            if not link.exists():
                os.symlink(os.path.join("..", CHECKPOINT_FILE), link)
            return
        save_torch(state, folder / CHECKPOINT_FILE)


def with_amp_dtype(info: dict) -> dict:
    """``meta["amp"]`` with the autocast dtype the adapter saw in the forward (``autocast``)."""
    amp = dict(info.get("amp") or {})
    if info.get("autocast"):
        amp.setdefault("dtype", info["autocast"])
    return {**info, "amp": amp} if amp else info


def _detached(features):
    if isinstance(features, dict):
        return {k: v.detach() for k, v in features.items()}
    return [v.detach() for v in features]
