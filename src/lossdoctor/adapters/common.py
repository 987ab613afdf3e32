"""What the adapters share: level names and strides from feature sizes, and writing a capture
directory from a framework's forward."""

from __future__ import annotations

import math
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from ..capture import BATCH_FILE, CHECKPOINT_FILE, Capture, autocast_dtype, warn
from ..inputs.batch import dump_batch
from ..inputs.checkpoint import not_replayed
from ..inputs.config import HeadNormConfig
from ..inputs.dataclass_toml import to_dict
from ..inputs.dense import DENSE_META
from ..inputs.errors import InputError
from ..inputs.files import save_torch
from ..vocab import BOX_CONVS, BOX_FCS, RPN_CONVS


def level_names(features: list[Tensor], pad_size: tuple[int, int]) -> tuple[list[str], list[int]]:
    """FPN levels named pK by their nominal stride 2^K (padded size over feature size, rounded to
    a power of 2), finest first → (names, strides). Levels that share a stride (torchvision's
    MobileNet FPN: two at stride 32) are told apart by a letter: p5, p5b."""
    strides = [2 ** round(math.log2(pad_size[0] / f.shape[-2])) for f in features]
    again = [strides[:i].count(s) for i, s in enumerate(strides)]
    names = [
        f"p{int(math.log2(s))}" + (chr(ord("a") + k) if k else "") for s, k in zip(strides, again)
    ]
    return names, strides


def kind(obj) -> str:
    """A module's class name (what a refusal names)."""
    return type(obj).__name__


def require(what: str, obj, allowed: tuple[str, ...]) -> None:
    """``obj``'s class must be one of ``allowed`` (exactly: a subclass may compute its loss
    differently); otherwise it is refused by name."""
    if kind(obj) not in allowed:
        raise not_replayed(f"{what} {kind(obj)} (lossdoctor replays {', '.join(allowed)})")


def is_a(obj, names: tuple[str, ...]) -> bool:
    """Whether ``obj``'s class or one of its bases is named one of ``names`` (a user's detector
    subclass keeps its heads', and so its losses')."""
    return any(c.__name__ in names for c in type(obj).__mro__)


# the most convs and fcs of each head the replay runs
MAX_RPN_CONVS, MAX_HEAD_CONVS, MAX_BOX_FCS = len(RPN_CONVS), len(BOX_CONVS), len(BOX_FCS)
# the norm layers the replay runs in the heads' conv blocks, by class name → whether the layer
# normalizes by the batch in training (None: by each RoI, GroupNorm; False: by its running
# statistics always, Detectron2's FrozenBatchNorm2d)
HEAD_NORMS = {"BatchNorm2d": True, "GroupNorm": None, "FrozenBatchNorm2d": False}
# the eps of a res5 head's norms (the head_norm default they run with)
BN_EPS = HeadNormConfig.eps
# the convs the replay runs, by class name → whether they standardize their weights
HEAD_CONVS = {"Conv2d": False, "ConvWS2d": True}
# a head conv's kernel, stride, padding, dilation and groups (each conv block keeps the RoI size)
CONV_3X3 = ((3, 3), (1, 1), (1, 1), (1, 1), 1)


def cascade_of_fc_heads(heads: list[torch.nn.Module], layers) -> None:
    """A cascade's stages are replayed with two-fc box heads (Cascade R-CNN's own); ``layers``
    gives a head's (convs, fcs, normalized)."""
    if len(heads) < 2:
        return
    for k, head in enumerate(heads):
        convs, fcs, normed = layers(head)
        if convs or fcs != MAX_BOX_FCS or normed:
            norm = " with a norm" if normed else ""
            what = f"{kind(head)} with {convs} convs and {fcs} fcs{norm}"
            raise not_replayed(f"cascade stage {k}'s box head {what} (2-fc heads are replayed)")


def is_norm(module) -> bool:
    """A normalization layer, by class name (BatchNorm2d, GroupNorm, SyncBatchNorm, LayerNorm,
    Detectron2's FrozenBatchNorm2d, ...), not a block that holds one (Conv2dNormActivation)."""
    return re.search(r"Norm(\dd)?$", kind(module)) is not None


def has_norm(module) -> bool:
    return any(is_norm(m) for m in module.modules())


def _conv_geometry(conv) -> tuple:
    return (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding),
            tuple(conv.dilation), int(conv.groups))  # fmt: skip


