#!/usr/bin/env bash
# Build the llmux OCI image with only podman on the host (docs/deploy.md, "Build the image").
#
#   build_image.sh [--tag IMAGE] [--build-arg NAME=VALUE]... [--no-prune] [--dry-run]
#
# 1. `bentoml build` runs in a throwaway stock Python container (deploy/image/build_bento.sh):
#    the host needs no Python venv, no compiler and none of CUDA torch's gigabytes.
# 2. podman builds the image from the bento's generated Dockerfile (BentoML's template extended by
#    deploy/image/Dockerfile.template: CUDA llama.cpp and causal-conv1d compiled in a devel stage,
#    the Hub kernels baked in).
# 3. The devel build stage (15-20 GB of untagged layers) is pruned, unless --no-prune.
#
# Build arguments go to podman build, e.g. --build-arg CUDA_ARCHITECTURES="89;120".
set -euo pipefail

builder=docker.io/library/python:3.11-slim
tag=localhost/llmux:latest
prune=1
dry_run=0
build_args=()

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

while (( $# )); do
  case $1 in
    --tag) tag=${2:?--tag needs an image name}; shift 2 ;;
    --build-arg) build_args+=(--build-arg "${2:?--build-arg needs NAME=VALUE}"); shift 2 ;;
    --no-prune) prune=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)

run() {
  printf '+ %s\n' "$*"
  if (( ! dry_run )); then "$@"; fi
}

if ! command -v podman >/dev/null; then
  echo "error: podman is not installed: sudo apt install podman (docs/deploy.md, section 2)" >&2
  exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/llmux-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "==> 1/3 the bento, built in $builder"
run podman run --rm -v "$repo:/src:ro" -v "$work:/out" "$builder" \
  bash /src/deploy/image/build_bento.sh /src /out/bento

echo "==> 2/3 the image $tag (the llama.cpp and causal-conv1d compiles take a while)"
run podman build -t "$tag" -f "$work/bento/env/docker/Dockerfile" "${build_args[@]}" "$work/bento"

if (( prune )); then
  echo "==> 3/3 pruning the build stage's untagged layers"
  run podman image prune -f
fi

if (( ! dry_run )); then
  podman image exists "$tag"
  echo "built $tag"
fi
