"""The vocabulary: every head, loss term, normalizer, severity and other closed set of names is
spelled once, here.

Members are ``StrEnum``s, so they compare equal to, and serialize as, the strings the JSON and CSV
reports carry. Code elsewhere names them as members (``Head.RPN``), never as string literals, and
every dispatch over them covers each member.
"""

from __future__ import annotations

from enum import StrEnum


class Head(StrEnum):
    """A head of the detector, as the ``head`` column of the tables names it."""

    RPN = "rpn"
    ROI = "roi"
    MASK = "mask"
    DENSE = "dense"  # a one-stage detector's dense head (RetinaNet, FCOS, ATSS)


class Part(StrEnum):
    """What a loss term of a head scores; the levels table has a ``loss_<part>`` column each."""

    CLS = "cls"
    BOX = "bbox"
    MASK = "mask"
    CTR = "ctr"  # FCOS/ATSS centerness


class Term(StrEnum):
    """A loss term: one (head, part) pair, summed over levels."""

    RPN_CLS = "rpn_cls"
    RPN_BOX = "rpn_box"
    ROI_CLS = "roi_cls"
    ROI_BOX = "roi_box"
    ROI_MASK = "roi_mask"
    DENSE_CLS = "dense_cls"
    DENSE_BOX = "dense_box"
    DENSE_CTR = "dense_ctr"

    @property
    def head(self) -> Head:
        return TERM_PARTS[self][0]

    @property
    def part(self) -> Part:
        return TERM_PARTS[self][1]


TERM_PARTS: dict[Term, tuple[Head, Part]] = {
    Term.RPN_CLS: (Head.RPN, Part.CLS),
    Term.RPN_BOX: (Head.RPN, Part.BOX),
    Term.ROI_CLS: (Head.ROI, Part.CLS),
    Term.ROI_BOX: (Head.ROI, Part.BOX),
    Term.ROI_MASK: (Head.MASK, Part.MASK),
    Term.DENSE_CLS: (Head.DENSE, Part.CLS),
    Term.DENSE_BOX: (Head.DENSE, Part.BOX),
    Term.DENSE_CTR: (Head.DENSE, Part.CTR),
}
# The four Faster R-CNN terms, in report order; the mask term joins them when a mask head exists.
BOX_TERMS = (Term.RPN_CLS, Term.RPN_BOX, Term.ROI_CLS, Term.ROI_BOX)
TERMS = (*BOX_TERMS, Term.ROI_MASK)
# a one-stage detector's terms; the centerness term only where the head has one
DENSE_TERMS = (Term.DENSE_CLS, Term.DENSE_BOX, Term.DENSE_CTR)


def term_of(head: Head, part: Part) -> Term:
    """The term a head's part is reported under."""
    for term, hp in TERM_PARTS.items():
        if hp == (head, part):
            return term
    raise KeyError(f"{head} has no {part} term")


def head_terms(head: Head) -> tuple[Term, ...]:
    """The terms of one head, in report order."""
    return tuple(t for t in (*TERMS, *DENSE_TERMS) if t.head == head)