def _head_layers(heads: list[torch.nn.Module]) -> tuple[list, list]:
    """The 3x3 convs and the norms of ``heads``, each one the replay runs (else refused)."""
    convs = [
        m
        for h in heads
        for m in h.modules()
        if isinstance(m, torch.nn.Conv2d)
        and not isinstance(m, torch.nn.ConvTranspose2d)
        and m.kernel_size != (1, 1)
    ]
    norms = [m for h in heads for m in h.modules() if is_norm(m)]
    for m in convs:
        if kind(m) not in HEAD_CONVS or _conv_geometry(m) != CONV_3X3:
            raise not_replayed(
                f"a head conv {kind(m)} {_conv_geometry(m)[0]} other than a 3x3 "
                "Conv2d or ConvWS2d with stride 1 and padding 1"
            )
    for m in norms:
        if kind(m) not in HEAD_NORMS:
            raise not_replayed(
                f"a head norm {kind(m)} (lossdoctor replays {', '.join(HEAD_NORMS)})"
            )
        if HEAD_NORMS[kind(m)] and getattr(m, "running_mean", None) is None:
            raise not_replayed("a head BatchNorm2d without running statistics")
    return convs, norms  # fmt: skip


def head_norm_config(heads: list[torch.nn.Module]) -> HeadNormConfig:
    """How the conv blocks of the box and mask ``heads`` normalize, read off their modules: every
    conv a 3x3 conv (plain or weight-standardized), every norm one the replay runs, and all of
    them alike (one eps, one group count, one mode); anything else refused by name."""
    convs, norms = _head_layers(heads)
    ws = {bool(HEAD_CONVS[kind(m)]) for m in convs}
    ws_eps = {float(m.eps) for m in convs if HEAD_CONVS[kind(m)]}
    eps = {float(m.eps) for m in norms}
    groups = {int(m.num_groups) for m in norms if kind(m) == "GroupNorm"}
    batch = {bool(m.training) and HEAD_NORMS[kind(m)] for m in norms
             if HEAD_NORMS[kind(m)] is not None}  # fmt: skip
    if max(map(len, (ws, ws_eps, eps, groups, batch))) > 1:
        raise not_replayed("heads whose convs or norms differ (in weight standardization, eps, "
                           "groups or training mode)")  # fmt: skip
    default = HeadNormConfig()
    return HeadNormConfig(
        groups=groups.pop() if groups else default.groups,
        eps=eps.pop() if eps else default.eps,
        batch_stats=batch.pop() if batch else default.batch_stats,
        weight_std=ws.pop() if ws else False,
        weight_std_eps=ws_eps.pop() if ws_eps else default.weight_std_eps,
    )


