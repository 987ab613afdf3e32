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

from ..vocab import (
    BIAS,
    BOX_CONVS,
    BOX_FCS,
    BOX_LAYERS,
    DH_BLOCKS,
    DH_CONVS,
    DH_RES,
    MASK_CONVS,
    NORM_OF,
    RES5_BLOCKS,
    RES5_SHORTCUT,
    RPN_CONVS,
    RUNNING_MEAN,
    RUNNING_VAR,
    WEIGHT,
    Background,
    Layer,
    Layout,
    Precision,
    param,
)
from .batch import BATCH_FORMAT
from .checks import as_member
from .dense_weights import DenseLayout, find_dense_layout
from .errors import InputError
from .layouts import (
    BACKGROUND,
    HEAD_ROOTS,
    FoundKeys,
    find_keys,
    headless_design,
    one_stage,
    unreplayed_design,
)
from .torchfile import Loaded, Placeholder, Replaced, noting_payloads, read_file

# 3 x 3 RPN conv, 1 x 1 predictors
RPN_CONV_KERNEL, PREDICTOR_KERNEL = 3, 1
BOX_COORDS = 4
# the mask head's deconvolution doubles the RoI side
MASK_UPSAMPLE = 2
# the prefix of a later cascade stage's canonical parameter names (vocab.param)
STAGE = "stage"
# values per step of the whole-checkpoint NaN/Inf scan
SCAN_CHUNK = 1 << 22


