"""What a report records besides its tables: versions, inputs, the detector and profiles, the
symptom and the run, as typed records (``serialize`` writes and reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..inputs.config import DetectorConfig
from ..inputs.dense import DenseProfile
from ..inputs.profiles import LossProfile
from ..vocab import (
    Background,
    DenseKind,
    LossKind,
    Precision,
    PrecisionSource,
    ProfileSource,
)


@dataclass(kw_only=True)
class NormsSeen:
    """The gradient norms the capture saw (unscaled): the whole model's, the heads', and the loss
    scale it divided by under AMP."""

    model: float | None = None
    heads: float | None = None
    loss_scale: float | None = None


@dataclass(kw_only=True)
class DumpRecord:
    """What the report reads of the dump's own ``meta`` (the whole of it is kept beside)."""

    step: int | None = None
    iteration: int | None = None
    rank: int | None = None
    world_size: int | None = None
    run: str | None = None
    reason: str | None = None
    grad_norm: NormsSeen | None = None


@dataclass(kw_only=True)
class CheckpointMeta:
    path: str | None
    sha256: str | None
    layout: str
    replaced: list[str] = field(default_factory=list)
    unreplayed: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class BatchMeta:
    path: str | None
    sha256: str | None
    images: int
    levels: list[str]
    strides: list[int]
    pad_size: list[int]
    image_sizes: list[list[int]]
    meta: dict  # the dump's meta as recorded (JSON-safe)
    replaced: list[str] = field(default_factory=list)
    dump: DumpRecord = field(default_factory=DumpRecord, metadata={"derived": True})


@dataclass(kw_only=True)
class HeadsMeta:
    channels: int
    anchors: int
    classes: int
    background: Background
    pool: int
    reg_classes: int


@dataclass(kw_only=True)
class SymptomMeta:
    score_thr: float
    detections: list[int]
    max_fg_score: list[float]
    objectness_above_half: float
    chance: float | None = None
    step: int | None = None


@dataclass(kw_only=True)
class RunMeta:
    """The run the dump came from: the profile replayed first, where the run's own came from
    (``own``: None when unknown), its framework, step and rank."""

    profile: str
    source: ProfileSource
    own: str | None = None
    framework: str | None = None
    step: int | None = None
    rank: int | None = None


@dataclass(kw_only=True)
class PrecisionMeta:
    """The precision the heads were replayed in, where it came from and the run's own; the
    dump's loss scaler (scale, growth tracker, steps skipped so far, whether it found a
    non-finite gradient at this step); and the scale analysis: the largest |gradient| of the
    heads' low-precision tensors at scale 1 (``grad_max``, in ``grad_max_in``), the largest safe
    scale, and whether the dump's scale overflows (the step GradScaler skips)."""

    precision: Precision
    source: PrecisionSource
    run: Precision
    loss_scale: float | None = None
    growth_tracker: int | None = None
    skipped: int | None = None
    found_inf: bool | None = None
    grad_max: float | None = None
    grad_max_in: str | None = None
    safe_scale: float | None = None
    overflows: bool | None = None


@dataclass(kw_only=True)
class RankMeta:
    """One rank of a multi-rank step: its batch and symptom."""

    rank: int
    batch: BatchMeta
    symptom: SymptomMeta


@dataclass(kw_only=True)
class DenseMeta:
    """A one-stage detector's report: its preset (the replayed config), head, profiles and
    Detectron2's running normalizer."""

    preset: str
    kind: DenseKind
    classes: int
    anchors: int  # per location
    convs: int  # per tower
    norm: bool  # GroupNorm after each tower conv
    centerness: bool
    box_loss: LossKind
    profiles: dict[str, DenseProfile]
    positives: int  # the batch's, all levels
    ctr_sum: float = 0.0  # the positives' centerness targets summed
    pseudo: int = 0  # the sum over images of max(#pos, 1) (MMDetection's PseudoSampler count)
    ema_before: float | None = None  # the running normalizer before this step (recorded)
    ema: float | None = None  # after this step's update: what the EMA profile divides by
    # a multi-rank step's: the counts per rank its reduced (reduce_mean) terms divided by
    world_pos: float | None = field(default=None, metadata={"omit_none": True})
    world_ctr_sum: float | None = field(default=None, metadata={"omit_none": True})
    world_pseudo: float | None = field(default=None, metadata={"omit_none": True})


@dataclass(kw_only=True)
class ReportMeta:
    lossdoctor: str
    torch: str
    created: str
    checkpoint: CheckpointMeta
    batch: BatchMeta
    heads: HeadsMeta | None  # None for a one-stage detector (see dense)
    config: DetectorConfig | None
    profiles: dict[str, LossProfile]
    seed: int
    sample_all: bool
    symptom: SymptomMeta
    run: RunMeta | None = None
    # a multi-rank step's report: every rank's batch and symptom, and the world size
    ranks: list[RankMeta] = field(default_factory=list, metadata={"omit_empty": True})
    world_size: int | None = field(default=None, metadata={"omit_none": True})
    # a replay in a low precision, or one asked for (--precision)
    precision: PrecisionMeta | None = field(default=None, metadata={"omit_none": True})
    dense: DenseMeta | None = field(default=None, metadata={"omit_none": True})

    @property
    def own(self) -> str | None:
        """The run's own profile, where the report knows it."""
        return self.run.own if self.run is not None else None


@dataclass(kw_only=True)
class ScanInfo:
    """How a scan ran: what it scanned, with which options and workers, and how many dumps."""

    inputs: list[str]
    batch: str | None
    options: dict
    workers: int
    threads: int
    ray: str | None
    results: str
    dumps: int
    cached: int


@dataclass(kw_only=True)
class ScanMeta:
    lossdoctor: str
    torch: str
    created: str
    scan: ScanInfo
