"""The `qwen3` family: `<think>` reasoning and JSON tool calls; also the base of `qwen3.5`.

Reasoning. With thinking on, the prompt already ends with `<think>`, so the output is
`reasoning</think>content`; an output that repeats the opening `<think>` is accepted too. With
thinking off the output is content, except that a leading `<think>...</think>` block (usually the
empty `<think>\\n\\n</think>`) is still read as reasoning. An output cut off before `</think>`
(max_tokens reached while thinking) is all reasoning: it is what the model was doing, and calling
it the answer would show the user half a thought as if it were one.

Tool calls. `<tool_call>{"name": NAME, "arguments": {...}}</tool_call>`, any number, with content
before, between and after them. A `<tool_call>` that is not followed (after whitespace) by `{`
is the model writing about the tag: it is content, released as soon as the next visible character
shows that, and a call after it is still a call. A block that is not a valid call (bad JSON, no
name, output cut off inside it and unparseable) is passed on as content, tags included, so that
nothing the model wrote is lost. A tool call is emitted when its block closes (JSON cannot be
typed or checked before that).

Each piece costs the same however long the output gets: the buffer keeps only what may still
become a tag, and text held for later (a call's JSON) is collected in pieces.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from enum import Enum

from llmux.parsers.base import (
    ContentDelta,
    Event,
    OutputParser,
    ReasoningDelta,
    ToolCallArgs,
    ToolCallStart,
    ToolDef,
    TrimmedText,
    find_first,
    new_call_id,
    split_held,
)

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

_Emit = Callable[[list[Event], str], None]


class _State(Enum):
    START = "start"  # nothing but whitespace yet: an opening <think> may still come
    REASONING = "reasoning"
    CONTENT = "content"
    TOOL_TAG = "tool_tag"  # just after <tool_call>: the start of a call, or a word in the content?
    TOOL_CALL = "tool_call"  # inside a <tool_call> block that starts like a call


def parse_json_call(body: str) -> tuple[str, str] | None:
    """`{"name": ..., "arguments": {...}}` (or `"parameters"`, or arguments as a JSON text) to
    (name, arguments as a JSON object text); None when it is not a call."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return call["name"], json.dumps(arguments, ensure_ascii=False)


class Qwen3Parser(OutputParser):
    """Reasoning and content of the Qwen families; tool-call blocks are recognized by
    `_opens_call` and read by `_tool_call_step`, which subclasses replace. Holds back only a
    possible start of a tag, trailing whitespace and an open tool-call block."""

    family = "qwen3"

    def __init__(self, *, thinking: bool = False, tools: Sequence[ToolDef] = ()) -> None:
        super().__init__(thinking=thinking, tools=tools)
        self._buf = ""  # received, not yet consumed
        self._held: list[str] = []  # the open block's text before `_buf` (see `_hold`)
        self._state = _State.START
        self._reasoning = TrimmedText()
        self._content = TrimmedText()
        self._calls = 0

    def feed(self, text: str, token_ids: Sequence[int] = ()) -> list[Event]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[Event]:
        self._mark_finished()
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> list[Event]:
        """Consume as much of the buffer as can be decided now (all of it when `final`)."""
        events: list[Event] = []
        while True:
            if self._state is _State.START:
                self._buf = self._buf.lstrip()  # leading whitespace is dropped either way
                if self._buf.startswith(THINK_START):
                    self._buf = self._buf[len(THINK_START) :]
                    self._state = _State.REASONING
                    continue
                if not final and THINK_START.startswith(self._buf):
                    return events
                self._state = _State.REASONING if self.thinking else _State.CONTENT
            elif self._state is _State.REASONING:
                if not self._take_until((THINK_END,), events, self._emit_reasoning, final):
                    return events
                self._state = _State.CONTENT
            elif self._state is _State.CONTENT:
                if not self._take_until((TOOL_CALL_START,), events, self._emit_content, final):
                    return events
                self._state = _State.TOOL_TAG
            elif self._state is _State.TOOL_TAG:
                opens = self._opens_call(self._buf.lstrip())
                if opens is None and not final:
                    return events
                if opens:
                    self._state = _State.TOOL_CALL
                else:  # the tag as a word: the text after it is content again
                    self._emit_content(events, TOOL_CALL_START)
                    self._state = _State.CONTENT
            else:
                if not self._tool_call_step(events, final=final):
                    return events
                self._state = _State.CONTENT

    def _take_until(
        self, tags: Sequence[str], events: list[Event], emit: _Emit, final: bool
    ) -> str:
        """Emit the text before the first of `tags` and consume that tag: return it. Without one,
        emit what cannot be the start of a tag and keep the rest (all of it is emitted when
        `final`): return ""."""
        at, tag = find_first(self._buf, tags)
        if at >= 0:
            emit(events, self._buf[:at])
            self._buf = self._buf[at + len(tag) :]
            return tag
        safe, held = (self._buf, "") if final else split_held(self._buf, tags)
        emit(events, safe)
        self._buf = held
        return ""

    def _hold(self, events: list[Event], text: str) -> None:
        """An `_Emit` that keeps the text of an open block for when it is complete: collecting
        it, rather than searching a growing buffer again on every piece, keeps pieces cheap."""
        self._held.append(text)

    def _take_held(self) -> str:
        text = "".join(self._held)
        self._held.clear()
        return text

    def _opens_call(self, head: str) -> bool | None:
        """Whether the text after a `<tool_call>` (`head`, leading whitespace removed) starts a
        call; None while it cannot tell yet."""
        return head.startswith("{") if head else None

    def _tool_call_step(self, events: list[Event], *, final: bool) -> bool:
        """Read a `<tool_call>` block from the buffer (the opening tag already consumed). Return
        True once the block is done (closing tag consumed, or output ended), False to wait."""
        closed = self._take_until((TOOL_CALL_END,), events, self._hold, final)
        if not closed and not final:
            return False
        body = self._take_held()
        call = parse_json_call(body)
        if call is None:
            self._emit_content(events, TOOL_CALL_START + body + closed)
        else:
            index = self._start_call(events, call[0])
            events.append(ToolCallArgs(index, call[1]))
        return True

    def _start_call(self, events: list[Event], name: str) -> int:
        index = self._calls
        self._calls += 1
        events.append(ToolCallStart(index, new_call_id(), name))
        return index

    def _emit_reasoning(self, events: list[Event], text: str) -> None:
        out = self._reasoning.push(text)
        if out:
            events.append(ReasoningDelta(out))

    def _emit_content(self, events: list[Event], text: str) -> None:
        out = self._content.push(text)
        if out:
            events.append(ContentDelta(out))


