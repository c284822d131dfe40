"""Chat answers on the production model families' edge cases, through the real `ChatSession`
and HTTP app with scripted fake runners (no model): what an openai SDK client sees is what it
would see from OpenAI, and a client's mistake is a 400 before any byte of a stream."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.testclient import TestClient

from llmux.core.config import Registry
from llmux.keys import KeyRing
from llmux.services.chat import ChatService
from llmux.services.chat_request import prepare_chat
from llmux.services.stops import StopFilter
from llmux.settings import Settings
from llmux.state import AppState
from llmux.wire.chat import ChatCompletionRequest
from llmux_policy.executor import Residency
from runners.base import completion_budget
from runners.chat import GenerationChunk, GenerationRequest
from tests.conftest import GEMMA, TEST_KEY, write_config
from tests.test_parsers import _o200k_from_quicktok

GIB = 1024**3
CONTEXT = 64  # "tokens" of the scripted runner: one per character of the rendered prompt / 4
REGISTRY = Registry.model_validate(
    {
        "physical_models": {
            "qwen3.5-fake": {
                "type": "llm",
                "backend": "transformers",
                "estimated_vram_gb": 1,
                "parser": "qwen3.5",
                "supports_tools": True,
                "supports_vision": True,
            },
            "qwen2.5-fake": {
                "type": "llm",
                "backend": "transformers",
                "estimated_vram_gb": 1,
                "parser": "qwen2.5",
                "supports_tools": True,
            },
            "gpt-oss-fake": {
                "type": "llm",
                "backend": "transformers",
                "estimated_vram_gb": 1,
                "parser": "harmony",
                "supports_tools": True,
            },
        },
        "virtual_models": {
            "Qwen-Thinking": {"physical": "qwen3.5-fake", "params": {"enable_thinking": True}},
            "Qwen25": {"physical": "qwen2.5-fake"},
            "GPT-OSS": {"physical": "gpt-oss-fake", "params": {"reasoning_effort": "low"}},
        },
    }
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
HI = [{"role": "user", "content": "hi"}]


class ScriptedRunner:
    """Emits `script`; decodes special tokens into the text only when asked, as the real
    runners do (harmony's closing <|return|> is one)."""

    context_length = CONTEXT

    def __init__(self, physical_id: str) -> None:
        self.physical_id = physical_id
        self.script: list[str | GenerationChunk] = []
        self.special_tail = "<|return|>" if "gpt-oss" in physical_id else ""
        self.requests: list[GenerationRequest] = []
        self.encoding: Any = None
        self.step: threading.Semaphore | None = None

    def preflight(self) -> None:
        pass

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def device_bytes(self) -> None:
        return None

    def harmony_encoding(self) -> Any:
        return self.encoding

    def render_prompt(self, request: GenerationRequest) -> str:
        return json.dumps(request.messages)

    def check(self, request: GenerationRequest) -> None:
        completion_budget(
            self.physical_id,
            self.context_length,
            len(self.render_prompt(request)) // 4,
            request.max_tokens,
        )

    def generate(
        self, request: GenerationRequest, cancel: threading.Event
    ) -> Iterator[GenerationChunk]:
        self.requests.append(request)
        produced = 0
        for piece in self.script:
            if self.step is not None:
                self.step.acquire(timeout=10)
            if cancel.is_set():
                break
            if isinstance(piece, GenerationChunk):
                yield piece
                return
            produced += 1
            ids = tuple(self.encoding.encode(piece, allowed_special="all")) if self.encoding else ()
            yield GenerationChunk(text=piece, token_ids=ids)
        if request.keep_special_tokens and self.special_tail:
            ids = (
                tuple(self.encoding.encode(self.special_tail, allowed_special="all"))
                if self.encoding
                else ()
            )
            yield GenerationChunk(text=self.special_tail, token_ids=ids)
        yield GenerationChunk(finish_reason="stop", prompt_tokens=5, completion_tokens=produced)


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.runners = {pid: ScriptedRunner(pid) for pid in REGISTRY.physical_models}
        self.residency = Residency(REGISTRY, self.runners.__getitem__, 8 * GIB)
        self.chat = ChatService(REGISTRY, self.residency)
        config = write_config(tmp_path / "config", "physical_models: {}\nvirtual_models: {}\n")
        settings = Settings(config_dir=config, models_dir=tmp_path)
        state = AppState(
            settings=settings,
            registry=REGISTRY,
            keys=KeyRing.load(settings.api_keys_file),
            residency=self.residency,
            chat=self.chat,
        )
        from llmux.app import create_app

        self.app = create_app(settings, state)

    def script(self, model: str, *pieces: str | GenerationChunk) -> ScriptedRunner:
        runner = self.runners[REGISTRY.virtual_models[model].physical]
        runner.script = list(pieces)
        return runner


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.fixture
def http(world: World) -> Iterator[TestClient]:
    with TestClient(world.app, base_url="http://llmux.test") as client:
        yield client


@pytest.fixture
def sdk(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=TEST_KEY, base_url="http://llmux.test/v1", http_client=http, max_retries=0
    )


def post(http: TestClient, **body: Any) -> Any:
    return http.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {TEST_KEY}"}
    )


