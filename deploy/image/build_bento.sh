#!/usr/bin/env bash
# Build the llmux bento from SRC into OUT, with no torch, no compiler and no GPU: this is what
# scripts/build_image.sh runs inside a stock Python container, so that the host needs only podman.
#
#   build_bento.sh SRC OUT
#
# `bentoml build` imports service.py, which needs the web stack, numpy and PyAV, but none of the
# model libraries: those (and torch) are left out of the install. tests/test_build_image.py runs
# this script with those libraries made unimportable, so a top-level import of one fails there.
set -euo pipefail

if (( $# != 2 )); then
  echo "usage: build_bento.sh SRC OUT" >&2
  exit 2
fi
src=$1
out=$2

# Model libraries service.py does not import (torch is in none of the requirements files).
model_libraries='transformers|accelerate|xgrammar|gguf|openai-harmony'

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HOME=$work/home BENTOML_HOME=$work/bentoml BENTOML_DO_NOT_TRACK=true HF_HUB_OFFLINE=1
mkdir -p "$HOME"

if [[ ${LLMUX_BUILD_SKIP_INSTALL:-0} != 1 ]]; then
  grep -vE "^($model_libraries)==" "$src/requirements.txt" > "$work/build-requirements.txt"
  echo "==> installing bentoml and what service.py imports (no torch, no model libraries)"
  python -m pip install --disable-pip-version-check --no-cache-dir --quiet \
    -r "$work/build-requirements.txt"
fi

# A copy without the host's venv, git history and keys (bentofile.yaml excludes keys as well).
mkdir "$work/src"
tar -C "$src" --exclude=./.venv --exclude=./.git --exclude='*/__pycache__' \
  --exclude='*/api_keys.yaml' -cf - . | tar -C "$work/src" -xf -

echo "==> bentoml build"
(cd "$work/src" && python -m bentoml build)
bento=$(python -m bentoml get llmux:latest --output path | tail -n 1)
rm -rf "$out"
cp -a "$bento" "$out"
echo "bento ready: $out (its Dockerfile: $out/env/docker/Dockerfile)"