class Layer(StrEnum):
    """A layer of the heads, named by what it is (its key in a checkpoint depends on the layout)."""

    RPN_CONV = "rpn_conv"
    RPN_CONV2 = "rpn_conv2"
    RPN_LOGITS = "rpn_logits"
    RPN_DELTAS = "rpn_deltas"
    BOX_CONV1 = "box_conv1"
    BOX_CONV2 = "box_conv2"
    BOX_CONV3 = "box_conv3"
    BOX_CONV4 = "box_conv4"
    BOX_NORM1 = "box_norm1"
    BOX_NORM2 = "box_norm2"
    BOX_NORM3 = "box_norm3"
    BOX_NORM4 = "box_norm4"
    # a C4 model's box head: ResNet's res5 stage (3 bottleneck blocks, the first with a
    # projection shortcut), each conv with its frozen BatchNorm
    RES5_0_CONV1 = "res5_0_conv1"
    RES5_0_NORM1 = "res5_0_norm1"
    RES5_0_CONV2 = "res5_0_conv2"
    RES5_0_NORM2 = "res5_0_norm2"
    RES5_0_CONV3 = "res5_0_conv3"
    RES5_0_NORM3 = "res5_0_norm3"
    RES5_1_CONV1 = "res5_1_conv1"
    RES5_1_NORM1 = "res5_1_norm1"
    RES5_1_CONV2 = "res5_1_conv2"
    RES5_1_NORM2 = "res5_1_norm2"
    RES5_1_CONV3 = "res5_1_conv3"
    RES5_1_NORM3 = "res5_1_norm3"
    RES5_2_CONV1 = "res5_2_conv1"
    RES5_2_NORM1 = "res5_2_norm1"
    RES5_2_CONV2 = "res5_2_conv2"
    RES5_2_NORM2 = "res5_2_norm2"
    RES5_2_CONV3 = "res5_2_conv3"
    RES5_2_NORM3 = "res5_2_norm3"
    RES5_0_SHORTCUT = "res5_0_shortcut"
    RES5_0_SHORTCUT_NORM = "res5_0_shortcut_norm"
    # MMDetection's double head (DoubleConvFCBBoxHead): the regression branch's residual block
    # (a 3x3 and a 1x1 conv, a 1x1 identity projection) and up to 4 bottleneck blocks, each conv
    # with its BatchNorm; the classification branch is the fcs
    DH_RES_CONV1 = "dh_res_conv1"
    DH_RES_NORM1 = "dh_res_norm1"
    DH_RES_CONV2 = "dh_res_conv2"
    DH_RES_NORM2 = "dh_res_norm2"
    DH_RES_IDENTITY = "dh_res_identity"
    DH_RES_IDENTITY_NORM = "dh_res_identity_norm"
    DH_0_CONV1 = "dh_0_conv1"
    DH_0_NORM1 = "dh_0_norm1"
    DH_0_CONV2 = "dh_0_conv2"
    DH_0_NORM2 = "dh_0_norm2"
    DH_0_CONV3 = "dh_0_conv3"
    DH_0_NORM3 = "dh_0_norm3"
    DH_1_CONV1 = "dh_1_conv1"
    DH_1_NORM1 = "dh_1_norm1"
    DH_1_CONV2 = "dh_1_conv2"
    DH_1_NORM2 = "dh_1_norm2"
    DH_1_CONV3 = "dh_1_conv3"
    DH_1_NORM3 = "dh_1_norm3"
    DH_2_CONV1 = "dh_2_conv1"
    DH_2_NORM1 = "dh_2_norm1"
    DH_2_CONV2 = "dh_2_conv2"
    DH_2_NORM2 = "dh_2_norm2"
    DH_2_CONV3 = "dh_2_conv3"
    DH_2_NORM3 = "dh_2_norm3"
    DH_3_CONV1 = "dh_3_conv1"
    DH_3_NORM1 = "dh_3_norm1"
    DH_3_CONV2 = "dh_3_conv2"
    DH_3_NORM2 = "dh_3_norm2"
    DH_3_CONV3 = "dh_3_conv3"
    DH_3_NORM3 = "dh_3_norm3"
    BOX_FC1 = "box_fc1"
    BOX_FC2 = "box_fc2"
    BOX_LOGITS = "box_logits"
    BOX_DELTAS = "box_deltas"
    MASK_CONV1 = "mask_conv1"
    MASK_CONV2 = "mask_conv2"
    MASK_CONV3 = "mask_conv3"
    MASK_CONV4 = "mask_conv4"
    MASK_NORM1 = "mask_norm1"
    MASK_NORM2 = "mask_norm2"
    MASK_NORM3 = "mask_norm3"
    MASK_NORM4 = "mask_norm4"
    MASK_DECONV = "mask_deconv"
    MASK_LOGITS = "mask_logits"

    @property
    def head(self) -> Head:
        if self in RPN_LAYERS:
            return Head.RPN
        return Head.MASK if self in MASK_LAYERS else Head.ROI


