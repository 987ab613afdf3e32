"""`lossdoctor scan` in parallel: 8 dumps with 2 workers against 1, each worker's peak memory
against one `inspect` of the same dump, and the Ray backend against the local pool.

    python benchmarks/scan_parallel.py [--dumps 8] [--images 8] [--no-ray]

Writes 8 toy-detector capture directories (4 steps x 2 ranks), then scans them with every backend
from scratch (--force semantics: a fresh results folder each time), 1 torch thread per worker so
the comparison is of processes, not of threads. Prints the times and the ratios measured in this
one run. Ray (if installed) is timed on a cluster started beforehand, as `--ray auto` joins one.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_dumps(root: Path, dumps: int, images: int) -> Path:
    """``dumps`` capture directories of the toy detector: steps x 2 ranks."""
    from lossdoctor import Capture
    from lossdoctor.capture import periodic
    from lossdoctor.toy.data import batches
    from lossdoctor.toy.model import STRIDES, TinyDetector

    torch.manual_seed(0)
    model = TinyDetector()
    capture = Capture(root, model, every=1, stream=io.StringIO())
    stream = batches(0, images)
    for k in range(dumps):
        step, rank = divmod(k, 2)
        images_, sizes, boxes, labels = next(stream)
        with torch.no_grad():
            feats = model.features(images_)
        batch = dict(features=feats, image_sizes=sizes, gt_boxes=boxes, gt_labels=labels,
                     strides=list(STRIDES))  # fmt: skip
        capture.write(
            step, [periodic(step, 1)], torch.tensor(1.0), batch, {"rank": rank, "world_size": 2}
        )
    return root


def timed_scan(dumps: Path, results: Path, **kw) -> tuple[float, object]:
    from lossdoctor.scan import scan

    t = time.perf_counter()
    report = scan([dumps], results=results, threads=1, config="torchvision", **kw)
    return time.perf_counter() - t, report


def one_inspect_rss(folder: Path) -> float:
    """Peak RSS (MiB) of a fresh process that runs one inspect of ``folder``."""
    code = (
        "import resource, torch; torch.set_num_threads(1); from lossdoctor import inspect; "
        f"inspect({str(folder)!r}, config='torchvision'); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def ray_time(dumps: Path, results: Path) -> float | None:
    try:
        import ray
    except ImportError:
        return None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        timed_scan(dumps, results / "warm", ray="auto")  # workers start and import torch once
        return timed_scan(dumps, results / "ray", ray="auto")[0]
    finally:
        ray.shutdown()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dumps", type=int, default=8)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    dumps = write_dumps(tmp / "dumps", args.dumps, args.images)
    t1, _ = timed_scan(dumps, tmp / "one", workers=1)
    t2, report = timed_scan(dumps, tmp / "two", workers=2)
    speedup = t1 / t2
    print(f"{args.dumps} dumps of {args.images} images; 1 torch thread per worker")
    print(f"1 worker:  {t1:.2f} s")
    print(f"2 workers: {t2:.2f} s   speedup {speedup:.2f}, parallel efficiency {speedup / 2:.2f} "
          "(target >= 0.8)")  # fmt: skip
    worker = max(r.peak_rss_mib for r in report.tables.dumps)
    single = one_inspect_rss(dumps / "step_000000" / "rank_0")
    print(f"peak RSS: a pool worker {worker:.0f} MiB, one inspect process {single:.0f} MiB, "
          f"ratio {worker / single:.2f} (target <= 1)")  # fmt: skip
    if not args.no_ray:
        tr = ray_time(dumps, tmp)
        if tr is None:
            print("ray: not installed (pip install 'lossdoctor[ray]')")
        else:
            print(f"ray (2 CPUs, cluster running): {tr:.2f} s, {tr / t2:.2f}x the 2-worker pool "
                  "(target <= 1.2)")  # fmt: skip


if __name__ == "__main__":
    main()
