#!/usr/bin/env bash
# The torchvision environment of the framework tests (scripts/test-frameworks.sh builds it).
# Assumes Python 3.11; pip reaches the package registry (and, where the machine has them, local
# wheel indexes holding these builds).
# torch 2.14.1 / torchvision 0.29.1 are the CUDA 13.0 builds (+cu130) from the
# local indexes; they run fine on CPU. The nvidia-* / cuda-* dependency wheels
# are also on local disk (a few small ones come from the package registry). Takes ~3 min; the
# venv is ~5.6 GB on disk.
# Usage: torchvision.sh [VENV_DIR]   (default ~/.cache/lossdoctor-envs/torchvision; keep it outside the repo)
set -euo pipefail
VENV="${1:-$HOME/.cache/lossdoctor-envs/torchvision}"
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
"$VENV/bin/pip" install torch==2.14.1 torchvision==0.29.1 pandas==3.1.1
# Smoke check: torchvision's compiled ops load and run on CPU.
"$VENV/bin/python" - <<'PY'
import torch, torchvision, pandas
b = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.]])
keep = torchvision.ops.nms(b, torch.tensor([0.9, 0.8]), 0.5)
assert keep.tolist() == [0], keep
print("ok torch", torch.__version__, "torchvision", torchvision.__version__,
      "pandas", pandas.__version__, "cuda_available", torch.cuda.is_available())
PY
# Fallback if the nvidia/cuda dependency wheels ever fail to install (not needed here):
#   "$VENV/bin/pip" install --no-deps torch==2.14.1 torchvision==0.29.1
#   "$VENV/bin/pip" install filelock typing_extensions sympy networkx jinja2 fsspec numpy pillow pandas