# --- refused before the first byte ------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_over_the_context_is_a_400_context_length_exceeded(
    http: TestClient, world: World, stream: bool
) -> None:
    world.script("Qwen25", "never")
    answer = post(
        http, model="Qwen25", stream=stream, messages=[{"role": "user", "content": "x" * 1000}]
    )
    assert answer.status_code == 400  # not a 200 stream with an error event inside
    error = answer.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert world.runners["qwen2.5-fake"].requests == []  # nothing was generated
    assert all(m["in_flight"] == 0 for m in world.residency.snapshot()["models"])


def test_bytes_that_are_not_an_image_are_a_400_before_the_stream(http: TestClient) -> None:
    fake = base64.b64encode(b"\x89PNG\r\n\x1a\n not really a png").decode()
    answer = post(
        http,
        model="Qwen-Thinking",
        stream=True,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{fake}"}}
                ],
            }
        ],
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "messages[0].content[0].image_url"


def test_an_image_over_the_pixel_limit_is_a_400(http: TestClient) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (14_000, 14_000)).save(buffer, format="PNG")  # 196 Mpx, a few KB
    data = base64.b64encode(buffer.getvalue()).decode()
    answer = post(
        http,
        model="Qwen-Thinking",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
                ],
            }
        ],
    )
    assert answer.status_code == 400
    assert "pixels" in answer.json()["error"]["message"]


def test_long_stop_strings_and_logprobs_are_refused(http: TestClient) -> None:
    answer = post(http, model="Qwen25", messages=HI, stop=["x" * 200_000] * 4)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "stop"
    answer = post(http, model="Qwen25", messages=HI, logprobs=True)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "logprobs"


def test_stop_filter_cost_does_not_grow_with_the_answer() -> None:
    stops = ["ab" * 128, "cd" * 128, "ef" * 128, "gh" * 128]  # four of the longest allowed

    def run(pieces: int) -> float:
        stop_filter = StopFilter(stops)
        started = time.perf_counter()
        for _ in range(pieces):
            stop_filter.push("ab" * 3 + "x")  # a near miss every time
        return time.perf_counter() - started

    short, long = min(run(500) for _ in range(3)), min(run(5_000) for _ in range(3))
    assert long < short * 10 * 3  # linear in the pieces, not quadratic


# --- the families' edge cases, through ChatSession --------------------------------------------


async def answer(world: World, body: dict[str, Any]) -> Any:
    session = await world.chat.start(ChatCompletionRequest.model_validate(body))
    try:
        return await session.complete()
    finally:
        await session.close()


async def test_gpt_oss_forced_tool_call_is_a_call_not_a_500(world: World) -> None:
    runner = world.script("GPT-OSS", '{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}')
    result = await answer(
        world, {"model": "GPT-OSS", "messages": HI, "tools": [WEATHER], "tool_choice": "required"}
    )
    assert runner.requests[-1].keep_special_tokens is False  # constrained output: no <|return|>
    assert result.choices[0].finish_reason == "tool_calls"
    call = result.choices[0].message.tool_calls[0].function
    assert json.loads(call.arguments) == {"city": "Oslo"}


async def test_gpt_oss_response_format_content_is_the_json_alone(world: World) -> None:
    world.script("GPT-OSS", '{"ok": ', "true}")
    result = await answer(
        world, {"model": "GPT-OSS", "messages": HI, "response_format": {"type": "json_object"}}
    )
    assert json.loads(result.choices[0].message.content) == {"ok": True}


async def test_qwen35_thinking_response_format_puts_the_json_in_content(world: World) -> None:
    runner = world.script("Qwen-Thinking", '{"ok": ', "true}")
    result = await answer(
        world,
        {"model": "Qwen-Thinking", "messages": HI, "response_format": {"type": "json_object"}},
    )
    assert runner.requests[-1].template_kwargs["enable_thinking"] is False
    assert json.loads(result.choices[0].message.content) == {"ok": True}
    assert result.choices[0].message.reasoning_content is None


