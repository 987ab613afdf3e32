"""The batch dump ``lossdoctor.batch/1``: validate, load and write it.

Schema violations are refused (:class:`InputError` naming the key, what was expected and what
was found). Content that is valid but suspicious (degenerate or out-of-image boxes, NaN
features, images without GT, ...) is accepted and recorded as a :class:`Suspicion`: those are
what the diagnosis is for.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..vocab import Framework, Trigger, Weights
from .amp import amp_problem
from .checks import MAX_SEED
from .errors import InputError
from .files import save_torch
from .finite import all_finite
from .torchfile import Replaced, noting_payloads, read_file

BATCH_FORMAT = "lossdoctor.batch/1"
REQUIRED = ("format", "features", "image_sizes", "gt_boxes", "gt_labels")
OPTIONAL = ("pad_size", "strides", "gt_ignore", "gt_masks", "proposals", "meta")
# A box may stick out of the image by this many pixels before it counts as "outside".
OUTSIDE_TOLERANCE = 1.0
# a GT mask whose extent overlaps its box by less than this is out of step with it
MASK_BOX_IOU = 0.5
LEVEL_NAME = re.compile(r"^[pP](\d+)$")
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


@dataclass(frozen=True)
class Suspicion:
    """Valid but suspicious content, for the diagnosis to turn into a finding."""

    code: str
    message: str
    image: int | None = None
    box: int | None = None
    level: str | None = None
    evidence: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LabelSpace:
    """How the run names its classes: its label = the dump's + ``offset``; ``background``: the
    run's background label where its labels have one (torchvision's 0), else None."""

    offset: int = 0
    background: int | None = None

    def run(self, label: int) -> int:
        """The run's name of a dump label."""
        return label + self.offset

    def span(self, num_classes: int) -> str:
        """The run's foreground labels, e.g. ``1..3`` for torchvision with 3 classes."""
        return f"{self.offset}..{num_classes - 1 + self.offset}"

    @property
    def dump_background(self) -> int | None:
        """The dump label of the run's background label (torchvision's 0 is -1), or None."""
        return None if self.background is None else self.background - self.offset


# torchvision's labels, as its adapter dumps them: 1..K foreground, 0 the background, minus 1
TORCHVISION_LABELS = LabelSpace(offset=1, background=0)


@dataclass(kw_only=True)
class Batch:
    """A validated batch dump.

    features: level name → Tensor[N, C, H_l, W_l], finest first.
    gt_boxes[i]: Tensor[K_i, 4] (x1, y1, x2, y2, input pixels); gt_labels[i]: Tensor[K_i] int64,
    foreground classes 0..C-1; gt_ignore[i]: Tensor[K_i] bool.
    """

    features: dict[str, Tensor]
    image_sizes: list[tuple[int, int]]
    pad_size: tuple[int, int]
    strides: list[int]
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    gt_ignore: list[Tensor]
    proposals: list[Tensor] | None = None
    gt_masks: list[Tensor] | None = None  # per image Tensor[K_i, H_i, W_i] bool, image size
    meta: dict = field(default_factory=dict)
    feature_dtype: str = "float32"  # the dtype the features were dumped in (kept as float32)
    suspicions: list[Suspicion] = field(default_factory=list)
    replaced: list[Replaced] = field(default_factory=list)  # globals the file named, not rebuilt

    @property
    def num_images(self) -> int:
        return len(self.image_sizes)

    @property
    def levels(self) -> list[str]:
        return list(self.features)

    @property
    def channels(self) -> int:
        return next(iter(self.features.values())).shape[1]

    @property
    def label_space(self) -> LabelSpace:
        """The run's labels: torchvision's where its adapter converted them, else the dump's."""
        adapted = self.meta.get("adapter") is not None
        if adapted and self.meta.get("framework") == Framework.TORCHVISION:
            return TORCHVISION_LABELS
        return LabelSpace()


def _refuse(key: str, expected: str, found) -> InputError:
    if isinstance(found, Tensor):
        found = f"Tensor{list(found.shape)} {str(found.dtype).replace('torch.', '')}"
    elif not isinstance(found, str):
        found = f"{type(found).__name__} {found!r}"[:120]
    return InputError(f"batch key '{key}': expected {expected}, found {found}")


