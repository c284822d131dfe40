"""POST /v1/chat/completions: the OpenAI request and response shapes, and the shaping of parsed
model output into them (whole, or as server-sent events).

The request validates what llmux acts on and tolerates (and logs) the rest; `n` other than 1 and
malformed images are refused with a 400 naming the field. Converting it into a backend's
`GenerationRequest` happens in `llmux.services.chat_request`.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmux.parsers import (
    ContentDelta,
    Event,
    ReasoningDelta,
    ToolCallArgs,
    ToolCallStart,
    collect,
)
from llmux.wire.base import OpenAIBaseModel

MAX_STOP_SEQUENCES = 4
# Stop sequences are matched against every token's text on the event loop: a bound on their
# length keeps that cheap (a few 200,000-character stops once froze the server).
MAX_STOP_CHARS = 256
# OpenAI's own limit on tools; Open WebUI sends about 36.
MAX_TOOLS = 128


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(OpenAIBaseModel):
    url: str
    detail: str | None = None


class ImagePart(OpenAIBaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str | dict[str, Any] = ""


class AssistantToolCall(OpenAIBaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None
    # An earlier assistant turn's reasoning, as this server (and vLLM, Open WebUI) sends it back:
    # gpt-oss expects its chain of thought again between tool calls.
    reasoning_content: str | None = None
    reasoning: str | None = None


class FunctionDef(OpenAIBaseModel):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(OpenAIBaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class ChatCompletionRequest(OpenAIBaseModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    # What every backend's generator takes (torch: a 64-bit seed; llama.cpp uses its low 32 bits).
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int = 1
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    user: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported; send several requests for several answers")
        return n

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        for one in [stop] if isinstance(stop, str) else stop or []:
            if len(one) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters")
        return stop

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> bool | int | None:
        if value:
            raise ValueError("logprobs are not supported by this server; leave them unset")
        return value

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses ----------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class ToolCallFunction(_Out):
    name: str | None = None
    arguments: str = ""


class ToolCallOut(_Out):
    index: int | None = None
    id: str | None = None
    type: Literal["function"] | None = "function"
    function: ToolCallFunction


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    # Open WebUI and some clients read `reasoning`; both carry the same text.
    reasoning: str | None = None
    tool_calls: list[ToolCallOut] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(_Out):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChunkChoice(_Out):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# --- Shaping: parsed output events -> OpenAI's response objects -------------------------------


def completion_from_events(
    completion_id: str,
    created: int,
    model: str,
    events: list[Event],
    finish_reason: FinishReason,
    usage: Usage,
) -> ChatCompletion:
    """A whole answer: content, reasoning and tool calls gathered from the parser's events."""
    parsed = collect(events)
    calls = [
        ToolCallOut(id=c.id, function=ToolCallFunction(name=c.name, arguments=c.arguments))
        for c in parsed.tool_calls
    ]
    message = AssistantMessage(
        content=parsed.content or (None if calls else ""),
        reasoning_content=parsed.reasoning or None,
        reasoning=parsed.reasoning or None,
        tool_calls=calls or None,
    )
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        choices=[Choice(message=message, finish_reason=finish_reason)],
        usage=usage,
    )


def delta_from_event(event: Event) -> Delta:
    """One streamed delta per parser event; tool calls are keyed by their index."""
    if isinstance(event, ContentDelta):
        return Delta(content=event.text)
    if isinstance(event, ReasoningDelta):
        return Delta(reasoning_content=event.text, reasoning=event.text)
    if isinstance(event, ToolCallStart):
        return Delta(
            tool_calls=[
                ToolCallOut(
                    index=event.index,
                    id=event.id,
                    function=(ToolCallFunction(name=event.name, arguments="")),
                )
            ]
        )
    assert isinstance(event, ToolCallArgs)
    return Delta(
        tool_calls=[
            ToolCallOut(
                index=event.index, type=None, function=ToolCallFunction(arguments=event.text)
            )
        ]
    )


def sse_event(chunk: ChatCompletionChunk | dict[str, Any]) -> str:
    """One server-sent event; a dict is sent as it is (the error envelope). Fields a chunk does
    not use are left out, except each choice's `finish_reason` and `logprobs`, which OpenAI
    always sends (null until the last chunk) and some clients read."""
    if isinstance(chunk, dict):
        return f"data: {json.dumps(chunk)}\n\n"
    data = chunk.model_dump(exclude_none=True)
    for choice in data["choices"]:
        choice.setdefault("finish_reason", None)
        choice.setdefault("logprobs", None)
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def completion_json(completion: ChatCompletion) -> dict[str, Any]:
    """A whole answer as OpenAI sends it: absent fields left out (no null `reasoning` or tool
    call `index`), but `message.content` and each choice's `logprobs` always there."""
    data = completion.model_dump(exclude_none=True)
    for choice, model in zip(data["choices"], completion.choices):
        choice["message"]["content"] = model.message.content
        choice["logprobs"] = None
    return data


SSE_DONE = "data: [DONE]\n\n"


# A string's JSON as `sse_event` writes it (json.dumps with ensure_ascii=False).
_TEXT_JSON = json.JSONEncoder(ensure_ascii=False)


class StreamEvents:
    """The server-sent events of one streamed completion.

    Text deltas, content or reasoning, are nearly every event of a stream. Each is the JSON of a
    chunk rendered once through the model, with a mark where the text goes, and the text's JSON
    spliced in: byte for byte what `sse_event` makes of the same chunk, without building and
    dumping a model per token on the event loop. Any other event goes through the model."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self.completion_id, self.created, self.model = completion_id, created, model
        mark = uuid.uuid4().hex  # as JSON, itself in quotes
        content = self.chunk(Delta(content=mark))
        reasoning = self.chunk(Delta(reasoning_content=mark, reasoning=mark))
        self._content, self._reasoning = content.split(f'"{mark}"'), reasoning.split(f'"{mark}"')

    def chunk(self, delta: Delta, finish_reason: FinishReason | None = None) -> str:
        """One chunk of this completion, with one choice."""
        return sse_event(
            ChatCompletionChunk(
                id=self.completion_id,
                created=self.created,
                model=self.model,
                choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],
            )
        )

    def usage(self, usage: Usage) -> str:
        """The last chunk of a stream that asked for usage: no choices."""
        return sse_event(
            ChatCompletionChunk(
                id=self.completion_id,
                created=self.created,
                model=self.model,
                choices=[],
                usage=usage,
            )
        )

    def event(self, event: Event) -> str:
        """The chunk of one parsed output event."""
        if isinstance(event, ContentDelta):
            return _TEXT_JSON.encode(event.text).join(self._content)
        if isinstance(event, ReasoningDelta):
            return _TEXT_JSON.encode(event.text).join(self._reasoning)
        return self.chunk(delta_from_event(event))