# the RPN's 3x3 convs (torchvision's v2 models have two), in order
RPN_CONVS = (Layer.RPN_CONV, Layer.RPN_CONV2)
RPN_LAYERS = (*RPN_CONVS, Layer.RPN_LOGITS, Layer.RPN_DELTAS)
# a box head's 3x3 convs (each followed by its normalization, where it has one), then its fcs
BOX_CONVS = (Layer.BOX_CONV1, Layer.BOX_CONV2, Layer.BOX_CONV3, Layer.BOX_CONV4)
BOX_NORMS = (Layer.BOX_NORM1, Layer.BOX_NORM2, Layer.BOX_NORM3, Layer.BOX_NORM4)
BOX_FCS = (Layer.BOX_FC1, Layer.BOX_FC2)
# res5's bottleneck blocks: each block's (conv1, conv2, conv3), the first block's shortcut
RES5_BLOCKS = tuple(tuple(Layer(f"res5_{b}_conv{i}") for i in (1, 2, 3)) for b in range(3))
RES5_SHORTCUT = Layer.RES5_0_SHORTCUT
RES5_CONVS = (*(c for block in RES5_BLOCKS for c in block), RES5_SHORTCUT)
RES5_NORMS = (
    *(Layer(f"res5_{b}_norm{i}") for b in range(3) for i in (1, 2, 3)),
    Layer.RES5_0_SHORTCUT_NORM,
)
# the double head's residual block: (3x3 conv, 1x1 conv, identity projection)
DH_RES = (Layer.DH_RES_CONV1, Layer.DH_RES_CONV2, Layer.DH_RES_IDENTITY)
# its bottleneck blocks, each (conv1, conv2, conv3)
DH_BLOCKS = tuple(tuple(Layer(f"dh_{k}_conv{i}") for i in (1, 2, 3)) for k in range(4))
DH_CONVS = (*DH_RES, *(c for block in DH_BLOCKS for c in block))
DH_NORMS = (
    Layer.DH_RES_NORM1, Layer.DH_RES_NORM2, Layer.DH_RES_IDENTITY_NORM,
    *(Layer(f"dh_{k}_norm{i}") for k in range(4) for i in (1, 2, 3)),
)  # fmt: skip
BOX_LAYERS = (
    *BOX_CONVS, *BOX_NORMS, *RES5_CONVS, *RES5_NORMS, *DH_CONVS, *DH_NORMS, *BOX_FCS,
    Layer.BOX_LOGITS, Layer.BOX_DELTAS,
)  # fmt: skip
MASK_CONVS = (Layer.MASK_CONV1, Layer.MASK_CONV2, Layer.MASK_CONV3, Layer.MASK_CONV4)
MASK_NORMS = (Layer.MASK_NORM1, Layer.MASK_NORM2, Layer.MASK_NORM3, Layer.MASK_NORM4)
MASK_LAYERS = (*MASK_CONVS, *MASK_NORMS, Layer.MASK_DECONV, Layer.MASK_LOGITS)
# each conv's normalization layer
NORM_OF: dict[Layer, Layer] = dict(
    zip(
        BOX_CONVS + MASK_CONVS + RES5_CONVS + DH_CONVS,
        BOX_NORMS + MASK_NORMS + RES5_NORMS + DH_NORMS,
    )
)
# the parameters of a layer; a BatchNorm's running statistics are kept beside them
WEIGHT, BIAS = "weight", "bias"
RUNNING_MEAN, RUNNING_VAR = "running_mean", "running_var"


_BOX_HEAD_TERMS = (Term.ROI_CLS, Term.ROI_BOX)
# the loss terms whose gradient reaches a layer's parameters
LAYER_TERMS: dict[Layer, tuple[Term, ...]] = {
    **dict.fromkeys(RPN_CONVS, (Term.RPN_CLS, Term.RPN_BOX)),
    Layer.RPN_LOGITS: (Term.RPN_CLS,),
    Layer.RPN_DELTAS: (Term.RPN_BOX,),
    **dict.fromkeys(BOX_CONVS + BOX_NORMS + RES5_CONVS + RES5_NORMS + BOX_FCS, _BOX_HEAD_TERMS),
    # the double head's regression branch reaches only the box term
    **dict.fromkeys(DH_CONVS + DH_NORMS, (Term.ROI_BOX,)),
    Layer.BOX_LOGITS: (Term.ROI_CLS,),
    Layer.BOX_DELTAS: (Term.ROI_BOX,),
    **dict.fromkeys(MASK_LAYERS, (Term.ROI_MASK,)),
}


def param(layer: Layer, kind: str, stage: int = 0) -> str:
    """The canonical name of a head parameter, e.g. ``rpn_logits.weight``; a later cascade
    stage's box layers are ``stage1.box_fc1.weight``."""
    return f"{layer}.{kind}" if stage == 0 else f"stage{stage}.{layer}.{kind}"