def _positive_int(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == int(v) and v > 0


def _int_pair(value, key: str) -> tuple[int, int]:
    if isinstance(value, Tensor):
        value = value.tolist()
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(map(_positive_int, value))
    ):
        raise _refuse(key, "[h, w] of two positive integers", value)
    return int(value[0]), int(value[1])


def _per_image(value, key: str, n: int) -> list:
    if not isinstance(value, (list, tuple)):
        raise _refuse(key, f"a list of {n} tensors (one per image)", value)
    if len(value) != n:
        raise _refuse(key, f"a list of {n} tensors (one per image)", f"a list of {len(value)}")
    return list(value)


def _check_features(features) -> dict[str, Tensor]:
    if not isinstance(features, dict) or not features:
        raise _refuse("features", "a non-empty dict level-name -> Tensor[N, C, H, W]", features)
    out = {}
    prev = None
    for name, t in features.items():
        key = f"features.{name}"
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise _refuse(key, "a float Tensor[N, C, H, W]", t)
        if prev is not None and t.shape[:2] != prev.shape[:2]:
            raise _refuse(key, f"N, C = {list(prev.shape[:2])} like the first level", t)
        if prev is not None and (t.shape[2] > prev.shape[2] or t.shape[3] > prev.shape[3]):
            raise _refuse(key, "levels ordered finest first (sizes must not grow)", t)
        prev = t
        out[str(name)] = t.detach().float() if t.dtype != torch.float32 else t.detach()
    if prev.shape[0] == 0:
        raise _refuse("features", "at least one image (N >= 1)", prev)
    return out


def _default_strides(features: dict[str, Tensor], pad_size) -> list[int]:
    if pad_size is not None:
        return [max(1, 2 ** round(math.log2(pad_size[0] / t.shape[2]))) for t in features.values()]
    strides = []
    for name in features:
        m = LEVEL_NAME.match(name)
        if not m:
            expected = "a list of strides (level names are not p2..p6, and pad_size is absent)"
            raise _refuse("strides", expected, "no strides")
        strides.append(2 ** int(m.group(1)))
    return strides


def _check_boxes(t, key: str) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != 4 or not t.is_floating_point():
        if isinstance(t, Tensor) and t.numel() == 0 and t.is_floating_point():
            return t.reshape(0, 4).float()
        raise _refuse(key, "a float Tensor[K, 4] (x1, y1, x2, y2)", t)
    return t.detach().float()


def _check_keys(data) -> None:
    if not isinstance(data, dict):
        raise InputError(
            f"not a lossdoctor batch dump: expected a dict, found {type(data).__name__}; "
            "write it with lossdoctor.dump_batch"
        )
    if "format" not in data:
        raise InputError(
            f"not a lossdoctor batch dump: key 'format' is missing (expected {BATCH_FORMAT!r}); "
            "write it with lossdoctor.dump_batch"
        )
    if data["format"] != BATCH_FORMAT:
        raise _refuse("format", repr(BATCH_FORMAT), repr(data["format"]))
    for key in REQUIRED:
        if key not in data:
            raise InputError(
                f"batch key '{key}' is missing; lossdoctor.dump_batch writes every required key"
            )
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise _refuse(
            unknown[0], f"only the keys {', '.join(REQUIRED + OPTIONAL)}", "an unknown key"
        )


def _check_sizes(sizes, n: int) -> list[tuple[int, int]]:
    if isinstance(sizes, Tensor):
        sizes = sizes.tolist()
    if not isinstance(sizes, (list, tuple)) or len(sizes) != n:
        raise _refuse("image_sizes", f"{n} [h, w] pairs (N = {n} from the features)", sizes)
    return [_int_pair(s, f"image_sizes[{i}]") for i, s in enumerate(sizes)]


def _check_strides(strides, features: dict[str, Tensor], pad_size) -> list[int]:
    if strides is None:
        return _default_strides(features, pad_size)
    if isinstance(strides, Tensor):
        strides = strides.tolist()
    ok = isinstance(strides, (list, tuple)) and len(strides) == len(features)
    if not ok or not all(isinstance(s, int) and s > 0 for s in strides):
        raise _refuse("strides", f"{len(features)} positive integers (one per level)", strides)
    return list(strides)


