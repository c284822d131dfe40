"""A real `bentoml serve` subprocess: the service as operators run it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from llmux.settings import SERVE_FLAGS
from tests.conftest import REPO, TEST_KEY

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    config_dir: Path,
    tmp_path: Path,
    extra_env: dict[str, str] | None = None,  # type: ignore[no-untyped-def]
    *,
    embedded: bool = False,
    models_dir: Path | None = None,
):
    """`bentoml serve` on a free port; `embedded` leaves LLMUX_CONFIG_DIR unset, as a newcomer
    would."""
    port = free_port()
    env = {
        **os.environ,
        "LLMUX_CONFIG_DIR": str(config_dir),
        "LLMUX_MODELS_DIR": str(models_dir or tmp_path),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "BENTOML_PORT": str(port),
        "BENTOML_HOST": "127.0.0.1",
        **(extra_env or {}),
    }
    if embedded:
        del env["LLMUX_CONFIG_DIR"]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed by the fixture
    bentoml = Path(sys.executable).parent / "bentoml"
    proc = subprocess.Popen(
        [str(bentoml), "serve", "service:LLMux", *SERVE_FLAGS],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, f"{base}/health", tmp_path / "serve.log", 90, "bentoml serve")
    return proc, base, log


def wait_until_ready(
    proc: subprocess.Popen,  # type: ignore[type-arg]
    url: str,
    log_path: Path,
    timeout_s: float,
    what: str,
) -> None:
    """Wait for GET `url` to answer 200; fail with the server's log if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(log_path.read_text())
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(
        f"{what} did not answer {url} in {timeout_s:.0f} s:\n" + log_path.read_text()
    )


def stop_server(proc: subprocess.Popen, log) -> None:  # type: ignore[type-arg, no-untyped-def]
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture
def server(prod_config_dir: Path, tmp_path: Path) -> Iterator[str]:
    proc, base, log = start_server(prod_config_dir, tmp_path)
    try:
        yield base
    finally:
        stop_server(proc, log)


def test_bentoml_serve_answers_as_the_issue_says(server: str, tmp_path: Path) -> None:
    health = httpx.get(f"{server}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"

    sdk = openai.OpenAI(api_key=TEST_KEY, base_url=f"{server}/v1")
    assert len({m.id for m in sdk.models.list().data}) == 16

    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/does-not-exist"),
    ]:
        response = httpx.request(method, f"{server}{path}")
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"

    for kept in ("/healthz", "/livez", "/readyz", "/metrics"):
        assert httpx.get(f"{server}{kept}").status_code == 200, kept
    assert httpx.get(f"{server}/docs.json").status_code == 404
    assert "<script" not in httpx.get(f"{server}/").text

    log = (tmp_path / "serve.log").read_text()
    assert TEST_KEY not in log
    assert "client=test-client" in log


def test_an_idle_keep_alive_connection_outlasts_the_clients_pools(server: str) -> None:
    """A client's pool keeps an idle connection for its own expiry (httpx and the openai SDK 5 s,
    aiohttp, so Open WebUI, 15 s) and then sends on it. With uvicorn's 5 s the server closed it
    at that moment: the soak lost a stream to "Server disconnected without sending a response",
    and the openai SDK with max_retries=0 lost 1 request in 45 sent after 4.997-5.003 s idle.
    The server must still answer on a connection idle for longer than the clients keep one."""
    host, port = server.removeprefix("http://").split(":")
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for idle_s in (0.0, 16.0):
            time.sleep(idle_s)
            sock.sendall(request)
            head = _read_response(sock)
            assert head.startswith(b"HTTP/1.1 200"), (idle_s, head)


def _read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body; b"" if the server closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
    return head


def test_chat_answers_from_a_real_bentoml_serve(tmp_path: Path) -> None:
    """Plain, streamed, tool-call and image answers through `bentoml serve` and the openai SDK."""
    import json

    from tests.conftest import GEMMA, gemma_entry, write_config
    from tests.test_chat_api import WEATHER, png_data_uri
    from tests.tiny_models import build_tiny_qwen35_vl

    if not GEMMA.is_file():
        pytest.skip(f"run `make setup`: {GEMMA} missing")
    build_tiny_qwen35_vl(tmp_path / "tiny-qwen")
    config = write_config(
        tmp_path / "config",
        f"""
physical_models:
  gemma:
{gemma_entry(tools=True)}
  tiny-qwen:
    type: llm
    backend: transformers
    path: {tmp_path / "tiny-qwen"}
    estimated_vram_gb: 0.1
    supports_vision: true
    parser: qwen3.5
virtual_models:
  Gemma: {{physical: gemma}}
  Tiny-Qwen-Instruct: {{physical: tiny-qwen, params: {{enable_thinking: false}}}}
""",
    )
    proc, base, log = start_server(config, tmp_path)
    try:
        sdk = openai.OpenAI(api_key=TEST_KEY, base_url=f"{base}/v1", max_retries=0)
        hello = [{"role": "user", "content": "Write one sentence about the sea."}]
        plain = sdk.chat.completions.create(
            model="Gemma", messages=hello, max_tokens=8, seed=1, temperature=0
        )
        assert plain.choices[0].message.content and plain.usage
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in sdk.chat.completions.create(
                model="Gemma", messages=hello, max_tokens=8, seed=1, temperature=0, stream=True
            )
            if c.choices
        )
        assert streamed == plain.choices[0].message.content
        call = sdk.chat.completions.create(
            model="Gemma",
            messages=[{"role": "user", "content": "Weather in Rome?"}],
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=60,
            seed=1,
        )
        tool_call = call.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert tool_call.function.name == "get_weather"
        assert "city" in json.loads(tool_call.function.arguments)
        image = sdk.chat.completions.create(
            model="Tiny-Qwen-Instruct",
            max_tokens=4,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Colour?"},
                        {"type": "image_url", "image_url": {"url": png_data_uri()}},
                    ],
                }
            ],
        )
        assert image.choices[0].finish_reason in ("stop", "length") and image.usage
    finally:
        stop_server(proc, log)
