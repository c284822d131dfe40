#!/usr/bin/env bash
# Download the weights of every model in the llmux registry (models.yaml) into the directory the
# pod mounts read-only at /models, one directory per physical model, the layout the runners read.
#
# The list of models is models.yaml itself (read by download_plan.py next to this script), never a
# second list here. Idempotent: a model whose download finished has a marker file and is skipped;
# an interrupted one is resumed (hf download continues partial files in <dir>/.cache/huggingface).
set -euo pipefail

readonly MARKER=".llmux-download-complete"

usage() {
  cat <<EOF
Usage: $(basename "$0") [options]

Download every model listed in models.yaml with the Hugging Face CLI (hf download).

Options:
  --config FILE      registry to read (default: \$LLMUX_HOST_CONFIG_DIR/models.yaml,
                     i.e. ${HOME}/.local/share/llmux_pod/config/models.yaml)
  --models-dir DIR   where the weights go, one directory per physical model
                     (default: \$LLMUX_HOST_MODELS_DIR or ${HOME}/.local/share/llmux_pod/models)
  --token-file FILE  Hugging Face token (default: ~/.cache/huggingface/token); needed for the
                     gated CohereLabs model
  --only ID          download only this physical model (repeatable)
  --force ID         download ID again even if it is marked complete (repeatable)
  --dry-run          print the hf commands instead of running them
  -h, --help         show this help

A model counts as complete when <dir>/${MARKER} exists and records the same repository and
files as models.yaml asks for now; delete the marker (or use --force) to fetch it again.
Exit status: 0 when every model is complete, 1 when any failed (the others are still fetched).
EOF
}

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
config_dir=${LLMUX_HOST_CONFIG_DIR:-${HOME}/.local/share/llmux_pod/config}
config=""
models_dir=${LLMUX_HOST_MODELS_DIR:-${HOME}/.local/share/llmux_pod/models}
token_file=${HF_TOKEN_PATH:-${HOME}/.cache/huggingface/token}
python=${LLMUX_PYTHON:-python3}
dry_run=0
only=()
force=()

