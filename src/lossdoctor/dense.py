"""``inspect`` for a one-stage detector: its dense head replayed under the run's own profile and
a what-if, diagnosed and reported in the same report model as a two-stage replay."""

from __future__ import annotations

import dataclasses
import math

from .inputs.batch import Batch
from .inputs.config import DetectorConfig
from .inputs.dense import (
    DENSE_META,
    DENSE_PRESETS,
    FIXED,
    LEGACY,
    DenseConfig,
    DenseProfile,
    dense_config_from_meta,
    dense_preset,
    dense_profile,
    load_dense_config,
)
from .inputs.dense_weights import DenseWeights, dense_weights
from .inputs.errors import InputError
from .options import ReplayOptions
from .replay.dense import WorldCounts
from .vocab import DenseKind, Layout, Phase, Precision, ProfileSource

# the preset a checkpoint's layout and head design mean, where the dump names none
_DEFAULT_PRESET = {
    (Layout.TORCHVISION, DenseKind.RETINANET, False): "torchvision-retinanet",
    (Layout.TORCHVISION, DenseKind.RETINANET, True): "torchvision-retinanet-v2",
    (Layout.TORCHVISION, DenseKind.FCOS, True): "torchvision-fcos",
    (Layout.DETECTRON2, DenseKind.RETINANET, False): "detectron2-retinanet",
    (Layout.DETECTRON2, DenseKind.RETINANET, True): "detectron2-retinanet",
    (Layout.MMDET, DenseKind.RETINANET, False): "mmdet-retinanet",
    (Layout.MMDET, DenseKind.FCOS, True): "mmdet-fcos",
    (Layout.MMDET, DenseKind.FCOS, False): "mmdet-fcos",
    (Layout.MMDET, DenseKind.ATSS, True): "mmdet-atss",
}


def _given_config(given) -> DenseConfig:
    if isinstance(given, DenseConfig):
        return given
    text = str(given)
    if isinstance(given, DetectorConfig) or not (text in DENSE_PRESETS or text.endswith(".toml")):
        shown = given.name if isinstance(given, DetectorConfig) else given
        raise InputError(
            f"--config {shown} is a two-stage config; a one-stage detector takes one of the "
            f"presets {', '.join(DENSE_PRESETS)} or a TOML over one"
        )
    return load_dense_config(text)


def _config(given, b: Batch, w: DenseWeights) -> DenseConfig:
    """--config (a preset name or TOML), else the live model's config the dump records
    (``meta["dense"]["config"]``) or its preset name (``["preset"]``), else the layout's
    default."""
    recorded = b.meta.get(DENSE_META) or {}
    if given is not None:
        cfg = _given_config(given)
    elif recorded.get("config") is not None:
        cfg = dense_config_from_meta(recorded["config"])
    else:
        cfg = dense_preset(_default_name(recorded.get("preset"), w))
    if cfg.kind is not w.kind:
        raise InputError(f"config {cfg.name} is a {cfg.kind} head; the checkpoint's is {w.kind}")
    return cfg


def _default_name(name, w: DenseWeights) -> str:
    if name is None:
        key = (w.layout.layout, w.kind, w.norm)
        name = _DEFAULT_PRESET.get(key)
        if name is None:
            raise InputError(
                f"a {w.layout.layout} {w.kind} head ({'with' if w.norm else 'without'} "
                f"GroupNorm) is not replayed yet; replayed: {', '.join(DENSE_PRESETS)}"
            )
    return name


def _ema_before(b: Batch) -> float | None:
    value = (b.meta.get(DENSE_META) or {}).get("loss_normalizer")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(
            f"meta.dense.loss_normalizer must be a finite number, found {value!r}; it is "
            "Detectron2's running normalizer before the step (model.loss_normalizer)"
        )
    if value <= 0:
        raise InputError(f"meta.dense.loss_normalizer must be above 0, found {value}")
    return float(value)


def _fit(w: DenseWeights, b: Batch, cfg: DenseConfig) -> None:
    if b.channels != w.channels:
        raise InputError(
            f"the batch's features have {b.channels} channels, the dense head takes {w.channels}"
        )
    want = list(cfg.strides[: len(b.strides)])
    if cfg.strides and list(b.strides) != want:
        raise InputError(
            f"the batch's levels have strides {list(b.strides)}; config {cfg.name}'s priors are "
            f"for strides {list(cfg.strides)} (P3 onward): dump the levels the head runs on"
        )
    if len(b.levels) > len(cfg.anchors.sizes):
        raise InputError(
            f"the batch has {len(b.levels)} levels; preset {cfg.name} has priors for "
            f"{len(cfg.anchors.sizes)} (P3-P7)"
        )
    cells = len(cfg.anchors.sizes[0]) * len(cfg.anchors.ratios)
    if cells != w.num_anchors:
        raise InputError(
            f"the head predicts {w.num_anchors} anchors per location; preset {cfg.name} has "
            f"{cells}: pick the preset of its framework with --config"
        )
    if cfg.regress_ranges and len(b.levels) > len(cfg.regress_ranges):
        raise InputError(f"preset {cfg.name} has regress ranges for {len(cfg.regress_ranges)} "
                         f"levels; the batch has {len(b.levels)}")  # fmt: skip
    if w.scales and len(w.scales) < len(b.levels):
        raise InputError(f"the head has per-level scales for {len(w.scales)} levels; the batch "
                         f"has {len(b.levels)}")  # fmt: skip


