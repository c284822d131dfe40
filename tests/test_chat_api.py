"""/v1/chat/completions through the openai SDK, with the real Gemma 3 270M GGUF loaded by each
chat backend in turn (llama.cpp, and transformers from the same weights, dequantized once), plus
a tiny Qwen3.5 vision model for images.

The model is a small base model, so its words are not asserted; what is asserted is everything
the server promises around them: shapes, streaming order, usage, limits, stops, seeds, JSON
constraints, tool calls and errors, identically on both backends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from starlette.testclient import TestClient

from tests.conftest import GEMMA, TEST_KEY, gemma_entry, real_models, write_config

pytestmark = real_models(GEMMA)

MODEL = "Gemma"
REGISTRY = """
physical_models:
  gemma:
{gemma}
  gemma-no-tools:
{gemma_no_tools}
  whisper:
    type: asr
    backend: faster_whisper
    estimated_vram_gb: 0.3
virtual_models:
  Gemma: {{physical: gemma}}
  Gemma-No-Tools: {{physical: gemma-no-tools}}
  whisper: {{physical: whisper}}
"""
HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module", params=["llamacpp", "transformers"])
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from llmux.app import create_app
    from llmux.settings import Settings

    # transformers from the dequantized checkpoint: the same weights without two 80 s loads
    converted = request.param == "transformers"
    registry = REGISTRY.format(
        gemma=gemma_entry(tools=True, backend=request.param, converted=converted),
        gemma_no_tools=gemma_entry(tools=False, backend=request.param, converted=converted),
    )
    config = write_config(tmp_path_factory.mktemp("chat") / "config", registry)
    return create_app(Settings(config_dir=config, models_dir=Path("/nonexistent")))


@pytest.fixture(scope="module")
def http(app) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(app, base_url="http://llmux.test") as client:
        yield client


@pytest.fixture(scope="module")
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(api_key=TEST_KEY, base_url="http://llmux.test/v1", http_client=http)


def test_plain_answer_shape_and_usage(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=12, seed=3, temperature=0
    )
    assert answer.model == MODEL and answer.object == "chat.completion"
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage and usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_matches_whole_answer_and_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=16, seed=7, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=16,
            seed=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(text_chunks) > 3, "streamed token by token"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert (
        "".join(c.choices[0].delta.content for c in text_chunks) == whole.choices[0].message.content
    )
    assert len({c.id for c in chunks}) == 1


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, seed=1)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage and answer.usage.completion_tokens == 5
    newer = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_completion_tokens=4, seed=1
    )
    assert newer.usage and newer.usage.completion_tokens == 4


def test_stop_sequence_cuts_before_it(client: openai.OpenAI) -> None:
    free = (
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, temperature=0)
        .choices[0]
        .message.content
        or ""
    )
    words = free.split()
    assert len(words) >= 4, free
    stop = " " + words[2]
    cut = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=24, temperature=0, stop=[stop, "never-appears"]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == free[: free.index(stop)].strip()
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=24, temperature=0, stop=stop, stream=True
        )
        if c.choices
    )
    assert stop.strip() not in streamed.split()[2:3]
    assert streamed.strip() == cut.choices[0].message.content


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return (
            client.chat.completions.create(
                model=MODEL,
                messages=HELLO,
                max_tokens=20,
                temperature=1.0,
                seed=seed,
            )
            .choices[0]
            .message.content
            or ""
        )

    assert sample(11) == sample(11)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["city", "people"],
        "properties": {"city": {"type": "string", "maxLength": 30}, "people": {"type": "integer"}},
    }
    answer = client.chat.completions.create(
        model=MODEL,
        max_tokens=80,
        seed=2,
        messages=[{"role": "user", "content": "Name a city and its population as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), schema)
    obj = client.chat.completions.create(
        model=MODEL,
        max_tokens=60,
        seed=2,
        messages=HELLO,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["city"],
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["C", "F"]},
            },
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def test_tool_round_trip(client: openai.OpenAI) -> None:
    messages: list = [{"role": "user", "content": "What is the weather in Paris?"}]
    call = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        max_tokens=60,
        seed=4,
    )
    choice = call.choices[0]
    assert choice.finish_reason == "tool_calls"
    tool_call = choice.message.tool_calls[0]  # type: ignore[index]
    assert tool_call.id.startswith("call_") and tool_call.type == "function"
    assert tool_call.function.name in ("get_weather", "get_time")
    arguments = json.loads(tool_call.function.arguments)
    if tool_call.function.name == "get_weather":
        jsonschema.validate(arguments, WEATHER["function"]["parameters"])

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": '{"temp_c": 18}'},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=20, seed=4
    )
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_named_tool_choice_streams_a_tool_call(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=[WEATHER, CLOCK],
            max_tokens=60,
            seed=5,
            stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    )
    starts = [
        tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or []) if tc.id
    ]
    assert len(starts) == 1 and starts[0].function.name == "get_weather" and starts[0].index == 0
    arguments = "".join(
        tc.function.arguments or ""
        for c in chunks
        if c.choices
        for tc in (c.choices[0].delta.tool_calls or [])
    )
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ] == ["tool_calls"]


@pytest.mark.parametrize(
    "payload,status,param",
    [
        ({"model": "whisper", "messages": HELLO}, 400, "model"),
        ({"model": "gpt-4o", "messages": HELLO}, 404, "model"),
        ({"model": MODEL, "messages": HELLO, "n": 2}, 400, "n"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        (
            {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages.0.role",
        ),
        (
            {
                "model": MODEL,
                "messages": HELLO,
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            400,
            "tool_choice",
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
                        ],
                    }
                ],
            },
            400,
            "messages[0].content[0].image_url",
        ),
        ({"model": MODEL, "messages": HELLO, "temperature": 5}, 400, "temperature"),
    ],
)
def test_bad_requests_are_clear_4xx(
    http: TestClient,
    payload: dict,
    status: int,  # type: ignore[type-arg]
    param: str,
) -> None:
    response = http.post(
        "/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {TEST_KEY}"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_asr_model_error_names_the_right_endpoint(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="/v1/audio/transcriptions"):
        client.chat.completions.create(model="whisper", messages=HELLO)


def test_model_without_tools_ignores_them(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="Gemma-No-Tools", messages=HELLO, tools=[WEATHER], max_tokens=8
    )
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


# --- images, on a tiny random-weight Qwen3.5 vision model --------------------------------------


@pytest.fixture(scope="module")
def vision_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    from llmux.app import create_app
    from llmux.settings import Settings
    from tests.tiny_models import build_tiny_qwen35_vl

    root = tmp_path_factory.mktemp("vision")
    build_tiny_qwen35_vl(root / "tiny-qwen")
    config = write_config(
        root / "config",
        f"""
