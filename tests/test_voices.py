"""voices.yaml, voice and language choice, the voice/model lists, and every refusal of
POST /v1/audio/speech, through the official openai SDK against the app in process.

Nothing here synthesizes: each refusal happens before a model is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import openai
import pytest
from starlette.testclient import TestClient

from llmux.core.config import ConfigError, PhysicalModel
from llmux.core.errors import BadRequest
from llmux.voices import (
    MULTILINGUAL_LANGUAGES,
    OPENAI_VOICES,
    Voices,
    choose_voice,
    load_voices,
)
from tests.conftest import TEST_KEY

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
PIPER_DIR = Path.home() / ".local/share/llmux/models/piper-joe"

MODELS_YAML = f"""
gpu_budget_gb: 16
physical_models:
  piper-joe:
    type: tts
    backend: piper
    path: {PIPER_DIR}
    model_file: en_US-joe-medium.onnx
    estimated_vram_gb: 0.1
    default_language: en
  mtl:
    type: tts
    backend: chatterbox
    variant: multilingual
    path: /nonexistent/mtl
    estimated_vram_gb: 2
  gemma:
    type: llm
    backend: llamacpp
    model_file: gemma.gguf
    estimated_vram_gb: 0.5
  whisper:
    type: asr
    backend: faster_whisper
    estimated_vram_gb: 0.3
virtual_models:
  piper-joe: {{physical: piper-joe}}
  Chatterbox-Multilingual: {{physical: mtl}}
  Gemma: {{physical: gemma}}
  whisper: {{physical: whisper}}
"""

VOICES_YAML = """
voices:
  anna:
    reference: voices/anna.wav
    language: de
    name: Anna (German)
  narrator:
    name: Narrator
openai_voices:
  nova: anna
