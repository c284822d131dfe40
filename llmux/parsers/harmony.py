"""The `harmony` family (gpt-oss): channels become reasoning, content and tool calls.

The output after the prompt's `<|start|>assistant` is a list of messages,

    <|channel|>analysis<|message|>...<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json
        <|message|>{"city": "Berlin"}<|call|>          (one line in the output)
    <|start|>assistant<|channel|>final<|message|>...<|return|>

and each message goes by its header: a recipient `functions.NAME` (in the role or the channel part)
makes it a tool call NAME with the body as its arguments; otherwise the analysis channel, or any
other recipient (a built-in tool llmux does not offer), is reasoning; final, commentary without a
recipient (a preamble for the user) and a message without a channel are content. Several messages
of one kind are joined with a blank line.

Two readers feed the same routing (`_Router`), so they agree by construction:
- with a `HarmonyEncoding`, token ids are read by openai-harmony's `StreamableParser` (what the
  spec asks for; needs the o200k vocabulary, see `llmux.core.harmony_vocab`);
- without one, the decoded text (special tokens kept as text, i.e. decoded with
  `skip_special_tokens=False`) is read by a small state machine that follows the same rules,
  `StreamableParser`'s included: a body ends only at `<|end|>`, `<|call|>` or `<|return|>`;
  between messages a `<|channel|>` without `<|start|>` opens a message and anything else is
  dropped; a header cut off by the end of the output is dropped.
An output that does not begin with a special token at all (a backend that drops special tokens
when decoding) is content as a whole.

Both readers cost the same per token however long the output gets: the text reader keeps only
what may still become a tag, and the token reader never reads `StreamableParser.state`, which
serializes the open message whole (see `_TokenReader`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding

START = "<|start|>"
CHANNEL = "<|channel|>"
MESSAGE = "<|message|>"
TERMINATORS = ("<|end|>", "<|call|>", "<|return|>")
FUNCTIONS = "functions."
MESSAGE_SEPARATOR = "\n\n"

_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([^\s<]+)")


class _Kind(Enum):
    REASONING = "reasoning"
    CONTENT = "content"
    TOOL_CALL = "tool_call"


class _Router:
    """Turns messages (opened with their channel and recipient, then body text, then closed) into
    events. Shared by the token reader and the text reader."""

    def __init__(self) -> None:
        self._reasoning = TrimmedText()
        self._content = TrimmedText()
        self._kind: _Kind | None = None
        self._calls = 0
        self._args_visible = False  # the open tool call got non-whitespace arguments

    def open(self, channel: str | None, recipient: str | None) -> list[Event]:
        if recipient is not None and recipient.startswith(FUNCTIONS):
            self._kind = _Kind.TOOL_CALL
            self._args_visible = False
            self._calls += 1
            return [ToolCallStart(self._calls - 1, new_call_id(), recipient[len(FUNCTIONS) :])]
        if channel == "analysis" or recipient is not None:
            self._kind = _Kind.REASONING
            self._reasoning.separate(MESSAGE_SEPARATOR)
        else:
            self._kind = _Kind.CONTENT
            self._content.separate(MESSAGE_SEPARATOR)
        return []

    def body(self, text: str) -> list[Event]:
        if not text:
            return []
        if self._kind is _Kind.TOOL_CALL:
            self._args_visible = self._args_visible or not text.isspace()
            return [ToolCallArgs(self._calls - 1, text)]
        if self._kind is _Kind.REASONING:
            out = self._reasoning.push(text)
            return [ReasoningDelta(out)] if out else []
        out = self._content.push(text)
        return [ContentDelta(out)] if out else []

    def close(self) -> list[Event]:
        """End the open message; a tool call that got no arguments gets `{}`."""
        kind, self._kind = self._kind, None
        if kind is _Kind.TOOL_CALL and not self._args_visible:
            return [ToolCallArgs(self._calls - 1, "{}")]
        return []

    def content(self, text: str) -> list[Event]:
        """Text outside the harmony format altogether (see the module docstring)."""
        out = self._content.push(text)
        return [ContentDelta(out)] if out else []


def parse_header(header: str) -> tuple[str | None, str | None]:
    """(channel, recipient) of a message header such as
    `<|start|>assistant to=functions.f<|channel|>commentary json`; None for each one missing."""
    channel = _CHANNEL_NAME.search(header)
    recipient = _RECIPIENT.search(header)
    return (channel.group(1) if channel else None, recipient.group(1) if recipient else None)


class _TextState(Enum):
    INIT = "init"  # nothing but whitespace yet
    RAW = "raw"  # not harmony: all content
    BETWEEN = "between"  # after a message, before the next header
    HEADER = "header"
    BODY = "body"


class HarmonyParser(OutputParser):
    """gpt-oss output to reasoning, content and tool calls (rules in the module docstring).

    Given `encoding` (from `llmux.core.harmony_vocab.load_gpt_oss_encoding`), `feed` reads
    `token_ids` with openai-harmony and ignores `text`; it then refuses text without token ids.
    Without it, `feed` reads `text`. `thinking` and `tools` are unused: the reasoning level is a
    prompt matter, and harmony arguments are JSON already.
    """

    family = "harmony"

    def __init__(
        self,
        *,
        thinking: bool = False,
        tools: Sequence[ToolDef] = (),
        encoding: HarmonyEncoding | None = None,
    ) -> None:
        super().__init__(thinking=thinking, tools=tools)
        self._router = _Router()
        self._buf = ""  # received, not yet consumed: in a header, only what may begin MESSAGE
        self._header: list[str] = []  # the open header's text before `_buf`
        self._state = _TextState.INIT
        self._tokens = None if encoding is None else _TokenReader(encoding, self._router)

    def feed(self, text: str, token_ids: Sequence[int] = ()) -> list[Event]:
        if self._tokens is not None:
            if text and not token_ids:
                raise ValueError("this harmony parser reads token ids; feed() got text only")
            return self._tokens.feed(token_ids)
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[Event]:
        self._mark_finished()
        if self._tokens is not None:
            return self._tokens.finish()
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> list[Event]:
        events: list[Event] = []
        router = self._router
        while True:
            state = self._state
            if state is _TextState.INIT:
                self._buf = self._buf.lstrip()  # dropped either way
                if self._buf.startswith("<|"):
                    self._state = _TextState.BETWEEN
                    continue
                if not final and self._buf in ("", "<"):
                    return events
                self._state = _TextState.RAW
            elif state is _TextState.RAW:
                events += router.content(self._buf)
                self._buf = ""
                return events
            elif state is _TextState.BETWEEN:
                at, _ = find_first(self._buf, (START, CHANNEL))
                if at >= 0:
                    self._buf, self._state = self._buf[at:], _TextState.HEADER
                    continue
                self._buf = "" if final else split_held(self._buf, (START, CHANNEL))[1]
                return events
            elif state is _TextState.HEADER:
                at = self._buf.find(MESSAGE)
                if at < 0:
                    if final:
                        self._buf = ""  # cut off inside a header: nothing to say
                        self._header.clear()
                    else:
                        safe, self._buf = split_held(self._buf, (MESSAGE,))
                        self._header.append(safe)
                    return events
                header = "".join(self._header) + self._buf[:at]
                self._header.clear()
                self._buf = self._buf[at + len(MESSAGE) :]
                channel, recipient = parse_header(header)
                if channel is None and CHANNEL in header:
                    self._state = _TextState.BETWEEN  # a malformed header: skip the message
                    continue
                events += router.open(channel, recipient)
                self._state = _TextState.BODY
            else:
                at, tag = find_first(self._buf, TERMINATORS)
                if at >= 0:
                    events += router.body(self._buf[:at])
                    events += router.close()
                    self._buf, self._state = self._buf[at + len(tag) :], _TextState.BETWEEN
                    continue
                safe, held = (self._buf, "") if final else split_held(self._buf, TERMINATORS)
                events += router.body(safe)
                self._buf = held
                if final:
                    events += router.close()
                return events


class _TokenReader:
    """Reads token ids with openai-harmony's `StreamableParser` and tells the router.

    Where a message must start, a `<|channel|>` gets `<|start|>assistant` put before it (the
    prompt ends with `<|start|>assistant`, so the first message always needs this) and any other
    token is dropped, as is a message whose header the parser rejects: the text reader's rules.
    Leading whitespace tokens are skipped, and an output whose first visible token is not special
    is content as a whole (decoded by the encoding).

    Cost: `StreamableParser.state` (and `current_content`, `messages`, `tokens`) build their
    answer from everything the open message (or the output) holds, so reading one per token makes
    a long message quadratic. Per token only O(1) accessors are read: `current_role`, which is
    set exactly while a message body is open (the parser is made without a role, so it has no
    role to expect between messages), and `last_content_delta`. `state` is read only for a
    `<|channel|>` outside a body, where it holds at most a header.
    """

    def __init__(self, encoding: HarmonyEncoding, router: _Router) -> None:
        from openai_harmony import StreamableParser

        self._encoding = encoding
        self._router = router
        self._parser = StreamableParser(encoding, None)
        (self._channel_id,) = encoding.encode(CHANNEL, allowed_special={CHANNEL})
        self._start_ids = encoding.encode(START, allowed_special={START}) + encoding.encode(
            "assistant", allowed_special=set()
        )
        self._begun = False  # a visible token was seen
        self._raw: list[int] | None = None  # not harmony: token ids not yet decoded
        self._open = False

    def feed(self, token_ids: Sequence[int]) -> list[Event]:
        events: list[Event] = []
        for token in token_ids:
            if not self._begun:
                if not self._encoding.is_special_token(token):
                    if self._encoding.decode([token]).isspace():
                        continue
                    self._raw = []
                self._begun = True
            if self._raw is not None:
                self._raw.append(token)
                events += self._decode_raw(final=False)
            else:
                events += self._process(token)
        return events

    def finish(self) -> list[Event]:
        from openai_harmony import HarmonyError

        if self._raw is not None:
            return self._decode_raw(final=True)
        with contextlib.suppress(HarmonyError):  # cut off inside a header: nothing to say
            self._parser.process_eos()
        return self._sync()

    def _process(self, token: int) -> list[Event]:
        from openai_harmony import HarmonyError, StreamState

        parser = self._parser
        try:
            if (
                token == self._channel_id
                and parser.current_role is None
                and parser.state is StreamState.EXPECT_START
            ):
                for start_token in self._start_ids:
                    parser.process(start_token)
            parser.process(token)
        except HarmonyError:
            pass  # out of place, or a header the parser rejects: the parser waits for a start
        return self._sync()

    def _sync(self) -> list[Event]:
        parser = self._parser
        if parser.current_role is not None:  # in a message body (see the class docstring)
            events: list[Event] = []
            if not self._open:
                self._open = True
                events += self._router.open(parser.current_channel, parser.current_recipient)
            return events + self._router.body(parser.last_content_delta or "")
        if self._open:
            self._open = False
            return self._router.close()
        return []

    def _decode_raw(self, *, final: bool) -> list[Event]:
        """Decode the pending ids, waiting while they end inside a UTF-8 character."""
        from openai_harmony import HarmonyError

        assert self._raw is not None
        try:
            text = self._encoding.decode_utf8(self._raw)
        except HarmonyError:  # ends inside a character (or is not UTF-8 at all)
            if not final:
                return []
            text = self._encoding.decode(self._raw, errors="replace")
        self._raw = []
        return self._router.content(text)
