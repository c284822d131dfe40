"""Chat under realistic traffic on a live server: disconnects, Open WebUI's request pattern,
missing weights, and residency decisions seen through /health."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import GEMMA, TEST_KEY, LiveServer, gemma_entry, real_models, write_config

pytestmark = real_models(GEMMA)
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}

# The same small GGUF under declared footprints that mirror production (docs/residency.md).
REGISTRY = f"""
gpu_budget_gb: 16
physical_models:
  llm-4gb:
{gemma_entry(4, tools=False)}
  llm-9gb:
{gemma_entry(9, tools=False)}
  llm-13gb:
{gemma_entry(13, tools=False)}
  missing:
    type: llm
    backend: llamacpp
    model_file: nowhere.gguf
    estimated_vram_gb: 1
virtual_models:
  Small: {{physical: llm-4gb}}
  Medium: {{physical: llm-9gb}}
  Large: {{physical: llm-13gb}}
  Missing: {{physical: missing}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from llmux.app import create_app
    from llmux.settings import Settings

    root = tmp_path_factory.mktemp("serving")
    config = write_config(root / "config", REGISTRY)
    app = create_app(Settings(config_dir=config, models_dir=root / "models"))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=TEST_KEY, base_url=f"{server.url}/v1", max_retries=0)


def health(server: LiveServer) -> dict:  # type: ignore[type-arg]
    return httpx.get(f"{server.url}/health").json()


def wait_for(server: LiveServer, predicate, seconds: float = 30) -> dict:  # type: ignore[no-untyped-def, type-arg]
    deadline = time.monotonic() + seconds
    while True:
        state = health(server)
        if predicate(state):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.1)


def test_disconnect_mid_stream_stops_generation_and_frees_the_model(server: LiveServer) -> None:
    body = {
        "model": "Small",
        "stream": True,
        "max_tokens": 1500,
        "temperature": 1.0,
        "seed": 1,
        "messages": [{"role": "user", "content": "Tell a very long story."}],
    }
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(8)]
        assert all(not line or line.startswith("data: ") for line in received)
        assert health(server)["loaded_models"]["llm-4gb"]["in_flight"] == 1
    # The client is gone: generation must stop long before 1500 tokens would have been made.
    state = wait_for(server, lambda s: s["loaded_models"]["llm-4gb"]["in_flight"] == 0)
    assert state["loaded_models"]["llm-4gb"]["state"] == "ready"
    assert time.monotonic() - started < 20
    # The model is free for the next request at once.
    quick = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers=AUTH,
        timeout=60,
        json={"model": "Small", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert quick.status_code == 200 and quick.json()["usage"]["completion_tokens"] <= 3


OPEN_WEBUI_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": f"tool_{i}",
            "description": "An Open WebUI built-in tool. " * 20,
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look for. " * 10},
                    "count": {"type": "integer"},
                },
                "required": ["query"],
            },
        },
    }
    for i in range(36)
]


def test_open_webui_pattern_all_four_requests_answer(client: openai.OpenAI) -> None:
    assert len(json.dumps(OPEN_WEBUI_TOOLS)) > 25_000
    messages = [{"role": "user", "content": "Say something about tea."}]

    def main_stream() -> str:
        chunks = client.chat.completions.create(
            model="Small", stream=True, messages=messages, tools=OPEN_WEBUI_TOOLS, max_tokens=24
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def side_task(task: str) -> str:
        answer = client.chat.completions.create(
            model="Small",
            max_tokens=12,
            messages=[*messages, {"role": "user", "content": f"Generate a {task}."}],
        )
        return answer.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(main_stream)] + [
            pool.submit(side_task, task) for task in ("title", "list of tags", "follow-up")
        ]
        answers = [f.result(timeout=240) for f in futures]
    assert all(answers), answers


def test_missing_weights_name_the_path_and_the_script(
    client: openai.OpenAI, server: LiveServer
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="Missing", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 503
    assert "nowhere.gguf" in caught.value.message
    assert "scripts/download_models.sh" in caught.value.message
    assert "missing" not in health(server)["loaded_models"]
    # Still serving, and a second try gets the same clear answer rather than a hang.
    with pytest.raises(openai.APIStatusError, match=r"nowhere\.gguf"):
        client.chat.completions.create(model="Missing", messages=[{"role": "user", "content": "x"}])


def test_switching_llms_evicts_the_previous_one(client: openai.OpenAI, server: LiveServer) -> None:
    def ask(model: str) -> dict:  # type: ignore[type-arg]
        client.chat.completions.create(
            model=model, max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
        )
        return health(server)

    for model, physical in (
        ("Small", "llm-4gb"),
        ("Medium", "llm-9gb"),
        ("Large", "llm-13gb"),
        ("Small", "llm-4gb"),
    ):
        state = ask(model)
        assert list(state["loaded_models"]) == [physical], state
        resident = state["loaded_models"][physical]
        assert resident["type"] == "llm" and resident["state"] == "ready"
        assert (
            resident["declared_bytes"]
            == {"llm-4gb": 4, "llm-9gb": 9, "llm-13gb": 13}[physical] * 2**30
        )
        assert state["budget_bytes"] == 16 * 2**30
        assert state["used_bytes"] == resident["footprint_bytes"]