@dataclass(kw_only=True)
class HeadWeights:
    """The RPN head and box head parameters, by canonical name (``param(layer, kind)``).

    rpn_conv(2) Tensor[C, C, 3, 3]; rpn_logits Tensor[A, C, 1, 1]; rpn_deltas Tensor[4A, C, 1, 1];
    box_conv1..4 Tensor[C', C, 3, 3] and their norms Tensor[C'] (where the head has convs);
    box_fc1 Tensor[F, C'*P*P]; box_fc2 Tensor[F, F] (where it has two fcs); box_logits
    Tensor[K+1, F]; box_deltas Tensor[4K', F] (K' = 1, K or K+1). A conv followed by a norm may
    have no bias.
    """

    params: dict[str, Tensor]
    layout: Layout
    keys: dict[Layer, str]  # layer -> its key prefix in the file
    background: Background
    # a BatchNorm's running statistics, by canonical name (not parameters: no gradient)
    buffers: dict[str, Tensor] = field(default_factory=dict)
    # a cascade's later stages: box layer -> its key prefix in the file, per stage from 1
    stage_keys: list[dict[Layer, str]] = field(default_factory=list)
    replaced: list[Replaced] = field(default_factory=list)  # globals the file named, not rebuilt
    # file key -> its NaN/Inf values, for every tensor of the file outside the heads (backbone,
    # neck, other heads) that has any
    nonfinite_elsewhere: dict[str, int] = field(default_factory=dict)
    # module prefixes of heads the file has and the replay does not run (MMDetection's per-stage
    # mask heads)
    unreplayed: list[str] = field(default_factory=list)
    # the type the layers compute in (a low one under CPU autocast, as the run's AMP forward)
    precision: Precision = Precision.FP32

    def weight(self, layer: Layer) -> Tensor:
        return self.params[param(layer, WEIGHT)]

    def bias(self, layer: Layer) -> Tensor | None:
        """The layer's bias (None: a conv that a norm follows may have none)."""
        return self.params.get(param(layer, BIAS))

    def running(self, layer: Layer) -> tuple[Tensor, Tensor] | None:
        """A BatchNorm's running (mean, var), each Tensor[C]; None for any other layer."""
        mean = self.buffers.get(param(layer, RUNNING_MEAN))
        return None if mean is None else (mean, self.buffers[param(layer, RUNNING_VAR)])

    def norm_of(self, conv: Layer) -> Layer | None:
        """The normalization layer after ``conv``, where the head has one."""
        norm = NORM_OF.get(conv)
        return norm if norm in self.keys else None

    @property
    def rpn_convs(self) -> list[Layer]:
        return [x for x in RPN_CONVS if x in self.keys]

    @property
    def box_convs(self) -> list[Layer]:
        return [x for x in BOX_CONVS if x in self.keys]

    @property
    def box_fcs(self) -> list[Layer]:
        return [x for x in BOX_FCS if x in self.keys]

    @property
    def double_head(self) -> bool:
        """The box head is MMDetection's double head: fcs classify, a conv branch regresses."""
        return Layer.DH_RES_CONV1 in self.keys

    @property
    def dh_blocks(self) -> list[tuple[Layer, Layer, Layer]]:
        """The double head's bottleneck blocks the checkpoint has."""
        return [b for b in DH_BLOCKS if b[0] in self.keys]

    @property
    def res5(self) -> bool:
        """The box head is ResNet's res5 stage (a C4 model), pooled to the config's size."""
        return Layer.RES5_0_CONV1 in self.keys

    @property
    def box_batch_norm(self) -> bool:
        """The box head has a BatchNorm (its outputs in training depend on the batch)."""
        convs = [*self.box_convs, *(c for c in DH_CONVS if c in self.keys)]
        return any(self.running(n) for c in convs if (n := self.norm_of(c)))

    @property
    def plain_box_head(self) -> bool:
        """Two fcs and nothing else: the box head whose gradients are taken by hand."""
        only_fcs = not (self.box_convs or self.double_head or self.res5)
        return only_fcs and len(self.box_fcs) == len(BOX_FCS)

    def pool_side(self, res5_size: int) -> int:
        """The RoIAlign side the box head takes: ``res5_size`` for a res5 head, else P."""
        return res5_size if self.res5 else self.pool_size

    def box_params(self, stage: int = 0) -> list[str]:
        """The canonical names of one box-head stage's parameters."""
        names = (param(x, kind, stage) for x in BOX_LAYERS for kind in (WEIGHT, BIAS))
        return [n for n in names if n in self.params]

    def file_key(self, name: str) -> str:
        """The key of a canonical parameter name (``rpn_logits.weight``, or a later cascade
        stage's ``stage1.box_fc1.weight``) in the file."""
        *stage, layer, kind = name.split(".")
        keys = self.stage_keys[int(stage[0][len(STAGE) :]) - 1] if stage else self.keys
        return f"{keys[Layer(layer)]}.{kind}"

    @property
    def num_stages(self) -> int:
        """Box-head stages: 1, or a cascade's."""
        return 1 + len(self.stage_keys)

    def stage(self, k: int) -> HeadWeights:
        """The heads as cascade stage ``k`` sees them: its own box layers under the canonical
        names, the RPN (and mask head) shared."""
        if k == 0:
            return self
        names = [(layer, kind) for layer in BOX_LAYERS for kind in (WEIGHT, BIAS)]
        params = {**self.params, **{param(x, kind): self.params[param(x, kind, k)]
                                    for x, kind in names
                                    if param(x, kind, k) in self.params}}  # fmt: skip
        keys = {**self.keys, **self.stage_keys[k - 1]}
        return dataclasses.replace(self, params=params, keys=keys, stage_keys=[])

    @property
    def mask_convs(self) -> list[Layer]:
        return [x for x in MASK_CONVS if x in self.keys]

    @property
    def has_mask(self) -> bool:
        return Layer.MASK_LOGITS in self.keys

    @property
    def mask_channels(self) -> int:
        """Mask logits per RoI: 1 (class-agnostic), K, or K+1 (torchvision, background first)."""
        return self.weight(Layer.MASK_LOGITS).shape[0]

    def mask_slot(self, labels: Tensor) -> Tensor:
        """Foreground class 0..K-1 → its channel in the mask logits."""
        if self.mask_channels == 1:
            return torch.zeros_like(labels)
        return self.fg_logit(labels) if self.mask_channels == self.num_logits else labels

    @property
    def channels(self) -> int:
        return self.weight(Layer.RPN_CONV).shape[1]

    @property
    def box_channels(self) -> int:
        """Channels into the box head's first fc: its last conv's, else the features'."""
        convs = self.box_convs
        return self.weight(convs[-1]).shape[0] if convs else self.channels

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
        """RoIAlign output side P, from fc1's input size C * P * P (0 for a res5 head: its
        side is the config's, ``res5.pool_size``)."""
        if self.res5:
            return 0
        return round((self.weight(Layer.BOX_FC1).shape[1] / self.box_channels) ** 0.5)

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

    def replayed(self) -> str:
        """What the replay runs of these heads, and what it names as not replayed."""
        regression = "class-agnostic" if self.reg_classes == 1 else "per-class"
        fcs = len(self.box_fcs)
        box = f"{self._convs(self.box_convs)}{fcs} fc{'s' * (fcs > 1)}, {regression} regression"
        if self.res5:
            box = f"ResNet's res5 with frozen BatchNorm, {regression} regression"
        if self.double_head:
            box = (
                f"double head: {fcs} fcs classify, a residual block and "
                f"{len(self.dh_blocks)} bottlenecks with BatchNorm regress ({regression})"
            )
        rpn = len(self.rpn_convs)
        parts = [f"RPN head ({'one 3x3 conv' if rpn == 1 else f'{rpn} 3x3 convs'})",
                 f"box head ({box})"]  # fmt: skip
        if self.num_stages > 1:
            parts[-1] = f"{self.num_stages} cascade box heads ({box})"
        if self.has_mask:
            parts.append(f"mask head ({self._convs(self.mask_convs).removesuffix(', ')})")
        said = f"replayed: {', '.join(parts)}"
        return said + (f"; not replayed: {', '.join(self.unreplayed)}" if self.unreplayed else "")

    def _convs(self, convs: list[Layer]) -> str:
        """``4 convs with GroupNorm, `` (or nothing without convs)."""
        if not convs:
            return ""
        norm = self.norm_of(convs[0])
        kinds = {None: "", True: " with BatchNorm", False: " with GroupNorm"}
        kind = kinds[None if norm is None else self.running(norm) is not None]
        return f"{len(convs)} conv{'s' * (len(convs) > 1)}{kind}, "

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


