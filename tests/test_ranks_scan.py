"""One step across ranks, and `lossdoctor scan` over steps x ranks: the rank findings where they
belong, the all-reduced normalizer what-if worked out by hand, the same tables from the serial,
pool and Ray backends, a resumed scan that recomputes nothing, and bad input."""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import factories as F
from lossdoctor import dump_batch, inspect
from lossdoctor.cli import app
from lossdoctor.inputs.files import save_torch
from lossdoctor.scan import scan

WORLD = 2


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    root = tmp_path_factory.mktemp("run") / "lossdoctor-dumps"
    F.toy_step_dumps(root, steps=(3, 7), world=WORLD)
    return root


def _codes(report, code) -> list[dict]:
    return [f for f in F.as_json(report)["findings"] if f["code"] == code]


def test_one_step_across_ranks_names_the_empty_rank_and_the_graph_gap(dumps):
    rep = inspect(dumps / "step_000003")
    assert [r["rank"] for r in F.as_json(rep)["meta"]["ranks"]] == [0, 1] and F.as_json(rep)[
        "meta"
    ]["world_size"] == WORLD
    (empty,) = _codes(rep, "rank-empty-gt")
    assert empty["evidence"] == {"rank": 1, "images": 4}
    gaps = _codes(rep, "rank-graph-differs")
    assert gaps and all(g["evidence"]["ranks_with"] == [0] for g in gaps)
    assert all(g["evidence"]["ranks_without"] == [1] for g in gaps)
    assert "roi_heads.box_predictor.bbox_pred.weight" in gaps[0]["evidence"]["params"]
    # only legacy's naive code leaves the empty rank's box terms out of the graph; fixed keeps
    # them in (a zero gradient on rank 1, no hang)
    assert {g["profile"] for g in gaps} == {"legacy"}
    assert not _codes(rep, "rank-normalizer-skew")
    # every rank's own rows are there, with their rank
    assert {r["rank"] for r in F.as_json(rep)["tables"]["levels"]} == {0, 1}
    assert {f["rank"] for f in F.as_json(rep)["findings"] if f["code"] == "empty-gt-image"} == {1}


def test_the_all_reduced_normalizer_by_hand(dumps):
    rep = inspect(dumps / "step_000007")
    rows = [
        r
        for r in F.as_json(rep)["tables"]["ranks"]
        if r["profile"] == "legacy" and r["head"] == "rpn"
    ]
    by = {(r["rank"], r["level"]): r for r in rows}
    for level in ("p2", "p3"):
        a, b = by[(0, level)], by[(1, level)]
        mean = (a["avg_factor"] + b["avg_factor"]) / 2
        for r in (a, b):
            assert r["global_avg_factor"] == pytest.approx(mean)
            # legacy weighs 1; DDP averages the ranks' gradients
            assert r["sample_weight"] == pytest.approx(1 / (r["avg_factor"] * WORLD))
            assert r["global_sample_weight"] == pytest.approx(1 / (mean * WORLD))
            assert r["global_loss_cls"] == pytest.approx(r["loss_cls"] * r["avg_factor"] / mean)
    (skew,) = [g for g in F.as_json(rep)["groups"] if g["code"] == "rank-normalizer-skew"]
    ev = skew["evidence"][0]
    weights = {
        r["rank"]: r["sample_weight_bbox"]
        for r in F.as_json(rep)["tables"]["ranks"]
        if r["profile"] == "legacy" and r["head"] == "roi" and r["level"] == "p2"
    }
    assert ev["ranks"] == [1, 0] and ev["ratio"] == pytest.approx(weights[1] / weights[0])
    assert ev["ratio"] > 10


def _tables(report) -> str:
    """The scan's tables (of a report, or of its JSON) without what depends on the run (timings,
    the cache, where its results were written)."""
    tables = report["tables"] if isinstance(report, dict) else F.as_json(report)["tables"]
    t = {k: v for k, v in tables.items() if k != "dumps"}
    volatile = ("seconds", "cached", "peak_rss_mib", "result")
    dumps = [{k: v for k, v in r.items() if k not in volatile} for r in tables["dumps"]]
    return json.dumps({**t, "dumps": dumps}, sort_keys=True, default=str)