def _divides_as_fixed(p: DenseProfile) -> bool:
    """Whether ``p`` divides one dump's terms as fixed does (whether it reduces across ranks
    aside), so that fixed would be no what-if for it."""
    plain = [dataclasses.replace(t, reduced=False) for t in p.terms.values()]
    return plain == [dataclasses.replace(t, reduced=False) for t in FIXED.terms.values()]


def _profiles(o: ReplayOptions, cfg: DenseConfig, b: Batch):
    """The run's own profile (--old, else the one the dump records, else the config's) and the
    what-if (--new, else fixed, or legacy where the run already divides as fixed does)."""
    if o.profiles is not None:
        return [dense_profile(str(p), cfg) for p in o.profiles], ProfileSource.GIVEN
    recorded = (b.meta.get(DENSE_META) or {}).get("profile")
    if o.old is not None:
        own, source = dense_profile(str(o.old), cfg), ProfileSource.GIVEN
    elif recorded is not None:
        own, source = dense_profile(str(recorded), cfg), ProfileSource.DUMP
    else:
        own, source = cfg.profile, ProfileSource.CONFIG
    if o.new is not None:
        whatif = dense_profile(str(o.new), cfg)
    else:
        whatif = LEGACY if _divides_as_fixed(own) else FIXED
    if whatif.name == own.name:
        raise InputError(f"--old and --new are both {own.name}; pick two different profiles")
    return [own, whatif], source


def weights_of(checkpoint) -> DenseWeights:
    """The dense head of a one-stage checkpoint: DenseWeights as given, or read from the state
    dict a two-stage reader found to be a one-stage detector's."""
    if isinstance(checkpoint, DenseWeights):
        return checkpoint
    return dense_weights(checkpoint.state_dict, checkpoint.layout)


def fit_dense(w: DenseWeights, b: Batch, config=None) -> DenseConfig:
    """The config the dense head is replayed with (``config``: --config), checked against the
    head and the batch."""
    cfg = _config(config, b, w)
    _fit(w, b, cfg)
    return cfg


def inspect_dense(checkpoint, b: Batch, paths, o: ReplayOptions, on_phase,
                  world: WorldCounts | None = None):  # fmt: skip
    """The dense head of ``checkpoint`` (DenseWeights, or a OneStageCheckpoint) replayed on
    ``b`` → a Report; ``world``: the step's counts over its ranks, for the terms that reduce
    their count across ranks."""
    from .api import _named, _precision, run_meta
    from .diagnose.dense import diagnose_dense
    from .replay.dense import dense_replay
    from .report.dense import build_dense_report

    if _precision(o.precision) not in (None, Precision.FP32):
        raise InputError("--precision: a one-stage detector replays in fp32 only so far")
    w = weights_of(checkpoint)
    cfg = fit_dense(w, b, o.config)
    profs, source = _profiles(o, cfg, b)
    on_phase(Phase.REPLAY)
    r = dense_replay(w, b, cfg, profs, ema_before=_ema_before(b), world=world)
    on_phase(Phase.GRADIENTS)
    d = diagnose_dense(r, profs[0].name, o.score_thr)
    report = build_dense_report(d, *_named(paths))
    own = None if source is ProfileSource.GIVEN and o.old is None else profs[0].name
    report.meta.run = run_meta(report, b, profs[0].name, source, own)
    return report


def world_counts(reports: dict) -> WorldCounts | None:
    """A one-stage step's counts averaged over its ranks (rank → report), where any of its
    profiles reduces a count across ranks; None otherwise."""
    dense = [rep.meta.dense for rep in reports.values()]
    if len(dense) < 2 or any(d is None for d in dense):
        return None
    terms = [t for p in dense[0].profiles.values() for t in p.terms.values()]
    if not any(t.reduced for t in terms):
        return None
    n = len(dense)
    return WorldCounts(pos=sum(d.positives for d in dense) / n,
                       ctr_sum=sum(d.ctr_sum for d in dense) / n,
                       pseudo=sum(d.pseudo for d in dense) / n)  # fmt: skip
