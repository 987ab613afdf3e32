"""A full ``lossdoctor inspect`` against one heads-only training step, as whole processes.

    python benchmarks/inspect_vs_step.py [--mask] [--repeat 3] [--gt 100]

On the COCO-scale batch of ``common.py`` (2 images padded to 800 x 1216, P2-P6 x 256 channels,
81 classes; with ``--mask`` a Mask R-CNN checkpoint and GT masks), written once to disk, these
processes run alternating, each from a cold interpreter (import, load, work, exit):

- ``step``: one training step of the same RPN + RoI heads (+ mask head) on the same features:
  torchvision's ``RegionProposalNetwork`` and ``RoIHeads`` when torchvision is importable, the
  features requiring grad as a backbone's would, losses summed and ``backward()``; without
  torchvision, lossdoctor's own replay of the torchvision profile and one backward stands in
  (the script says which it ran).
- ``inspect``, ``inspect --sample-all``, ``inspect --quiet``: the CLI as a user runs it (two
  profiles, gradients, NaN trace, symptom, findings, the report on the terminal and as JSON).

Prints each one's median wall time and peak RSS, their ratios to the step, and a per-stage
breakdown of one in-process inspect (import, load, replay, gradients per profile, NaN trace,
symptom, findings, render).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TV_NAMES = ("0", "1", "2", "3", "pool")  # torchvision's FPN feature keys
MASK_KEYS = {
    **{f"roi_heads.mask_head.{k}.0": (256, 256, 3, 3) for k in range(4)},
    "roi_heads.mask_predictor.conv5_mask": (256, 256, 2, 2),
}


def write_inputs(folder: Path, mask: bool, gt: int) -> tuple[Path, Path]:
    """The COCO-scale checkpoint and batch as files."""
    sys.path.insert(0, str(HERE))
    import torch
    from common import CLASSES, coco_batch, coco_state_dict

    from lossdoctor.inputs.batch import dump_batch

    sd = coco_state_dict()
    g = torch.Generator().manual_seed(1)
    if mask:
        for key, shape in MASK_KEYS.items():
            sd[f"{key}.weight"] = torch.randn(*shape, generator=g) * 0.02
            sd[f"{key}.bias"] = torch.zeros(shape[1] if "conv5" in key else shape[0])
        logits = "roi_heads.mask_predictor.mask_fcn_logits"
        sd[f"{logits}.weight"] = torch.randn(CLASSES + 1, 256, 1, 1, generator=g) * 0.01
        sd[f"{logits}.bias"] = torch.zeros(CLASSES + 1)
    b = coco_batch(gt)
    masks = None
    if mask:
        masks = [_box_masks(boxes, size) for boxes, size in zip(b.gt_boxes, b.image_sizes)]
    ckpt, batch = folder / "checkpoint.pt", folder / "batch.pt"
    torch.save({"model": sd}, ckpt)
    dump_batch(
        batch, features=b.features, image_sizes=b.image_sizes, gt_boxes=b.gt_boxes,
        gt_labels=b.gt_labels, pad_size=list(b.pad_size), strides=list(b.strides), gt_masks=masks,
    )  # fmt: skip
    return ckpt, batch


def _box_masks(boxes, size):
    """Each GT's mask: the ellipse inscribed in its box, at the image size."""
    import torch

    h, w = size
    ys = torch.arange(h).float()[:, None] + 0.5
    xs = torch.arange(w).float()[None, :] + 0.5
    out = torch.zeros(boxes.shape[0], h, w, dtype=torch.bool)
    for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        rx, ry = max((x2 - x1) / 2, 0.5), max((y2 - y1) / 2, 0.5)
        out[k] = ((xs - (x1 + x2) / 2) / rx) ** 2 + ((ys - (y1 + y2) / 2) / ry) ** 2 <= 1
    return out


# ---- the training step ------------------------------------------------------------------------


def _torchvision_heads(mask: bool):
    """torchvision's Faster/Mask R-CNN R50-FPN heads with their default settings."""
    from common import CHANNELS, CLASSES
    from torch import nn
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import AnchorGenerator, RegionProposalNetwork, RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    top_n = dict(training=2000, testing=1000)
    heads = nn.Module()
    heads.rpn = RegionProposalNetwork(
        anchors, RPNHead(CHANNELS, 3), 0.7, 0.3, 256, 0.5, top_n, top_n, 0.7
    )
    heads.roi_heads = RoIHeads(
        MultiScaleRoIAlign(list(TV_NAMES[:4]), 7, 2), TwoMLPHead(CHANNELS * 49, 1024),
        FastRCNNPredictor(1024, CLASSES + 1), 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100,
    )  # fmt: skip
    if mask:
        heads.roi_heads.mask_roi_pool = MultiScaleRoIAlign(list(TV_NAMES[:4]), 14, 2)
        heads.roi_heads.mask_head = MaskRCNNHeads(CHANNELS, (256,) * 4, 1)
        heads.roi_heads.mask_predictor = MaskRCNNPredictor(256, 256, CLASSES + 1)
    return heads.train()


def step(ckpt: str, batch: str, mask: bool) -> str:
    import torch

    sys.path.insert(0, str(HERE))
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return _stand_in_step(ckpt, batch)
    from collections import OrderedDict

    from torchvision.models.detection.image_list import ImageList

    heads = _torchvision_heads(mask)
    heads.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    b = torch.load(batch, weights_only=True)
    feats = OrderedDict(
        (n, f.requires_grad_(True)) for n, f in zip(TV_NAMES, b["features"].values())
    )
    images = ImageList(torch.zeros(2, 3, *b["pad_size"]), [tuple(s) for s in b["image_sizes"]])
    targets = [{"boxes": bx, "labels": lb + 1} for bx, lb in zip(b["gt_boxes"], b["gt_labels"])]
    for t, m in zip(targets, b.get("gt_masks") or []):
        t["masks"] = m.to(torch.uint8)
    proposals, rpn_losses = heads.rpn(images, feats, targets)
    _, roi_losses = heads.roi_heads(feats, proposals, images.image_sizes, targets)
    sum((rpn_losses | roi_losses).values()).backward()
    return "torchvision " + torchvision.__version__


