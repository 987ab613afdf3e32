"""The library's front door: paths or objects in, a replay (and later a report) out."""
from __future__ import annotations

from pathlib import Path

from .inputs.batch import Batch, load_batch
from .inputs.checkpoint import HeadWeights, check_fit, load_checkpoint
from .inputs.config import DetectorConfig, load_config, preset
from .inputs.profiles import LossProfile, load_profile


def resolve_inputs(checkpoint, batch, config=None, unsafe_load: bool = False) -> tuple[HeadWeights, Batch, DetectorConfig]:
    """Load what is given as paths; the checkpoint layout picks the preset unless ``config`` says otherwise."""
    heads = checkpoint if isinstance(checkpoint, HeadWeights) else load_checkpoint(checkpoint, unsafe=unsafe_load)
    batch = batch if isinstance(batch, Batch) else load_batch(batch)
    if config is None:
        config = preset(heads.layout)
    elif not isinstance(config, DetectorConfig):
        config = load_config(config)
    check_fit(heads, batch, config)
    return heads, batch, config


def run_replay(checkpoint: str | Path | HeadWeights, batch: str | Path | Batch, *,
               config: str | Path | DetectorConfig | None = None,
               profiles=("legacy", "fixed"), seed: int = 0, sample_all: bool = False, unsafe_load: bool = False):
    """Replay ``batch`` through the checkpoint's heads under each profile → :class:`~lossdoctor.replay.engine.Replay`.

    ``profiles`` are built-in names, TOML paths or :class:`LossProfile` objects.
    """
    from .replay.engine import replay

    heads, batch, config = resolve_inputs(checkpoint, batch, config, unsafe_load)
    profs = [p if isinstance(p, LossProfile) else load_profile(p) for p in profiles]
    return replay(heads, batch, config, profs, seed=seed, sample_all=sample_all)