physical_models:
  tiny-qwen:
    type: llm
    backend: transformers
    path: {root / "tiny-qwen"}
    estimated_vram_gb: 0.1
    supports_vision: true
    supports_tools: true
    parser: qwen3.5
virtual_models:
  Tiny-Qwen-Thinking: {{physical: tiny-qwen, params: {{enable_thinking: true}}}}
""",
    )
    app = create_app(Settings(config_dir=config, models_dir=root))
    with TestClient(app, base_url="http://llmux.test") as http:
        yield openai.OpenAI(api_key=TEST_KEY, base_url="http://llmux.test/v1", http_client=http)


def png_data_uri(width: int = 32, height: int = 32) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_image_answer_through_the_api(vision_client: openai.OpenAI) -> None:
    content = [
        {"type": "text", "text": "What colour is this?"},
        {"type": "image_url", "image_url": {"url": png_data_uri()}},
    ]
    with_image = vision_client.chat.completions.create(
        model="Tiny-Qwen-Thinking",
        max_tokens=6,
        seed=1,
        messages=[{"role": "user", "content": content}],
    )
    text_only = vision_client.chat.completions.create(
        model="Tiny-Qwen-Thinking",
        max_tokens=6,
        seed=1,
        messages=[{"role": "user", "content": content[:1]}],
    )
    assert with_image.choices[0].finish_reason in ("stop", "length")
    assert with_image.usage and text_only.usage
    # A 32x32 image becomes 4 image tokens plus the vision start/end markers.
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + 6
    # Random weights produce no </think>, so with thinking on everything is reasoning.
    message = with_image.choices[0].message
    assert (message.model_extra or {}).get("reasoning_content") is not None or message.content


def test_bad_image_data_is_a_clear_400(vision_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        vision_client.chat.completions.create(
            model="Tiny-Qwen-Thinking",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}
                    ],
                }
            ],
        )
    assert caught.value.body["param"] == "messages[0].content[0].image_url"  # type: ignore[index]