def test_scan_backends_agree_and_a_rerun_recomputes_nothing(dumps, tmp_path):
    serial = scan([dumps], results=tmp_path / "serial", workers=1, threads=1)
    pool = scan([dumps], results=tmp_path / "pool", workers=2, threads=1)
    assert _tables(pool) == _tables(serial)
    assert [(r["step"], r["rank"]) for r in F.as_json(pool)["tables"]["dumps"]] == [
        (3, 0),
        (3, 1),
        (7, 0),
        (7, 1),
    ]
    first = {r["code"]: (r["step"], r["rank"]) for r in F.as_json(pool)["tables"]["first_seen"]}
    assert first["rank-empty-gt"] == (3, None) and first["rank-graph-differs"] == (3, None)
    assert first["rank-normalizer-skew"] == (7, None)
    timeline = F.as_json(pool)["tables"]["timeline"]
    assert {(r["step"], r["rank"]) for r in timeline} == {(3, 0), (3, 1), (7, 0), (7, 1)}
    assert all("findings" in r for r in timeline)
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "pool").rglob("*.json")}
    assert len(written) == 4
    again = scan([dumps], results=tmp_path / "pool", workers=2, threads=1)
    assert [r["cached"] for r in F.as_json(again)["tables"]["dumps"]] == [True] * 4
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "pool").rglob("*.json")} == written
    assert _tables(again) == _tables(pool)


def _ray_or_skip():
    """Ray, where the extra is installed; in CI (which installs it) a missing or broken Ray is a
    failure, not a skip."""
    if os.environ.get("CI"):
        return importlib.import_module("ray")
    return pytest.importorskip("ray")


def _cli_scan(dumps, out, *ray_args) -> dict:
    """``lossdoctor scan`` as a user runs it (the console script, its own process) → its JSON."""
    cmd = ["lossdoctor", "scan", str(dumps), "--threads", "1", "--results", str(out / "results"),
           "--json", str(out / "scan.json"), *ray_args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-2000:])
    return json.loads((out / "scan.json").read_text())


@pytest.fixture(scope="module")
def ray_head():
    """A Ray cluster on this machine started as its users start one, ``ray start --head``; its
    address as a user on the machine gives it (Ray resolves 127.0.0.1 to the node's own IP)."""
    _ray_or_skip()
    port = 6400 + os.getpid() % 1000
    start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    done = subprocess.run(start, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        message = f"ray start --head failed: {done.stderr[-1500:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop = [sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"]
        subprocess.run(stop, capture_output=True, timeout=300)


def test_scan_on_ray_started_by_the_scan_gives_the_same_tables(dumps, tmp_path):
    """``scan --ray`` (bare): a local cluster for the scan alone."""
    _ray_or_skip()
    serial = scan([dumps], results=tmp_path / "serial", workers=1, threads=1)
    (tmp_path / "ray").mkdir()
    assert _tables(_cli_scan(dumps, tmp_path / "ray", "--ray")) == _tables(serial)


@pytest.mark.parametrize("how", ["auto", "address"])
def test_scan_joins_a_running_cluster(dumps, tmp_path, ray_head, how):
    """``scan --ray auto`` and ``scan --ray HOST:PORT`` against ``ray start --head``."""
    serial = scan([dumps], results=tmp_path / "serial", workers=1, threads=1)
    (tmp_path / how).mkdir()
    on_ray = _cli_scan(dumps, tmp_path / how, "--ray", "auto" if how == "auto" else ray_head)
    assert _tables(on_ray) == _tables(serial)


