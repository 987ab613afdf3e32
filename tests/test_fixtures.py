"""The committed fixtures: what lossdoctor says about them, and that they regenerate bit for bit."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

import factories as F
from lossdoctor import inspect

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
CONFIG = FIX / "toy.toml"
HEALTHY_CKPT = FIX / "healthy" / "checkpoint.pt"


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def first_nan():
    return inspect(
        FIX / "first-nan" / "checkpoint.pt", FIX / "first-nan" / "batch.pt", config=CONFIG
    )


def test_first_nan_names_the_empty_mean(first_nan):
    """The legacy run's first non-finite loss: a per-level mean over an empty set; lossdoctor says
    which level and stage, and that the fixed normalization is finite on the same batch."""
    collapse = first_nan
    levels = {
        (r["profile"], r["head"], r["level"]): r for r in F.as_json(collapse)["tables"]["levels"]
    }
    errs = [f for f in F.as_json(collapse)["findings"] if f["code"] == "nan-empty-mean"]
    assert errs and all(f["profile"] == "legacy" for f in errs)
    for f in errs:
        row = levels[("legacy", f["head"], f["level"])]
        assert f["evidence"]["stage"] == "normalizer" and row["nan_origin"] == "normalizer"
        # the level really had nothing to average: no positive (box term) or no sample at all
        assert row["pos"] == 0 or row["sampled"] == 0
    totals = {r["profile"]: r for r in F.as_json(collapse)["tables"]["profiles"]}
    assert totals["legacy"]["loss_total"] != totals["legacy"]["loss_total"]  # NaN, as in training
    assert totals["fixed"]["loss_total"] == totals["fixed"]["loss_total"]
    assert not [
        f
        for f in F.as_json(collapse)["findings"]
        if f["severity"] == "error" and f["profile"] == "fixed"
    ]
    assert F.as_json(collapse)["meta"]["batch"]["meta"]["reason"].startswith("non-finite loss")


@pytest.fixture(scope="module")
def collapse():
    return inspect(FIX / "collapse" / "checkpoint.pt", FIX / "collapse" / "batch.pt", config=CONFIG)


def test_collapse_names_the_real_cause(collapse):
    """The legacy run's gradient blow-up, as captured: lossdoctor finds that the RoI box loss,
    averaged over a handful of positive RoIs instead of all sampled RoIs, carries the whole
    exploding gradient,
    at the level that holds those positives; under `fixed` the same batch has a normal gradient."""
    assert "gradient norm" in F.as_json(collapse)["meta"]["batch"]["meta"]["reason"]
    f = next(f for f in F.as_json(collapse)["findings"] if f["code"] == "exploding-gradient")
    assert (
        f["profile"] == "legacy"
        and f["head"] == "roi"
        and f["evidence"]["dominant_term"] == "roi_box"
    )
    assert f["evidence"]["dominant_share"] > 0.9
    assert not [
        x
        for x in F.as_json(collapse)["findings"]
        if x["code"] == "exploding-gradient" and x["profile"] == "fixed"
    ]
    rows = {
        (r["profile"], r["head"], r["level"]): r for r in F.as_json(collapse)["tables"]["levels"]
    }
    leg, fix = rows[("legacy", "roi", "all")], rows[("fixed", "roi", "all")]
    # the two box losses differ exactly by their normalizers: positives vs all sampled RoIs
    assert leg["avg_factor_bbox"] == leg["pos"] and fix["avg_factor_bbox"] == fix["sampled"]
    assert leg["loss_bbox"] / fix["loss_bbox"] == pytest.approx(
        fix["sampled"] / leg["pos"], rel=1e-5
    )
    # the level that carries it: the RoI level with the positives and the largest box gradient
    roi_levels = [
        r for k, r in rows.items() if k[0] == "legacy" and k[1] == "roi" and k[2] != "all"
    ]
    top = max(roi_levels, key=lambda r: r["grad_deltas"])
    assert top["pos"] == leg["pos"] > 0
    totals = {r["profile"]: r for r in F.as_json(collapse)["tables"]["profiles"]}
    assert totals["legacy"]["grad_total_norm"] > 10 * totals["fixed"]["grad_total_norm"]
    # and the symptom the run showed: detections already down to 0
    assert any(x["code"] == "collapse-to-background" for x in F.as_json(collapse)["findings"])


def test_healthy_makes_detections_and_no_error():
    rep = inspect(HEALTHY_CKPT, FIX / "healthy" / "batch.pt", config=CONFIG)
    assert [f["code"] for f in F.as_json(rep)["findings"] if f["severity"] == "error"] == []
    imgs = F.as_json(rep)["tables"]["images"]
    assert all(r["detections"] > 0 for r in imgs if r["gt"] > 0)


@pytest.mark.parametrize(
    "fault,code,where",
    [
        ("no-gt-image", "empty-gt-image", {"image": 1}),
        ("zero-width-box", "degenerate-gt", {"image": 0}),
        ("one-based-labels", "labels-one-based", {}),
        ("nan-features-p4", "nonfinite-features", {"level": "p4", "image": 1}),
    ],
)
def test_fault_fixtures_fire_their_finding(fault, code, where):
    rep = inspect(HEALTHY_CKPT, FIX / "faults" / fault / "batch.pt", config=CONFIG)
    hits = [
        f
        for f in F.as_json(rep)["findings"]
        if f["code"] == code and all(f.get(k) == v for k, v in where.items())
    ]
    assert hits, [(f["code"], f.get("level"), f.get("image")) for f in F.as_json(rep)["findings"]]


def test_fault_fixtures_regenerate_bit_for_bit(tmp_path):
    # derive from the committed healthy batch, twice, into two folders
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_fixtures import faults

    for k in (1, 2):
        faults(FIX / "healthy" / "batch.pt", tmp_path / f"run{k}")
    for fault in ("no-gt-image", "zero-width-box", "one-based-labels", "nan-features-p4"):
        a, b = tmp_path / "run1" / fault / "batch.pt", tmp_path / "run2" / fault / "batch.pt"
        assert sha(a) == sha(b) == sha(FIX / "faults" / fault / "batch.pt"), fault


@pytest.mark.slow
def test_all_fixtures_regenerate_deterministically(tmp_path):
    """Trains both runs twice (minutes): the files come back byte for byte, and tell the story the
    committed ones tell. (Compared with the committed files themselves, bytes match only on the
    CPU family they were made on: float kernels differ between CPUs, and the step at which the
    legacy run explodes moves with them.)"""
    for k in (1, 2):
        cmd = [
            sys.executable,
            str(ROOT / "scripts" / "make_fixtures.py"),
            "--out",
            str(tmp_path / f"run{k}"),
        ]
        subprocess.run(cmd, check=True, capture_output=True)
    files = sorted(
        p.relative_to(tmp_path / "run1") for p in (tmp_path / "run1").rglob("*") if p.is_file()
    )
    assert files == sorted(p.relative_to(FIX) for p in FIX.rglob("*") if p.is_file())
    for rel in files:
        assert sha(tmp_path / "run1" / rel) == sha(tmp_path / "run2" / rel), rel
    run = tmp_path / "run1"
    first = inspect(
        run / "first-nan" / "checkpoint.pt", run / "first-nan" / "batch.pt", config=run / "toy.toml"
    )
    assert F.as_json(first)["meta"]["batch"]["meta"]["step"] == 0 and any(
        f["code"] == "nan-empty-mean" for f in F.as_json(first)["findings"]
    )
    boom = inspect(
        run / "collapse" / "checkpoint.pt", run / "collapse" / "batch.pt", config=run / "toy.toml"
    )
    assert "gradient norm" in F.as_json(boom)["meta"]["batch"]["meta"]["reason"]
    assert any(
        f["code"] == "exploding-gradient" and f["profile"] == "legacy"
        for f in F.as_json(boom)["findings"]
    )
