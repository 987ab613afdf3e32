"""``lossdoctor scan``: many dumps (steps x ranks, or checkpoints on one batch), replayed in
parallel, into one timeline. Built on the library: each dump is one ``inspect``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..inputs.batch import load_batch
from ..inputs.errors import InputError
from ..inputs.files import InputFiles, check_output
from ..options import ReplayOptions, options_of
from ..report.meta import ScanInfo
from ..report.model import ScanReport
from .dumps import Dump, find_dumps
from .results import dump_result, load_result, save_result
from .run import Job, result_path, run_jobs, threads_per_worker
from .timeline import failed, scan_report

__all__ = ["Dump", "find_dumps", "scan", "failed"]

# where results go when no folder is given
DEFAULT_RESULTS = "lossdoctor-scan"


def _quiet(done: int, total: int, dump: Dump) -> None:
    pass


def _jobs(dumps, options, threads, results, force) -> tuple[list[Job], dict]:
    """The jobs still to run, and the results an earlier scan left (unless ``force``)."""
    jobs, cached = [], {}
    for d in dumps:
        job = Job(dump=d, options=options, threads=threads)
        old = None if force else load_result(result_path(results, job))
        if old is None:
            jobs.append(job)
        else:
            cached[d] = dump_result(d, old, cached=True)
    return jobs, cached


def _check_results(dumps: list[Dump], options: dict, threads, results: Path, batch) -> None:
    """Before any replay: ``--batch`` loads, ``--results`` is a folder, and no result file lands
    on an input."""
    _check_batch(batch)
    if results.exists() and not results.is_dir():
        raise InputError(f"--results {results} is a file, not a folder; give a folder name")
    files = [p for d in dumps for p in (d.checkpoint, d.batch)]
    inputs = InputFiles({"dump": files, **{k: v for k, v in options.items() if _is_path(v)}})
    for d in dumps:
        check_output("--results", result_path(results, Job(d, options, threads)), inputs)


def _check_batch(batch) -> None:
    """The one batch of every checkpoint (``--batch``): refused once, up front."""
    if batch is not None:
        try:
            load_batch(batch)
        except InputError as e:
            raise InputError(f"--batch {batch}: {e}") from None


def _is_path(value) -> bool:
    return isinstance(value, (str, Path)) and Path(value).is_file()


def _info(paths, batch, opts: dict, how: dict, dumps: list, jobs: list) -> ScanInfo:
    """What the scan's report records of how it ran."""
    return ScanInfo(inputs=[str(p) for p in paths], batch=str(batch) if batch else None,
                    options=opts, **how, dumps=len(dumps),
                    cached=len(dumps) - len(jobs))  # fmt: skip


def scan(
    paths: list[str | Path],
    *,
    batch: str | Path | None = None,
    results: str | Path = DEFAULT_RESULTS,
    workers: int = 1,
    threads: int | None = None,
    ray: str | None = None,
    force: bool = False,
    on_progress: Callable[[int, int, Dump], None] = _quiet,
    options: ReplayOptions | None = None,
    **fields,
) -> ScanReport:
    """Replay every dump under ``paths`` (see :func:`find_dumps`) → the scan's report.

    ``options`` (or its fields as keywords) are :func:`lossdoctor.inspect`'s. Each dump's result
    is written under ``results/dumps/`` as it arrives; a later scan reuses them unless ``force``.
    ``workers`` > 1 runs a local process pool with ``threads`` torch threads each (default: the
    CPUs shared out, 1 to 2); ``ray`` (``local``, ``auto`` or an address) runs one Ray task per
    dump instead. ``on_progress(done, total, dump)`` follows.
    """
    dumps = find_dumps(paths, batch)
    opts = options_of(options, fields).plain()
    threads = threads_per_worker(1 if ray else workers, threads)
    _check_results(dumps, opts, threads, results := Path(results), batch)
    jobs, got = _jobs(dumps, opts, threads, results, force)
    done = len(got)

    def arrived(job: Job, result: dict) -> None:
        nonlocal done
        save_result(result_path(results, job), result)
        got[job.dump] = dump_result(job.dump, result)
        done += 1
        on_progress(done, len(dumps), job.dump)

    run_jobs(jobs, workers=workers, ray=ray, on_result=arrived)
    how = {"workers": workers, "threads": threads, "ray": ray, "results": str(results)}
    return scan_report([got[d] for d in dumps], _info(paths, batch, opts, how, dumps, jobs))
