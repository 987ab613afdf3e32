"""Write the golden reports of the fixtures: python scripts/make_golden.py

Each case is ``lossdoctor.inspect`` on one fixture, run single-threaded; the tables, the symptom,
the finding rows and their groups are written to tests/golden/<case>.json. tests/test_golden.py
replays every case and requires the same numbers (to float32 rounding), so a refactor or a
speed-up cannot change what a report says without this file changing in the same commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
GOLDEN = ROOT / "tests" / "golden"
FIX = ROOT / "fixtures"
ALL_PROFILES = ("legacy", "fixed", "mmdet", "torchvision", "detectron2")
FAULTS = ("no-gt-image", "zero-width-box", "one-based-labels", "nan-features-p4")


def cases() -> dict[str, dict]:
    """Case name -> keyword arguments of lossdoctor.inspect: each fixture as shipped (a capture
    directory whose dump records its config and profile)."""
    out = {}
    for name in ("healthy", "first-nan", "collapse"):
        out[name] = dict(checkpoint=str(FIX / name), batch=None, profiles=list(ALL_PROFILES))
    out["collapse-sample-all"] = {**out["collapse"], "sample_all": True}
    for fault in FAULTS:
        out[f"fault-{fault}"] = dict(
            checkpoint=str(FIX / "faults" / fault), batch=None, profiles=["legacy", "fixed"]
        )
    return out


def snapshot(kwargs: dict) -> dict:
    """What a case's report says: its tables, its symptom and its findings."""
    import torch

    from lossdoctor import inspect

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = inspect(**kwargs)
    finally:
        torch.set_num_threads(threads)
    d = json.loads(report.to_json())
    return {
        "tables": d["tables"],
        "symptom": d["meta"]["symptom"],
        "findings": d["findings"],
        "groups": d["groups"],
    }


def main() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for name, kwargs in cases().items():
        text = json.dumps(snapshot(kwargs), indent=1, allow_nan=True, sort_keys=True)
        (GOLDEN / f"{name}.json").write_text(text + "\n", encoding="utf-8")
        print(f"wrote tests/golden/{name}.json")


if __name__ == "__main__":
    main()
