"""Earlier assistant tool calls, made ready for a chat template.

OpenAI clients send a past call's `function.arguments` as a JSON text; the Qwen templates iterate
`arguments|items` and the gpt-oss template writes `arguments|tojson`, so both need a mapping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llmux.core.errors import BadRequest


def tool_call_arguments_as_dicts(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy `messages`, with each assistant tool call's `function.arguments` text parsed into a
    dict. Arguments already a mapping stay; the input is not changed (a shallow copy is made of
    each message and tool call that changes). An argument text that is not a JSON object raises
    `BadRequest` naming the field, as a client sending it deserves a 400.
    """
    result: list[dict[str, Any]] = []
    for m, message in enumerate(messages):
        calls = message.get("tool_calls")
        if message.get("role") != "assistant" or not calls:
            result.append(dict(message))
            continue
        converted = []
        for c, call in enumerate(calls):
            function = call.get("function")
            arguments = function.get("arguments") if isinstance(function, Mapping) else None
            if not isinstance(arguments, str):
                converted.append(call)
                continue
            param = f"messages[{m}].tool_calls[{c}].function.arguments"
            try:
                parsed = json.loads(arguments) if arguments.strip() else {}
            except ValueError as error:
                raise BadRequest(f"{param} is not valid JSON: {error}", param=param) from None
            if not isinstance(parsed, dict):
                raise BadRequest(f"{param} must be a JSON object", param=param)
            converted.append({**call, "function": {**function, "arguments": parsed}})
        result.append({**message, "tool_calls": converted})
    return result