while (($#)); do
  case $1 in
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --models-dir) models_dir=${2:?--models-dir needs a directory}; shift 2 ;;
    --token-file) token_file=${2:?--token-file needs a file}; shift 2 ;;
    --only) only+=("${2:?--only needs a physical model id}"); shift 2 ;;
    --force) force+=("${2:?--force needs a physical model id}"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
config=${config:-${config_dir}/models.yaml}

# --- prerequisites ----------------------------------------------------------------------------
[[ -r $config ]] || die "no registry at $config. Copy the repository's config/models.yaml there \
(install -D -m 0644 config/models.yaml $config) or pass --config FILE."
command -v "$python" >/dev/null ||
  die "$python not found; install it: sudo apt-get install -y python3 python3-yaml"
"$python" -c 'import yaml' 2>/dev/null ||
  die "PyYAML is missing for $python; install it: sudo apt-get install -y python3-yaml"
[[ -r ${script_dir}/download_plan.py ]] ||
  die "download_plan.py not found next to this script (${script_dir}); install both together."
if ((!dry_run)); then
  command -v hf >/dev/null || die "the Hugging Face CLI 'hf' is not on PATH. Install it: \
sudo apt-get install -y pipx && pipx install huggingface_hub && pipx ensurepath (then log in again). \
'huggingface-cli' is its old name and is not used."
fi
if [[ ! -r $token_file ]]; then
  printf 'warning: no Hugging Face token at %s; public models download, the gated one will not.\n' \
    "$token_file" >&2
  printf '         Create a read token at https://huggingface.co/settings/tokens, then: hf auth login\n' >&2
fi
# hf reads the token from this file (the default is the same path under $HOME).
export HF_TOKEN_PATH=$token_file

plan_args=(--config "$config" --models-dir "$models_dir")
for id in "${only[@]}"; do plan_args+=(--only "$id"); done
plan=$("$python" "${script_dir}/download_plan.py" "${plan_args[@]}") || die "cannot plan downloads from $config"
[[ -n $plan ]] || die "$config lists no model with a model_id to download"

mkdir -p "$models_dir"
printf 'Registry: %s\nWeights:  %s (free: %s)\n\n' "$config" "$models_dir" \
  "$(df -h --output=avail "$models_dir" 2>/dev/null | tail -n 1 | tr -d ' ')"
# Disk space against the plan, before anything is fetched: the declared footprints of the models
# still missing are a lower bound of their size on disk.
need=$("$python" "${script_dir}/download_plan.py" "${plan_args[@]}" --need-gb)
# LLMUX_FREE_KB stands in for the reading (tests; a disk df misreports).
free_kb=${LLMUX_FREE_KB:-$(df -k --output=avail "$models_dir" 2>/dev/null | tail -n 1 | tr -d ' ')}
if ((!dry_run)) && [[ $free_kb =~ ^[0-9]+$ ]] &&
  "$python" -c "import sys; sys.exit(not float('$need') * 1024**2 > $free_kb)"; then
  die "the models still to download need at least ${need} GB, and ${models_dir} has \
$((free_kb / 1024 / 1024)) GB free. Free space, or pass --models-dir DIR on a larger disk \
(--only ID fetches one model at a time)."
fi

is_forced() {
  local id=$1 f
  for f in "${force[@]}"; do [[ $f == "$id" ]] && return 0; done
  return 1
}

gated_help() {
  local repo=$1
  cat >&2 <<EOF
error: access to ${repo} was refused: it is a gated model.
  1. Open https://huggingface.co/${repo} while logged in and accept its terms
     (approval can take a moment; the page then says you have access).
  2. Check the token at ${token_file} belongs to that account and can read gated repos:
     hf auth whoami   (or: hf auth login to replace it)
  3. Run this script again; it resumes where it stopped.
EOF
}

total=$(grep -c . <<<"$plan")
n=0
failed=()
skipped=0
# fd 3, so that nothing in the loop can eat the plan from stdin.
while IFS=$'\t' read -r -u 3 id repo dir hf_args; do
  n=$((n + 1))
  read -ra args <<<"$hf_args"
  # The marker records what was asked, so a changed model_file or repo is fetched again.
  want="${repo} ${hf_args}"
  if [[ -f ${dir}/${MARKER} && $(<"${dir}/${MARKER}") == "$want" ]] && ! is_forced "$id"; then
    printf '[%d/%d] %s: complete, skipped (%s)\n' "$n" "$total" "$id" "$(du -sh "$dir" | cut -f1)"
    skipped=$((skipped + 1))
    continue
  fi
  printf '[%d/%d] %s <- %s\n' "$n" "$total" "$id" "$repo"
  cmd=(hf download "$repo" "${args[@]}" --local-dir "$dir")
  if ((dry_run)); then
    printf '+'
    printf ' %q' "${cmd[@]}"
    printf '\n'
    continue
  fi
  mkdir -p "$dir"
  rm -f "${dir}/${MARKER}"
  errlog=$(mktemp)
  # A whole repository (transformers weights): its config.json and safetensors index first, so
  # that a checkpoint that can never run here (gpt-oss not in MXFP4, weights over the GPU
  # budget) is refused before gigabytes are fetched.
  if [[ ${args[0]:-} == --exclude ]] &&
    hf download "$repo" --include config.json --include '*.safetensors.index.json' \
      --local-dir "$dir" >"$errlog" 2>&1 &&
    ! fit=$("$python" "${script_dir}/download_plan.py" --config "$config" --fits "$dir" 2>&1); then
    printf 'error: %s (%s) is not downloaded: %s\n' "$id" "$repo" "$fit" >&2
    failed+=("$id")
    rm -f "$errlog"
    continue
  fi
  # hf's output (progress bars included) goes to the terminal and to a file for the gated check.
  if "${cmd[@]}" 2>&1 | tee "$errlog"; then
    missing=()
    for a in "${args[@]}"; do
      [[ $a == --* || $a == *'*'* ]] && continue
      [[ -e ${dir}/${a} ]] || missing+=("$a")
    done
    if ((${#missing[@]})); then
      printf 'error: %s: hf finished but %s is missing\n' "$id" "${missing[*]}" >&2
      failed+=("$id")
    elif [[ ${args[0]:-} == --exclude ]] && ! "$python" "${script_dir}/download_plan.py" --verify "$dir"; then
      # A whole repository (transformers weights): config.json, the weights, every indexed shard.
      printf 'error: %s: the download is incomplete (above); run again to resume.\n' "$id" >&2
      failed+=("$id")
    else
      printf '%s\n' "$want" >"${dir}/${MARKER}"
      printf '[%d/%d] %s: done (%s)\n' "$n" "$total" "$id" "$(du -sh "$dir" | cut -f1)"
    fi
  else
    if grep -Eqi 'gated|requires approval|403' "$errlog"; then
      gated_help "$repo"
    else
      printf 'error: %s: hf download failed (see above); run again to resume.\n' "$id" >&2
    fi
    failed+=("$id")
  fi
  rm -f "$errlog"
done 3<<<"$plan"

echo
if ((!dry_run)); then
  printf 'Total on disk: %s in %s (%d of %d were already complete)\n' \
    "$(du -sh "$models_dir" | cut -f1)" "$models_dir" "$skipped" "$total"
fi
if ((${#failed[@]})); then
  die "not downloaded: ${failed[*]}"
fi
echo "All ${total} models are complete."
