"""Property: every batch that passes the schema replays to a report, whatever its values.

Batches are drawn broadly (image and feature sizes, dtypes, one-pixel images, NaN/Inf anywhere in
the features, GT boxes with NaN/Inf/huge/negative coordinates, zero or negative size, far outside
the image, duplicated, thousands on one image, every GT ignored, labels out of range, empty images,
odd proposals) against a tiny checkpoint. ``inspect`` must exit 0, 1 or 2 (never 3, never a
traceback), and every report's tables must have the documented columns and finite counts; the same
holds for ``check`` and for ``compare`` of two reports. Examples that once failed are kept below as
explicit regression tests.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import factories as F  # noqa: E402
from lossdoctor.cli import app  # noqa: E402
from lossdoctor.inputs.batch import BATCH_FORMAT  # noqa: E402

runner = CliRunner()
CHANNELS = 4
STRIDES = (4, 8, 16, 32, 64)
COUNT_COLUMNS = ("anchors", "pos", "neg", "ignored", "sampled", "nonfinite")
LEVEL_COLUMNS, IMAGE_COLUMNS = F.LEVEL_COLUMNS, F.IMAGE_COLUMNS
IMAGE_COUNTS = ("gt", "gt_without_pos", "detections")
ODD = [math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0, -5.0, 1e5, 0.5]


def coordinate(extent: int):
    """One box coordinate: mostly inside the image, sometimes anything at all."""
    return st.one_of(
        st.floats(0, extent), st.floats(0, extent), st.sampled_from(ODD), st.floats(allow_nan=True)
    )


@st.composite
def boxes(draw, h: int, w: int):
    """Tensor[K, 4] of GT boxes for an h x w image."""
    k = draw(st.one_of(st.integers(0, 4), st.just(0), st.sampled_from([50, 2500])))
    if k > 40:  # thousands of boxes: drawn in bulk, a few of them broken
        xy = torch.rand(k, 2) * torch.tensor([w, h])
        b = torch.cat([xy, xy + torch.rand(k, 2) * 20 + 0.5], 1)
        b[draw(st.integers(0, k - 1))] = torch.tensor([draw(st.sampled_from(ODD))] * 4)
        return b
    rows = []
    for _ in range(k):
        x1, y1 = draw(coordinate(w)), draw(coordinate(h))
        shape = draw(st.sampled_from(["size", "size", "raw", "zero", "duplicate"]))
        if shape == "size":
            rows.append([x1, y1, x1 + draw(st.floats(0, 2 * w)), y1 + draw(st.floats(0, 2 * h))])
        elif shape == "zero":
            rows.append([x1, y1, x1, y1 + 3.0])
        elif shape == "duplicate" and rows:
            rows.append(list(rows[-1]))
        else:
            rows.append([x1, y1, draw(coordinate(w)), draw(coordinate(h))])
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


@st.composite
def features(draw, n: int, pad: tuple[int, int], levels: int):
    dtype = draw(
        st.sampled_from(
            [torch.float32, torch.float32, torch.float16, torch.float64, torch.bfloat16]
        )
    )
    scale = draw(st.sampled_from([1.0, 1.0, 1e-8, 1e4, 1e30]))
    out = {}
    for lvl, s in enumerate(STRIDES[:levels]):
        h, w = max(1, -(-pad[0] // s)), max(1, -(-pad[1] // s))
        t = torch.randn(n, CHANNELS, h, w) * scale
        for _ in range(draw(st.integers(0, 2)) if draw(st.booleans()) else 0):
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(
                st.sampled_from([math.nan, math.inf, -math.inf])
            )
        out[f"p{lvl + 2}"] = t.to(dtype)
    return out


@st.composite
def batches(draw) -> dict:
    n = draw(st.integers(1, 3))
    sizes = [
        [draw(st.sampled_from([1, 2, 17, 40, 64])), draw(st.sampled_from([1, 3, 33, 64]))]
        for _ in range(n)
    ]
    pad = (max(h for h, _ in sizes), max(w for _, w in sizes))
    pad = (-(-pad[0] // 64) * 64, -(-pad[1] // 64) * 64)
    gt = [draw(boxes(h, w)) for h, w in sizes]
    label_hi = draw(st.sampled_from([3, 3, 3, 4, 1000]))
    labels = [
        torch.tensor(
            [draw(st.integers(-1 if label_hi > 3 else 0, label_hi - 1)) for _ in range(len(b))],
            dtype=torch.long,
        )
        for b in gt
    ]
    d = {
        "format": BATCH_FORMAT,
        "features": draw(features(n, pad, draw(st.integers(1, 5)))),
        "image_sizes": sizes,
        "pad_size": list(pad),
        "gt_boxes": gt,
        "gt_labels": labels,
    }
    if draw(st.booleans()):
        d["gt_ignore"] = [
            torch.tensor(
                [draw(st.booleans()) or draw(st.booleans()) for _ in range(len(b))],
                dtype=torch.bool,
            )
            for b in gt
        ]
    if draw(st.integers(0, 4)) == 0:
        d["proposals"] = [draw(boxes(h, w)) for h, w in sizes]
    d["strides"] = list(STRIDES[: len(d["features"])])
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save(F.state_dict(channels=CHANNELS, hidden=8), path)
    return path


def check_report(report: dict) -> None:
    levels, images = report["tables"]["levels"], report["tables"]["images"]
    assert levels and images
    for row in levels:
        assert list(row)[: len(LEVEL_COLUMNS)] == list(LEVEL_COLUMNS)
        for c in COUNT_COLUMNS:
            assert isinstance(row[c], int) and row[c] >= 0, (c, row[c])
    for row in images:
        assert list(row)[: len(IMAGE_COLUMNS)] == list(IMAGE_COLUMNS)
        for c in IMAGE_COUNTS:
            assert isinstance(row[c], int) and row[c] >= 0, (c, row[c])


CONFIGS = ("torchvision", "mmdet", "detectron2")
PROFILES = ("legacy", "fixed", "mmdet", "torchvision", "detectron2")


def run_inspect(ckpt, batch_path, out, options=()):
    r = runner.invoke(
        app, ["inspect", str(ckpt), str(batch_path), "--json", str(out), "--quiet", *options]
    )
    assert r.exit_code in (0, 1, 2), r.output
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    if r.exit_code == 2:
        assert r.stderr.count("\n") == 1, r.stderr
        return None
    report = json.loads(out.read_text())
    check_report(report)
    return report


def replay_one(ckpt, tmp, d: dict, name: str, options=()):
    path = tmp / f"{name}.pt"
    torch.save(d, path)
    r = runner.invoke(app, ["check", str(path), str(ckpt)])
    assert r.exit_code in (0, 2) and "Traceback" not in r.output, r.output
    return run_inspect(ckpt, path, tmp / f"{name}.json", options)


OPTIONS = st.builds(
    lambda c, old, new, all_, precision: (
        ["--config", c, "--old", old, "--new", new]
        + (["--sample-all"] if all_ else [])
        + (["--precision", precision] if precision else [])
    ),
    st.sampled_from(CONFIGS),
    st.sampled_from(PROFILES[:2]),
    st.sampled_from(PROFILES[2:]),
    st.booleans(),
    st.sampled_from([None, None, "fp16", "bf16"]),
)


FAST = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))


def _property(tmp_path_factory, ckpt, a, b, options):
    tmp = tmp_path_factory.mktemp("fuzz")
    ra, rb = replay_one(ckpt, tmp, a, "a", options), replay_one(ckpt, tmp, b, "b")
    if ra is not None and rb is not None:
        r = runner.invoke(
            app, ["compare", "--old", str(tmp / "a.json"), "--new", str(tmp / "b.json")]
        )
        assert (
            r.exit_code in (0, 1, 2)
            and "Traceback" not in r.output
            and "internal error" not in r.output
        ), r.output


@FAST
@given(a=batches(), b=batches(), options=OPTIONS)
def test_every_valid_batch_replays_to_a_report(tmp_path_factory, ckpt, a, b, options):
    _property(tmp_path_factory, ckpt, a, b, options)


@pytest.mark.slow
@LONG
@given(a=batches(), b=batches(), options=OPTIONS)
def test_every_valid_batch_replays_to_a_report_long(tmp_path_factory, ckpt, a, b, options):
    _property(tmp_path_factory, ckpt, a, b, options)


# ---- one-stage heads: the same batches on P3-P7 against each framework's dense head ----------

DENSE_STRIDES = (8, 16, 32, 64, 128)
# (layout, kind, anchors per location) → the presets that replay it
DENSE_HEADS = {
    ("torchvision", "retinanet", 9): ("torchvision-retinanet", "detectron2-retinanet",
                                      "mmdet-retinanet"),
    ("torchvision", "fcos", 1): ("torchvision-fcos", "mmdet-fcos", "mmdet-fcos-giou"),
    ("mmdet", "atss", 1): ("mmdet-atss",),
}  # fmt: skip


@pytest.fixture(scope="module")
def dense_ckpts(tmp_path_factory):
    out = {}
    for (layout, kind, anchors), presets in DENSE_HEADS.items():
        path = tmp_path_factory.mktemp("dense") / "ckpt.pt"
        torch.save(F.dense_state_dict(layout, kind, channels=CHANNELS, anchors=anchors), path)
        out.update(dict.fromkeys(presets, path))
    return out


def _dense(d: dict) -> dict:
    """A drawn batch's levels as P3 onward, strides 8-128 (the same feature maps)."""
    feats = list(d["features"].values())
    return {**d, "features": {f"p{k + 3}": f for k, f in enumerate(feats)},
            "strides": list(DENSE_STRIDES[: len(feats)])}  # fmt: skip


