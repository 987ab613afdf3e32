"""The library's front door: paths or objects in, a replay, a report or a comparison out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .inputs.batch import Batch, load_batch
from .inputs.checkpoint import HeadWeights, check_fit, load_checkpoint
from .inputs.config import DetectorConfig, load_config, preset, replace
from .inputs.errors import InputError
from .inputs.profiles import LossProfile, load_profile

REPORT_SUFFIX = ".json"


def resolve_inputs(
    checkpoint, batch, config=None, unsafe_load: bool = False
) -> tuple[HeadWeights, Batch, DetectorConfig]:
    """Load what is given as paths; the checkpoint layout picks the preset unless ``config``
    says otherwise."""
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
    """Replay ``batch`` through the checkpoint's heads under each profile →
    :class:`~lossdoctor.replay.engine.Replay`. ``profiles`` are built-in names, TOML paths or
    :class:`LossProfile` objects."""
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
    """Replay and diagnose ``batch`` under two (or more) profiles →
    :class:`~lossdoctor.report.model.Report`.

    ``profiles`` (a list) overrides ``old``/``new``; entries are names, TOML paths or
    LossProfile objects. ``seed`` None takes the dump's ``meta["sample_seed"]`` (what the capture
    hook records), else 0.
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
    ckpt_path = checkpoint if isinstance(checkpoint, (str, Path)) else None
    batch_path = batch if isinstance(batch, (str, Path)) else None
    return build_report(diagnose(r), ckpt_path, batch_path)


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a profile (name, TOML or LossProfile) or a report (a Report, or
    a ``.json`` path, optionally ``REPORT.json:PROFILE``)."""

    spec: object
    report: object = None  # a Report once loaded
    profile: str | None = None  # the report's profile to compare, if one is picked

    @property
    def is_report(self) -> bool:
        return self.report is not None


def side(spec) -> Side:
    """Parse and load one side of a comparison."""
    from .report.model import Report

    if isinstance(spec, Report):
        return Side(spec, spec)
    text = str(spec) if isinstance(spec, (str, Path)) else None
    if text is None or not (text.endswith(REPORT_SUFFIX) or f"{REPORT_SUFFIX}:" in text):
        return Side(spec)
    path, _, profile = text.partition(f"{REPORT_SUFFIX}:")
    path = path + REPORT_SUFFIX if profile else text
    report = Report.load(path)
    if profile and profile not in report.profiles:
        raise InputError(
            f"report {path} has no profile {profile!r}; it has {', '.join(report.profiles)}"
        )
    return Side(path, report, profile or None)


def compare(old, new, *, checkpoint=None, batch=None, **replay_options):
    """Compare two sides → :class:`~lossdoctor.report.compare.CompareResult`.

    Two profiles (names, TOML files or LossProfile objects) are replayed on ``checkpoint`` and
    ``batch`` (with ``config``, ``seed``, ``sample_all``, ``score_thr``, ``unsafe_load`` as for
    :func:`inspect`); two reports (``Report`` objects, ``.json`` paths, ``REPORT.json:PROFILE``)
    need neither.
    """
    from .report.compare import CompareResult, compare_profiles, compare_reports

    a, b = side(old), side(new)
    if a.is_report != b.is_report:
        raise InputError("--old and --new must both be profiles or both be reports (.json)")
    if not a.is_report:
        if checkpoint is None or batch is None:
            raise InputError(
                "comparing two profiles needs CKPT and BATCH: "
                "lossdoctor compare CKPT BATCH --old A --new B"
            )
        report = inspect(checkpoint, batch, old=a.spec, new=b.spec, **replay_options)
        first, second = report.profiles[:2]
        comps = [compare_profiles(report, first, report, second)]
        return CompareResult(
            comparisons=comps, new_report=report, new_profile=second, report=report
        )
    if checkpoint is not None or batch is not None:
        raise InputError(
            "two reports need no CKPT or BATCH; drop them, or compare profiles instead"
        )
    comps = compare_reports(
        a.report, b.report, a.profile, b.profile, labels=(str(a.spec), str(b.spec))
    )
    if not comps:
        raise InputError(
            f"the reports share no profile ({', '.join(a.report.profiles)} vs "
            f"{', '.join(b.report.profiles)}); pick one with REPORT.json:PROFILE"
        )
    return CompareResult(comparisons=comps, new_report=b.report, new_profile=b.profile)
