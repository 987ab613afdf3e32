"""Gradient norms per profile, level, head output and parameter, split by loss term.

Cost: every profile's loss is a weighted sum of the same per-sample losses, so the derivative of
each per-sample loss at the head outputs is computed once (autograd through the loss alone) and
each profile only rescales it. The 1x1 RPN convs and the box head are then differentiated by hand,
term by term, which is cheap (fc1's weight-gradient norm uses ``||G^T X||^2 = <G G^T, X X^T>``
with ``X X^T`` shared by every term and profile). The expensive parts, the 3x3 RPN conv and
RoIAlign, get one backward per profile and head, not one per term: the 3x3 conv's parameters are
therefore reported as a total, not split by term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..inputs.profiles import LossProfile
from ..replay.engine import Replay
from ..vocab import Empty

TERMS = ("rpn_cls", "rpn_box", "roi_cls", "roi_box")
# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing
CLIP_EPS = 1e-6


@dataclass
class LevelGrads:
    """Norms for one (head, level) under one profile."""

    head: str
    level: str
    feature: float  # ||dL_head / d feature_l||
    logits_pos: float
    logits_neg: float
    deltas: float
    neg_share: float  # share of ||dL_cls / d logits||^2 from negative (and unsampled) samples
    nonfinite: int  # non-finite gradient entries at this level's head outputs


@dataclass
class ProfileGrads:
    profile: str
    levels: list[LevelGrads]
    params: dict[str, dict[str, float]]  # canonical param -> {term: norm, "total": norm}
    total_norm: float
    max_norm: float | None
    clip_coef: float
    clipped_norm: float
    neg_share: dict[str, float] = field(default_factory=dict)  # per head
    no_grad: list[str] = field(default_factory=list)  # parameters / levels that got no gradient


def _norm(t: Tensor) -> float:
    """L2 norm accumulated in float64 (no float64 copy of the tensor)."""
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) if t.numel() else 0.0


def _sq(t: Tensor) -> float:
    return _norm(t) ** 2


def _share(neg_sq: float, pos_sq: float) -> float:
    total = neg_sq + pos_sq
    return neg_sq / total if total > 0 else float("nan")


class _Shared:
    """Per-sample derivatives at the head outputs, computed once for all profiles."""

    def __init__(self, r: Replay):
        self.r = r
        self._bce, self._box, self._ce = {}, {}, None
        x = r.roi.pooled.detach().flatten(1)
        self.gram = x @ x.T if x.shape[0] else x.new_zeros(0, 0)  # [R, R], shared by every fc1 norm

    def bce(self, lvl: int) -> Tensor:
        if lvl not in self._bce:
            out = self.r.rpn[lvl]
            self._bce[lvl] = torch.autograd.grad(out.bce.sum(), out.out.logits, retain_graph=True)[
                0
            ]
        return self._bce[lvl]

    def box(self, head: str, lvl: int, term) -> Tensor:
        key = (head, lvl, term.loss, term.beta)
        if key not in self._box:
            s = self.r.samples[head][lvl]
            loss = s.box_loss(term)
            self._box[key] = (
                torch.autograd.grad(loss.sum(), s.box_pred, retain_graph=True)[0]
                if loss.numel()
                else s.box_pred.detach().new_zeros(0, 4)
            )
        return self._box[key]

    def ce(self) -> Tensor:
        if self._ce is None:
            roi = self.r.roi
            self._ce = (
                torch.autograd.grad(roi.ce.sum(), roi.cls_logits, retain_graph=True)[0]
                if roi.ce.numel()
                else roi.cls_logits.detach().clone()
            )
        return self._ce


def _coef(term, d: float) -> float:
    """d loss / d numerator: weight / D, or the empty-set cases of ``replay.losses.normalize``."""
    if d == 0:
        return 0.0 if term.empty is Empty.ZERO else math.inf * term.weight
    return term.weight / d


def _rpn(r: Replay, p: LossProfile, sh: _Shared, params: dict, rows: list, bad: list):
    heads = r.heads
    w_cls = heads.params["rpn_cls.weight"].detach().flatten(1)  # [A, C]
    w_reg = heads.params["rpn_reg.weight"].detach().flatten(1)  # [4A, C]
    a = heads.num_anchors
    grad_hidden, neg_sq, pos_sq = [], 0.0, 0.0
    for lvl, (out, loss) in enumerate(zip(r.rpn, r.losses[p.name].levels["rpn"])):
        n, c, h, w = out.out.hidden.shape
        c_cls = _coef(p.rpn_cls, loss.avg_factor)
        weight = torch.where(out.positive, p.pos_weight, 1.0) * c_cls
        g = sh.bce(lvl) * weight
        g_logits = (
            g * out.sampled if p.unsampled_leak else torch.where(out.sampled, g, torch.zeros(()))
        )
        img, anc = out.positive.nonzero(as_tuple=True)
        g_deltas = torch.zeros_like(out.out.deltas.detach())
        g_deltas[img, anc] = sh.box("rpn", lvl, p.rpn_box) * _coef(p.rpn_box, loss.avg_factor_bbox)
        if p.unsampled_leak:
            g_deltas = (
                g_deltas + out.out.deltas.detach() * 0
            )  # 0 * inf = NaN, as the weight-multiply does
        # channel-first [N, outputs, H*W], so the 1x1 convs' gradients are batched matmuls
        gl = g_logits.view(n, h * w, a).transpose(1, 2)
        gd = g_deltas.view(n, h * w, 4 * a).transpose(1, 2)
        hid = out.out.hidden.detach().flatten(2)  # [N, C, H*W]
        hid_t = hid.transpose(1, 2)
        _add(params, "rpn_cls", "rpn_cls.weight", torch.matmul(gl, hid_t).sum(0)[:, :, None, None])
        _add(params, "rpn_cls", "rpn_cls.bias", gl.sum((0, 2)))
        _add(params, "rpn_box", "rpn_reg.weight", torch.matmul(gd, hid_t).sum(0)[:, :, None, None])
        _add(params, "rpn_box", "rpn_reg.bias", gd.sum((0, 2)))
        g_all = torch.cat([gl, gd], 1)  # [N, 5A, H*W]
        w_all = torch.cat([w_cls, w_reg], 0)  # [5A, C]
        grad_hidden.append(torch.matmul(w_all.T, g_all).view(n, c, h, w))
        pos, neg = _sq(g_logits[out.positive]), _sq(g_logits[~out.positive])
        pos_sq, neg_sq = pos_sq + pos, neg_sq + neg
        rows.append(
            LevelGrads(
                "rpn",
                out.name,
                math.nan,
                math.sqrt(pos),
                math.sqrt(neg),
                _norm(g_deltas),
                _share(neg, pos),
                int((~torch.isfinite(g_logits)).sum() + (~torch.isfinite(g_deltas)).sum()),
            )
        )
    conv_w, conv_b = heads.params["rpn_conv.weight"], heads.params["rpn_conv.bias"]
    grads = torch.autograd.grad(
        [o.out.hidden for o in r.rpn],
        list(r.features) + [conv_w, conv_b],
        grad_outputs=grad_hidden,
        retain_graph=True,
    )
    for row, gf in zip(rows[-len(r.rpn) :], grads):
        row.feature = _norm(gf)
        if row.feature == 0:
            bad.append(f"rpn features {row.level}")
    params.setdefault("rpn_conv.weight", {})["total"] = grads[-2]
    params.setdefault("rpn_conv.bias", {})["total"] = grads[-1]
    return _share(neg_sq, pos_sq)


def _add(params: dict, term: str, name: str, g: Tensor):
    slot = params.setdefault(name, {})
    slot[term] = slot[term] + g if term in slot else g


def _roi(r: Replay, p: LossProfile, sh: _Shared, params: dict, rows: list, bad: list):
    heads, roi = r.heads, r.roi
    P = heads.params
    n_levels = len(r.samples["roi"])
    fg = roi.fg_class >= 0
    losses = r.losses[p.name].levels["roi"]
    c_cls = (
        torch.tensor([_coef(p.roi_cls, l.avg_factor) for l in losses])[roi.level]
        if roi.level.numel()
        else torch.zeros(0)
    )
    g_cls = sh.ce() * (torch.where(fg, p.pos_weight, 1.0) * c_cls)[:, None]
    g_reg = torch.zeros_like(roi.deltas.detach())
    pos_rows = fg.nonzero().flatten()
    for lvl, loss in enumerate(losses):
        rows_l = pos_rows[roi.level[pos_rows] == lvl]
        if rows_l.numel():
            g_reg[rows_l, heads.reg_slot(roi.fg_class[rows_l])] = sh.box(
                "roi", lvl, p.roi_box
            ) * _coef(p.roi_box, loss.avg_factor_bbox)
    h1, h2 = roi.hidden1.detach(), roi.hidden.detach()
    g_reg_flat = g_reg.flatten(1)
    gp1_total = None
    for term, g_out, w_out, name in (
        ("roi_cls", g_cls, P["cls.weight"], "cls"),
        ("roi_box", g_reg_flat, P["reg.weight"], "reg"),
    ):
        _add(params, term, f"{name}.weight", g_out.T @ h2)
        _add(params, term, f"{name}.bias", g_out.sum(0))
        gp2 = (g_out @ w_out.detach()) * (h2 > 0)
        _add(params, term, "fc2.weight", gp2.T @ h1)
        _add(params, term, "fc2.bias", gp2.sum(0))
        gp1 = (gp2 @ P["fc2.weight"].detach()) * (h1 > 0)
        _add(params, term, "fc1.bias", gp1.sum(0))
        params.setdefault("fc1.weight", {})[term] = _gram_norm_sq(gp1, sh.gram)
        gp1_total = gp1 if gp1_total is None else gp1_total + gp1
    params["fc1.weight"]["total"] = _gram_norm_sq(gp1_total, sh.gram)
    g_pooled = (gp1_total @ P["fc1.weight"].detach()).view_as(roi.pooled)
    feats = list(r.features[:n_levels])
    g_feat = torch.autograd.grad(
        roi.pooled, feats, grad_outputs=g_pooled, retain_graph=True, allow_unused=True
    )
    neg_sq = pos_sq = 0.0
    for lvl in range(n_levels):
        at = roi.level == lvl
        pos, neg = _sq(g_cls[at & fg]), _sq(g_cls[at & ~fg])
        pos_sq, neg_sq = pos_sq + pos, neg_sq + neg
        gf = g_feat[lvl]
        rows.append(
            LevelGrads(
                "roi",
                r.samples["roi"][lvl].name,
                _norm(gf) if gf is not None else 0.0,
                math.sqrt(pos),
                math.sqrt(neg),
                _norm(g_reg[at]),
                _share(neg, pos),
                int((~torch.isfinite(g_cls[at])).sum() + (~torch.isfinite(g_reg[at])).sum()),
            )
        )
    return _share(neg_sq, pos_sq)


def _gram_norm_sq(g: Tensor, gram: Tensor) -> Tensor:
    """||g^T X||_F^2 from the Gram matrix X X^T (a 0-d tensor, so it sums like a squared norm)."""
    if g.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64)
    return ((g @ g.T).double() * gram.double()).sum().clamp(min=0)


def profile_gradients(r: Replay, p: LossProfile, shared: _Shared | None = None) -> ProfileGrads:
    """All gradient norms of one replayed profile."""
    sh = shared or _Shared(r)
    params: dict[str, dict] = {}
    rows: list[LevelGrads] = []
    bad: list[str] = []
    share = {"rpn": _rpn(r, p, sh, params, rows, bad), "roi": _roi(r, p, sh, params, rows, bad)}
    norms: dict[str, dict[str, float]] = {}
    total_sq = 0.0
    for name, by_term in params.items():
        entry = {}
        for term in TERMS:
            g = by_term.get(term)
            entry[term] = (
                math.sqrt(float(g))
                if isinstance(g, Tensor) and g.dim() == 0
                else (
                    _norm(g)
                    if g is not None
                    else (math.nan if name.startswith("rpn_conv") else 0.0)
                )
            )
        if "total" in by_term:
            g = by_term["total"]
            tot_sq = float(g) if g.dim() == 0 else _sq(g)
        else:
            tot = sum((g for t, g in by_term.items() if t != "total"), torch.zeros(()))
            tot_sq = _sq(tot)
        entry["total"] = math.sqrt(tot_sq) if tot_sq == tot_sq else math.nan
        total_sq += tot_sq
        if entry["total"] == 0:
            bad.append(name)
        norms[name] = entry
    total = math.sqrt(total_sq) if total_sq == total_sq else math.nan
    coef = (
        min(1.0, p.max_norm / (total + CLIP_EPS))
        if p.max_norm is not None and total == total
        else (math.nan if total != total else 1.0)
    )
    return ProfileGrads(p.name, rows, norms, total, p.max_norm, coef, total * coef, share, bad)


def gradients(r: Replay) -> dict[str, ProfileGrads]:
    """Gradient norms for every replayed profile, sharing the per-sample derivatives."""
    sh = _Shared(r)
    return {name: profile_gradients(r, pl.profile, sh) for name, pl in r.losses.items()}
