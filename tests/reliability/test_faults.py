"""Missing and corrupt weights against a real `bentoml serve` (reliability issue, item 3): a clean
503 that says what to do, the resident model untouched when nothing had to make room, and the
server serving on.

Three broken LLMs beside the real Gemma 270M GGUF: one whose directory is missing and one whose
file is not a GGUF at all (both refused by the preflight, before anything is evicted: Gemma stays
resident), and one that is a GGUF cut short, which fails only inside llama.cpp's load, after Gemma
made way for it (one LLM at a time); Gemma then loads again on its next request.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx

from tests.conftest import GEMMA, TEST_KEY, gemma_entry, real_models, write_config
from tests.test_serve import start_server

pytestmark = real_models(GEMMA)

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


def broken_entry(path: Path, file: str) -> str:
    return (
        f"    type: llm\n    backend: llamacpp\n    path: {path}\n    model_file: {file}\n"
        f"    estimated_vram_gb: 0.5\n    parser: plain\n    context_length: 2048\n"
        f"    chat_template: templates/gemma3.jinja\n"
    )


def chat(base: str, model: str) -> httpx.Response:
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def resident(base: str) -> set[str]:
    return set(httpx.get(f"{base}/health").json()["loaded_models"])


def test_missing_and_corrupt_weights_are_a_clean_503_and_the_resident_stays(
    tmp_path: Path,
) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "not-a-gguf.gguf").write_bytes(b"<html>404 Not Found</html>" * 1000)
    with GEMMA.open("rb") as source:  # the real header, then nothing: a download cut short
        (weights / "cut-short.gguf").write_bytes(source.read(2 * 1024 * 1024))
    registry = (
        "gpu_budget_gb: 1.2\nphysical_models:\n"
        f"  gemma:\n{gemma_entry()}"
        f"  missing:\n{broken_entry(tmp_path / 'never-downloaded', 'model.gguf')}"
        f"  not-a-gguf:\n{broken_entry(weights, 'not-a-gguf.gguf')}"
        f"  cut-short:\n{broken_entry(weights, 'cut-short.gguf')}"
        "virtual_models:\n"
        "  Gemma: {physical: gemma}\n  Missing: {physical: missing}\n"
        "  NotGguf: {physical: not-a-gguf}\n  CutShort: {physical: cut-short}\n"
    )
    proc, base, log = start_server(write_config(tmp_path / "config", registry), tmp_path)
    try:
        assert chat(base, "Gemma").status_code == 200
        assert resident(base) == {"gemma"}

        for model, says, left in [
            ("Missing", "download_models.sh", {"gemma"}),  # the preflight: nothing evicted
            ("NotGguf", "is not a GGUF file", {"gemma"}),
            ("CutShort", "download_models.sh --force cut-short", set()),  # Gemma made way first
        ]:
            response = chat(base, model)
            assert response.status_code == 503, (model, response.text)
            error = response.json()["error"]
            assert error["type"] == "service_unavailable_error", error
            assert says in error["message"], error
            assert resident(base) == left, model
            assert chat(base, "Gemma").status_code == 200, model  # the server serves on
            assert resident(base) == {"gemma"}

        health = httpx.get(f"{base}/health").json()
        assert set(health["last_load_errors"]) == {"missing", "not-a-gguf", "cut-short"}
        assert health["status"] == "ok"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
