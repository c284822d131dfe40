"""docs/residency.md's scenario table (TST-016..019) walked over HTTP with real small models.

The models are the embedded default's (Gemma 3 270M, Whisper base, the Piper voice) under
declared footprints that mirror production: LLMs of 4, 9 and 13 GB, ASR 4 GB, TTS 2 GB, a 16 GB
budget. After each real request, /health must show exactly the expected residents.
"""

from __future__ import annotations

import io
import wave
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import (
    GEMMA,
    MODELS_DIR,
    TEST_KEY,
    LiveServer,
    gemma_entry,
    real_models,
    write_config,
)

WHISPER = MODELS_DIR / "whisper-base"
PIPER = MODELS_DIR / "piper-joe"
pytestmark = real_models(GEMMA, WHISPER / "model.bin", PIPER)

REGISTRY = f"""
gpu_budget_gb: 16
physical_models:
  qwen-4b-stand-in:
{gemma_entry(4, tools=False)}
  qwen-9b-stand-in:
{gemma_entry(9, tools=False)}
  gpt-oss-13b-stand-in:
{gemma_entry(13, tools=False)}
  asr-4gb:
    type: asr
    backend: faster_whisper
    path: {WHISPER}
    estimated_vram_gb: 4
    default_language: en
  tts-2gb:
    type: tts
    backend: piper
    path: {PIPER}
    model_file: en_US-joe-medium.onnx
    estimated_vram_gb: 2
virtual_models:
  Qwen-4B: {{physical: qwen-4b-stand-in}}
  Qwen-9B: {{physical: qwen-9b-stand-in}}
  GPT-OSS: {{physical: gpt-oss-13b-stand-in}}
  ASR: {{physical: asr-4gb}}
  TTS: {{physical: tts-2gb}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from llmux.app import create_app
    from llmux.settings import Settings

    root = tmp_path_factory.mktemp("scenarios")
    app = create_app(
        Settings(config_dir=write_config(root / "config", REGISTRY), models_dir=root / "models")
    )
    with LiveServer(app) as live:
        yield live


def one_second_of_silence() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"\0\0" * 16000)
    return buffer.getvalue()


def test_scenario_table(server: LiveServer) -> None:
    client = openai.OpenAI(api_key=TEST_KEY, base_url=f"{server.url}/v1", max_retries=0)

    def resident_after(model: str) -> set[str]:
        if model == "ASR":
            client.audio.transcriptions.create(model=model, file=("s.wav", one_second_of_silence()))
        elif model == "TTS":
            assert client.audio.speech.create(model=model, voice="alloy", input="Hi.").content
        else:
            client.chat.completions.create(
                model=model, max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
            )
        state = httpx.get(f"{server.url}/health").json()
        assert state["used_bytes"] <= state["budget_bytes"] == 16 * 2**30
        assert all(m["in_flight"] == 0 for m in state["loaded_models"].values())
        return set(state["loaded_models"])

    # TST-016: ASR + TTS + Qwen3.5-4B resident together (~10 GB).
    assert resident_after("ASR") == {"asr-4gb"}
    assert resident_after("TTS") == {"asr-4gb", "tts-2gb"}
    assert resident_after("Qwen-4B") == {"asr-4gb", "tts-2gb", "qwen-4b-stand-in"}
    # TST-017: switching to the 9B replaces the 4B; ASR + TTS + 9B fit together (~15 GB).
    assert resident_after("Qwen-9B") == {"asr-4gb", "tts-2gb", "qwen-9b-stand-in"}
    # TST-018: GPT-OSS-20B (13 GB) evicts the other LLM, then TTS and ASR.
    assert resident_after("GPT-OSS") == {"gpt-oss-13b-stand-in"}
    # TST-019: an ASR request while the 13 GB LLM is resident evicts the LLM first.
    assert resident_after("ASR") == {"asr-4gb"}
    # Loading TTS next to ASR evicts nothing; an LLM then joins if it fits.
    assert resident_after("TTS") == {"asr-4gb", "tts-2gb"}
    assert resident_after("Qwen-9B") == {"asr-4gb", "tts-2gb", "qwen-9b-stand-in"}
    # The 13 GB LLM again: the lower priorities go first, never ASR while others could.
    assert resident_after("GPT-OSS") == {"gpt-oss-13b-stand-in"}
