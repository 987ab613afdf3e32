"""lossdoctor: replay and diagnose the RPN and RoI losses of a Faster R-CNN FPN detector.

The library is importable without the CLI; heavy modules (torch) load on first use of a name.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_WHERE = {
    # inspect, compare and replay
    "inspect": "api", "compare": "api", "run_replay": "api", "ReplayOptions": "options",
    "replay": "replay.engine", "Replay": "replay.engine",
    "diagnose": "diagnose", "Diagnosis": "diagnose",
    "Finding": "diagnose.finding", "Rule": "diagnose.findings", "RULES": "diagnose.findings",
    "FindingGroup": "diagnose.groups",
    "Report": "report.model", "ScanReport": "report.model",
    "CompareResult": "report.compare", "Comparison": "report.compare",
    # inputs
    "dump_batch": "inputs.batch", "load_batch": "inputs.batch", "Batch": "inputs.batch",
    "load_checkpoint": "inputs.checkpoint", "HeadWeights": "inputs.checkpoint",
    "load_config": "inputs.config", "preset": "inputs.config", "DetectorConfig": "inputs.config",
    "load_profile": "inputs.profiles", "LossProfile": "inputs.profiles",
    "TermSpec": "inputs.profiles",
    "InputError": "inputs.errors",
    "Capture": "capture",
    # one-stage dense heads
    "dense_replay": "replay.dense", "DenseReplay": "replay.dense",
    "dense_weights": "inputs.dense_weights", "find_dense_layout": "inputs.dense_weights",
    "DenseWeights": "inputs.dense_weights", "DenseConfig": "inputs.dense",
    "DenseProfile": "inputs.dense", "DenseTerm": "inputs.dense", "dense_preset": "inputs.dense",
    "load_dense_config": "inputs.dense",
    # the vocabulary
    "Head": "vocab", "Part": "vocab", "Term": "vocab", "Normalizer": "vocab", "Severity": "vocab",
    "FailOn": "vocab", "LossKind": "vocab", "Empty": "vocab", "Layer": "vocab", "Layout": "vocab",
    "Framework": "vocab", "Stage": "vocab", "DenseKind": "vocab", "DenseNormalizer": "vocab",
}  # fmt: skip
__all__ = sorted([*_WHERE, "__version__"])


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'lossdoctor' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return list(__all__)