class Normalizer(StrEnum):
    """What a loss term's sum is divided by (see ``inputs.profiles``)."""

    LEVEL_SAMPLED = "level_sampled"
    LEVEL_POS = "level_pos"
    SAMPLED = "sampled"
    POS = "pos"
    BUDGET = "budget"
    MMDET_SAMPLER = "mmdet_sampler"
    MMDET_PSEUDO = "mmdet_pseudo"
    MASK_PIXELS = "mask_pixels"


# normalizers that count one level's samples: the naive per-level loss of each level
PER_LEVEL_NORMALIZERS = (Normalizer.LEVEL_SAMPLED, Normalizer.LEVEL_POS)


class LossKind(StrEnum):
    """The per-sample loss of a term."""

    BCE = "bce"
    CE = "ce"
    L1 = "l1"
    SMOOTH_L1 = "smooth_l1"
    BALANCED_L1 = "balanced_l1"  # Libra R-CNN's BalancedL1Loss (alpha 0.5, gamma 1.5; beta)
    GIOU = "giou"  # 1 - GIoU of the decoded box and its GT (MMDetection's GIoULoss)
    IOU = "iou"  # -log IoU of the decoded box and its GT (MMDetection's IoULoss, mode 'log')
    DIOU = "diou"  # 1 - DIoU (MMDetection's DIoULoss)
    CIOU = "ciou"  # 1 - CIoU (MMDetection's CIoULoss)
    BOUNDED_IOU = "bounded_iou"  # MMDetection's BoundedIoULoss (beta: its smoothing)
    # Detectron2's box_reg_loss_type giou / diou / ciou (fvcore's GIoU, its own DIoU and CIoU):
    # the same quantities with eps 1e-7 added, and a CIoU without mmdet's IoU > 0.5 gate
    GIOU_D2 = "giou_d2"
    DIOU_D2 = "diou_d2"
    CIOU_D2 = "ciou_d2"


CLS_LOSSES = (LossKind.BCE, LossKind.CE)
# box losses on the boxes the deltas decode to, against the GT boxes (reg_decoded_bbox)
DECODED_BOX_LOSSES = (
    LossKind.GIOU, LossKind.IOU, LossKind.DIOU, LossKind.CIOU, LossKind.BOUNDED_IOU,
    LossKind.GIOU_D2, LossKind.DIOU_D2, LossKind.CIOU_D2,
)  # fmt: skip
BOX_LOSSES = (LossKind.L1, LossKind.SMOOTH_L1, LossKind.BALANCED_L1, *DECODED_BOX_LOSSES)


class Empty(StrEnum):
    """What a term over an empty set yields: NaN (0/0, the naive code) or a zero with a graph."""

    NAN = "nan"
    ZERO = "zero"


class ProfileSource(StrEnum):
    """Where the report learnt the run's own loss profile."""

    DUMP = "dump"  # recorded in the dump by its capture
    GIVEN = "given"  # --old
    DEFAULT = "default"  # neither: the default old profile is assumed
    CONFIG = "config"  # a one-stage head's: its framework's normalizer, as its config says


class Precision(StrEnum):
    """The floating-point type the heads' layers run in (CPU autocast for the low ones); the
    names a dump's ``meta["amp"]["dtype"]`` and ``--precision`` use."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def low(self) -> bool:
        return self is not Precision.FP32


# torch dtype names (``str(dtype)`` without ``torch.``) → precision, as captures record them
PRECISION_OF_DTYPE = {
    "float32": Precision.FP32,
    "float": Precision.FP32,
    "float16": Precision.FP16,
    "half": Precision.FP16,
    "bfloat16": Precision.BF16,
}


class PrecisionSource(StrEnum):
    """Where the report learnt the precision the run trained in."""

    GIVEN = "given"  # --precision
    DUMP = "dump"  # meta["amp"]["dtype"] (the autocast dtype the capture saw)
    FEATURES = "feature-dtype"  # the dtype the features were dumped in
    DEFAULT = "default"  # none of them: fp32


class Severity(StrEnum):
    """How much a finding matters; members sort most severe first by ``rank``."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        return list(Severity).index(self)


class FailOn(StrEnum):
    """The ``--fail-on`` threshold: a severity, or never."""

    ERROR = "error"
    WARNING = "warning"
    NEVER = "never"

    def fails(self, worst: Severity | None) -> bool:
        """Whether a report whose worst finding is ``worst`` fails at this threshold."""
        if self is FailOn.NEVER or worst is None:
            return False
        return worst.rank <= Severity(self.value).rank


