"""The dense stage of a one-stage detector (RetinaNet, FCOS, ATSS): the head's towers and
predictors on every level, priors, one assignment per image over all levels, per-anchor focal,
box and centerness losses, and each profile's normalization of them.

Shapes: ``N`` images, ``A_l`` anchors (or points) of level ``l`` per image, ``K`` the classifier's
columns (a GT label is its column), ``G_i`` image ``i``'s usable GT boxes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inputs.batch import Batch
from ..inputs.dense import DELTA_CLIP, EMA_INITIAL, DenseConfig, DenseProfile, DenseTerm
from ..inputs.dense_weights import BOX_COORDS, NORM_GROUPS, DenseWeights
from ..vocab import (
    BIAS,
    DECODED_BOX_LOSSES,
    DENSE_BOX_CONVS,
    DENSE_BOX_NORMS,
    DENSE_CLS_CONVS,
    DENSE_CLS_NORMS,
    DenseAssigner,
    DenseCoder,
    DenseKind,
    DenseLayer,
    DenseNormalizer,
    Framework,
    Part,
)
from .anchors import level_anchors, valid_flags
from .boxes import box_iou, decode, encode
from .engine import live
from .gt import UsableGt, usable_gt
from .losses import DECODED_LOSSES, box_loss
from .matcher import IGNORED, NEGATIVE, POSITIVE, match

NORM_EPS = 1e-5
# torchvision FCOS picks the smallest GT by scoring matches 1e8 - area; below this, no match
FCOS_AREA_BASE, FCOS_NO_MATCH = 1e8, 1e-5
# torchvision FCOS: an anchor of size s takes GT boxes whose largest side distance is in (4s, 8s)
FCOS_RANGE = (4.0, 8.0)
# MMDetection's ATSS: its IoU's union floor, and how far inside its GT a positive's centre lies
ATSS_UNION_EPS, ATSS_INSIDE = 1e-6, 0.01


@dataclass(kw_only=True)
class DenseOutput:
    """The head's outputs on one level: logits Tensor[N, A_l, K], deltas Tensor[N, A_l, 4]
    (FCOS: distances), ctr Tensor[N, A_l] or None."""

    logits: Tensor
    deltas: Tensor
    ctr: Tensor | None


@dataclass(kw_only=True)
class DenseLevel:
    """One level's assignment and per-anchor losses, all Tensor[N, A_l]."""

    name: str
    stride: int
    anchors: Tensor  # Tensor[A_l, 4]
    out: DenseOutput
    labels: Tensor  # int8 POSITIVE / NEGATIVE / IGNORED
    matched: Tensor  # int64 GT index (meaningful where positive)
    focal: Tensor  # focal loss summed over the K columns; 0 where ignored
    box: Tensor  # box loss of the positives, 0 elsewhere
    ctr_target: Tensor  # centerness target of the positives, 0 elsewhere
    ctr_loss: Tensor  # centerness BCE of the positives, 0 elsewhere

    @property
    def positive(self) -> Tensor:
        return self.labels == POSITIVE

    def per_image(self, part: Part) -> Tensor:
        """Each image's summed per-sample loss of one part at this level, Tensor[N]."""
        match part:
            case Part.CLS:
                return self.focal.sum(1)
            case Part.BOX:
                return self.box.sum(1)
            case Part.CTR:
                return self.ctr_loss.sum(1)
        raise ValueError(f"a dense head has no {part} term")

    @property
    def negative(self) -> Tensor:
        return self.labels == NEGATIVE


@dataclass(kw_only=True)
class DenseLevelLoss:
    """One (profile, level): its three terms and what each was divided by. A per-image
    normalizer's divisor is reported as the single divisor giving the same level loss."""

    level: str
    terms: dict[Part, Tensor]
    avg_factor: dict[Part, float]


@dataclass(kw_only=True)
class DenseLosses:
    profile: DenseProfile
    levels: list[DenseLevelLoss]

    def term(self, part: Part) -> Tensor:
        return sum((lv.terms[part] for lv in self.levels), torch.zeros(()))

    @property
    def total(self) -> Tensor:
        return sum((self.term(p) for p in DENSE_PARTS), torch.zeros(()))