def test_a_failing_dump_is_reported_and_the_scan_goes_on(dumps, tmp_path):
    broken = tmp_path / "dumps"
    shutil.copytree(dumps, broken, symlinks=True)
    (broken / "step_000007" / "rank_1" / "batch.pt").write_bytes(b"not a torch file")
    results = tmp_path / "results"
    r = CliRunner().invoke(app, ["scan", str(broken), "--results", str(results), "--workers",
                                 "1", "--json", str(tmp_path / "scan.json")])  # fmt: skip
    assert r.exit_code == 1, r.output
    rep = json.loads((tmp_path / "scan.json").read_text())
    status = {(d["step"], d["rank"]): d["status"] for d in rep["tables"]["dumps"]}
    assert status == {(3, 0): "ok", (3, 1): "ok", (7, 0): "ok", (7, 1): "failed"}
    (bad,) = [d for d in rep["tables"]["dumps"] if d["status"] == "failed"]
    assert "rank_1/batch.pt is not a lossdoctor batch dump" in bad["message"]
    assert len(list(results.rglob("*.json"))) == 4  # the failure is a result too
    assert "1 failed" in " ".join(r.stdout.split())


def _synthetic_step(root, ranks: dict[int, dict]) -> None:
    """rank → overrides of a small synthetic dump (channels, levels, meta)."""
    for rank, change in ranks.items():
        folder = root / f"rank_{rank}"
        channels = change.get("channels", 8)
        d = F.batch_dict(channels=channels, strides=change.get("strides", (4, 8, 16, 32, 64)))
        save_torch(F.state_dict(channels=channels), folder / "checkpoint.pt")
        meta = {"rank": rank, "world_size": change.get("world_size", 2), "step": 5}
        dump_batch(folder / "batch.pt", features=d["features"], image_sizes=d["image_sizes"],
                   gt_boxes=d["gt_boxes"], gt_labels=d["gt_labels"], strides=d["strides"],
                   meta=meta)  # fmt: skip


@pytest.mark.parametrize(
    "rank1,needle",
    [
        ({"world_size": 3}, "rank 1 has world_size 3 where rank 0 has 2"),
        ({"strides": (4, 8, 16, 32)}, "rank 1 has levels ['p2', 'p3', 'p4', 'p5'] where rank 0"),
        ({"channels": 16}, "rank 1 has channels 16 where rank 0 has 8"),
    ],
)
def test_ranks_that_disagree_are_refused_naming_the_rank(tmp_path, rank1, needle):
    _synthetic_step(tmp_path / "step_000005", {0: {}, 1: rank1})
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "step_000005")])
    assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_missing_rank_is_refused(tmp_path):
    _synthetic_step(tmp_path / "step_000005", {1: {}})
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "step_000005")])
    assert r.exit_code == 2 and "rank 0 is missing" in r.stderr, r.stderr


def test_a_rank_whose_own_dump_is_bad_is_named(tmp_path):
    _synthetic_step(tmp_path / "s", {0: {}, 1: {}})
    (tmp_path / "s" / "rank_1" / "batch.pt").write_bytes(b"junk")
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "s")])
    assert r.exit_code == 2 and r.stderr.startswith("lossdoctor: error: rank 1 ("), r.stderr


def test_checkpoints_on_one_batch(tmp_path):
    d = F.batch_dict()
    for k in range(3):
        sd = F.state_dict(seed=k)
        if k == 2:
            sd["rpn.head.cls_logits.weight"][0, 0, 0, 0] = math.nan
        save_torch(sd, tmp_path / f"ckpt_{k}.pt")
    dump_batch(tmp_path / "batch.pt", **{k: d[k] for k in ("features", "image_sizes", "gt_boxes",
               "gt_labels", "strides")})  # fmt: skip
    rep = scan([tmp_path / f"ckpt_{k}.pt" for k in range(3)], batch=tmp_path / "batch.pt",
               results=tmp_path / "res")  # fmt: skip
    assert [r["step"] for r in F.as_json(rep)["tables"]["dumps"]] == [0, 1, 2]
    first = {r["code"]: r["step"] for r in F.as_json(rep)["tables"]["first_seen"]}
    assert first["nonfinite-weights"] == 2
    assert torch.get_num_threads() >= 1


def test_a_bare_ray_flag_means_a_local_cluster():
    from lossdoctor.cli import _bare_ray

    assert _bare_ray(["scan", "d", "--ray"]) == ["scan", "d", "--ray=local"]
    assert _bare_ray(["scan", "--ray", "--force", "d"]) == ["scan", "--ray=local", "--force", "d"]
    assert _bare_ray(["scan", "d", "--ray", "auto"]) == ["scan", "d", "--ray", "auto"]