default_voice: narrator
"""


def write_config(
    directory: Path, models_yaml: str = MODELS_YAML, voices_yaml: str | None = VOICES_YAML
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "models.yaml").write_text(models_yaml, encoding="utf-8")
    (directory / "api_keys.yaml").write_text(
        f"api_keys:\n  - key: {TEST_KEY}\n    name: test-client\n", encoding="utf-8"
    )
    if voices_yaml is not None:
        (directory / "voices.yaml").write_text(voices_yaml, encoding="utf-8")
    return directory


@pytest.fixture
def tts_settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    from llmux.settings import Settings

    return Settings(config_dir=write_config(tmp_path / "config"), models_dir=tmp_path / "models")


@pytest.fixture
def http(tts_settings) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    from llmux.app import create_app

    with TestClient(create_app(tts_settings), base_url="http://llmux.test") as client:
        yield client


@pytest.fixture
def sdk(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(api_key=TEST_KEY, base_url="http://llmux.test/v1", http_client=http)


# --- the voices file ------------------------------------------------------------------------


def test_voices_file_maps_names_and_resolves_clips(tmp_path: Path) -> None:
    voices = load_voices(write_config(tmp_path) / "voices.yaml", tmp_path / "models")
    anna = voices.get("anna")
    assert anna is not None and anna.reference == tmp_path / "models/voices/anna.wav"
    assert anna.language == "de" and anna.name == "Anna (German)"
    assert voices.get("nova") == anna  # mapped explicitly
    assert voices.get("alloy") == voices.get("narrator")  # the rest: default_voice
    assert voices.get("default") is not None and voices.get("default").reference is None  # type: ignore[union-attr]
    assert voices.get("nobody") is None
    listed = dict(voices.listed())
    assert set(OPENAI_VOICES) <= set(listed) and {"default", "anna", "narrator"} <= set(listed)
    assert listed["nova"] == "nova (Anna (German))"
    assert "anna" not in dict(voices.listed(clips=False))
    assert "nova" not in dict(voices.listed(clips=False))


def test_absolute_reference_stays_absolute(tmp_path: Path) -> None:
    path = write_config(tmp_path, voices_yaml="voices:\n  x:\n    reference: /clips/x.wav\n")
    assert load_voices(path / "voices.yaml", tmp_path).get("x").reference == Path("/clips/x.wav")  # type: ignore[union-attr]


def test_without_a_voices_file_every_name_is_the_builtin_voice(tmp_path: Path) -> None:
    voices = load_voices(tmp_path / "voices.yaml", tmp_path)
    assert voices == Voices.builtin()
    assert all(voices.get(name).reference is None for name in (*OPENAI_VOICES, "default"))  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("voices:\n  anna:\n    referense: a.wav\n", "voices.anna.referense: unknown field"),
        ("voices:\n  anna:\n    language: xx\n", "voices.anna.language"),
        ("voices:\n  alloy:\n    reference: a.wav\n", "use OpenAI's names"),
        ("openai_voices:\n  nova: nobody\n", "openai_voices.nova: 'nobody' is not a voice"),
        ("openai_voices:\n  robot: default\n", "openai_voices.robot"),
        ("default_voice: nobody\n", "default_voice 'nobody' is not a voice"),
        ("voices:\n  a: {}\n  a: {}\n", "duplicate name 'a'"),
        ("- just a list\n", "expected a mapping"),
    ],
)
def test_bad_voices_file_names_file_entry_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "voices.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_voices(path, tmp_path)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


def test_a_bad_voices_file_stops_start_up(tmp_path: Path) -> None:
    from llmux.app import build_state
    from llmux.settings import Settings

    config = write_config(tmp_path, voices_yaml="voices:\n  x:\n    language: klingon\n")
    with pytest.raises(ConfigError, match=r"voices\.x\.language"):
        build_state(Settings(config_dir=config, models_dir=tmp_path))


@pytest.mark.slow  # imports chatterbox
def test_language_list_matches_chatterbox() -> None:
    from chatterbox.mtl_tts import SUPPORTED_LANGUAGES

    assert set(SUPPORTED_LANGUAGES) == MULTILINGUAL_LANGUAGES


# --- voice and language choice ----------------------------------------------------------------

MTL = PhysicalModel(type="tts", backend="chatterbox", variant="multilingual", estimated_vram_gb=2)
TURBO = PhysicalModel(type="tts", backend="chatterbox", variant="turbo", estimated_vram_gb=2)
PIPER = PhysicalModel(
    type="tts",
    backend="piper",
    model_file="v.onnx",
    estimated_vram_gb=0.1,
    default_language="en_US",
)


@pytest.mark.parametrize(
    "spec,voice,language,expected",
    [
        (MTL, "anna", None, "de"),  # the voice's language
        (MTL, "anna", "fr-FR", "fr"),  # the request's wins
        (MTL, "alloy", None, "en"),  # no language anywhere: the model's default
        (TURBO, "anna", None, "en"),  # an English-only model keeps English for a German voice
        (PIPER, "narrator", "EN", "en"),
    ],
)
def test_language_comes_from_request_then_voice_then_model(
    tmp_path: Path, spec: PhysicalModel, voice: str, language: str | None, expected: str
) -> None:
    voices = load_voices(write_config(tmp_path) / "voices.yaml", tmp_path)
    assert choose_voice(voices, "m", spec, voice, language)[1] == expected


def test_refusals_name_what_the_client_can_send(tmp_path: Path) -> None:
    voices = load_voices(write_config(tmp_path) / "voices.yaml", tmp_path)
    with pytest.raises(BadRequest) as caught:
        choose_voice(voices, "piper-joe", PIPER, "anna", None)
    assert "cannot clone" in caught.value.message and "narrator" in caught.value.message
    assert "anna" not in caught.value.message.split("speaks with:")[1]
    with pytest.raises(BadRequest) as caught:
        choose_voice(voices, "t", TURBO, "alloy", "de")
    assert caught.value.param == "language" and "choose one of en" in caught.value.message


# --- the endpoints ----------------------------------------------------------------------------


def test_voice_and_model_lists_in_open_webui_shapes(http: TestClient) -> None:
    voices = http.get("/v1/audio/voices", headers=AUTH).json()["voices"]
    assert {"id": "anna", "name": "Anna (German)"} in voices
    assert {v["id"] for v in voices} >= set(OPENAI_VOICES) | {"default", "narrator"}
    assert all(set(v) == {"id", "name"} for v in voices)
    piper = http.get("/v1/audio/voices", params={"model": "piper-joe"}, headers=AUTH).json()
    assert "anna" not in {v["id"] for v in piper["voices"]}
    assert "narrator" in {v["id"] for v in piper["voices"]}
    models = http.get("/v1/audio/models", headers=AUTH).json()
    assert models == {"models": [{"id": "piper-joe"}, {"id": "Chatterbox-Multilingual"}]}


@pytest.mark.parametrize("path", ["/v1/audio/voices", "/v1/audio/models"])
def test_lists_need_a_key_by_default(http: TestClient, path: str) -> None:
    response = http.get(path)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_open_audio_discovery_opens_exactly_the_two_lists(tts_settings) -> None:  # type: ignore[no-untyped-def]
    from llmux.app import create_app

    with TestClient(
        create_app(replace(tts_settings, open_audio_discovery=True)), base_url="http://llmux.test"
    ) as http:
        assert http.get("/v1/audio/voices").status_code == 200
        assert http.get("/v1/audio/models").json()["models"][0] == {"id": "piper-joe"}
        speech = http.post("/v1/audio/speech", json={"model": "piper-joe", "input": "hi"})
        assert speech.status_code == 401
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/audio/voicesx").status_code == 401


def test_settings_from_env() -> None:
    from llmux.settings import Settings

    settings = Settings.from_env(
        {"LLMUX_TTS_MAX_INPUT_CHARS": "100", "LLMUX_OPEN_AUDIO_DISCOVERY": "1"}
    )
    assert settings.tts_max_input_chars == 100 and settings.open_audio_discovery is True
    defaults = Settings.from_env({})
    assert defaults.tts_max_input_chars == 4096 and defaults.open_audio_discovery is False
    assert defaults.voices_file == defaults.config_dir / "voices.yaml"


def speech_error(
    sdk: openai.OpenAI, status: type[openai.APIStatusError], **body: object
) -> openai.APIStatusError:
    request = {"model": "piper-joe", "input": "Hello.", "voice": "alloy", **body}
    extra = {"language": request.pop("language")} if "language" in request else None
    with pytest.raises(status) as caught:
        sdk.audio.speech.create(**request, extra_body=extra)  # type: ignore[arg-type]
    error = caught.value
    assert set(error.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
    assert error.message
    return error


@pytest.mark.parametrize(
    "body,param,needle",
    [
        ({"input": ""}, "input", "at least 1 character"),
        ({"input": "   \n "}, "input", "blank"),
        ({"input": "x" * 4097}, "input", "at most 4096"),
        ({"voice": "darth"}, "voice", "alloy"),
        ({"voice": "anna"}, "voice", "cannot clone"),
        ({"language": "de"}, "language", "choose one of en"),
        ({"response_format": "ogg"}, "response_format", "mp3"),
        ({"speed": 0.1}, "speed", "0.25"),
        ({"speed": 4.5}, "speed", "4"),
        ({"model": "Gemma"}, "model", "/v1/chat/completions"),
        ({"model": "whisper"}, "model", "/v1/audio/transcriptions"),
        ({"model": "Chatterbox-Multilingual", "language": "xx"}, "language", "choose one of ar"),
    ],
)
def test_bad_speech_requests_are_400_naming_the_field(
    sdk: openai.OpenAI, body: dict[str, object], param: str, needle: str
) -> None:
    error = speech_error(sdk, openai.BadRequestError, **body)
    assert error.body["param"] == param  # type: ignore[index]
    assert needle in error.message


def test_unknown_model_is_404(sdk: openai.OpenAI) -> None:
    error = speech_error(sdk, openai.NotFoundError, model="tts-1")
    assert error.code == "model_not_found" and "tts-1" in error.message


def test_input_cap_is_a_setting(tts_settings) -> None:  # type: ignore[no-untyped-def]
    from llmux.app import create_app

    with TestClient(
        create_app(replace(tts_settings, tts_max_input_chars=10)), base_url="http://llmux.test"
    ) as http:
        response = http.post(
            "/v1/audio/speech",
            headers=AUTH,
            json={"model": "piper-joe", "input": "Eleven char", "voice": "alloy"},
        )
        assert response.status_code == 400
        assert "at most 10" in response.json()["error"]["message"]


def test_missing_weights_are_503_naming_the_folder(sdk: openai.OpenAI) -> None:
    error = speech_error(sdk, openai.InternalServerError, model="Chatterbox-Multilingual")
    assert error.status_code == 503
    assert "/nonexistent/mtl" in error.message
