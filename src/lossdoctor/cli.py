"""The lossdoctor command line: a thin layer over the library.

Only typer is imported at start-up; torch, pandas and matplotlib load inside the commands that
need them, so ``lossdoctor --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path

import typer
from typer.core import TyperGroup

EXIT_FINDING = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class FailOn(str, Enum):
    error = "error"
    warning = "warning"
    never = "never"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def _click_class(name: str) -> type:
    """click's exception classes as typer uses them (recent typer vendors its own click)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


_USAGE_ERROR = _click_class("UsageError")
_CLICK_EXCEPTION = _click_class("ClickException")


class OneLineErrors(TyperGroup):
    """Usage and input errors become one line on stderr and exit code 2, never a traceback."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except _USAGE_ERROR as e:
            if type(e).__name__ == "NoArgsIsHelpError":
                typer.echo(e.ctx.get_help())
                sys.exit(0)
            cmd = e.ctx.command_path if e.ctx else "lossdoctor"
            typer.echo(f"lossdoctor: error: {e.format_message()} (see '{cmd} --help')", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except typer.Abort:
            typer.echo("lossdoctor: aborted", err=True)
            sys.exit(130)
        except _CLICK_EXCEPTION as e:
            typer.echo(f"lossdoctor: error: {e.format_message()}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        sys.exit(code or 0)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Replay and diagnose the RPN and RoI losses of a Faster R-CNN FPN detector on one dumped batch.\n\n"
    "\b\nExample:\n  lossdoctor inspect fixtures/collapse/checkpoint.pt fixtures/collapse/batch.pt",
)


def _fail(message: str) -> None:
    typer.echo(f"lossdoctor: error: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _guard(fn):
    """Run a command body: InputError → one line, exit 2; a bug → one line, exit 3 (traceback with LOSSDOCTOR_DEBUG=1)."""
    from .inputs.errors import InputError

    try:
        return fn()
    except typer.Exit:
        raise
    except InputError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("lossdoctor: interrupted; no output file was left half-written", err=True)
        raise typer.Exit(130)
    except Exception as e:
        if os.environ.get("LOSSDOCTOR_DEBUG"):
            raise
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        typer.echo(
            f"lossdoctor: internal error: {type(e).__name__}: {msg} (set LOSSDOCTOR_DEBUG=1 for the traceback)",
            err=True,
        )
        raise typer.Exit(EXIT_INTERNAL)


def _check_device(device: Device) -> None:
    if device == Device.cuda:
        from .inputs.errors import InputError

        raise InputError(
            "--device cuda is not supported by this version: the replay runs on the CPU; use --device cpu"
        )


def _file_inputs(**roles) -> dict[str, str]:
    """The files a command reads, by role, for the output guard (names of built-ins are no files)."""
    out = {}
    for role, value in roles.items():
        path = None if value is None else str(value)
        if path is not None and ".json:" in path:
            path = path.partition(".json:")[0] + ".json"  # REPORT.json:PROFILE
        if path is not None and (role in ("checkpoint", "batch") or Path(path).is_file()):
            out[role.replace("_", " ")] = path
    return out


JSON_HELP = "write the report as JSON to FILE, or to stdout with '-' (the terminal view then goes to stderr)"


@app.command()
def inspect(
    ckpt: str = typer.Argument(..., metavar="CKPT", help="checkpoint (.pt/.pth, or .safetensors)"),
    batch: str = typer.Argument(
        ..., metavar="BATCH", help="batch dump written by lossdoctor.dump_batch"
    ),
    old: str = typer.Option("legacy", "--old", help="profile name or profile .toml"),
    new: str = typer.Option("fixed", "--new", help="profile name or profile .toml"),
    config: str | None = typer.Option(
        None,
        "--config",
        help="detector preset (torchvision, mmdet, detectron2) or .toml; default: from the checkpoint layout",
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="sampling seed (default: the dump's meta sample_seed, else 0)"
    ),
    sample_all: bool = typer.Option(
        False, "--sample-all", help="take every candidate instead of sampling"
    ),
    device: Device = typer.Option(Device.cpu, "--device"),
    score_thr: float | None = typer.Option(
        None, "--score-thr", help="detection score threshold (default: the config's, 0.05)"
    ),
    csv: str | None = typer.Option(None, "--csv", help="write the per-level table to FILE"),
    csv_dir: str | None = typer.Option(None, "--csv-dir", help="write every table to DIR"),
    json_out: str | None = typer.Option(None, "--json", help=JSON_HELP),
    plot: str | None = typer.Option(None, "--plot", help="write a PNG figure to FILE"),
    fail_on: FailOn = typer.Option(
        FailOn.never, "--fail-on", help="exit 1 if a finding at or above this severity exists"
    ),
    unsafe_load: bool = typer.Option(
        False,
        "--unsafe-load",
        help="allow arbitrary pickled objects in the checkpoint (runs code from it)",
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="print only the symptom and the findings"
    ),
):
    """Replay BATCH through CKPT's heads under two profiles and diagnose.

    \b
    Example:
      lossdoctor inspect ckpt_5000.pt batch.pt --old legacy --new fixed --csv levels.csv --plot levels.png
    """

    def run():
        _check_device(device)
        from .api import inspect as run_inspect
        from .report.export import Outputs, export
        from .report.render import console, render

        outputs = Outputs(json_out, csv, csv_dir, plot)
        inputs = _file_inputs(
            checkpoint=ckpt, batch=batch, config=config, old_profile=old, new_profile=new
        )
        outputs.check(inputs)
        report = run_inspect(
            ckpt,
            batch,
            config=config,
            old=old,
            new=new,
            seed=seed,
            sample_all=sample_all,
            score_thr=score_thr,
            unsafe_load=unsafe_load,
        )
        export(report, outputs, inputs)
        if json_out == "-":
            sys.stdout.write(report.to_json() + "\n")
        render(report, console(stderr=json_out == "-"), quiet=quiet)
        if report.fails(fail_on.value):
            raise typer.Exit(EXIT_FINDING)

    _guard(run)


def _side(spec: str):
    """('report', path, profile or None) for REPORT.json[:PROFILE], else ('profile', spec, None)."""
    path, _, prof = spec.partition(".json:")
    if spec.endswith(".json") or prof:
        return "report", path + ".json" if prof else spec, prof or None
    return "profile", spec, None


@app.command()
def compare(
    ckpt: str | None = typer.Argument(
        None, metavar="[CKPT", help="checkpoint (needed when both sides are profiles)"
    ),
    batch: str | None = typer.Argument(
        None, metavar="BATCH]", help="batch dump (needed when both sides are profiles)"
    ),
    old: str = typer.Option(
        ...,
        "--old",
        help="profile name, profile .toml, or report .json (REPORT.json:PROFILE picks one)",
    ),
    new: str = typer.Option(
        ...,
        "--new",
        help="profile name, profile .toml, or report .json (REPORT.json:PROFILE picks one)",
    ),
    config: str | None = typer.Option(
        None, "--config", help="detector preset or .toml (profiles only)"
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="sampling seed (default: the dump's meta sample_seed, else 0)"
    ),
    sample_all: bool = typer.Option(False, "--sample-all"),
    device: Device = typer.Option(Device.cpu, "--device"),
    score_thr: float | None = typer.Option(None, "--score-thr"),
    csv: str | None = typer.Option(None, "--csv", help="write the comparison rows to FILE"),
    csv_dir: str | None = typer.Option(
        None, "--csv-dir", help="write the replayed report's tables to DIR (profiles only)"
    ),
    json_out: str | None = typer.Option(
        None, "--json", help="write the comparison as JSON to FILE, or '-' for stdout"
    ),
    plot: str | None = typer.Option(
        None, "--plot", help="write a PNG figure, old vs new (profiles only)"
    ),
    fail_on: FailOn = typer.Option(
        FailOn.never,
        "--fail-on",
        help="exit 1 if the new side has a finding at or above this severity",
    ),
    unsafe_load: bool = typer.Option(False, "--unsafe-load"),
    all_rows: bool = typer.Option(False, "--all", help="show unchanged metrics too"),
):
    """Compare two profiles on one batch, or two saved reports.

    \b
    Examples:
      lossdoctor compare ckpt.pt batch.pt --old legacy --new fixed
      lossdoctor compare --old r1000.json --new r5000.json
      lossdoctor compare --old r5000.json:legacy --new r5000.json:fixed
    """

    def run():
        import json

        from .inputs.errors import InputError
        from .inputs.files import atomic_write
        from .report.compare import compare as compare_reports
        from .report.compare import compare_profiles
        from .report.export import Outputs
        from .report.model import Report
        from .report.render import console, render_comparison

        _check_device(device)
        outputs = Outputs(json_out, csv, csv_dir, plot)
        inputs = _file_inputs(checkpoint=ckpt, batch=batch, config=config, old=old, new=new)
        outputs.check(inputs)
        (kind_a, a, pa), (kind_b, b, pb) = _side(old), _side(new)
        if kind_a != kind_b:
            raise InputError("--old and --new must both be profiles or both be reports (.json)")
        if kind_a == "profile":
            if not (ckpt and batch):
                raise InputError(
                    "comparing two profiles needs CKPT and BATCH: lossdoctor compare CKPT BATCH --old A --new B"
                )
            from .api import inspect as run_inspect

            report = run_inspect(
                ckpt,
                batch,
                config=config,
                old=a,
                new=b,
                seed=seed,
                sample_all=sample_all,
                score_thr=score_thr,
                unsafe_load=unsafe_load,
            )
            names = report.profiles
            comps = [compare_profiles(report, names[0], report, names[1])]
            new_report, new_profile = report, names[1]
            if csv_dir:
                report.save_csv_dir(csv_dir)
            if plot:
                from .report.plot import plot as draw

                draw(report, plot)
        else:
            if ckpt or batch:
                raise InputError(
                    "two reports need no CKPT or BATCH; drop them, or compare profiles instead"
                )
            if csv_dir or plot:
                raise InputError(
                    "--csv-dir and --plot need a replay: compare two profiles with CKPT and BATCH"
                )
            ra, rb = Report.load(a), Report.load(b)
            for r, p, path in ((ra, pa, a), (rb, pb, b)):
                if p and p not in r.profiles:
                    raise InputError(
                        f"report {path} has no profile {p!r}; it has {', '.join(r.profiles)}"
                    )
            ra.meta["_label"], rb.meta["_label"] = a, b
            comps = compare_reports(ra, rb, pa, pb)
            if not comps:
                raise InputError(
                    f"the reports share no profile ({', '.join(ra.profiles)} vs {', '.join(rb.profiles)}); pick one with REPORT.json:PROFILE"
                )
            new_report, new_profile = rb, pb
        payload = {"format": "lossdoctor.compare/1", "comparisons": [c.to_dict() for c in comps]}
        text = json.dumps(payload, indent=1, allow_nan=True, default=str)
        if json_out and json_out != "-":
            atomic_write(json_out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        if csv:
            rows = [
                {"old_side": c.old, "new_side": c.new, **r}
                for c in comps
                for r in c.totals + c.rows
            ]
            table = Report({}, {"rows": rows}).csv_text("rows")
            atomic_write(csv, lambda tmp: Path(tmp).write_text(table, encoding="utf-8"))
        if json_out == "-":
            sys.stdout.write(text + "\n")
        render_comparison(comps, console(stderr=json_out == "-"), changed_only=not all_rows)
        keep = [
            f
            for f in new_report.findings
            if new_profile is None or f.get("profile") in (None, new_profile)
        ]
        if Report(new_report.meta, {}, keep).fails(fail_on.value):
            raise typer.Exit(EXIT_FINDING)

    _guard(run)


@app.command()
def profiles(
    name: str | None = typer.Argument(None, help="a built-in profile name or a profile .toml"),
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


@app.command()
def check(
    batch: str = typer.Argument(..., metavar="BATCH", help="batch dump"),
    ckpt: str | None = typer.Argument(
        None, metavar="[CKPT]", help="checkpoint to check the batch against"
    ),
    config: str | None = typer.Option(
        None, "--config", help="detector preset or .toml; default: from the checkpoint layout"
    ),
    unsafe_load: bool = typer.Option(False, "--unsafe-load"),
):
    """Validate a batch dump (and its fit to a checkpoint) without replaying.

    \b
    Example:
      lossdoctor check batch.pt ckpt.pt
    """

    def run():
        from .api import resolve_inputs
        from .inputs.batch import load_batch
        from .report.render import console

        out = console()
        b = load_batch(batch)
        out.print(
            f"batch {batch}: valid lossdoctor.batch/1, {b.num_images} images, {b.channels} channels, padded {b.pad_size[0]}x{b.pad_size[1]}"
        )
        for (name, f), s in zip(b.features.items(), b.strides):
            out.print(f"  {name}: {f.shape[2]}x{f.shape[3]}, stride {s}")
        for i, (size, boxes) in enumerate(zip(b.image_sizes, b.gt_boxes)):
            out.print(
                f"  image {i}: {size[0]}x{size[1]}, {boxes.shape[0]} GT boxes, {int(b.gt_ignore[i].sum())} ignored"
            )
        if ckpt:
            heads, b, cfg = resolve_inputs(ckpt, b, config, unsafe_load)
            k = heads.num_classes
            out.print(
                f"checkpoint {ckpt}: {heads.layout} layout, {heads.channels} channels, {heads.num_anchors} anchors/location, "
                f"{k} classes (background {heads.background}); fits the batch with config '{cfg.name}'"
            )
            _print_replaced(out, "checkpoint", heads.replaced)
            bad = [
                (i, j, int(l))
                for i, lab in enumerate(b.gt_labels)
                for j, l in enumerate(lab.tolist())
                if not 0 <= l < k
            ]
            if bad:
                out.print(
                    f"  {len(bad)} labels outside 0..{k - 1} (first: image {bad[0][0]} box {bad[0][1]} label {bad[0][2]}); the replay leaves them out"
                )
        _print_replaced(out, "batch", b.replaced)
        if b.suspicions:
            out.print(f"{len(b.suspicions)} suspicious items (inspect turns them into findings):")
            for s in b.suspicions:
                out.print(f"  {s.code}: {s.message}")
        else:
            out.print("nothing suspicious")

    _guard(run)


def _print_replaced(out, what: str, replaced) -> None:
    """The globals a file named that were replaced by inert placeholders (and which run code)."""
    for r in replaced:
        kind = "CODE, not run" if r.code else "an object, not rebuilt"
        out.print(f"  {what} names {r.name}: replaced by an inert placeholder ({kind})")


def main():
    app()


if __name__ == "__main__":
    main()
