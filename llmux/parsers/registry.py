"""Parser families by name, as `models.yaml` names them (`parser:`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from llmux.parsers.base import OutputParser, ToolDef
from llmux.parsers.harmony import HarmonyParser
from llmux.parsers.plain import PlainParser
from llmux.parsers.qwen3 import Qwen3Parser, Qwen25Parser
from llmux.parsers.qwen35 import Qwen35Parser

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding

PARSERS: Mapping[str, type[OutputParser]] = {
    cls.family: cls for cls in (PlainParser, Qwen35Parser, Qwen3Parser, Qwen25Parser, HarmonyParser)
}


def create_parser(
    family: str,
    *,
    thinking: bool = False,
    tools: Sequence[ToolDef] = (),
    harmony_encoding: HarmonyEncoding | None = None,
) -> OutputParser:
    """A fresh parser for one response. `harmony_encoding` is used by `harmony` only (token ids
    are then read with openai-harmony); `KeyError` names the known families for an unknown one."""
    try:
        cls = PARSERS[family]
    except KeyError:
        raise KeyError(f"unknown parser family {family!r}; known: {', '.join(PARSERS)}") from None
    if cls is HarmonyParser:
        return HarmonyParser(thinking=thinking, tools=tools, encoding=harmony_encoding)
    return cls(thinking=thinking, tools=tools)
