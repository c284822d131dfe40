"""The embedded default (`config/local/models.yaml`) answers for real, through the openai SDK.

These run the shipped config itself, on the models `make setup` lays out: Qwen2.5-Coder 0.5B
Instruct answers a factual question and calls a tool, Gemma 3 270M is the second LLM it swaps
with, MiniLM embeds. Temperature 0 throughout, so the answers are the model's greedy ones.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from starlette.testclient import TestClient

from tests.conftest import MODELS_DIR, REPO, TEST_KEY, real_models

QWEN = MODELS_DIR / "qwen2.5-coder-0.5b" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
pytestmark = real_models(QWEN)
CHAT = "Qwen2.5-Coder-0.5B"
ADMIN_KEY = "sk-llmux-operator-key-for-the-tests"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What's the weather in Berlin?"}]


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from llmux.app import create_app
    from llmux.settings import Settings

    config = tmp_path_factory.mktemp("embedded") / "config"
    shutil.copytree(REPO / "config" / "local", config)
    (config / "api_keys.yaml").write_text(
        f"api_keys:\n  - key: {TEST_KEY}\n    name: test-client\n"
        f"  - key: {ADMIN_KEY}\n    name: operator\n    role: admin\n",
        encoding="utf-8",
    )
    app = create_app(Settings(config_dir=config, models_dir=MODELS_DIR))
    with TestClient(app, base_url="http://llmux.test") as client:
        yield client


@pytest.fixture(scope="module")
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(api_key=TEST_KEY, base_url="http://llmux.test/v1", http_client=http)


def health(http: TestClient) -> dict[str, Any]:
    answer: dict[str, Any] = http.get("/health").json()
    return answer


def test_a_factual_question_gets_the_fact(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=40,
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.choices[0].finish_reason == "stop"


def test_a_tool_request_gets_a_structured_call(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=CHAT, messages=ASK_WEATHER, tools=[WEATHER], temperature=0, max_tokens=80
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Berlin"}
    assert call.id


def test_a_streamed_tool_request_gets_the_same_call_in_deltas(client: openai.OpenAI) -> None:
    names, arguments, reasons = [], "", []
    for chunk in client.chat.completions.create(
        model=CHAT,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        temperature=0,
        max_tokens=80,
        stream=True,
    ):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                assert call.index == 0
                if call.function and call.function.name:
                    names.append(call.function.name)
                arguments += (call.function.arguments or "") if call.function else ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert names == ["get_weather"]
    assert json.loads(arguments) == {"city": "Berlin"}
    assert reasons == ["tool_calls"]


def test_the_tool_result_turn_is_rendered_in_the_template_form_and_answered(
    client: openai.OpenAI, http: TestClient
) -> None:
    first = client.chat.completions.create(
        model=CHAT, messages=ASK_WEATHER, tools=[WEATHER], temperature=0, max_tokens=80
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    turn: list[Any] = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'},
    ]
    # The prompt the model sees: Qwen 2.5's own template, tool result in <tool_response>.
    from llmux.services.chat_request import prepare_chat
    from llmux.wire.chat import ChatCompletionRequest

    state = http.app.state.llmux  # type: ignore[attr-defined]
    body = ChatCompletionRequest.model_validate(
        {"model": CHAT, "messages": turn, "tools": [WEATHER]}
    )
    physical_id, physical, virtual = state.registry.require(CHAT, "llm")
    runner = state.residency._entries[physical_id].runner  # resident after the first turn
    prompt = runner.render_prompt(prepare_chat(body, physical_id, physical, virtual).generation)
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call>'
        in (prompt)
    )
    assert "<|im_start|>user\n<tool_response>\n" in prompt
    assert '{"temperature_c": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n' in prompt
    # This 0.5B model at temperature 0 tends to call the tool again rather than answer, so the
    # wording is not asserted: the turn is accepted and answered in a valid shape.
    second = client.chat.completions.create(
        model=CHAT, messages=turn, tools=[WEATHER], temperature=0, max_tokens=60
    )
    assert second.choices[0].finish_reason in ("stop", "tool_calls", "length")


def test_a_virtual_model_on_the_same_weights_costs_no_load(
    client: openai.OpenAI, http: TestClient
) -> None:
    client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    loads = health(http)["loaded_models"]["qwen2.5-coder-0.5b"]["loads"]
    terse = client.chat.completions.create(
        model="Qwen2.5-Coder-0.5B-Terse",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=40,
    )
    assert "Paris" in (terse.choices[0].message.content or "")
    assert health(http)["loaded_models"]["qwen2.5-coder-0.5b"]["loads"] == loads


def test_the_two_llms_swap(client: openai.OpenAI, http: TestClient) -> None:
    client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert "qwen2.5-coder-0.5b" in health(http)["loaded_models"]
    client.chat.completions.create(
        model="Gemma-3-270M", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    loaded = health(http)["loaded_models"]
    assert "gemma3-270m" in loaded and "qwen2.5-coder-0.5b" not in loaded
    client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    loaded = health(http)["loaded_models"]
    assert "qwen2.5-coder-0.5b" in loaded and "gemma3-270m" not in loaded


def test_embeddings_rank_a_paraphrase_above_an_unrelated_sentence(client: openai.OpenAI) -> None:
    texts = [
        "A man is playing a guitar.",
        "Someone plays an acoustic guitar.",
        "The stock market fell sharply today.",
    ]
    data = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts).data
    a, b, c = (d.embedding for d in data)

    def cosine(x: list[float], y: list[float]) -> float:
        dot = sum(p * q for p, q in zip(x, y))
        return dot / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))

    assert len(a) == 384
    assert cosine(a, b) > cosine(a, c) + 0.3


def test_the_operator_sees_loads_and_unloads_the_embedded_default(http: TestClient) -> None:
    from llmux.cli import table

    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (
        http.get("/admin/models", headers={"Authorization": f"Bearer {TEST_KEY}"}).status_code
        == 403
    )
    assert http.post(f"/admin/models/{CHAT}/load", headers=auth).status_code == 200
    shown = table(http.get("/admin/models", headers=auth).json()["models"])
    row = next(line for line in shown.splitlines() if line.startswith("qwen2.5-coder-0.5b"))
    assert row.split()[1:5] == ["llm", "0.6", "GB", "gpu"]  # llmux ps's table
    # Gemma cannot sit beside Qwen (one LLM at a time): loading it follows that rule.
    assert http.post("/admin/models/Gemma-3-270M/load", headers=auth).status_code == 200
    loaded = health(http)["loaded_models"]
    assert "gemma3-270m" in loaded and "qwen2.5-coder-0.5b" not in loaded
    unloaded = http.post("/admin/models/gemma3-270m/unload", headers=auth).json()["unloaded"]
    assert unloaded == ["gemma3-270m"] and "gemma3-270m" not in health(http)["loaded_models"]
