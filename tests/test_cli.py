"""The CLI through typer's CliRunner: every command, every input error, exports and exit codes."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import factories as F
from lossdoctor import dump_batch
from lossdoctor.cli import app
from lossdoctor.report.model import Report

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.save({"model": F.state_dict(), "epoch": 7}, d / "ckpt.pt")
    b = F.batch_dict()
    dump_batch(
        d / "batch.pt",
        features=b["features"],
        image_sizes=b["image_sizes"],
        gt_boxes=b["gt_boxes"],
        gt_labels=b["gt_labels"],
        strides=b["strides"],
        meta={"iteration": 5000},
    )
    return d


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, needle):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("lossdoctor: error: ") and "\n" not in err, err
    assert needle in err, err
    assert "Traceback" not in result.output


def test_inspect_prints_header_symptom_findings_and_tables(files):
    r = run("inspect", files / "ckpt.pt", files / "batch.pt")
    assert r.exit_code == 0, r.output
    out = r.stdout
    for needle in (
        "torchvision layout",
        "iteration 5000",
        "Symptom",
        "Findings",
        "nan-empty-mean",
        "RPN head, per level",
        "ROI head, per level",
        "Totals per profile",
    ):
        assert needle in out
    assert "\x1b[" not in out  # plain text off a terminal
    assert max(len(line) for line in out.splitlines()) <= 120


def test_quiet_prints_symptom_and_findings_only(files):
    r = run("inspect", files / "ckpt.pt", files / "batch.pt", "--quiet")
    assert r.exit_code == 0 and "Symptom" in r.stdout and "Findings" in r.stdout
    assert "RPN head" not in r.stdout and "checkpoint" not in r.stdout


def test_fail_on_sets_exit_code(files):
    assert (
        run("inspect", files / "ckpt.pt", files / "batch.pt", "--fail-on", "error").exit_code == 1
    )
    # fixed vs mmdet on this batch: no error, but warnings remain
    r = run(
        "inspect",
        files / "ckpt.pt",
        files / "batch.pt",
        "--old",
        "fixed",
        "--new",
        "mmdet",
        "--fail-on",
        "error",
    )
    assert r.exit_code == 0, r.output


def test_exports_json_csv_csvdir_plot(files, tmp_path):
    r = run(
        "inspect",
        files / "ckpt.pt",
        files / "batch.pt",
        "--json",
        tmp_path / "r.json",
        "--csv",
        tmp_path / "l.csv",
        "--csv-dir",
        tmp_path / "all",
        "--plot",
        tmp_path / "p.png",
    )
    assert r.exit_code == 0, r.output
    rep = Report.load(tmp_path / "r.json")
    assert rep.meta.checkpoint.sha256 and rep.meta.batch.meta == {"iteration": 5000}
    assert rep.meta.batch.dump.iteration == 5000 and rep.meta.batch.dump.step is None
    with open(tmp_path / "l.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0])[: len(F.LEVEL_COLUMNS)] == F.LEVEL_COLUMNS
    assert len(rows) == len(rep.tables.levels)
    for row, want in zip(rows, rep.tables.levels):
        for k in ("loss_cls", "loss_bbox", "avg_factor", "grad_feature"):
            got, value = float(row[k]), getattr(want, k)
            assert (math.isnan(got) and math.isnan(value)) or got == value, (k, row[k], value)
        assert int(row["pos"]) == want.pos and row["nan_origin"] == want.nan_origin
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [
        "findings.csv",
        "groups.csv",
        "images.csv",
        "levels.csv",
        "origins.csv",
        "params.csv",
        "profiles.csv",
    ]
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_json_to_stdout_is_the_report(files):
    r = run("inspect", files / "ckpt.pt", files / "batch.pt", "--json", "-")
    assert r.exit_code == 0
    rep = Report.from_dict(json.loads(r.stdout))
    assert rep.profiles == ["legacy", "fixed"]
    assert "Symptom" in r.stderr  # the terminal view moved to stderr


def test_json_roundtrip_is_lossless_and_compare_with_itself_shows_no_change(files, tmp_path):
    run("inspect", files / "ckpt.pt", files / "batch.pt", "--json", tmp_path / "r.json")
    a = Report.load(tmp_path / "r.json")
    b = Report.from_dict(json.loads(a.to_json()))
    assert a.to_json() == b.to_json()
    r = run(
        "compare",
        "--old",
        tmp_path / "r.json",
        "--new",
        tmp_path / "r.json",
        "--json",
        tmp_path / "c.json",
    )
    assert r.exit_code == 0, r.output
    assert "no change" in r.stdout and "Findings that appear: 0" in r.stdout
    c = json.loads((tmp_path / "c.json").read_text())
    assert all(
        row["change"] == "=" for comp in c["comparisons"] for row in comp["rows"] + comp["totals"]
    )


def test_compare_two_profiles_calls_out_nan_to_finite(files, tmp_path):
    r = run(
        "compare",
        files / "ckpt.pt",
        files / "batch.pt",
        "--old",
        "legacy",
        "--new",
        "fixed",
        "--csv",
        tmp_path / "c.csv",
    )
    assert r.exit_code == 0, r.output
    assert "NaN → finite" in r.stdout and "Findings that disappear" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    loss = next(x for x in rows if x["metric"] == "loss_total")
    assert loss["change"] == "NaN → finite"


def test_compare_report_profiles_and_errors(files, tmp_path):
    run("inspect", files / "ckpt.pt", files / "batch.pt", "--json", tmp_path / "r.json")
    r = run(
        "compare", "--old", f"{tmp_path / 'r.json'}:legacy", "--new", f"{tmp_path / 'r.json'}:fixed"
    )
    assert r.exit_code == 0 and "finite" in r.stdout
    one_line_error(
        run("compare", "--old", tmp_path / "r.json", "--new", "fixed"),
        "must both be profiles, both precisions (fp32, fp16, bf16) or both reports",
    )
    one_line_error(run("compare", "--old", "legacy", "--new", "fixed"), "needs CKPT and BATCH")
    one_line_error(
        run("compare", "--old", f"{tmp_path / 'r.json'}:mmdet", "--new", tmp_path / "r.json"),
        "has no profile 'mmdet'",
    )


def test_report_of_another_version(tmp_path):
    (tmp_path / "old.json").write_text(
        json.dumps({"format": "lossdoctor.report/0", "meta": {}, "tables": {}, "findings": []})
    )
    one_line_error(
        run("compare", "--old", tmp_path / "old.json", "--new", tmp_path / "old.json"),
        "is not 'lossdoctor.report/2'",
    )
    (tmp_path / "bad.json").write_text("{not json")
    one_line_error(
        run("compare", "--old", tmp_path / "bad.json", "--new", tmp_path / "bad.json"),
        "is not JSON",
    )


def test_input_errors_are_one_line(files, tmp_path):
    ck, bt = files / "ckpt.pt", files / "batch.pt"
    one_line_error(run("inspect", tmp_path / "missing.pt", bt), "does not exist")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    one_line_error(run("inspect", tmp_path / "text.pt", bt), "is not a torch checkpoint")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    one_line_error(run("inspect", ck, tmp_path / "tensor.pt"), "not a lossdoctor batch dump")
    one_line_error(run("inspect", ck, bt, "--old", "legacyy"), "unknown profile 'legacyy'")
    one_line_error(run("inspect", ck, bt, "--config", "yolo"), "unknown detector preset 'yolo'")
    (tmp_path / "bad.toml").write_text("pos_weight = \n")
    one_line_error(run("inspect", ck, bt, "--new", tmp_path / "bad.toml"), "is not valid TOML")
    torch.save(F.state_dict(channels=16), tmp_path / "wide.pt")
    one_line_error(
        run("inspect", tmp_path / "wide.pt", bt),
        "checkpoint heads take 16 channels but the batch features have 8",
    )
    one_line_error(run("inspect", ck, bt, "--device", "cuda"), "--device cuda is not supported")
    one_line_error(run("inspect", ck, bt, "--bogus"), "No such option: --bogus")
    one_line_error(run("inspect", ck), "BATCH is missing: pass CKPT BATCH, or a capture directory")
    one_line_error(run("inspect", ck, bt, "--old", "fixed", "--new", "fixed"), "both named 'fixed'")


def test_profiles_list_and_toml(tmp_path):
    r = run("profiles")
    assert r.exit_code == 0
    for name in ("legacy", "fixed", "mmdet", "torchvision", "detectron2"):
        assert name in r.stdout
    r = run("profiles", "mmdet")
    assert r.exit_code == 0 and 'normalizer = "mmdet_sampler"' in r.stdout
    (tmp_path / "mine.toml").write_text(r.stdout.replace('name = "mmdet"', 'name = "mine"'))
    from lossdoctor.inputs.profiles import load_profile, mmdet

    assert load_profile(tmp_path / "mine.toml") == mmdet().__class__(
        **{**mmdet().__dict__, "name": "mine"}
    )
    one_line_error(run("profiles", "nope"), "unknown profile 'nope'")


def test_check(files, tmp_path):
    r = run("check", files / "batch.pt", files / "ckpt.pt")
    assert r.exit_code == 0, r.output
    assert "valid lossdoctor.batch/1" in r.stdout and "fits the batch" in r.stdout
    said = " ".join(r.stdout.split())
    assert "model replayed: RPN head (one 3x3 conv), box head (2 fcs, per-class regression)" in said
    b = F.batch_dict(
        boxes=[torch.tensor([[5.0, 5.0, 5.0, 30.0]])] * 2, labels=[torch.tensor([3])] * 2
    )
    dump_batch(
        tmp_path / "sus.pt",
        features=b["features"],
        image_sizes=b["image_sizes"],
        gt_boxes=b["gt_boxes"],
        gt_labels=b["gt_labels"],
    )
    r = run("check", tmp_path / "sus.pt", files / "ckpt.pt")
    assert r.exit_code == 0 and "degenerate-gt" in r.stdout and "labels outside 0..2" in r.stdout
    torch.save({"format": "lossdoctor.batch/1"}, tmp_path / "broken.pt")
    one_line_error(run("check", tmp_path / "broken.pt"), "batch key 'features' is missing")


def test_check_says_whether_the_model_is_replayed_before_any_replay(files, tmp_path):
    """A checkpoint with a keypoint head: replayed, the keypoint head named as not replayed; a
    second RPN conv (torchvision's v2 models): replayed and said; a third: refused by name,
    exit 2."""
    sd = F.state_dict()
    keypoints = {**sd, "roi_heads.keypoint_head.0.weight": torch.zeros(8, 8, 3, 3)}
    torch.save(keypoints, tmp_path / "kp.pt")
    r = run("check", files / "batch.pt", tmp_path / "kp.pt")
    assert r.exit_code == 0, r.output
    said = " ".join(r.stdout.split())
    assert "not replayed: roi_heads.keypoint_head (the keypoint head)" in said
    conv = {"weight": torch.zeros(8, 8, 3, 3), "bias": torch.zeros(8)}
    v2 = {**sd, **{f"rpn.head.conv.1.0.{k}": t for k, t in conv.items()}}
    torch.save(v2, tmp_path / "v2.pt")
    r = run("check", files / "batch.pt", tmp_path / "v2.pt")
    assert r.exit_code == 0, r.output
    assert "RPN head (2 3x3 convs)" in " ".join(r.stdout.split())
    v3 = {**v2, **{f"rpn.head.conv.2.0.{k}": t for k, t in conv.items()}}
    torch.save(v3, tmp_path / "v3.pt")
    one_line_error(
        run("check", files / "batch.pt", tmp_path / "v3.pt"),
        "an RPN head with more than 2 convs: not replayed yet",
    )


@pytest.mark.parametrize("cmd", ["inspect", "compare", "profiles", "check", "explain"])
def test_every_help_has_an_example(cmd):
    r = run(cmd, "--help")
    assert r.exit_code == 0 and "lossdoctor " + cmd in r.stdout and "Example" in r.stdout


def test_help_does_not_import_torch():
    code = (
        "import sys\nimport lossdoctor.cli as c\ntry:\n    c.app()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True)
    assert "Commands" in out.stdout and out.stdout.strip().endswith("NO-TORCH")


def test_explain_a_code_its_list_and_an_unknown_code():
    from lossdoctor.diagnose.findings import rule
    from lossdoctor.diagnose.ranks import ALL_RULES

    r = run("explain", "nan-empty-mean")
    assert r.exit_code == 0, r.output
    want = rule("nan-empty-mean")
    assert r.stdout.startswith("nan-empty-mean  [error]") and want.fix in r.stdout.replace(
        "\n", " "
    )
    assert "evidence: stage, nan, posinf, neginf, index, gt" in r.stdout
    listing = run("explain", "--list").stdout.strip().splitlines()
    assert [line.split()[0] for line in listing] == [x.code for x in ALL_RULES]
    assert run("explain", "rank-graph-differs").stdout.startswith("rank-graph-differs  [warning]")
    assert run("explain", "gt-matches-no-anchor").stdout.startswith(
        "gt-matches-no-anchor  [error (some cases warning)]"
    )
    causes = run("explain", "nonfinite-loss").stdout
    assert (
        "input: the features are already non-finite" in causes
        and "targets: drop GT boxes" in causes
    )
    one_line_error(run("explain", "nan-emtpy-mean"), "unknown finding code 'nan-emtpy-mean'")


def test_console_script_exits_with_the_commands_code_and_its_output_in_place(files, tmp_path):
    """The entry point leaves without the interpreter's teardown: what the command printed (to a
    pipe) and wrote is all there, and its exit code is the command's."""

    def script(*args):
        code = "from lossdoctor.cli import main; main()"
        cmd = [sys.executable, "-c", code, *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    out = tmp_path / "r.json"
    r = script(
        "inspect", files / "ckpt.pt", files / "batch.pt", "--json", out, "--fail-on", "never"
    )
    assert r.returncode == 0, r.stderr
    assert "findings" in r.stdout.lower() and json.loads(out.read_text())["findings"] is not None
    bad = script("inspect", files / "ckpt.pt", tmp_path / "missing.pt")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("lossdoctor: error: ")
    assert "Traceback" not in bad.stderr
    assert script("profiles").returncode == 0
