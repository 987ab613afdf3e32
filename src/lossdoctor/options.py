"""The options of one replay, shared by ``inspect``, ``compare`` and ``scan``: the library takes
them as one object, the CLI builds it once from its shared option declarations."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .vocab import Precision


@dataclass(frozen=True, kw_only=True)
class ReplayOptions:
    """``config``: a preset name, a TOML path or a DetectorConfig (None: the dump's, else the
    checkpoint layout's preset). ``old``: the run's profile (None: the dump's, else legacy);
    ``new``: the what-if (None: fixed); each a name, a TOML path or a LossProfile; ``profiles``
    (a list) replaces both. ``seed`` None takes the dump's ``meta["sample_seed"]``, else 0.
    ``sample_all``: every candidate sampled; ``score_thr``: the symptom's score threshold;
    ``unsafe_load``: rebuild the objects a legacy file names (see docs/inputs.md);
    ``precision``: the heads' layers in fp32, fp16 or bf16 (None: the dump's autocast dtype,
    else fp32)."""

    config: object = None
    old: object = None
    new: object = None
    profiles: list | None = None
    seed: int | None = None
    sample_all: bool = False
    score_thr: float | None = None
    unsafe_load: bool = False
    precision: Precision | None = None

    def plain(self) -> dict:
        """As plain values (paths as strings; ``profiles`` only where given): what a scan's
        workers receive, its results are keyed by, and its report records."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "profiles" and value is None:
                continue
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def options_of(options: ReplayOptions | None, fields: dict) -> ReplayOptions:
    """``options``, or one made of keyword ``fields`` (the library's calls spelled out)."""
    if options is not None and fields:
        raise TypeError(f"pass ReplayOptions or keyword options, not both ({', '.join(fields)})")
    return options if options is not None else ReplayOptions(**fields)
