"""`ChatSession` driven directly with a scripted fake runner: no model, no HTTP.

The runner emits exactly the chunks a test scripts (text, finish reason, usage), on the real
worker thread bridge, behind the real `Residency`: every test runs with a runner the session
reads (`generate`, on one of the session's threads) and with one that pushes (`start`, handing
chunks over from a thread of its own, as the llama.cpp runner does). What the session makes of
them is the contract: stop sequences cut across chunk boundaries, forced tool calls, each finish
reason, the usage chunk, and a client that goes away.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from llmux.core.config import Registry
from llmux.services.chat import ChatService
from llmux.wire.chat import ChatCompletion, ChatCompletionRequest
from llmux_policy.executor import Residency
from runners.chat import GenerationChunk, GenerationRequest

GIB = 1024**3
REGISTRY = Registry.model_validate(
    {
        "physical_models": {
            "plain-model": {
                "type": "llm",
                "backend": "transformers",
                "estimated_vram_gb": 1,
                "parser": "plain",
                "supports_tools": True,
            },
            "qwen-model": {
                "type": "llm",
                "backend": "transformers",
                "estimated_vram_gb": 1,
                "parser": "qwen2.5",
                "supports_tools": True,
            },
        },
        "virtual_models": {
            "Plain": {"physical": "plain-model"},
            "Qwen": {"physical": "qwen-model"},
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


@dataclass
class ScriptedRunner:
    """Yields `script` (strings, then a final chunk) one piece at a time; records what it saw."""

    physical_id: str
    script: list[str | GenerationChunk | Exception] = field(default_factory=list)
    context_length: int = 4096
    requests: list[GenerationRequest] = field(default_factory=list)
    cancels: list[threading.Event] = field(default_factory=list)  # the event of each generate
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    step: threading.Semaphore | None = None  # when set, each piece waits for a release
    loaded: bool = False
    generated_on: list[str] = field(default_factory=list)  # the thread of each generate

    def preflight(self) -> None:
        pass

    def device_bytes(self) -> None:
        return None

    def load(self) -> None:
        self.loaded = True

    def unload(self) -> None:
        assert self.ended.is_set() or not self.requests, "unloaded while generating"
        self.loaded = False

    def render_prompt(self, request: GenerationRequest) -> str:
        return json.dumps(request.messages)

    def harmony_encoding(self) -> None:
        return None

    def check(self, request: GenerationRequest) -> None:
        pass

    def generate(
        self, request: GenerationRequest, cancel: threading.Event
    ) -> Iterator[GenerationChunk]:
        self.requests.append(request)
        self.cancels.append(cancel)
        self.generated_on.append(threading.current_thread().name)
        self.ended.clear()
        produced = 0
        try:
            for piece in self.script:
                if self.step is not None:
                    self.step.acquire(timeout=10)
                if cancel.is_set():
                    self.cancelled.set()
                    break
                if isinstance(piece, GenerationChunk):
                    yield piece
                    return
                if isinstance(piece, Exception):
                    raise piece
                produced += 1
                yield GenerationChunk(text=piece)
            yield GenerationChunk(finish_reason="stop", prompt_tokens=7, completion_tokens=produced)
        finally:
            self.ended.set()


@dataclass
class PushingRunner(ScriptedRunner):
    """The same script, computed on a thread of the runner's own and handed over from there."""

    own: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="own")
    )

    def start(
        self,
        request: GenerationRequest,
        cancel: threading.Event,
        emit: Callable[[GenerationChunk], None],
    ) -> Future[None]:
        def run() -> None:
            for chunk in self.generate(request, cancel):
                emit(chunk)

        return self.own.submit(run)


