"""Small synthetic checkpoints and batches for the tests."""

from __future__ import annotations

import importlib
import json
import math
import os

import pytest
import torch

from lossdoctor.inputs.batch import BATCH_FORMAT, validate_batch
from lossdoctor.inputs.checkpoint import heads_from_state_dict


def framework(name: str):
    """Import a framework (or an optional extra) for its tests: skipped where it is not installed,
    a failure where ``LOSSDOCTOR_REQUIRE`` names it (scripts/test-frameworks.sh sets it, so the
    framework environments cannot pass by skipping)."""
    if name in os.environ.get("LOSSDOCTOR_REQUIRE", "").split(","):
        return importlib.import_module(name)
    return pytest.importorskip(name)


# The documented columns (docs/report.md), in order: an interface users' scripts read.
LEVEL_COLUMNS = (
    "profile", "head", "level", "anchors", "pos", "neg", "ignored", "sampled", "avg_factor",
    "sample_weight", "loss_cls", "loss_bbox", "loss_share", "grad_feature", "grad_logits_pos",
    "grad_logits_neg", "grad_deltas", "nonfinite", "nan_origin",
)  # fmt: skip
IMAGE_COLUMNS = ("image", "gt", "gt_without_pos", "detections", "max_fg_score")

TV_KEYS = {
    "rpn_conv": "rpn.head.conv.0.0",
    "rpn_cls": "rpn.head.cls_logits",
    "rpn_reg": "rpn.head.bbox_pred",
    "fc1": "roi_heads.box_head.fc6",
    "fc2": "roi_heads.box_head.fc7",
    "cls": "roi_heads.box_predictor.cls_score",
    "reg": "roi_heads.box_predictor.bbox_pred",
}


def state_dict(
    channels=8, anchors=3, classes=3, pool=7, hidden=32, seed=0, reg_slots=None, std=0.01
):
    """A torchvision-layout state_dict: ``classes`` foreground classes, background in column 0."""
    g = torch.Generator().manual_seed(seed)
    reg_slots = classes + 1 if reg_slots is None else reg_slots

    def rnd(*shape, s=std):
        return torch.randn(*shape, generator=g) * s

    parts = {
        "rpn_conv": (rnd(channels, channels, 3, 3, s=0.05), rnd(channels)),
        "rpn_cls": (rnd(anchors, channels, 1, 1, s=0.1), rnd(anchors)),
        "rpn_reg": (rnd(4 * anchors, channels, 1, 1, s=0.05), rnd(4 * anchors)),
        "fc1": (rnd(hidden, channels * pool * pool, s=0.05), rnd(hidden)),
        "fc2": (rnd(hidden, hidden, s=0.1), rnd(hidden)),
        "cls": (rnd(classes + 1, hidden, s=0.1), rnd(classes + 1)),
        "reg": (rnd(4 * reg_slots, hidden, s=0.01), rnd(4 * reg_slots)),
    }
    sd = {}
    for part, (w, b) in parts.items():
        sd[f"{TV_KEYS[part]}.weight"] = w
        sd[f"{TV_KEYS[part]}.bias"] = b
    return sd


def heads(**kw):
    return heads_from_state_dict(state_dict(**kw))


