"""Every fixture's report says what tests/golden/ says it said: same rows, same strings and counts,
same numbers to float32 rounding (the golden files are written by scripts/make_golden.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_golden import GOLDEN, cases, snapshot  # noqa: E402

# float32 reductions summed in another order differ in the last bits
REL = 1e-6
ABS = 1e-12


def same(golden, got, where: str = "") -> list[str]:
    """Differences between a golden value and a new one; keys the golden lacks may be added."""
    if isinstance(golden, dict):
        if not isinstance(got, dict):
            return [f"{where}: expected a dict, got {got!r}"]
        out = []
        for k, v in golden.items():
            out += [f"{where}.{k}: missing"] if k not in got else same(v, got[k], f"{where}.{k}")
        return out
    if isinstance(golden, list):
        if not isinstance(got, list) or len(got) != len(golden):
            return [f"{where}: expected {len(golden)} items, got {got!r}"[:300]]
        return [d for i, (a, b) in enumerate(zip(golden, got)) for d in same(a, b, f"{where}[{i}]")]
    if isinstance(golden, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if math.isnan(golden) or math.isnan(got):
            return [] if math.isnan(golden) and math.isnan(got) else [f"{where}: {golden} != {got}"]
        if golden == got or abs(golden - got) <= max(REL * max(abs(golden), abs(got)), ABS):
            return []
        return [f"{where}: {golden!r} != {got!r}"]
    return (
        [] if golden == got and type(golden) is type(got) else [f"{where}: {golden!r} != {got!r}"]
    )


@pytest.mark.parametrize("name", list(cases()))
def test_report_matches_golden(name):
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    got = json.loads(json.dumps(snapshot(cases()[name]), allow_nan=True))
    diffs = same(golden, got, name)
    assert not diffs, "\n".join(diffs[:20])


def test_comparison_catches_a_changed_number():
    golden = {"rows": [{"loss": 1.0, "pos": 3, "level": "p2"}]}
    assert same(golden, {"rows": [{"loss": 1.0 + 1e-7, "pos": 3, "level": "p2", "new": 1}]}) == []
    assert same(golden, {"rows": [{"loss": 1.001, "pos": 3, "level": "p2"}]})
    assert same(golden, {"rows": [{"loss": 1.0, "pos": 4, "level": "p2"}]})
    assert same(golden, {"rows": [{"loss": float("nan"), "pos": 3, "level": "p2"}]})
    assert same(golden, {"rows": [{"loss": 1.0, "level": "p2"}]})