def _check_geometry(data: dict, features, sizes) -> tuple[tuple[int, int], list[int]]:
    """The padded input size and the level strides, given or derived, and every image within."""
    pad = _int_pair(data["pad_size"], "pad_size") if data.get("pad_size") is not None else None
    strides = _check_strides(data.get("strides"), features, pad)
    if pad is None:
        finest = next(iter(features.values()))
        pad = (finest.shape[2] * strides[0], finest.shape[3] * strides[0])
    for i, (h, w) in enumerate(sizes):
        if h > pad[0] or w > pad[1]:
            raise _refuse(
                f"image_sizes[{i}]", f"a size within the padded input {list(pad)}", [h, w]
            )
    return pad, strides


def _check_labels(raw, boxes: list[Tensor]) -> list[Tensor]:
    out = []
    for i, t in enumerate(_per_image(raw, "gt_labels", len(boxes))):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in INT_DTYPES:
            raise _refuse(f"gt_labels[{i}]", "an integer Tensor[K]", t)
        if t.shape[0] != boxes[i].shape[0]:
            raise _refuse(f"gt_labels[{i}]", f"{boxes[i].shape[0]} labels (one per box)", t)
        out.append(t.long())
    return out


def _check_masks(raw, boxes: list[Tensor], sizes) -> list[Tensor] | None:
    """Per image a bool or uint8 Tensor[K, H, W]: one mask per GT box, at the image's size (not
    padded), nonzero = object."""
    if raw is None:
        return None
    out = []
    for i, t in enumerate(_per_image(raw, "gt_masks", len(boxes))):
        want = [boxes[i].shape[0], *sizes[i]]
        ok = isinstance(t, Tensor) and t.dtype in (torch.bool, torch.uint8) and t.dim() == 3
        if not ok or list(t.shape) != want:
            raise _refuse(f"gt_masks[{i}]", f"a bool or uint8 Tensor{want} (one mask per box, "
                          "at the image size)", t)  # fmt: skip
        out.append(t.detach().bool())
    return out


def _check_ignore(raw, boxes: list[Tensor]) -> list[Tensor]:
    if raw is None:
        return [torch.zeros(b.shape[0], dtype=torch.bool) for b in boxes]
    out = []
    for i, t in enumerate(_per_image(raw, "gt_ignore", len(boxes))):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != boxes[i].shape[0]:
            raise _refuse(f"gt_ignore[{i}]", f"a bool Tensor[{boxes[i].shape[0]}]", t)
        out.append(t.bool())
    return out


# recorded steps, ranks and world sizes: far below any bound a real run reaches
MAX_COUNT = 2**31 - 1


def _is_int(v, low: int, high: int = MAX_COUNT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf


# meta keys lossdoctor reads: what each must be (the rest of meta is free)
META_KEYS = {
    "framework": (lambda v: v in set(Framework), f"one of {', '.join(Framework)}"),
    "profile": (lambda v: isinstance(v, (str, dict)), "a built-in profile name or a profile table"),
    "config": (lambda v: isinstance(v, (str, dict)), "a preset name or a detector config table"),
    "step": (lambda v: _is_int(v, 0), f"an integer in [0, {MAX_COUNT}]"),
    "rank": (lambda v: _is_int(v, 0), f"an integer in [0, {MAX_COUNT}]"),
    "world_size": (lambda v: _is_int(v, 1), f"an integer in [1, {MAX_COUNT}]"),
    "sample_seed": (lambda v: _is_int(v, 0, MAX_SEED), f"an integer in [0, {MAX_SEED}]"),
    "lr": (_is_number, "a finite number >= 0"),
    "losses": (
        lambda v: isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()),
        "a dict loss name -> value (the framework's loss dict at that step)",
    ),
    "amp": (lambda v: amp_problem(v) is None, "a dict of the run's mixed precision"),
    "unsupported": (lambda v: isinstance(v, str), "a message (what lossdoctor cannot replay)"),
    "trigger": (
        lambda v: isinstance(v, dict) and v.get("kind") in set(Trigger),
        f"a dict whose kind is one of {', '.join(Trigger)}",
    ),
    "weights": (
        lambda v: (
            isinstance(v, dict)
            and v.get("saved") in set(Weights)
            and _counts(v.get("nonfinite_elsewhere", {}))
        ),
        f"a dict whose 'saved' is one of {', '.join(Weights)}, with 'nonfinite_elsewhere' a "
        "dict tensor name -> count",
    ),
}


