"""Replay cost at COCO scale: time of a two-profile replay, and peak memory with 100 vs 1000 GT
boxes per image (chunked IoU keeps memory growing with anchors, not anchors x GT).

    python benchmarks/replay_coco.py

Each case runs in its own process so its peak RSS is its own, once with glibc's default allocator
(which keeps freed IoU blocks in its heap once its mmap threshold has grown, so peak RSS overstates
live memory) and once with a fixed mmap threshold (peak RSS close to live memory, but slower: every
large block is mapped afresh). Prints seconds, peak MB and the 1000-GT / 100-GT ratios, all measured
in this one run.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def case(gt: int) -> dict:
    sys.path.insert(0, str(HERE))
    import torch
    from common import coco_batch, coco_heads

    from lossdoctor.inputs.config import preset
    from lossdoctor.inputs.profiles import builtin
    from lossdoctor.replay.engine import replay

    torch.set_num_threads(2)
    heads, batch = coco_heads(), coco_batch(gt)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    r = replay(heads, batch, preset("torchvision"), [builtin("legacy"), builtin("fixed")])
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "gt": gt,
        "seconds": seconds,
        "peak_mb": peak,
        "inputs_mb": base,
        "rois": int(r.roi.boxes.shape[0]),
        "total_fixed": float(r.losses["fixed"].total.detach()),
    }


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print(json.dumps(case(int(sys.argv[2]))))
        return
    import os

    for label, env in (
        ("glibc default allocator", {}),
        (
            "fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=131072)",
            {"MALLOC_MMAP_THRESHOLD_": "131072"},
        ),
    ):
        print(label)
        results = {}
        for gt in (100, 1000):
            out = subprocess.run(
                [sys.executable, __file__, "--case", str(gt)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, **env},
            )
            results[gt] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[gt]
            print(
                f"  {gt:5d} GT/image: replay {r['seconds']:.2f} s, peak RSS {r['peak_mb']:.0f} MB "
                f"(inputs loaded: {r['inputs_mb']:.0f} MB), {r['rois']} RoIs"
            )
        a, b = results[100], results[1000]
        print(
            f"  1000/100 GT: time x{b['seconds'] / a['seconds']:.2f}, "
            "replay memory above inputs "
            f"x{(b['peak_mb'] - b['inputs_mb']) / (a['peak_mb'] - a['inputs_mb']):.2f}"
        )


if __name__ == "__main__":
    main()
