"""The API's rows (TST-008..015): keys, chat with every virtual LLM, streaming, dictation in
English and German, speech, vision and tool calls, each against the models the server lists.

Deterministic requests throughout (temperature 0), so a row answers the same way twice.
"""

from __future__ import annotations

import io
import json
import struct
import time
import wave
import zlib
from array import array
from typing import Any

from llmux.audio.samples import SENTENCES, sample
from llmux.check.context import Context, one_per_physical
from llmux.check.http import HttpError
from llmux.check.rows import Row, failed, passed
from llmux.wer import word_error_rate

QUESTION = "What is the capital of France? Answer in one sentence."
FACT = "paris"
CHAT_TOKENS = 400  # room for a reasoning model to think and still answer
STREAM_PROMPT = "Count from one to twenty in words, separated by commas."
STREAM_TOKENS = 48
DICTATION_WER = 0.25  # the shipped clips are clear synthetic speech: a working model gets ~0
SPOKEN = "The weather today is sunny and warm with a light breeze from the west."
ROUND_TRIP_WER = 0.5  # speech heard back: intelligible, not noise
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}


def _chat(ctx: Context, model: str, messages: list[dict[str, Any]], **extra: Any) -> Any:
    payload = {"model": model, "messages": messages, "temperature": 0, **extra}
    return ctx.server.post("/v1/chat/completions", payload)["choices"][0]


def _said(message: dict[str, Any]) -> str:
    return " ".join(
        part for part in (message.get("reasoning_content"), message.get("content")) if part
    )


def _glimpse(text: str, length: int = 70) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= length else text[: length - 3] + "...")


def _summed(problems: list[str], figures: str, details: list[str]) -> Row:
    if problems:
        return failed("; ".join(problems), figures, details)
    return passed(figures, details)


def keys(ctx: Context) -> Row:
    """TST-008: /v1 without a key, or with a wrong one, is 401 in OpenAI's envelope."""
    problems, seen = [], []
    for label, key in (("no key", None), ("a wrong key", "sk-llmux-check-not-a-key")):
        answer = ctx.server.request("GET", "/v1/models", key=key)
        kind = answer.json().get("error", {}).get("type") if answer.status < 500 else None
        seen.append(f"{label}: {answer.status}")
        if answer.status != 401 or kind != "authentication_error":
            problems.append(f"GET /v1/models with {label} answered {answer.status}, not 401")
    return _summed(problems, ", ".join(seen), [])


def chat_every_llm(ctx: Context) -> Row:
    """TST-009: every virtual LLM answers a factual question. Elsewhere an answer suffices (the
    embedded default's Gemma 270M is a base model and does not know the fact); on the box
    (--production) every answer must also name it."""
    llms = ctx.of_type("llm")
    if not llms:
        return ctx.absent("no chat model in this registry")
    problems, details, knew = [], [], 0
    for card in llms:
        started = time.perf_counter()
        try:
            choice = _chat(
                ctx, card["id"], [{"role": "user", "content": QUESTION}], max_tokens=CHAT_TOKENS
            )
        except HttpError as exc:
            problems.append(f"{card['id']}: {exc}")
            details.append(f"{card['id']}: {exc}")
            continue
        said = _said(choice["message"])
        knows = FACT in said.lower()
        knew += knows
        seconds = time.perf_counter() - started
        details.append(
            f"{card['id']}: {_glimpse(choice['message'].get('content') or said)} "
            f"({seconds:.1f} s{'' if knows else ', not the fact'})"
        )
        if not said.strip():
            problems.append(f"{card['id']} answered nothing")
        elif ctx.options.production and not knows:
            problems.append(f"{card['id']} did not name Paris")
    figures = f"{len(llms) - len(problems)}/{len(llms)} answered, {knew} named Paris"
    return _summed(problems, figures, details)


