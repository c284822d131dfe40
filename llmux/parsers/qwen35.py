"""The `qwen3.5` family: Qwen3 reasoning, XML tool calls typed by the tool's JSON schema.

A call looks like

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Berlin
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

Each value is typed by the parameter's schema (`convert_value`); the arguments are sent as a JSON
object text, streamed one parameter at a time: `{"city": "Berlin"` when the first parameter
closes, `, "days": 3` for the next, `}` at `</function>`. A missing `</parameter>` ends the value
at the next tag. A block that holds JSON instead (`<tool_call>{"name": ...}</tool_call>`, the
Qwen3 form) is read as Qwen3 reads it. A `<tool_call>` followed by neither `<function=` nor `{`
is a word in the content, as in Qwen3.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from llmux.parsers.base import Event, ToolCallArgs, ToolDef
from llmux.parsers.qwen3 import TOOL_CALL_END, Qwen3Parser

FUNCTION_START = "<function="
FUNCTION_END = "</function>"
PARAMETER_START = "<parameter="
PARAMETER_END = "</parameter>"
VALUE_ENDS = (PARAMETER_END, PARAMETER_START, FUNCTION_END, TOOL_CALL_END)

_INTEGER = re.compile(r"[-+]?\d+")
_NO_VALUE = object()


def schema_types(schema: Mapping[str, Any]) -> list[str]:
    """The JSON types a schema allows: its `type` (name or list), else those of `anyOf`/`oneOf`."""
    declared = schema.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return [t for t in declared if isinstance(t, str)]
    types: list[str] = []
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or ():
            if isinstance(option, Mapping):
                types += [t for t in schema_types(option) if t not in types]
    return types


def _as_type(text: str, json_type: str) -> Any:
    """`text` as a value of `json_type`, or _NO_VALUE when it is not one."""
    if json_type == "null":
        return None if text in ("null", "None") else _NO_VALUE
    if json_type == "boolean":
        return {"true": True, "false": False}.get(text.lower(), _NO_VALUE)
    if json_type == "integer":
        return int(text) if _INTEGER.fullmatch(text) else _NO_VALUE
    if json_type == "number":
        try:
            number = json.loads(text)
        except ValueError:
            return _NO_VALUE
        ok = isinstance(number, int | float) and not isinstance(number, bool)
        return number if ok and math.isfinite(number) else _NO_VALUE
    if json_type in ("object", "array"):
        try:
            value = json.loads(text)
        except ValueError:
            return _NO_VALUE
        return value if isinstance(value, dict if json_type == "object" else list) else _NO_VALUE
    return _NO_VALUE


def convert_value(raw: str, schema: Mapping[str, Any] | None) -> Any:
    """Type one parameter's raw text by its schema.

    The newline the template puts around a value is removed. Then the schema's non-string types
    are tried in order (null, boolean, integer, number, object/array as JSON); a value that fits
    none of them, a string parameter, a parameter without a schema (unknown tool or parameter)
    or without a type stays the text itself.
    """
    text = raw.removeprefix("\n").removesuffix("\n")
    if schema is None:
        return text
    for json_type in schema_types(schema):
        if json_type != "string":
            value = _as_type(text.strip(), json_type)
            if value is not _NO_VALUE:
                return value
    return text


class Qwen35Parser(Qwen3Parser):
    """Qwen3.5: reasoning as Qwen3, tool calls as XML with typed parameters (module docstring)."""

    family = "qwen3.5"

    def __init__(self, *, thinking: bool = False, tools: Sequence[ToolDef] = ()) -> None:
        super().__init__(thinking=thinking, tools=tools)
        # In a block: "start", "params" (in a function), "value" (in a parameter's value, which
        # `_hold` collects), "after" (function closed).
        self._phase = "start"
        self._parameter_name = ""
        self._call_index = -1
        self._call_schema: Mapping[str, Any] = {}
        self._args_sent = False

    def _opens_call(self, head: str) -> bool | None:
        if head.startswith((FUNCTION_START, "{")):
            return True
        return None if FUNCTION_START.startswith(head) else False

    def _tool_call_step(self, events: list[Event], *, final: bool) -> bool:
        while True:
            if self._phase == "value":
                if not self._value(events, final):
                    return False
                continue
            head = self._buf.lstrip()
            if self._phase == "start":
                if head.startswith(FUNCTION_START):
                    close = head.find(">")
                    if close < 0 and not final:
                        return False
                    if close >= 0:
                        self._open_function(events, head[len(FUNCTION_START) : close].strip())
                        self._buf = head[close + 1 :]
                        self._phase = "params"
                        continue
                # JSON, or cut off inside the function tag: read as Qwen3 reads it.
                return super()._tool_call_step(events, final=final)
            if self._phase == "params":
                if head.startswith(PARAMETER_START):
                    close = head.find(">")
                    if close < 0 and not final:
                        return False
                    # A parameter cut off inside its tag has nothing to send.
                    self._buf = "" if close < 0 else head[close + 1 :]
                    if close >= 0:
                        self._parameter_name = head[len(PARAMETER_START) : close].strip()
                        self._phase = "value"
                    continue
                ends_function = head.startswith(FUNCTION_END)
                if ends_function or head.startswith(TOOL_CALL_END) or (final and not head):
                    self._close_function(events)
                    self._phase = "after"
                    if ends_function:
                        self._buf = head[len(FUNCTION_END) :]
                    continue
                tags: tuple[str, ...] = (PARAMETER_START, FUNCTION_END, TOOL_CALL_END)
            else:  # "after"
                if head.startswith(TOOL_CALL_END) or (final and not head):
                    self._buf = head[len(TOOL_CALL_END) :]
                    self._phase = "start"
                    return True
                if head.startswith(FUNCTION_START):  # a second function in the same block
                    self._phase = "start"
                    continue
                tags = (FUNCTION_START, TOOL_CALL_END)
            if not final and any(tag.startswith(head) for tag in tags):
                return False  # nothing yet, or the start of a tag
            # Stray text between tags: skip it up to the next tag.
            next_tag = head.find("<", 1)
            self._buf = head[next_tag:] if next_tag > 0 else ""
            if next_tag < 0 and not final:
                return False

    def _value(self, events: list[Event], final: bool) -> bool:
        """Read the open parameter's value up to its end (`</parameter>`, consumed, or the next
        tag, left for the next phase) and send it as the next argument. False while it is
        incomplete and more output may come."""
        tag = self._take_until(VALUE_ENDS, events, self._hold, final)
        if not tag and not final:
            return False
        if tag and tag != PARAMETER_END:
            self._buf = tag + self._buf
        value = self._take_held()
        name, self._phase = self._parameter_name, "params"
        properties = self._call_schema.get("properties")
        schema = properties.get(name) if isinstance(properties, Mapping) else None
        typed = convert_value(value, schema if isinstance(schema, Mapping) else None)
        item = json.dumps(name, ensure_ascii=False) + ": " + json.dumps(typed, ensure_ascii=False)
        events.append(ToolCallArgs(self._call_index, (", " if self._args_sent else "{") + item))
        self._args_sent = True
        return True

    def _open_function(self, events: list[Event], name: str) -> None:
        self._call_index = self._start_call(events, name)
        self._call_schema = self.tools.get(name, {})
        self._args_sent = False

    def _close_function(self, events: list[Event]) -> None:
        events.append(ToolCallArgs(self._call_index, "}" if self._args_sent else "{}"))