class World:
    def __init__(self, push: bool = False) -> None:
        kind = PushingRunner if push else ScriptedRunner
        self.runners: dict[str, ScriptedRunner] = {
            pid: kind(pid) for pid in REGISTRY.physical_models
        }
        self.residency = Residency(REGISTRY, self.runners.__getitem__, 8 * GIB)
        self.chat = ChatService(REGISTRY, self.residency)

    def script(self, model: str, *pieces: str | GenerationChunk) -> ScriptedRunner:
        runner = self.runners[REGISTRY.virtual_models[model].physical]
        runner.script = list(pieces)
        return runner

    def in_flight(self) -> int:
        return sum(m["in_flight"] for m in self.residency.snapshot()["models"])


@pytest.fixture(params=["read", "pushed"])
async def world(request: pytest.FixtureRequest) -> Any:
    w = World(push=request.param == "pushed")
    yield w
    await w.residency.close()


def request(model: str = "Plain", **extra: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    )


async def complete(w: World, body: ChatCompletionRequest) -> ChatCompletion:
    session = await w.chat.start(body)
    try:
        return await session.complete()
    finally:
        await session.close()


async def stream(w: World, body: ChatCompletionRequest) -> list[Any]:
    session = await w.chat.start(body)
    try:
        # A piece of the body may hold several events (those that piled up while it was sent).
        body = "".join([piece async for piece in session.stream()])
        return [event.removeprefix("data: ") for event in body.split("\n\n") if event]
    finally:
        await session.close()


def chunks(events: list[Any]) -> list[dict[str, Any]]:
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def streamed_content(events: list[Any]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks(events) if c.get("choices")
    )


async def test_a_stop_sequence_split_across_chunks_is_cut_and_never_leaks(world: World) -> None:
    runner = world.script("Plain", "Hello wo", "rld! ST", "O", "P and more", "never sent")
    body = request(stop=["STOP"])
    answer = await complete(world, body)
    # The plain parser trims the answer's trailing whitespace.
    assert answer.choices[0].message.content == "Hello world!"
    assert answer.choices[0].finish_reason == "stop"
    assert runner.cancels[-1].is_set()  # the session told the runner to stop generating

    events = await stream(world, body)
    assert streamed_content(events) == "Hello world!"
    assert all(
        "S" not in (c["choices"][0]["delta"].get("content") or "")
        for c in chunks(events)
        if c["choices"]
    )


async def test_text_held_for_a_possible_stop_is_released_when_it_is_not_one(world: World) -> None:
    world.script("Plain", "a ST", "ay here")
    answer = await complete(world, request(stop=["STOP"]))
    assert answer.choices[0].message.content == "a STay here"


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (["The answer."], "stop"),
        (
            [
                "The answer",
                GenerationChunk(finish_reason="length", prompt_tokens=7, completion_tokens=2),
            ],
            "length",
        ),
    ],
)
async def test_finish_reason_follows_the_generation(
    world: World, script: list[Any], reason: str
) -> None:
    world.script("Plain", *script)
    answer = await complete(world, request())
    assert answer.choices[0].finish_reason == reason
    finish = [
        c
        for c in chunks(await stream(world, request(stream=True)))
        if c["choices"] and c["choices"][0].get("finish_reason")
    ]
    assert [c["choices"][0]["finish_reason"] for c in finish] == [reason]


async def test_a_parsed_tool_call_finishes_with_tool_calls(world: World) -> None:
    world.script(
        "Qwen",
        "<tool_call>\n",
        '{"name": "get_weather", ',
        '"arguments": {"city": "Berlin"}}\n</tool_call>',
    )
    answer = await complete(world, request("Qwen", tools=[WEATHER]))
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0].function
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Berlin"})


async def test_a_forced_tool_call_is_constrained_and_returned_as_a_call(world: World) -> None:
    runner = world.script("Plain", '{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}')
    answer = await (
        await world.chat.start(request(tools=[WEATHER], tool_choice="required"))
    ).complete()
    assert runner.requests[-1].json_schema is not None
    assert answer.choices[0].finish_reason == "tool_calls"
    assert answer.choices[0].message.tool_calls is not None
    assert json.loads(answer.choices[0].message.tool_calls[0].function.arguments) == {
        "city": "Oslo"
    }


