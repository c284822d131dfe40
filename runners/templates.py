"""Rendering a chat template ourselves, for weights whose runtime cannot pass template kwargs.

A sandboxed Jinja environment with what Hugging Face chat templates expect (`raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII), so `enable_thinking` or `reasoning_effort`
reach the template as variables, the same way `apply_chat_template(**kwargs)` passes them.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def read_template(path: str | Path) -> str:
    return Path(path).read_text(encoding="utf-8")


def render(
    template: jinja2.Template,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    bos_token: str,
    eos_token: str,
    template_kwargs: dict[str, Any],
) -> str:
    return template.render(
        messages=messages,
        tools=tools,
        add_generation_prompt=True,
        bos_token=bos_token,
        eos_token=eos_token,
        **template_kwargs,
    )
