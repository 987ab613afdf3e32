#!/usr/bin/env bash
# The MMDetection 3.3.0 environment (CPU only) of the framework tests
# (scripts/test-frameworks.sh builds it).
#
#   bash mmdet.sh [VENV_DIR]              # default ~/.cache/lossdoctor-envs/mmdet (recreated)
#
# Assumes python3.11 and pip reaching the package registry (torch 2.13.0+cpu from a local wheel
# folder where the machine has one). Takes ~2-3 minutes.  Keep the venv OUTSIDE any git repo.
#
# Why each step:
# * torch==2.13.0+cpu: the local CPU wheel (avoids the CUDA wheels).
# * setuptools<81: mmengine 0.10.7 (mmengine/utils/package_utils.py) imports
#   pkg_resources, which setuptools>=81 no longer ships.
# * mmcv-lite==2.1.0: mmdet 3.3.0 asserts 2.0.0rc4 <= mmcv < 2.2.0 at import;
#   full mmcv has no wheel for this torch and must be compiled (77 C++ files,
#   ~40 min on 2 cores), so the pure-python mmcv-lite is used instead.
# * mmdet==3.3.0 --no-deps + its runtime deps installed explicitly.
# * mmcv/_ext.py stub (written below): every mmcv/ops/*.py calls
#   ext_loader.load_ext('_ext', [...]) at import, which only imports
#   mmcv._ext and checks hasattr.  The stub satisfies that; calling any
#   compiled op raises NotImplementedError, except nms (pure-torch port of
#   mmcv's CPU kernel) so mmcv.ops.nms / batched_nms (RPN proposals) work.
#   The losses (RPNHead.loss_by_feat, BBoxHead.loss_and_target) use no
#   compiled op.
set -euo pipefail

VENV="${1:-$HOME/.cache/lossdoctor-envs/mmdet}"
PYTHON="${PYTHON:-python3}"

rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" --disable-pip-version-check)

# exact versions of the working venv (pip freeze, 2026-11-29)
LOCK="$(mktemp)"
trap 'rm -f "$LOCK"' EXIT
cat > "$LOCK" <<'EOF'
addict==2.4.0
contourpy==1.3.3
cycler==0.12.1
filelock==4.3.1
fonttools==4.68.0
fsspec==2026.9.0
Jinja2==3.1.6
kiwisolver==1.5.1
markdown-it-py==4.3.0
MarkupSafe==3.0.4
matplotlib==3.11.2
mdurl==0.1.2
mmcv-lite==2.1.0
mmdet==3.3.0
mmengine==0.10.7
mpmath==1.3.0
networkx==3.6.1
numpy==2.4.6
opencv-python==5.0.0.93
pillow==13.0.0
platformdirs==4.14.8
pycocotools==2.0.11
Pygments==2.21.0
pyparsing==3.3.3
python-dateutil==4.0.0
PyYAML==6.0.4
rich==15.0.0
scipy==1.17.1
shapely==2.2.0
six==1.17.0
sympy==1.14.0
termcolor==3.3.0
terminaltables==3.1.10
torch==2.13.0+cpu
tqdm==4.70.1
typing_extensions==4.16.0
tzdata==2026.6
yapf==0.43.0
EOF

"${PIP[@]}" install --upgrade pip wheel "setuptools<81"
"${PIP[@]}" install -c "$LOCK" "torch==2.13.0+cpu"
"${PIP[@]}" install -c "$LOCK" "mmengine==0.10.7" "mmcv-lite==2.1.0"
"${PIP[@]}" install --no-deps "mmdet==3.3.0"
"${PIP[@]}" install -c "$LOCK" numpy scipy shapely six terminaltables tqdm \
  pycocotools matplotlib

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cat > "$SITE/mmcv/_ext.py" <<'EOF'
"""Stand-in for mmcv's compiled extension ``mmcv._ext`` (mmcv-lite ships none).

Written by lossdoctor's scripts/envs/mmdet.sh into the venv's site-packages/mmcv/_ext.py.  It
lives ONLY inside that venv.

Every ``mmcv/ops/*.py`` module runs ``ext_loader.load_ext('_ext', [names])`` at
import time, which merely imports ``mmcv._ext`` and checks ``hasattr`` for each
name.  Here every public attribute resolves to a function that raises
NotImplementedError when *called*, so ``import mmcv.ops`` (and therefore all of
mmdet) imports fine, while any real use of a compiled op fails loudly.

Exception: ``nms`` is implemented in pure torch, following mmcv's CPU kernel
(mmcv/ops/csrc/pytorch/cpu/nms.cpp) step by step: descending ``sort`` of the
scores, greedy suppression with ``ovr > iou_threshold`` and the ``offset``
convention, returning kept indices in score order.  That makes
mmcv.ops.nms / batched_nms (used by RPN proposal generation) usable.
The loss functions (RPNHead.loss_by_feat, BBoxHead.loss_and_target) need
no compiled op at all.
"""
import torch

