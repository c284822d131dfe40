"""Residency's promises against real sockets: a live uvicorn, fake runners that record what they
do, and clients that stall, vanish, or give up while they wait.

The runners are fakes that fail the way real ones would matter: a generation that is still
running when `unload` comes is recorded as an overlap (on llama.cpp that is `llm.close()` during
a decode). Generations are fast and large (megabytes), so a client that reads nothing fills its
socket and blocks the server's `send`, as a stalled client does.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from llmux.core.config import Registry
from llmux.keys import KeyRing
from llmux.services.chat import ChatService
from llmux.settings import Settings
from llmux.state import AppState
from llmux_policy.executor import Residency
from runners.chat import GenerationChunk, GenerationRequest
from runners.transcription import Transcript
from tests.conftest import TEST_KEY, LiveServer, write_config
from tests.runner_fakes import RecordingRunner

# Live servers and megabytes of traffic per test: slow, so `make test-fast` leaves it out.
pytestmark = pytest.mark.slow
GIB = 1024**3
STALL_S = 1.5
REGISTRY = Registry.model_validate(
    {
        "physical_models": {
            "llm-a": {
                "type": "llm",
                "backend": "llamacpp",
                "model_file": "a.gguf",
                "estimated_vram_gb": 6,
            },
            "llm-b": {
                "type": "llm",
                "backend": "llamacpp",
                "model_file": "b.gguf",
                "estimated_vram_gb": 6,
            },
            "voice": {"type": "tts", "backend": "piper", "estimated_vram_gb": 1},
            "ear": {"type": "asr", "backend": "faster_whisper", "estimated_vram_gb": 1},
        },
        "virtual_models": {
            "A": {"physical": "llm-a"},
            "B": {"physical": "llm-b"},
            "Voice": {"physical": "voice"},
            "Ear": {"physical": "ear"},
        },
    }
)
CHUNK = "x" * 32_768  # 32 KiB a chunk: a few hundred fill any socket's buffers


class Recorder:
    """What every runner did, in order, with the overlaps that must never happen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, str]] = []
        self.generating: dict[str, int] = {}
        self.overlaps: list[str] = []

    def note(self, what: str, model: str) -> None:
        with self.lock:
            self.log.append((what, model))
            if what == "generate-start":
                self.generating[model] = self.generating.get(model, 0) + 1
            elif what == "generate-end":
                self.generating[model] -= 1
            elif what == "unload" and self.generating.get(model):
                self.overlaps.append(model)

    def saw(self, what: str, model: str) -> bool:
        with self.lock:
            return (what, model) in self.log


class FakeChat(RecordingRunner):
    """A chat runner: `chunks` pieces of 32 KiB, `pause` seconds apart, stopping on cancel."""

    context_length = 1_000_000

    def __init__(self, physical_id: str, recorder: Recorder, world: World) -> None:
        super().__init__(physical_id, recorder.note)
        self.recorder, self.world = recorder, world

    def render_prompt(self, request: GenerationRequest) -> str:
        return ""

    def harmony_encoding(self) -> None:
        return None

    def check(self, request: GenerationRequest) -> None:
        pass

    def generate(
        self, request: GenerationRequest, cancel: threading.Event
    ) -> Iterator[GenerationChunk]:
        self.recorder.note("generate-start", self.physical_id)
        produced = 0
        try:
            self.world.gate.wait(30)
            slow = self.physical_id in self.world.slow
            for _ in range(self.world.chunks if slow else 1):
                if cancel.is_set():
                    self.recorder.note("cancelled", self.physical_id)
                    break
                time.sleep(self.world.pause if slow else 0)
                produced += 1
                yield GenerationChunk(text=self.world.chunk if slow else "ok")
            yield GenerationChunk(finish_reason="stop", prompt_tokens=1, completion_tokens=produced)
        finally:
            self.recorder.note("generate-end", self.physical_id)


class FakeVoice(RecordingRunner):
    sample_rate = 16_000

    def __init__(self, physical_id: str, recorder: Recorder) -> None:
        super().__init__(physical_id, recorder.note)
        self.recorder = recorder

    def speak(self, text: str, *, voice: Path | None, language: str, speed: float) -> np.ndarray:
        self.recorder.note("speak", self.physical_id)
        time.sleep(self.pause)
        return np.zeros(1600, dtype=np.float32)

    pause = 0.0


class FakeEar(RecordingRunner):
    """A speech-to-text runner that works until cancelled (or 20 s pass)."""

    def __init__(self, physical_id: str, recorder: Recorder) -> None:
        super().__init__(physical_id, recorder.note)
        self.recorder = recorder

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None,
        prompt: str | None,
        temperature: float,
        cancel: threading.Event | None = None,
    ) -> Transcript:
        self.recorder.note("transcribe-start", self.physical_id)
        assert cancel is not None
        if cancel.wait(20):
            self.recorder.note("cancelled", self.physical_id)
        return Transcript(text="", language="en", duration=0.0, segments=())