class OneStageCheckpoint(InputError):
    """A one-stage detector's checkpoint where a two-stage one was read: ``inspect`` (and what
    runs it: compare, scan) replays its dense head; the other commands refuse it with this."""

    def __init__(self, sd: dict[str, Tensor], layout: DenseLayout):
        name = f"{layout.layout} {layout.kind}"
        super().__init__(
            f"this is a one-stage detector ({name}): not replayed yet by this command (it takes "
            "two-stage RPN + RoI checkpoints); `lossdoctor inspect` replays its dense head"
        )
        self.state_dict, self.layout = sd, layout
        self.batch = None  # the batch read with it, where there was one


def heads_from_state_dict(
    sd: dict[str, Tensor], layout: Layout | str | None = None, replaced=()
) -> HeadWeights:
    """Pick the head weights out of a state_dict; ``layout`` None = detect from key names."""
    layouts = [as_member(Layout, layout, "layout")] if layout else list(Layout)
    for name in layouts:
        found = find_keys(sd, name)
        if found is not None:
            refuse_design(unreplayed_design(sd, name, found))
            return _heads(sd, found, name, replaced)
    stage = one_stage(sd)
    dense = find_dense_layout(sd)
    if dense is not None:
        raise OneStageCheckpoint(sd, dense)
    if stage is not None:
        raise InputError(
            f"{stage} is a one-stage detector: not replayed yet, this head design (replayed: "
            "RetinaNet and FCOS heads of torchvision, MMDetection and Detectron2)"
        )
    refuse_design(headless_design(sd, layouts))
    roots = "; ".join(f"{n}: {', '.join(HEAD_ROOTS[n])}" for n in layouts)
    raise InputError(
        f"no RPN or RoI head found in the checkpoint (looked for modules {roots}); "
        "is this a two-stage detector's state_dict?"
    )


