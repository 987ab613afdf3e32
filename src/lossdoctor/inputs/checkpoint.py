"""Checkpoints: find the RPN and box-head weights, whatever the framework's key names.

Checkpoints are untrusted. They are read by :mod:`.torchfile`, which rebuilds only tensors and
plain containers and replaces every other object by an inert placeholder (reported in
``HeadWeights.replaced``). No code from the file runs unless ``unsafe=True``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..vocab import BIAS, WEIGHT, Background, Layer, Layout, param
from .batch import BATCH_FORMAT
from .checks import as_member
from .errors import InputError
from .torchfile import Loaded, Placeholder, Replaced, noting_payloads, read_file

# Key prefix of each layer, per layout. The torchvision RPN conv has two spellings (pre-v2, v2).
LAYOUTS: dict[Layout, dict[Layer, tuple[str, ...]]] = {
    Layout.TORCHVISION: {
        Layer.RPN_CONV: ("rpn.head.conv.0.0", "rpn.head.conv"),
        Layer.RPN_LOGITS: ("rpn.head.cls_logits",),
        Layer.RPN_DELTAS: ("rpn.head.bbox_pred",),
        Layer.BOX_FC1: ("roi_heads.box_head.fc6",),
        Layer.BOX_FC2: ("roi_heads.box_head.fc7",),
        Layer.BOX_LOGITS: ("roi_heads.box_predictor.cls_score",),
        Layer.BOX_DELTAS: ("roi_heads.box_predictor.bbox_pred",),
    },
    Layout.MMDET: {
        Layer.RPN_CONV: ("rpn_head.rpn_conv",),
        Layer.RPN_LOGITS: ("rpn_head.rpn_cls",),
        Layer.RPN_DELTAS: ("rpn_head.rpn_reg",),
        Layer.BOX_FC1: ("roi_head.bbox_head.shared_fcs.0",),
        Layer.BOX_FC2: ("roi_head.bbox_head.shared_fcs.1",),
        Layer.BOX_LOGITS: ("roi_head.bbox_head.fc_cls",),
        Layer.BOX_DELTAS: ("roi_head.bbox_head.fc_reg",),
    },
    Layout.DETECTRON2: {
        Layer.RPN_CONV: ("proposal_generator.rpn_head.conv",),
        Layer.RPN_LOGITS: ("proposal_generator.rpn_head.objectness_logits",),
        Layer.RPN_DELTAS: ("proposal_generator.rpn_head.anchor_deltas",),
        Layer.BOX_FC1: ("roi_heads.box_head.fc1",),
        Layer.BOX_FC2: ("roi_heads.box_head.fc2",),
        Layer.BOX_LOGITS: ("roi_heads.box_predictor.cls_score",),
        Layer.BOX_DELTAS: ("roi_heads.box_predictor.bbox_pred",),
    },
}
# Where each layout keeps the background logit.
BACKGROUND = {
    Layout.TORCHVISION: Background.FIRST,
    Layout.MMDET: Background.LAST,
    Layout.DETECTRON2: Background.LAST,
}
# 3 x 3 RPN conv, 1 x 1 predictors
RPN_CONV_KERNEL, PREDICTOR_KERNEL = 3, 1
BOX_COORDS = 4
# values per step of the whole-checkpoint NaN/Inf scan
SCAN_CHUNK = 1 << 22


@dataclass(kw_only=True)
class HeadWeights:
    """The RPN head and box head parameters, by canonical name (``param(layer, kind)``).

    rpn_conv Tensor[C, C, 3, 3]; rpn_logits Tensor[A, C, 1, 1]; rpn_deltas Tensor[4A, C, 1, 1];
    box_fc1 Tensor[F, C*P*P]; box_fc2 Tensor[F, F]; box_logits Tensor[K+1, F];
    box_deltas Tensor[4K', F] (K' = 1, K or K+1).
    """

    params: dict[str, Tensor]
    layout: Layout
    keys: dict[Layer, str]  # layer -> its key prefix in the file
    background: Background
    replaced: list[Replaced] = field(default_factory=list)  # globals the file named, not rebuilt
    # file key -> its NaN/Inf values, for every tensor of the file outside the heads (backbone,
    # neck, other heads) that has any
    nonfinite_elsewhere: dict[str, int] = field(default_factory=dict)

    def weight(self, layer: Layer) -> Tensor:
        return self.params[param(layer, WEIGHT)]

    def bias(self, layer: Layer) -> Tensor:
        return self.params[param(layer, BIAS)]

    def file_key(self, name: str) -> str:
        """The key of a canonical parameter name (``rpn_logits.weight``) in the file."""
        layer, kind = name.split(".")
        return f"{self.keys[Layer(layer)]}.{kind}"

    @property
    def channels(self) -> int:
        return self.weight(Layer.RPN_CONV).shape[1]

    @property
    def num_anchors(self) -> int:
        return self.weight(Layer.RPN_LOGITS).shape[0]

    @property
    def num_logits(self) -> int:
        return self.weight(Layer.BOX_LOGITS).shape[0]

    @property
    def num_classes(self) -> int:
        """Foreground classes K (the background logit excluded)."""
        return self.num_logits - 1

    @property
    def pool_size(self) -> int:
        """RoIAlign output side P, from fc1's input size C * P * P."""
        return round((self.weight(Layer.BOX_FC1).shape[1] / self.channels) ** 0.5)

    @property
    def bg_col(self) -> int:
        return 0 if self.background is Background.FIRST else self.num_classes

    @property
    def reg_classes(self) -> int:
        """Class slots in the box regressor: 1 (agnostic), K, or K+1 (with a background slot)."""
        return self.weight(Layer.BOX_DELTAS).shape[0] // BOX_COORDS

    def fg_logit(self, labels: Tensor) -> Tensor:
        """Foreground class 0..K-1 → its column in the class logits."""
        return labels + 1 if self.background is Background.FIRST else labels

    def reg_slot(self, labels: Tensor) -> Tensor:
        """Foreground class 0..K-1 → its slot in the box regressor Tensor[R, reg_classes, 4]."""
        if self.reg_classes == 1:
            return torch.zeros_like(labels)
        if self.reg_classes == self.num_logits:
            return self.fg_logit(labels)
        return labels

    def detached(self) -> HeadWeights:
        """The same heads with every parameter detached (for test-mode passes)."""
        params = {k: v.detach() for k, v in self.params.items()}
        return dataclasses.replace(self, params=params)


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
            f"{path} holds a whole pickled model (torch.save(model)), which cannot be read without "
            "running its code; save its weights instead: torch.save(model.state_dict(), PATH)"
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
        "the checkpoint holds no state_dict of tensors (plain, or under 'model' / 'state_dict'); "
        "save model.state_dict()"
    )