class World:
    def __init__(self) -> None:
        self.recorder = Recorder()
        self.chunks = 400
        self.pause = 0.0  # seconds per chunk: how long a decode step takes
        self.chunk = CHUNK
        self.slow = {"llm-a"}
        self.speak_pause = 0.0  # the models the three settings above apply to; others: 1 chunk
        self.stall_s = STALL_S
        self.gate = threading.Event()
        self.gate.set()

    def runner(self, physical_id: str) -> Any:
        if physical_id == "voice":
            voice = FakeVoice(physical_id, self.recorder)
            voice.pause = self.speak_pause
            return voice
        if physical_id == "ear":
            return FakeEar(physical_id, self.recorder)
        return FakeChat(physical_id, self.recorder, self)


@pytest.fixture
def world(request: pytest.FixtureRequest) -> World:
    made = World()
    made.stall_s = getattr(request, "param", STALL_S)  # the server's LLMUX_STREAM_STALL_S
    return made


def make_app(world: World, tmp_path: Path) -> Any:
    from llmux.app import create_app

    config = write_config(tmp_path / "config", "physical_models: {}\nvirtual_models: {}\n")
    settings = Settings(config_dir=config, models_dir=tmp_path, stream_stall_s=world.stall_s)
    residency = Residency(REGISTRY, world.runner, 16 * GIB)
    state = AppState(
        settings=settings,
        registry=REGISTRY,
        keys=KeyRing.load(settings.api_keys_file),
        residency=residency,
        chat=ChatService(REGISTRY, residency),
    )
    return create_app(settings, state)


@pytest.fixture
def server(world: World, tmp_path: Path) -> Iterator[LiveServer]:
    with LiveServer(make_app(world, tmp_path)) as live:
        yield live


def chat_body(model: str, *, stream: bool) -> bytes:
    return json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()


