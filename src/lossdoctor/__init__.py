"""lossdoctor: replay and diagnose the RPN and RoI losses of a Faster R-CNN FPN detector.

The library is importable without the CLI; heavy modules load on first use.
"""
__version__ = "0.1.0"

__all__ = ["dump_batch", "load_batch", "load_checkpoint", "replay", "run_replay", "InputError", "__version__"]


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
    if name == "run_replay":
        from .api import run_replay

        return run_replay
    raise AttributeError(name)
