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
# the columns that identify a row of each table: rows are matched by them, not by position
KEYS = {
    "levels": ("profile", "head", "level"),
    "images": ("image",),
    "params": ("profile", "param"),
    "profiles": ("profile",),
    "origins": ("profile", "head", "level", "term"),
}
FINDING_KEY = ("severity", "code", "head", "level", "profile", "image", "message")
GROUP_KEY = ("severity", "code", "scope", "message")


def keyed(rows: list[dict], key: tuple[str, ...]) -> dict:
    out = {}
    for row in rows:
        k = tuple(str(row.get(c)) for c in key)
        assert k not in out, f"two rows share {dict(zip(key, k))}"
        out[k] = row
    return out


def normalized(snapshot: dict) -> dict:
    """Tables and findings as dicts keyed by their identity columns."""
    tables = {
        name: keyed(rows, KEYS[name]) for name, rows in snapshot["tables"].items() if name in KEYS
    }
    return {
        "tables": tables,
        "symptom": snapshot["symptom"],
        "findings": keyed(snapshot["findings"], FINDING_KEY),
        "groups": keyed(snapshot.get("groups", []), GROUP_KEY),
    }


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
    golden = normalized(json.loads((GOLDEN / f"{name}.json").read_text()))
    got = normalized(json.loads(json.dumps(snapshot(cases()[name]), allow_nan=True)))
    diffs = same(golden, got, name)
    for kind in ("findings", "groups"):
        extra = [k for k in got[kind] if k not in golden[kind]]
        diffs += [f"{name}: a new {kind} entry {k}" for k in extra]
    assert not diffs, "\n".join(diffs[:20])


def test_comparison_catches_a_changed_number():
    golden = {"rows": [{"loss": 1.0, "pos": 3, "level": "p2"}]}
    assert same(golden, {"rows": [{"loss": 1.0 + 1e-7, "pos": 3, "level": "p2", "new": 1}]}) == []
    assert same(golden, {"rows": [{"loss": 1.001, "pos": 3, "level": "p2"}]})
    assert same(golden, {"rows": [{"loss": 1.0, "pos": 4, "level": "p2"}]})
    assert same(golden, {"rows": [{"loss": float("nan"), "pos": 3, "level": "p2"}]})
    assert same(golden, {"rows": [{"loss": 1.0, "level": "p2"}]})
