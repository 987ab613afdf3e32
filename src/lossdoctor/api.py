"""The library's front door: paths or objects in, a replay, a report or a comparison out."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from .inputs.amp import amp_record, precision_named, run_precision
from .inputs.batch import Batch, load_batch
from .inputs.checkpoint import HeadWeights, OneStageCheckpoint, check_fit, load_checkpoint
from .inputs.checks import check_seed
from .inputs.config import DetectorConfig, config_from_meta, load_config, preset, replace
from .inputs.errors import InputError
from .inputs.profiles import LossProfile, load_profile, profile_from_meta, with_losses_of
from .options import ReplayOptions, options_of
from .vocab import Phase, Precision, ProfileSource

REPORT_SUFFIX = ".json"
# a capture directory holds these two files
CHECKPOINT_FILE, BATCH_FILE = "checkpoint.pt", "batch.pt"
# without a profile recorded in the dump or given: the naive code, against the fix
DEFAULT_OLD, DEFAULT_NEW = "legacy", "fixed"


def capture_files(checkpoint, batch):
    """(checkpoint, batch) as given, or the two files of a capture directory given as the
    checkpoint with no batch."""
    if batch is not None or isinstance(checkpoint, HeadWeights):
        return checkpoint, batch
    folder = Path(checkpoint)
    if folder.is_dir():
        ckpt, dump = folder / CHECKPOINT_FILE, folder / BATCH_FILE
        if ckpt.is_file() and dump.is_file():
            return ckpt, dump
        if dump.is_file():
            raise InputError(
                f"{folder} holds {BATCH_FILE} but no {CHECKPOINT_FILE}: pass a checkpoint with "
                f"it (CKPT {dump}), or check the batch alone (lossdoctor check {dump})"
            )
        raise InputError(
            f"{folder} is a folder without {CHECKPOINT_FILE} and {BATCH_FILE}; pass CKPT BATCH, "
            "or a capture directory as the capture hook and the framework adapters write it"
        )
    if not folder.exists():
        raise InputError(f"{folder}: no such file or folder; check the path")
    raise InputError(
        f"BATCH is missing: pass CKPT BATCH, or a capture directory holding {CHECKPOINT_FILE} and "
        f"{BATCH_FILE}"
    )


def files_to_check(batch, checkpoint=None) -> tuple[Path | None, Path]:
    """``check``'s inputs: (checkpoint or None, batch). A folder given as BATCH is a capture
    directory, or a folder holding only a batch dump (checked alone)."""
    folder = Path(batch)
    if checkpoint is None and folder.is_dir():
        if (folder / BATCH_FILE).is_file() and not (folder / CHECKPOINT_FILE).exists():
            return None, folder / BATCH_FILE
        return capture_files(folder, None)
    if not folder.exists():
        raise InputError(f"{folder}: no such file or folder; check the path")
    return (None if checkpoint is None else Path(checkpoint)), folder


def resolve_inputs(
    checkpoint, batch, config=None, unsafe_load: bool = False
) -> tuple[HeadWeights, Batch, DetectorConfig]:
    """Load what is given as paths (a capture directory too). The config: ``config``, else the
    one the dump records (``meta["config"]``), else the preset of the checkpoint's layout."""
    checkpoint, batch = capture_files(checkpoint, batch)
    batch = (
        batch if isinstance(batch, Batch) else _load_batch_second(checkpoint, batch, unsafe_load)
    )
    unsupported = batch.meta.get("unsupported")
    if unsupported is not None:  # the live model's words first: they name its classes
        raise InputError(f"this capture's model cannot be replayed: {unsupported}")
    heads = checkpoint
    if not isinstance(checkpoint, HeadWeights):
        try:
            heads = load_checkpoint(checkpoint, unsafe=unsafe_load)
        except OneStageCheckpoint as e:
            e.batch = batch  # inspect replays it as a dense head
            raise
    if not isinstance(checkpoint, HeadWeights):
        # a heads-only capture: what the rest of the model held, as the capture summarized it
        summary = batch.meta.get("weights") or {}
        heads.nonfinite_elsewhere.update(summary.get("nonfinite_elsewhere") or {})
    if config is None:
        recorded = batch.meta.get("config")
        config = preset(heads.layout) if recorded is None else config_from_meta(recorded)
    elif not isinstance(config, DetectorConfig):
        config = load_config(config)
    check_fit(heads, batch, config)
    return heads, batch, config