DENSE_PARTS = (Part.CLS, Part.BOX, Part.CTR)


@dataclass(frozen=True, kw_only=True)
class WorldCounts:
    """The step's counts averaged over its ranks, for the ``reduced`` terms."""

    pos: float  # positives per rank
    ctr_sum: float  # the positives' centerness targets summed, per rank
    pseudo: float  # the sum over images of max(#pos, 1), per rank


@dataclass(kw_only=True)
class DenseReplay:
    weights: DenseWeights
    batch: Batch
    config: DenseConfig
    features: list[Tensor]
    gt: UsableGt
    levels: list[DenseLevel]
    ema_before: float | None  # Detectron2's running normalizer before this step, where known
    world: WorldCounts | None = None  # the step's counts over its ranks (None: this dump alone)
    losses: dict[str, DenseLosses] = field(default_factory=dict)

    @property
    def positives(self) -> Tensor:
        """Positive anchors per image and level, Tensor[N, L]."""
        return torch.stack([lv.positive.sum(1) for lv in self.levels], 1)

    @property
    def ctr_sums(self) -> Tensor:
        """The positives' centerness targets summed, Tensor[N, L]."""
        return torch.stack([lv.ctr_target.sum(1) for lv in self.levels], 1)


def _conv(x: Tensor, w: DenseWeights, layer: DenseLayer) -> Tensor:
    return F.conv2d(x, w.tensor(layer), w.tensor(layer, BIAS), padding=1)


def _tower(x: Tensor, w: DenseWeights, convs, norms) -> Tensor:
    for conv, norm in zip(convs[: w.num_convs], norms):
        x = _conv(x, w, conv)
        if w.norm:
            x = F.group_norm(x, NORM_GROUPS, w.tensor(norm), w.tensor(norm, BIAS), NORM_EPS)
        x = F.relu(x)
    return x


def _flat(x: Tensor, per_anchor: int) -> Tensor:
    """Tensor[N, A * c, H, W] → Tensor[N, H * W * A, c] (location-major, as every framework)."""
    n, _, h, wd = x.shape
    return x.view(n, -1, per_anchor, h, wd).permute(0, 3, 4, 1, 2).reshape(n, -1, per_anchor)


def dense_head(x: Tensor, w: DenseWeights, config: DenseConfig, level: int) -> DenseOutput:
    """The head on one level's features Tensor[N, C, H, W]."""
    cls_feat = _tower(x, w, DENSE_CLS_CONVS, DENSE_CLS_NORMS)
    box_feat = _tower(x, w, DENSE_BOX_CONVS, DENSE_BOX_NORMS)
    logits = _flat(_conv(cls_feat, w, DenseLayer.LOGITS), w.num_classes)
    deltas = _conv(box_feat, w, DenseLayer.DELTAS)
    if w.scales:
        deltas = deltas * w.scales[level]
    if config.coder is DenseCoder.DISTANCES:
        deltas = deltas.exp() if config.exp_distances else F.relu(deltas)
    ctr = None
    if w.has_ctr:
        ctr = _flat(_conv(box_feat if config.ctr_on_box else cls_feat, w, DenseLayer.CTR), 1)
        ctr = ctr[..., 0]
    return DenseOutput(logits=logits, deltas=_flat(deltas, BOX_COORDS), ctr=ctr)