def first_line(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def built(framework: str, path, build):
    """``build()`` of a framework's model from a config file, its failures in one line."""
    try:
        return build()
    except Exception as e:
        raise InputError(
            f"{framework} could not build the model of {path} ({first_line(e)})"
        ) from None


def read_model(model, detector_config, profile):
    """(detector config, profile) of a framework's model; anything lossdoctor cannot read in it
    is refused as not replayed (a model unlike those it knows, never an internal error)."""
    try:
        return detector_config(model), profile(model)
    except InputError:
        raise
    except Exception as e:
        raise not_replayed(f"this model ({kind(model)}: {first_line(e)})") from None


def run_meta(framework: str, model, detector_config, profile, meta: dict | None) -> dict:
    """What an adapter dump records about the run: the model's detector config and profile (see
    :func:`read_model`); a caller's ``meta`` has the last word. ``adapter`` says the GT was
    converted to lossdoctor's conventions by the adapter."""
    config, prof = read_model(model, detector_config, profile)
    own = {"framework": framework, "adapter": f"{__package__}.{framework}", "profile": prof}
    return {**own, "config": to_dict(config), **(meta or {})}


def dense_run_meta(framework: str, model, dense_config, meta: dict | None) -> dict:
    """What a one-stage model's dump records: its dense head's config read off the live model
    (``meta["dense"]["config"]``, which ``inspect`` replays) and its profile's name."""
    config, _ = read_model(model, dense_config, lambda _: None)
    given = dict(meta or {})
    dense = {"config": to_dict(config), **(given.pop(DENSE_META, None) or {})}
    return {"framework": framework, "adapter": f"{__package__}.{framework}", DENSE_META: dense,
            **given}  # fmt: skip


def write_dump(out_dir: str | Path, state_dict: dict, batch: dict, meta: dict) -> Path:
    """A capture directory from one forward: the model's state_dict and the batch."""
    folder = Path(out_dir)
    dump_batch(folder / BATCH_FILE, meta=meta, **batch)
    save_torch({k: v.detach().cpu() for k, v in state_dict.items()}, folder / CHECKPOINT_FILE)
    return folder


def observed(what: str, action):
    """``action()``, or None with one RuntimeWarning where it raises: an observer never stops the
    run it observes."""
    try:
        return action()
    except Exception as e:
        warn(what, e, stacklevel=4)
        return None


@contextmanager
def untouched(module: torch.nn.Module):
    """Run ``module`` without a trace: no gradient, its buffers (BatchNorm statistics) restored
    and the global RNG as it was (a transform draws its resize size from it)."""
    saved = {k: b.clone() for k, b in module.named_buffers()}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            yield
        finally:
            for k, b in module.named_buffers():
                b.copy_(saved[k])


def describe(framework, package: str, model_meta) -> dict:
    """The run meta a framework's captures carry: ``model_meta()`` (config and profile) and the
    framework's version. A model lossdoctor cannot replay is said once, here, as a warning; its
    captures are still written and ``inspect`` refuses them with the same message."""
    try:
        version = str(__import__(package).__version__)
    except (ImportError, AttributeError):
        version = None
    facts = {"framework": framework, "framework_version": version}
    try:
        return {**model_meta(), **facts}
    except Exception as e:  # a head, loss or coder lossdoctor has no replay for
        message = str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
        warnings.warn(
            f"lossdoctor: this model cannot be replayed ({message}); its captures are still "
            "written, and inspect will refuse them",
            RuntimeWarning,
            stacklevel=4,
        )
        return {**facts, "unsupported": message}


class HookedCapture(Capture):
    """A :class:`~lossdoctor.Capture` that finds the batch in what forward hooks recorded during
    the step's own forward, so the training loop stays as it is: construct it once, call
    ``check(step, loss_dict)`` after ``backward()``. A training forward that raises is captured
    from what its hooks had seen, and the error goes on unchanged."""

    def __init__(self, directory, model, **kw):
        super().__init__(directory, model, **kw)
        self.seen: dict = {}
        self.handles = []
        self.run_info: dict = {"framework": self.framework}
        self.observe("construction (not capturing this run)", self._start)

    def _start(self) -> None:
        self.install(self.model)
        m = self.model
        self.handles.append(m.register_forward_pre_hook(self._forward_starts))
        self.handles.append(
            m.register_forward_hook(self._forward_ends, with_kwargs=True, always_call=True)
        )
        self.run_info = self.describe()

    def install(self, model) -> None:
        """Register the framework's forward hooks (per framework)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The run meta of every capture (per framework, through :func:`describe`)."""
        raise NotImplementedError

    def hook(self, module, name: str, pick=lambda args, kwargs, out: out, always=False) -> None:
        """Record ``pick(args, kwargs, output)`` of ``module``'s forward as ``seen[name]``; a
        ``pick`` that returns None records nothing. ``always``: also when the forward raises
        (the output is then None)."""

        def record(_module, args, kwargs, output):
            value = pick(args, kwargs, output)
            if value is not None:
                self.seen[name] = value

        handle = module.register_forward_hook(record, with_kwargs=True, always_call=always)
        self.handles.append(handle)

    def _forward_starts(self, module, args) -> None:
        if module.training:
            self.seen.clear()  # one training forward at a time (the last micro-batch's)
            self.seen["autocast"] = autocast_dtype()

    def _forward_ends(self, module, args, kwargs, output) -> None:
        error = sys.exc_info()[1]
        if output is not None or error is None or not module.training:
            return
        try:
            self.exception(error, lambda: self._batch(self.batch_after_exception(args, kwargs)))
        finally:
            self.seen.clear()

    def remove(self) -> None:
        """Stop recording (the hooks are removed from the model)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def batch_from_forward(self) -> tuple[dict, dict]:
        """The dump_batch arguments and extra meta for the recorded forward (per framework)."""
        raise NotImplementedError

    def batch_after_exception(self, args, kwargs) -> tuple[dict, dict]:
        """The same for a forward that raised: what its hooks had seen, the rest (features, at
        least) computed from its inputs without a trace (per framework)."""
        raise NotImplementedError

    def _batch(self, found: tuple[dict, dict]) -> tuple[dict, dict]:
        batch, extra = found
        amp = {"autocast": self.seen.get("autocast")} if self.seen.get("autocast") else {}
        meta = {**self.run_info, **amp}
        for k, v in extra.items():  # a table (meta["dense"]) gains the step's keys
            meta[k] = {**meta[k], **v} if isinstance(meta.get(k), dict) else v
        return batch, meta

    def check(self, step: int, loss, *, meta: dict | None = None) -> Path | None:
        """Call once per step after ``backward()`` and before ``optimizer.step()``, with the
        framework's loss dict. Returns the folder written, if any; never raises."""
        try:
            return self.observe(
                f"step {step}",
                lambda: self.step(step, loss, lambda: self._batch(self.batch_from_forward()), meta),
            )
        finally:
            self.seen.clear()  # hold no tensor of this step past its backward