def _counts(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _is_int(n, 0) for k, n in v.items())


def _check_meta(meta) -> dict:
    if not isinstance(meta, dict):
        raise _refuse("meta", "a dict", meta)
    problem = amp_problem(meta["amp"]) if meta.get("amp") is not None else None
    if problem is not None:  # named down to its key
        where, expected, found = problem
        raise _refuse(f"meta.amp{where}", expected, found)
    for key, (ok, expected) in META_KEYS.items():
        if key in meta and meta[key] is not None and not ok(meta[key]):
            raise _refuse(f"meta.{key}", expected, meta[key])
    rank, world = meta.get("rank"), meta.get("world_size")
    if rank is not None and world is not None and rank >= world:
        raise _refuse("meta.rank", f"a rank below world_size {world}", rank)
    return dict(meta)


def validate_batch(data) -> Batch:
    """Check a loaded dump against the ``lossdoctor.batch/1`` schema and build a :class:`Batch`."""
    _check_keys(data)
    features = _check_features(data["features"])
    n = next(iter(features.values())).shape[0]
    sizes = _check_sizes(data["image_sizes"], n)
    pad, strides = _check_geometry(data, features, sizes)
    raw_boxes = _per_image(data["gt_boxes"], "gt_boxes", n)
    boxes = [_check_boxes(t, f"gt_boxes[{i}]") for i, t in enumerate(raw_boxes)]
    proposals = None
    if data.get("proposals") is not None:
        raw = _per_image(data["proposals"], "proposals", n)
        proposals = [_check_boxes(t, f"proposals[{i}]") for i, t in enumerate(raw)]
    meta = _check_meta(data.get("meta") or {})
    batch = Batch(
        features=features,
        image_sizes=sizes,
        pad_size=pad,
        strides=strides,
        gt_boxes=boxes,
        gt_labels=_check_labels(data["gt_labels"], boxes),
        gt_ignore=_check_ignore(data.get("gt_ignore"), boxes),
        gt_masks=_check_masks(data.get("gt_masks"), boxes, sizes),
        proposals=proposals,
        meta=dict(meta),
        feature_dtype=str(next(iter(data["features"].values())).dtype).replace("torch.", ""),
    )
    batch.suspicions = find_suspicions(batch)
    return batch


def find_suspicions(batch: Batch) -> list[Suspicion]:
    """Valid-but-suspicious content: the raw material of the data findings."""
    out = _feature_suspicions(batch)
    xywh = _looks_xywh(batch.gt_boxes, batch.image_sizes)
    for i, (boxes, ignore) in enumerate(zip(batch.gt_boxes, batch.gt_ignore)):
        if boxes.shape[0] == 0:
            out.append(Suspicion("empty-gt-image", f"image {i} has no GT box", image=i))
            continue
        if bool(ignore.all()):
            message = (
                f"image {i}: all {boxes.shape[0]} GT boxes are marked ignored (crowd), so it "
                "trains as an image without objects (negatives only)"
            )
            evidence = {"ignored": boxes.shape[0]}
            out.append(Suspicion("empty-gt-image", message, image=i, evidence=evidence))
        out += _nonfinite_boxes(i, boxes) + _box_suspicions(i, boxes, batch.image_sizes[i], xywh)
        if batch.gt_masks is not None:
            out += _mask_suspicions(i, boxes, batch.gt_masks[i])
    return out


