"""What the gateway adds to every request, kept small: the endpoints that clients poll skip
FastAPI's routing, and neither BentoML nor FastAPI makes OpenTelemetry spans that nobody exports.
(The requests/s themselves are measured in bench/, never timed here.)"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fastapi.routing
import pytest
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from llmux.disconnects import HeldStreamingResponse
from llmux.middleware import FrontDoor
from llmux.parsers import ContentDelta, ReasoningDelta, ToolCallArgs, ToolCallStart
from llmux.services.chat import ChatSession
from llmux.wire.chat import Delta, StreamEvents, delta_from_event
from llmux.wire.models import ModelList, model_card
from tests.conftest import TEST_KEY

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def http(app: Any) -> TestClient:
    return TestClient(app, base_url="http://llmux.test")


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths FastAPI solved a route's dependencies for, i.e. routed through its router."""
    seen: list[str] = []
    original = vars(fastapi.routing)["solve_dependencies"]  # imported there, not exported

    async def counting(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["request"].url.path)
        return await original(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return seen


def test_polled_endpoints_skip_the_router_and_answer_as_it_would(
    app: Any, http: TestClient, routed: list[str]
) -> None:
    state = app.state.llmux
    models = http.get("/v1/models", headers={**AUTH, "X-Request-ID": "poll-1"})
    health = http.get("/health")
    assert routed == []
    assert models.status_code == health.status_code == 200
    assert models.headers["content-type"] == health.headers["content-type"] == "application/json"
    assert models.headers["x-request-id"] == "poll-1"
    names = state.registry.virtual_models
    expected = ModelList(data=[model_card(state.registry, n, state.started_at) for n in names])
    assert models.json() == expected.model_dump(mode="json")
    assert health.json()["status"] == "ok"
    assert health.json()["models_configured"] == len(state.registry.virtual_models)
    # Other methods and the model's own page still go through the router.
    assert http.get("/v1/models/Chatterbox", headers=AUTH).json()["id"] == "Chatterbox"
    assert http.post("/v1/models", headers=AUTH).status_code == 405
    assert routed == ["/v1/models/Chatterbox", "/v1/models"]


def test_polled_endpoints_keep_the_key_check(http: TestClient) -> None:
    missing = http.get("/v1/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    wrong = http.get("/v1/models", headers={"Authorization": "Bearer sk-not-a-key-0123456789"})
    assert wrong.status_code == 401
    assert http.get("/health").status_code == 200  # open, as before


def test_health_shows_a_model_loaded_after_the_first_poll(app: Any, http: TestClient) -> None:
    """/health's answer is built per request (only /v1/models's is rendered once)."""
    state = app.state.llmux
    assert http.get("/health").json()["loaded_models"] == {}
    state.residency.snapshot = lambda: {
        "models": [{"physical_id": "chatterbox", "in_flight": 1}],
        "warm_models": [],
    }
    assert http.get("/health").json()["loaded_models"] == {"chatterbox": {"in_flight": 1}}


def test_fastapi_makes_no_spans_even_with_a_tracer_provider(
    app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BentoML installs a global tracer provider; FastAPI's own telemetry would then wrap every
    request in spans (and ask whether to, on each one)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    monkeypatch.setattr(trace, "get_tracer_provider", lambda: TracerProvider())
    assert not app._native_telemetry.enabled()


class Behind:
    """The app behind FrontDoor (the mounted app, in production): records what reaches it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.requests.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)


def test_front_door_answers_polls_as_the_mounted_app_would_without_entering_it(app: Any) -> None:
    behind = Behind(app)
    front = FrontDoor(behind, **app.state.front_door)
    polls = [
        ("/v1/models", {**AUTH, "X-Request-ID": "poll-1"}),
        ("/health", {"X-Request-ID": "poll-2"}),
        ("/v1/models", {"X-Request-ID": "poll-3"}),  # no key: 401
        ("/v1/models", {"Authorization": "Bearer sk-not-a-key-0123456789", "X-Request-ID": "p4"}),
    ]
    with (
        TestClient(front, base_url="http://llmux.test") as fast,
        TestClient(app, base_url="http://llmux.test") as full,
    ):
        for path, headers in polls:
            short, long = fast.get(path, headers=headers), full.get(path, headers=headers)
            assert short.status_code == long.status_code
            assert short.content == long.content
            assert sorted(short.headers.items()) == sorted(long.headers.items())
        assert [fast.get(path, headers=h).status_code for path, h in polls] == [200, 200, 401, 401]
        assert behind.requests == []
        # What the short way would answer differently, or not at all, goes the long way.
        fast.get("/v1/models", headers={**AUTH, "Origin": "http://webui.test"})
        fast.request("GET", "/v1/models", headers=AUTH, content=b"{}")
        fast.post("/v1/models", headers=AUTH)
        fast.head("/health")
        fast.get("/v1/models/Chatterbox", headers=AUTH)
    assert behind.requests == [
        ("GET", "/v1/models"),
        ("GET", "/v1/models"),
        ("POST", "/v1/models"),
        ("HEAD", "/health"),
        ("GET", "/v1/models/Chatterbox"),
    ]


def service_probe(tmp_path: Path, probe: str) -> Any:
    """What `probe` (run with service.py imported, HOME elsewhere) prints last, as JSON."""
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "LLMUX_CONFIG_DIR": str(ROOT / "config" / "local"),
    }
    out = subprocess.run(
        [sys.executable, "-c", "import json, service\n" + probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bentoml_traces_no_url(tmp_path: Path) -> None:
    """BentoML's OpenTelemetry middleware opens a span per request and per message sent (each
    SSE chunk of a stream) unless the URL is excluded; no exporter reads them."""
    probe = (
        "from opentelemetry.util.http import ExcludeList\n"
        "urls = ExcludeList(service.LLMux.config['tracing']['excluded_urls'])\n"
        "paths = ['/v1/chat/completions', '/v1/models', '/health', '/admin/models']\n"
        "print(json.dumps([urls.url_disabled('http://127.0.0.1:8081' + p) for p in paths]))\n"
    )
    assert service_probe(tmp_path, probe) == [True, True, True, True]


def test_the_app_bentoml_builds_answers_polls_at_the_front_door(tmp_path: Path) -> None:
    """The ASGI app BentoML builds for the service (`to_asgi`, what `bentoml serve` runs)
    answers the polls without reaching the mounted app; other requests reach it."""
    probe = (
        "import fastapi\n"
        "from starlette.testclient import TestClient\n"
        "reached = []\n"
        "through = fastapi.FastAPI.__call__\n"
        "async def counting(self, scope, receive, send):\n"
        "    if scope['type'] == 'http':\n"
        "        reached.append(scope['path'])\n"
        "    await through(self, scope, receive, send)\n"
        "fastapi.FastAPI.__call__ = counting\n"
        "http = TestClient(service.LLMux.to_asgi(is_main=True), base_url='http://llmux.test')\n"
        "answers = [http.get('/health').status_code, http.get('/v1/models').status_code]\n"
        "answers.append(http.get('/health', headers={'Origin': 'http://ui.test'}).status_code)\n"
        "print(json.dumps({'answers': answers, 'reached': reached}))\n"
    )
    # /v1/models without a key: the front door's own key check refuses it, as the app would.
    assert service_probe(tmp_path, probe) == {"answers": [200, 401, 200], "reached": ["/health"]}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello",
        ' "quoted" \\ back',
        "line\nbreak\ttab\r",
        "\x00\x1f\x7f",
        "é ✓ 漢字 🚀",
        "{}[],:",
    ],
)
def test_a_streamed_text_delta_is_what_the_model_would_render(text: str) -> None:
    events = StreamEvents("chatcmpl-1", 1700000000, 'model "with" quotes')
    for event, delta in [
        (ContentDelta(text), Delta(content=text)),
        (ReasoningDelta(text), Delta(reasoning_content=text, reasoning=text)),
    ]:
        assert events.event(event) == events.chunk(delta)
        body = json.loads(events.event(event).removeprefix("data: "))
        assert body["choices"][0]["delta"] == delta.model_dump(exclude_none=True)


def test_other_streamed_events_go_through_the_model() -> None:
    events = StreamEvents("chatcmpl-1", 1700000000, "m")
    start = ToolCallStart(index=0, id="call_1", name="get_weather")
    assert events.event(start) == events.chunk(delta_from_event(start))
    args = ToolCallArgs(index=0, text='{"city": "Paris"}')
    assert events.event(args) == events.chunk(delta_from_event(args))


async def _read_all(buffer: asyncio.Queue[str | None]) -> list[str]:
    events = StreamEvents("chatcmpl-1", 1700000000, "m")
    return [piece async for piece in ChatSession._read(buffer, events)]


def test_events_that_piled_up_while_the_client_read_go_out_in_one_write() -> None:
    buffer: asyncio.Queue[str | None] = asyncio.Queue()
    for piece in ["a\n\n", "b\n\n", "c\n\n", None]:
        buffer.put_nowait(piece)
    role, *rest = asyncio.run(_read_all(buffer))
    assert json.loads(role.removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    assert rest == ["a\n\nb\n\nc\n\n"]


def test_events_that_come_one_by_one_go_out_one_by_one() -> None:
    async def one_by_one() -> list[str]:
        buffer: asyncio.Queue[str | None] = asyncio.Queue()

        async def produce() -> None:
            for piece in ["a\n\n", "b\n\n", None]:
                await asyncio.sleep(0.01)
                buffer.put_nowait(piece)

        producer = asyncio.create_task(produce())
        pieces = await _read_all(buffer)
        await producer
        return pieces

    assert asyncio.run(one_by_one())[1:] == ["a\n\n", "b\n\n"]


async def _held_stream(body: list[tuple[float, str]], send_s: float, stall_s: float) -> list[Any]:
    """The messages HeldStreamingResponse sends for `body` (each piece after its delay), with a
    client that takes `send_s` to take each piece."""

    async def pieces() -> Any:
        for delay, piece in body:
            await asyncio.sleep(delay)
            yield piece

    sent: list[Any] = []
    closed: list[bool] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body" and message["more_body"]:
            await asyncio.sleep(send_s)
        sent.append(message)

    async def receive() -> Any:
        await asyncio.sleep(3600)

    async def on_close() -> None:
        closed.append(True)

    response = HeldStreamingResponse(pieces(), on_close=on_close, stall_s=stall_s)
    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "GET", "headers": []}
    await response(scope, receive, send)
    assert closed == [True]
    return sent


def test_a_model_slower_than_the_stall_limit_is_not_a_stalled_client() -> None:
    sent = asyncio.run(_held_stream([(0.25, "a"), (0.25, "b"), (0.25, "c")], 0.0, 0.1))
    assert [m.get("body") for m in sent[1:]] == [b"a", b"b", b"c", b""]


def test_a_client_that_takes_nothing_for_the_stall_limit_is_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = time.monotonic()
    sent = asyncio.run(_held_stream([(0.0, "a"), (0.0, "b")], 3600, 0.2))
    assert time.monotonic() - started < 2
    assert [m["type"] for m in sent] == ["http.response.start"]  # no last body: connection cut
    assert "(LLMUX_STREAM_STALL_S): disconnected it" in caplog.text
