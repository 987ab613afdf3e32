"""Cost of ``inspect --precision fp16`` and ``bf16`` next to the fp32 inspect, on one batch.

    python benchmarks/precision.py [--repeat 3] [--gt 100]

Each is the library's ``inspect`` (replay with two profiles, gradients, NaN trace, symptom, the
precision diagnosis, findings, report) of the COCO-scale batch of benchmarks/common.py, run
alternating in this one process; medians and their ratios to fp32 are printed, and where the
low-precision inspect spends its time (the replay, and the precision phase: an fp32 reference
of every head layer, the backward at scale 1, the fp32 replay the drift compares with).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import coco_batch, coco_heads, timed_inspect  # noqa: E402

PRECISIONS = ("fp32", "fp16", "bf16")


def timed(heads, batch, precision: str) -> tuple[float, dict]:
    """Seconds of one inspect, and of each of its phases."""
    return timed_inspect(heads, batch, old="torchvision", precision=precision)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gt", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(2)
    heads, batch = coco_heads(), coco_batch(args.gt)
    timed(heads, batch, "fp32")  # warm-up
    runs = {p: [] for p in PRECISIONS}
    phases = {p: [] for p in PRECISIONS}
    for _ in range(args.repeat):
        for p in PRECISIONS:
            total, by_phase = timed(heads, batch, p)
            runs[p].append(total)
            phases[p].append(by_phase)
    base = statistics.median(runs["fp32"])
    for p in PRECISIONS:
        m = statistics.median(runs[p])
        spent = phases[p][-1]
        where = ", ".join(f"{k} {v:.2f}" for k, v in spent.items())
        print(f"inspect --precision {p}: {m:.2f} s ({m / base:.2f}x fp32)  "
              f"{[f'{x:.2f}' for x in runs[p]]}\n    last run by phase (s): {where}")  # fmt: skip


if __name__ == "__main__":
    main()
