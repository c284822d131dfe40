#!/usr/bin/env python3
"""Print what scripts/download_models.sh must fetch, read from models.yaml (the registry).

One line per physical model with weights to download, tab-separated:

    <physical id> TAB <repo id> TAB <destination directory> TAB <hf download arguments>

The arguments are space-separated and go after `hf download <repo>`: either file names (only
those files are fetched) or `--include`/`--exclude` glob patterns. None contains a space.

This runs on the bare host, so it needs only the standard library and PyYAML (Debian:
python3-yaml); it does not import llmux, which needs pydantic. The registry stays the one list of
models: what is fetched per backend below is knowledge of what each runner reads, not of which
models exist.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

# Where the container sees the weights; a `path` under it names a host directory under --models-dir.
CONTAINER_MODELS_DIR = "/models"

# Files chatterbox-tts 0.1.7 reads per variant (its from_pretrained downloads exactly these; the
# runner calls from_local on the directory). Original and multilingual share ResembleAI/chatterbox
# but read different files.
CHATTERBOX_FILES: dict[str, list[str]] = {
    "original": [
        "ve.safetensors",
        "t3_cfg.safetensors",
        "s3gen.safetensors",
        "tokenizer.json",
        "conds.pt",
    ],
    "multilingual": [
        "ve.pt",
        "t3_mtl23ls_v2.safetensors",
        "s3gen.pt",
        "grapheme_mtl_merged_expanded_v1.json",
        "conds.pt",
        "Cangjie5_TC.json",
    ],
}
# Turbo's from_pretrained takes a pattern set rather than a file list.
CHATTERBOX_TURBO_INCLUDE = ["*.safetensors", "*.json", "*.txt", "*.pt", "*.model"]

# Whole-repository backends skip copies in other formats that the runner never reads:
# openai/gpt-oss-20b ships original/ and metal/ (13 GB each) beside the transformers weights, and
# some repositories add GGUF or ONNX exports. hf's patterns are fnmatch, where `*` crosses `/`.
WHOLE_REPO_EXCLUDE = ["original/*", "metal/*", "*.gguf", "onnx/*"]


class PlanError(Exception):
    """models.yaml cannot be turned into a download plan; the message names file and field."""


def hf_arguments(physical_id: str, entry: dict[str, Any], where: str) -> list[str]:
    """What follows `hf download <repo>` for one physical model."""
    backend = entry.get("backend")
    if backend == "chatterbox":
        variant = entry.get("variant")
        if variant == "turbo":
            return [arg for pattern in CHATTERBOX_TURBO_INCLUDE for arg in ("--include", pattern)]
        if variant in CHATTERBOX_FILES:
            return list(CHATTERBOX_FILES[variant])
        raise PlanError(
            f"{where}.variant: expected original, turbo or multilingual, got {variant!r}"
        )
    model_file = entry.get("model_file")
    if model_file:
        # llamacpp (and piper): only the named files, never the whole repository of quantisations.
        files = [str(model_file)]
        if entry.get("mmproj_file"):
            files.append(str(entry["mmproj_file"]))
        if backend == "piper":
            files.append(f"{model_file}.json")
        for name in files:
            if " " in name:
                raise PlanError(f"{where}: file name {name!r} contains a space")
        return files
    if backend == "llamacpp":
        raise PlanError(f"{where}.model_file: a llamacpp model needs model_file")
    return [arg for pattern in WHOLE_REPO_EXCLUDE for arg in ("--exclude", pattern)]


def destination(physical_id: str, entry: dict[str, Any], models_dir: Path) -> Path | None:
    """The host directory for the weights, mirroring PhysicalModel.weights_path."""
    path = entry.get("path")
    if not path:
        return models_dir / physical_id
    if str(path).startswith(CONTAINER_MODELS_DIR + "/"):
        return models_dir / str(path)[len(CONTAINER_MODELS_DIR) + 1 :]
    if Path(str(path)).is_absolute():
        return None  # a container path outside /models: the operator places those weights
    return models_dir / str(path)


def plan(config: Path, models_dir: Path, only: list[str]) -> tuple[list[str], list[str]]:
    """(plan lines, notes about models that are skipped)."""
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanError(f"{config}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PlanError(f"{config}: not valid YAML: {exc}") from exc
    physical = data.get("physical_models") if isinstance(data, dict) else None
    if not isinstance(physical, dict) or not physical:
        raise PlanError(f"{config}: physical_models: expected a mapping of physical models")
    unknown = [name for name in only if name not in physical]
    if unknown:
        raise PlanError(
            f"{config}: no physical model named {', '.join(unknown)} "
            f"(known: {', '.join(sorted(physical))})"
        )
    lines: list[str] = []
    notes: list[str] = []
    for physical_id, entry in physical.items():
        if only and physical_id not in only:
            continue
        where = f"{config}: physical_models.{physical_id}"
        if not isinstance(entry, dict):
            raise PlanError(f"{where}: expected a mapping")
        repo = entry.get("model_id")
        if not repo:
            notes.append(f"{physical_id}: no model_id in {config}; place its weights yourself")
            continue
        target = destination(physical_id, entry, models_dir)
        if target is None:
            notes.append(
                f"{physical_id}: path {entry['path']!r} is outside /models; place it yourself"
            )
            continue
        args = hf_arguments(physical_id, entry, where)
        lines.append("\t".join([physical_id, str(repo), str(target), " ".join(args)]))
    return lines, notes


def need_gb(config: Path, lines: list[str]) -> float:
    """The declared GPU footprints (estimated_vram_gb) of the planned models that have no
    completion marker yet: weights on disk are at least that large."""
    physical = yaml.safe_load(config.read_text(encoding="utf-8"))["physical_models"]
    total = 0.0
    for line in lines:
        physical_id, _, target, _ = line.split("\t")
        if not (Path(target) / ".llmux-download-complete").is_file():
            total += float(physical[physical_id].get("estimated_vram_gb") or 0)
    return total


def weight_problems(directory: Path) -> list[str]:
    """What is wrong with a whole-repository download of transformers weights: no config.json,
    no weights, a weight file that is empty, or a shard the safetensors index names but the
    directory lacks (what an interrupted or filtered download leaves)."""
    problems = []
    if not (directory / "config.json").is_file():
        problems.append("config.json is missing")
    weights = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin"))
    if not weights:
        problems.append("no *.safetensors (or *.bin) weights")
    problems += [f"{w.name} is empty" for w in weights if w.stat().st_size == 0]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"{index.name} is not a safetensors index")
        else:
            problems += [
                f"{name} (listed in {index.name}) is missing"
                for name in sorted(shards)
                if not (directory / name).is_file()
            ]
    return problems


GIB = 1024**3
# gpt-oss-20b's experts dequantized to bf16: what transformers loads from a checkpoint that is not
# MXFP4 (runners/mxfp4.py refuses it rather than spilling).
GPT_OSS_BF16_GB = 42


def fit_problems(directory: Path, budget_gb: float) -> list[str]:
    """Why the transformers checkpoint whose config.json (and safetensors index, if it has one)
    lie in DIR cannot run on the GPU: read before its weights are downloaded."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return []  # nothing to judge by; the download's own verification reports a bad config
    problems = []
    quantization = config.get("quantization_config") or {}
    if config.get("model_type") == "gpt_oss" and quantization.get("quant_method") != "mxfp4":
        method = quantization.get("quant_method") or "none"
        problems.append(
            f"it is not an MXFP4 checkpoint (quantization: {method}), so transformers would load "
            f"gpt-oss in bf16, about {GPT_OSS_BF16_GB} GB, which no {budget_gb:g} GB GPU holds "
            "and llmux refuses. Use an MXFP4 repository (such as openai/gpt-oss-20b), or a GGUF "
            "of it with backend: llamacpp in models.yaml"
        )
    for index in sorted(directory.glob("*.safetensors.index.json")):
        try:
            total = int(json.loads(index.read_text())["metadata"]["total_size"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if total > budget_gb * GIB:
            problems.append(
                f"its weights are {total / GIB:.1f} GB ({index.name}), more than the GPU budget "
                f"of {budget_gb:g} GB, so it could never be loaded"
            )
    return problems


def budget_gb(config: Path) -> float:
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    return float(data.get("gpu_budget_gb") or 16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="models.yaml to read")
    parser.add_argument("--models-dir", type=Path, help="host weights directory")
    parser.add_argument(
        "--only", action="append", default=[], metavar="ID", help="only this physical model"
    )
    parser.add_argument(
        "--need-gb",
        action="store_true",
        help="instead of planning: print the GB still to download (the declared footprints of "
        "the planned models not yet complete, a lower bound of their size on disk)",
    )
    parser.add_argument(
        "--verify",
        type=Path,
        metavar="DIR",
        help="instead of planning: check a whole-repository download in DIR (exit 1 if bad)",
    )
    parser.add_argument(
        "--fits",
        type=Path,
        metavar="DIR",
        help="instead of planning: check, from the config.json and safetensors index in DIR, "
        "that the checkpoint can run on the GPU budget of --config (exit 1 if not)",
    )
    args = parser.parse_args(argv)
    if args.fits is not None:
        if args.config is None:
            parser.error("--fits needs --config (for gpu_budget_gb)")
        problems = fit_problems(args.fits, budget_gb(args.config))
        for problem in problems:
            print(f"{problem}.", file=sys.stderr)
        return 1 if problems else 0
    if args.verify is not None:
        problems = weight_problems(args.verify)
        for problem in problems:
            print(f"{args.verify}: {problem}", file=sys.stderr)
        return 1 if problems else 0
    if args.config is None or args.models_dir is None:
        parser.error("--config and --models-dir are required to plan")
    try:
        lines, notes = plan(args.config, args.models_dir, args.only)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.need_gb:
        print(f"{need_gb(args.config, lines):.1f}")
        return 0
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
