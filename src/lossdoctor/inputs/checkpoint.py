"""Checkpoints: find the RPN and box-head weights, whatever the framework's key names.

Checkpoints are untrusted. They are read by :mod:`.torchfile`, which rebuilds only tensors and
plain containers and replaces every other object by an inert placeholder (reported in
``HeadWeights.replaced``). No code from the file runs unless ``unsafe=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .batch import BATCH_FORMAT
from .errors import InputError
from .torchfile import Loaded, Placeholder, Replaced, noting_payloads, read_file

# canonical name -> key suffix, per layout. "conv" has two torchvision spellings (pre-v2 and v2).
LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "torchvision": {
        "rpn_conv": ("rpn.head.conv.0.0", "rpn.head.conv"),
        "rpn_cls": ("rpn.head.cls_logits",),
        "rpn_reg": ("rpn.head.bbox_pred",),
        "fc1": ("roi_heads.box_head.fc6",),
        "fc2": ("roi_heads.box_head.fc7",),
        "cls": ("roi_heads.box_predictor.cls_score",),
        "reg": ("roi_heads.box_predictor.bbox_pred",),
    },
    "mmdet": {
        "rpn_conv": ("rpn_head.rpn_conv",),
        "rpn_cls": ("rpn_head.rpn_cls",),
        "rpn_reg": ("rpn_head.rpn_reg",),
        "fc1": ("roi_head.bbox_head.shared_fcs.0",),
        "fc2": ("roi_head.bbox_head.shared_fcs.1",),
        "cls": ("roi_head.bbox_head.fc_cls",),
        "reg": ("roi_head.bbox_head.fc_reg",),
    },
    "detectron2": {
        "rpn_conv": ("proposal_generator.rpn_head.conv",),
        "rpn_cls": ("proposal_generator.rpn_head.objectness_logits",),
        "rpn_reg": ("proposal_generator.rpn_head.anchor_deltas",),
        "fc1": ("roi_heads.box_head.fc1",),
        "fc2": ("roi_heads.box_head.fc2",),
        "cls": ("roi_heads.box_predictor.cls_score",),
        "reg": ("roi_heads.box_predictor.bbox_pred",),
    },
}
# Where each layout keeps the background logit.
BACKGROUND = {"torchvision": "first", "mmdet": "last", "detectron2": "last"}
PARTS = ("rpn_conv", "rpn_cls", "rpn_reg", "fc1", "fc2", "cls", "reg")


@dataclass
class HeadWeights:
    """The RPN head and box head parameters, in canonical names.

    params: ``{part}.weight`` / ``{part}.bias`` for part in PARTS:
    rpn_conv Tensor[C, C, 3, 3]; rpn_cls Tensor[A, C, 1, 1]; rpn_reg Tensor[4A, C, 1, 1];
    fc1 Tensor[F, C*P*P]; fc2 Tensor[F, F]; cls Tensor[K+1, F]; reg Tensor[4K', F].
    """

    params: dict[str, Tensor]
    layout: str
    keys: dict[str, str]  # canonical name -> key in the file
    background: str  # "first" or "last"
    replaced: list[Replaced] = field(default_factory=list)  # globals the file named, not rebuilt

    @property
    def channels(self) -> int:
        return self.params["rpn_conv.weight"].shape[1]

    @property
    def num_anchors(self) -> int:
        return self.params["rpn_cls.weight"].shape[0]

    @property
    def num_logits(self) -> int:
        return self.params["cls.weight"].shape[0]

    @property
    def num_classes(self) -> int:
        """Foreground classes K (the background logit excluded)."""
        return self.num_logits - 1

    @property
    def pool_size(self) -> int:
        """RoIAlign output side P, from fc1's input size C * P * P."""
        return round((self.params["fc1.weight"].shape[1] / self.channels) ** 0.5)

    @property
    def bg_col(self) -> int:
        return 0 if self.background == "first" else self.num_classes

    @property
    def reg_classes(self) -> int:
        """Class slots in the box regressor: 1 (agnostic), K, or K+1 (with a background slot)."""
        return self.params["reg.weight"].shape[0] // 4

    def fg_logit(self, labels: Tensor) -> Tensor:
        """Foreground class 0..K-1 → its column in the class logits."""
        return labels + 1 if self.background == "first" else labels

    def reg_slot(self, labels: Tensor) -> Tensor:
        """Foreground class 0..K-1 → its slot in the box regressor Tensor[R, reg_classes, 4]."""
        if self.reg_classes == 1:
            return torch.zeros_like(labels)
        if self.reg_classes == self.num_logits:
            return self.fg_logit(labels)
        return labels


def _read(path: Path, unsafe: bool) -> Loaded:
    if path.suffix == ".safetensors":
        return Loaded(_read_safetensors(path), [], "safetensors")
    if unsafe:
        try:
            return Loaded(torch.load(path, map_location="cpu", weights_only=False), [], "unsafe")
        except Exception as e:  # --unsafe-load: torch's own errors, in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise InputError(
                f"{path} could not be loaded even with --unsafe-load ({first})"
            ) from None
    try:
        return read_file(path)
    except InputError as e:
        raise InputError(f"{path} is not a torch checkpoint ({e}); check the file") from None


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise InputError(
            f"{path} is a .safetensors file; install the 'safetensors' package to read it"
        ) from None
    try:
        return load_file(str(path))
    except Exception as e:
        raise InputError(
            f"{path} is not a readable .safetensors file ({e}); check the file"
        ) from None


