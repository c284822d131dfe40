"""Hostile audio, multipart and images (reliability issue, item 2), beyond the cases the
endpoint modules hold (not audio, empty, over the size and duration caps: test_transcriptions;
bad image data: test_chat_api): each a clear 4xx in the envelope, fast, the server serving on.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from tests.audio_fixtures import silence
from tests.conftest import TEST_KEY
from tests.test_chat_edges import World
from tests.test_transcriptions import http  # noqa: F401 - the app with a tiny real Whisper

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
URL = "/v1/audio/transcriptions"
pytestmark = pytest.mark.slow  # builds a tiny Whisper and Cohere ASR


def envelope(response: httpx.Response, status: int, started: float) -> dict[str, object]:
    assert time.monotonic() - started < 5
    assert response.status_code == status, response.text[:300]
    error: dict[str, object] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def wav_claiming_hours(seconds_claimed: int) -> bytes:
    """A WAV whose header declares hours of 16 kHz audio and holds a tenth of a second."""
    data = b"\x00\x00" * 1600
    claimed = seconds_claimed * 16000 * 2
    header = b"RIFF" + struct.pack("<I", 36 + claimed) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
    return header + b"data" + struct.pack("<I", claimed) + data


def healthy(client: TestClient, tmp_path: Path) -> None:
    clip = silence(tmp_path / "ok.wav", 1, "wav").read_bytes()
    answer = client.post(
        URL, headers=AUTH, data={"model": "whisper-base"}, files={"file": ("a.wav", clip)}
    )
    assert answer.status_code == 200, answer.text


def test_a_header_claiming_hours_is_decoded_for_what_it_holds(
    http: TestClient,  # noqa: F811
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    answer = http.post(
        URL, headers=AUTH, data={"model": "whisper-base"},
        files={"file": ("liar.wav", wav_claiming_hours(5 * 3600))},
    )  # fmt: skip
    # The header's claim is not believed: what the file holds (0.1 s) is transcribed, quickly.
    assert time.monotonic() - started < 10
    assert answer.status_code == 200, answer.text
    healthy(http, tmp_path)


def test_a_tenth_of_a_second_is_transcribed(http: TestClient, tmp_path: Path) -> None:  # noqa: F811
    clip = silence(tmp_path / "blip.wav", 0.1, "wav").read_bytes()
    answer = http.post(
        URL, headers=AUTH, data={"model": "whisper-base"}, files={"file": ("b.wav", clip)}
    )
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    ("name", "request_kwargs", "status", "param"),
    [
        ("multipart without a file", {"data": {"model": "whisper-base"}}, 400, "file"),
        ("JSON instead of multipart", {"json": {"model": "whisper-base", "file": "x"}}, 400, None),
        (
            "a form field where the file goes",
            {"data": {"model": "whisper-base", "file": "abc"}},
            400,
            "file",
        ),
    ],
)
def test_malformed_uploads_are_a_clear_4xx(
    http: TestClient,  # noqa: F811
    tmp_path: Path,
    name: str,
    request_kwargs: dict[str, object],
    status: int,
    param: str | None,
) -> None:
    started = time.monotonic()
    error = envelope(http.post(URL, headers=AUTH, **request_kwargs), status, started)  # type: ignore[arg-type]
    if param:
        assert error["param"] == param, (name, error)
    healthy(http, tmp_path)


@pytest.fixture(scope="module")
def chat_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    world = World(tmp_path_factory.mktemp("media"))
    world.script("Qwen-Thinking", "seen")
    with TestClient(world.app, base_url="http://llmux.test") as client:
        yield client


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's opening)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("name", "image"),
    [
        ("a PNG claiming 60000 x 60000 pixels", png_header(60000, 60000)),
        ("text in an image's clothing", b"GIF89a" + b"not really" * 100),
    ],
)
def test_images_that_are_not_or_decode_too_large_are_a_clear_400(
    chat_http: TestClient, name: str, image: bytes
) -> None:
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {
        "model": "Qwen-Thinking",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}
        ],
    }
    started = time.monotonic()
    error = envelope(chat_http.post("/v1/chat/completions", headers=AUTH, json=body), 400, started)
    assert "image" in str(error["message"]).lower(), (name, error)
    ok = {"model": "Qwen-Thinking", "messages": [{"role": "user", "content": "hi"}]}
    assert chat_http.post("/v1/chat/completions", headers=AUTH, json=ok).status_code == 200
