"""Drive a running llmux with the official openai SDK, as a user would, and report.

    python scripts/smoke.py [--url http://127.0.0.1:8081] [--key KEY] [--max-wer 0.1]

Lists the models, streams a chat answer, asks a factual question, asks for a tool call, embeds
a paraphrase and an unrelated sentence, swaps to a second LLM and back (watching /health), speaks
a sentence, transcribes it back, and prints the word error rate and each step's time. Steps a
server cannot do (no tool support, no embedding model, one LLM) are skipped and say so. Exits
non-zero when a step fails or the WER is too high. The key: --key, else LLMUX_API_KEY, else the
embedded default's key file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmux.settings import Settings
from llmux.wer import word_error_rate

SENTENCE = "The weather today is sunny and warm with a light breeze from the west."
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
PARAPHRASES = (
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar.",
    "The stock market fell sharply today.",
)


class SmokeFailure(SystemExit):
    def __init__(self, message: str) -> None:
        super().__init__(f"smoke: {message}")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def resident(url: str) -> set[str]:
    """The physical models /health lists as loaded (it needs no key)."""
    with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=30) as answer:
        return set(json.load(answer)["loaded_models"])


def default_key() -> str | None:
    if key := os.environ.get("LLMUX_API_KEY"):
        return key
    path = Settings(embedded=True).api_keys_file
    if path.exists():
        return str(yaml.safe_load(path.read_text())["api_keys"][0]["key"])
    return None


def pick(models: list, kind: str, wanted: str | None) -> str:
    names = [m.id for m in models if (m.model_extra or {}).get("type") == kind]
    if wanted:
        if wanted not in names:
            raise SystemExit(f"smoke: {wanted!r} is not a {kind} model here ({names})")
        return wanted
    if not names:
        raise SystemExit(f"smoke: the server lists no {kind} model")
    return names[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("LLMUX_URL", "http://127.0.0.1:8081"))
    parser.add_argument("--key", default=None)
    parser.add_argument("--max-wer", type=float, default=0.1)
    parser.add_argument("--chat-model"), parser.add_argument("--tts-model")
    parser.add_argument("--asr-model")
    args = parser.parse_args()
    key = args.key or default_key()
    if not key:
        raise SystemExit("smoke: no API key: pass --key or set LLMUX_API_KEY")
    client = openai.OpenAI(
        base_url=args.url.rstrip("/") + "/v1", api_key=key, max_retries=0, timeout=600
    )
    timings: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        print(f"-- {name}", flush=True)
        started = time.perf_counter()
        yield
        timings.append((name, time.perf_counter() - started))

    with step("list models"):
        models = client.models.list().data
        print("   " + ", ".join(f"{m.id} ({(m.model_extra or {}).get('type')})" for m in models))
    chat, tts, asr = (
        pick(models, "llm", args.chat_model),
        pick(models, "tts", args.tts_model),
        pick(models, "asr", args.asr_model),
    )

    with step(f"stream a chat answer ({chat})"):
        stream = client.chat.completions.create(
            model=chat,
            stream=True,
            max_tokens=48,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        )
        pieces, usage = [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                print(chunk.choices[0].delta.content, end="", flush=True)
            usage = chunk.usage or usage
        print()
        if not "".join(pieces).strip() or usage is None:
            raise SmokeFailure("the chat stream brought no text or no usage")
        print(f"   {len(pieces)} deltas, usage {usage.prompt_tokens}+{usage.completion_tokens}")

    card = {m.id: (m.model_extra or {}) for m in models}
    with step(f"ask a factual question ({chat})"):
        answer = client.chat.completions.create(
            model=chat,
            temperature=0,
            max_tokens=48,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        text = answer.choices[0].message.content or ""
        print(f"   {text.strip()!r}")
        if "Paris" not in text:
            raise SmokeFailure("the answer to 'What is the capital of France?' lacks Paris")

    if card[chat].get("capabilities", {}).get("tools"):
        with step(f"ask for a tool call ({chat})"):
            answer = client.chat.completions.create(
                model=chat,
                temperature=0,
                max_tokens=96,
                tools=[WEATHER_TOOL],
                messages=[{"role": "user", "content": "What's the weather in Berlin?"}],
            )
            calls = answer.choices[0].message.tool_calls or []
            if not calls or calls[0].function.name != "get_weather":
                raise SmokeFailure(f"no get_weather call: {answer.choices[0].message}")
            function = calls[0].function
            print(
                f"   {function.name}({function.arguments}), finish_reason "
                f"{answer.choices[0].finish_reason}"
            )
    else:
        print(f"-- ask for a tool call: skipped, {chat} has no tool support")

    embedders = [m.id for m in models if card[m.id].get("type") == "embedding"]
    if embedders:
        with step(f"embed a paraphrase and an unrelated sentence ({embedders[0]})"):
            data = client.embeddings.create(model=embedders[0], input=list(PARAPHRASES)).data
            near = cosine(data[0].embedding, data[1].embedding)
            far = cosine(data[0].embedding, data[2].embedding)
            print(
                f"   cosine(paraphrase) {near:.2f} > cosine(unrelated) {far:.2f}, "
                f"{len(data[0].embedding)} dimensions"
            )
            if not near > far:
                raise SmokeFailure("the paraphrase is not closer than the unrelated sentence")
    else:
        print("-- embed: skipped, the server lists no embedding model")

    others = [
        m.id
        for m in models
        if card[m.id].get("type") == "llm"
        and card[m.id].get("physical_model") != card[chat].get("physical_model")
    ]
    if others:
        first, second = card[chat]["physical_model"], card[others[0]]["physical_model"]
        with step(f"swap to a second LLM and back ({others[0]}, {chat})"):
            for name, wanted, gone in ((others[0], second, first), (chat, first, second)):
                client.chat.completions.create(
                    model=name, max_tokens=8, messages=[{"role": "user", "content": "Hi"}]
                )
                loaded = resident(args.url)
                print(f"   after {name}: resident {', '.join(sorted(loaded))}")
                if wanted not in loaded or gone in loaded:
                    raise SmokeFailure(f"expected {wanted} resident and {gone} evicted")
    else:
        print("-- swap LLMs: skipped, the server lists one LLM")

    with step(f"speak a sentence ({tts})"):
        audio = client.audio.speech.create(
            model=tts, voice="alloy", input=SENTENCE, response_format="wav"
        ).content
        print(f"   {len(audio)} bytes of wav")

    with step(f"transcribe it back ({asr})"):
        text = client.audio.transcriptions.create(
            model=asr, file=("speech.wav", audio), language="en"
        ).text
        print(f"   {text!r}")

    wer = word_error_rate(SENTENCE, text)
    print("\nstep timings:")
    for name, seconds in timings:
        print(f"   {seconds:7.2f} s  {name}")
    print(f"round-trip word error rate: {wer:.3f} (limit {args.max_wer})")
    return 0 if wer <= args.max_wer else 1


if __name__ == "__main__":
    raise SystemExit(main())
