"""Build a :class:`Report` from a diagnosis."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
from pathlib import Path

import torch

from .. import __version__
from ..diagnose import Diagnosis
from ..inputs.dataclass_toml import to_dict
from ..replay.engine import HEADS
from .model import IMAGE_COLUMNS, LEVEL_COLUMNS, Report

GRAD_COLUMNS = ("grad_feature", "grad_logits_pos", "grad_logits_neg", "grad_deltas")


def sha256(path: str | Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain(v):
    """Batch meta → JSON-safe values."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _nonfinite(t) -> int:
    return int((~torch.isfinite(t.detach())).sum())


def level_rows(d: Diagnosis) -> list[dict]:
    r = d.replay
    rows = r.level_rows()
    grads = {(name, g.head, g.level): g for name, pg in d.grads.items() for g in pg.levels}
    origins: dict[tuple, str] = {}
    for o in d.origins:
        origins.setdefault((o.profile, o.head, o.level), o.stage)
    per_level = {}
    for name, pl in r.losses.items():
        for head in HEADS:
            for s, ll in zip(r.samples[head], pl.levels[head]):
                box_term = pl.profile.term(f"{head}_box")
                per_level[(name, head, s.name)] = (
                    _nonfinite(s.cls_loss)
                    + _nonfinite(s.box_loss(box_term))
                    + _nonfinite(ll.loss_cls)
                    + _nonfinite(ll.loss_bbox)
                )
    out = []
    for row in rows:
        key = (row["profile"], row["head"], row["level"])
        if row["level"] == "all":
            same = [g for (p, h, _), g in grads.items() if p == row["profile"] and h == row["head"]]
            extra = {
                c: math.sqrt(sum(getattr(g, c.removeprefix("grad_")) ** 2 for g in same))
                for c in GRAD_COLUMNS
            }
            lv = [k for k in per_level if k[0] == row["profile"] and k[1] == row["head"]]
            extra["nonfinite"] = sum(per_level[k] + grads[k].nonfinite for k in lv)
            extra["nan_origin"] = next((origins[k] for k in lv if k in origins), "")
            extra["neg_share"] = d.grads[row["profile"]].neg_share.get(row["head"], math.nan)
        else:
            g = grads[key]
            extra = {c: getattr(g, c.removeprefix("grad_")) for c in GRAD_COLUMNS}
            extra["nonfinite"] = per_level[key] + g.nonfinite
            extra["nan_origin"] = origins.get(key, "")
            extra["neg_share"] = g.neg_share
        merged = {**row, **extra}
        out.append(
            {
                **{c: merged[c] for c in LEVEL_COLUMNS},
                **{k: v for k, v in merged.items() if k not in LEVEL_COLUMNS},
            }
        )
    return out


def image_rows(d: Diagnosis) -> list[dict]:
    rows = d.replay.image_rows()
    for row, dets, best in zip(rows, d.symptom.detections, d.symptom.max_fg_score):
        row["detections"] = dets
        row["max_fg_score"] = best
    return [
        {
            **{k: row[k] for k in IMAGE_COLUMNS},
            **{k: v for k, v in row.items() if k not in IMAGE_COLUMNS},
        }
        for row in rows
    ]


def param_rows(d: Diagnosis) -> list[dict]:
    heads = d.replay.heads
    out = []
    for name, pg in d.grads.items():
        for key, norms in pg.params.items():
            part, kind = key.split(".")
            out.append(
                {
                    "profile": name,
                    "param": f"{heads.keys[part]}.{kind}",
                    "shape": "x".join(str(s) for s in heads.params[key].shape),
                    **norms,
                }
            )
    return out


def profile_rows(d: Diagnosis) -> list[dict]:
    out = []
    for name, pl in d.replay.losses.items():
        g = d.grads[name]
        terms = {k: float(v.detach()) for k, v in pl.terms.items()}
        out.append(
            {
                "profile": name,
                "loss_total": float(pl.total.detach()),
                **terms,
                "grad_total_norm": g.total_norm,
                "max_norm": g.max_norm,
                "clip_coef": g.clip_coef,
                "grad_clipped_norm": g.clipped_norm,
                "rpn_neg_share": g.neg_share.get("rpn"),
                "roi_neg_share": g.neg_share.get("roi"),
                "no_grad": ";".join(g.no_grad),
            }
        )
    return out


def build_report(d: Diagnosis, checkpoint_path=None, batch_path=None) -> Report:
    r = d.replay
    h = r.heads
    meta = {
        "lossdoctor": __version__,
        "torch": torch.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checkpoint": {
            "path": str(checkpoint_path) if checkpoint_path else None,
            "sha256": sha256(checkpoint_path),
            "layout": h.layout,
            "replaced": [x.name for x in h.replaced],
        },
        "batch": {
            "path": str(batch_path) if batch_path else None,
            "sha256": sha256(batch_path),
            "images": r.batch.num_images,
            "levels": r.batch.levels,
            "strides": r.batch.strides,
            "pad_size": list(r.batch.pad_size),
            "image_sizes": [list(s) for s in r.batch.image_sizes],
            "meta": _plain(r.batch.meta),
            "replaced": [x.name for x in r.batch.replaced],
        },
        "heads": {
            "channels": h.channels,
            "anchors": h.num_anchors,
            "classes": h.num_classes,
            "background": h.background,
            "pool": h.pool_size,
            "reg_classes": h.reg_classes,
        },
        "config": to_dict(r.config),
        "profiles": {name: to_dict(pl.profile) for name, pl in r.losses.items()},
        "seed": r.seed,
        "sample_all": r.sample_all,
        "symptom": {
            "score_thr": d.symptom.score_thr,
            "detections": d.symptom.detections,
            "max_fg_score": d.symptom.max_fg_score,
            "objectness_above_half": d.symptom.objectness_above_half,
        },
    }
    tables = {
        "levels": level_rows(d),
        "images": image_rows(d),
        "params": param_rows(d),
        "profiles": profile_rows(d),
        "origins": [dataclasses.asdict(o) for o in d.origins],
    }
    findings = [
        {
            k: getattr(f, k)
            for k in (
                "severity",
                "code",
                "head",
                "level",
                "profile",
                "image",
                "message",
                "evidence",
                "fix",
            )
        }
        for f in d.findings
    ]
    return Report(meta, tables, findings)
