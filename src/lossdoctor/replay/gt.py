"""The GT the heads train on: not ignored, finite, with a label the checkpoint knows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs.batch import Batch


@dataclass(frozen=True, kw_only=True)
class DroppedLabel:
    """A finite, not-ignored GT box left out for its label (outside 0..K-1)."""

    image: int
    box: int  # index in the dump's gt_boxes[image]
    label: int


@dataclass(kw_only=True)
class UsableGt:
    """Per image: boxes Tensor[G_i, 4], labels Tensor[G_i], and ``sources`` Tensor[G_i], each
    usable box's index in the dump's ``gt_boxes[i]``."""

    boxes: list[Tensor]
    labels: list[Tensor]
    sources: list[Tensor]
    dropped_labels: list[DroppedLabel]

    def dump_index(self, image: int, g: int) -> int:
        """The dump's index of usable box ``g`` of ``image``."""
        return int(self.sources[image][g])


def usable_gt(batch: Batch, num_classes: int) -> UsableGt:
    """GT the heads can train on: not ignored, finite coordinates, label in 0..K-1.

    Non-finite boxes are left out too; the batch records them as the ``nonfinite-gt`` suspicion.
    """
    out = UsableGt(boxes=[], labels=[], sources=[], dropped_labels=[])
    for i, (b, lab, ig) in enumerate(zip(batch.gt_boxes, batch.gt_labels, batch.gt_ignore)):
        ok_label = (lab >= 0) & (lab < num_classes)
        candidate = torch.isfinite(b).all(1) & ~ig
        for j in (candidate & ~ok_label).nonzero().flatten().tolist():
            out.dropped_labels.append(DroppedLabel(image=i, box=j, label=int(lab[j])))
        keep = candidate & ok_label
        out.boxes.append(b[keep])
        out.labels.append(lab[keep])
        out.sources.append(keep.nonzero().flatten())
    return out
