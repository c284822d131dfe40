"""What a chat runner offers, whatever its backend (transformers, llama.cpp).

The route layer turns an OpenAI request into a `GenerationRequest` (messages ready for a chat
template, decoded images, tools, sampling) and reads `GenerationChunk`s back. Stop sequences,
output parsing (reasoning, tool calls) and the OpenAI response shapes are the route layer's work,
identical for every backend; a runner only renders its prompt and generates.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

from runners.base import Runner

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding


@dataclass(frozen=True)
class GenerationRequest:
    # OpenAI-shaped messages for the chat template: content is a string or a list of parts
    # {"type": "text", "text"} / {"type": "image"}; assistant tool_calls carry `arguments` as dicts.
    messages: list[dict[str, Any]]
    # The images of the {"type": "image"} parts, in order, as the bytes the client sent.
    images: list[bytes] = field(default_factory=list)
    # OpenAI tool definitions to show the template; None when tools are off for this request.
    tools: list[dict[str, Any]] | None = None
    # enable_thinking / reasoning_effort from the virtual model, then the client's own kwargs.
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    # Constrain the output to this JSON schema (response_format, or a forced tool call).
    json_schema: dict[str, Any] | None = None
    # Decode special tokens into the text (the harmony parser reads gpt-oss's channel markers);
    # decided with the parser family when the request is prepared.
    keep_special_tokens: bool = False


T = TypeVar("T")


class CheckedPrompts(Generic[T]):
    """What `check` made of a request's prompt (its tokens, its encoded tensors), kept for the
    `generate` of that very request object, so a long prompt is rendered and tokenized once.
    Bounded (oldest out first) for requests checked and never generated; thread-safe, as check
    and generate run on different threads."""

    def __init__(self, kept: int) -> None:
        self._kept = kept
        self._prompts: dict[int, tuple[weakref.ref[GenerationRequest], T]] = {}
        self._lock = threading.Lock()

    def keep(self, request: GenerationRequest, prompt: T) -> None:
        with self._lock:
            self._prompts[id(request)] = (weakref.ref(request), prompt)
            while len(self._prompts) > self._kept:
                del self._prompts[next(iter(self._prompts))]

    def take(self, request: GenerationRequest) -> T | None:
        """The prompt `check` kept for this request object (once), or None."""
        with self._lock:
            kept = self._prompts.pop(id(request), None)
        return kept[1] if kept is not None and kept[0]() is request else None

    def clear(self) -> None:
        with self._lock:
            self._prompts.clear()


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of output. The last chunk of a generation carries `finish_reason` and usage."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: Literal["stop", "length"] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ChatRunner(Runner, Protocol):
    # The most tokens a prompt plus its answer may take.
    context_length: int

    def render_prompt(self, request: GenerationRequest) -> str:
        """The prompt text the model will see (chat template applied), for checks and logs."""

    def check(self, request: GenerationRequest) -> None:
        """Refuse now what `generate` would refuse: the prompt renders, fits the context with
        room for an answer, its images and JSON schema can be used. Raises `BadRequest` (400,
        naming the field; `context_length_exceeded` for a prompt too long). Blocking; called
        before a response starts, so that a client's mistake is a 400 and not an error event
        inside a 200 stream."""

    def generate(
        self, request: GenerationRequest, cancel: threading.Event
    ) -> Iterator[GenerationChunk]:
        """Blocking; runs on a worker thread. Yields text as it is decoded and ends with a chunk
        carrying finish_reason and usage. Once `cancel` is set, stops within one token and
        returns (finish_reason "stop"); it never raises because of a cancel."""

    def harmony_encoding(self) -> HarmonyEncoding | None:
        """openai-harmony's gpt-oss encoding over this model's vocabulary, so the harmony parser
        can read token ids; None when this runner cannot build one (the parser then reads the
        text). Asked only for harmony-family models, on a worker thread (it may write a cache
        file); kept until `unload`."""


@runtime_checkable
class PushingChatRunner(ChatRunner, Protocol):
    """A chat runner that computes on a thread of its own and can hand chunks over from there."""

    def start(
        self,
        request: GenerationRequest,
        cancel: threading.Event,
        emit: Callable[[GenerationChunk], None],
    ) -> Future[None]:
        """`generate`'s chunks, each passed to `emit` on the runner's own thread as it is made.
        The Future ends once the model is no longer in use, with the error `generate` would have
        raised, if any; `cancel` is honoured as by `generate`."""


@runtime_checkable
class BatchingChatRunner(ChatRunner, Protocol):
    """A chat runner that can generate several requests together (continuous batching)."""

    @property
    def batch_size(self) -> int:
        """How many generations that `batches` admits may run at once; 1 while none batch (a
        model that cannot batch, or before `load`). Changes only at load, unload, park, unpark,
        or when batching fails and the runner falls back to one request at a time."""

    def batches(self, request: GenerationRequest) -> bool:
        """Whether `generate` runs this request beside others. A request it does not batch must
        run alone: no other generation on this runner while it runs."""
