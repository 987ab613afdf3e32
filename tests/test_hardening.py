"""No output ever lands on an input, whatever path form names it and whichever command writes it;
every input that passes the schema replays or is refused with one line and exit 2; the shipped
fixtures replay with no flag; compare lists only real changes and says when two reports are not
one run's."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import factories as F
from factories import exit2, invoke
from lossdoctor import dump_batch
from lossdoctor.inputs.files import save_torch


def write_capture(folder: Path, meta: dict | None = None, **batch_kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_torch(F.state_dict(), folder / "checkpoint.pt")
    d = F.batch_dict(**batch_kw)
    keys = ("features", "image_sizes", "gt_boxes", "gt_labels", "strides")
    dump_batch(folder / "batch.pt", meta=meta, **{k: d[k] for k in keys})
    return folder


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the guard -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A capture directory, a step folder of two ranks, a profile and a report, and links to
    every input file (symbolic and hard) in a folder of their own."""
    root = tmp_path_factory.mktemp("guard")
    cap = write_capture(root / "cap")
    for rank in (0, 1):
        write_capture(root / "step_000005" / f"rank_{rank}", {"rank": rank, "world_size": 2})
    (root / "p.toml").write_text('name = "mine"\nbase = "fixed"\n')
    r = invoke("inspect", cap, "--json", root / "report.json", "-q")
    assert r.exit_code == 0, r.output
    inputs = sorted(p for p in root.rglob("*") if p.is_file())
    links = root / "links"
    links.mkdir()
    for k, p in enumerate(inputs):
        (links / f"sym{k}{p.suffix}").symlink_to(p)
        os.link(p, links / f"hard{k}{p.suffix}")
    return root, inputs


def commands(root: Path) -> list[tuple[list, list[str]]]:
    """(arguments, the output options it takes) of every command that writes files."""
    cap, step = root / "cap", root / "step_000005"
    files = ("--json", "--csv", "--plot")
    return [
        (["inspect", cap], files),
        (["inspect", cap / "checkpoint.pt", cap / "batch.pt", "--old", root / "p.toml"], files),
        (["inspect", step], files),
        (["compare", cap, "--old", "legacy", "--new", "fixed"], files),
        (["compare", "--old", f"{root / 'report.json'}:legacy", "--new", "fixed", cap], files),
        (["compare", "--old", root / "report.json", "--new", root / "report.json"], ("--json",)),
        (["scan", cap, "--results", root / "res"], ("--json", "--plot")),
        (["scan", step, "--results", root / "res"], ("--json", "--plot")),
        (["scan", cap / "checkpoint.pt", "--batch", cap / "batch.pt"], ("--json", "--plot")),
    ]


def forms(root: Path, target: Path, k: int) -> list[Path | str]:
    """Ways to name ``target`` (the k-th input file)."""
    rel = os.path.relpath(target)
    return [
        target,
        rel,
        f"{target.parent}/./{target.name}",
        f"{target.parent}/../{target.parent.name}/{target.name}",
        root / "links" / f"sym{k}{target.suffix}",
        root / "links" / f"hard{k}{target.suffix}",
    ]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_no_command_writes_over_any_form_of_an_input(tree, data):
    root, inputs = tree
    before = {p: sha(p) for p in inputs}
    args, options = data.draw(st.sampled_from(commands(root)))
    option = data.draw(st.sampled_from(options))
    # an input this command reads (a folder's files included)
    read = [p for p in inputs if any(str(p).startswith(str(a)) for a in args if Path(a).exists())]
    k = data.draw(st.sampled_from(range(len(read))))
    target = data.draw(st.sampled_from(forms(root, read[k], inputs.index(read[k]))))
    r = invoke(*args, option, target, "-q" if args[0] != "compare" else "--all")
    assert r.exit_code == 2, (args, option, target, r.output)
    assert "never writes over an input" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert {p: sha(p) for p in inputs} == before


def test_scan_results_never_land_on_an_input(tmp_path, monkeypatch):
    """A results folder whose result file would be a scanned file is refused before any replay."""
    import lossdoctor.scan as scan_package
    from lossdoctor.inputs.errors import InputError
    from lossdoctor.scan import scan

    cap = write_capture(tmp_path / "cap")
    before = sha(cap / "batch.pt")
    monkeypatch.setattr(scan_package, "result_path", lambda results, job: Path(job.dump.batch))
    with pytest.raises(InputError, match="never writes over an input"):
        scan([cap], results=tmp_path / "res")
    assert sha(cap / "batch.pt") == before