def focal_loss(logits: Tensor, target: Tensor, alpha: float, gamma: float) -> Tensor:
    """Sigmoid focal loss per element (torchvision's / fvcore's formula; MMDetection's is the
    same): BCE x (1 - p_t)^gamma x alpha_t. logits, target: Tensor[..., K] → Tensor[..., K]."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    return (alpha * target + (1 - alpha) * (1 - target)) * ce * (1 - p_t) ** gamma


def _match_fcos_tv(gt: Tensor, anchors: Tensor, per_level: list[int], radius: float) -> Tensor:
    """torchvision FCOS's matching → the GT index of each anchor, -1 for none (Tensor[M])."""
    if gt.shape[0] == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.long)
    gt_centers = (gt[:, :2] + gt[:, 2:]) / 2
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    sizes = anchors[:, 2] - anchors[:, 0]
    ok = (centers[:, None, :] - gt_centers[None]).abs().max(dim=2).values < radius * sizes[:, None]
    x, y = centers.unsqueeze(2).unbind(1)
    x0, y0, x1, y1 = gt.unsqueeze(0).unbind(2)
    dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)
    ok &= dist.min(dim=2).values > 0
    lower, upper = sizes * FCOS_RANGE[0], sizes * FCOS_RANGE[1]
    lower[: per_level[0]] = 0
    upper[-per_level[-1] :] = float("inf")
    far = dist.max(dim=2).values
    ok &= (far > lower[:, None]) & (far < upper[:, None])
    areas = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    best, idx = (ok.to(torch.float32) * (FCOS_AREA_BASE - areas[None])).max(dim=1)
    idx[best < FCOS_NO_MATCH] = -1
    return idx


def _match_fcos_mmdet(gt: Tensor, anchors: Tensor, strides: Tensor, ranges: Tensor, config):
    """MMDetection FCOS's targets: each point (an anchor's centre) takes the smallest GT it lies
    in (within ``center_radius`` strides of its centre, with centre sampling) whose largest
    distance is in the level's range → GT index, -1 for none (Tensor[M])."""
    if gt.shape[0] == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.long)
    xs, ys = (
        ((anchors[:, 0] + anchors[:, 2]) / 2)[:, None],
        ((anchors[:, 1] + anchors[:, 3]) / 2)[:, None],
    )
    x0, y0, x1, y1 = gt[None].unbind(2)
    dist = torch.stack([xs - x0, ys - y0, x1 - xs, y1 - ys], -1)
    if config.center_sampling:
        r = (strides * config.center_radius)[:, None]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        box = torch.stack([torch.maximum(cx - r, x0), torch.maximum(cy - r, y0),
                           torch.minimum(cx + r, x1), torch.minimum(cy + r, y1)], -1)  # fmt: skip
        inside = torch.stack([xs - box[..., 0], ys - box[..., 1], box[..., 2] - xs,
                              box[..., 3] - ys], -1).min(-1).values > 0  # fmt: skip
    else:
        inside = dist.min(-1).values > 0
    far = dist.max(-1).values
    in_range = (far >= ranges[:, :1]) & (far <= ranges[:, 1:])
    areas = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[None].repeat(anchors.shape[0], 1)
    areas[~inside] = FCOS_AREA_BASE
    areas[~in_range] = FCOS_AREA_BASE
    best, idx = areas.min(dim=1)
    idx[best == FCOS_AREA_BASE] = -1
    return idx


def _match_atss(gt: Tensor, anchors: Tensor, per_level: list[int], topk: int) -> Tensor:
    """MMDetection's ATSSAssigner: per GT, the ``topk`` anchors per level whose centres are
    nearest its centre are candidates; those with IoU >= mean + std of the candidates' (and the
    centre inside the GT, by more than 0.01) are positive; an anchor positive for several GTs
    takes the one of highest IoU → GT index, -1 for none (Tensor[M])."""
    m, g = anchors.shape[0], gt.shape[0]
    if g == 0 or m == 0:
        return torch.full((m,), -1, dtype=torch.long)
    iou = box_iou(anchors, gt, ATSS_UNION_EPS)  # [M, G]
    centre = lambda b: torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)  # noqa: E731
    dist = (centre(anchors)[:, None, :] - centre(gt)[None]).pow(2).sum(-1).sqrt()
    cands, start = [], 0
    for n in per_level:
        k = min(topk, n)
        cands.append(dist[start : start + n].topk(k, dim=0, largest=False).indices + start)
        start += n
    cand = torch.cat(cands)  # [C, G]
    cand_iou = iou[cand, torch.arange(g)]
    pos = cand_iou >= (cand_iou.mean(0) + cand_iou.std(0))[None]
    cx, cy = centre(anchors)[cand].unbind(-1)  # [C, G] each
    inside = torch.stack([cx - gt[:, 0], cy - gt[:, 1], gt[:, 2] - cx, gt[:, 3] - cy], 1)
    pos &= inside.min(dim=1).values > ATSS_INSIDE
    best = torch.full((g, m), -float("inf"))
    gi = torch.arange(g).expand_as(cand)
    best[gi[pos], cand[pos]] = iou.t()[gi[pos], cand[pos]]
    value, idx = best.t().max(dim=1)
    idx[value == -float("inf")] = -1
    return idx


