"""The GT the heads train on: not ignored, finite, with a label the checkpoint knows, or the
run's own background label (torchvision's 0), which its RPN trains as an object and its RoI head as
background."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..inputs.batch import Batch

# the label of a GT box the run labelled with its background class: its matches train as background
BACKGROUND_GT = -1


@dataclass(frozen=True, kw_only=True)
class DroppedLabel:
    """A finite, not-ignored GT box left out for its label (outside 0..K-1)."""

    image: int
    box: int  # index in the dump's gt_boxes[image]
    label: int


@dataclass(kw_only=True)
class UsableGt:
    """Per image: boxes Tensor[G_i, 4], labels Tensor[G_i] (``BACKGROUND_GT`` for a box labelled
    with the run's background), and ``sources`` Tensor[G_i], each usable box's index in the dump's
    ``gt_boxes[i]``."""

    boxes: list[Tensor]
    labels: list[Tensor]
    sources: list[Tensor]
    dropped_labels: list[DroppedLabel]
    background_labels: list[DroppedLabel] = field(default_factory=list)  # kept, as background

    def dump_index(self, image: int, g: int) -> int:
        """The dump's index of usable box ``g`` of ``image``."""
        return int(self.sources[image][g])


def usable_gt(batch: Batch, num_classes: int) -> UsableGt:
    """GT the heads can train on: not ignored, finite coordinates, label in 0..K-1 or the run's
    background label (kept as ``BACKGROUND_GT``, as torchvision trains its label 0).

    Non-finite boxes are left out too; the batch records them as the ``nonfinite-gt`` suspicion.
    """
    out = UsableGt(boxes=[], labels=[], sources=[], dropped_labels=[])
    bg = batch.label_space.dump_background
    for i, (b, lab, ig) in enumerate(zip(batch.gt_boxes, batch.gt_labels, batch.gt_ignore)):
        background = lab == bg if bg is not None else torch.zeros_like(lab, dtype=torch.bool)
        ok_label = (lab >= 0) & (lab < num_classes)
        candidate = torch.isfinite(b).all(1) & ~ig
        for j in (candidate & ~ok_label).nonzero().flatten().tolist():
            to = out.background_labels if background[j] else out.dropped_labels
            to.append(DroppedLabel(image=i, box=j, label=int(lab[j])))
        keep = candidate & (ok_label | background)
        out.boxes.append(b[keep])
        out.labels.append(torch.where(background, BACKGROUND_GT, lab)[keep])
        out.sources.append(keep.nonzero().flatten())
    return out
