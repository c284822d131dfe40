"""Piper speaks, faster-whisper (Whisper base) transcribes it back: the speech endpoints agree.

The voice speaks without its trained randomness (`voice_variation: 0`), so each sentence is the
same audio on every run and the bound is a fact, not a draw: with it, "weather" came back as
"water" in some runs and not others."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from starlette.testclient import TestClient

from llmux.wer import word_error_rate
from tests.conftest import MODELS_DIR, TEST_KEY, real_models, write_config

WHISPER, PIPER = MODELS_DIR / "whisper-base", MODELS_DIR / "piper-joe"
pytestmark = real_models(WHISPER / "model.bin", PIPER)
SENTENCES = [
    "The weather today is sunny and warm with a light breeze from the west.",
    "Please send the quarterly report to the finance team before Friday.",
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    from llmux.app import create_app
    from llmux.settings import Settings

    root = tmp_path_factory.mktemp("round-trip")
    config = write_config(
        root / "config",
        f"""
physical_models:
  whisper-base: {{type: asr, backend: faster_whisper, path: {WHISPER}, estimated_vram_gb: 0.3,
                  default_language: en}}
  piper-joe: {{type: tts, backend: piper, path: {PIPER}, model_file: en_US-joe-medium.onnx,
               estimated_vram_gb: 0.1, voice_variation: 0}}
virtual_models:
  whisper-base: {{physical: whisper-base}}
  piper-joe: {{physical: piper-joe}}
""",
    )
    with TestClient(
        create_app(Settings(config_dir=config, models_dir=root)), base_url="http://llmux.test"
    ) as http:
        yield openai.OpenAI(api_key=TEST_KEY, base_url="http://llmux.test/v1", http_client=http)


@pytest.mark.parametrize("sentence", SENTENCES)
@pytest.mark.parametrize("response_format", ["mp3", "wav"])
def test_spoken_then_transcribed_within_wer_0_1(
    client: openai.OpenAI, sentence: str, response_format: str
) -> None:
    audio = client.audio.speech.create(
        model="piper-joe", voice="alloy", input=sentence, response_format=response_format
    ).content  # type: ignore[arg-type]
    text = client.audio.transcriptions.create(
        model="whisper-base", file=(f"speech.{response_format}", audio)
    ).text
    assert word_error_rate(sentence, text) <= 0.1, text