async def test_a_forced_tool_call_cut_off_by_max_tokens_is_a_length_finish(world: World) -> None:
    world.script(
        "Plain",
        '{"name": "get_weather", ',
        '"argu',
        GenerationChunk(finish_reason="length", prompt_tokens=7, completion_tokens=2),
    )
    body = request(tools=[WEATHER], tool_choice="required", max_tokens=2)
    answer = await complete(world, body)
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content == '{"name": "get_weather", "argu'


async def test_usage_chunk_only_when_asked_with_empty_choices_before_done(world: World) -> None:
    world.script("Plain", "one ", "two")
    plain = chunks(await stream(world, request(stream=True)))
    assert all("usage" not in c for c in plain)
    with_usage = chunks(
        await stream(world, request(stream=True, stream_options={"include_usage": True}))
    )
    last = with_usage[-1]
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert with_usage[-2]["choices"][0]["finish_reason"] == "stop"


async def test_a_client_that_goes_away_cancels_the_generation_and_frees_the_model(
    world: World,
) -> None:
    runner = world.script("Plain", *[f"t{i} " for i in range(100)])
    runner.step = threading.Semaphore(0)
    session = await world.chat.start(request(stream=True))

    async def read() -> None:
        async for _ in session.stream():
            pass

    reader = asyncio.create_task(read())
    runner.step.release(3)
    while not runner.requests:
        await asyncio.sleep(0.01)
    assert world.in_flight() == 1
    reader.cancel()  # the framework cancels the body at its send when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await reader
    closing = asyncio.create_task(session.close())  # what the response does however it ends
    while not session.cancel.is_set():
        await asyncio.sleep(0.01)
    assert world.in_flight() == 1  # held until the worker thread has stopped
    runner.step.release(200)
    await asyncio.wait_for(closing, 10)
    assert runner.cancelled.is_set() and runner.ended.is_set()
    assert world.in_flight() == 0


async def test_shutdown_gives_generations_a_grace_then_cancels_them(world: World) -> None:
    runner = world.script("Plain", *[f"t{i} " for i in range(1000)])
    runner.step = threading.Semaphore(0)  # a generation that would run for as long as it is fed
    session = await world.chat.start(request(stream=True))
    body = session.stream()
    runner.step.release(3)
    while not runner.requests:
        await asyncio.sleep(0.01)

    stopping = asyncio.create_task(world.chat.stop(grace_s=0.2))
    await asyncio.sleep(0.05)
    assert not stopping.done() and not session.cancel.is_set()  # within the grace: untouched
    await asyncio.wait_for(stopping, 5)
    assert session.cancel.is_set()
    runner.step.release(1000)
    await asyncio.wait_for(world.residency.close(), 5)  # the model could be let go of
    assert runner.cancelled.is_set()
    assert "".join([piece async for piece in body]).endswith("data: [DONE]\n\n")
    await session.close()


async def test_a_pushing_runner_is_not_read_through_the_session_s_threads() -> None:
    """One hand-over per chunk: the runner's own thread to the event loop."""
    world = World(push=True)
    try:
        runner = world.script("Plain", "Hello", " there")
        assert streamed_content(await stream(world, request(stream=True))) == "Hello there"
        assert runner.generated_on and all(t.startswith("own") for t in runner.generated_on)
    finally:
        await world.residency.close()


async def test_a_runner_error_ends_the_stream_after_what_was_made_and_frees_the_model(
    world: World,
) -> None:
    runner = world.script("Plain", "partial ", "answer", RuntimeError("the GPU fell over"))
    events = await stream(world, request(stream=True))
    assert streamed_content(events) == "partial answer"
    assert chunks(events)[-1]["error"]["code"] == "internal_error"
    assert "GPU" not in events[-2]  # the client is told nothing of the internals
    assert runner.ended.is_set() and world.in_flight() == 0