MMCV_EXT_IS_STUB = True


def nms(bboxes, scores, iou_threshold, offset=0):
    if bboxes.numel() == 0:
        return bboxes.new_empty((0, ), dtype=torch.long)
    x1, y1, x2, y2 = (bboxes[:, k].contiguous() for k in range(4))
    areas = (x2 - x1 + offset) * (y2 - y1 + offset)
    order = torch.sort(scores, 0, descending=True)[1]
    n = bboxes.size(0)
    select = torch.ones(n, dtype=torch.bool, device=bboxes.device)
    ox1, oy1, ox2, oy2, oar = x1[order], y1[order], x2[order], y2[order], areas[order]
    zero = bboxes.new_zeros(())
    for i in range(n):
        if not bool(select[i]):
            continue
        if i + 1 >= n:
            break
        xx1 = torch.maximum(ox1[i], ox1[i + 1:])
        yy1 = torch.maximum(oy1[i], oy1[i + 1:])
        xx2 = torch.minimum(ox2[i], ox2[i + 1:])
        yy2 = torch.minimum(oy2[i], oy2[i + 1:])
        w = torch.maximum(zero, xx2 - xx1 + offset)
        h = torch.maximum(zero, yy2 - yy1 + offset)
        inter = w * h
        ovr = inter / (oar[i] + oar[i + 1:] - inter)
        select[i + 1:] &= ~(ovr > iou_threshold)
    return order.masked_select(select)


def _missing(name):

    def _raise(*args, **kwargs):
        raise NotImplementedError(
            f'mmcv._ext.{name}: compiled mmcv op not available in this venv '
            '(mmcv-lite + stub mmcv/_ext.py; see scripts/envs/mmdet.sh)')

    _raise.__name__ = name
    return _raise


def __getattr__(name):
    if name.startswith('__'):
        raise AttributeError(name)
    return _missing(name)
EOF

# smoke test: imports, registry, one RPN loss on tiny inputs
cd "${TMPDIR:-/tmp}"
"$VENV/bin/python" - <<'EOF'
import torch, mmcv, mmdet, mmengine
import mmcv.ops  # resolves through the stub
from mmdet.utils import register_all_modules
register_all_modules()
from mmdet.registry import MODELS
from mmengine.structures import InstanceData
from mmdet.models.dense_heads import RPNHead  # noqa: F401
from mmdet.models.roi_heads.bbox_heads import Shared2FCBBoxHead  # noqa: F401
head = MODELS.build(dict(
    type='RPNHead', in_channels=8, num_classes=1,
    anchor_generator=dict(type='AnchorGenerator', scales=[8],
                          ratios=[0.5, 1.0, 2.0], strides=[4, 8]),
    bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.] * 4,
                    target_stds=[1.] * 4),
    loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
    loss_bbox=dict(type='L1Loss', loss_weight=1.0),
    train_cfg=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.7,
                                 neg_iou_thr=0.3, min_pos_iou=0.3,
                                 match_low_quality=True, ignore_iof_thr=-1),
                   sampler=dict(type='PseudoSampler'), allowed_border=-1,
                   pos_weight=-1, debug=False)))
torch.manual_seed(0)
cls = [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4)]
reg = [torch.randn(1, 12, 8, 8), torch.randn(1, 12, 4, 4)]
gt = [InstanceData(bboxes=torch.tensor([[4., 4., 20., 24.]]),
                   labels=torch.zeros(1, dtype=torch.long))]
meta = [dict(img_shape=(32, 32), pad_shape=(32, 32))]
out = head.loss_by_feat(cls, reg, gt, meta)
print('smoke OK: torch', torch.__version__, 'mmcv', mmcv.__version__,
      'mmengine', mmengine.__version__, 'mmdet', mmdet.__version__,
      {k: [round(float(x), 6) for x in v] for k, v in out.items()})
EOF
echo "venv ready: $VENV"
