"""Schema fuzzing of every /v1 route from the app's own OpenAPI document (reliability issue,
item 1): with a valid key, whatever schemathesis generates (valid bodies, edge values, and bodies
that break the schema) gets no 5xx, and every error is OpenAI's envelope.

In process with scripted runners, so the fuzzing tests llmux's input handling, not a model's
speed; bounded in examples per route and derandomized, so CI runs the same cases every time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode
from starlette.testclient import TestClient

from tests.conftest import TEST_KEY
from tests.test_chat_edges import World

EXAMPLES_PER_ROUTE = 30


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    world = World(tmp_path_factory.mktemp("fuzz"))
    for model in ("Qwen25", "Qwen-Thinking", "GPT-OSS"):
        world.script(model, "fuzzed", " answer")
    return world


@pytest.fixture(scope="module")
def http(world: World) -> Iterator[TestClient]:
    with TestClient(world.app, base_url="http://llmux.test", raise_server_exceptions=False) as c:
        yield c


def operations(world_app: Any) -> list[Any]:
    schema = schemathesis.openapi.from_dict(world_app.openapi())
    return [result.ok() for result in schema.get_all_operations()]


def name(operation: Any) -> str:
    return f"{operation.method.upper()} {operation.path}"


def cases() -> list[tuple[str, GenerationMode]]:
    """Every route with valid inputs; those that take any input, with invalid ones too."""
    world = World(Path("/nonexistent-never-written"))  # only its app's schema is read
    result = []
    for operation in operations(world.app):
        result.append((name(operation), GenerationMode.POSITIVE))
        if operation.body or operation.query:  # a string path parameter has no invalid value
            result.append((name(operation), GenerationMode.NEGATIVE))
    return result


def check(response: Any, where: str) -> None:
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}, f"{where}: {error}"
        assert error["message"], where


# Random strings as model names would stop nearly every request at the model lookup (404); most
# generated requests name a model that exists, so the fuzzing reaches the handlers behind it.
MODELS = ("Qwen25", "Qwen-Thinking", "GPT-OSS")


@pytest.mark.parametrize(("route", "mode"), cases())
def test_no_generated_request_gets_a_5xx_and_every_error_is_an_envelope(
    route: str, mode: GenerationMode, world: World, http: TestClient
) -> None:
    [operation] = [op for op in operations(world.app) if name(op) == route]

    @settings(
        max_examples=EXAMPLES_PER_ROUTE,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode), model=st.none() | st.sampled_from(MODELS))
    def fuzz(case: Any, model: str | None) -> None:
        if model is not None and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        if model is not None and "model_id" in (case.path_parameters or {}):
            case.path_parameters["model_id"] = model
        request = case.as_transport_kwargs(headers={"Authorization": f"Bearer {TEST_KEY}"})
        request.pop("cookies", None)  # the schema declares none; Starlette refuses per-request ones
        request["url"] = request["url"].removeprefix(str(request.pop("base_url", "")))
        if isinstance(request.get("data"), bytes | str):  # a raw body, as httpx wants it
            request["content"] = request.pop("data")
        response = http.request(**request)
        check(response, f"{route} {case.body!r:.300}")

    fuzz()
    assert http.get("/health").status_code == 200