class Layout(StrEnum):
    """A checkpoint's key layout (which framework wrote it)."""

    TORCHVISION = "torchvision"
    MMDET = "mmdet"
    DETECTRON2 = "detectron2"


class Framework(StrEnum):
    """The framework a run trained with, as a dump's ``meta["framework"]`` records it."""

    TORCHVISION = "torchvision"
    MMDET = "mmdet"
    DETECTRON2 = "detectron2"
    CUSTOM = "custom"


class Background(StrEnum):
    """Where the classifier keeps its background logit."""

    FIRST = "first"
    LAST = "last"


class Mapper(StrEnum):
    """How a RoI is mapped to its pooling level."""

    TORCHVISION = "torchvision"
    DETECTRON2 = "detectron2"
    MMDET = "mmdet"


class Ranking(StrEnum):
    """Whose top-k, sort and batched NMS rank the RPN's candidates and the test-time detections.

    The three frameworks keep the same boxes unless scores tie; on ties, their sorts (stable or
    not, on logits or on probabilities) decide which box survives and where the top-n cut falls.
    """

    TORCHVISION = "torchvision"
    DETECTRON2 = "detectron2"
    MMDET = "mmdet"


class GradTerm(StrEnum):
    """The ``term`` of a non-finite origin found in a gradient (while its loss term is finite)."""

    GRAD = "grad"


GRADIENT_TERM = GradTerm.GRAD


class Stage(StrEnum):
    """A stage of the data flow where a NaN/Inf can first appear, in data-flow order."""

    INPUT = "input"
    WEIGHTS = "weights"
    OUTPUTS = "outputs"
    PROPOSALS = "proposals"
    TARGETS = "targets"
    PER_SAMPLE = "per-sample loss"
    NORMALIZER = "normalizer"
    LEVEL_LOSS = "level loss"
    GRADIENTS = "gradients"


class Scope(StrEnum):
    """Whose problem a finding is, once the report knows the run's own loss profile: the run's
    (its own profile, or the batch and checkpoint), or only the what-if profile's."""

    RUN = "run"
    WHAT_IF = "what-if"


class Funnel(StrEnum):
    """The stages a GT object passes on its way to a RoI positive, where it can be lost."""

    ANCHORS = "with a positive anchor"
    SAMPLED = "with a sampled positive anchor"
    PROPOSALS = "covered by a proposal"
    ROI = "with a RoI positive from a proposal"


class Phase(StrEnum):
    """A phase of ``inspect``, as its progress line names it."""

    LOAD = "reading the checkpoint (every tensor scanned for NaN/Inf) and the batch"
    REPLAY = "replaying the RPN and RoI losses"
    GRADIENTS = "computing gradients"
    TRACE = "tracing NaN/Inf to their first stage"
    SYMPTOM = "running the heads in test mode"
    PRECISION = "checking the low precision against fp32"
    FINDINGS = "checking the findings"


# ``--ray`` given without an address: start a local Ray cluster for the scan
LOCAL_RAY = "local"


class DumpStatus(StrEnum):
    """How a scan's replay of one dump ended."""

    OK = "ok"
    FAILED = "failed"


class CascadeScores(StrEnum):
    """How a cascade's test-mode class scores join its stages'."""

    MEAN_LOGITS = "mean-logits"  # MMDetection: the stages' logits averaged, then the softmax
    MEAN_PROBABILITIES = "mean-probabilities"  # Detectron2: each stage's softmax, averaged


class MaskTarget(StrEnum):
    """How a framework cuts a positive RoI's mask target out of its GT mask."""

    TORCHVISION = "torchvision"  # RoIAlign (not aligned, adaptive sampling), fractional values
    MMDET = "mmdet"  # the RoI clipped to the mask; aligned RoIAlign, then >= 0.5
    DETECTRON2 = "detectron2"  # aligned RoIAlign, then >= 0.5


class Trigger(StrEnum):
    """Why a capture was written, as its ``meta["trigger"]["kind"]`` records it."""

    NONFINITE_LOSS = "loss-not-finite"
    NONFINITE_GRAD = "grad-not-finite"
    GRAD_NORM = "grad-norm"
    EXCEPTION = "exception"  # raised inside the model's forward or loss
    BEFORE_NONFINITE = "step-before-not-finite"  # the step before a non-finite one, kept in memory
    PERIODIC = "periodic"  # every N steps, asked for
    LOSS_SCALE_COLLAPSED = "loss-scale-collapsed"  # a GradScaler's scale fell below its floor

    @property
    def trouble(self) -> bool:
        """Whether it counts against the capture budget (everything but the period)."""
        return self is not Trigger.PERIODIC