def _load_batch_second(checkpoint, batch, unsafe_load: bool) -> Batch:
    """The batch, read before the checkpoint (its meta may say why the model cannot be replayed);
    when it is unreadable, the checkpoint's own complaint comes first: it names swapped files."""
    try:
        return load_batch(batch)
    except InputError:
        if not isinstance(checkpoint, HeadWeights):
            load_checkpoint(checkpoint, unsafe=unsafe_load)
        raise


def resolve_profiles(specs) -> list[LossProfile]:
    """Names, TOML paths or LossProfile objects → profiles, each under its own name."""
    profs = [p if isinstance(p, LossProfile) else load_profile(p) for p in specs]
    names = [p.name for p in profs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InputError(f"two profiles are both named {dup!r}; give each a different name")
    return profs


def run_profiles(
    batch: Batch, old=None, new=None
) -> tuple[LossProfile, LossProfile, ProfileSource]:
    """The run's own profile and the what-if, and where the run's came from: ``old`` (given),
    the dump's ``meta["profile"]``, or the default (legacy). The what-if defaults to fixed, or to
    legacy when the run trained with fixed."""
    if old is not None:
        own, source = resolve_profiles([old])[0], ProfileSource.GIVEN
    elif batch.meta.get("profile") is not None:
        own, source = profile_from_meta(batch.meta["profile"]), ProfileSource.DUMP
    else:
        own, source = load_profile(DEFAULT_OLD), ProfileSource.DEFAULT
    if new is not None:
        return own, resolve_profiles([own, new])[1], source
    whatif = load_profile(DEFAULT_OLD if own.name == DEFAULT_NEW else DEFAULT_NEW)
    return own, with_losses_of(whatif, own), source


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


def _profiles(b: Batch, profiles, old, new) -> tuple[list[LossProfile], ProfileSource]:
    if profiles is not None:
        return resolve_profiles(list(profiles)), ProfileSource.GIVEN
    own, whatif, source = run_profiles(b, old, new)
    return [own, whatif], source


def _quiet(phase) -> None:
    pass


# the folder of one rank's capture inside a step folder
RANK_FOLDER = re.compile(r"rank_(\d+)")


def inspect(checkpoint, batch=None, options: ReplayOptions | None = None, *, on_phase=_quiet,
            **fields):  # fmt: skip
    """Replay and diagnose ``batch`` under the run's own profile and a what-if → a Report.

    ``checkpoint`` may be a capture directory (``batch`` then None), or a step folder of
    ``rank_K`` capture directories (every rank in one report). ``options`` (or its fields as
    keywords: ``config``, ``old``, ``new``, ``profiles``, ``seed``, ``sample_all``,
    ``score_thr``, ``unsafe_load``) is a :class:`~lossdoctor.options.ReplayOptions`; findings
    are framed as the run's profile's or the what-if's. ``on_phase(Phase)`` is called as each
    phase starts.
    """
    opts = options_of(options, fields)
    if batch is None and step_ranks(checkpoint):
        return inspect_step(checkpoint, opts, on_phase=on_phase)
    return _inspect_dump(checkpoint, batch, opts, on_phase)


def _inspect_dump(checkpoint, batch, o: ReplayOptions, on_phase, world=None):
    from .diagnose import diagnose
    from .replay.engine import replay
    from .report.build import build_report

    on_phase(Phase.LOAD)
    paths = capture_files(checkpoint, batch)
    from .dense import inspect_dense
    from .inputs.dense_weights import DenseWeights

    if isinstance(paths[0], DenseWeights):  # a one-stage head in memory
        b = paths[1] if isinstance(paths[1], Batch) else load_batch(paths[1])
        return inspect_dense(paths[0], b, paths, o, on_phase, world)
    try:
        heads, b, cfg = resolve_inputs(*paths, o.config, o.unsafe_load)
    except OneStageCheckpoint as e:
        return inspect_dense(e, e.batch, paths, o, on_phase, world)
    if o.score_thr is not None:
        cfg = replace(cfg, test=replace(cfg.test, score_thr=o.score_thr))
    profs, source = _profiles(b, o.profiles, o.old, o.new)
    on_phase(Phase.REPLAY)
    seed = int(b.meta.get("sample_seed", 0)) if o.seed is None else o.seed
    check_seed(seed, "--seed")
    choice = run_precision(_precision(o.precision), amp_record(b.meta), b.feature_dtype)
    heads = dataclasses.replace(heads, precision=choice.precision)
    r = replay(heads, b, cfg, profs, seed=seed, sample_all=o.sample_all)
    own = _own_profile(b, profs, source, o.old)
    d = diagnose(r, run_profile=own, precision=choice, on_phase=on_phase)
    report = build_report(d, *_named(paths))
    report.meta.run = run_meta(report, b, profs[0].name, source, own)
    return report


def run_meta(report, b: Batch, profile: str, source: ProfileSource, own: str | None):
    """What a report records of the run: its profiles, the framework, step and rank."""
    from .report.meta import RunMeta

    dump = report.meta.batch.dump
    return RunMeta(profile=profile, source=source, own=own, step=dump.step, rank=dump.rank,
                   framework=_framework(b.meta.get("framework")))  # fmt: skip


def _precision(value) -> Precision | None:
    """``--precision`` as given: a Precision, one of its names or a torch dtype name."""
    if value is None or isinstance(value, Precision):
        return value
    named = precision_named(value)
    if named is None:
        raise InputError(f"unknown precision {value!r}; use one of {', '.join(Precision)}")
    return named


def _framework(value) -> str | None:
    return value if isinstance(value, str) else None


def _named(paths) -> list:
    """The paths of files (None for objects passed in memory)."""
    return [p if isinstance(p, (str, Path)) else None for p in paths]


def step_ranks(folder) -> dict[int, Path]:
    """The ``rank_K`` capture directories of a step folder (rank → folder); empty for anything
    else."""
    p = Path(folder) if isinstance(folder, (str, Path)) else None
    if p is None or not p.is_dir():
        return {}
    matches = ((RANK_FOLDER.fullmatch(d.name), d) for d in p.iterdir() if d.is_dir())
    return {int(m.group(1)): d for m, d in matches if m}


def inspect_step(step_dir, options: ReplayOptions | None = None, *, on_phase=_quiet, **fields):
    """Every rank of one step (a folder of ``rank_K`` capture directories) in one report: each
    rank's tables with a ``rank`` column, the ``ranks`` table (each rank's normalizer next to an
    all-reduced one) and the findings across ranks. ``options`` as for :func:`inspect`."""
    from .report.ranks import combine_ranks

    opts = options_of(options, fields)
    reports = _rank_reports(step_dir, opts, on_phase)
    if not reports:
        raise InputError(f"{step_dir} holds no rank_K capture directories")
    from .dense import world_counts

    world = world_counts(reports)
    if world is not None:  # a one-stage head's reduced terms divide by the step's mean counts
        reports = _rank_reports(step_dir, opts, on_phase, world)
    _check_ranks(step_dir, reports)
    return combine_ranks(reports)


def _rank_reports(step_dir, opts: ReplayOptions, on_phase, world=None) -> dict:
    reports = {}
    for rank, folder in sorted(step_ranks(step_dir).items()):
        try:
            reports[rank] = _inspect_dump(folder, None, opts, on_phase, world)
        except InputError as e:
            raise InputError(f"rank {rank} ({folder}): {e}") from None
    return reports


def _check_ranks(step_dir, reports: dict) -> None:
    """Each rank folder holds that rank's capture, all of one step (as the dumps record them)."""
    for folder_rank, rep in reports.items():
        rank = rep.meta.run.rank
        if rank is not None and rank != folder_rank:
            raise InputError(
                f"{step_dir}: rank_{folder_rank} holds a dump of rank {rank}; each rank_K folder "
                "must hold rank K's capture (two folders of one rank, or a renamed folder?)"
            )
    steps = {r: rep.meta.run.step for r, rep in reports.items()}
    if len(set(steps.values()) - {None}) > 1:
        found = ", ".join(f"rank {r}: step {s}" for r, s in sorted(steps.items()))
        raise InputError(
            f"{step_dir}: its rank folders hold dumps of different steps ({found}); a step "
            "folder must hold one step's captures"
        )


def _own_profile(b: Batch, profs: list[LossProfile], source: ProfileSource, old) -> str | None:
    """The replayed profile the run trained with, when it is known: ``old`` as given, or the
    dump's (also among an explicit ``profiles`` list)."""
    if source is ProfileSource.GIVEN and old is not None:
        return profs[0].name
    if source is ProfileSource.DUMP:
        return profs[0].name
    recorded = b.meta.get("profile")
    if source is ProfileSource.GIVEN and recorded is not None:
        name = profile_from_meta(recorded).name
        return name if name in [p.name for p in profs] else None
    return None


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a profile (name, TOML or LossProfile), a precision (fp32, fp16,
    bf16: the same replay with the heads in it) or a report (a Report, or a ``.json`` path,
    optionally ``REPORT.json:PROFILE``)."""

    spec: object
    report: object = None  # a Report once loaded
    profile: str | None = None  # the report's profile to compare, if one is picked
    precision: Precision | None = None

    @property
    def is_report(self) -> bool:
        return self.report is not None

    @property
    def kind(self) -> str:
        if self.is_report:
            return "report"
        return "precision" if self.precision is not None else "profile"


def side(spec) -> Side:
    """Parse and load one side of a comparison."""
    from .report.model import Report

    if isinstance(spec, Report):
        return Side(spec, spec)
    if isinstance(spec, Precision) or (isinstance(spec, str) and spec in set(Precision)):
        return Side(spec, precision=Precision(spec))
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


def _compare_profiles(a: Side, b: Side, checkpoint, batch, options: ReplayOptions):
    from .report.compare import CompareResult, compare_profiles

    if checkpoint is None:
        raise InputError(
            "comparing two profiles needs CKPT and BATCH (or a capture directory): "
            "lossdoctor compare CKPT BATCH --old A --new B"
        )
    report = inspect(checkpoint, batch, replace(options, old=a.spec, new=b.spec))
    first, second = report.profiles[:2]
    comps = [compare_profiles(report, first, report, second)]
    return CompareResult(comparisons=comps, new_report=report, new_profile=second, report=report)


def _compare_precisions(a: Side, b: Side, checkpoint, batch, options: ReplayOptions):
    """The same replay with the heads in two precisions, compared as two reports."""
    from .report.compare import CompareResult, compare_reports

    if checkpoint is None:
        raise InputError(
            "comparing two precisions needs CKPT and BATCH (or a capture directory): "
            "lossdoctor compare DIR --old fp32 --new fp16"
        )
    old, new = (inspect(checkpoint, batch, replace(options, old=None, new=None,
                                                   precision=s.precision))
                for s in (a, b))  # fmt: skip
    comps = compare_reports(old, new, labels=(str(a.precision), str(b.precision)))
    return CompareResult(comparisons=comps, new_report=new, report=new)


def _compare_reports(a: Side, b: Side, checkpoint, batch):
    from .report.compare import CompareResult, compare_reports, run_differences

    if checkpoint is not None or batch is not None:
        raise InputError(
            "two reports need no CKPT or BATCH; drop them, or compare profiles instead"
        )
    labels = (str(a.spec), str(b.spec))
    comps = compare_reports(a.report, b.report, a.profile, b.profile, labels=labels)
    if not comps:
        raise InputError(
            f"the reports share no profile ({', '.join(a.report.profiles)} vs "
            f"{', '.join(b.report.profiles)}); pick one with REPORT.json:PROFILE"
        )
    return CompareResult(
        comparisons=comps,
        new_report=b.report,
        new_profile=b.profile,
        warnings=run_differences(a.report, b.report),
    )


def compare(old, new, *, checkpoint=None, batch=None, options: ReplayOptions | None = None,
            **fields):  # fmt: skip
    """Compare two sides → :class:`~lossdoctor.report.compare.CompareResult`.

    Two profiles (names, TOML files or LossProfile objects), or two precisions (fp32, fp16,
    bf16), are replayed on ``checkpoint`` and ``batch`` (or a capture directory as
    ``checkpoint``) with ``options`` (or its fields as keywords) as for :func:`inspect`, whose
    ``old`` and ``new`` (or ``precision``) they set; two reports
    (``Report`` objects, ``.json`` paths, ``REPORT.json:PROFILE``) need neither.
    """
    a, b = side(old), side(new)
    if a.kind != b.kind:
        raise InputError(
            "--old and --new must both be profiles, both precisions (fp32, fp16, bf16) or both "
            f"reports (.json); got a {a.kind} and a {b.kind}"
        )
    if a.is_report:
        return _compare_reports(a, b, checkpoint, batch)
    if a.precision is not None:
        return _compare_precisions(a, b, checkpoint, batch, options_of(options, fields))
    return _compare_profiles(a, b, checkpoint, batch, options_of(options, fields))