def streaming(ctx: Context) -> Row:
    """TST-010: a streamed answer arrives token by token: about one delta per generated token,
    spread over the generation (a resident LLM is used when there is one)."""
    llms = ctx.of_type("llm")
    if not llms:
        return ctx.absent("no chat model in this registry")
    resident = set(ctx.health()["loaded_models"])
    card = next((c for c in llms if c["physical_model"] in resident), llms[0])
    arrivals, tokens = [], None
    for at, chunk in ctx.server.stream(
        "/v1/chat/completions",
        {
            "model": card["id"],
            "messages": [{"role": "user", "content": STREAM_PROMPT}],
            "temperature": 0,
            "max_tokens": STREAM_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ):
        if "error" in chunk:
            return failed(f"{card['id']}: error event in the stream: {chunk['error']['message']}")
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content"):
                arrivals.append(at)
    if not arrivals or tokens is None:
        return failed(f"{card['id']}: {len(arrivals)} deltas and no usage chunk")
    span = arrivals[-1] - arrivals[0]
    figures = (
        f"{card['id']}: {len(arrivals)} deltas for {tokens} tokens, first after "
        f"{arrivals[0]:.2f} s, spread over {span:.2f} s"
    )
    if len(arrivals) < 5 or len(arrivals) < tokens / 2:
        return failed("the answer came in a few pieces, not token by token", figures)
    if span <= 0:
        return failed("every delta arrived at once", figures)
    return passed(figures)


def dictation(ctx: Context, language: str) -> Row:
    """TST-011 (en) / TST-012 (de): each speech-to-text model transcribes the shipped clip of the
    language's sentence, as a dictation client uploads it (MP3, `language` set)."""
    models = ctx.of_type("asr")
    if not models:
        return ctx.absent("no speech-to-text model in this registry")
    clip = sample(language)
    problems, details = [], []
    for card in models:
        started = time.perf_counter()
        try:
            text = ctx.server.post_file(
                "/v1/audio/transcriptions",
                {"model": card["id"], "language": language},
                f"{language}.mp3",
                clip,
            )["text"]
        except HttpError as exc:
            problems.append(f"{card['id']}: {exc}")
            continue
        wer = word_error_rate(SENTENCES[language], text)
        details.append(
            f"{card['id']}: {_glimpse(text)} (WER {wer:.2f}, {time.perf_counter() - started:.1f} s)"
        )
        if wer > DICTATION_WER:
            problems.append(f"{card['id']}: word error rate {wer:.2f} > {DICTATION_WER}")
    figures = f"{len(models) - len(problems)}/{len(models)} transcribed {language} within WER"
    return _summed(problems, f"{figures} {DICTATION_WER}", details)


def speech(ctx: Context) -> Row:
    """TST-013: each text-to-speech model speaks a sentence as playable audio, which the first
    speech-to-text model hears back."""
    models = ctx.of_type("tts")
    if not models:
        return ctx.absent("no text-to-speech model in this registry")
    ears = ctx.of_type("asr")
    problems, details = [], []
    for card in models:
        started = time.perf_counter()
        try:
            audio = ctx.server.post_raw(
                "/v1/audio/speech",
                {"model": card["id"], "input": SPOKEN, "voice": "alloy", "response_format": "wav"},
            )
        except HttpError as exc:
            problems.append(f"{card['id']}: {exc}")
            continue
        seconds, peak = _wav_length_and_peak(audio)
        detail = f"{card['id']}: {seconds:.1f} s of audio in {time.perf_counter() - started:.1f} s"
        if seconds < 1 or peak < 0.01:
            problems.append(f"{card['id']}: {seconds:.1f} s of audio, peak {peak:.3f}")
        elif ears:
            heard = ctx.server.post_file(
                "/v1/audio/transcriptions",
                {"model": ears[0]["id"], "language": "en"},
                "speech.wav",
                audio,
            )["text"]
            wer = word_error_rate(SPOKEN, heard)
            detail += f", heard back by {ears[0]['id']} with WER {wer:.2f}"
            if wer > ROUND_TRIP_WER:
                problems.append(f"{card['id']}: heard back as {_glimpse(heard)} (WER {wer:.2f})")
        details.append(detail)
    figures = f"{len(models) - len(problems)}/{len(models)} spoke"
    return _summed(problems, figures, details)


def _wav_length_and_peak(data: bytes) -> tuple[float, float]:
    with wave.open(io.BytesIO(data)) as wav:
        frames = wav.readframes(wav.getnframes())
        seconds = wav.getnframes() / wav.getframerate()
    samples = array("h", frames[: len(frames) // 2 * 2])
    return seconds, max((abs(s) for s in samples), default=0) / 32768


def vision(ctx: Context) -> Row:
    """TST-014: each model with vision names the colour of a plain red picture."""
    cards = [c for c in ctx.of_type("llm") if c["capabilities"]["vision"]]
    if not cards:
        return ctx.absent("no model with vision in this registry")
    picture = "data:image/png;base64," + _red_png_base64()
    problems, details = [], []
    for physical, name in one_per_physical(cards).items():
        content = [
            {"type": "text", "text": "What colour is this picture? Answer with one word."},
            {"type": "image_url", "image_url": {"url": picture}},
        ]
        try:
            said = _said(
                _chat(ctx, name, [{"role": "user", "content": content}], max_tokens=CHAT_TOKENS)[
                    "message"
                ]
            )
        except HttpError as exc:
            problems.append(f"{name}: {exc}")
            continue
        details.append(f"{name} ({physical}): {_glimpse(said)}")
        if "red" not in said.lower():
            problems.append(f"{name} did not see red")
    figures = f"{len(details) - len(problems)}/{len(one_per_physical(cards))} models saw red"
    return _summed(problems, figures, details)


def _red_png_base64() -> str:
    """A 32x32 red PNG, written by hand (the command has no imaging library)."""
    import base64

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    rows = b"".join(b"\x00" + b"\xdd\x11\x11" * 32 for _ in range(32))
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(png).decode()


def tool_calls(ctx: Context) -> Row:
    """TST-015: each model with tools (so every runtime serving one) calls get_weather for
    Berlin when asked for the weather there."""
    cards = [c for c in ctx.of_type("llm") if c["capabilities"]["tools"]]
    if not cards:
        return ctx.absent("no model with tools in this registry")
    backends = _backends(ctx)
    problems, details = [], []
    chosen = one_per_physical(cards)
    for physical, name in chosen.items():
        runtime = backends.get(physical, "?")
        try:
            choice = _chat(
                ctx,
                name,
                [{"role": "user", "content": "What's the weather in Berlin?"}],
                tools=[WEATHER_TOOL],
                max_tokens=CHAT_TOKENS,
            )
        except HttpError as exc:
            problems.append(f"{name}: {exc}")
            continue
        calls = choice["message"].get("tool_calls") or []
        call: dict[str, Any] = calls[0]["function"] if calls else {}
        city = str(_arguments(call.get("arguments", "")).get("city", ""))
        ok = call.get("name") == "get_weather" and "berlin" in city.lower()
        shown = (
            f"{call['name']}({call['arguments']})"
            if call
            else f"no call: {_glimpse(_said(choice['message']))}"
        )
        details.append(f"{name} ({physical} on {runtime}): {shown}")
        if not ok:
            problems.append(f"{name} on {runtime} made no get_weather(Berlin) call")
    runtimes = sorted({backends.get(p, "?") for p in chosen})
    figures = f"{len(chosen) - len(problems)}/{len(chosen)} called the tool; runtimes: " + (
        ", ".join(runtimes)
    )
    return _summed(problems, figures, details)


def _arguments(text: str) -> dict[str, Any]:
    try:
        parsed = json.loads(text)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _backends(ctx: Context) -> dict[str, str]:
    """physical model -> backend, from /admin/models (empty for a key that is not an admin's:
    the row still runs, without naming runtimes)."""
    try:
        return {row["id"]: row["backend"] for row in ctx.admin_models}
    except HttpError:
        return {}
