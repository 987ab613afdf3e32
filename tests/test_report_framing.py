"""The report speaks to the run: its own profile first (the what-if's problems are not the run's),
one finding per cause, a chance-aware symptom, the whole checkpoint scanned, no-proposals and the
positive funnel."""

from __future__ import annotations

import io
import time

import pytest
import torch
from rich.console import Console
from test_findings import FAR, _background_bias, _drop_p6, healthy_dict, run
from typer.testing import CliRunner

import factories as F
from lossdoctor import dump_batch, inspect
from lossdoctor.cli import app
from lossdoctor.diagnose import diagnose
from lossdoctor.inputs.batch import validate_batch
from lossdoctor.inputs.checkpoint import heads_from_state_dict, load_checkpoint
from lossdoctor.inputs.config import preset
from lossdoctor.inputs.files import save_torch
from lossdoctor.inputs.profiles import BUILTIN
from lossdoctor.replay.engine import replay
from lossdoctor.report.progress import PhaseStatus
from lossdoctor.vocab import Phase, Scope, Severity

NAN = float("nan")


def framed(d, own, profiles, sd=None):
    batch = validate_batch(d)
    heads = heads_from_state_dict(sd if sd is not None else F.state_dict())
    r = replay(heads, batch, preset("torchvision"), [BUILTIN[p]() for p in profiles])
    return diagnose(r, run_profile=own)


def test_a_level_without_positives_is_no_error_under_the_runs_own_profile():
    d = _drop_p6(healthy_dict())  # no object for P6: legacy's per-level mean there is 0/0
    default = framed(d, None, ("legacy", "fixed"))
    assert any(
        f.code == "nan-empty-mean" and f.severity == Severity.ERROR for f in default.findings
    )

    own = framed(d, "torchvision", ("torchvision", "legacy"))
    assert [f.code for f in own.findings if f.severity == Severity.ERROR] == []
    legacy = [f for f in own.findings if f.code == "nan-empty-mean"]
    assert legacy and all(
        f.profile == "legacy" and f.scope == Scope.WHAT_IF and f.severity == Severity.INFO
        for f in legacy
    )
    assert all(f.message.startswith("legacy would introduce: rpn loss_bbox at p6") for f in legacy)
    (grp,) = [g for g in own.groups if g.code == "nan-empty-mean"]
    assert grp.scope == Scope.WHAT_IF and grp.severity == Severity.INFO
    assert "nothing to fix in this run (it trains with torchvision)" in grp.fix


def test_a_problem_of_the_runs_own_profile_says_switching_removes_it():
    d = _drop_p6(healthy_dict())
    diag = framed(d, "legacy", ("legacy", "fixed"))
    rows = [f for f in diag.findings if f.code == "nan-empty-mean"]
    assert rows and all(f.severity == Severity.ERROR and f.scope == Scope.RUN for f in rows)
    assert all(f.note == "switching to fixed removes it" for f in rows)
    (grp,) = [g for g in diag.groups if g.code == "nan-empty-mean"]
    assert grp.message.endswith("; switching to fixed removes it")


def test_nan_features_on_four_levels_of_one_image_give_one_grouped_finding():
    d = healthy_dict()
    for level in ("p3", "p4", "p5", "p6"):
        d["features"][level][1].fill_(NAN)
    diag = framed(d, None, ("legacy", "fixed"))
    rows = [f for f in diag.findings if f.code == "nonfinite-loss"]
    assert len(rows) >= 8  # per level, term and profile
    (grp,) = [g for g in diag.groups if g.code == "nonfinite-loss"]
    assert sorted(grp.rows) == [
        k for k, f in enumerate(diag.findings) if f.code == "nonfinite-loss"
    ]
    assert grp.where.levels == ["p3", "p4", "p5", "p6"] and grp.where.images == [1]
    assert grp.where.profiles == ["legacy", "fixed"]
    assert grp.message.startswith("NaN, first broken at input: already in the features")
    assert "(p3-p6; " in grp.message and "; image 1; legacy, fixed)" in grp.message
    (feats,) = [g for g in diag.groups if g.code == "nonfinite-features"]
    assert feats.where.levels == ["p3", "p4", "p5", "p6"] and len(feats.rows) == 4


def _codes(diag) -> set[str]:
    return {f.code for f in diag.findings}


def test_an_untrained_head_is_not_a_collapse():
    # background bias 5: every foreground score is about 0.007, below chance 1/4 and 0.05
    def at(step):
        d = healthy_dict()
        if step is not None:
            d["meta"] = {"step": step}
        return _background_bias(5.0, d)

    early, unknown, late = at(4), at(None), at(5000)
    assert max(early.symptom.max_fg_score) < 0.25 and sum(early.symptom.detections) == 0
    assert not _codes(early) & {"collapse-to-background", "untrained-or-collapsed"}
    assert "untrained-or-collapsed" in _codes(unknown) and "collapse-to-background" not in _codes(
        unknown
    )
    assert "collapse-to-background" in _codes(late)
    # scores thousands of times below chance are a collapse at any step
    assert "collapse-to-background" in _codes(
        _background_bias(20.0, healthy_dict() | {"meta": {"step": 4}})
    )


