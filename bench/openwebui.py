"""The Open WebUI pattern: a message with its ~36 tools, then a second message in the same chat.

Open WebUI sends the tools with every message, and right after each answer it asks the same
model for a title (and tags, follow-ups) without tools. So the second message's TTFT is measured
twice: right after the first answer, and after such a title request, as Open WebUI really sends
them. The second one is the pattern the target is about: it is fast only if the tools' prefix
survives another request in between.

Measured on the main llama.cpp model, and on the tiny transformers model of the transformers rows
when the run has it (its context widened to take the tools).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from bench.clients import StreamResult, Streams, stream_chat
from bench.context import MAIN_LLM, TINY_LLM, Bench
from bench.openwebui_tools import openwebui_tools
from bench.servers import KEY
from bench.stats import Section, median, ratio

FIRST = "Write a haiku about autumn leaves."
SECOND = "Now write one about winter."
# The second message measured after the title request differs from the one sent right after the
# first: sent again unchanged, it would find its own state, saved when it was first answered.
SECOND_AFTER_TITLE = "Now write one about spring."
# Open WebUI asks without max_tokens; the bench bounds the answers to keep the run short.
ANSWER_TOKENS = 24


def title_request(model: str, first: str, answer: str) -> dict[str, Any]:
    """Open WebUI's title task, shortened: the chat so far in one user message, no tools."""
    return {
        "model": model,
        "stream": False,
        "max_tokens": 8,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": "### Task:\nGenerate a concise, 3-5 word title with an emoji "
                "summarizing the chat history.\n### Chat History:\n<chat_history>\n"
                f"USER: {first}\nASSISTANT: {answer}\n</chat_history>",
            }
        ],
    }


def chat_pattern(
    bench: Bench, model: str, tools: list[dict[str, Any]], answer_tokens: int = ANSWER_TOKENS
) -> dict[str, list[StreamResult]]:
    """Open WebUI's two messages in one chat on `model`, with the title request in between."""
    first_messages = [{"role": "user", "content": FIRST}]

    def message(messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": model,
            "messages": messages,
            "tools": tools,
            "max_tokens": answer_tokens,
            "temperature": 0,
        }

    runs: dict[str, list[StreamResult]] = {"first": [], "second": [], "second after title": []}
    url = bench.llmux.base
    with Streams() as client:
        for _ in range(bench.options.tool_rounds):
            # Each round on a fresh load, so that no prompt state saved by the round before
            # serves its first message; and something else first, so that the first message
            # finds nothing of itself in the context.
            bench.unload_all()
            bench.admin("POST", f"/models/{model}/load")
            stream_chat(client, url, KEY, title_request(model, "Hello", "Hi!"))
            first = stream_chat(client, url, KEY, message(first_messages))
            answer = first.text or "Leaves fall."
            history = [*first_messages, {"role": "assistant", "content": answer}]
            chat = [*history, {"role": "user", "content": SECOND}]
            second = stream_chat(client, url, KEY, message(chat))
            httpx.post(
                f"{url}/v1/chat/completions",
                json=title_request(model, FIRST, answer),
                headers=bench.auth,
                timeout=900,
            ).raise_for_status()
            chat = [*history, {"role": "user", "content": SECOND_AFTER_TITLE}]
            after_title = stream_chat(client, url, KEY, message(chat))
            runs["first"].append(first)
            runs["second"].append(second)
            runs["second after title"].append(after_title)
    return runs


def add_rows(
    section: Section,
    model: str,
    runs: dict[str, list[StreamResult]],
    first_token: Callable[[StreamResult], float | None] = lambda r: r.ttft_s,
) -> float | None:
    """The model's three rows; returns the second-after-title TTFT over the first's."""
    first_ttft = median(first_token(r) for r in runs["first"] if r.error is None)
    after_title = median(first_token(r) for r in runs["second after title"] if r.error is None)
    for name, results in runs.items():
        good = [r for r in results if r.error is None]
        ttft = median(first_token(r) for r in good)
        section.rows.append(
            {
                "message": name,
                "TTFT ms": None if ttft is None else ttft * 1000,
                "x first": ratio(ttft, first_ttft),
                "prompt tokens": median(r.prompt_tokens for r in good),
                "errors": len(results) - len(good),
            }
        )
        errors = [r.error for r in results if r.error]
        if errors:
            section.notes.append(f"{model}, {name}: {errors[0]}")
    return ratio(after_title, first_ttft)


def openwebui(bench: Bench) -> Section:
    opts = bench.options
    tools = openwebui_tools(opts.tools)
    section = Section(
        "openwebui",
        f"Open WebUI pattern: {len(tools)} tools ({len(str(tools)) // 1000} KB), "
        f"{MAIN_LLM}, two messages in one chat",
        ["message", "TTFT ms", "x first", "prompt tokens", "errors"],
    )
    runs = chat_pattern(bench, MAIN_LLM, tools)
    section.figures["second_over_first_ttft"] = add_rows(section, MAIN_LLM, runs)
    if bench.tiny_model is not None:
        # One token each: a random model's first tokens are often no visible text, so the
        # whole one-token answer (its finish) stands for the first token.
        # All of Open WebUI's tools, whatever --tools says: the tiny model prefills them in
        # seconds, where the GGUF takes minutes on a CPU.
        tiny_runs = chat_pattern(bench, TINY_LLM, openwebui_tools(36), answer_tokens=1)
        start = len(section.rows)
        section.figures["transformers_second_over_first_ttft"] = add_rows(
            section, TINY_LLM, tiny_runs, first_token=lambda r: r.finish_s
        )
        for row in section.rows[start:]:
            row["message"] = f"{row['message']} ({TINY_LLM})"
        section.notes.append(
            f"{TINY_LLM}: the tiny random-weight transformers model of the transformers rows "
            "(context widened for the tools), with all 36 tools, one request at a time through "
            "continuous "
            "batching; each answer is one token, timed to its finish (a random model's first "
            "tokens are often no visible text); only its ratios mean anything"
        )
    first_ttft = median(r.ttft_s for r in runs["first"] if r.error is None)
    direct = median(r.ttft_s for r in runs["second"] if r.error is None)
    section.figures["second_direct_over_first_ttft"] = ratio(direct, first_ttft)
    section.figures["first_prompt_tokens"] = median(r.prompt_tokens for r in runs["first"])
    section.notes.append(
        "the target reads 'second after title' (Open WebUI's title request comes between two "
        f"messages); answers capped at {ANSWER_TOKENS} tokens; {opts.tool_rounds} round(s)"
    )
    if opts.tools < 36:
        section.notes.append(
            f"only {opts.tools} of the 36 tools: the target is stated at ~7k tokens of tools"
        )
    return section