def batch_dict(
    n=2, channels=8, size=(64, 96), strides=(4, 8, 16, 32, 64), seed=0, boxes=None, labels=None
):
    """A valid dump dict: ``n`` images of ``size``, random features, a few GT boxes."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    feats = {}
    for s in strides:
        feats[f"p{int(torch.tensor(float(s)).log2())}"] = torch.randn(
            n, channels, -(-h // s), -(-w // s), generator=g
        )
    if boxes is None:
        boxes = [torch.tensor([[8.0, 10.0, 40.0, 50.0], [50.0, 5.0, 90.0, 30.0]]) for _ in range(n)]
    if labels is None:
        labels = [torch.arange(b.shape[0]) % 3 for b in boxes]
    return {
        "format": BATCH_FORMAT,
        "features": feats,
        "image_sizes": [[h, w]] * n,
        "strides": list(strides),
        "gt_boxes": boxes,
        "gt_labels": labels,
    }


def batch(**kw):
    return validate_batch(batch_dict(**kw))


def assert_own_proposals_are_dumped(folder, atol: float = 1e-3) -> None:
    """lossdoctor's own RPN proposals from a capture directory's features are the proposals the
    framework made and the adapter dumped: same count, same order, same boxes (decoding may differ
    by rounding)."""
    from lossdoctor.inputs.batch import load_batch
    from lossdoctor.inputs.checkpoint import load_checkpoint
    from lossdoctor.inputs.config import config_from_meta
    from lossdoctor.replay.proposals import rpn_proposals

    batch = load_batch(folder / "batch.pt")
    heads = load_checkpoint(folder / "checkpoint.pt")
    ours = rpn_proposals(heads, batch, config_from_meta(batch.meta["config"]))
    for i, (a, b) in enumerate(zip(ours, batch.proposals, strict=True)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        assert torch.allclose(a, b, rtol=0, atol=atol), (i, (a - b).abs().max())


def assert_symptom_is(folder, scores: list) -> None:
    """``lossdoctor inspect`` of a capture directory reports the framework's own test-mode
    detections: per image as many (some) as ``scores`` (each image's detection scores) has, and
    the same top score."""
    import json

    import pytest
    from typer.testing import CliRunner

    from lossdoctor.cli import app

    r = CliRunner().invoke(app, ["inspect", str(folder), "--json", "-", "-q"])
    assert r.exit_code in (0, 1), r.output
    symptom = json.loads(r.stdout)["meta"]["symptom"]
    assert symptom["detections"] == [len(x) for x in scores] and min(symptom["detections"]) > 0
    assert symptom["max_fg_score"] == pytest.approx([float(x.max()) for x in scores], rel=1e-5)


def toy_step_dumps(root, steps=(3, 7), world=2) -> list:
    """Capture directories of the toy detector for ``steps`` x ``world`` ranks, as a multi-rank
    run's hook writes them (``root/step_K/rank_R``, one checkpoint per step). At the first step
    the last rank's whole batch has no GT; at the others that rank keeps one GT box only, so its
    few positives weigh far more than the other ranks' many. Between steps the model trains."""
    import io

    from lossdoctor import Capture
    from lossdoctor.capture import periodic
    from lossdoctor.inputs.dataclass_toml import to_dict
    from lossdoctor.inputs.profiles import legacy
    from lossdoctor.replay.engine import replay
    from lossdoctor.toy.data import batches
    from lossdoctor.toy.model import STRIDES, TinyDetector, live_heads, toy_config
    from lossdoctor.toy.train import make_batch

    torch.manual_seed(0)
    model = TinyDetector()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    meta = {"profile": "legacy", "config": {"base": "torchvision", **to_dict(toy_config())}}
    capture = Capture(root, model, every=1, stream=io.StringIO(), meta=meta)
    streams = [batches(100 + r, 4) for r in range(world)]
    for k, step in enumerate(steps):
        for rank in range(world):
            images, sizes, boxes, labels = next(streams[rank])
            if rank == world - 1:
                keep = 0 if k == 0 else 1
                boxes = [b[:keep] if i == 0 else b[:0] for i, b in enumerate(boxes)]
                labels = [x[:keep] if i == 0 else x[:0] for i, x in enumerate(labels)]
            b = make_batch(model, images, sizes, boxes, labels)
            batch = dict(features=b.features, image_sizes=sizes, gt_boxes=boxes,
                         gt_labels=labels, strides=list(STRIDES))  # fmt: skip
            info = {"rank": rank, "world_size": world, "sample_seed": step}
            capture.write(step, [periodic(step, 1)], torch.tensor(1.0), batch, info)
            if rank == 0:
                r = replay(live_heads(model), b, toy_config(), [legacy()], seed=step)
                loss = r.losses["legacy"].total
                opt.zero_grad()
                if torch.isfinite(loss):
                    loss.backward()
                    opt.step()
    return capture.written


def mask_state_dict(channels=8, classes=3, mask_channels=8, convs=4, seed=0, std=0.05, **kw):
    """A torchvision-layout Mask R-CNN state_dict: the Faster R-CNN heads and a mask head of
    ``convs`` 3x3 convs, a 2x2 deconv and K+1 mask logits (background first)."""
    sd = state_dict(channels=channels, classes=classes, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    cin = channels
    for k in range(convs):
        sd[f"roi_heads.mask_head.{k}.0.weight"] = (
            torch.randn(mask_channels, cin, 3, 3, generator=g) * std
        )
        sd[f"roi_heads.mask_head.{k}.0.bias"] = torch.randn(mask_channels, generator=g) * std
        cin = mask_channels
    sd["roi_heads.mask_predictor.conv5_mask.weight"] = (
        torch.randn(cin, mask_channels, 2, 2, generator=g) * std
    )
    sd["roi_heads.mask_predictor.conv5_mask.bias"] = torch.randn(mask_channels, generator=g) * std
    sd["roi_heads.mask_predictor.mask_fcn_logits.weight"] = (
        torch.randn(classes + 1, mask_channels, 1, 1, generator=g) * std
    )
    sd["roi_heads.mask_predictor.mask_fcn_logits.bias"] = (
        torch.randn(classes + 1, generator=g) * std
    )
    return sd


def _norm_tensors(c: int, g, batch_norm: bool) -> dict[str, torch.Tensor]:
    """A norm layer's affine parameters (and a BatchNorm's running statistics), not at identity."""
    out = {
        "weight": 1 + 0.2 * torch.randn(c, generator=g),
        "bias": 0.1 * torch.randn(c, generator=g),
    }
    if batch_norm:
        out |= {"running_mean": 0.1 * torch.randn(c, generator=g),
                "running_var": 1 + torch.rand(c, generator=g)}  # fmt: skip
    return out


def v2_state_dict(
    channels=8, classes=3, convs=4, fcs=1, hidden=32, pool=7, norm="bn", seed=0, mask=False
):
    """torchvision's v2 heads in its layout: two RPN convs, a FastRCNNConvFCHead of ``convs``
    conv blocks (conv without bias, then BatchNorm ``bn`` or GroupNorm ``gn``, or no norm with
    a bias: ``none``) then ``fcs`` fcs, and with ``mask`` a mask head of 4 such blocks."""
    g = torch.Generator().manual_seed(seed + 7)
    base = (mask_state_dict if mask else state_dict)(
        channels=channels, classes=classes, seed=seed, hidden=hidden, pool=pool
    )
    replaced = (".box_head.", "rpn.head.conv", ".mask_head.")
    sd = {k: v for k, v in base.items() if not any(r in k for r in replaced)}
    for i in (0, 1):
        sd[f"rpn.head.conv.{i}.0.weight"] = (
            torch.randn(channels, channels, 3, 3, generator=g) * 0.05
        )
        sd[f"rpn.head.conv.{i}.0.bias"] = torch.randn(channels, generator=g) * 0.05

    def block(prefix: str) -> None:
        sd[f"{prefix}.0.weight"] = torch.randn(channels, channels, 3, 3, generator=g) * 0.1
        if norm == "none":
            sd[f"{prefix}.0.bias"] = torch.randn(channels, generator=g) * 0.05
            return
        for k, t in _norm_tensors(channels, g, norm == "bn").items():
            sd[f"{prefix}.1.{k}"] = t

    for i in range(convs):
        block(f"roi_heads.box_head.{i}")
    width = channels * pool * pool
    for j in range(fcs):
        at = convs + 1 + 2 * j  # Flatten, then each fc and its ReLU
        sd[f"roi_heads.box_head.{at}.weight"] = torch.randn(hidden, width, generator=g) * 0.05
        sd[f"roi_heads.box_head.{at}.bias"] = torch.randn(hidden, generator=g) * 0.05
        width = hidden
    for i in range(4 if mask else 0):
        block(f"roi_heads.mask_head.{i}")
    return sd


def c4_state_dict(layout="detectron2", channels=8, mid=4, out=16, anchors=15, classes=3, seed=0):
    """A C4 model in ``layout`` (detectron2 or mmdet): one RPN conv with ``anchors`` anchors,
    ResNet's res5 as the box head (3 bottleneck blocks ``channels`` → ``mid`` → ``out``, the
    first with a projection shortcut, frozen BatchNorms), then the predictors on ``out``."""
    from lossdoctor.inputs.layouts import LAYOUTS, RES5_LAYOUTS
    from lossdoctor.vocab import NORM_OF, RES5_BLOCKS, RES5_SHORTCUT, Layer

    g = torch.Generator().manual_seed(seed + 11)
    tv = state_dict(channels=channels, anchors=anchors, classes=classes, hidden=out, seed=seed)
    tv_keys = LAYOUTS["torchvision"]
    sd = {}
    plain = (Layer.RPN_CONV, Layer.RPN_LOGITS, Layer.RPN_DELTAS, Layer.BOX_LOGITS, Layer.BOX_DELTAS)
    for layer in plain:
        for kind in ("weight", "bias"):
            sd[f"{LAYOUTS[layout][layer][0]}.{kind}"] = tv[f"{tv_keys[layer][0]}.{kind}"]
    keys = RES5_LAYOUTS[layout]
    cin = channels
    for b, block in enumerate(RES5_BLOCKS):
        shapes = [(mid, cin, 1, 1), (mid, mid, 3, 3), (out, mid, 1, 1)]
        if b == 0:
            block, shapes = (*block, RES5_SHORTCUT), [*shapes, (out, cin, 1, 1)]
        for conv, shape in zip(block, shapes):
            sd[f"{keys[conv]}.weight"] = torch.randn(*shape, generator=g) * (2 / shape[1]) ** 0.5
            for k, t in _norm_tensors(shape[0], g, True).items():
                sd[f"{keys[NORM_OF[conv]]}.{k}"] = t
        cin = out
    return sd


def double_head_state_dict(channels=8, width=16, blocks=2, hidden=32, classes=3, seed=0):
    """MMDetection's double head (DoubleConvFCBBoxHead) in its layout: the RPN, a residual block
    (3x3 conv keeping ``channels``, 1x1 to ``width``, a 1x1 identity projection) and ``blocks``
    bottlenecks (width / 4 inside) with BatchNorms
    regressing (class-agnostic), two fcs classifying."""
    from lossdoctor.inputs.layouts import DOUBLE_HEAD_LAYOUTS
    from lossdoctor.vocab import DH_BLOCKS, DH_RES, NORM_OF, Layer

    g = torch.Generator().manual_seed(seed + 13)
    sd = cascade_state_dict("mmdet", stages=1, channels=channels, classes=classes, seed=seed)
    sd = {
        k.replace(".bbox_head.0.", ".bbox_head."): v for k, v in sd.items() if "shared_fcs" not in k
    }
    keys = DOUBLE_HEAD_LAYOUTS["mmdet"]
    mid = width // 4
    shapes = dict(
        zip(DH_RES, [(width, channels, 3, 3), (width, width, 1, 1), (width, channels, 1, 1)])
    )
    for block in DH_BLOCKS[:blocks]:
        shapes |= dict(zip(block, [(mid, width, 1, 1), (mid, mid, 3, 3), (width, mid, 1, 1)]))
    for conv, shape in shapes.items():
        sd[f"{keys[conv]}.weight"] = (
            torch.randn(*shape, generator=g) * (2 / (shape[1] * shape[2] ** 2)) ** 0.5
        )
        for k, t in _norm_tensors(shape[0], g, True).items():
            sd[f"{keys[NORM_OF[conv]]}.{k}"] = t
    for fc, width_in in ((Layer.BOX_FC1, channels * 49), (Layer.BOX_FC2, hidden)):
        sd[f"{keys[fc]}.weight"] = torch.randn(hidden, width_in, generator=g) * 0.05
        sd[f"{keys[fc]}.bias"] = torch.randn(hidden, generator=g) * 0.05
    sd["roi_head.bbox_head.fc_cls.weight"] = torch.randn(classes + 1, hidden, generator=g) * 0.1
    sd["roi_head.bbox_head.fc_reg.weight"] = torch.randn(4, width, generator=g) * 0.01
    sd["roi_head.bbox_head.fc_reg.bias"] = torch.zeros(4)
    return sd


def box_masks(boxes: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    """Per image, each box filled as its mask (bool Tensor[K, H, W] at the image size)."""
    h, w = size
    out = []
    for b in boxes:
        m = torch.zeros(b.shape[0], h, w, dtype=torch.bool)
        for j, (x1, y1, x2, y2) in enumerate(b.round().long().tolist()):
            m[j, max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = True
        out.append(m)
    return out


def cascade_state_dict(layout="mmdet", stages=3, channels=8, classes=3, seed=0, **kw):
    """A Cascade R-CNN state_dict in ``layout`` (mmdet or detectron2): the RPN, and ``stages``
    box heads with class-agnostic regression, each its own random weights."""
    from lossdoctor.inputs.layouts import CASCADE_LAYOUTS, LAYOUTS
    from lossdoctor.vocab import Layer

    out = {}
    tv_keys = LAYOUTS["torchvision"]
    for k in range(stages):
        tv = state_dict(channels=channels, classes=classes, seed=seed + k, reg_slots=1, **kw)
        layers = (Layer.RPN_CONV, Layer.RPN_LOGITS, Layer.RPN_DELTAS) if k == 0 else ()
        for layer in layers:
            for kind in ("weight", "bias"):
                out[f"{LAYOUTS[layout][layer][0]}.{kind}"] = tv[f"{tv_keys[layer][0]}.{kind}"]
        for layer, key in CASCADE_LAYOUTS[layout].items():
            prefix = key.format(k=k)
            for kind in ("weight", "bias"):
                out[f"{prefix}.{kind}"] = tv[f"{tv_keys[layer][0]}.{kind}"]
    return out


def inspect_json(folder, *args: str) -> dict:
    """``lossdoctor inspect FOLDER ARGS --json -`` → the report as a dict (exit 0 or 1)."""
    import json

    from typer.testing import CliRunner

    from lossdoctor.cli import app

    r = CliRunner().invoke(app, ["inspect", str(folder), *args, "--json", "-", "-q"])
    assert r.exit_code in (0, 1), r.output
    return json.loads(r.stdout)


def alarms(report: dict) -> list[tuple[str, str, str]]:
    """A report's warning and error findings: (severity, code, message)."""
    return [(f["severity"], f["code"], f["message"]) for f in report["findings"]
            if f["severity"] in ("warning", "error")]  # fmt: skip


# The coverage table's rows: where LOSSDOCTOR_COVERAGE names a folder, each zoo test appends its
# outcome to FRAMEWORK.jsonl there (scripts/update_readme.py turns them into docs/coverage.md).
COVERAGE_ENV = "LOSSDOCTOR_COVERAGE"


def record_coverage(framework: str, version: str, model: str, outcome: str, detail: str) -> None:
    """One row of the coverage table: ``outcome`` exact / partial / refused, ``detail`` the
    largest relative difference of the terms, or the reason of the refusal."""
    import datetime
    import json
    from pathlib import Path

    folder = os.environ.get(COVERAGE_ENV)
    if not folder:
        return
    row = {"framework": framework, "version": version, "model": model, "outcome": outcome,
           "detail": detail, "date": datetime.date.today().isoformat(),
           "torch": torch.__version__.split("+")[0]}  # fmt: skip
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / f"{framework}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def refusal(warned, words: str) -> str:
    """What the warning that names ``words`` says is not replayed (its part before ": not
    replayed yet"), for the coverage table."""
    said = next(str(w.message) for w in warned if words in str(w.message))
    head = said.partition(": not replayed yet")[0]
    marker = "cannot be replayed ("
    return (head.partition(marker)[2] if marker in head else head.rsplit(": ", 1)[-1]).strip()


def relative_gaps(got: dict, want: dict) -> dict:
    """Each term's |got - want| / |want| (absolute where want is 0)."""
    return {k: abs(got[k] - w) / (abs(w) or 1.0) for k, w in want.items()}


def replay_terms(folder) -> dict:
    """``lossdoctor inspect FOLDER --sample-all``'s own-profile row of loss terms."""
    return replay_terms_with(folder)


def replay_terms_with(folder, *args: str) -> dict:
    """:func:`replay_terms` with more options."""
    rep = inspect_json(folder, "--sample-all", *args)
    own = rep["meta"]["run"]["profile"]
    return next(x for x in rep["tables"]["profiles"] if x["profile"] == own)


def assert_refused_by_name(folder, words: str) -> None:
    """``check`` and ``inspect`` of a capture refuse it in one line naming ``words``, exit 2."""
    from typer.testing import CliRunner

    from lossdoctor.cli import app

    for command in ("check", "inspect"):
        r = CliRunner().invoke(app, [command, str(folder)])
        assert r.exit_code == 2, (command, r.output)
        said = " ".join(r.output.split())
        assert words in said and "not replayed yet" in said, (command, said)


def invoke(*args):
    """``lossdoctor ARGS`` through typer's runner (paths as strings)."""
    from typer.testing import CliRunner

    from lossdoctor.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def exit2(result, needle: str) -> None:
    """One line on stderr naming ``needle``, exit 2, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("lossdoctor: error: ") and "\n" not in err, err
    assert needle in err, err
    assert "Traceback" not in result.output


def as_json(report) -> dict:
    """A report (or a scan's) as its ``--json`` output reads: what a user of the JSON sees."""
    return json.loads(report.to_json())


# ---- mixed precision ---------------------------------------------------------------------------
# a constant feature value and RPN weights that put one level's conv output inside fp16's range
# (9 C a X = FP16_CONV) and its objectness logits past it (C b FP16_CONV = 2 FP16_CONV)
OVERFLOW_FEATURE = 10_000.0
FP16_CONV = 40_000.0


def overflow_case(d: dict, sd: dict, level: str = "p4") -> tuple[dict, dict]:
    """``d`` and ``sd`` changed so that ``level``'s RPN objectness logits overflow fp16 (about
    80000 in fp32) while its conv output (40000) and every other level stay in range."""
    c = d["features"][level].shape[1]
    d["features"][level] = torch.full_like(d["features"][level], OVERFLOW_FEATURE)
    conv, cls = TV_KEYS["rpn_conv"], TV_KEYS["rpn_cls"]
    sd = dict(sd)
    sd[f"{conv}.weight"] = torch.full_like(
        sd[f"{conv}.weight"], FP16_CONV / (9 * c * OVERFLOW_FEATURE)
    )
    sd[f"{conv}.bias"] = torch.zeros_like(sd[f"{conv}.bias"])
    sd[f"{cls}.weight"] = torch.full_like(sd[f"{cls}.weight"], 2.0 / c)
    return d, sd


def offset_logits(sd: dict, offset: float = 1000.0, std: float = 0.01) -> dict:
    """The box classifier's logits all shifted by ``offset`` (its bias) with small differences
    between classes: fp16 (spacing 0.5 at 1000) rounds the differences away."""
    cls = TV_KEYS["cls"]
    sd = dict(sd)
    g = torch.Generator().manual_seed(1)
    sd[f"{cls}.weight"] = torch.randn(sd[f"{cls}.weight"].shape, generator=g) * std
    sd[f"{cls}.bias"] = torch.full_like(sd[f"{cls}.bias"], offset)
    return sd


def amp_meta(dtype: str = "float16", scale: float = 65536.0, **kw) -> dict:
    return {"amp": {"dtype": dtype, "loss_scale": scale, **kw}}


# per (layout, kind): the tower prefixes, how a tower's k-th conv and norm are spelled, and the
# predictors (the spellings of each framework's own modules)
DENSE_KEYS = {
    ("torchvision", "retinanet"): ("head.classification_head.conv", "head.regression_head.conv",
                                   "{p}.{k}.0", "{p}.{k}.1", "head.classification_head.cls_logits",
                                   "head.regression_head.bbox_reg", None),
    ("torchvision", "fcos"): ("head.classification_head.conv", "head.regression_head.conv",
                              "{p}.{k3}", "{p}.{k3n}", "head.classification_head.cls_logits",
                              "head.regression_head.bbox_reg", "head.regression_head.bbox_ctrness"),
    ("detectron2", "retinanet"): ("head.cls_subnet", "head.bbox_subnet", "{p}.{k2}", "{p}.{k3n}",
                                  "head.cls_score", "head.bbox_pred", None),
    ("mmdet", "retinanet"): ("bbox_head.cls_convs", "bbox_head.reg_convs", "{p}.{k}.conv",
                             "{p}.{k}.gn", "bbox_head.retina_cls", "bbox_head.retina_reg", None),
    ("mmdet", "fcos"): ("bbox_head.cls_convs", "bbox_head.reg_convs", "{p}.{k}.conv",
                        "{p}.{k}.gn", "bbox_head.conv_cls", "bbox_head.conv_reg",
                        "bbox_head.conv_centerness"),
    ("mmdet", "atss"): ("bbox_head.cls_convs", "bbox_head.reg_convs", "{p}.{k}.conv",
                        "{p}.{k}.gn", "bbox_head.atss_cls", "bbox_head.atss_reg",
                        "bbox_head.atss_centerness"),
}  # fmt: skip


def dense_state_dict(layout="torchvision", kind="retinanet", channels=32, classes=3, anchors=9,
                     convs=2, norm=False, seed=0, std=0.05, prior=0.01):  # fmt: skip
    """A random dense head under a framework's key names (the classifier bias at ``prior``)."""
    cls_t, box_t, conv, nm, logits, deltas, ctr = DENSE_KEYS[(layout, kind)]
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def put(module, cout, cin, kernel=3, bias=True):
        sd[f"{module}.weight"] = torch.randn(cout, cin, kernel, kernel, generator=g) * std
        if bias:
            sd[f"{module}.bias"] = torch.randn(cout, generator=g) * 0.01

    for tower in (cls_t, box_t):
        for k in range(convs):
            names = dict(p=tower, k=k, k2=2 * k, k3=3 * k, k3n=3 * k + 1 if norm else 2 * k + 1)
            put(conv.format(**names), channels, channels, bias=not norm or kind == "fcos")
            if norm:
                sd[f"{nm.format(**names)}.weight"] = 1 + 0.1 * torch.randn(channels, generator=g)
                sd[f"{nm.format(**names)}.bias"] = 0.1 * torch.randn(channels, generator=g)
    put(logits, anchors * classes, channels)
    sd[f"{logits}.bias"] = torch.full((anchors * classes,), -math.log((1 - prior) / prior))
    put(deltas, anchors * 4, channels)
    if ctr:
        put(ctr, anchors, channels)
    if layout == "mmdet" and kind in ("fcos", "atss"):
        for lvl in range(5):
            sd[f"bbox_head.scales.{lvl}.scale"] = torch.tensor(1.0)
    return sd


def dense_batch_dict(n=2, channels=32, size=(128, 160), seed=0, boxes=None, labels=None):
    """A one-stage dump dict: P3-P7 features, a few GT boxes per image."""
    if boxes is None:
        boxes = [torch.tensor([[8.0, 10.0, 60.0, 70.0], [70.0, 20.0, 150.0, 100.0]])] * n
    return batch_dict(n=n, channels=channels, size=size, strides=(8, 16, 32, 64, 128), seed=seed,
                      boxes=boxes, labels=labels)  # fmt: skip


def readme_script():
    """scripts/update_readme.py as a module (the README's generated parts)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location(
        "update_readme", root / "scripts/update_readme.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def assert_readme_part(begin: str, end: str, generated: str) -> None:
    """The README's part between the markers ``begin`` and ``end`` is ``generated``."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start, stop = text.index(begin), text.index(end) + len(end)
    assert text[start:stop] == generated, "run: python scripts/update_readme.py"


def dense_batch_of(feats, boxes, labels, size, strides=(8, 16, 32, 64, 128)):
    """A one-stage Batch of given features (finest first, named p3 on) and GT."""
    return validate_batch(
        {
            "format": BATCH_FORMAT,
            "features": {f"p{3 + k}": f for k, f in enumerate(feats)},
            "image_sizes": [list(size)] * len(boxes),
            "strides": list(strides),
            "gt_boxes": boxes,
            "gt_labels": labels,
        }
    )