def not_replayed(what: str) -> InputError:
    """The refusal of a part of a model the replay does not run, by name."""
    return InputError(f"{what}: not replayed yet (see docs/coverage.md)")


def refuse_design(design: str | None) -> None:
    """Refuse a head the replay does not run, by name (see ``layouts.unreplayed_design``)."""
    if design is not None:
        raise not_replayed(design)


def _heads(sd: dict[str, Tensor], found: FoundKeys, layout: Layout, replaced) -> HeadWeights:
    params = _params(sd, found.keys, layout)
    for k, keys in enumerate(found.stages, start=1):
        params.update(_params(sd, keys, layout, stage=k))
    own = {f"{p}.{kind}" for keys in (found.keys, *found.stages) for p in keys.values()
           for kind in (WEIGHT, BIAS, RUNNING_MEAN, RUNNING_VAR)}  # fmt: skip
    params, buffers = split_buffers(params)
    heads = HeadWeights(
        params=params,
        buffers=buffers,
        layout=layout,
        keys=found.keys,
        background=BACKGROUND[layout],
        stage_keys=found.stages,
        replaced=list(replaced),
        nonfinite_elsewhere=scan_nonfinite(sd, own),
        unreplayed=found.unreplayed,
    )
    check_heads(heads)
    return heads


def _params(
    sd: dict[str, Tensor], keys: dict[Layer, str], layout: Layout, stage: int = 0
) -> dict[str, Tensor]:
    """The weights and biases of ``keys``' layers, and a BatchNorm's running statistics (under
    their own canonical names: :func:`split_buffers` takes them out)."""
    params = {}
    for layer, prefix in keys.items():
        for kind in (WEIGHT, BIAS, RUNNING_MEAN, RUNNING_VAR):
            t = sd.get(f"{prefix}.{kind}")
            needed = kind == WEIGHT or kind == BIAS and not _biasless(keys, layer)
            if t is None and needed:
                raise InputError(
                    f"checkpoint key '{prefix}.{kind}' is missing; the {layout} head needs it"
                )
            if t is not None:
                params[param(layer, kind, stage)] = t.detach().float()
    return params


def _biasless(keys: dict[Layer, str], layer: Layer) -> bool:
    """A conv that a norm follows may have no bias (the norm's shift replaces it)."""
    return NORM_OF.get(layer) in keys