def raw_request(server: LiveServer, body: bytes) -> socket.socket:
    """A client on a raw socket that sends the request and then reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {TEST_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def wait_until(condition: Any, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def health(server: LiveServer) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{server.url}/health", timeout=10).json()
    return answer


def post(
    server: LiveServer, path: str, body: dict[str, Any], timeout: float = 20
) -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}",
        json=body,
        headers={"Authorization": f"Bearer {TEST_KEY}"},
        timeout=timeout,
    )


def test_a_client_that_stops_reading_blocks_no_switch_and_no_tts_load(
    server: LiveServer, world: World
) -> None:
    stalled = raw_request(server, chat_body("A", stream=True))
    try:
        # Its generation runs to its end into the session's buffer, then the model is let go of,
        # although the client has read almost nothing.
        wait_until(lambda: world.recorder.saw("generate-end", "llm-a"))
        wait_until(lambda: health(server)["loaded_models"]["llm-a"]["in_flight"] == 0)
        started = time.monotonic()
        switched = post(
            server,
            "/v1/chat/completions",
            {"model": "B", "messages": [{"role": "user", "content": "hi"}]},
        )
        spoken = post(
            server,
            "/v1/audio/speech",
            {"model": "Voice", "input": "Hello.", "voice": "alloy", "response_format": "wav"},
        )
        assert switched.status_code == 200 and spoken.status_code == 200
        assert time.monotonic() - started < STALL_S + 5
        assert set(health(server)["loaded_models"]) == {"llm-b", "voice"}
        # The stalled client is cut after LLMUX_STREAM_STALL_S: its stream ends without [DONE].
        time.sleep(STALL_S + 0.5)
        stalled.settimeout(10)
        received = b""
        while chunk := stalled.recv(1 << 20):
            received += chunk
        assert b"200 OK" in received and b"[DONE]" not in received
    finally:
        stalled.close()
    assert world.recorder.overlaps == []


@pytest.mark.parametrize("world", [60], indirect=True)  # it vanishes before a stall cut
def test_a_disconnect_while_send_is_blocked_never_unloads_under_a_generation(
    world: World, server: LiveServer
) -> None:
    # Slow decode steps (a big model's), each a megabyte of text: a minute of generation unless
    # cancelled, and a cancel is seen only between steps, as on a real backend.
    world.chunks, world.pause, world.chunk = 200, 0.3, "x" * (1 << 20)
    stalled = raw_request(server, chat_body("A", stream=True))
    wait_until(lambda: world.recorder.saw("generate-start", "llm-a"))
    time.sleep(3)  # the socket is full: the server's send is blocked
    switch: dict[str, httpx.Response] = {}
    switcher = threading.Thread(
        target=lambda: switch.update(
            answer=post(
                server,
                "/v1/chat/completions",
                {"model": "B", "messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            )
        )
    )
    switcher.start()
    wait_until(lambda: health(server)["waiting_for_swap"] == 1)
    stalled.close()  # the client vanishes while the server waits to send to it
    switcher.join(30)
    assert switch["answer"].status_code == 200
    assert world.recorder.saw("cancelled", "llm-a")  # stopped early, not run to its end
    assert world.recorder.overlaps == []
    log = world.recorder.log
    assert log.index(("generate-end", "llm-a")) < log.index(("unload", "llm-a"))


def test_a_client_gone_while_waiting_for_a_swap_causes_no_eviction(
    server: LiveServer, world: World
) -> None:
    world.gate.clear()  # A's generation holds llm-a until the gate opens
    reader: dict[str, httpx.Response] = {}
    first = threading.Thread(
        target=lambda: reader.update(
            answer=post(
                server,
                "/v1/chat/completions",
                {"model": "A", "messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            )
        )
    )
    first.start()
    wait_until(lambda: world.recorder.saw("generate-start", "llm-a"))
    waiting = raw_request(server, chat_body("B", stream=False))
    wait_until(lambda: health(server)["waiting_for_swap"] == 1)
    waiting.close()  # gives up while its swap waits for A's generation
    wait_until(lambda: health(server)["waiting_for_swap"] == 0)
    world.gate.set()
    first.join(30)
    assert reader["answer"].status_code == 200
    time.sleep(0.3)
    assert not world.recorder.saw("unload", "llm-a")
    assert not world.recorder.saw("load", "llm-b")
    assert set(health(server)["loaded_models"]) == {"llm-a"}


async def test_a_response_cancelled_at_its_send_never_unloads_under_a_generation(
    world: World, tmp_path: Path
) -> None:
    """Starlette's own disconnect path (ASGI spec 2.3, as under BentoML's server): the body is
    cancelled inside a `send` that cannot complete, and its generator is never closed."""
    world.chunks, world.pause = 200, 0.3  # slow decode steps; a cancel is seen between them
    app = make_app(world, tmp_path)
    residency: Residency = app.state.llmux.residency
    body = chat_body("A", stream=True)
    requests = [{"type": "http.request", "body": body, "more_body": False}]
    blocked, gone = asyncio.Event(), asyncio.Event()

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and CHUNK[:64].encode() in message["body"]:
            blocked.set()
            await asyncio.Event().wait()  # the client's socket is full: this never completes

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"llmux.test"),
            (b"authorization", f"Bearer {TEST_KEY}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    call = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(blocked.wait(), 10)

    async def switch() -> None:
        async with residency.use("llm-b"):
            pass

    switching = asyncio.create_task(switch())
    await asyncio.wait_for(residency.wait_until(lambda s: s["waiting_for_swap"] == 1), 10)
    gone.set()  # the client disconnects while the server is stuck in send
    await asyncio.wait_for(call, 10)
    await asyncio.wait_for(switching, 10)
    await residency.close()
    assert world.recorder.saw("cancelled", "llm-a")
    assert world.recorder.overlaps == []
    log = world.recorder.log
    assert log.index(("generate-end", "llm-a")) < log.index(("unload", "llm-a"))


def wav_bytes(seconds: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes(b"\x00\x00" * int(16_000 * seconds))
    return buffer.getvalue()


def raw_post(server: LiveServer, path: str, content_type: str, body: bytes) -> socket.socket:
    sock = socket.socket()
    sock.connect(("127.0.0.1", server.port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TEST_KEY}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_a_client_gone_during_a_transcription_stops_it(server: LiveServer, world: World) -> None:
    boundary = "llmuxboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nEar\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            f"Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + wav_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    sock = raw_post(
        server, "/v1/audio/transcriptions", f"multipart/form-data; boundary={boundary}", body
    )
    wait_until(lambda: world.recorder.saw("transcribe-start", "ear"))
    sock.close()
    wait_until(lambda: world.recorder.saw("cancelled", "ear"), seconds=5)
    wait_until(lambda: health(server)["loaded_models"]["ear"]["in_flight"] == 0, seconds=5)


def test_a_client_gone_during_speech_stops_it_between_sentences(
    server: LiveServer, world: World
) -> None:
    world.speak_pause = 0.3
    # Fifteen sentences of about 230 characters: each is a piece of its own (at most 300).
    sentence = "This sentence is long enough that it fills most of one piece of speech, " * 3
    text = " ".join(f"{sentence.strip()} Number {i}." for i in range(15))
    sock = raw_post(
        server,
        "/v1/audio/speech",
        "application/json",
        json.dumps(
            {"model": "Voice", "input": text, "voice": "alloy", "response_format": "wav"}
        ).encode(),
    )
    wait_until(lambda: world.recorder.saw("speak", "voice"))
    sock.close()
    time.sleep(3)  # 0.3 s a piece: ten more would be spoken by now without the disconnect
    spoken = [entry for entry in world.recorder.log if entry == ("speak", "voice")]
    assert len(spoken) <= 3
    wait_until(lambda: health(server)["loaded_models"]["voice"]["in_flight"] == 0, seconds=5)
