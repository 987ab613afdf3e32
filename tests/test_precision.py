"""Mixed precision: the range arithmetic on tiny tensors, a batch that overflows fp16 on one level,
the loss scaler's decision against a real GradScaler, what-if framing, the report and the CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os

import pytest
import torch

import factories as F
from lossdoctor import Capture, inspect
from lossdoctor.inputs.amp import amp_record, run_precision
from lossdoctor.inputs.batch import validate_batch
from lossdoctor.inputs.checkpoint import heads_from_state_dict
from lossdoctor.inputs.config import preset
from lossdoctor.inputs.errors import InputError
from lossdoctor.inputs.files import save_torch
from lossdoctor.inputs.profiles import builtin
from lossdoctor.replay.engine import replay
from lossdoctor.replay.precision import (
    abs_max,
    finite_max,
    largest_safe_scale,
    overflows_at,
    range_count,
    rounds_finite,
    tiny,
)
from lossdoctor.vocab import Precision, PrecisionSource, Severity, Term

FP16, BF16, FP32 = Precision.FP16, Precision.BF16, Precision.FP32


def _term(rep, profile: str, term: Term) -> float:
    return getattr(next(r for r in rep.tables.profiles if r.profile == profile), term.value)


# ---- the arithmetic, by hand ------------------------------------------------------------------


def test_fp16_range_constants():
    assert finite_max(FP16) == 65504.0
    assert tiny(FP16) == 2.0**-24
    # 65504 + half its spacing (32 / 2) rounds to Inf: 65519 is the largest value that stays
    assert rounds_finite(65519.0, FP16) and not rounds_finite(65520.0, FP16)
    assert not rounds_finite(math.inf, FP16) and rounds_finite(1e38, BF16)


def test_range_count_counts_overflow_and_underflow_against_fp32():
    ref = torch.tensor([70000.0, -70000.0, 1e-8, 0.0, 2.0, math.nan])
    low = ref.half()  # Inf, -Inf, 0 (1e-8 < 2**-25), 0, 2, NaN
    c = range_count(low, ref)
    assert (c.overflow, c.underflow, c.numel) == (2, 1, 6)
    assert c.max_abs == 70000.0  # the NaN of fp32 is not a value it reaches
    # a value non-finite in fp32 already is not an overflow of the low precision
    assert range_count(torch.tensor([math.inf]).half(), torch.tensor([math.inf])).overflow == 0


def test_largest_safe_scale_by_hand():
    # |g| = 1: 2**15 * 1 = 32768 fits, 2**16 = 65536 > 65504 does not
    assert largest_safe_scale(1.0, FP16) == 2.0**15
    # |g| = 3: 3 * 2**14 = 49152 fits, 3 * 2**15 = 98304 does not
    assert largest_safe_scale(3.0, FP16) == 2.0**14
    # |g| = 65504 / 2**10 exactly: 2**10 reaches the largest value and stays finite
    assert largest_safe_scale(65504.0 / 2**10, FP16) == 2.0**10
    assert largest_safe_scale(0.0, FP16) == math.inf
    assert largest_safe_scale(math.nan, FP16) is None
    assert largest_safe_scale(math.inf, FP16) is None
    assert overflows_at(2.0**16, 1.0, FP16) and not overflows_at(2.0**15, 1.0, FP16)
    assert largest_safe_scale(1.0, BF16) == 2.0**127


def test_abs_max_of_gradients():
    assert abs_max(torch.tensor([-3.0, 2.0])) == 3.0
    assert abs_max(torch.tensor([1.0, math.inf])) == math.inf
    assert math.isnan(abs_max(torch.tensor([math.nan, math.inf])))
    assert abs_max(None) == 0.0 and abs_max(torch.zeros(0)) == 0.0


# ---- the dump's record and the choice of precision ----------------------------------------------


def test_the_precision_comes_from_the_flag_the_dump_or_the_features():
    rec = amp_record(F.amp_meta("bfloat16", 1024.0, skipped=2))
    assert (rec.dtype, rec.loss_scale, rec.skipped) == (BF16, 1024.0, 2)
    assert run_precision(None, rec, "float32").precision is BF16
    c = run_precision(FP32, rec, "float32")
    assert (c.precision, c.source, c.run, c.is_run) == (FP32, PrecisionSource.GIVEN, BF16, False)
    plain = amp_record({})
    assert run_precision(None, plain, "float16").source is PrecisionSource.FEATURES
    assert run_precision(None, plain, "float32").precision is FP32
    # older captures: the adapters' autocast key and the scale the norms were divided by
    old = amp_record({"autocast": "float16", "grad_norm": {"loss_scale": 512.0}})
    assert (old.dtype, old.loss_scale) == (FP16, 512.0)


@pytest.mark.parametrize(
    "amp,where",
    [
        ({"loss_scale": -1.0}, "meta.amp.loss_scale"),
        ({"dtype": "float8"}, "meta.amp.dtype"),
        ({"skipped": 1.5}, "meta.amp.skipped"),
        ("fp16", "meta.amp"),
    ],
)
def test_a_bad_amp_record_is_refused_by_key(amp, where):
    d = F.batch_dict()
    d["meta"] = {"amp": amp}
    with pytest.raises(InputError, match=where.replace(".", r"\.")):
        validate_batch(d)


# ---- a batch that overflows fp16 on one level --------------------------------------------------


def _overflow_case():
    d = F.batch_dict(n=2, channels=8, size=(64, 96))
    d["features"] = {k: v.half() for k, v in d["features"].items()}
    d, sd = F.overflow_case(d, F.state_dict(channels=8), level="p4")
    d["meta"] = F.amp_meta()
    return validate_batch(d), heads_from_state_dict(sd)


def test_one_level_overflowing_fp16_is_named_with_its_term_and_replays_finite_in_fp32():
    batch, heads = _overflow_case()
    rep = inspect(heads, batch, old="torchvision")
    assert (
        rep.meta.precision.precision is FP16 and rep.meta.precision.source is PrecisionSource.DUMP
    )
    over = [f for f in rep.findings if f.code == "fp16-forward-overflow"]
    assert [(f.level, f.term, f.severity) for f in over] == [("p4", Term.RPN_CLS, Severity.ERROR)]
    rows = {(r.level, r.layer): r for r in rep.tables.precision}
    logits = rows[("p4", "rpn_logits")]
    # interior locations: 9 * C * a * X = 40000 at the conv, C * (2 / C) * 40000 = 80000 logits
    assert logits.max_abs == pytest.approx(2 * F.FP16_CONV, rel=1e-3) and logits.overflow > 0
    assert rows[("p4", "rpn_conv")].max_abs == pytest.approx(F.FP16_CONV, rel=1e-3)
    assert rows[("p4", "rpn_conv")].overflow == 0
    assert all(r.overflow == 0 for r in rep.tables.precision if r.level != "p4")
    assert math.isinf(_term(rep, "torchvision", Term.RPN_CLS))

    fp32 = inspect(heads, batch, old="torchvision", precision="fp32")
    assert math.isfinite(_term(fp32, "torchvision", Term.RPN_CLS))
    assert not any(f.code.startswith(("fp16", "low-precision")) for f in fp32.findings)
    assert not fp32.tables.precision  # nothing replayed in a low precision
    # bf16 keeps fp32's range: nothing overflows
    bf16 = inspect(heads, batch, old="torchvision", precision="bf16")
    assert not [f for f in bf16.findings if f.code == "fp16-forward-overflow"]


def test_a_what_if_precision_is_framed_as_info():
    d = F.batch_dict(n=2, channels=8)
    d, sd = F.overflow_case(d, F.state_dict(channels=8))
    rep = inspect(heads_from_state_dict(sd), validate_batch(d), old="torchvision", precision="fp16")
    assert rep.meta.precision.run is FP32 and rep.meta.precision.source is PrecisionSource.GIVEN
    over = next(f for f in rep.findings if f.code == "fp16-forward-overflow")
    assert over.severity is Severity.INFO and over.message.startswith("what-if fp16: ")


# ---- the loss scaler -----------------------------------------------------------------------------


def _scaled_backward_is_finite(heads, batch, scale: float) -> bool:
    """The real thing: backward of scale * loss through the fp16 heads; are all grads finite?"""
    heads = dataclasses.replace(heads, precision=FP16)
    r = replay(heads, batch, preset("torchvision"), [builtin("torchvision")])
    params = list(r.heads.params.values())
    grads = torch.autograd.grad(r.losses["torchvision"].total * scale, params, allow_unused=True)
    return all(bool(torch.isfinite(g).all()) for g in grads if g is not None)


def test_the_largest_safe_scale_is_where_a_scaled_backward_starts_to_overflow():
    d = F.batch_dict(n=2, channels=8)
    d["meta"] = F.amp_meta(scale=2.0**20)
    batch, heads = validate_batch(d), F.heads(channels=8)
    rep = inspect(heads, batch, old="torchvision")
    p = rep.meta.precision
    safe = p.safe_scale
    assert p.overflows and 1.0 <= safe < 2.0**20
    assert safe * p.grad_max <= 65504 < 2 * safe * p.grad_max
    assert _scaled_backward_is_finite(heads, batch, safe)
    assert not _scaled_backward_is_finite(heads, batch, 2 * safe)
    f = next(f for f in rep.findings if f.code == "loss-scale-overflow")
    assert f.evidence["safe_scale"] == safe and f.severity is Severity.WARNING  # stuck
    d["meta"] = F.amp_meta(scale=2 * safe)  # one halving clears it: a one-off
    again = inspect(heads, validate_batch(d), old="torchvision")
    f = next(f for f in again.findings if f.code == "loss-scale-overflow")
    assert f.severity is Severity.INFO and "one-off" in f.message
    d["meta"] = F.amp_meta(scale=safe)
    fine = inspect(heads, validate_batch(d), old="torchvision")
    assert not [f for f in fine.findings if "loss-scale" in f.code]


AMP_STEPS = 14


def _amp_loop(folder, steps: int = AMP_STEPS):
    """The tiny detector trained under CPU autocast (float16) with torch.amp.GradScaler, its
    losses from the replay as in lossdoctor.toy, a capture every step → (the capture, the scale
    at each step, whether the scaler skipped each step: it lowered the scale after it)."""
    from lossdoctor.toy.data import batches
    from lossdoctor.toy.model import STRIDES, TinyDetector, live_heads, toy_config, toy_config_table
    from lossdoctor.toy.train import make_batch

    torch.manual_seed(0)
    model = TinyDetector()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    quiet = open(os.devnull, "w")  # noqa: SIM115
    capture = Capture(folder, model, every=1, optimizer=opt, scaler=scaler, stream=quiet)
    stream, profile, scales = batches(0, 2), builtin("fixed"), []
    for step in range(steps):
        images, sizes, boxes, labels = next(stream)
        with torch.autocast("cpu", dtype=torch.float16):
            b = make_batch(model, images, sizes, boxes, labels)
        dumped = dict(b.features)
        b.features = {k: v.float() for k, v in b.features.items()}
        heads = dataclasses.replace(live_heads(model), precision=FP16)
        loss = replay(heads, b, toy_config(), [profile], seed=step).losses["fixed"].total
        opt.zero_grad()
        scaler.scale(loss).backward()
        meta = {"sample_seed": step, "profile": "fixed", "config": toy_config_table()}
        capture.check(step, loss, features=dumped, image_sizes=sizes, gt_boxes=boxes,
                      gt_labels=labels, strides=list(STRIDES), meta=meta)  # fmt: skip
        scales.append(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
    quiet.close()
    scales.append(scaler.get_scale())
    return capture, scales[:-1], [scales[t + 1] < scales[t] for t in range(steps)]


def test_a_real_gradscaler_loop_skips_the_steps_the_replay_says_it_skips(tmp_path):
    """Each captured step's replay, inspected afterwards, says whether the heads' gradients
    overflow at the recorded scale: the scaler skipped exactly those steps."""
    capture, scales, skipped = _amp_loop(tmp_path)
    assert any(skipped) and not all(skipped), scales
    for t, folder in enumerate(capture.written):
        rep = inspect(folder)
        p, amp = rep.meta.precision, rep.meta.batch.meta["amp"]
        assert p.precision is FP16 and p.source is PrecisionSource.FEATURES
        assert p.loss_scale == scales[t] and amp["found_inf"] is skipped[t]
        assert amp["skipped"] == sum(skipped[:t])
        assert p.overflows is skipped[t], (t, scales[t], p.grad_max, p.grad_max_in)


def test_scan_carries_the_loss_scale_and_the_skipped_steps(tmp_path):
    _, scales, skipped = _amp_loop(tmp_path / "dumps", steps=6)
    out = tmp_path / "scan.json"
    r = F.invoke("scan", str(tmp_path / "dumps"), "--results", str(tmp_path / "results"),
                 "--workers", "1", "--json", str(out), "--plot", str(tmp_path / "scan.png"),
                 "--csv-dir", str(tmp_path / "csv"))  # fmt: skip
    assert r.exit_code in (0, 1), r.output
    rows = sorted(json.loads(out.read_text())["tables"]["scales"], key=lambda x: x["step"])
    assert [x["loss_scale"] for x in rows] == scales
    assert [x["found_inf"] for x in rows] == [x["overflows"] for x in rows] == skipped
    assert [x["skipped_before"] for x in rows] == [sum(skipped[:t]) for t in range(6)]
    assert (tmp_path / "csv" / "scales.csv").read_text().startswith("run,step,rank,precision")
    assert (tmp_path / "scan.png").stat().st_size > 0


def test_a_collapsed_scale_fires_the_capture_and_the_finding(tmp_path):
    model = torch.nn.Linear(2, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=0.25)
    capture = Capture(tmp_path, model, scaler=scaler, stream=io.StringIO())
    model(torch.ones(1, 2)).sum().backward()
    fired = capture.scale_collapsed()
    assert [f.kind for f in fired] == ["loss-scale-collapsed"] and fired[0].value == 0.25
    facts = capture.amp_facts(capture.norms())
    assert facts == {"loss_scale": 0.25, "skipped": 0, "growth_tracker": 0, "found_inf": False}
    d = F.batch_dict(n=2, channels=8)
    d["meta"] = F.amp_meta(scale=0.25, skipped=18)
    rep = inspect(F.heads(channels=8), validate_batch(d))
    f = next(f for f in rep.findings if f.code == "loss-scale-collapsed")
    assert f.severity is Severity.ERROR and "after 18 skipped steps" in f.message


# ---- the report --------------------------------------------------------------------------------


def test_drift_rows_are_the_two_replays_and_the_json_round_trips(tmp_path):
    d = F.batch_dict(n=2, channels=8)
    d["meta"] = F.amp_meta()
    save_torch(d, tmp_path / "batch.pt")
    save_torch(F.offset_logits(F.state_dict(channels=8), std=0.1), tmp_path / "checkpoint.pt")
    r = F.invoke("inspect", str(tmp_path), "--json", str(tmp_path / "fp16.json"), "-q")
    assert r.exit_code in (0, 1), r.output
    F.invoke("inspect", str(tmp_path), "--precision", "fp32", "--json", str(tmp_path / "fp32.json"))
    data = json.loads((tmp_path / "fp16.json").read_text())
    assert data["meta"]["precision"]["precision"] == "fp16"
    for row in (r for r in data["tables"]["drift"] if math.isfinite(r["loss_fp32"])):
        want = abs(row["loss"] - row["loss_fp32"]) / abs(row["loss_fp32"])
        assert row["relative"] == pytest.approx(want, rel=1e-6)
    fp32 = json.loads((tmp_path / "fp32.json").read_text())
    cls = next(r for r in data["tables"]["drift"] if r["term"] == "roi_cls")
    own = next(r for r in fp32["tables"]["levels"] if r["head"] == "roi" and r["level"] == "all")
    assert cls["relative"] > 0.01 and own["loss_cls"] == pytest.approx(cls["loss_fp32"], rel=1e-6)
    codes = {f["code"] for f in data["findings"]}
    assert "low-precision-loss-drift" in codes
    # two precisions of one dump compare as two reports
    cmp = F.invoke(
        "compare", "--old", str(tmp_path / "fp32.json"), "--new", str(tmp_path / "fp16.json")
    )
    assert cmp.exit_code == 0 and "precision" in cmp.output, cmp.output
    from lossdoctor.report.model import Report

    back = Report.load(tmp_path / "fp16.json")
    assert back.meta.precision.precision is FP16 and back.tables.drift[0].precision is FP16


def test_an_unknown_precision_is_one_line_and_exit_2(tmp_path):
    r = F.invoke("inspect", "fixtures/healthy", "--precision", "fp8")
    assert r.exit_code == 2 and "fp8" in r.output


# ---- the README's example ----------------------------------------------------------------------


def test_the_amp_fixture_overflows_in_fp16_and_replays_finite_in_fp32():
    """fixtures/amp-nan, a real CPU AMP loop's first NaN loss: the box head's first fc overflows
    fp16 (the capture's scaler state says the step is skipped), fp32 replays it finite."""
    rep = inspect("fixtures/amp-nan")
    p = rep.meta.precision
    assert (p.precision, p.source, p.loss_scale, p.found_inf) == (
        FP16, PrecisionSource.FEATURES, 1024.0, True)  # fmt: skip
    assert p.overflows and p.safe_scale is None
    over = next(f for f in rep.findings if f.code == "fp16-forward-overflow")
    assert over.evidence["layer"] == "box_fc1" and over.evidence["max_abs"] > 65504
    fp32 = inspect("fixtures/amp-nan", precision="fp32")
    assert all(math.isfinite(r.loss_total) for r in fp32.tables.profiles)
    assert all(not math.isfinite(r.loss_total) for r in rep.tables.profiles)


def test_the_readmes_amp_excerpt_is_what_inspect_prints():
    script = F.readme_script()
    F.assert_readme_part(script.AMP_BEGIN, script.AMP_END, script.amp_excerpt())


def test_compare_takes_two_precisions_as_sides():
    """`compare DIR --old fp32 --new fp16`: the same replay in each, compared as reports; the
    NaN that only fp16 makes is called out."""
    r = F.invoke("compare", "fixtures/amp-nan", "--old", "fp32", "--new", "fp16", "--json", "-")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    first = data["comparisons"][0]
    assert first["old"] == "fp32:fixed" and first["new"] == "fp16:fixed"
    total = next(x for x in first["totals"] if x["metric"] == "roi_cls")
    assert math.isfinite(total["old"]) and math.isnan(total["new"])
    assert "fp16-forward-overflow" in {f["code"] for f in first["appeared"]}
    bad = F.invoke("compare", "fixtures/amp-nan", "--old", "fp32", "--new", "fixed")
    assert bad.exit_code == 2 and "a precision and a profile" in bad.output


def test_the_mask_head_and_a_cascades_stages_are_followed_layer_by_layer():
    """Mask R-CNN's mask head and Cascade R-CNN's later stages in fp16: a range row per layer
    and stage, every loss term within the low precision's noise of fp32 (nothing overflows)."""
    d = F.batch_dict()
    d["gt_masks"] = F.box_masks(d["gt_boxes"], tuple(d["image_sizes"][0]))
    d["proposals"] = [b.clone() for b in d["gt_boxes"]]
    rep = inspect(heads_from_state_dict(F.mask_state_dict()), validate_batch(d),
                  config="torchvision-mask", precision="fp16")  # fmt: skip
    mask = [r.layer for r in rep.tables.precision if r.head == "mask"]
    assert mask[-2:] == ["mask_deconv", "mask_logits"] and len(mask) >= 3
    assert {r.term for r in rep.tables.drift} >= {Term.ROI_MASK}
    assert all(r.relative < 1e-2 for r in rep.tables.drift if math.isfinite(r.loss_fp32))
    casc = inspect(heads_from_state_dict(F.cascade_state_dict("mmdet")),
                   validate_batch(F.batch_dict()), config="mmdet-cascade",
                   precision="bf16")  # fmt: skip
    stages = {r.stage for r in casc.tables.precision if r.head == "roi"}
    assert stages == {0, 1, 2} and not [r for r in casc.tables.precision if r.overflow]


def test_a_multi_rank_step_keeps_each_ranks_precision_rows(tmp_path):
    F.toy_step_dumps(tmp_path, steps=(3,))
    rep = inspect(tmp_path / "step_000003", precision="bf16")
    assert rep.meta.precision.precision is BF16
    assert {r.rank for r in rep.tables.precision} == {r.rank for r in rep.tables.drift} == {0, 1}
    data = json.loads(rep.to_json())
    assert {r["rank"] for r in data["tables"]["precision"]} == {0, 1}