def _per_anchor(values, anchors: list[Tensor]) -> Tensor:
    """One value per level → Tensor[M, ...] repeated for each anchor of the level."""
    rows = [torch.tensor(v, dtype=torch.float32) for v in values]
    return torch.cat([r.expand(a.shape[0], *r.shape) for r, a in zip(rows, anchors)])


def _assign(config, batch, gt, anchors, shapes, num_anchors, i) -> tuple[Tensor, Tensor]:
    """Image ``i`` over the anchors of all levels → (labels int8, matched int64), Tensor[M]."""
    flat = torch.cat(anchors)
    if config.assigner is DenseAssigner.FCOS_TORCHVISION:
        per_level = [a.shape[0] for a in anchors]
        idx = _match_fcos_tv(gt.boxes[i], flat, per_level, config.center_radius)
        labels = torch.where(idx >= 0, POSITIVE, NEGATIVE).to(torch.int8)
        return labels, idx.clamp(min=0)
    if config.assigner is DenseAssigner.FCOS_MMDET:
        strides = _per_anchor([float(s) for s in batch.strides], anchors)
        ranges = _per_anchor([list(r) for r in config.regress_ranges[: len(anchors)]], anchors)
        idx = _match_fcos_mmdet(gt.boxes[i], flat, strides, ranges, config)
        labels = torch.where(idx >= 0, POSITIVE, NEGATIVE).to(torch.int8)
        return labels, idx.clamp(min=0)
    size = batch.image_sizes[i]
    flags = valid_flags(config.anchors, batch.strides, shapes, size, num_anchors)
    if config.assigner is DenseAssigner.MAX_IOU:
        m = match(gt.boxes[i], flat, config.matcher, None if flags is None else torch.cat(flags))
        return m.labels, m.gt
    # ATSS: its assigner sees only the valid anchors; the others are left out of every loss
    valid = torch.ones(flat.shape[0], dtype=torch.bool) if flags is None else torch.cat(flags)
    per_level = (
        [int(f.sum()) for f in flags] if flags is not None else [a.shape[0] for a in anchors]
    )
    idx = _match_atss(gt.boxes[i], flat[valid], per_level, config.atss_topk)
    labels = torch.full((flat.shape[0],), IGNORED, dtype=torch.int8)
    labels[valid] = torch.where(idx >= 0, POSITIVE, NEGATIVE).to(torch.int8)
    matched = torch.zeros(flat.shape[0], dtype=torch.long)
    matched[valid] = idx.clamp(min=0)
    return labels, matched


def _units(anchors: Tensor, per_stride: bool) -> Tensor:
    """What one distance unit is, per anchor and coordinate (Tensor[M, 4]): the anchor's width
    and height (= the stride of a point's square), or a pixel."""
    if not per_stride:
        return torch.ones_like(anchors)
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    return torch.stack([w, h, w, h], -1)


def linear_encode(gt: Tensor, anchors: Tensor, per_stride: bool = True) -> Tensor:
    """torchvision's BoxLinearCoder (normalized by size) / MMDetection's point distances:
    (l, t, r, b) of ``gt`` from each anchor's centre, in units. Tensor[M, 4] x2 → Tensor[M, 4]."""
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    t = torch.stack([cx - gt[:, 0], cy - gt[:, 1], gt[:, 2] - cx, gt[:, 3] - cy], -1)
    return t / _units(anchors, per_stride)


