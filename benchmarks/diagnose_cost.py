"""Cost of a full diagnosis with two profiles, against one plain training step of the same heads.

    python benchmarks/diagnose_cost.py [--repeat 3]

The plain step is what a training loop does with these heads on this batch: the same forward
(targets, sampling, proposals, RoIAlign, box head), one loss (the fixed profile) and one
``backward()`` into the head parameters and the features. The diagnosis is replay with two
profiles + gradients + NaN trace + symptom + findings. Both run on the COCO-scale batch of
benchmarks/replay_coco.py, alternating, in this one process; the ratio of the medians is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import coco_batch, coco_heads  # noqa: E402

from lossdoctor.diagnose import diagnose  # noqa: E402
from lossdoctor.inputs.config import preset  # noqa: E402
from lossdoctor.inputs.profiles import builtin  # noqa: E402
from lossdoctor.replay.engine import replay  # noqa: E402


def plain_step(heads, batch, cfg):
    r = replay(heads, batch, cfg, [builtin("fixed")])
    r.losses["fixed"].total.backward()


def full_diagnosis(heads, batch, cfg):
    r = replay(heads, batch, cfg, [builtin("legacy"), builtin("fixed")])
    diagnose(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    heads, batch, cfg = coco_heads(), coco_batch(100), preset("torchvision")
    plain_step(heads, batch, cfg)  # warm-up
    plain, diag = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        plain_step(heads, batch, cfg)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        full_diagnosis(heads, batch, cfg)
        diag.append(time.perf_counter() - t)
    p, d = statistics.median(plain), statistics.median(diag)
    print(f"plain training step (1 forward, 1 backward): {p:.2f} s  {[f'{x:.2f}' for x in plain]}")
    print(f"diagnosis, 2 profiles:                      {d:.2f} s  {[f'{x:.2f}' for x in diag]}")
    print(f"ratio diagnosis / plain step: {d / p:.2f}  (budget 2.0)")


if __name__ == "__main__":
    main()
