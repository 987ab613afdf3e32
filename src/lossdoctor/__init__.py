"""lossdoctor: replay and diagnose the RPN and RoI losses of a Faster R-CNN FPN detector.

The library is importable without the CLI; heavy modules load on first use.
"""

__version__ = "0.1.0"

__all__ = [
    "dump_batch",
    "load_batch",
    "load_checkpoint",
    "replay",
    "run_replay",
    "inspect",
    "compare",
    "Report",
    "Capture",
    "InputError",
    "__version__",
]


def __getattr__(name):
    if name in ("dump_batch", "load_batch"):
        from .inputs import batch

        return getattr(batch, name)
    if name == "load_checkpoint":
        from .inputs.checkpoint import load_checkpoint

        return load_checkpoint
    if name == "InputError":
        from .inputs.errors import InputError

        return InputError
    if name == "replay":
        from .replay.engine import replay

        return replay
    if name in ("run_replay", "inspect"):
        from . import api

        return getattr(api, name)
    if name == "compare":
        from .report.compare import compare

        return compare
    if name == "Capture":
        from .capture import Capture

        return Capture
    if name == "Report":
        from .report.model import Report

        return Report
    raise AttributeError(name)