def _refuse_foreign(obj, path: Path) -> None:
    """Clear words for a batch dump passed as the checkpoint, or a whole pickled model."""
    if isinstance(obj, dict) and obj.get("format") == BATCH_FORMAT:
        raise InputError(
            f"{path} is a lossdoctor batch dump, not a checkpoint; pass it as BATCH (after CKPT)"
        )
    inner = obj.get("model", obj) if isinstance(obj, dict) else obj
    if _is_module(inner):
        raise InputError(
            f"{path} holds a whole pickled model (torch.save(model)), which cannot be read without running "
            "its code; save its weights instead: torch.save(model.state_dict(), PATH)"
        )


def _is_module(obj) -> bool:
    if isinstance(obj, torch.nn.Module):
        return False  # loaded with --unsafe-load: its state_dict is used
    state = getattr(obj, "state", None)
    return isinstance(obj, Placeholder) and isinstance(state, dict) and "_modules" in state


def _state_dict(obj) -> dict[str, Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and any(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors:
            return {k[7:] if k.startswith("module.") else k: v for k, v in tensors.items()}
    raise InputError(
        "the checkpoint holds no state_dict of tensors (plain, or under 'model' / 'state_dict'); save model.state_dict()"
    )


def _find(sd: dict[str, Tensor], layout: str) -> dict[str, str] | None:
    keys = {}
    for part, prefixes in LAYOUTS[layout].items():
        for prefix in prefixes:
            if f"{prefix}.weight" in sd:
                keys[part] = prefix
                break
        else:
            return None
    return keys


def heads_from_state_dict(
    sd: dict[str, Tensor], layout: str | None = None, replaced=()
) -> HeadWeights:
    """Pick the head weights out of a state_dict; ``layout`` None = detect from key names."""
    layouts = [layout] if layout else list(LAYOUTS)
    for name in layouts:
        keys = _find(sd, name)
        if keys is None:
            continue
        params = {}
        for part, prefix in keys.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"{prefix}.{kind}")
                if t is None:
                    raise InputError(
                        f"checkpoint key '{prefix}.{kind}' is missing; the {name} head needs it"
                    )
                params[f"{part}.{kind}"] = t.detach().float()
        heads = HeadWeights(params, name, keys, BACKGROUND[name], list(replaced))
        check_heads(heads)
        return heads
    want = ", ".join(f"{n}: '{LAYOUTS[n]['rpn_cls'][0]}.weight'" for n in layouts)
    raise InputError(
        f"no RPN/box head found in the checkpoint (looked for {want}); is this a Faster R-CNN FPN checkpoint?"
    )


def check_heads(h: HeadWeights) -> None:
    """Shapes must form one consistent Faster R-CNN head."""
    p = h.params
    c = p["rpn_conv.weight"].shape
    expect = {
        "rpn_conv.weight": (c[0], c[0], 3, 3),
        "rpn_cls.weight": (h.num_anchors, c[0], 1, 1),
        "rpn_reg.weight": (4 * h.num_anchors, c[0], 1, 1),
    }
    for name, shape in expect.items():
        if tuple(p[name].shape) != shape:
            raise InputError(
                f"checkpoint '{h.keys[name.split('.')[0]]}.weight' has shape {list(p[name].shape)}, expected {list(shape)}"
            )
    fc_in = p["fc1.weight"].shape[1]
    if h.pool_size**2 * h.channels != fc_in:
        raise InputError(
            f"box head input {fc_in} is not channels ({h.channels}) x P x P for any P; check the checkpoint"
        )
    if h.reg_classes not in (1, h.num_classes, h.num_logits) or p["reg.weight"].shape[0] % 4:
        raise InputError(
            f"box regressor has {p['reg.weight'].shape[0]} outputs, expected 4, 4K or 4(K+1) with K+1 = {h.num_logits}"
        )


def load_checkpoint(
    path: str | Path, layout: str | None = None, unsafe: bool = False
) -> HeadWeights:
    """Load the head weights of a checkpoint file without running code from it."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"checkpoint file {p} does not exist; check the path")
    loaded = _read(p, unsafe)
    _refuse_foreign(loaded.obj, p)
    try:
        return heads_from_state_dict(_state_dict(loaded.obj), layout, loaded.replaced)
    except InputError as e:
        raise noting_payloads(InputError(f"{p}: {e}"), loaded.replaced) from None


def check_fit(heads: HeadWeights, batch, config) -> None:
    """The checkpoint's heads and the config must accept the batch's features."""
    if heads.channels != batch.channels:
        raise InputError(
            f"checkpoint heads take {heads.channels} channels but the batch features have {batch.channels}; "
            "dump the FPN outputs that feed these heads"
        )
    levels = len(batch.levels)
    if len(config.anchors.sizes) < levels:
        raise InputError(
            f"the batch has {levels} levels but config '{config.name}' has anchor sizes for {len(config.anchors.sizes)}; "
            "add sizes to [anchors] in a config TOML"
        )
    a = len(config.anchors.ratios) * len(config.anchors.sizes[0])
    if a != heads.num_anchors:
        raise InputError(
            f"checkpoint RPN predicts {heads.num_anchors} anchors per location but config '{config.name}' makes {a}; "
            "set [anchors] ratios/sizes in a config TOML"
        )
