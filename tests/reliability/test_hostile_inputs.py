"""Inputs built to hurt get a clear 4xx in OpenAI's envelope, fast, and the server serves on
(reliability issue, item 2), against the app in process with scripted runners."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.conftest import TEST_KEY
from tests.test_chat_edges import World

HI = [{"role": "user", "content": "hi"}]


def chat(**extra: Any) -> bytes:
    return json.dumps({"model": "Qwen25", "messages": HI, **extra}).encode()


CASES: dict[str, tuple[bytes, int]] = {
    "invalid JSON": (b'{"model": ', 400),
    "invalid UTF-8": (b'{"model": "\xff\xfe", "messages": []}', 400),
    "deep nesting": (b'{"model": "Qwen25", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    "no messages": (chat(messages=[]), 400),
    "temperature out of range": (chat(temperature=5), 400),
    "NaN temperature": (chat()[:-1] + b', "temperature": NaN}', 400),
    "seed beyond 64 bits": (chat(seed=10**30), 400),
    "thousands of tools": (
        chat(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(5000)]),
        400,
    ),
    "stop strings of hundreds of KB": (chat(stop=["x" * 300_000] * 4), 400),
    "a 10 KB model name": (json.dumps({"model": "x" * 10_000, "messages": HI}).encode(), 404),
    "a path in the model name": (
        json.dumps({"model": "../../etc/passwd", "messages": HI}).encode(),
        404,
    ),
    "n of 5": (chat(n=5), 400),
    "an image URL to fetch": (
        json.dumps(
            {
                "model": "Qwen-Thinking",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}
                        ],
                    }
                ],
            }
        ).encode(),
        400,
    ),
}


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    world = World(tmp_path_factory.mktemp("hostile"))
    world.script("Qwen25", "still", " here")
    with TestClient(
        world.app, base_url="http://llmux.test", raise_server_exceptions=False
    ) as client:
        yield client


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_a_clear_4xx_and_the_server_serves_on(http: TestClient, name: str) -> None:
    body, status = CASES[name]
    started = time.monotonic()
    answer = http.post(
        "/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"},
    )
    assert time.monotonic() - started < 5
    assert answer.status_code == status, answer.text[:300]
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    ok = http.post(
        "/v1/chat/completions",
        content=chat(),
        headers={"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"},
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "still here"


def test_an_oversized_authorization_header_is_a_401(http: TestClient) -> None:
    answer = http.get("/v1/models", headers={"Authorization": "Bearer " + "x" * 100_000})
    assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error"


def test_the_key_never_reaches_a_log_line(
    http: TestClient, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level("DEBUG")
    for key in (TEST_KEY, "sk-llmux-a-wrong-key-that-must-not-be-logged"):
        http.post(
            "/v1/chat/completions",
            content=chat(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
    logged = caplog.text + "".join(capfd.readouterr())
    assert "test-client" in logged  # the client's name is logged...
    assert TEST_KEY not in logged and "a-wrong-key-that-must" not in logged  # ...never a key


def test_keys_are_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every configured key is compared, with hmac.compare_digest, whichever one matches (or
    none): the time says nothing about which key, or how much of one, was right."""
    import hmac

    from llmux.keys import KeyRing

    path = tmp_path / "api_keys.yaml"
    keys = [f"sk-llmux-key-number-{i:04d}-padding" for i in range(5)]
    path.write_text(
        "api_keys:\n" + "".join(f"  - {{key: {k}, name: c{i}}}\n" for i, k in enumerate(keys))
    )
    ring = KeyRing.load(path)
    compared: list[int] = []
    original = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        compared.append(1)
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented in (keys[0], keys[4], "sk-llmux-nobody"):
        compared.clear()
        ring.client_for(presented)
        assert len(compared) == len(keys)
