"""Exports of a report: JSON, CSV, a folder of CSVs and a plot, written atomically and never over
an input (the checkpoint, the batch, a compared report, a config or profile file)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..inputs.errors import InputError
from ..inputs.files import InputFiles, check_output, same_file
from .model import Report

STDOUT = "-"


@dataclass(frozen=True)
class Outputs:
    """Where the exports go; None writes nothing. ``json`` may be ``"-"`` for stdout."""

    json: str | Path | None = None
    csv: str | Path | None = None
    csv_dir: str | Path | None = None
    plot: str | Path | None = None

    def files(self) -> list[tuple[str, Path]]:
        """(option, file) of every single-file output."""
        named = (("--json", self.json), ("--csv", self.csv), ("--plot", self.plot))
        empty = next((opt for opt, p in named if p is not None and not str(p).strip()), None)
        if empty is not None:
            raise InputError(f"{empty} needs a file name, found an empty one")
        return [(opt, Path(p)) for opt, p in named if p is not None and str(p) != STDOUT]

    def check(self, inputs: InputFiles | dict[str, str | Path | None]) -> None:
        """Refuse (InputError) outputs that are directories, inputs (a folder's files too), or
        written twice."""
        if not isinstance(inputs, InputFiles):
            inputs = InputFiles(inputs)
        files = self.files()
        for option, path in files:
            check_output(option, path, inputs)
        for i, (opt_a, a) in enumerate(files):
            for opt_b, b in files[i + 1 :]:
                if same_file(a, b):
                    raise InputError(f"{opt_a} and {opt_b} both write {a}; give each its own file")
        if self.csv_dir is not None:
            _check_csv_dir(Path(self.csv_dir), inputs, files)


def _check_csv_dir(d: Path, inputs: InputFiles, files: list[tuple[str, Path]]) -> None:
    if d.exists() and not d.is_dir():
        raise InputError(f"--csv-dir {d} is a file, not a folder; give a folder name")
    taken = inputs.files() + inputs.given + [(f"the {opt} output", p) for opt, p in files]
    for what, p in taken:
        if p.suffix == ".csv" and os.path.realpath(p.parent) == os.path.realpath(d):
            raise InputError(
                f"--csv-dir {d} holds {p} ({what}); write the CSV files to another folder"
            )


def inputs_of(report: Report) -> dict[str, str | None]:
    """The input files a report was made from, by role (for :meth:`Outputs.check`)."""
    return {"checkpoint": report.meta.checkpoint.path, "batch": report.meta.batch.path}


def export(report: Report, outputs: Outputs, inputs=None, profiles=None) -> None:
    """Write every export of ``outputs`` (JSON to stdout is the caller's), after checking them
    against ``inputs`` (an :class:`InputFiles` or role -> path) and the report's own input
    files."""
    if not isinstance(inputs, InputFiles):
        inputs = InputFiles(inputs or {})
    outputs.check(inputs.add(inputs_of(report)))
    if outputs.json is not None and str(outputs.json) != STDOUT:
        report.save_json(outputs.json)
    if outputs.csv is not None:
        report.save_csv(outputs.csv)
    if outputs.csv_dir is not None:
        report.save_csv_dir(outputs.csv_dir)
    if outputs.plot is not None:
        from .plot import plot

        plot(report, outputs.plot, profiles)