def _mask_extents(masks: Tensor) -> list[list[float] | None]:
    """Per mask of Tensor[K, H, W] the box [x1, y1, x2, y2] around its pixels (pixel edges), or
    None where it is empty; two reductions over all the masks, not two per mask."""
    rows, cols = masks.any(2), masks.any(1)  # [K, H], [K, W]
    h, w = rows.shape[1], cols.shape[1]
    # argmax gives the first True (ties go to the first index); flipped, the last
    y1, x1 = rows.byte().argmax(1), cols.byte().argmax(1)
    y2, x2 = h - rows.flip(1).byte().argmax(1), w - cols.flip(1).byte().argmax(1)
    boxes = torch.stack([x1, y1, x2, y2], 1).tolist()
    return [[float(v) for v in b] if any_ else None for b, any_ in zip(boxes, rows.any(1).tolist())]


def _mask_suspicions(i: int, boxes: Tensor, masks: Tensor) -> list[Suspicion]:
    """GT masks that do not sit in their boxes: the box around the mask overlaps the GT box by
    less than MASK_BOX_IOU (a flip, crop or resize applied to one and not the other)."""
    out = []
    extents = _mask_extents(masks)
    for j in torch.isfinite(boxes).all(1).nonzero().flatten().tolist():
        extent = extents[j]
        if extent is None:
            continue
        iou = _iou(extent, boxes[j].tolist())
        if iou < MASK_BOX_IOU:
            out.append(Suspicion(
                "mask-box-mismatch",
                f"image {i} box {j} {[round(v, 1) for v in boxes[j].tolist()]}: its mask covers "
                f"{extent} (IoU {iou:.2f} with the box)",
                image=i, box=j,
                evidence={"box": boxes[j].tolist(), "mask_extent": extent, "iou": iou},
            ))  # fmt: skip
    return out


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    return iw * ih / (union - iw * ih) if union - iw * ih > 0 else 0.0


def _feature_suspicions(batch: Batch) -> list[Suspicion]:
    out = []
    for name, t in batch.features.items():
        if all_finite(t):
            continue
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
        if nan or inf:
            bad = (~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten().tolist()
            out.append(
                Suspicion(
                    "nonfinite-features",
                    f"features {name} hold {nan} NaN and {inf} Inf values",
                    image=bad[0],
                    level=name,
                    evidence={"nan": nan, "inf": inf, "images": bad},
                )
            )
    return out


def _nonfinite_boxes(i: int, boxes: Tensor) -> list[Suspicion]:
    """One suspicion per image naming its boxes with NaN/Inf coordinates, and what the frameworks
    do with them: torchvision's degenerate-box check (x2 <= x1 or y2 <= y1) stops on some; NaN
    compares false, so others pass it and give NaN losses, as MMDetection and Detectron2 do."""
    bad = (~torch.isfinite(boxes).all(1)).nonzero().flatten().tolist()
    if not bad:
        return []
    rows = boxes[bad]
    asserts = ((rows[:, 2] <= rows[:, 0]) | (rows[:, 3] <= rows[:, 1])).tolist()
    stops = sum(asserts)
    tv = "torchvision's degenerate-box check " + (
        f"stops on {stops} of them and lets {len(bad) - stops} through to NaN losses"
        if stops
        else "lets them through (NaN/Inf compare false) to NaN losses"
    )
    which = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
    message = (
        f"image {i}: boxes {which} have non-finite coordinates (first {rows[0].tolist()}), left "
        f"out of the replay; {tv}; MMDetection and Detectron2 train on them and produce NaN losses"
    )
    evidence = {"boxes": bad, "coordinates": rows.tolist()[:20], "torchvision_asserts": asserts}
    return [Suspicion("nonfinite-gt", message, image=i, box=bad[0], evidence=evidence)]


def _inverted(boxes: Tensor) -> Tensor:
    """Tensor[K] bool: finite boxes with x2 < x1 or y2 < y1."""
    finite = torch.isfinite(boxes).all(1)
    return finite & ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))


def _fits_as_xywh(boxes: Tensor, size: tuple[int, int]) -> bool:
    """Whether every finite box, read as (x, y, w, h), lies inside the image."""
    h, w = size
    b = boxes[torch.isfinite(boxes).all(1)]
    tol = OUTSIDE_TOLERANCE
    inside = (b[:, 2] >= 0) & (b[:, 3] >= 0) & (b[:, 0] + b[:, 2] <= w + tol)
    return bool((inside & (b[:, 1] + b[:, 3] <= h + tol)).all())