def test_a_results_folder_that_is_a_file_is_refused_before_any_replay(tmp_path):
    cap = write_capture(tmp_path / "cap")
    before = sha(cap / "batch.pt")
    exit2(invoke("scan", cap, "--results", cap / "batch.pt"), "is a file, not a folder")
    assert sha(cap / "batch.pt") == before


def test_an_empty_output_name_is_refused(tmp_path):
    cap = write_capture(tmp_path / "cap")
    for option in ("--json", "--csv", "--plot"):
        exit2(invoke("inspect", cap, option, ""), f"{option} needs a file name")


def test_a_csv_folder_holding_a_csv_input_is_refused(tmp_path):
    cap = write_capture(tmp_path / "cap")
    (cap / "levels.csv").write_text("x\n")
    exit2(invoke("inspect", cap, "--csv-dir", cap), "holds")
    assert (cap / "levels.csv").read_text() == "x\n"


# ---- inputs that pass the schema ---------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,needle",
    [
        (
            "sample_seed",
            2**80,
            "meta.sample_seed': expected an integer in [0, 9223372036854775807]",
        ),
        ("sample_seed", -1, "meta.sample_seed"),
        ("step", 2**40, "meta.step': expected an integer in [0, 2147483647]"),
        ("rank", 2**40, "meta.rank"),
        ("world_size", 0, "meta.world_size"),
        ("lr", float("inf"), "meta.lr': expected a finite number >= 0"),
        ("lr", float("nan"), "meta.lr"),
        ("profile", 3, "meta.profile"),
        ("config", ["x"], "meta.config"),
    ],
)
def test_recorded_meta_out_of_range_is_one_line(tmp_path, key, value, needle):
    cap = write_capture(tmp_path / "cap")
    raw = torch.load(cap / "batch.pt", weights_only=True)  # past dump_batch's own check
    raw["meta"] = {key: value}
    torch.save(raw, cap / "batch.pt")
    exit2(invoke("inspect", cap), needle)
    exit2(invoke("check", cap), needle)


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
    st.sampled_from(["legacy", "fixed", "mmdet", "torchvision", "bce", "level_pos", "nan"]),
)  # fmt: skip
_VALUES = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "sizes", "fg_iou", "loss", "normalizer", "beta", "x"]), inner,
        max_size=3),
    max_leaves=6,
)  # fmt: skip
_CONFIG_KEYS = st.sampled_from(
    ["base", "name", "anchors", "rpn_matcher", "roi_sampler", "roi_pool", "test", "mask",
     "cascade", "ranking", "rpn_coder", "bogus"]
)  # fmt: skip
_PROFILE_KEYS = st.sampled_from(["base", "name", "summary", "rpn_cls", "rpn_box", "roi_cls",
                                 "roi_box", "roi_mask", "bogus"])  # fmt: skip


@pytest.fixture(scope="module")
def one_capture(tmp_path_factory):
    return write_capture(tmp_path_factory.mktemp("meta") / "cap")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    key=st.sampled_from(["config", "profile"]),
    config=st.dictionaries(_CONFIG_KEYS, _VALUES, max_size=4),
    profile=st.dictionaries(_PROFILE_KEYS, _VALUES, max_size=4),
)
def test_any_recorded_config_or_profile_table_replays_or_is_one_line(one_capture, key, config,
                                                                      profile):  # fmt: skip
    raw = torch.load(one_capture / "batch.pt", weights_only=True)
    raw["meta"] = {key: config if key == "config" else profile}
    torch.save(raw, one_capture / "batch.pt")
    r = invoke("inspect", one_capture, "-q")
    assert r.exit_code in (0, 1, 2) and "internal error" not in r.output, r.output
    if r.exit_code == 2:
        assert r.stderr.count("\n") == 1 and f"meta.{key}" in r.stderr or "base" in r.stderr, (
            r.stderr
        )


def test_a_seed_beyond_int64_is_refused(tmp_path):
    cap = write_capture(tmp_path / "cap")
    exit2(invoke("inspect", cap, "--seed", str(2**80)), "--seed must be an integer in [0, ")
    exit2(invoke("inspect", cap, "--seed", "-3"), "--seed must be an integer in [0, ")


