"""An OpenAI chat request, resolved against its virtual model, as a backend `GenerationRequest`.

Decisions made here, once for every backend:
- the output parser family (the registry's `parser`, else the one the model's id names), and with
  it whether special tokens stay in the decoded text (harmony reads its channel markers);
- tools reach the template only when the model supports them and `tool_choice` is not "none";
  a model without tool support ignores them (logged), it does not fail (Open WebUI sends ~36);
- `tool_choice` "required" or a named function forces a call by constraining the output to a JSON
  schema of the allowed calls; thinking is turned off for that answer, since the constraint
  starts at the first token;
- template kwargs: the virtual model's (enable_thinking, reasoning_effort), then the request's
  `reasoning_effort`, then the client's `chat_template_kwargs`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

from llmux.core.config import ParserName, PhysicalModel, VirtualModel
from llmux.core.errors import BadRequest
from llmux.parsers import tool_call_arguments_as_dicts
from llmux.wire.chat import ChatCompletionRequest, ImagePart, NamedToolChoice, TextPart
from runners.chat import GenerationRequest

log = logging.getLogger("llmux.chat")

MAX_IMAGE_BYTES = 20 * 1024 * 1024
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")


@dataclass(frozen=True)
class PreparedChat:
    generation: GenerationRequest
    parser: ParserName
    thinking: bool
    # Set when the output is a JSON tool call forced by tool_choice, not free text.
    forced_tool_call: bool
    stop: list[str]


def prepare_chat(
    request: ChatCompletionRequest,
    physical_id: str,
    physical: PhysicalModel,
    virtual: VirtualModel,
) -> PreparedChat:
    family = physical.output_parser(physical_id)
    messages, images = _messages(request, physical, family)
    if virtual.system_prompt and not any(m["role"] in ("system", "developer") for m in messages):
        messages.insert(0, {"role": "system", "content": virtual.system_prompt})
    tools, forced_schema = _tools(request, physical)
    schema = forced_schema or _response_schema(request)
    kwargs = _template_kwargs(request, virtual)
    if schema is not None and family in ("qwen3.5", "qwen3"):
        # Constrained output starts at the first token, so it must not land inside reasoning
        # (it would be parsed as reasoning, leaving the content empty): thinking is off for it.
        kwargs["enable_thinking"] = False
    thinking = family in ("qwen3.5", "qwen3") and bool(kwargs.get("enable_thinking", True))
    # gpt-oss's constrained output is the JSON alone, with no channel markers to read, and its
    # special tokens (the closing <|return|>) must not join it: it is parsed as plain content.
    parser: ParserName = "plain" if schema is not None and family == "harmony" else family
    generation = GenerationRequest(
        messages=messages,
        images=images,
        tools=tools,
        template_kwargs=kwargs,
        max_tokens=request.token_limit,
        temperature=virtual.temperature if request.temperature is None else request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        json_schema=schema,
        keep_special_tokens=parser == "harmony",
    )
    return PreparedChat(
        generation, parser, thinking, forced_schema is not None, request.stop_sequences
    )


def _template_kwargs(request: ChatCompletionRequest, virtual: VirtualModel) -> dict[str, Any]:
    kwargs: dict[str, Any] = virtual.params.model_dump(exclude_none=True)
    if request.reasoning_effort is not None:
        kwargs["reasoning_effort"] = request.reasoning_effort
    kwargs.update(request.chat_template_kwargs or {})
    return kwargs


def _messages(
    request: ChatCompletionRequest, physical: PhysicalModel, family: ParserName
) -> tuple[list[dict[str, Any]], list[bytes]]:
    images: list[bytes] = []
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        # Only harmony (gpt-oss) has a developer role; the other templates know it as system.
        role = "system" if message.role == "developer" and family != "harmony" else message.role
        out: dict[str, Any] = {"role": role}
        texts = [p.text for p in message.content or [] if isinstance(p, TextPart)]
        if isinstance(message.content, list) and len(texts) == len(message.content):
            # Text parts alone mean their text joined (OpenAI's reading); templates that
            # concatenate strings (gpt-oss's) cannot take a list.
            out["content"] = "".join(texts)
        elif isinstance(message.content, list):
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(message.content):
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                elif isinstance(part, ImagePart):
                    param = f"messages[{i}].content[{j}].image_url"
                    if not physical.supports_vision:
                        raise BadRequest(
                            f"The model {request.model!r} does not accept images.", param=param
                        )
                    images.append(_decode_data_uri(part.image_url.url, param))
                    parts.append({"type": "image"})
            out["content"] = parts
        else:
            out["content"] = message.content or ""
        if message.tool_calls:
            out["tool_calls"] = [call.model_dump(exclude_none=True) for call in message.tool_calls]
        reasoning = message.reasoning_content or message.reasoning
        if message.role == "assistant" and reasoning:
            # Back to the template, under the names templates read: Qwen's reasoning_content,
            # gpt-oss's thinking (its chain of thought between tool calls).
            out["reasoning_content"] = out["thinking"] = reasoning
        if message.tool_call_id:
            out["tool_call_id"] = message.tool_call_id
        if message.name:
            out["name"] = message.name
        messages.append(out)
    return tool_call_arguments_as_dicts(messages), images


def _decode_data_uri(url: str, param: str) -> bytes:
    if not url.startswith("data:"):
        raise BadRequest(
            "Images must be sent inline as data URIs (data:image/png;base64,...); "
            "this server does not fetch URLs.",
            param=param,
        )
    header, _, payload = url[5:].partition(",")
    media_type, *options = header.split(";")
    if media_type not in _IMAGE_TYPES or "base64" not in options:
        raise BadRequest(
            f"Unsupported image data URI {header!r}: use base64 with one of "
            f"{', '.join(_IMAGE_TYPES)}.",
            param=param,
        )
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise BadRequest(f"The image is larger than {MAX_IMAGE_BYTES // 2**20} MB.", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("The image data URI is not valid base64.", param=param) from None
    _check_image(data, param)
    return data


def _check_image(data: bytes, param: str) -> None:
    """The bytes are an image PIL can read, of at most PIL's pixel limit (~179 Mpx): checked
    here, before any byte of an answer, instead of failing inside the model's processor."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Image.DecompressionBombError:
        raise BadRequest(
            f"The image has more than {Image.MAX_IMAGE_PIXELS} pixels; send a smaller one.",
            param=param,
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadRequest(
            "The image data is not an image this server can read (PNG, JPEG, WebP, GIF).",
            param=param,
        ) from None


def _tools(
    request: ChatCompletionRequest, physical: PhysicalModel
) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    if not request.tools or request.tool_choice == "none":
        return None, None
    if not physical.supports_tools:
        log.info(
            "model %s has no tool support: ignoring %d tools", request.model, len(request.tools)
        )
        if request.tool_choice not in (None, "auto"):
            raise BadRequest(
                f"The model {request.model!r} does not support tools, so "
                "tool_choice cannot require a call.",
                param="tool_choice",
            )
        return None, None
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
    choice = request.tool_choice
    if choice in (None, "auto"):
        return tools, None
    if isinstance(choice, NamedToolChoice):
        allowed = [t for t in request.tools if t.function.name == choice.function.name]
        if not allowed:
            raise BadRequest(
                f"tool_choice names {choice.function.name!r}, which is not in tools.",
                param="tool_choice",
            )
    else:
        allowed = list(request.tools)
    calls = [
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "arguments"],
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
        }
        for t in allowed
    ]
    return tools, calls[0] if len(calls) == 1 else {"anyOf": calls}


def _response_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise BadRequest(
            "response_format json_schema needs json_schema.schema.",
            param="response_format.json_schema",
        )
    try:
        json.dumps(fmt.json_schema.schema_)
    except (TypeError, ValueError):
        raise BadRequest(
            "response_format.json_schema.schema is not JSON.",
            param="response_format.json_schema.schema",
        ) from None
    return fmt.json_schema.schema_
