"""What speech-to-text runners offer, whatever their backend, and what they share.

The route decodes the upload to mono float32 at `SAMPLE_RATE` (`llmux.audio.decode`), picks the
language (the request's, else the model's `default_language`) and checks it is a language code at
all; a runner checks it against what its model knows and turns audio into a `Transcript`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from llmux.core.errors import BadRequest
from runners.base import Runner

SAMPLE_RATE = 16_000

# OpenAI's `temperature` 0 means "start greedy, raise the temperature when decoding fails the
# log-probability and compression checks": Whisper's own fallback schedule.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class Segment:
    """A stretch of the transcript with its place in the audio (seconds from the start).

    The decoder statistics are what Whisper-style decoders report; a backend that does not
    measure one leaves it at 0.0.
    """

    start: float
    end: float
    text: str
    tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str  # the code the audio was transcribed as: the one asked for, or detected
    duration: float  # seconds of audio transcribed
    segments: tuple[Segment, ...]


class UnsupportedLanguage(BadRequest):
    code = "unsupported_language"

    def __init__(self, model: str, language: str | None, supported: Iterable[str]) -> None:
        what = (
            f"does not know the language {language!r}"
            if language
            else ("needs a language (it cannot detect one)")
        )
        super().__init__(
            f"Model {model!r} {what}; send `language` as one of: {', '.join(sorted(supported))}.",
            param="language",
        )


class TranscribeRunner(Runner, Protocol):
    """A speech-to-text model.

    `transcribe` blocks (call it on a worker thread, never on the event loop) and may be called
    from several threads at once: a runner serializes inference itself where its backend needs
    it. It must only be called between `load()` and `unload()`, which `Residency.use` ensures.
    """

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None,
        prompt: str | None,
        temperature: float,
        cancel: threading.Event | None = None,
    ) -> Transcript:
        """Transcribe mono float32 `audio` at `SAMPLE_RATE`.

        Once `cancel` is set (the client went away), stops at the next segment or window and
        returns what it has; the caller drops it.

        `language` is a code from `llmux.audio.languages`, or None to detect it (a model that
        cannot detect raises `UnsupportedLanguage`, as it does for a language it does not know).
        `prompt` is text that came before (names, spelling), honoured where the model takes one.
        `temperature` is 0..1; 0 decodes greedily, falling back to higher ones where the backend
        can (`FALLBACK_TEMPERATURES`).
        """
        ...


def split_at_quiet_points(
    audio: np.ndarray, window_s: float, *, search_s: float = 5.0, frame_s: float = 0.1
) -> list[tuple[int, int]]:
    """Cut `audio` (at `SAMPLE_RATE`) into (start, end) sample ranges no longer than `window_s`.

    Each cut falls in the quietest `frame_s` frame of the last `search_s` seconds before the window
    ends, so a cut rarely splits a word; audio that fits one window is one range.
    """
    window = int(window_s * SAMPLE_RATE)
    search = min(int(search_s * SAMPLE_RATE), window // 2)
    frame = max(1, int(frame_s * SAMPLE_RATE))
    ranges: list[tuple[int, int]] = []
    start = 0
    while len(audio) - start > window:
        region = audio[start + window - search : start + window]
        frames = len(region) // frame
        energy = np.square(region[: frames * frame].reshape(frames, frame)).mean(axis=1)
        cut = start + window - search + int(np.argmin(energy)) * frame + frame // 2
        ranges.append((start, cut))
        start = cut
    ranges.append((start, len(audio)))
    return ranges