@FAST
@given(d=batches(), preset=st.sampled_from(sorted({p for ps in DENSE_HEADS.values() for p in ps})),
       old=st.sampled_from([None, "legacy", "fixed"]))  # fmt: skip
def test_every_valid_batch_replays_a_dense_head_to_a_report(tmp_path_factory, dense_ckpts, d,
                                                            preset, old):  # fmt: skip
    tmp = tmp_path_factory.mktemp("dense-fuzz")
    options = ["--config", preset] + (["--old", old] if old else [])
    if old == preset:
        return
    report = replay_one(dense_ckpts[preset], tmp, _dense(d), "a", options)
    if report is not None:
        assert {r["head"] for r in report["tables"]["levels"]} == {"dense"}


# ---- examples that once failed, kept as explicit regressions ------------------------------------


def _small(boxes, labels=None, strides=STRIDES, **extra) -> dict:
    labels = labels or [torch.zeros(len(b), dtype=torch.long) for b in boxes]
    d = F.batch_dict(channels=CHANNELS, boxes=boxes, labels=labels, strides=strides)
    return {**d, **extra}


REGRESSIONS = {
    # RoIAlign indexed outside the map: sample points of an Inf or 1e30 box overflowed int64
    "inf coordinate": (
        _small(
            [torch.tensor([[0.0, 0.0, math.inf, 10.0]]), torch.tensor([[4.0, 4.0, 40.0, 30.0]])]
        ),
        [],
    ),
    "huge box": (
        _small(
            [torch.tensor([[-1e30, -1e30, 1e30, 1e30]]), torch.tensor([[4.0, 4.0, 40.0, 30.0]])]
        ),
        [],
    ),
    "huge box, adaptive RoIAlign": (
        _small([torch.tensor([[0.0, 0.0, 5e4, 5e4]]), torch.tensor([[4.0, 4.0, 40.0, 30.0]])]),
        ["--config", "mmdet"],
    ),
    # one level, and every RoI on it a zero-width GT under adaptive RoIAlign: no sample point
    # anywhere, and the pooled features fell out of the graph
    "only sampleless rois": (
        _small(
            [torch.tensor([[4.0, 4.0, 4.0, 20.0]])] * 2,
            strides=(4,),
            proposals=[torch.zeros(0, 4)] * 2,
        ),
        ["--config", "mmdet"],
    ),
    "nan proposals": (
        _small(
            [torch.tensor([[4.0, 4.0, 40.0, 30.0]])] * 2,
            proposals=[torch.tensor([[math.nan, 0.0, 5.0, 5.0], [1.0, 1.0, 30.0, 30.0]])] * 2,
        ),
        [],
    ),
}


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_regressions(tmp_path, ckpt, case):
    d, options = REGRESSIONS[case]
    report = replay_one(ckpt, tmp_path, d, "r", options)
    assert report is not None
