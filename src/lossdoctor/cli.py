"""The lossdoctor command line: a thin layer over the library.

Only typer is imported at start-up; torch, pandas and matplotlib load inside the commands that
need them, so ``lossdoctor --help`` stays fast. The vocabulary module is plain Python.
"""

from __future__ import annotations

import os
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from .options import ReplayOptions
from .vocab import LOCAL_RAY, FailOn, Precision

EXIT_FINDING = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


def _click_class(name: str) -> type:
    """click's exception classes as typer uses them (recent typer vendors its own click)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


_USAGE_ERROR = _click_class("UsageError")
_CLICK_EXCEPTION = _click_class("ClickException")


class OneLineErrors(TyperGroup):
    """Usage and input errors become one line on stderr and exit code 2, never a traceback."""

    def main(self, args=None, *rest, **kwargs):
        kwargs["standalone_mode"] = False
        args = _bare_ray(list(sys.argv[1:] if args is None else args))
        try:
            code = super().main(args, *rest, **kwargs)
        except _USAGE_ERROR as e:
            if type(e).__name__ == "NoArgsIsHelpError":
                typer.echo(e.ctx.get_help())
                sys.exit(0)
            cmd = e.ctx.command_path if e.ctx else "lossdoctor"
            typer.echo(f"lossdoctor: error: {e.format_message()} (see '{cmd} --help')", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except typer.Abort:
            typer.echo("lossdoctor: aborted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except _CLICK_EXCEPTION as e:
            typer.echo(f"lossdoctor: error: {e.format_message()}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        sys.exit(code or 0)


def _bare_ray(args: list[str]) -> list[str]:
    """``--ray`` with no address after it (the last argument, or an option next) means a local
    cluster."""
    return [
        f"--ray={LOCAL_RAY}"
        if a == "--ray" and (k + 1 == len(args) or args[k + 1].startswith("-"))
        else a
        for k, a in enumerate(args)
    ]


class PlainUsage(typer.core.TyperCommand):
    """A command whose usage line names required arguments bare (``CKPT``), as click does,
    not in braces."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [re.sub(r"^\{(.+)\}(\.\.\.)?$", r"\1\2", p) for p in pieces]


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Replay and diagnose the RPN and RoI losses of a two-stage detector (Faster, Mask or "
    "Cascade R-CNN with an FPN) on one dumped batch.\n\n\b\nExample:\n"
    "  lossdoctor inspect fixtures/collapse",
)

# ---- options shared by the commands ------------------------------------------------------------

CkptArg = Annotated[
    str,
    typer.Argument(
        metavar="CKPT",
        help="checkpoint (.pt/.pth, or .safetensors), or a capture directory holding "
        "checkpoint.pt and batch.pt (then no BATCH)",
    ),
]
OptionalBatchArg = Annotated[
    str | None,
    typer.Argument(
        metavar="BATCH",
        help="batch dump written by lossdoctor.dump_batch (omit with a capture directory)",
    ),
]
OwnProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--old",
        help="the run's own profile: a built-in name or a profile .toml (default: the one the "
        "dump records, else legacy)",
    ),
]
WhatIfOpt = Annotated[
    str | None,
    typer.Option(
        "--new",
        help="the what-if profile: a built-in name or a profile .toml (default: fixed; legacy "
        "when the run trained with fixed)",
    ),
]
LevelsCsvOpt = Annotated[str | None, typer.Option("--csv", help="write the levels table to FILE")]
ReportJsonOpt = Annotated[
    str | None,
    typer.Option(
        "--json",
        help="write the report as JSON to FILE, or to stdout with '-' (the terminal view then "
        "goes to stderr)",
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="print only the symptom and the findings")
]
BatchArg = Annotated[
    str, typer.Argument(metavar="BATCH", help="batch dump written by lossdoctor.dump_batch")
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="detector preset (torchvision, mmdet, detectron2, each with -mask; mmdet-cascade, "
        "detectron2-cascade) or .toml; "
        "default: from the checkpoint layout",
    ),
]
SeedOpt = Annotated[
    int | None,
    typer.Option("--seed", help="sampling seed (default: the dump's meta sample_seed, else 0)"),
]
SampleAllOpt = Annotated[
    bool, typer.Option("--sample-all", help="take every candidate instead of sampling")
]
PrecisionOpt = Annotated[
    Precision | None,
    typer.Option(
        "--precision",
        help="run the heads' layers in fp32, fp16 or bf16 (CPU autocast) (default: the dump's "
        "autocast dtype, else fp32)",
    ),
]
DeviceOpt = Annotated[
    Device, typer.Option("--device", help="where to replay (the CPU in this version)")
]
ScoreThrOpt = Annotated[
    float | None,
    typer.Option(
        "--score-thr", help="detection score threshold in [0, 1] (default: the config's, 0.05)"
    ),
]
CsvDirOpt = Annotated[
    str | None, typer.Option("--csv-dir", help="write every table to DIR/<table>.csv")
]
PlotOpt = Annotated[str | None, typer.Option("--plot", help="write a PNG figure to FILE")]
FailOnOpt = Annotated[
    FailOn, typer.Option("--fail-on", help="exit 1 if a finding at or above this severity exists")
]
UnsafeOpt = Annotated[
    bool,
    typer.Option(
        "--unsafe-load",
        help="read the checkpoint with torch.load(weights_only=False): "
        "runs code from the file; only for files you trust",
    ),
]


