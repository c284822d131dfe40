"""One chat completion from start to finish: residency, the runner's worker thread, stop
sequences, output parsing, and the OpenAI response (whole, or as server-sent events).

Contracts:
- `ChatService.start` resolves the model and makes it resident before anything is sent, so a bad
  model name or a failed load is an ordinary HTTP error; the session then holds the model (it
  cannot be evicted) until `close`.
- Generations on one model run one at a time, first come first served (an asyncio.Lock per
  physical model is FIFO); backends are not safe to call concurrently.
- When the client goes away (the stream's task is cancelled, or a disconnect is seen while a
  whole answer is being made) the runner's cancel event is set; the session waits, shielded, for
  the worker thread to return before it lets go of the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast

import anyio

from llmux.core.concurrency import iterate_in_thread
from llmux.core.config import Registry
from llmux.core.errors import ApiError
from llmux.parsers import ContentDelta, Event, ToolCallArgs, ToolCallStart, create_parser
from llmux.parsers.base import new_call_id
from llmux.services.chat_request import PreparedChat, prepare_chat
from llmux.services.stops import StopFilter
from llmux.wire.chat import (
    SSE_DONE,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Delta,
    FinishReason,
    Usage,
    completion_from_events,
    delta_from_event,
    sse_event,
)
from llmux_policy.executor import Residency
from runners.chat import ChatRunner, GenerationChunk

log = logging.getLogger("llmux.chat")


@dataclass
class Finished:
    finish_reason: FinishReason
    usage: Usage


class ChatService:
    """Starts chat sessions; owns the per-model generation locks."""

    def __init__(self, registry: Registry, residency: Residency) -> None:
        self._registry = registry
        self._residency = residency
        self._locks: dict[str, asyncio.Lock] = {}

    async def start(self, body: ChatCompletionRequest) -> ChatSession:
        physical_id, physical, virtual = self._registry.require(body.model, "llm")
        prepared = prepare_chat(body, physical_id, physical, virtual)
        stack = contextlib.AsyncExitStack()
        held = await stack.enter_async_context(self._residency.use(physical_id))
        runner = cast(ChatRunner, held)  # the registry said this model is an llm
        lock = self._locks.setdefault(physical_id, asyncio.Lock())
        return ChatSession(body, prepared, runner, lock, stack)


@dataclass
class ChatSession:
    body: ChatCompletionRequest
    prepared: PreparedChat
    runner: ChatRunner
    lock: asyncio.Lock
    _stack: contextlib.AsyncExitStack
    cancel: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    async def close(self) -> None:
        self.cancel.set()
        with anyio.CancelScope(shield=True):
            await self._stack.aclose()

    async def events(self) -> AsyncIterator[Event | Finished]:
        """Parsed output events, then one `Finished`."""
        prepared = self.prepared
        encoding = (
            await asyncio.to_thread(self.runner.harmony_encoding)
            if prepared.parser == "harmony"
            else None
        )
        parser = create_parser(
            prepared.parser,
            thinking=prepared.thinking,
            tools=prepared.generation.tools or (),
            harmony_encoding=encoding,
        )
        stops = StopFilter(prepared.stop)
        forced_text: list[str] = []
        final = GenerationChunk()
        saw_call = False
        async with self.lock:
            generation = iterate_in_thread(
                lambda: self.runner.generate(prepared.generation, self.cancel), self.cancel
            )
            async for chunk in generation:
                if chunk.finish_reason is not None:
                    final = chunk
                text = stops.push(chunk.text)
                if stops.stopped:
                    self.cancel.set()  # the runner ends with its final chunk, which we still read
                if prepared.forced_tool_call:
                    forced_text.append(text)
                elif text or (chunk.token_ids and not stops.stopped):
                    for event in parser.feed(text, chunk.token_ids):
                        saw_call = saw_call or isinstance(event, ToolCallStart)
                        yield event
        tail = stops.flush()
        if prepared.forced_tool_call:
            last = _forced_call_events(
                "".join(forced_text) + tail, cut_short=final.finish_reason == "length"
            )
        else:
            last = [*parser.feed(tail), *parser.finish()] if tail else parser.finish()
        for event in last:
            saw_call = saw_call or isinstance(event, ToolCallStart)
            yield event
        reason: FinishReason = "stop" if stops.stopped else (final.finish_reason or "stop")
        prompt, completion = final.prompt_tokens or 0, final.completion_tokens or 0
        yield Finished(
            "tool_calls" if saw_call else reason,
            Usage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            ),
        )

    async def complete(self) -> ChatCompletion:
        events: list[Event] = []
        finished: Finished | None = None
        async for item in self.events():
            if isinstance(item, Finished):
                finished = item
            else:
                events.append(item)
        assert finished is not None
        return completion_from_events(
            self.id, self.created, self.body.model, events, finished.finish_reason, finished.usage
        )

    async def sse(self) -> AsyncIterator[str]:
        """The stream as server-sent events: role, deltas, finish, usage if asked, [DONE]."""
        yield self._chunk(Delta(role="assistant", content=""))
        try:
            async for item in self.events():
                if isinstance(item, Finished):
                    yield self._chunk(Delta(), finish_reason=item.finish_reason)
                    if self.body.stream_options and self.body.stream_options.include_usage:
                        yield sse_event(
                            ChatCompletionChunk(
                                id=self.id,
                                created=self.created,
                                model=self.body.model,
                                choices=[],
                                usage=item.usage,
                            )
                        )
                else:
                    yield self._chunk(delta_from_event(item))
        except ApiError as exc:
            yield sse_event(exc.to_envelope())
        yield SSE_DONE

    def _chunk(self, delta: Delta, finish_reason: FinishReason | None = None) -> str:
        return sse_event(
            ChatCompletionChunk(
                id=self.id,
                created=self.created,
                model=self.body.model,
                choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],
            )
        )


def _forced_call_events(text: str, *, cut_short: bool) -> list[Event]:
    """The JSON a forced tool call was constrained to, as tool-call events.

    A generation cut short by max_tokens ends outside the grammar: its text is returned as content
    with finish_reason "length" (what the client asked for, visibly incomplete), not as a call."""
    try:
        call = json.loads(text)
        name, arguments = call["name"], call["arguments"]
    except (ValueError, KeyError, TypeError):
        if cut_short:
            return [ContentDelta(text)] if text else []
        raise ApiError(
            "The model's forced tool call is not valid JSON although its output was "
            "constrained; this is a bug in llmux.",
            status=500,
            code="tool_call_invalid",
        ) from None
    call_id = new_call_id()
    return [
        ToolCallStart(index=0, id=call_id, name=name),
        ToolCallArgs(index=0, text=json.dumps(arguments, ensure_ascii=False)),
    ]


async def watch_disconnect(
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]], cancel: threading.Event
) -> None:
    """Set `cancel` when the client disconnects (for answers that are not streamed)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return
