"""Running a scan's replays: one job per dump, serially, in a local process pool or as Ray tasks;
each result is written to the results folder, atomically, as it arrives, so an interrupted scan
resumes where it stopped."""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from ..inputs.errors import InputError
from ..vocab import LOCAL_RAY, DumpStatus
from .dumps import Dump
from .results import RESULT_FORMAT

# Ray's switch for token authentication ("token" or "disabled")
RAY_AUTH_MODE = "RAY_AUTH_MODE"

KIB_PER_MIB = 1024
# jobs queued on each pool process, so that it never idles between two
QUEUED_PER_WORKER = 2
# torch threads per worker at most: more than 2 per replay buys little and oversubscribes
MAX_THREADS = 2


@dataclass(frozen=True)
class Job:
    """One dump to replay, with ``inspect``'s options (plain values) and its torch threads."""

    dump: Dump
    options: dict
    threads: int


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run_job(job: Job) -> dict:
    """Replay one dump → its result: the report as JSON data, or the error in one line."""
    import torch

    from ..api import inspect

    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    start = time.perf_counter()
    try:
        report = inspect(job.dump.checkpoint, job.dump.batch, **job.options)
        out = {"status": DumpStatus.OK, "report": report.to_dict()}
    except InputError as e:
        out = {"status": DumpStatus.FAILED, "message": str(e)}
    except Exception as e:  # one broken dump must not end the scan
        out = {"status": DumpStatus.FAILED, "message": f"internal error: {_one_line(e)}"}
    finally:
        torch.set_num_threads(threads)  # a serial scan runs in the caller's process
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB  # Linux: KiB
    return {"format": RESULT_FORMAT, "dump": asdict(job.dump), "seconds": seconds,
            "peak_rss_mib": peak, **out}  # fmt: skip


def _crashed(job: Job, e: BaseException) -> dict:
    """The result of a job whose worker died (out of memory, a signal)."""
    return {"format": RESULT_FORMAT, "dump": asdict(job.dump), "seconds": math.nan,
            "status": DumpStatus.FAILED, "message": f"the worker died: {_one_line(e)}"}  # fmt: skip


def result_path(results: Path, job: Job) -> Path:
    d = job.dump
    step = "x" if d.step is None else f"{d.step:06d}"
    return results / "dumps" / f"step_{step}_rank_{d.rank or 0}_{d.fingerprint(job.options)}.json"


def threads_per_worker(workers: int, threads: int | None) -> int:
    """Torch threads for each of ``workers`` so that together they fill the CPUs, 1 to 2."""
    if threads is not None:
        return max(1, threads)
    return max(1, min(MAX_THREADS, (os.cpu_count() or 1) // max(1, workers)))


OnResult = Callable[[Job, dict], None]


def serially(jobs: Iterable[Job], on_result: OnResult) -> None:
    for job in jobs:
        on_result(job, run_job(job))


def _collected(running: dict, on_result: OnResult, block: bool) -> None:
    """Hand over the pool's finished jobs (waiting for one when ``block``)."""
    if block:
        finished = wait(running, return_when=FIRST_COMPLETED).done
    else:
        finished = [f for f in running if f.done()]
    for fut in finished:
        job = running.pop(fut)
        try:
            result = fut.result()
        except Exception as e:  # the worker process died
            result = _crashed(job, e)
        on_result(job, result)


def in_pool(jobs: list[Job], workers: int, on_result: OnResult) -> None:
    """``workers`` - 1 spawned processes (no torch state shared with them) and this one: while
    the processes start and import torch, this process is already replaying. Each process keeps
    two jobs queued so it never waits for this one to hand it work."""
    todo = list(jobs)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers - 1, mp_context=ctx) as pool:
        running: dict = {}

        def feed() -> None:
            while todo and len(running) < QUEUED_PER_WORKER * (workers - 1):
                job = todo.pop()  # the processes take from the end, this one from the front
                running[pool.submit(run_job, job)] = job

        feed()
        while todo:
            job = todo.pop(0)
            on_result(job, run_job(job))
            _collected(running, on_result, block=False)
            feed()
        while running:
            _collected(running, on_result, block=True)


def _token_auth_for_an_address() -> None:
    """Ray joins a cluster found by ``auto`` with the machine's token (``ray start --head``
    enables token authentication and saves ``~/.ray/auth_token``), but one given by its address
    only when ``RAY_AUTH_MODE=token``: set it where a token is there and the user left it unset."""
    if os.environ.get(RAY_AUTH_MODE) is not None:
        return
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token or (Path.home() / ".ray" / "auth_token").is_file():
        os.environ[RAY_AUTH_MODE] = "token"


def on_ray(jobs: list[Job], address: str, on_result: OnResult) -> None:
    """One Ray task per dump; results come back to this process as they finish. ``address``:
    ``local`` starts a local cluster for the scan, ``auto`` or ``host:port`` joins one (the
    dumps must then be at a path every node sees)."""
    addr = None if address == LOCAL_RAY else address
    if addr not in (None, "auto"):
        _token_auth_for_an_address()  # before Ray is imported: it reads its config then
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'lossdoctor[ray]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=addr, include_dashboard=False, log_to_driver=False)
        except ConnectionError as e:
            raise InputError(
                f"--ray {address}: no Ray cluster to join ({str(e).splitlines()[0]}); start one "
                "with 'ray start --head', or give its address, or use a bare --ray for a local one"
            ) from None
    try:
        task = ray.remote(num_cpus=1)(run_job)
        pending = {task.remote(job): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as e:  # the task's worker died
                result = _crashed(job, e)
            on_result(job, result)
    finally:
        if started:
            ray.shutdown()


def run_jobs(jobs: list[Job], *, workers: int, ray: str | None, on_result: OnResult) -> None:
    """On Ray when ``ray`` names a cluster, else in a pool of ``workers`` processes (serially
    for one worker or one job)."""
    if ray is not None:
        on_ray(jobs, ray, on_result)
    elif workers > 1 and len(jobs) > 1:
        in_pool(jobs, min(workers, len(jobs)), on_result)
    else:
        serially(jobs, on_result)