def linear_decode(rel: Tensor, anchors: Tensor, per_stride: bool = True) -> Tensor:
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    u = _units(anchors, per_stride)
    w, h = u[:, 0], u[:, 1]
    return torch.stack(
        [cx - rel[:, 0] * w, cy - rel[:, 1] * h, cx + rel[:, 2] * w, cy + rel[:, 3] * h], -1
    )


def centerness(dist: Tensor) -> Tensor:
    """FCOS's centerness target of (l, t, r, b) distances Tensor[M, 4] → Tensor[M]:
    sqrt(min(l, r) / max(l, r) x min(t, b) / max(t, b))."""
    lr, tb = dist[:, [0, 2]], dist[:, [1, 3]]
    return torch.sqrt(
        (lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values)
    )


def _box_losses(config: DenseConfig, pred: Tensor, anchors: Tensor, gt: Tensor):
    """(box loss, centerness target) of positives: pred, anchors, matched gt Tensor[P, 4]."""
    if config.coder is DenseCoder.DISTANCES:
        units = config.distances_in_strides
        target = linear_encode(gt, anchors, units)
        boxes = linear_decode(pred, anchors, units)
        if config.framework is Framework.MMDET:  # it decodes the targets around the point too
            gt = linear_decode(target, anchors, units)
        loss = DECODED_LOSSES[config.box_loss](boxes, gt, config.beta)
        return loss, centerness(target)
    if config.box_loss in DECODED_BOX_LOSSES:
        boxes = decode(pred, anchors, config.delta_weights, DELTA_CLIP, config.delta_clip_both)
        loss = DECODED_LOSSES[config.box_loss](boxes, gt, config.beta)
    else:
        target = encode(gt, anchors, config.delta_weights)
        loss = box_loss(pred, target, config.box_loss, config.beta)
    if config.kind is DenseKind.ATSS:  # centerness of the anchor's centre in its GT
        return loss, centerness(linear_encode(gt, anchors, per_stride=False))
    return loss, torch.zeros_like(loss)


def _level(name, stride, out: DenseOutput, anchors, labels, matched, gt: UsableGt, config):
    n, a, k = out.logits.shape
    target = torch.zeros(n, a, k)
    # zeros in the graph: an image without positives gives its box and centerness layers a zero
    # gradient, as every framework's sum over an empty selection does
    box = out.deltas.sum(-1) * 0
    ctr_t = torch.zeros(n, a)
    ctr_l = (out.ctr if out.ctr is not None else out.deltas.sum(-1)) * 0
    pos = labels == POSITIVE
    for i in range(n):
        idx = pos[i].nonzero().flatten()
        if idx.numel() == 0:
            continue
        g = matched[i, idx]
        target[i, idx, gt.labels[i][g]] = 1.0
        loss, ct = _box_losses(config, out.deltas[i, idx], anchors[idx], gt.boxes[i][g])
        if config.box_weight_ctr:
            loss = loss * ct.detach()
        box = box.index_put((torch.full_like(idx, i), idx), loss)
        ctr_t[i, idx] = ct.detach()
        if out.ctr is not None:
            bce = F.binary_cross_entropy_with_logits(out.ctr[i, idx], ct, reduction="none")
            ctr_l = ctr_l.index_put((torch.full_like(idx, i), idx), bce)
    focal = focal_loss(out.logits, target, config.alpha, config.gamma).sum(-1)
    focal = focal * (labels != IGNORED)
    return DenseLevel(name=name, stride=stride, anchors=anchors, out=out, labels=labels,
                      matched=matched, focal=focal, box=box, ctr_target=ctr_t,
                      ctr_loss=ctr_l)  # fmt: skip


