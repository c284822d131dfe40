"""The foundation over HTTP, driven by the official openai SDK against the app in process."""

from __future__ import annotations

import openai
import pytest
from pydantic import BaseModel
from starlette.testclient import TestClient

from tests.conftest import TEST_KEY

PRODUCTION_NAMES = {
    "Qwen3.5-9B-FP8-Thinking",
    "Qwen3.5-9B-FP8-Instruct",
    "Qwen3.5-9B-FP8-Uncensored-Thinking",
    "Qwen3.5-9B-FP8-Uncensored-Instruct",
    "Qwen3.5-4B-Thinking",
    "Qwen3.5-4B-Instruct",
    "GPT-OSS-20B-Low",
    "GPT-OSS-20B-Medium",
    "GPT-OSS-20B-High",
    "GPT-OSS-20B-Uncensored-Low",
    "GPT-OSS-20B-Uncensored-Medium",
    "GPT-OSS-20B-Uncensored-High",
    "cohere-transcribe",
    "Chatterbox-Turbo",
    "Chatterbox-Multilingual",
    "Chatterbox",
}


def test_models_list_has_all_sixteen_virtual_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert {m.id for m in models} == PRODUCTION_NAMES
    assert len(models) == 16
    by_id = {m.id: m for m in models}
    assert by_id["Qwen3.5-4B-Thinking"].model_extra["type"] == "llm"
    assert by_id["Qwen3.5-4B-Thinking"].model_extra["capabilities"]["vision"] is True
    assert by_id["GPT-OSS-20B-High"].model_extra["capabilities"]["vision"] is False
    assert by_id["cohere-transcribe"].model_extra["capabilities"]["transcription"] is True
    assert by_id["Chatterbox"].model_extra["physical_model"] == "chatterbox"
    assert all(m.object == "model" and m.owned_by == "llmux" for m in models)


def test_models_retrieve(client: openai.OpenAI) -> None:
    model = client.models.retrieve("GPT-OSS-20B-Medium")
    assert model.id == "GPT-OSS-20B-Medium"
    assert model.model_extra["physical_model"] == "gpt-oss-20b"


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert "gpt-4o" in caught.value.message


def test_wrong_key_is_authentication_error(client: openai.OpenAI) -> None:
    wrong = client.with_options(api_key="sk-not-a-key-0123456789")
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.body["type"] == "authentication_error"  # type: ignore[index]
    assert caught.value.code == "invalid_api_key"


@pytest.fixture
def http(app) -> TestClient:  # type: ignore[no-untyped-def]
    return TestClient(app, base_url="http://llmux.test")


AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


def assert_envelope(response, status: int, type_: str) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/does-not-exist"),
        ("POST", "/v1/audio/speech"),
        ("GET", "/v1"),
    ],
)
def test_every_v1_path_needs_a_key_before_404(http: TestClient, method: str, path: str) -> None:
    error = assert_envelope(http.request(method, path), 401, "authentication_error")
    assert "Authorization: Bearer" in error["message"]


def test_bearer_scheme_is_required(http: TestClient) -> None:
    response = http.get("/v1/models", headers={"Authorization": TEST_KEY})
    assert_envelope(response, 401, "authentication_error")
    assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_v1_path_with_key_is_404_envelope(http: TestClient) -> None:
    error = assert_envelope(http.get("/v1/does-not-exist", headers=AUTH), 404, "not_found_error")
    assert "/v1/does-not-exist" in error["message"]


def test_wrong_method_is_405_envelope(http: TestClient) -> None:
    error = assert_envelope(http.delete("/v1/models", headers=AUTH), 405, "invalid_request_error")
    assert "GET" in error["message"]


def test_health_needs_no_key_and_echoes_request_id(http: TestClient) -> None:
    response = http.get("/health", headers={"X-Request-ID": "abc-123"})
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert "loaded_models" in response.json()
    assert response.headers["x-request-id"] == "abc-123"


