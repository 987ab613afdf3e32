"""The report's JSON at the edge: typed in memory, written as lossdoctor.report/2, read back
exactly, the previous version (report/1, a file written by that version) still read, and a
malformed value refused in one line naming where it is."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import factories as F
from lossdoctor import inspect
from lossdoctor.diagnose.finding import Finding
from lossdoctor.diagnose.groups import FindingGroup
from lossdoctor.inputs.errors import InputError
from lossdoctor.report.model import Report
from lossdoctor.report.render import console, render
from lossdoctor.report.rows import LevelRow, ProfileRow
from lossdoctor.report.serialize import PREVIOUS_REPORT_FORMAT, REPORT_FORMAT
from lossdoctor.vocab import Head, ProfileSource, Severity

ROOT = Path(__file__).resolve().parent.parent
# written by lossdoctor with format report/1: a batch without GT under the default profiles
# (legacy's empty box terms leave the box layers without gradient)
V1 = Path(__file__).parent / "data" / "report-v1.json"
V1_NO_GRAD = [
    "rpn.head.bbox_pred.weight",
    "rpn.head.bbox_pred.bias",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.box_predictor.bbox_pred.bias",
]


@pytest.fixture(scope="module")
def report() -> Report:
    return inspect(ROOT / "fixtures" / "first-nan", profiles=["legacy", "fixed"])


def test_the_report_is_typed_in_memory(report):
    assert all(isinstance(r, LevelRow) and isinstance(r.head, Head) for r in report.tables.levels)
    assert all(isinstance(r, ProfileRow) and isinstance(r.no_grad, list)
               for r in report.tables.profiles)  # fmt: skip
    assert all(isinstance(f, Finding) and isinstance(f.severity, Severity)
               for f in report.findings)  # fmt: skip
    assert all(isinstance(g, FindingGroup) for g in report.groups)
    assert report.meta.run.source is ProfileSource.GIVEN and report.meta.run.profile == "legacy"
    assert report.meta.batch.dump.step == 0  # the fixture's dump records its step


def test_json_round_trips_exactly(report):
    data = json.loads(report.to_json())
    assert data["format"] == REPORT_FORMAT
    again = Report.from_dict(data)
    assert again.to_json() == report.to_json()
    assert again.tables.levels == report.tables.levels or _same_with_nan(again, report)
    assert [f.code for f in again.findings] == [f.code for f in report.findings]


def _same_with_nan(a: Report, b: Report) -> bool:
    """Rows equal where NaN counts as equal to NaN."""
    for x, y in zip(a.tables.levels, b.tables.levels):
        for k, v in vars(x).items():
            w = getattr(y, k)
            if not (v == w or (isinstance(v, float) and math.isnan(v) and math.isnan(w))):
                return False
    return True


def test_a_report_written_by_the_previous_version_reads_and_renders(tmp_path):
    data = json.loads(V1.read_text())
    assert data["format"] == PREVIOUS_REPORT_FORMAT
    old = Report.load(V1)
    (legacy, fixed) = old.tables.profiles
    assert legacy.no_grad == V1_NO_GRAD and fixed.no_grad == []
    assert len(old.findings) == len(data["findings"]) and old.meta.batch.dump.step == 3
    assert {f.code for f in old.findings} >= {"no-gradient", "empty-gt-image"}
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        render(old, console(f))
    assert "no-gradient" in out.read_text()
    # written again, it is this version's format and reads back the same
    assert Report.from_dict(json.loads(old.to_json())).to_json() == old.to_json()


def test_compare_takes_a_previous_version_report_beside_a_new_one(tmp_path):
    new = inspect(ROOT / "fixtures" / "healthy", profiles=["legacy", "fixed"])
    new.save_json(tmp_path / "new.json")
    r = F.invoke("compare", "--old", V1, "--new", tmp_path / "new.json", "--json", "-")
    assert r.exit_code in (0, 1), r.output
    comps = json.loads(r.stdout)["comparisons"]
    (comp,) = [c for c in comps if c["old"].endswith(":legacy")]
    assert {x["metric"] for x in comp["totals"]} >= {"loss_total", "grad_total_norm"}


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda d: d["tables"]["levels"][0].update(pos="many"),
         "tables.levels[0].pos: expected an integer"),
        (lambda d: d["tables"]["levels"][0].update(head="neck"),
         "tables.levels[0].head: expected one of rpn, roi, mask"),
        (lambda d: d["tables"]["levels"][0].pop("avg_factor"), "tables.levels[0] has no"),
        (lambda d: d["findings"][0].update(severity="fatal"),
         "findings[0].severity: expected one of error, warning, info"),
        (lambda d: d["findings"][0].pop("code"), "findings[0] has no 'code'"),
        (lambda d: d["meta"]["profiles"]["legacy"]["rpn_cls"].update(normalizer="nope"),
         "normalizer 'nope' is unknown"),
        (lambda d: d["meta"].update(heads=[]), "meta.heads: expected an object"),
        (lambda d: d["groups"][0].update(where={"levels": "p2"}),
         "groups[0].where.levels: expected a list"),
        (lambda d: d.update(format="lossdoctor.scan/2"), "the report of a scan"),
    ],
)  # fmt: skip
def test_a_malformed_report_is_refused_in_one_line(report, tmp_path, edit, needle):
    data = json.loads(report.to_json())
    edit(data)
    with pytest.raises(InputError, match=None) as e:
        Report.from_dict(data)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    r = F.invoke("compare", "--old", tmp_path / "bad.json", "--new", tmp_path / "bad.json")
    assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.output, r.output