def _divisors(term: DenseTerm, r: DenseReplay) -> Tensor:
    """What each image's sum at each level is divided by, Tensor[N, L] float64."""
    pos = r.positives.double()
    n, levels = pos.shape
    total = float(pos.sum())
    world = r.world if term.reduced else None
    match term.normalizer:
        case DenseNormalizer.LEVEL_POS:
            d = pos.sum(0, keepdim=True).expand(n, levels)
        case DenseNormalizer.POS:
            d = torch.full((n, levels), total if world is None else world.pos)
        case DenseNormalizer.POS_PER_IMAGE:
            d = (n * pos.sum(1, keepdim=True).clamp(min=1)).expand(n, levels)
        case DenseNormalizer.MMDET_PSEUDO:
            own = float(pos.sum(1).clamp(min=1).sum())
            d = torch.full((n, levels), own if world is None else world.pseudo)
        case DenseNormalizer.EMA:
            m = r.config.ema_momentum
            d = torch.full((n, levels), ema_update(r.ema_before, total, m))
        case DenseNormalizer.CTR_SUM:
            ctr = float(r.ctr_sums.double().sum()) if world is None else world.ctr_sum
            d = torch.full((n, levels), ctr)
    return d.clamp(min=term.floor) + term.eps


def ema_update(before: float | None, pos: float, momentum: float) -> float:
    """Detectron2's normalizer update: momentum x before + (1 - momentum) x max(pos, 1), starting
    from 100 (``before`` None: the first step)."""
    old = EMA_INITIAL if before is None else before
    return old * momentum + max(pos, 1.0) * (1 - momentum)


def _normalized(num: Tensor, d: Tensor, weight: float) -> tuple[Tensor, float]:
    """sum_i num[i] / d[i] (num Tensor[N], d Tensor[N] float64) → (loss, the single divisor)."""
    if bool((d == 0).any()):
        loss = num.sum() / torch.zeros(())  # 0/0 or x/0, as the naive code computes it
        return loss * weight, 0.0
    loss = (num / d.to(num.dtype)).sum() * weight
    if bool((d == d[0]).all()):
        return loss, float(d[0])
    n = num.detach().double()
    per = float((n / d).sum())
    return loss, float(n.sum()) / per if per else float(d.mean())


def dense_losses(r: DenseReplay, profile: DenseProfile) -> DenseLosses:
    """Each level's three terms under ``profile``."""
    specs = profile.terms
    divs = {p: _divisors(s, r) for p, s in specs.items()}
    levels = []
    for lvl, level in enumerate(r.levels):
        terms, factors = {}, {}
        for part in DENSE_PARTS:
            terms[part], factors[part] = _normalized(
                level.per_image(part), divs[part][:, lvl], specs[part].weight
            )
        levels.append(DenseLevelLoss(level=level.name, terms=terms, avg_factor=factors))
    return DenseLosses(profile=profile, levels=levels)


def dense_replay(
    weights: DenseWeights,
    batch: Batch,
    config: DenseConfig,
    profiles: list[DenseProfile],
    *,
    ema_before: float | None = None,
    world: WorldCounts | None = None,
) -> DenseReplay:
    """Replay the dense head's losses on ``batch`` under each of ``profiles`` (the same
    assignment for all: their differences are differences of normalization only)."""
    weights = dataclasses.replace(
        weights,
        params={k: live(v) for k, v in weights.params.items()},
        scales=[live(s) for s in weights.scales],
    )
    gt = usable_gt(batch, weights.num_classes)
    features = [live(f) for f in batch.features.values()]
    shapes = [tuple(f.shape[2:]) for f in features]
    anchors = level_anchors(config.anchors, batch.strides, shapes, batch.pad_size)
    outs = [dense_head(f, weights, config, lvl) for lvl, f in enumerate(features)]
    assigned = [
        _assign(config, batch, gt, anchors, shapes, weights.num_anchors, i)
        for i in range(batch.num_images)
    ]
    labels, matched = torch.stack([a[0] for a in assigned]), torch.stack([a[1] for a in assigned])
    sizes = [a.shape[0] for a in anchors]
    ends = torch.tensor(sizes).cumsum(0).tolist()
    levels = [
        _level(name, stride, out, anc, labels[:, e - s : e], matched[:, e - s : e], gt, config)
        for name, stride, out, anc, s, e in zip(
            batch.levels, batch.strides, outs, anchors, sizes, ends
        )
    ]
    r = DenseReplay(weights=weights, batch=batch, config=config, features=features, gt=gt,
                    levels=levels, ema_before=ema_before, world=world)  # fmt: skip
    r.losses = {p.name: dense_losses(r, p) for p in profiles}
    return r