def test_a_binary_file_named_json_is_refused_as_a_report(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    exit2(invoke("compare", "--old", bad, "--new", bad), "is not UTF-8 text")
    bad.write_bytes(b"\xff\xfe{}")
    exit2(invoke("compare", "--old", bad, "--new", "fixed"), "is not UTF-8 text")


def test_swapped_files_name_the_swap(tmp_path):
    cap = write_capture(tmp_path / "cap")
    exit2(invoke("inspect", cap / "batch.pt", cap / "checkpoint.pt"), "is a lossdoctor batch dump")


def _step(root: Path, metas: dict[int, dict]) -> Path:
    for rank, meta in metas.items():
        write_capture(root / f"rank_{rank}", {"world_size": 2, "step": 5, **meta})
    return root


def test_two_rank_folders_of_one_rank_are_refused(tmp_path):
    step = _step(tmp_path / "step_000005", {0: {"rank": 0}, 1: {"rank": 0}})
    exit2(invoke("inspect", step), "rank_1 holds a dump of rank 0")


def test_rank_folders_of_different_steps_are_refused(tmp_path):
    step = _step(tmp_path / "step_000005", {0: {"rank": 0}, 1: {"rank": 1, "step": 6}})
    exit2(invoke("inspect", step), "different steps (rank 0: step 5, rank 1: step 6)")


def test_scan_refuses_a_hostile_batch_once_up_front(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    for k in range(3):
        save_torch(F.state_dict(seed=k), tmp_path / f"ckpt_{k}.pt")
    (tmp_path / "b.pt").write_bytes(pickle.dumps({"x": Boom()}))
    ckpts = [tmp_path / f"ckpt_{k}.pt" for k in range(3)]
    r = invoke("scan", *ckpts, "--batch", tmp_path / "b.pt", "--results", tmp_path / "res")
    exit2(r, f"--batch {tmp_path / 'b.pt'}: not a lossdoctor batch dump")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "res").exists()


def test_a_mistyped_path_says_no_such_file(tmp_path):
    exit2(invoke("inspect", tmp_path / "colapse"), "no such file or folder")
    exit2(invoke("check", tmp_path / "colapse"), "no such file or folder")


def test_a_folder_holding_only_a_batch(tmp_path):
    folder = tmp_path / "only"
    write_capture(folder)
    (folder / "checkpoint.pt").unlink()
    exit2(invoke("inspect", folder), f"pass a checkpoint with it (CKPT {folder / 'batch.pt'})")
    r = invoke("check", folder)
    assert r.exit_code == 0 and "batch" in r.stdout, r.output
    exit2(invoke("scan", folder), "--batch")


# ---- the shipped fixtures ----------------------------------------------------------------------

FIX = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.mark.parametrize("name", ["healthy", "collapse", "faults/no-gt-image"])
def test_fixtures_replay_as_shipped(name):
    """No flag gives what the toy config gives: the dumps record it, and the run's profile."""
    bare = invoke("inspect", FIX / name)
    flagged = invoke("inspect", FIX / name, "--config", FIX / "toy.toml")
    assert bare.exit_code == flagged.exit_code and bare.stdout == flagged.stdout
    own = {"healthy": "fixed", "collapse": "legacy", "faults/no-gt-image": "fixed"}[name]
    assert f"{own} (the run's, recorded in the dump)" in bare.stdout


def test_scan_finds_every_fault_fixture(tmp_path):
    faults = sorted((FIX / "faults").iterdir())
    r = invoke("scan", *faults, "--results", tmp_path / "res", "--json", tmp_path / "s.json")
    assert r.exit_code in (0, 1), r.output
    import json

    rows = json.loads((tmp_path / "s.json").read_text())["tables"]["dumps"]
    assert len(rows) == len(faults) == 4 and all(x["status"] == "ok" for x in rows)


def test_the_fixture_dumps_record_their_profile_and_config():
    b = torch.load(FIX / "healthy" / "batch.pt", weights_only=True)
    assert b["meta"]["profile"] == "fixed" and b["meta"]["config"]["base"] == "torchvision"


# ---- compare -----------------------------------------------------------------------------------


def test_change_words():
    from lossdoctor.report.compare import change

    nan = float("nan")
    assert change(512, 512 * (1 + 1e-7)) == "="  # float32 noise is no change
    assert change(512, 512.3) == "x1.00059"  # a small change keeps its digits
    assert change(1.0, 2.0) == "x2"
    assert change(nan, 1.0) == "NaN → finite" and change(1.0, float("inf")) == "finite → Inf"
    assert change(0.0, 0.0) == "=" and change(0.0, 1e-3) == "0 → nonzero"


def test_a_per_level_normalizer_has_no_all_row_value_not_a_nan(tmp_path):
    r = invoke("compare", FIX / "collapse", "--old", "legacy", "--new", "fixed", "--all",
               "--json", tmp_path / "c.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    import json

    rows = json.loads((tmp_path / "c.json").read_text())["comparisons"][0]["rows"]
    at = {(x["head"], x["level"], x["metric"]): x for x in rows}
    assert at[("rpn", "all", "avg_factor")]["old"] == "per level"
    assert at[("rpn", "all", "avg_factor")]["change"] == "per level → 1024"
    # the RoI head's legacy normalizer is the sampled count: one value, unchanged
    assert at[("roi", "all", "avg_factor")]["change"] == "="
    # a real NaN stays a NaN: the legacy RPN box loss at p2 (a level without positives)
    assert at[("rpn", "p2", "loss_bbox")]["change"] == "NaN → finite"
    # --all lists unchanged rows; the default lists changes only
    assert any(x["change"] == "=" for x in rows)
    shown = invoke("compare", FIX / "collapse", "--old", "legacy", "--new", "fixed").stdout
    assert " = " not in shown and "x1 " not in shown


def test_reports_of_different_runs_are_flagged(tmp_path):
    import json

    for name in ("collapse", "healthy"):
        assert (
            invoke("inspect", FIX / name, "--json", tmp_path / f"{name}.json", "-q").exit_code == 0
        )
    r = invoke("compare", "--old", tmp_path / "collapse.json", "--new", tmp_path / "healthy.json",
               "--json", tmp_path / "cmp.json")  # fmt: skip
    assert r.exit_code in (0, 1), r.output
    assert "lossdoctor: warning: the reports share neither checkpoint" in r.stderr
    assert json.loads((tmp_path / "cmp.json").read_text())["warnings"]
    same = invoke(
        "compare", "--old", tmp_path / "collapse.json", "--new", tmp_path / "collapse.json"
    )
    assert "warning" not in same.stderr


# ---- wording -----------------------------------------------------------------------------------


def test_an_unknown_code_suggests_the_closest_not_every_code():
    exit2(invoke("explain", "nan-emty-mean"), "did you mean nan-empty-mean?")
    r = invoke("explain", "zzz")
    assert "no code is close" in r.stderr and "collapse-to-background" not in r.stderr


def test_usage_lines_bracket_optional_arguments_once():
    for command, usage in (("inspect", "CKPT [BATCH]"), ("compare", "[CKPT] [BATCH]"),
                           ("check", "BATCH [CKPT]"), ("scan", "DIR..."),
                           ("config-from", "FRAMEWORK CFG")):  # fmt: skip
        line = invoke(command, "--help").stdout.splitlines()
        said = next(x for x in line if "Usage:" in x)
        assert said.endswith(f"[OPTIONS] {usage}"), said


def test_counts_agree_with_their_nouns(tmp_path):
    one = [torch.tensor([[8.0, 10.0, 40.0, 50.0]])] * 2
    cap = write_capture(tmp_path / "cap", boxes=one, labels=[torch.tensor([1])] * 2)
    r = invoke("check", cap / "batch.pt")
    assert "1 GT box," in r.stdout and "1 GT boxes" not in r.stdout, r.stdout


# ---- the report in any terminal ----------------------------------------------------------------


def _numbers_of(text: str) -> list[str]:
    import re

    return re.findall(r"(?<![\w.])-?(?:\d+\.?\d*(?:e[-+]?\d+)?|NaN|Inf)(?![\w.])", text)


@pytest.mark.parametrize("width", [60, 80, 100, 160])
def test_the_report_fits_any_width_and_cuts_no_number(monkeypatch, width):
    """Every line fits, none ends in a space, no cell is cut, and the tables hold every number
    of the widest view (stacked tables repeat their key columns, so some appear more often)."""
    from collections import Counter

    monkeypatch.setenv("COLUMNS", str(width))
    r = invoke("inspect", FIX / "collapse")
    lines = r.stdout.splitlines()
    assert max(len(x) for x in lines) <= width
    assert not [x for x in lines if x != x.rstrip()]
    assert "…" not in r.stdout
    monkeypatch.setenv("COLUMNS", "200")
    wide = invoke("inspect", FIX / "collapse").stdout
    tables = lambda t: t[t.index("RPN head") :]  # noqa: E731
    narrow, full = Counter(_numbers_of(tables(r.stdout))), Counter(_numbers_of(tables(wide)))
    assert not full - narrow


@pytest.mark.parametrize("width", [60, 80, 120])
def test_compare_and_scan_fit_any_width(tmp_path, monkeypatch, width):
    monkeypatch.setenv("COLUMNS", str(width))
    cap = write_capture(tmp_path / "cap", {"step": 3})
    outputs = [
        invoke("compare", FIX / "collapse", "--old", "legacy", "--new", "fixed").stdout,
        invoke("scan", cap, FIX / "collapse", "--results", tmp_path / "res").output,
    ]
    for text in outputs:
        lines = text.splitlines()
        assert max(len(x) for x in lines) <= width and "…" not in text, text
        assert not [x for x in lines if x != x.rstrip()]
    assert "x0.117" in outputs[0] and "NaN → finite" in outputs[0]


def test_a_step_report_fits_80_columns(tmp_path, monkeypatch):
    for rank in (0, 1):
        write_capture(tmp_path / "step_000005" / f"rank_{rank}", {"rank": rank, "world_size": 2})
    monkeypatch.setenv("COLUMNS", "80")
    r = invoke("inspect", tmp_path / "step_000005")
    assert r.exit_code in (0, 1), r.output
    lines = r.stdout.splitlines()
    assert max(len(x) for x in lines) <= 80 and "…" not in r.stdout


# ---- scan --------------------------------------------------------------------------------------


def test_scan_takes_the_step_from_the_dump_and_names_what_it_scanned(tmp_path):
    import json

    a = write_capture(tmp_path / "a", {"step": 12})  # folder names carry no step
    b = write_capture(tmp_path / "b")
    r = invoke("scan", a, b, "--results", tmp_path / "res", "--json", tmp_path / "s.json")
    assert r.exit_code in (0, 1), r.output
    rows = json.loads((tmp_path / "s.json").read_text())["tables"]["dumps"]
    assert sorted((x["step"] is None, x["step"], x["rank"]) for x in rows) == [
        (False, 12, None), (True, None, None)
    ]  # fmt: skip
    said = " ".join(r.output.split())
    assert f"Scan {a}, {b}: 2 dumps (step 12)" in said and "()" not in said, said


def test_scan_keeps_runs_apart(tmp_path):
    """Two runs that share a step number are two timeline points, not one step of two ranks;
    a ranked and an unranked run at one step are no conflict."""
    from lossdoctor.scan import scan

    write_capture(tmp_path / "runA" / "step_000003", {"step": 3, "profile": "legacy"})
    write_capture(tmp_path / "runB" / "step_000003", {"step": 3, "profile": "mmdet"})
    for rank in (0, 1):
        write_capture(tmp_path / "runC" / "step_000003" / f"rank_{rank}",
                      {"step": 3, "rank": rank, "world_size": 2})  # fmt: skip
    rep = scan([tmp_path / "runA", tmp_path / "runB", tmp_path / "runC"],
               results=tmp_path / "res")  # fmt: skip
    rows = F.as_json(rep)["tables"]["dumps"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert sorted((Path(r["run"]).name, r["step"], r["rank"]) for r in rows) == [
        ("runA", 3, None), ("runB", 3, None), ("runC", 3, 0), ("runC", 3, 1)
    ]  # fmt: skip
    assert {Path(r["run"]).name for r in F.as_json(rep)["tables"]["ranks"]} == {"runC"}
    assert {Path(r["run"]).name for r in F.as_json(rep)["tables"]["first_seen"]} <= {
        "runA",
        "runB",
        "runC",
    }
    # every profile of every run is in the timeline the plot draws
    assert {r["profile"] for r in F.as_json(rep)["tables"]["totals"]} == {
        "legacy",
        "mmdet",
        "fixed",
    }
    from lossdoctor.scan.view import plot_timeline

    plot_timeline(rep, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_two_unranked_dumps_of_one_step_of_one_run_are_a_failed_step(tmp_path):
    from lossdoctor.scan import scan

    for name in ("a", "b"):
        write_capture(tmp_path / "run" / "step_000004" / name, {"step": 4, "run": "same"})
    rep = scan([tmp_path / "run" / "step_000004"], results=tmp_path / "res")
    failed = [r for r in F.as_json(rep)["tables"]["dumps"] if r["status"] == "failed"]
    assert len(failed) == 1 and "one dump per rank" in failed[0]["message"], F.as_json(rep)[
        "tables"
    ]["dumps"]


def test_the_timeline_marks_nan_steps():
    from lossdoctor.scan.view import _series

    nan, inf = float("nan"), float("inf")
    points = [(1, 1.0), (2, nan), (3, inf), (None, 5.0), (4, 2.0), (4, 4.0)]
    assert _series(points) == ([1, 4], [1.0, 3.0], [2, 3])