class Qwen25Parser(Qwen3Parser):
    """The `qwen2.5` family: Qwen3's `<tool_call>` JSON blocks, no reasoning, and bare calls.

    Qwen2.5 never thinks, so its output is content from the first token, whatever the request's
    thinking setting. Its small models (the Coder 0.5B of the embedded default, at temperature 0)
    often answer a tool request with the call's JSON alone, bare or in a ```json fence, instead of
    inside `<tool_call>`. So when the request has tools and the output starts like JSON (`{` or a
    fence), it is held back; at the end, an output that is exactly one call (or a list of calls)
    of a tool the request offered becomes tool calls, and anything else is released as the content
    it was. An answer that merely contains JSON is never taken for a call.
    """

    family = "qwen2.5"

    def __init__(self, *, thinking: bool = False, tools: Sequence[ToolDef] = ()) -> None:
        super().__init__(thinking=False, tools=tools)
        # The output while it may still be a bare call, in pieces: joined once, at the end.
        self._lead: list[str] = []
        self._bare: bool | None = None if self.tools else False

    def feed(self, text: str, token_ids: Sequence[int] = ()) -> list[Event]:
        if self._bare is False:
            return super().feed(text, token_ids)
        self._lead.append(text)
        if self._bare is None:
            lead = "".join(self._lead)  # short: whitespace and a possible fence's start
            head = lead.lstrip()
            if not head or (FENCE.startswith(head) and len(head) < len(FENCE)):
                self._lead = [lead]
                return []  # not decided yet
            self._bare = head.startswith(("{", "[", FENCE))
            if not self._bare:
                self._lead = []
                return super().feed(lead)
        return []

    def finish(self) -> list[Event]:
        lead = "".join(self._lead)
        self._lead = []
        if self._bare:
            calls = bare_calls(lead, self.tools)
            if calls is not None:
                self._mark_finished()
                events: list[Event] = []
                for name, arguments in calls:
                    events.append(ToolCallArgs(self._start_call(events, name), arguments))
                return events
        return [*super().feed(lead), *super().finish()] if lead else super().finish()


FENCE = "```"


def bare_calls(text: str, tools: Mapping[str, object]) -> list[tuple[str, str]] | None:
    """The calls in an output that is nothing but one call object or a list of them, bare or in
    one fenced block, each naming an offered tool; None when it is anything else."""
    body = text.strip()
    if body.startswith(FENCE):
        first_line, _, rest = body.partition("\n")
        if (
            not body.endswith(FENCE)
            or len(body) < 2 * len(FENCE)
            or first_line
            not in (
                "```",
                "```json",
            )
        ):
            return None
        body = rest[: -len(FENCE)].strip()
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = [parse_json_call(json.dumps(item)) for item in items]
    if not calls or any(call is None or call[0] not in tools for call in calls):
        return None
    return [call for call in calls if call is not None]