async def test_a_tool_call_cut_by_max_tokens_finishes_with_length(world: World) -> None:
    world.script(
        "Qwen-Thinking",
        "</think>",
        "<tool_call>\n<function=get_weather>\n",
        "<parameter=city>\nBer",
        GenerationChunk(finish_reason="length", prompt_tokens=5, completion_tokens=3),
    )
    result = await answer(
        world, {"model": "Qwen-Thinking", "messages": HI, "tools": [WEATHER], "max_tokens": 3}
    )
    assert result.choices[0].finish_reason == "length"


async def test_a_queued_request_of_a_client_gone_never_runs(world: World) -> None:
    runner = world.script("Qwen25", "one", "two")
    runner.step = threading.Semaphore(0)
    first = await world.chat.start(
        ChatCompletionRequest.model_validate({"model": "Qwen25", "messages": HI})
    )
    running = asyncio.create_task(first.complete())
    while not runner.requests:
        await asyncio.sleep(0.01)
    second = await world.chat.start(
        ChatCompletionRequest.model_validate({"model": "Qwen25", "messages": HI})
    )
    queued = asyncio.create_task(second.complete())
    await asyncio.sleep(0.05)
    second.cancel.set()  # its client disconnected while it waited for the model's turn
    runner.step.release(10)
    await asyncio.wait_for(asyncio.gather(running, queued), 5)
    await first.close()
    await second.close()
    assert len(runner.requests) == 1  # the second never prefilled


def test_developer_role_and_earlier_reasoning_reach_the_template() -> None:
    physical = REGISTRY.physical_models["qwen3.5-fake"]
    body = ChatCompletionRequest.model_validate(
        {
            "model": "Qwen-Thinking",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": "x", "reasoning_content": "I thought."},
                {"role": "user", "content": "go on"},
            ],
        }
    )
    messages = prepare_chat(
        body, "qwen3.5-fake", physical, REGISTRY.virtual_models["Qwen-Thinking"]
    ).generation.messages
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == "ab"  # text parts joined: templates that concatenate work
    assert messages[2]["reasoning_content"] == messages[2]["thinking"] == "I thought."
    oss = prepare_chat(
        ChatCompletionRequest.model_validate(
            {"model": "GPT-OSS", "messages": [{"role": "developer", "content": "Be brief."}, *HI]}
        ),
        "gpt-oss-fake",
        REGISTRY.physical_models["gpt-oss-fake"],
        REGISTRY.virtual_models["GPT-OSS"],
    ).generation.messages
    assert oss[0]["role"] == "developer"  # harmony has the role