def nonfinite_values(t: Tensor) -> int:
    """NaN/Inf values of ``t`` (0 for integer tensors), counted a chunk at a time so a large
    mapped tensor is read once, without a mask of its size."""
    if not (t.is_floating_point() or t.is_complex()):
        return 0
    flat = t.detach().reshape(-1)
    return sum(int((~torch.isfinite(c)).sum()) for c in flat.split(SCAN_CHUNK))


def scan_nonfinite(sd: dict[str, Tensor], skip: set[str]) -> dict[str, int]:
    """Every tensor of ``sd`` but ``skip`` that holds NaN/Inf → how many values."""
    counts = {k: nonfinite_values(t) for k, t in sd.items() if k not in skip}
    return {k: n for k, n in counts.items() if n}


def _find(sd: dict[str, Tensor], layout: Layout) -> dict[Layer, str] | None:
    """Each layer's key prefix in ``sd`` under ``layout``, or None if one is missing."""
    keys = {}
    for layer, prefixes in LAYOUTS[layout].items():
        found = next((p for p in prefixes if f"{p}.{WEIGHT}" in sd), None)
        if found is None:
            return None
        keys[layer] = found
    return keys


def heads_from_state_dict(
    sd: dict[str, Tensor], layout: Layout | str | None = None, replaced=()
) -> HeadWeights:
    """Pick the head weights out of a state_dict; ``layout`` None = detect from key names."""
    layouts = [as_member(Layout, layout, "layout")] if layout else list(Layout)
    for name in layouts:
        keys = _find(sd, name)
        if keys is not None:
            own = {f"{p}.{kind}" for p in keys.values() for kind in (WEIGHT, BIAS)}
            heads = HeadWeights(
                params=_params(sd, keys, name),
                layout=name,
                keys=keys,
                background=BACKGROUND[name],
                replaced=list(replaced),
                nonfinite_elsewhere=scan_nonfinite(sd, own),
            )
            check_heads(heads)
            return heads
    want = ", ".join(f"{n}: '{LAYOUTS[n][Layer.RPN_LOGITS][0]}.{WEIGHT}'" for n in layouts)
    raise InputError(
        f"no RPN/box head found in the checkpoint (looked for {want}); "
        "is this a Faster R-CNN FPN checkpoint?"
    )