def test_the_collapsed_fixture_still_collapses():
    rep = inspect("fixtures/collapse")
    (f,) = [f for f in F.as_json(rep)["findings"] if f["code"] == "collapse-to-background"]
    assert f["evidence"]["max_fg_score"] < 1e-3 * f["evidence"]["chance"]


def test_a_nan_backbone_weight_is_found_without_running_the_backbone(tmp_path):
    sd = F.state_dict()
    sd["backbone.body.layer1.0.conv1.weight"] = torch.ones(8, 3, 3, 3)
    sd["backbone.body.layer1.0.conv1.weight"][0, 0, 0, :2] = NAN
    sd["backbone.fpn.inner_blocks.0.bias"] = torch.tensor([1.0, float("inf")])
    sd["backbone.body.layer1.0.bn1.num_batches_tracked"] = torch.tensor(7)
    save_torch({"model": sd}, tmp_path / "ckpt.pt")
    heads = load_checkpoint(tmp_path / "ckpt.pt")  # read through the mapped file
    assert heads.nonfinite_elsewhere == {
        "backbone.body.layer1.0.conv1.weight": 2,
        "backbone.fpn.inner_blocks.0.bias": 1,
    }
    diag = run(sd=sd)
    (f,) = [f for f in diag.findings if f.code == "nonfinite-weights"]
    assert f.evidence["modules"] == {
        "backbone.body.layer1.0.conv1": 2,
        "backbone.fpn.inner_blocks.0": 1,
    }
    assert f.evidence["values"] == 3 and "backbone.body.layer1.0.conv1 (2)" in f.message


def test_an_image_without_proposals_says_why():
    d = healthy_dict()
    for f in d["features"].values():
        f[1].fill_(NAN)
    diag = run(d)
    (f,) = [f for f in diag.findings if f.code == "no-proposals"]
    assert f.image == 1 and f.evidence["finite"] == 0 and f.evidence["kept"] == 0
    assert "every candidate box or objectness logit is NaN/Inf" in f.message
    assert f.evidence["anchors"] > f.evidence["preselected"] > 0  # the per-level top-k


def test_the_funnel_names_where_objects_are_lost():
    d = healthy_dict() | {"proposals": [FAR, FAR]}
    diag = run(d)
    (f,) = [f for f in diag.findings if f.code == "rpn-positives-starved"]
    ev = f.evidence
    assert ev["gt"] == 10 and ev["with_positive_anchor"] == 10 and ev["covered_by_proposal"] == 0
    assert ev["with_roi_positive"] == 0 and ev["lost_at"] == "at the proposals"
    assert f.severity == Severity.WARNING
    # in the first steps the RPN does not localize yet: information only
    early = run(d | {"meta": {"step": 10}})
    assert [x.severity for x in early.findings if x.code == "rpn-positives-starved"] == [
        Severity.INFO
    ]
    assert "rpn-positives-starved" not in _codes(run())


def test_cli_leads_with_the_runs_own_profile(tmp_path):
    d = _drop_p6(healthy_dict())
    d["meta"] = {"framework": "torchvision", "profile": "torchvision"}
    save_torch(F.state_dict(), tmp_path / "checkpoint.pt")
    dump_batch(tmp_path / "batch.pt", **{k: d[k] for k in ("features", "image_sizes", "gt_boxes",
               "gt_labels", "strides", "meta")})  # fmt: skip
    rep = inspect(tmp_path, new="legacy")
    assert (
        F.as_json(rep)["meta"]["run"]["own"] == "torchvision"
        and rep.worst_severity() != Severity.ERROR
    )
    (g,) = [g for g in F.as_json(rep)["groups"] if g["code"] == "nan-empty-mean"]
    assert g["scope"] == "what-if" and g["message"].startswith("legacy would introduce")


def test_every_phase_is_announced_in_order():
    seen = []
    inspect("fixtures/healthy", config="fixtures/toy.toml", precision="fp16", on_phase=seen.append)
    assert seen == list(Phase)
    seen.clear()  # fp32 has no precision phase
    inspect("fixtures/healthy", config="fixtures/toy.toml", on_phase=seen.append)
    assert seen == [p for p in Phase if p is not Phase.PRECISION]


@pytest.mark.parametrize("terminal,enabled,shown", [(True, True, True), (True, False, False),
                                                    (False, True, False)])  # fmt: skip
def test_the_progress_line_is_for_terminals_only(terminal, enabled, shown):
    buf = io.StringIO()
    out = Console(file=buf, force_terminal=terminal, width=100)
    with PhaseStatus(out, show_after=0.0, enabled=enabled) as on_phase:
        on_phase(Phase.REPLAY)
        time.sleep(0.3)
    assert ("lossdoctor: replaying the RPN and RoI losses (0 s;" in buf.getvalue()) is shown


def test_the_cli_draws_no_progress_off_a_terminal():
    r = CliRunner().invoke(app, ["inspect", "fixtures/healthy", "--config", "fixtures/toy.toml"])
    assert r.exit_code == 0 and "lossdoctor: " not in r.stderr