def test_openai_shapes_leave_out_nulls_but_keep_finish_reason(
    http: TestClient, world: World, sdk: openai.OpenAI
) -> None:
    world.script("Qwen25", "Hello")
    whole = post(http, model="Qwen25", messages=HI).json()
    message = whole["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hello"}
    assert whole["choices"][0]["logprobs"] is None
    world.script("Qwen25", "Hel", "lo")
    lines = [
        line
        for line in post(http, model="Qwen25", messages=HI, stream=True).text.splitlines()
        if line.startswith("data: {")
    ]
    chunks = [json.loads(line[6:]) for line in lines]
    assert all("finish_reason" in c["choices"][0] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    world.script("Qwen25", "Hi")
    assert (
        sdk.chat.completions.create(model="Qwen25", messages=HI).choices[0].message.content == "Hi"
    )


# --- harmony with token ids ----------------------------------------------------------------


@pytest.fixture(scope="module")
def encoding(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from llmux.core.harmony_vocab import load_gpt_oss_encoding

    vocab = _o200k_from_quicktok(tmp_path_factory.mktemp("o200k"))
    if vocab is None:
        # requirements-dev.txt installs quicktok-v1: in CI its absence is a failure, not a skip.
        assert not os.environ.get("CI"), "quicktok-v1 (requirements-dev.txt) is not installed"
        pytest.skip("no o200k vocabulary: install quicktok-v1 (requirements-dev.txt)")
    return load_gpt_oss_encoding(vocab.parent)


async def test_harmony_stop_sequences_cut_what_the_token_reader_would_show(
    world: World, encoding: Any
) -> None:
    runner = world.script("GPT-OSS", "<|channel|>final<|message|>", "Hello ST", "OP world")
    runner.encoding = encoding
    result = await answer(world, {"model": "GPT-OSS", "messages": HI, "stop": ["STOP"]})
    assert result.choices[0].message.content == "Hello"


async def test_harmony_cut_utf8_at_max_tokens_is_no_error(world: World, encoding: Any) -> None:
    runner = world.script(
        "GPT-OSS",
        "<|channel|>final<|message|>",
        "Gr",
        GenerationChunk(
            text="\ufffd", finish_reason="length", prompt_tokens=5, completion_tokens=2
        ),
    )
    runner.encoding = encoding
    result = await answer(world, {"model": "GPT-OSS", "messages": HI, "max_tokens": 2})
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].message.content == "Gr"


def test_the_llama_cpp_image_path_renders_with_the_registry_template(tmp_path: Path) -> None:
    """The multimodal handler would render with the GGUF's own template; with a chat_template
    in models.yaml it renders with that one, as the text path does."""
    from runners.llamacpp import _vision_handler

    clip = tmp_path / "mmproj.gguf"
    clip.write_bytes(b"GGUF")

    gguf = type("Gguf", (), {"metadata": {"tokenizer.chat_template": "the GGUF's own"}})()
    assert _vision_handler(clip, "configured")._get_chat_template(gguf) == "configured"
    assert _vision_handler(clip, None)._get_chat_template(gguf) == "the GGUF's own"


def test_an_unexpected_error_mid_stream_ends_it_with_an_error_event_and_done(
    http: TestClient, world: World
) -> None:
    runner = world.script("Qwen25", "Hel")
    original = runner.generate

    def failing(request: GenerationRequest, cancel: threading.Event) -> Iterator[GenerationChunk]:
        yield from list(original(request, cancel))[:1]
        raise RuntimeError("the backend broke")

    runner.generate = failing  # type: ignore[method-assign]
    text = post(http, model="Qwen25", messages=HI, stream=True).text
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "backend broke" not in error["message"]
    assert all(m["in_flight"] == 0 for m in world.residency.snapshot()["models"])


def test_the_llama_cpp_image_path_samples_and_counts_like_the_text_path() -> None:
    """MTMDChatHandler's own defaults are top_k 40, min_p 0.05, repeat_penalty 1.1; the image
    path passes the text path's (OpenAI's) and counts the answer's tokens, not its chunks."""
    from llmux.core.config import PhysicalModel
    from runners.llamacpp import LlamaCppChatRunner

    seen: dict[str, Any] = {}

    class Handler:
        def __call__(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
            seen.update(kwargs)
            for text in ("Hello", " there", ""):  # two chunks, more tokens
                yield {"choices": [{"delta": {"content": text}, "finish_reason": None}]}

    class Llm:
        n_tokens = 20

        def tokenize(self, data: bytes, add_bos: bool, special: bool) -> list[int]:
            return list(range(len(data.split()) * 2))  # two tokens a word

    spec = PhysicalModel(
        type="llm",
        backend="llamacpp",
        model_file="m.gguf",
        mmproj_file="p.gguf",
        estimated_vram_gb=1,
    )
    runner = LlamaCppChatRunner("m", spec, Path("/nowhere"))
    runner._llm, runner._template, runner._vision = Llm(), object(), Handler()  # type: ignore[assignment]
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (2, 2)).save(png, format="PNG")
    request = GenerationRequest(
        messages=[{"role": "user", "content": [{"type": "image"}]}], images=[png.getvalue()]
    )
    chunks = list(runner.generate(request, threading.Event()))
    assert (seen["top_k"], seen["min_p"], seen["repeat_penalty"]) == (0, 0.0, 1.0)
    assert chunks[-1].completion_tokens == 4  # "Hello there": two words, two tokens each


ALTERNATING = """{%- for m in messages -%}
{%- if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role -%}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant') -}}
{%- endif -%}<start_of_turn>{{ m.role }}
{{ m.content }}<end_of_turn>
{% endfor -%}<start_of_turn>model
"""


@pytest.mark.slow
@pytest.mark.skipif(not GEMMA.is_file() and not os.environ.get("CI"), reason="run `make setup`")
def test_a_template_that_refuses_the_messages_is_a_400_on_llama_cpp(tmp_path: Path) -> None:
    """A Hugging Face template's raise_exception (roles that do not alternate, an unknown role)
    is the client's to fix: a 400 before any byte, not a cut stream."""
    from llmux.core.config import PhysicalModel
    from llmux.core.errors import BadRequest
    from runners.llamacpp import LlamaCppChatRunner

    template = tmp_path / "alternating.jinja"
    template.write_text(ALTERNATING)
    spec = PhysicalModel(
        type="llm",
        backend="llamacpp",
        model_file=GEMMA.name,
        estimated_vram_gb=0.5,
        chat_template=str(template),
        context_length=512,
    )
    runner = LlamaCppChatRunner("gemma", spec, GEMMA.parent)
    runner.load()
    try:
        twice = GenerationRequest(
            messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        )
        with pytest.raises(BadRequest, match="roles must alternate") as info:
            runner.check(twice)
        assert info.value.status == 400 and info.value.param == "messages"
        runner.check(GenerationRequest(messages=[{"role": "user", "content": "a"}]))
    finally:
        runner.unload()
