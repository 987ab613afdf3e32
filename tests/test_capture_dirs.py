"""Capture directories stand in for CKPT BATCH everywhere; a dump's meta says what the run trained
with (framework, profile, config) and the replay follows it unless told otherwise."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import factories as F
from lossdoctor import dump_batch, inspect
from lossdoctor.cli import app
from lossdoctor.inputs.config import preset, replace
from lossdoctor.inputs.dataclass_toml import to_dict
from lossdoctor.inputs.profiles import EPS32

runner = CliRunner()


def write_capture(folder, meta=None, **batch_kw):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": F.state_dict()}, folder / "checkpoint.pt")
    b = F.batch_dict(**batch_kw)
    dump_batch(
        folder / "batch.pt",
        features=b["features"],
        image_sizes=b["image_sizes"],
        gt_boxes=b["gt_boxes"],
        gt_labels=b["gt_labels"],
        strides=b["strides"],
        meta=meta,
    )
    return folder


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_a_capture_directory_stands_in_for_ckpt_and_batch(tmp_path):
    d = write_capture(tmp_path / "step_000007")
    r = invoke("inspect", d, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "r.json").read_text())["meta"]
    assert meta["checkpoint"]["path"] == str(d / "checkpoint.pt")
    assert meta["batch"]["path"] == str(d / "batch.pt")
    c = invoke("check", d)
    assert c.exit_code == 0 and "fits the batch" in c.stdout, c.output
    assert invoke("compare", d, "--old", "legacy", "--new", "mmdet").exit_code == 0
    (tmp_path / "empty").mkdir()
    r = invoke("inspect", tmp_path / "empty")
    assert r.exit_code == 2 and "is a folder without checkpoint.pt and batch.pt" in r.stderr


def test_the_run_profile_and_config_come_from_the_dump(tmp_path):
    cfg = replace(preset("mmdet"), name="live")
    meta = {"framework": "mmdet", "profile": "mmdet", "config": to_dict(cfg), "step": 7}
    rep = inspect(write_capture(tmp_path / "a", meta=meta))
    assert rep.profiles == ["mmdet", "fixed"]
    assert F.as_json(rep)["meta"]["run"] == {
        "profile": "mmdet",
        "source": "dump",
        "framework": "mmdet",
        "own": "mmdet",
        "step": 7,
        "rank": None,
    }
    assert (
        F.as_json(rep)["meta"]["config"]["name"] == "live"
        and F.as_json(rep)["meta"]["config"]["rpn_matcher"]["low_quality_reassign"]
    )
    given = inspect(tmp_path / "a", old="legacy")
    assert (
        given.profiles == ["legacy", "fixed"]
        and F.as_json(given)["meta"]["run"]["source"] == "given"
    )
    fixed_run = inspect(write_capture(tmp_path / "b", meta={"profile": "fixed"}))
    assert fixed_run.profiles == ["fixed", "legacy"]  # the what-if of a fixed run is the naive code
    plain = inspect(write_capture(tmp_path / "c"))
    assert (
        plain.profiles == ["legacy", "fixed"]
        and F.as_json(plain)["meta"]["run"]["source"] == "default"
    )
    assert (
        F.as_json(plain)["meta"]["config"]["name"] == "torchvision"
    )  # the checkpoint layout's preset


def test_an_inline_profile_table(tmp_path):
    meta = {"profile": {"base": "mmdet", "name": "mine", "rpn_cls": {"normalizer": "mmdet_pseudo"}}}
    rep = inspect(write_capture(tmp_path / "a", meta=meta))
    assert rep.profiles == ["mine", "fixed"]
    assert F.as_json(rep)["meta"]["profiles"]["mine"]["rpn_cls"]["normalizer"] == "mmdet_pseudo"
    assert F.as_json(rep)["meta"]["profiles"]["mine"]["rpn_box"]["normalizer"] == "mmdet_sampler"


@pytest.mark.parametrize(
    "meta,needle",
    [
        ({"framework": "caffe"}, "batch key 'meta.framework': expected one of torchvision, mmdet"),
        ({"rank": 3, "world_size": 2}, "batch key 'meta.rank': expected a rank below world_size 2"),
        (
            {"step": -1},
            "batch key 'meta.step': expected an integer in [0, 2147483647], found int -1",
        ),
        ({"profile": "nope"}, "meta.profile 'nope' is not a built-in profile"),
        (
            {"profile": {"rpn_cls": {"normalizer": "per_level"}}},
            "normalizer 'per_level' is unknown",
        ),
        ({"config": {"rpn_sampler": {"batch_size": 0}}}, "batch_size must be a positive integer"),
        ({"losses": {"loss_cls": "high"}}, "batch key 'meta.losses'"),
    ],
)
def test_bad_meta_is_refused_with_its_key(tmp_path, meta, needle):
    d = tmp_path / "a"
    d.mkdir()
    torch.save({"model": F.state_dict()}, d / "checkpoint.pt")
    torch.save({**F.batch_dict(), "meta": meta}, d / "batch.pt")
    r = invoke("inspect", d)
    assert r.exit_code == 2 and needle in r.stderr, r.output


def test_pseudo_sampler_takes_every_candidate_and_counts_positives_only(tmp_path):
    """MMDetection's PseudoSampler: every anchor the assigner labels is a sample, and the RPN
    avg_factor is sum over images of max(#pos, 1) (+ float32 eps), worked out from the counts."""
    cfg = preset("mmdet")
    pseudo = replace(cfg.rpn_sampler, take_all=True, avg_factor_with_neg=False)
    meta = {"profile": "mmdet", "config": to_dict(replace(cfg, rpn_sampler=pseudo))}
    boxes = [torch.tensor([[8.0, 10.0, 40.0, 50.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([0]), torch.zeros(0, dtype=torch.long)]
    d = write_capture(tmp_path / "a", meta=meta, boxes=boxes, labels=labels)
    rep = inspect(d)
    images = F.as_json(rep)["tables"]["images"]
    rpn = next(
        r
        for r in F.as_json(rep)["tables"]["levels"]
        if (r["profile"], r["head"], r["level"]) == ("mmdet", "rpn", "all")
    )
    assert rpn["sampled"] == rpn["pos"] + rpn["neg"] > 2 * 256  # far more than a 256 budget
    assert [im["rpn_pos"] for im in images] == [im["rpn_pos_candidates"] for im in images]
    want = sum(max(im["rpn_pos"], 1) for im in images) + EPS32
    assert rpn["avg_factor"] == pytest.approx(want, rel=1e-12)
    with_neg = inspect(
        write_capture(
            tmp_path / "b", meta={"profile": "mmdet", "config": "mmdet"}, boxes=boxes, labels=labels
        )
    )
    row = next(
        r
        for r in F.as_json(with_neg)["tables"]["levels"]
        if (r["profile"], r["head"], r["level"]) == ("mmdet", "rpn", "all")
    )
    ims = F.as_json(with_neg)["tables"]["images"]
    assert row["avg_factor"] == pytest.approx(
        sum(max(i["rpn_pos"], 1) + max(i["rpn_neg"], 1) for i in ims) + EPS32
    )