def _looks_xywh(boxes: list[Tensor], sizes: list[tuple[int, int]]) -> bool:
    """(x, y, w, h) boxes read as (x1, y1, x2, y2): a whole batch's convention, not one box's. At
    least two and at least half of the finite boxes are inverted (w < x or h < y is common for
    such boxes), and every box fits inside its image as (x, y, w, h); one inverted box among
    ordinary ones is a box with swapped corners (``degenerate-gt``)."""
    inverted = sum(int(_inverted(b).sum()) for b in boxes)
    finite = sum(int(torch.isfinite(b).all(1).sum()) for b in boxes)
    if inverted < 2 or 2 * inverted < finite:
        return False
    return all(_fits_as_xywh(b, size) for b, size in zip(boxes, sizes))


def _degenerate(i: int, j: int, box: list[float]) -> Suspicion:
    """A finite box of zero or negative width or height, saying which corners are swapped."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    swapped = [pair for pair, d in (("x1/x2", bw), ("y1/y2", bh)) if d < 0]
    kind = (
        f"swapped corners ({' and '.join(swapped)}: x2 < x1 or y2 < y1)"
        if swapped
        else "zero width or height"
    )
    return Suspicion(
        "degenerate-gt",
        f"image {i} box {j} {[round(v, 2) for v in box]} has {kind} ({bw:.4g} x {bh:.4g})",
        image=i,
        box=j,
        evidence={"box": box, "width": bw, "height": bh, "swapped": swapped},
    )


def _box_suspicions(i: int, boxes: Tensor, size: tuple[int, int], xywh: bool) -> list[Suspicion]:
    """Degenerate, out-of-image and (x, y, w, h)-looking boxes among the finite ones; ``xywh``:
    the batch reads as (x, y, w, h), whose inverted boxes are that one finding, not each a
    degenerate box."""
    h, w = size
    finite = torch.isfinite(boxes).all(1)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    inverted = _inverted(boxes)
    flat = finite & ((bw <= 0) | (bh <= 0)) & ~(inverted if xywh else torch.zeros_like(finite))
    out = [_degenerate(i, j, boxes[j].tolist()) for j in flat.nonzero().flatten().tolist()]
    tol = OUTSIDE_TOLERANCE
    outside = finite & (
        (boxes[:, 0] < -tol)
        | (boxes[:, 1] < -tol)
        | (boxes[:, 2] > w + tol)
        | (boxes[:, 3] > h + tol)
    )
    for j in outside.nonzero().flatten().tolist():
        out.append(
            Suspicion(
                "gt-outside-image",
                f"image {i} box {j} {boxes[j].tolist()} reaches outside the {h}x{w} image",
                image=i,
                box=j,
                evidence={"box": boxes[j].tolist(), "image_size": [h, w]},
            )
        )
    return out + (_xywh_suspicion(i, boxes, inverted) if xywh else [])


def _xywh_suspicion(i: int, boxes: Tensor, inverted: Tensor) -> list[Suspicion]:
    """One image's share of a batch that reads as (x, y, w, h) (see :func:`_looks_xywh`)."""
    count = int(inverted.sum())
    if count == 0:
        return []
    message = (
        f"image {i}: {count} of {boxes.shape[0]} boxes have x2 < x1 or y2 < y1, and every box "
        "of the batch fits inside its image as (x, y, w, h)"
    )
    evidence = {"inverted": count, "boxes": boxes.shape[0]}
    first = int(inverted.nonzero()[0])
    return [Suspicion("gt-xywh-suspected", message, image=i, box=first, evidence=evidence)]