# compare's own
SIDE_HELP = (
    "profile name, profile .toml, precision (fp32, fp16, bf16), or report .json "
    "(REPORT.json:PROFILE picks one)"
)
OptionalCkpt = Annotated[
    str | None,
    typer.Argument(
        metavar="CKPT", help="checkpoint or capture directory (when both sides are profiles)"
    ),
]
OptionalBatch = Annotated[
    str | None,
    typer.Argument(metavar="BATCH", help="batch dump (when both sides are profiles)"),
]
OldSide = Annotated[str, typer.Option("--old", help=SIDE_HELP)]
NewSide = Annotated[str, typer.Option("--new", help=SIDE_HELP)]
CompareCsv = Annotated[str | None, typer.Option("--csv", help="write the comparison rows to FILE")]
CompareJson = Annotated[
    str | None,
    typer.Option("--json", help="write the comparison as JSON to FILE, or '-' for stdout"),
]
AllRows = Annotated[bool, typer.Option("--all", help="show unchanged metrics too")]


def _fail(message: str) -> None:
    typer.echo(f"lossdoctor: error: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _guard(fn):
    """Run a command body: InputError → one line, exit 2; a bug → one line, exit 3 (the traceback
    with LOSSDOCTOR_DEBUG=1)."""
    from .inputs.errors import InputError

    try:
        return fn()
    except typer.Exit:
        raise
    except InputError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("lossdoctor: interrupted; no output file was left half-written", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as e:
        if os.environ.get("LOSSDOCTOR_DEBUG"):
            raise
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        typer.echo(
            f"lossdoctor: internal error: {type(e).__name__}: {msg} "
            "(set LOSSDOCTOR_DEBUG=1 for the traceback)",
            err=True,
        )
        raise typer.Exit(EXIT_INTERNAL) from None


def _check_device(device: Device) -> None:
    if device == Device.cuda:
        from .inputs.errors import InputError

        raise InputError(
            "--device cuda is not supported by this version: the replay runs on the CPU; "
            "use --device cpu"
        )


def _file_inputs(**roles):
    """Every file a command reads, by role, for the output guard: a folder stands for the files
    under it (capture directory, step folder, scan root); built-in names are no files."""
    from .inputs.files import InputFiles

    return InputFiles(roles)


def _checked_outputs(json_out, csv, csv_dir, plot, **roles):
    """The outputs, refused before any work if one is a directory, an input or written twice."""
    from .report.export import Outputs

    outputs, inputs = Outputs(json_out, csv, csv_dir, plot), _file_inputs(**roles)
    outputs.check(inputs)
    return outputs, inputs


def _stdout_json(json_out: str | None, text: str) -> None:
    if json_out == "-":
        sys.stdout.write(text + "\n")


# ---- commands ----------------------------------------------------------------------------------


@app.command(cls=PlainUsage)
def inspect(
    ckpt: CkptArg,
    batch: OptionalBatchArg = None,
    old: OwnProfileOpt = None,
    new: WhatIfOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    sample_all: SampleAllOpt = False,
    precision: PrecisionOpt = None,
    device: DeviceOpt = Device.cpu,
    score_thr: ScoreThrOpt = None,
    csv: LevelsCsvOpt = None,
    csv_dir: CsvDirOpt = None,
    json_out: ReportJsonOpt = None,
    plot: PlotOpt = None,
    fail_on: FailOnOpt = FailOn.NEVER,
    unsafe_load: UnsafeOpt = False,
    quiet: QuietOpt = False,
):
    """Replay BATCH through CKPT's heads under the run's profile and a what-if, and diagnose.

    \b
    Examples:
      lossdoctor inspect lossdoctor-dumps/step_000123
      lossdoctor inspect ckpt_5000.pt batch.pt --csv levels.csv --plot levels.png
    """
    options = ReplayOptions(config=config, old=old, new=new, seed=seed, sample_all=sample_all,
                            score_thr=score_thr, unsafe_load=unsafe_load,
                            precision=precision)  # fmt: skip
    outputs = (json_out, csv, csv_dir, plot)
    _guard(lambda: _inspect(ckpt, batch, options, outputs, device, fail_on=fail_on, quiet=quiet))


def _progress(quiet: bool):
    """The progress line on stderr (a terminal only; never with --quiet)."""
    from .report.progress import PhaseStatus
    from .report.render import console

    return PhaseStatus(console(stderr=True), enabled=not quiet)


def _inspect(ckpt, batch, o: ReplayOptions, outputs: tuple, device: Device, *, fail_on, quiet):
    _check_device(device)
    from .api import inspect as run_inspect
    from .report.export import export
    from .report.render import console, render

    json_out = outputs[0]
    checked, inputs = _checked_outputs(*outputs, checkpoint=ckpt, batch=batch, config=o.config,
                                       old_profile=o.old, new_profile=o.new)  # fmt: skip
    with _progress(quiet) as on_phase:
        report = run_inspect(ckpt, batch, o, on_phase=on_phase)
    export(report, checked, inputs)
    _stdout_json(json_out, report.to_json())
    render(report, console(stderr=json_out == "-"), quiet=quiet)
    if report.fails(fail_on):
        raise typer.Exit(EXIT_FINDING)


@app.command(cls=PlainUsage)
def compare(
    ckpt: OptionalCkpt = None,
    batch: OptionalBatch = None,
    old: OldSide = ...,
    new: NewSide = ...,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    sample_all: SampleAllOpt = False,
    precision: PrecisionOpt = None,
    device: DeviceOpt = Device.cpu,
    score_thr: ScoreThrOpt = None,
    csv: CompareCsv = None,
    csv_dir: CsvDirOpt = None,
    json_out: CompareJson = None,
    plot: PlotOpt = None,
    fail_on: FailOnOpt = FailOn.NEVER,
    unsafe_load: UnsafeOpt = False,
    all_rows: AllRows = False,
):
    """Compare two profiles or two precisions on one batch, or two saved reports.

    \b
    Examples:
      lossdoctor compare ckpt.pt batch.pt --old legacy --new fixed
      lossdoctor compare lossdoctor-dumps/step_000123 --old fp32 --new fp16
      lossdoctor compare --old r1000.json --new r5000.json
      lossdoctor compare --old r5000.json:legacy --new r5000.json:fixed
    """
    options = ReplayOptions(config=config, old=old, new=new, seed=seed, sample_all=sample_all,
                            score_thr=score_thr, unsafe_load=unsafe_load,
                            precision=precision)  # fmt: skip
    outputs = (json_out, csv, csv_dir, plot)
    _guard(lambda: _compare(ckpt, batch, options, outputs, device, fail_on=fail_on,
                            all_rows=all_rows))  # fmt: skip


def _compare(ckpt, batch, o: ReplayOptions, outputs: tuple, device: Device, *, fail_on,
             all_rows):  # fmt: skip
    _check_device(device)
    from .api import compare as run_compare
    from .inputs.errors import InputError
    from .report.export import Outputs, export
    from .report.render import console, render_comparison

    json_out, csv, csv_dir, plot = outputs
    _, inputs = _checked_outputs(*outputs, checkpoint=ckpt, batch=batch, config=o.config,
                                 old=o.old, new=o.new)  # fmt: skip
    result = run_compare(o.old, o.new, checkpoint=ckpt, batch=batch, options=o)
    if result.report is None and (csv_dir or plot):
        raise InputError(
            "--csv-dir and --plot need a replay: compare two profiles with CKPT and BATCH"
        )
    if result.report is not None:
        export(result.report, Outputs(csv_dir=csv_dir, plot=plot), inputs)
    if json_out and json_out != "-":
        result.save_json(json_out)
    if csv:
        result.save_csv(csv)
    _stdout_json(json_out, result.to_json())
    for warning in result.warnings:
        typer.echo(f"lossdoctor: warning: {warning}", err=True)
    render_comparison(
        result.comparisons, console(stderr=json_out == "-"), changed_only=not all_rows
    )
    if result.fails(fail_on):
        raise typer.Exit(EXIT_FINDING)


ScanPaths = Annotated[
    list[str],
    typer.Argument(
        metavar="DIR",
        help="capture directories, step folders of rank_K captures, folders of them (as the hook "
        "writes lossdoctor-dumps/), or checkpoint files with --batch",
    ),
]
ScanBatchOpt = Annotated[
    str | None,
    typer.Option("--batch", help="replay every checkpoint given on this one batch dump"),
]
ResultsOpt = Annotated[
    str,
    typer.Option(
        "--results",
        help="folder for each dump's result, written as it arrives; a rerun reuses them",
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", min=1, help="local worker processes (default: the CPU count)"),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="torch threads per worker (default: CPUs / workers, "
                 "1 to 2)"),
]  # fmt: skip
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="[ADDRESS]",
        help="run one Ray task per dump instead: alone, a local cluster; 'auto' joins the running "
        "one, or give its address (pip install 'lossdoctor[ray]'; dumps on a path every node "
        "sees)",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="recompute dumps already done")]


@app.command(cls=PlainUsage)
def scan(
    paths: ScanPaths,
    batch: ScanBatchOpt = None,
    results: ResultsOpt = "lossdoctor-scan",
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    ray: RayOpt = None,
    force: ForceOpt = False,
    old: OwnProfileOpt = None,
    new: WhatIfOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    sample_all: SampleAllOpt = False,
    precision: PrecisionOpt = None,
    score_thr: ScoreThrOpt = None,
    csv_dir: CsvDirOpt = None,
    json_out: ReportJsonOpt = None,
    plot: PlotOpt = None,
    fail_on: FailOnOpt = FailOn.NEVER,
    unsafe_load: UnsafeOpt = False,
    quiet: QuietOpt = False,
):
    """Replay many dumps (steps x ranks) in parallel into one timeline: the first step of each
    finding, per-dump tables over steps and ranks, the findings across the ranks of each step.

    \b
    Examples:
      lossdoctor scan lossdoctor-dumps --plot timeline.png --json scan.json
      lossdoctor scan ckpt_1000.pt ckpt_2000.pt ckpt_3000.pt --batch batch.pt
      lossdoctor scan /shared/dumps --ray auto
    """
    options = ReplayOptions(config=config, old=old, new=new, seed=seed, sample_all=sample_all,
                            score_thr=score_thr, unsafe_load=unsafe_load,
                            precision=precision)  # fmt: skip
    outputs = (json_out, csv_dir, plot)
    _guard(
        lambda: _scan(paths, options, outputs, batch=batch, results=results, workers=workers,
                      threads=threads, ray=ray, force=force, fail_on=fail_on, quiet=quiet)
    )  # fmt: skip


def _scan(paths, o: ReplayOptions, outputs: tuple, *, batch, results, workers, threads, ray, force,
          fail_on, quiet):  # fmt: skip
    from .report.export import Outputs
    from .report.render import console
    from .scan import scan as run_scan
    from .scan.timeline import failed
    from .scan.view import plot_timeline, progress_bar, render_scan

    json_out, csv_dir, plot = outputs
    outputs = Outputs(json=json_out, csv_dir=csv_dir, plot=plot)
    outputs.check(_file_inputs(scanned=paths, batch=batch, config=o.config, old_profile=o.old,
                               new_profile=o.new))  # fmt: skip
    with progress_bar(console(stderr=True), not quiet) as bar:
        task = bar.add_task("scan", total=None)
        report = run_scan(
            paths, batch=batch, results=results, workers=workers or os.cpu_count() or 1,
            threads=threads, ray=ray, force=force, options=o,
            on_progress=lambda done, total, _: bar.update(task, completed=done, total=total),
        )  # fmt: skip
    _export_scan(report, outputs, plot_timeline)
    _stdout_json(json_out, report.to_json())
    render_scan(report, console(stderr=json_out == "-"))
    if failed(report) or report.fails(fail_on):
        raise typer.Exit(EXIT_FINDING)


def _export_scan(report, outputs, plot_timeline) -> None:
    if outputs.json is not None and str(outputs.json) != "-":
        report.save_json(outputs.json)
    if outputs.csv_dir is not None:
        report.save_csv_dir(outputs.csv_dir)
    if outputs.plot is not None:
        plot_timeline(report, outputs.plot)


@app.command(cls=PlainUsage)
def profiles(
    name: Annotated[
        str | None, typer.Argument(help="a built-in profile name or a profile .toml")
    ] = None,
):
    """List the built-in loss profiles, or print one as TOML to edit and pass back with --old/--new.

    \b
    Examples:
      lossdoctor profiles
      lossdoctor profiles fixed > mine.toml
    """

    def run():
        from .inputs.profiles import BUILTIN, load_profile, profile_toml

        if name:
            sys.stdout.write(profile_toml(load_profile(name)))
            return
        from rich.table import Table

        from .report.render import console

        t = Table(box=None, pad_edge=False)
        t.add_column("profile", style="bold")
        t.add_column("what it normalizes by")
        for key, make in BUILTIN.items():
            t.add_row(key, make().summary)
        console().print(t)

    _guard(run)


def _print_replaced(out, what: str, replaced) -> None:
    """The globals a file named that were replaced by inert placeholders (and which run code)."""
    for r in replaced:
        kind = "CODE, not run" if r.code else "an object, not rebuilt"
        out.print(f"  {what} names {r.name}: replaced by an inert placeholder ({kind})")


def _print_batch(out, path: str, b) -> None:
    pad = f"{b.pad_size[0]}x{b.pad_size[1]}"
    out.print(
        f"batch {path}: valid lossdoctor.batch/1, {b.num_images} images, {b.channels} channels, "
        f"padded {pad}"
    )
    for (name, f), s in zip(b.features.items(), b.strides):
        out.print(f"  {name}: {f.shape[2]}x{f.shape[3]}, stride {s}")
    for i, (size, boxes) in enumerate(zip(b.image_sizes, b.gt_boxes)):
        ignored = int(b.gt_ignore[i].sum())
        n = boxes.shape[0]
        out.print(
            f"  image {i}: {size[0]}x{size[1]}, {n} GT box{'es' * (n != 1)}, {ignored} ignored"
        )
    _print_replaced(out, "batch", b.replaced)


def _print_dense_fit(out, path: str, e, b, config) -> None:
    from .dense import fit_dense, weights_of

    w = weights_of(e)
    cfg = fit_dense(w, b, config)
    out.print(
        f"checkpoint {path}: a one-stage {w.kind} head, {w.layout.layout} layout, {w.channels} "
        f"channels, {w.num_anchors} anchors/location, {w.num_classes} classes, {w.num_convs} "
        f"convs per tower{' with GroupNorm' if w.norm else ''}; fits the batch with config "
        f"'{cfg.name}'"
    )
    _print_dropped(out, b, w.num_classes)


def _print_dropped(out, b, k: int) -> None:
    from .replay.gt import usable_gt

    space, dropped = b.label_space, usable_gt(b, k).dropped_labels
    if dropped:
        d = dropped[0]
        out.print(
            f"  {len(dropped)} labels outside {space.span(k)} (first: image {d.image} box {d.box} "
            f"label {space.run(d.label)}); the replay leaves them out"
        )


def _print_fit(out, path: str, heads, b, cfg) -> None:
    k = heads.num_classes
    out.print(
        f"checkpoint {path}: {heads.layout} layout, {heads.channels} channels, {heads.num_anchors} "
        f"anchors/location, {k} classes (background {heads.background}); fits the batch with "
        f"config '{cfg.name}'"
    )
    out.print(f"  model {heads.replayed()}")
    _print_replaced(out, "checkpoint", heads.replaced)
    _print_dropped(out, b, k)


@app.command(cls=PlainUsage)
def check(
    batch: Annotated[
        str,
        typer.Argument(
            metavar="BATCH", help="batch dump, or a capture directory (then its CKPT too)"
        ),
    ],
    ckpt: Annotated[
        str | None,
        typer.Argument(metavar="CKPT", help="checkpoint to check the batch against"),
    ] = None,
    config: ConfigOpt = None,
    unsafe_load: UnsafeOpt = False,
):
    """Validate a batch dump (and its fit to a checkpoint) without replaying.

    \b
    Examples:
      lossdoctor check batch.pt ckpt.pt
      lossdoctor check lossdoctor-dumps/step_000123
    """
    _guard(lambda: _check(batch, ckpt, config, unsafe_load))


def _check(batch, ckpt, config, unsafe_load: bool):
    from .api import files_to_check, resolve_inputs
    from .inputs.batch import load_batch
    from .report.render import console

    ckpt, batch = files_to_check(batch, ckpt)
    out = console()
    b = load_batch(batch)
    _print_batch(out, batch, b)
    if ckpt:
        from .inputs.checkpoint import OneStageCheckpoint

        try:
            heads, b, cfg = resolve_inputs(ckpt, b, config, unsafe_load)
            _print_fit(out, ckpt, heads, b, cfg)
        except OneStageCheckpoint as e:
            _print_dense_fit(out, ckpt, e, b, config)
    if not b.suspicions:
        out.print("nothing suspicious")
        return
    out.print(f"{len(b.suspicions)} suspicious items (inspect turns them into findings):")
    for s in b.suspicions:
        out.print(f"  {s.code}: {s.message}")


class Source(StrEnum):
    mmdet = "mmdet"
    detectron2 = "detectron2"


@app.command(name="config-from", cls=PlainUsage)
def config_from(
    framework: Annotated[
        Source,
        typer.Argument(
            metavar="FRAMEWORK", help="the framework the config file is for: mmdet or detectron2"
        ),
    ],
    path: Annotated[
        str, typer.Argument(metavar="CFG", help="mmdet .py config or Detectron2 .yaml config")
    ],
    profile: Annotated[
        bool,
        typer.Option("--profile", help="print the loss profile the config trains with instead"),
    ] = False,
):
    """Print a framework config file's detector config (or loss profile) as lossdoctor TOML.

    This RUNS the config file: mmdet configs are Python, read through mmengine's Config (and the
    model is built from them, without weights); Detectron2 configs go through its get_cfg. Use
    it only on config files you trust. lossdoctor never does it on its own.

    \b
    Examples:
      lossdoctor config-from mmdet configs/faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py > det.toml
      lossdoctor inspect ckpt.pth batch.pt --config det.toml
    """
    _guard(lambda: _config_from(framework, path, profile))


def _config_from(framework: Source, path: str, profile: bool):
    from .inputs.dataclass_toml import dumps_toml, to_dict
    from .inputs.errors import InputError
    from .inputs.profiles import profile_from_meta, profile_toml

    if not Path(path).is_file():
        raise InputError(f"config file {path} does not exist; check the path")
    try:
        adapter = __import__(
            f"lossdoctor.adapters.{framework.value}", fromlist=["config_from_file"]
        )
        config, prof = adapter.config_from_file(path)
    except ImportError as e:
        raise InputError(
            f"reading {framework.value} configs needs {framework.value} installed ({e})"
        ) from None
    from .inputs.dense import DenseConfig

    if isinstance(config, DenseConfig):  # a one-stage detector: its own normalization is in it
        table = to_dict(config.profile) if profile else to_dict(config)
        sys.stdout.write(dumps_toml(table))
    elif profile:
        sys.stdout.write(profile_toml(profile_from_meta(prof)))
    else:
        sys.stdout.write(dumps_toml({"base": framework.value, **to_dict(config)}))


@app.command(cls=PlainUsage)
def explain(
    code: Annotated[str | None, typer.Argument(help="a finding code, as reports print it")] = None,
    list_all: Annotated[
        bool, typer.Option("--list", help="one line per code: code, severity, summary")
    ] = False,
):
    """What a finding means, its evidence fields and its fix.

    \b
    Examples:
      lossdoctor explain nan-empty-mean
      lossdoctor explain --list
    """

    def run():
        from .inputs.errors import InputError
        from .report.explain import explain as explain_code
        from .report.explain import listing

        if list_all or not code:
            typer.echo("\n".join(listing()))
            return
        try:
            typer.echo(explain_code(code))
        except KeyError as e:
            raise InputError(f"{e.args[0]}; see lossdoctor explain --list") from None

    _guard(run)


def main():
    """The console script: the app, then an exit without the interpreter's teardown."""
    try:
        app()
    except SystemExit as done:
        _leave(done.code)
    _leave(0)


def _leave(code) -> None:
    """Flush and exit at once: freeing a diagnosis' gigabytes object by object takes the
    interpreter longer than the OS takes to reclaim them (0.3 to 0.6 s of an inspect). By now
    every file a command wrote is closed and in place, and scan has shut its workers down."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if code is None else code)


if __name__ == "__main__":
    main()
