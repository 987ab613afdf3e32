#!/usr/bin/env bash
# The optional Detectron2 environment (CPU) of the framework tests, built from Detectron2's
# source: a venv that sees the torchvision env's torch 2.14.1 + torchvision 0.29.1 through a .pth
# file (build that one first with torchvision.sh), plus detectron2 compiled for CPU
# (FORCE_CUDA=0). ~5 min on 2 cores. DETECTRON2_GIT_DIR: a git directory of Detectron2's source
# (a clone's .git, or a bare mirror).
# Usage: detectron2.sh DETECTRON2_GIT_DIR [VENV_DIR]   (default ~/.cache/lossdoctor-envs/detectron2)
set -euo pipefail
GITDIR=$1
VENV="${2:-$HOME/.cache/lossdoctor-envs/detectron2}"
TV="${TV_VENV:-$(dirname "$VENV")/torchvision}"
SRC="$VENV-src"
[ -x "$TV/bin/python" ] || { echo "build the torchvision env first (torchvision.sh) or set TV_VENV"; exit 1; }
rm -rf "$VENV" "$SRC"; mkdir -p "$SRC"
git --git-dir="$GITDIR" archive HEAD | tar -x -C "$SRC"
python3 -m venv "$VENV"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
TVSITE=$("$TV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$TVSITE" > "$SITE/tv-overlay.pth"
con=$(mktemp); printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$con"
"$VENV/bin/pip" install -q -c "$con" wheel "setuptools<81" Pillow matplotlib pycocotools termcolor yacs tabulate \
  cloudpickle tqdm "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "omegaconf>=2.1,<2.4" "hydra-core>=1.1" packaging
cd "$SRC" && FORCE_CUDA=0 MAX_JOBS=2 "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import torch, detectron2, detectron2._C; print('ok detectron2', detectron2.__version__, 'torch', torch.__version__)"
echo "Detectron2 needs the EventStorage context for losses: with detectron2.utils.events.EventStorage(0): ..."