def _stand_in_step(ckpt: str, batch: str) -> str:
    from lossdoctor.inputs.batch import load_batch
    from lossdoctor.inputs.checkpoint import load_checkpoint
    from lossdoctor.inputs.config import preset
    from lossdoctor.inputs.profiles import builtin
    from lossdoctor.replay.engine import replay

    b = load_batch(batch)
    heads = load_checkpoint(ckpt)
    cfg = preset("torchvision-mask" if b.gt_masks is not None else "torchvision")
    r = replay(heads, b, cfg, [builtin("torchvision")])
    r.losses["torchvision"].total.backward()
    return "lossdoctor's replay of the torchvision profile (torchvision absent)"


# ---- the per-stage breakdown ------------------------------------------------------------------


def stages(ckpt: str, batch: str, mask: bool, sample_all: bool = False) -> dict:
    """One in-process inspect, timed by phase; gradients timed per profile."""
    t0 = time.perf_counter()
    import torch  # noqa: F401

    from lossdoctor import api

    grads_module = importlib.import_module("lossdoctor.diagnose.gradients.profile")
    from lossdoctor.report.render import render
    from lossdoctor.vocab import Phase

    marks = [("import", t0), ("load", time.perf_counter())]
    per_profile = {}
    shared_grads = grads_module.profile_gradients

    def timed_profile(r, p, shared=None):
        t = time.perf_counter()
        out = shared_grads(r, p, shared)
        per_profile[p.name] = time.perf_counter() - t
        return out

    grads_module.profile_gradients = timed_profile

    def on_phase(phase):
        if phase is not Phase.LOAD:
            marks.append((phase.name.lower(), time.perf_counter()))

    config = "torchvision-mask" if mask else "torchvision"
    report = api.inspect(ckpt, batch, config=config, sample_all=sample_all, on_phase=on_phase)
    marks.append(("render", time.perf_counter()))
    from rich.console import Console

    render(report, Console(file=io.StringIO(), width=120))
    report.to_json()
    marks.append(("end", time.perf_counter()))
    out = {name: marks[i + 1][1] - t for i, (name, t) in enumerate(marks[:-1])}
    out["gradients per profile"] = per_profile
    return out


# ---- the driver -------------------------------------------------------------------------------


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of one child process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) not in (0, 1):  # 1: findings at the fail-on level
        raise SystemExit(f"{' '.join(cmd)} failed")
    return seconds, usage.ru_maxrss / 1024, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mask", action="store_true", help="Mask R-CNN heads and GT masks")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gt", type=int, default=100, help="GT boxes per image")
    ap.add_argument("--child", choices=["step", "stages", "stages-all"])
    ap.add_argument("paths", nargs="*")
    args = ap.parse_args()
    if args.child == "step":
        print(step(*args.paths, args.mask))
        return
    if args.child in ("stages", "stages-all"):
        print(json.dumps(stages(*args.paths, args.mask, args.child == "stages-all")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, batch = write_inputs(Path(tmp), args.mask, args.gt)
        report(args, ckpt, batch, Path(tmp))


def report(args, ckpt: Path, batch: Path, tmp: Path) -> None:
    me = [sys.executable, __file__] + (["--mask"] if args.mask else [])
    cli = [sys.executable, "-c", "from lossdoctor.cli import main; main()", "inspect"]
    config = ["--config", "torchvision-mask" if args.mask else "torchvision"]
    cases = {
        "step": me + ["--child", "step", str(ckpt), str(batch)],
        "inspect": cli + [str(ckpt), str(batch), *config, "--json", str(tmp / "r.json")],
        "inspect --sample-all": cli + [str(ckpt), str(batch), *config, "--sample-all"],
        "inspect --quiet": cli + [str(ckpt), str(batch), *config, "--quiet"],
    }
    times = {k: [] for k in cases}
    rss = {k: [] for k in cases}
    what = ""
    for _ in range(args.repeat):
        for name, cmd in cases.items():
            s, m, out = run(cmd)
            times[name].append(s)
            rss[name].append(m)
            what = out.strip() if name == "step" else what
    print(f"step: {what}; {'Mask R-CNN' if args.mask else 'Faster R-CNN'}, {args.gt} GT/image")
    base_t, base_m = statistics.median(times["step"]), statistics.median(rss["step"])
    for name in cases:
        t, m = statistics.median(times[name]), statistics.median(rss[name])
        ratios = f"{t / base_t:4.2f}x   peak RSS {m:6.0f} MB  {m / base_m:4.2f}x"
        print(f"  {name:22s} {t:6.1f} s  {ratios}")
    for child, what in (("stages", "inspect"), ("stages-all", "inspect --sample-all")):
        _, _, out = run(me + ["--child", child, str(ckpt), str(batch)])
        print(f"one {what}, in process, by stage (s):")
        for name, v in json.loads(out.strip().splitlines()[-1]).items():
            if isinstance(v, dict):
                print(f"  {name}: " + ", ".join(f"{p} {s:.2f}" for p, s in v.items()))
            else:
                print(f"  {name:10s} {v:6.2f}")


if __name__ == "__main__":
    main()
