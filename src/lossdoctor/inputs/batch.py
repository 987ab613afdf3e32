"""The batch dump ``lossdoctor.batch/1``: validate, load and write it.

Schema violations are refused (:class:`InputError` naming the key, what was expected and what
was found). Content that is valid but suspicious (degenerate or out-of-image boxes, NaN
features, images without GT, ...) is accepted and recorded as a :class:`Suspicion`: those are
what the diagnosis is for.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import InputError
from .files import save_torch
from .torchfile import Replaced, noting_payloads, read_file

BATCH_FORMAT = "lossdoctor.batch/1"
REQUIRED = ("format", "features", "image_sizes", "gt_boxes", "gt_labels")
OPTIONAL = ("pad_size", "strides", "gt_ignore", "proposals", "meta")
# A box may stick out of the image by this many pixels before it counts as "outside".
OUTSIDE_TOLERANCE = 1.0
LEVEL_NAME = re.compile(r"^[pP](\d+)$")


@dataclass(frozen=True)
class Suspicion:
    """Valid but suspicious content, for the diagnosis to turn into a finding."""

    code: str
    message: str
    image: int | None = None
    box: int | None = None
    level: str | None = None
    evidence: dict = field(default_factory=dict)


@dataclass
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
    meta: dict = field(default_factory=dict)
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


def _refuse(key: str, expected: str, found) -> InputError:
    if isinstance(found, Tensor):
        found = f"Tensor{list(found.shape)} {str(found.dtype).replace('torch.', '')}"
    elif not isinstance(found, str):
        found = f"{type(found).__name__} {found!r}"[:120]
    return InputError(f"batch key '{key}': expected {expected}, found {found}")


def _int_pair(value, key: str) -> tuple[int, int]:
    if isinstance(value, Tensor):
        value = value.tolist()
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == int(v) and v > 0
            for v in value
        )
    ):
        raise _refuse(key, "[h, w] of two positive integers", value)
    return int(value[0]), int(value[1])


def _per_image(value, key: str, n: int) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise _refuse(
            key,
            f"a list of {n} tensors (one per image)",
            value if not isinstance(value, (list, tuple)) else f"a list of {len(value)}",
        )
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
    return out


def _default_strides(features: dict[str, Tensor], pad_size) -> list[int]:
    if pad_size is not None:
        return [max(1, 2 ** round(math.log2(pad_size[0] / t.shape[2]))) for t in features.values()]
    strides = []
    for name in features:
        m = LEVEL_NAME.match(name)
        if not m:
            raise _refuse(
                "strides",
                "a list of strides (level names are not p2..p6, and pad_size is absent)",
                "no strides",
            )
        strides.append(2 ** int(m.group(1)))
    return strides


def _check_boxes(t, key: str) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != 4 or not t.is_floating_point():
        if isinstance(t, Tensor) and t.numel() == 0 and t.is_floating_point():
            return t.reshape(0, 4).float()
        raise _refuse(key, "a float Tensor[K, 4] (x1, y1, x2, y2)", t)
    return t.detach().float()


def validate_batch(data) -> Batch:
    """Check a loaded dump against the ``lossdoctor.batch/1`` schema and build a :class:`Batch`."""
    if not isinstance(data, dict):
        raise InputError(
            f"not a lossdoctor batch dump: expected a dict, found {type(data).__name__}; write it with lossdoctor.dump_batch"
        )
    if data.get("format") != BATCH_FORMAT:
        if "format" not in data:
            raise InputError(
                f"not a lossdoctor batch dump: key 'format' is missing (expected {BATCH_FORMAT!r}); write it with lossdoctor.dump_batch"
            )
        raise _refuse("format", repr(BATCH_FORMAT), repr(data.get("format")))
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

    features = _check_features(data["features"])
    n = next(iter(features.values())).shape[0]
    if n == 0:
        raise _refuse("features", "at least one image (N >= 1)", next(iter(features.values())))
    sizes = data["image_sizes"]
    if isinstance(sizes, Tensor):
        sizes = sizes.tolist()
    if not isinstance(sizes, (list, tuple)) or len(sizes) != n:
        raise _refuse("image_sizes", f"{n} [h, w] pairs (N = {n} from the features)", sizes)
    image_sizes = [_int_pair(s, f"image_sizes[{i}]") for i, s in enumerate(sizes)]

    pad_size = _int_pair(data["pad_size"], "pad_size") if data.get("pad_size") is not None else None
    strides = data.get("strides")
    if strides is not None:
        if isinstance(strides, Tensor):
            strides = strides.tolist()
        if (
            not isinstance(strides, (list, tuple))
            or len(strides) != len(features)
            or not all(isinstance(s, int) and s > 0 for s in strides)
        ):
            raise _refuse("strides", f"{len(features)} positive integers (one per level)", strides)
        strides = list(strides)
    else:
        strides = _default_strides(features, pad_size)
    if pad_size is None:
        finest = next(iter(features.values()))
        pad_size = (finest.shape[2] * strides[0], finest.shape[3] * strides[0])
    for i, (h, w) in enumerate(image_sizes):
        if h > pad_size[0] or w > pad_size[1]:
            raise _refuse(
                f"image_sizes[{i}]", f"a size within the padded input {list(pad_size)}", [h, w]
            )

    boxes = [
        _check_boxes(t, f"gt_boxes[{i}]")
        for i, t in enumerate(_per_image(data["gt_boxes"], "gt_boxes", n))
    ]
    labels = []
    for i, t in enumerate(_per_image(data["gt_labels"], "gt_labels", n)):
        if (
            not isinstance(t, Tensor)
            or t.dim() != 1
            or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8)
        ):
            raise _refuse(f"gt_labels[{i}]", "an integer Tensor[K]", t)
        if t.shape[0] != boxes[i].shape[0]:
            raise _refuse(f"gt_labels[{i}]", f"{boxes[i].shape[0]} labels (one per box)", t)
        labels.append(t.long())
    ignore = []
    raw_ignore = data.get("gt_ignore")
    for i in range(n):
        if raw_ignore is None:
            ignore.append(torch.zeros(boxes[i].shape[0], dtype=torch.bool))
            continue
        t = _per_image(raw_ignore, "gt_ignore", n)[i]
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != boxes[i].shape[0]:
            raise _refuse(f"gt_ignore[{i}]", f"a bool Tensor[{boxes[i].shape[0]}]", t)
        ignore.append(t.bool())
    proposals = None
    if data.get("proposals") is not None:
        proposals = [
            _check_boxes(t, f"proposals[{i}]")
            for i, t in enumerate(_per_image(data["proposals"], "proposals", n))
        ]
    meta = data.get("meta") or {}
    if not isinstance(meta, dict):
        raise _refuse("meta", "a dict", meta)

    batch = Batch(
        features, image_sizes, pad_size, strides, boxes, labels, ignore, proposals, dict(meta)
    )
    batch.suspicions.extend(find_suspicions(batch))
    return batch


def find_suspicions(batch: Batch) -> list[Suspicion]:
    """Valid-but-suspicious content: the raw material of the data findings."""
    out = _feature_suspicions(batch)
    for i, (boxes, ignore, size) in enumerate(
        zip(batch.gt_boxes, batch.gt_ignore, batch.image_sizes)
    ):
        if boxes.shape[0] == 0:
            out.append(Suspicion("empty-gt-image", f"image {i} has no GT box", image=i))
            continue
        if bool(ignore.all()):
            out.append(
                Suspicion(
                    "empty-gt-image",
                    f"image {i}: all {boxes.shape[0]} GT boxes are marked ignored (crowd), so it trains as an "
                    "image without objects (negatives only)",
                    image=i,
                    evidence={"ignored": boxes.shape[0]},
                )
            )
        out += _nonfinite_boxes(i, boxes) + _box_suspicions(i, boxes, size)
    return out


def _feature_suspicions(batch: Batch) -> list[Suspicion]:
    out = []
    for name, t in batch.features.items():
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
    tv = (
        f"torchvision's degenerate-box check stops on {sum(asserts)} of them and lets "
        f"{len(bad) - sum(asserts)} through to NaN losses"
        if any(asserts)
        else "torchvision's degenerate-box check lets them through (NaN/Inf compare false) to NaN losses"
    )
    return [
        Suspicion(
            "nonfinite-gt",
            f"image {i}: box{'es' if len(bad) > 1 else ''} {', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''} "
            f"{'have' if len(bad) > 1 else 'has'} non-finite coordinates (first {rows[0].tolist()}), left out of the "
            f"replay; {tv}; MMDetection and Detectron2 train on them and produce NaN losses",
            image=i,
            box=bad[0],
            evidence={
                "boxes": bad,
                "coordinates": rows.tolist()[:20],
                "torchvision_asserts": asserts,
            },
        )
    ]


def _box_suspicions(i: int, boxes: Tensor, size: tuple[int, int]) -> list[Suspicion]:
    """Degenerate, out-of-image and (x, y, w, h)-looking boxes among the finite ones."""
    h, w = size
    finite = torch.isfinite(boxes).all(1)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    out = []
    for j in (finite & ((bw <= 0) | (bh <= 0))).nonzero().flatten().tolist():
        kind = "zero" if (bw[j] == 0 or bh[j] == 0) else "negative"
        out.append(
            Suspicion(
                "degenerate-gt",
                f"image {i} box {j} has {kind} width or height ({bw[j]:.4g} x {bh[j]:.4g})",
                image=i,
                box=j,
                evidence={"box": boxes[j].tolist(), "width": float(bw[j]), "height": float(bh[j])},
            )
        )
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
    return out + _xywh_suspicion(i, boxes, finite & ((bw < 0) | (bh < 0)), size)


def _xywh_suspicion(
    i: int, boxes: Tensor, inverted: Tensor, size: tuple[int, int]
) -> list[Suspicion]:
    """xywh read as xyxy: "x2" smaller than x1 for some boxes, while x1 + x2 stays inside the image."""
    h, w = size
    if int(inverted.sum()) == 0:
        return []
    as_xywh = boxes[inverted]
    tol = OUTSIDE_TOLERANCE
    fits = ((as_xywh[:, 0] + as_xywh[:, 2]) <= w + tol) & (
        (as_xywh[:, 1] + as_xywh[:, 3]) <= h + tol
    )
    if not bool(fits.all()):
        return []
    return [
        Suspicion(
            "gt-xywh-suspected",
            f"image {i}: {int(inverted.sum())} of {boxes.shape[0]} boxes have x2 < x1 or y2 < y1 but fit as (x, y, w, h)",
            image=i,
            box=int(inverted.nonzero()[0]),
            evidence={"inverted": int(inverted.sum()), "boxes": boxes.shape[0]},
        )
    ]


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


def dump_batch(
    path: str | Path,
    *,
    features: dict[str, Tensor],
    image_sizes,
    gt_boxes,
    gt_labels,
    gt_ignore=None,
    proposals=None,
    pad_size=None,
    strides=None,
    meta: dict | None = None,
) -> Batch:
    """Write a ``lossdoctor.batch/1`` dump from inside a training loop, validated on the way out.

    features: level name → Tensor[N, C, H, W], finest first (e.g. the FPN outputs p2..p6).
    gt_boxes / gt_labels: per image Tensor[K, 4] (x1, y1, x2, y2) and Tensor[K] foreground class
    0..C-1. Returns the validated :class:`Batch`.
    """
    data = {
        "format": BATCH_FORMAT,
        "features": {str(k): _cpu(v) for k, v in features.items()},
        "image_sizes": [
            [int(h), int(w)]
            for h, w in (image_sizes.tolist() if isinstance(image_sizes, Tensor) else image_sizes)
        ],
        "gt_boxes": [_cpu(b) for b in gt_boxes],
        "gt_labels": [_cpu(b) for b in gt_labels],
    }
    if gt_ignore is not None:
        data["gt_ignore"] = [_cpu(b) for b in gt_ignore]
    if proposals is not None:
        data["proposals"] = [_cpu(b) for b in proposals]
    if pad_size is not None:
        data["pad_size"] = [int(v) for v in pad_size]
    if strides is not None:
        data["strides"] = [int(s) for s in strides]
    if meta:
        data["meta"] = dict(meta)
    batch = validate_batch(data)
    save_torch(data, path)
    return batch
