"""`Runner.preflight`: what every backend checks before anything is evicted for its model."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmux.core.config import PhysicalModel
from runners.base import ModelLoadError, WeightsMissing, require_backend
from runners.factory import make_runner

SPECS = {
    "llamacpp": PhysicalModel(
        type="llm", backend="llamacpp", model_file="m.gguf", estimated_vram_gb=1
    ),
    "transformers-gguf": PhysicalModel(
        type="llm", backend="transformers", model_file="m.gguf", estimated_vram_gb=1
    ),
    "transformers": PhysicalModel(type="llm", backend="transformers", estimated_vram_gb=1),
    "faster_whisper": PhysicalModel(type="asr", backend="faster_whisper", estimated_vram_gb=1),
    "piper": PhysicalModel(type="tts", backend="piper", model_file="v.onnx", estimated_vram_gb=1),
    "chatterbox": PhysicalModel(
        type="tts", backend="chatterbox", variant="turbo", estimated_vram_gb=1
    ),
    "embedding": PhysicalModel(type="embedding", backend="transformers", estimated_vram_gb=1),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_missing_weights_are_named_before_any_load(name: str, tmp_path: Path) -> None:
    runner = make_runner("m", SPECS[name], tmp_path)
    with pytest.raises(WeightsMissing, match=str(tmp_path / "m")):
        runner.preflight()


@pytest.mark.parametrize("name", ["llamacpp", "transformers-gguf"])
def test_an_empty_or_foreign_gguf_is_refused(name: str, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"")
    runner = make_runner("m", SPECS[name], tmp_path)
    with pytest.raises(WeightsMissing):  # an interrupted download leaves an empty file
        runner.preflight()
    (folder / "m.gguf").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(ModelLoadError, match="not a GGUF file") as info:
        runner.preflight()
    assert info.value.status == 503


def test_a_real_gguf_passes(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    make_runner("m", SPECS["llamacpp"], tmp_path).preflight()


def test_a_backend_that_is_not_installed_says_how_to_get_it() -> None:
    with pytest.raises(ModelLoadError, match="make setup"):
        require_backend("m", "no_such_backend_package")
