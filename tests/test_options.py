"""One options object for inspect, compare and scan."""

from __future__ import annotations

from pathlib import Path

import pytest

import factories as F
from lossdoctor import api
from lossdoctor.options import ReplayOptions


def test_plain_values_are_what_a_scan_keys_its_results_by():
    o = ReplayOptions(config=Path("fixtures/toy.toml"), old="legacy", seed=3)
    assert o.plain() == {"config": "fixtures/toy.toml", "old": "legacy", "new": None, "seed": 3,
                         "sample_all": False, "score_thr": None, "unsafe_load": False,
                         "precision": None}  # fmt: skip
    assert ReplayOptions(profiles=["fixed"]).plain()["profiles"] == ["fixed"]


def test_inspect_takes_the_object_or_its_fields_alike():
    files = ("fixtures/healthy/checkpoint.pt", "fixtures/healthy/batch.pt")
    fields = dict(config="fixtures/toy.toml", old="mmdet", new="fixed", seed=1)
    by_object = api.inspect(*files, ReplayOptions(**fields))
    by_fields = api.inspect(*files, **fields)
    assert by_object.profiles == by_fields.profiles == ["mmdet", "fixed"]
    assert F.as_json(by_object)["tables"]["levels"] == F.as_json(by_fields)["tables"]["levels"]
    with pytest.raises(TypeError, match="not both"):
        api.inspect(*files, ReplayOptions(), seed=1)