class Weights(StrEnum):
    """What a capture's checkpoint holds."""

    ALL = "whole-model"  # the whole model's state_dict
    HEADS = "heads"  # the heads' tensors; the rest summarized (finiteness, norm) in the meta


class DenseKind(StrEnum):
    """A one-stage detector's dense head."""

    RETINANET = "retinanet"  # anchors, IoU assignment, focal loss
    FCOS = "fcos"  # points, in-box / centre / scale-range assignment, centerness
    ATSS = "atss"  # anchors, adaptive top-k assignment per level, centerness


class DenseAssigner(StrEnum):
    """How a dense head's anchors or points are assigned to GT boxes."""

    MAX_IOU = "max-iou"  # IoU thresholds and the low-quality pass (all three RetinaNets)
    FCOS_TORCHVISION = "fcos-torchvision"  # centre radius x anchor size, range 4..8 anchor sizes
    FCOS_MMDET = "fcos-mmdet"  # regress_ranges per level, optional centre sampling
    ATSS = "atss"  # top-k by centre distance per level, IoU >= mean + std, centre inside


class DenseCoder(StrEnum):
    """How a dense head's box outputs encode a box."""

    DELTAS = "deltas"  # (dx, dy, dw, dh) on an anchor (RetinaNet, ATSS)
    DISTANCES = "distances"  # (l, t, r, b) from a point, in pixels or strides (FCOS)


class DenseNormalizer(StrEnum):
    """What a dense head's term sum is divided by (see ``inputs.dense``)."""

    LEVEL_POS = "level_pos"  # positives of this level: the naive per-level mean
    POS = "pos"  # positives of the batch (all levels, all images)
    POS_PER_IMAGE = "pos_per_image"  # torchvision RetinaNet: per image max(1, fg_i), x images
    MMDET_PSEUDO = "mmdet_pseudo"  # sum over images of max(#pos_i, 1) (PseudoSampler)
    EMA = "ema"  # Detectron2: 0.9 x the running value + 0.1 x max(#pos, 1)
    CTR_SUM = "ctr_sum"  # the positives' centerness targets summed (FCOS/ATSS box term)


class DenseLayer(StrEnum):
    """A layer of a dense head: the classification and box towers, then the predictors."""

    CLS_CONV1 = "dense_cls_conv1"
    CLS_CONV2 = "dense_cls_conv2"
    CLS_CONV3 = "dense_cls_conv3"
    CLS_CONV4 = "dense_cls_conv4"
    CLS_NORM1 = "dense_cls_norm1"
    CLS_NORM2 = "dense_cls_norm2"
    CLS_NORM3 = "dense_cls_norm3"
    CLS_NORM4 = "dense_cls_norm4"
    BOX_CONV1 = "dense_box_conv1"
    BOX_CONV2 = "dense_box_conv2"
    BOX_CONV3 = "dense_box_conv3"
    BOX_CONV4 = "dense_box_conv4"
    BOX_NORM1 = "dense_box_norm1"
    BOX_NORM2 = "dense_box_norm2"
    BOX_NORM3 = "dense_box_norm3"
    BOX_NORM4 = "dense_box_norm4"
    LOGITS = "dense_logits"
    DELTAS = "dense_deltas"
    CTR = "dense_ctr"


DENSE_CLS_CONVS = (DenseLayer.CLS_CONV1, DenseLayer.CLS_CONV2, DenseLayer.CLS_CONV3,
                   DenseLayer.CLS_CONV4)  # fmt: skip
DENSE_CLS_NORMS = (DenseLayer.CLS_NORM1, DenseLayer.CLS_NORM2, DenseLayer.CLS_NORM3,
                   DenseLayer.CLS_NORM4)  # fmt: skip
DENSE_BOX_CONVS = (DenseLayer.BOX_CONV1, DenseLayer.BOX_CONV2, DenseLayer.BOX_CONV3,
                   DenseLayer.BOX_CONV4)  # fmt: skip
DENSE_BOX_NORMS = (DenseLayer.BOX_NORM1, DenseLayer.BOX_NORM2, DenseLayer.BOX_NORM3,
                   DenseLayer.BOX_NORM4)  # fmt: skip