def split_buffers(params: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(parameters, running statistics) of canonical names."""
    stats = (RUNNING_MEAN, RUNNING_VAR)
    buffers = {k: v for k, v in params.items() if k.rsplit(".", 1)[1] in stats}
    return {k: v for k, v in params.items() if k not in buffers}, buffers


def _shape(h: HeadWeights, layer: Layer, want: tuple, stage: int = 0) -> None:
    found = tuple(h.weight(layer).shape)
    if found != want:
        key = h.file_key(param(layer, WEIGHT, stage))
        raise InputError(f"checkpoint '{key}' has shape {list(found)}, expected {list(want)}")


def _check_vector(h: HeadWeights, name: str, size: int) -> None:
    t = h.params.get(name, h.buffers.get(name))
    if t is not None and tuple(t.shape) != (size,):
        key = h.file_key(name)
        raise InputError(f"checkpoint '{key}' has shape {list(t.shape)}, expected [{size}]")


def _check_convs(h: HeadWeights, convs: list[Layer], cin: int) -> int:
    """A chain of 3x3 convs from ``cin`` channels, each with its norm's vectors (where it has
    one) → the channels out of the last."""
    for conv in convs:
        cout = h.weight(conv).shape[0]
        _shape(h, conv, (cout, cin, RPN_CONV_KERNEL, RPN_CONV_KERNEL))
        _check_vector(h, param(conv, BIAS), cout)
        norm = h.norm_of(conv)
        for kind in (WEIGHT, BIAS, RUNNING_MEAN, RUNNING_VAR) if norm else ():
            _check_vector(h, param(norm, kind), cout)
        cin = cout
    return cin


def _check_mask(h: HeadWeights) -> None:
    """3x3 convs from the feature channels, a 2x2 stride-2 deconv, 1x1 logits per class."""
    cin = _check_convs(h, h.mask_convs, h.channels)
    cout = h.weight(Layer.MASK_DECONV).shape[1]
    _shape(h, Layer.MASK_DECONV, (cin, cout, MASK_UPSAMPLE, MASK_UPSAMPLE))
    q = h.mask_channels
    if q not in (1, h.num_classes, h.num_logits):
        raise InputError(
            f"mask head predicts {q} masks per RoI, expected 1, K or K+1 with K = {h.num_classes}"
        )
    _shape(h, Layer.MASK_LOGITS, (q, cout, PREDICTOR_KERNEL, PREDICTOR_KERNEL))


def _check_box(h: HeadWeights, stage: int) -> None:
    """One box head: fc1 over C x P x P pooled inputs, K+1 logits, 4, 4K or 4(K+1) deltas."""
    s = h.stage(stage)
    if s.res5:
        width = _check_res5(s)
        for layer in (Layer.BOX_LOGITS, Layer.BOX_DELTAS):
            _shape(s, layer, (s.weight(layer).shape[0], width))
        _check_predictors(h, s, stage)
        return
    if s.double_head:
        _shape(s, Layer.BOX_DELTAS, (s.weight(Layer.BOX_DELTAS).shape[0], _check_dh(s)))
    channels = _check_convs(s, s.box_convs, s.channels)
    fc_in = s.weight(Layer.BOX_FC1).shape[1]
    if s.pool_size**2 * channels != fc_in:
        raise InputError(
            f"box head input {fc_in} is not channels ({channels}) x P x P for any P; check "
            "the checkpoint"
        )
    width = s.weight(Layer.BOX_FC1).shape[0]
    if Layer.BOX_FC2 in s.keys:
        _shape(s, Layer.BOX_FC2, (s.weight(Layer.BOX_FC2).shape[0], width))
        width = s.weight(Layer.BOX_FC2).shape[0]
    for layer in (Layer.BOX_LOGITS,) if s.double_head else (Layer.BOX_LOGITS, Layer.BOX_DELTAS):
        _shape(s, layer, (s.weight(layer).shape[0], width))
    _check_predictors(h, s, stage)


def _check_conv_norm(s: HeadWeights, conv: Layer, cin: int, kernel: int) -> int:
    """One conv from ``cin`` channels with a square ``kernel`` and its norm's vectors → its
    channels out."""
    cout = s.weight(conv).shape[0]
    _shape(s, conv, (cout, cin, kernel, kernel))
    for kind in (WEIGHT, BIAS, RUNNING_MEAN, RUNNING_VAR):
        _check_vector(s, param(NORM_OF[conv], kind), cout)
    return cout


def _check_dh(s: HeadWeights) -> int:
    """The double head's regression branch: the residual block (a 3x3 conv, then a 1x1 to its
    width, a 1x1 identity projection of the features to the same), bottlenecks that keep the
    width → the width."""
    conv1, conv2, identity = DH_RES
    inner = _check_conv_norm(s, conv1, s.channels, RPN_CONV_KERNEL)
    width = _check_conv_norm(s, conv2, inner, PREDICTOR_KERNEL)
    if _check_conv_norm(s, identity, s.channels, PREDICTOR_KERNEL) != width:
        raise InputError(
            f"checkpoint '{s.keys[identity]}' does not match its block's width {width}"
        )
    for b1, b2, b3 in s.dh_blocks:
        mid = _check_conv_norm(s, b1, width, PREDICTOR_KERNEL)
        _check_conv_norm(s, b2, mid, RPN_CONV_KERNEL)
        if _check_conv_norm(s, b3, mid, PREDICTOR_KERNEL) != width:
            raise InputError(f"checkpoint '{s.keys[b3]}' does not keep the width {width}")
    return width


def _check_res5(s: HeadWeights) -> int:
    """res5's blocks: 1x1, 3x3, 1x1 convs from the features' channels (the first block's
    shortcut 1x1 too), each norm's vectors → the channels out."""
    cin = s.channels
    for block in RES5_BLOCKS:
        x = cin
        for conv, k in zip(block, (PREDICTOR_KERNEL, RPN_CONV_KERNEL, PREDICTOR_KERNEL)):
            x = _check_conv_norm(s, conv, x, k)
        if block is RES5_BLOCKS[0]:
            if _check_conv_norm(s, RES5_SHORTCUT, cin, PREDICTOR_KERNEL) != x:
                raise InputError(f"checkpoint '{s.keys[RES5_SHORTCUT]}' does not give {x} channels")
        elif x != cin:
            key = s.keys[block[2]]
            raise InputError(f"checkpoint '{key}' gives {x} channels, its block takes {cin}")
        cin = x
    return cin


