"""The library's front door: paths or objects in, a replay (and later a report) out."""

from __future__ import annotations

from pathlib import Path

from .inputs.batch import Batch, load_batch
from .inputs.checkpoint import HeadWeights, check_fit, load_checkpoint
from .inputs.config import DetectorConfig, load_config, preset, replace
from .inputs.errors import InputError
from .inputs.profiles import LossProfile, load_profile


def resolve_inputs(
    checkpoint, batch, config=None, unsafe_load: bool = False
) -> tuple[HeadWeights, Batch, DetectorConfig]:
    """Load what is given as paths; the checkpoint layout picks the preset unless ``config`` says otherwise."""
    heads = (
        checkpoint
        if isinstance(checkpoint, HeadWeights)
        else load_checkpoint(checkpoint, unsafe=unsafe_load)
    )
    batch = batch if isinstance(batch, Batch) else load_batch(batch)
    if config is None:
        config = preset(heads.layout)
    elif not isinstance(config, DetectorConfig):
        config = load_config(config)
    check_fit(heads, batch, config)
    return heads, batch, config


def resolve_profiles(specs) -> list[LossProfile]:
    """Names, TOML paths or LossProfile objects → profiles, each under its own name."""
    profs = [p if isinstance(p, LossProfile) else load_profile(p) for p in specs]
    names = [p.name for p in profs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InputError(f"two profiles are both named {dup!r}; give each a different name")
    return profs


def run_replay(
    checkpoint: str | Path | HeadWeights,
    batch: str | Path | Batch,
    *,
    config: str | Path | DetectorConfig | None = None,
    profiles=("legacy", "fixed"),
    seed: int = 0,
    sample_all: bool = False,
    unsafe_load: bool = False,
):
    """Replay ``batch`` through the checkpoint's heads under each profile → :class:`~lossdoctor.replay.engine.Replay`.

    ``profiles`` are built-in names, TOML paths or :class:`LossProfile` objects.
    """
    from .replay.engine import replay

    heads, batch, config = resolve_inputs(checkpoint, batch, config, unsafe_load)
    return replay(
        heads, batch, config, resolve_profiles(profiles), seed=seed, sample_all=sample_all
    )


def inspect(
    checkpoint,
    batch,
    *,
    config=None,
    old="legacy",
    new="fixed",
    profiles=None,
    seed: int | None = None,
    sample_all: bool = False,
    score_thr: float | None = None,
    unsafe_load: bool = False,
):
    """Replay and diagnose ``batch`` under two (or more) profiles → :class:`~lossdoctor.report.model.Report`.

    ``profiles`` (a list) overrides ``old``/``new``; entries are names, TOML paths or LossProfile objects.
    ``seed`` None takes the dump's ``meta["sample_seed"]`` (what the capture hook records), else 0.
    """
    from .diagnose import diagnose
    from .replay.engine import replay
    from .report.build import build_report

    heads, b, cfg = resolve_inputs(checkpoint, batch, config, unsafe_load)
    if score_thr is not None:
        cfg = replace(cfg, test=replace(cfg.test, score_thr=score_thr))
    profs = resolve_profiles(list(profiles) if profiles is not None else [old, new])
    if seed is None:
        seed = int(b.meta.get("sample_seed", 0))
    r = replay(heads, b, cfg, profs, seed=seed, sample_all=sample_all)
    return build_report(
        diagnose(r),
        checkpoint if isinstance(checkpoint, (str, Path)) else None,
        batch if isinstance(batch, (str, Path)) else None,
    )
