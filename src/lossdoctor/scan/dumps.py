"""The dumps a scan covers: capture directories, the rank folders of a step, folders of steps,
or checkpoints replayed on one batch."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..capture import BATCH_FILE, CHECKPOINT_FILE
from ..inputs.errors import InputError

STEP_FOLDER = re.compile(r"step_(\d+)")
RANK_FOLDER = re.compile(r"rank_(\d+)")


@dataclass(frozen=True)
class Dump:
    """One replay of a scan: a checkpoint and a batch, at a step and rank of a run (from the
    folder names: the run is the folder holding its step folders, or a capture directory of its
    own; the dump's own meta overrides them once read)."""

    checkpoint: str
    batch: str
    step: int | None
    rank: int | None
    run: str | None = None

    def fingerprint(self, options: dict) -> str:
        """Changes when the files or the replay options do: the key of its cached result."""
        stats = [(p, Path(p).stat().st_size, Path(p).stat().st_mtime_ns)
                 for p in (self.checkpoint, self.batch)]  # fmt: skip
        text = json.dumps([stats, options], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        step = "?" if self.step is None else self.step
        return f"step {step} rank {self.rank or 0}"


def _number(pattern: re.Pattern, name: str) -> int | None:
    m = pattern.fullmatch(name)
    return int(m.group(1)) if m else None


def _is_capture(folder: Path) -> bool:
    return (folder / CHECKPOINT_FILE).is_file() and (folder / BATCH_FILE).is_file()


def _run(step_folder: Path, step: int | None) -> str:
    """The run a step folder belongs to: the folder holding it (a folder not named step_K is a
    run of its own)."""
    return str(step_folder.parent if step is not None else step_folder)


def _capture(folder: Path, step: int | None, rank: int | None, run: str) -> Dump:
    return Dump(str(folder / CHECKPOINT_FILE), str(folder / BATCH_FILE), step, rank, run)


def _ranks(folder: Path, step: int | None) -> list[Dump]:
    """The rank captures of a step folder."""
    found = []
    for d in sorted(folder.iterdir()):
        rank = _number(RANK_FOLDER, d.name)
        if rank is not None and d.is_dir() and _is_capture(d):
            found.append(_capture(d, step, rank, _run(folder, step)))
    return sorted(found, key=lambda x: x.rank)


def _in_folder(folder: Path) -> list[Dump]:
    """A capture directory, a step folder of ranks, or a folder of those."""
    step = _number(STEP_FOLDER, folder.name)
    if _is_capture(folder):
        return [_capture(folder, step, None, _run(folder, step))]
    ranks = _ranks(folder, step)
    if ranks:
        return ranks
    inner = [d for d in sorted(folder.iterdir()) if d.is_dir()]
    found = [x for d in inner if _is_capture(d) or _ranks(d, None) for x in _in_folder(d)]
    if not found and (folder / BATCH_FILE).is_file():
        raise InputError(
            f"{folder} holds {BATCH_FILE} but no {CHECKPOINT_FILE}: scan checkpoints on that "
            f"batch with lossdoctor scan CKPT... --batch {folder / BATCH_FILE}"
        )
    if not found:
        raise InputError(
            f"{folder} holds no capture directory ({CHECKPOINT_FILE} + {BATCH_FILE}), no rank_K "
            "folders and no folders of them; pass what the capture hook writes"
        )
    return found


def find_dumps(paths: list[str | Path], batch: str | Path | None = None) -> list[Dump]:
    """Every dump under ``paths``, in run, step, then rank order. With ``batch``, ``paths`` are
    checkpoints, each replayed on that one batch (their order is the step order)."""
    if batch is not None:
        missing = [p for p in (*paths, batch) if not Path(p).is_file()]
        if missing:
            raise InputError(f"{missing[0]} is not a file; with --batch, pass checkpoint files")
        return [Dump(str(p), str(batch), k, None) for k, p in enumerate(paths)]
    found: list[Dump] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise InputError(
                f"{p} is not a folder; pass capture directories (or checkpoints with --batch)"
            )
        found += _in_folder(p)
    unique = list(dict.fromkeys(found))
    return sorted(unique, key=lambda d: (d.run or "", d.step is None, d.step or 0, d.rank or 0))