def load_batch(path: str | Path) -> Batch:
    """Load and validate a dump; it is read by :mod:`.torchfile`, so no code from it runs."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"batch file {p} does not exist; check the path")
    try:
        loaded = read_file(p)
    except InputError as e:
        raise InputError(
            f"{p} is not a lossdoctor batch dump ({e}); write it with lossdoctor.dump_batch"
        ) from None
    if _looks_like_checkpoint(loaded.obj):
        raise InputError(
            f"{p} looks like a checkpoint, not a batch dump; pass it as CKPT (before BATCH)"
        )
    try:
        batch = validate_batch(loaded.obj)
    except InputError as e:
        raise noting_payloads(e, loaded.replaced) from None
    batch.replaced = list(loaded.replaced)
    return batch


def _looks_like_checkpoint(obj) -> bool:
    """A dict of named tensors, or one under 'state_dict' / 'model', without a batch format tag."""
    if not isinstance(obj, dict) or "format" in obj:
        return False
    inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
    return any(isinstance(v, Tensor) and "." in str(k) for k, v in inner.items())


def _cpu(t):
    return t.detach().cpu() if isinstance(t, Tensor) else t


def _feature_dict(features, strides: list[int] | None) -> dict[str, Tensor]:
    """Features as a dict level -> tensor: a dict as it is, a list or tuple (finest first, as
    ``extract_feat`` returns them) named pK from its strides (2^K), else p2, p3, ..."""
    if isinstance(features, dict):
        return {str(k): _cpu(v) for k, v in features.items()}
    if not isinstance(features, (list, tuple)):
        expected = "a dict level -> Tensor[N, C, H, W], or a list/tuple of them finest first"
        raise _refuse("features", expected, features)
    first = 2
    if strides and strides[0] > 0:  # other strides are refused by validation, named or not
        first = int(math.log2(strides[0]))
    return {f"p{first + k}": _cpu(v) for k, v in enumerate(features)}


def _plain(v):
    """Meta as the plain values a dump holds: enum members as their strings, paths as str,
    tensors and numpy scalars as numbers and lists."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, enum.Enum):
        return _plain(v.value)
    for kind in (bool, int, float, str):  # subclasses (a numpy bool, an IntEnum) as the base type
        if isinstance(v, kind):
            return kind(v)
    if v is None or isinstance(v, Path):
        return None if v is None else str(v)
    return v.tolist() if hasattr(v, "tolist") else v


def _int_sizes(image_sizes) -> list[list[int]]:
    sizes = image_sizes.tolist() if isinstance(image_sizes, Tensor) else image_sizes
    try:
        return [[int(h), int(w)] for h, w in sizes]
    except (TypeError, ValueError):
        raise _refuse("image_sizes", "a list of [h, w] pairs", sizes) from None


def _ints(values, key: str, expected: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        raise _refuse(key, expected, values) from None


def _tensor_list(values, key: str) -> list:
    """A per-image list (one Tensor each), moved to the CPU."""
    if not isinstance(values, (list, tuple)):
        raise _refuse(key, "a list with one Tensor per image", values)
    return [_cpu(v) for v in values]


def dump_batch(
    path: str | Path,
    *,
    features,
    image_sizes,
    gt_boxes,
    gt_labels,
    gt_ignore=None,
    gt_masks=None,
    proposals=None,
    pad_size=None,
    strides=None,
    meta: dict | None = None,
) -> Batch:
    """Write a ``lossdoctor.batch/1`` dump from inside a training loop, validated on the way out.

    features: level name → Tensor[N, C, H, W], finest first (e.g. the FPN outputs p2..p6), or a
    list/tuple of them. gt_boxes / gt_labels: per image Tensor[K, 4] (x1, y1, x2, y2) and
    Tensor[K] foreground class 0..C-1. gt_masks (Mask R-CNN): per image a bool or uint8
    Tensor[K, H, W] at the image size. Returns the validated :class:`Batch`.
    """
    if strides is not None:
        strides = _ints(strides, "strides", "a list of integer strides, finest first")
    data = {
        "format": BATCH_FORMAT,
        "features": _feature_dict(features, strides),
        "image_sizes": _int_sizes(image_sizes),
        "gt_boxes": _tensor_list(gt_boxes, "gt_boxes"),
        "gt_labels": _tensor_list(gt_labels, "gt_labels"),
    }
    optional = {"gt_ignore": gt_ignore, "gt_masks": gt_masks, "proposals": proposals}
    data.update({k: _tensor_list(v, k) for k, v in optional.items() if v is not None})
    pad = None if pad_size is None else _ints(pad_size, "pad_size", "[h, w]")
    extra = {"pad_size": pad, "strides": strides, "meta": _plain(meta) if meta else None}
    data.update({k: v for k, v in extra.items() if v is not None})
    batch = validate_batch(data)
    save_torch(data, path)
    return batch