def _check_predictors(h: HeadWeights, s: HeadWeights, stage: int) -> None:
    """K+1 logits (every stage the same), 4, 4K or 4(K+1) deltas."""
    if stage and s.num_logits != h.num_logits:
        key = h.file_key(param(Layer.BOX_LOGITS, WEIGHT, stage))
        raise InputError(f"checkpoint '{key}' has {s.num_logits} classes, stage 0 {h.num_logits}")
    outputs = s.weight(Layer.BOX_DELTAS).shape[0]
    if s.reg_classes not in (1, s.num_classes, s.num_logits) or outputs % BOX_COORDS:
        raise InputError(
            f"box regressor has {outputs} outputs, expected 4, 4K or 4(K+1) "
            f"with K+1 = {s.num_logits}"
        )


def check_heads(h: HeadWeights) -> None:
    """Shapes must form one consistent head: the RPN, each box stage, the mask head."""
    c, a = h.channels, h.num_anchors
    for conv in h.rpn_convs:
        _shape(h, conv, (c, c, RPN_CONV_KERNEL, RPN_CONV_KERNEL))
    _shape(h, Layer.RPN_LOGITS, (a, c, PREDICTOR_KERNEL, PREDICTOR_KERNEL))
    _shape(h, Layer.RPN_DELTAS, (BOX_COORDS * a, c, PREDICTOR_KERNEL, PREDICTOR_KERNEL))
    for k in range(h.num_stages):
        _check_box(h, k)
    if h.has_mask:
        _check_mask(h)


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
    except OneStageCheckpoint:
        raise
    except InputError as e:
        raise noting_payloads(InputError(f"{p}: {e}"), loaded.replaced) from None


def _check_groups(heads: HeadWeights, groups: int) -> None:
    """Each GroupNorm's channels split into the config's groups."""
    for conv in (*heads.box_convs, *heads.mask_convs):
        norm = heads.norm_of(conv)
        c = heads.weight(conv).shape[0]
        if norm is not None and heads.running(norm) is None and c % groups:
            raise InputError(
                f"head_norm.groups {groups} does not divide the {c} channels of "
                f"'{heads.keys[norm]}'; set [head_norm] groups in a config TOML"
            )


def check_fit(heads: HeadWeights, batch, config) -> None:
    """The checkpoint's heads and the config must accept the batch's features."""
    _check_groups(heads, config.head_norm.groups)
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