def _params(sd: dict[str, Tensor], keys: dict[Layer, str], layout: Layout) -> dict[str, Tensor]:
    params = {}
    for layer, prefix in keys.items():
        for kind in (WEIGHT, BIAS):
            t = sd.get(f"{prefix}.{kind}")
            if t is None:
                raise InputError(
                    f"checkpoint key '{prefix}.{kind}' is missing; the {layout} head needs it"
                )
            params[param(layer, kind)] = t.detach().float()
    return params


def check_heads(h: HeadWeights) -> None:
    """Shapes must form one consistent Faster R-CNN head."""
    c, a = h.channels, h.num_anchors
    expect = {
        Layer.RPN_CONV: (c, c, RPN_CONV_KERNEL, RPN_CONV_KERNEL),
        Layer.RPN_LOGITS: (a, c, PREDICTOR_KERNEL, PREDICTOR_KERNEL),
        Layer.RPN_DELTAS: (BOX_COORDS * a, c, PREDICTOR_KERNEL, PREDICTOR_KERNEL),
    }
    for layer, shape in expect.items():
        found = list(h.weight(layer).shape)
        if tuple(found) != shape:
            key = h.file_key(param(layer, WEIGHT))
            raise InputError(f"checkpoint '{key}' has shape {found}, expected {list(shape)}")
    fc_in = h.weight(Layer.BOX_FC1).shape[1]
    if h.pool_size**2 * c != fc_in:
        raise InputError(
            f"box head input {fc_in} is not channels ({c}) x P x P for any P; check the checkpoint"
        )
    outputs = h.weight(Layer.BOX_DELTAS).shape[0]
    if h.reg_classes not in (1, h.num_classes, h.num_logits) or outputs % BOX_COORDS:
        raise InputError(
            f"box regressor has {outputs} outputs, expected 4, 4K or 4(K+1) "
            f"with K+1 = {h.num_logits}"
        )


def load_checkpoint(
    path: str | Path, layout: Layout | str | None = None, unsafe: bool = False
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
            f"checkpoint heads take {heads.channels} channels but the batch features have "
            f"{batch.channels}; dump the FPN outputs that feed these heads"
        )
    levels, sized = len(batch.levels), len(config.anchors.sizes)
    if sized < levels:
        raise InputError(
            f"the batch has {levels} levels but config '{config.name}' has anchor sizes for "
            f"{sized}; add sizes to [anchors] in a config TOML"
        )
    a = len(config.anchors.ratios) * len(config.anchors.sizes[0])
    if a != heads.num_anchors:
        raise InputError(
            f"checkpoint RPN predicts {heads.num_anchors} anchors per location but config "
            f"'{config.name}' makes {a}; set [anchors] ratios/sizes in a config TOML"
        )