def test_request_id_is_generated_when_missing_or_unsafe(http: TestClient) -> None:
    generated = http.get("/health").headers["x-request-id"]
    assert len(generated) == 32
    unsafe = http.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"
    assert http.get("/v1/models").headers["x-request-id"]  # errors carry it too


def test_cors_preflight_passes_without_key(http: TestClient) -> None:
    response = http.options(
        "/v1/chat/completions",
        headers={
            "Origin": "http://localhost:8080",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "http://localhost:8080")


def test_bentoml_swagger_pages_are_not_served(http: TestClient) -> None:
    assert_envelope(http.get("/docs.json"), 404, "not_found_error")
    index = http.get("/")
    assert index.status_code == 200
    assert "/health" in index.json()["endpoints"]
    assert "<script" not in index.text
    assert http.get("/docs").status_code == 404  # FastAPI's CDN-backed Swagger is off too


class Echo(BaseModel):
    model: str
    n: int = 1


def app_with_test_routes(settings):  # type: ignore[no-untyped-def]
    """The app plus routes that read a typed body and that fail, placed before the /v1 fallback."""
    from llmux.app import create_app

    app = create_app(settings)

    @app.post("/v1/echo")
    async def echo(body: Echo) -> dict:  # type: ignore[type-arg]
        return body.model_dump()

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    app.router.routes[:0] = [app.router.routes.pop(), app.router.routes.pop()]
    return TestClient(app, base_url="http://llmux.test", raise_server_exceptions=False)


def test_body_over_the_cap_is_413_before_reading(settings) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    http = app_with_test_routes(replace(settings, max_body_bytes=1024))
    declared = http.post("/v1/echo", headers=AUTH, content=b"x" * 2048)
    error = assert_envelope(declared, 413, "invalid_request_error")
    assert "limit" in error["message"]

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(4):
            yield b"y" * 512

    # No Content-Length: the cap is enforced while the body streams in.
    streamed = http.post("/v1/echo", headers=AUTH, content=chunks())
    assert_envelope(streamed, 413, "invalid_request_error")
    assert http.post("/v1/echo", headers=AUTH, json={"model": "m"}).json() == {"model": "m", "n": 1}


def test_malformed_and_invalid_bodies_are_400_naming_the_field(settings) -> None:  # type: ignore[no-untyped-def]
    http = app_with_test_routes(settings)
    bad_json = http.post(
        "/v1/echo", headers={**AUTH, "Content-Type": "application/json"}, content=b'{"model": '
    )
    assert "not valid JSON" in assert_envelope(bad_json, 400, "invalid_request_error")["message"]
    missing = assert_envelope(
        http.post("/v1/echo", headers=AUTH, json={}), 400, "invalid_request_error"
    )
    assert missing["param"] == "model"
    wrong_type = assert_envelope(
        http.post("/v1/echo", headers=AUTH, json={"model": "m", "n": "many"}),
        400,
        "invalid_request_error",
    )
    assert wrong_type["param"] == "n"


def test_unexpected_error_is_500_with_request_id_and_no_internals(settings) -> None:  # type: ignore[no-untyped-def]
    http = app_with_test_routes(settings)
    response = http.get("/v1/boom", headers={**AUTH, "X-Request-ID": "req-42"})
    error = assert_envelope(response, 500, "server_error")
    assert "req-42" in error["message"]
    assert "secret" not in response.text


def test_logs_name_the_client_never_the_key(
    http: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="llmux"):
        http.get("/v1/models", headers={**AUTH, "X-Request-ID": "log-1"})
        http.get("/v1/models", headers={"Authorization": "Bearer sk-wrong-key-abcdefghijklmnop"})
    text = "\n".join(f"[{r.request_id}] {r.getMessage()}" for r in caplog.records)  # type: ignore[attr-defined]
    assert "client=test-client" in text
    assert "log-1" in text
    assert TEST_KEY not in text
    assert "sk-wrong-key" not in text
