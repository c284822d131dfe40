"""Text to speech, from a checked request to encoded audio: the work behind POST /v1/audio/speech.

Long input is split at sentence boundaries into pieces a model handles well (Chatterbox stops
after 1000 speech tokens, about 40 s), spoken one after another while the request holds its
model, joined with a short pause, and encoded once. Nothing here imports a backend.
"""

from __future__ import annotations

import asyncio
import re
import threading
from typing import cast

import numpy as np

from llmux.audio.encode import EncodedAudio, encode_audio
from llmux.core.concurrency import run_to_end
from llmux.core.errors import BadRequest
from llmux.state import AppState
from llmux.voices import choose_voice
from llmux.wire.speech import SpeechRequest
from runners.speech import SpeakRunner

PIECE_CHARS = 300  # pieces are whole sentences up to this long; longer sentences split further
PAUSE_SECONDS = 0.15  # between pieces
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？;；])\s+|\n\s*\n|\n(?=\s*[-*•\d])")
_CLAUSE_END = re.compile(r"(?<=[,:;，、])\s+")


def split_text(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """Whole sentences packed into pieces of at most `limit` characters (a longer sentence is cut
    at clause ends, then between words, then anywhere). Whitespace-only text gives no pieces."""
    pieces: list[str] = []
    for sentence in (s.strip() for s in _SENTENCE_END.split(text)):
        for part in _cut(" ".join(sentence.split()), limit):
            if pieces and len(pieces[-1]) + 1 + len(part) <= limit:
                pieces[-1] += " " + part
            else:
                pieces.append(part)
    return pieces


def _cut(sentence: str, limit: int) -> list[str]:
    if len(sentence) <= limit:
        return [sentence] if sentence else []
    for separator in (_CLAUSE_END, re.compile(r"\s+")):
        parts = [p for p in separator.split(sentence) if p]
        if len(parts) > 1:
            packed: list[str] = []
            for part in parts:
                if packed and len(packed[-1]) + 1 + len(part) <= limit:
                    packed[-1] += " " + part
                else:
                    packed.extend(_cut(part, limit))
            return packed
    return [sentence[i : i + limit] for i in range(0, len(sentence), limit)]


async def speak(state: AppState, body: SpeechRequest) -> EncodedAudio:
    """The request's audio, encoded as it asks. Raises ApiError (400/404/503) for what a client
    or the server's state can fix. A client that goes away stops synthesis between pieces."""
    limit = state.settings.tts_max_input_chars
    if len(body.input) > limit:
        raise BadRequest(
            f"input is {len(body.input)} characters; this server takes at most "
            f"{limit} (LLMUX_TTS_MAX_INPUT_CHARS).",
            param="input",
        )
    physical_id, spec, _ = state.registry.require(body.model, "tts")
    voice, language = choose_voice(state.voices, physical_id, spec, body.voice, body.language)
    pieces = split_text(body.input)
    stop = threading.Event()

    async with state.residency.use(physical_id) as held:
        runner = cast(SpeakRunner, held)

        def speak_all() -> np.ndarray:
            pause = np.zeros(int(PAUSE_SECONDS * runner.sample_rate), dtype=np.float32)
            audio: list[np.ndarray] = []
            for piece in pieces:
                if stop.is_set():
                    break
                if audio:
                    audio.append(pause)
                audio.append(
                    runner.speak(piece, voice=voice.reference, language=language, speed=body.speed)
                )
            return np.concatenate(audio) if audio else pause

        threads = state.residency.inference_threads(physical_id)
        samples = await run_to_end(speak_all, stop, executor=threads)
        rate = runner.sample_rate
    if samples.size == 0:  # a model that said nothing still answers with playable audio
        samples = np.zeros(int(PAUSE_SECONDS * rate), dtype=np.float32)
    return await asyncio.to_thread(encode_audio, samples, rate, body.response_format)
