#!/usr/bin/env bash
# The framework tests: for each framework named, its environment (scripts/envs/NAME.sh; kept and
# reused while that script is unchanged), lossdoctor installed into it, and its parity, adapter
# and training-loop tests run there. Here a framework test that skips is a failure.
#
# Usage: bash scripts/test-frameworks.sh [torchvision] [mmdet] [detectron2]
#        (default: torchvision mmdet, the two that install from the package index)
#   LOSSDOCTOR_ENVS=DIR     where the environments live (default ~/.cache/lossdoctor-envs)
#   FRESH=1                 rebuild them
#   DETECTRON2_GIT_DIR=DIR  a git directory of Detectron2's source (its environment needs it)
#   LOSSDOCTOR_COVERAGE=DIR the model-zoo tests write their outcomes there, one FRAMEWORK.jsonl
#                           each (python scripts/update_readme.py makes docs/coverage.md's table of
#                           docs/coverage)
set -euo pipefail
cd "$(dirname "$0")/.."
ENVS="${LOSSDOCTOR_ENVS:-$HOME/.cache/lossdoctor-envs}"
[ $# -gt 0 ] || set -- torchvision mmdet

tests_of() {
  case "$1" in
    torchvision)
      echo tests/test_torchvision_parity.py tests/test_adapter_torchvision.py \
        tests/test_zoo_torchvision.py tests/test_dense_torchvision.py ;;
    mmdet) echo tests/test_adapter_mmdet.py tests/test_zoo_mmdet.py tests/test_dense_mmdet.py ;;
    detectron2)
      echo tests/test_adapter_detectron2.py tests/test_zoo_detectron2.py \
        tests/test_dense_detectron2.py ;;
  esac
}

build() {  # FRAMEWORK VENV: build it unless a build by the same script is there
  local stamp="$2/.lossdoctor-env" want
  want=$(sha256sum "scripts/envs/$1.sh" | cut -c1-16)
  if [ "${FRESH:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "== $1: reusing $2"
    return
  fi
  echo "== $1: building $2"
  if [ "$1" = detectron2 ]; then
    build torchvision "$ENVS/torchvision"
    TV_VENV="$ENVS/torchvision" bash scripts/envs/detectron2.sh "$DETECTRON2_GIT_DIR" "$2"
  else
    bash "scripts/envs/$1.sh" "$2"
  fi
  echo "$want" > "$stamp"
}

for fw in "$@"; do
  case "$fw" in
    torchvision | mmdet) ;;
    detectron2)
      [ -n "${DETECTRON2_GIT_DIR:-}" ] || {
        echo "detectron2: set DETECTRON2_GIT_DIR to a git directory of its source" >&2
        exit 2
      } ;;
    *) echo "unknown framework '$fw': use torchvision, mmdet or detectron2" >&2; exit 2 ;;
  esac
done

for fw in "$@"; do
  venv="$ENVS/$fw"
  start=$SECONDS
  build "$fw" "$venv"
  # lossdoctor and its test tools, keeping the environment's own torch (and a setuptools that
  # still has pkg_resources, which mmengine and Detectron2 import)
  con=$(mktemp)
  "$venv/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$con"
  echo "setuptools<81" >> "$con"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$con" -e ".[test]"
  rm -f "$con"
  built=$((SECONDS - start))
  log=$(mktemp)
  if [ -n "${LOSSDOCTOR_COVERAGE:-}" ]; then
    mkdir -p "$LOSSDOCTOR_COVERAGE"
    rm -f "$LOSSDOCTOR_COVERAGE/$fw.jsonl"
    export LOSSDOCTOR_COVERAGE
  fi
  require="$fw"
  [ "$fw" = detectron2 ] && require="detectron2,torchvision"
  # shellcheck disable=SC2046
  LOSSDOCTOR_REQUIRE="$require" "$venv/bin/python" -m pytest -q -p no:cacheprovider -rs \
    $(tests_of "$fw") 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  summary=$(tail -n 1 "$log")
  rm -f "$log"
  if [ "$status" != 0 ]; then
    echo "== $fw: the framework tests failed" >&2
    exit "$status"
  fi
  case "$summary" in
    *skipped*) echo "== $fw: a framework test was skipped: $summary" >&2; exit 1 ;;
  esac
  echo "== $fw: environment ${built} s, tests $((SECONDS - start - built)) s: $summary"
done
