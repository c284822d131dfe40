"""What the gateway adds to every request, kept small: the endpoints that clients poll skip
FastAPI's routing, and neither BentoML nor FastAPI makes OpenTelemetry spans that nobody exports.
(The requests/s themselves are measured in bench/, never timed here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fastapi.routing
import pytest
from starlette.testclient import TestClient

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


def test_bentoml_traces_no_url(tmp_path: Path) -> None:
    """BentoML's OpenTelemetry middleware opens a span per request and per message sent (each
    SSE chunk of a stream) unless the URL is excluded; no exporter reads them."""
    probe = (
        "import json, service\n"
        "from opentelemetry.util.http import ExcludeList\n"
        "urls = ExcludeList(service.LLMux.config['tracing']['excluded_urls'])\n"
        "paths = ['/v1/chat/completions', '/v1/models', '/health', '/admin/models']\n"
        "print(json.dumps([urls.url_disabled('http://127.0.0.1:8081' + p) for p in paths]))\n"
    )
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "LLMUX_CONFIG_DIR": str(ROOT / "config" / "local"),
    }
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, True, True, True]
