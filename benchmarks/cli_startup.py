"""`lossdoctor --help` must take well under a third of `python -c "import torch"`.

    python benchmarks/cli_startup.py [--repeat 7]

Runs both as fresh processes, alternating, and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    exe = shutil.which("lossdoctor")
    help_cmd = (
        [exe, "--help"]
        if exe
        else [sys.executable, "-c", "from lossdoctor.cli import main; main()", "--help"]
    )
    torch_cmd = [sys.executable, "-c", "import torch"]
    timed(torch_cmd)  # warm the file cache for both
    timed(help_cmd)
    h, t = [], []
    for _ in range(args.repeat):
        h.append(timed(help_cmd))
        t.append(timed(torch_cmd))
    mh, mt = statistics.median(h), statistics.median(t)
    print(f"lossdoctor --help:        {mh * 1000:.0f} ms (median of {args.repeat})")
    print(f"python -c 'import torch': {mt * 1000:.0f} ms")
    print(f"ratio: {mh / mt:.2f}  (budget: well under 0.33)")


if __name__ == "__main__":
    main()
