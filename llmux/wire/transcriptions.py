"""POST /v1/audio/transcriptions: OpenAI's Whisper API shape, request form and responses.

The request is multipart (`file` plus form fields); the response is JSON (`json`,
`verbose_json`) or text (`text`, `srt`, `vtt`), as `response_format` asks.
"""

from __future__ import annotations

from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse, PlainTextResponse, Response

from llmux.audio.languages import LANGUAGE_NAMES, normalize_language
from llmux.wire.base import OpenAIBaseModel
from runners.transcription import Transcript

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]


class TranscriptionRequest(OpenAIBaseModel):
    """The form fields OpenAI's transcription endpoint takes (unknown ones are logged)."""

    file: UploadFile = Field(
        description="The audio: flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, "
        "webm (recognized by content, not by name)."
    )
    model: str = Field(description="A virtual speech-to-text model (GET /v1/models).")
    language: str | None = Field(
        None,
        description="ISO 639-1 code (en, de, ...); default: the model's default_language, "
        "else detected where the model can.",
    )
    prompt: str | None = Field(None, description="Text that came before: names, spelling.")
    temperature: float = Field(0.0, ge=0.0, le=1.0, description="0: greedy, with fallback.")
    response_format: ResponseFormat = "json"
    timestamp_granularities: list[Literal["segment", "word"]] = Field(
        default_factory=list,
        alias="timestamp_granularities[]",
        description="Only segment timestamps are made (verbose_json).",
    )
    stream: bool = Field(False, description="Streaming is not offered; true is refused.")

    @field_validator("language", "prompt", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str | None) -> str | None:
        if value is None:
            return None
        code = normalize_language(value)
        if code not in LANGUAGE_NAMES:
            raise PydanticCustomError(
                "unknown_language",
                f"{value!r} is not a language code this server knows; use an ISO 639-1 code "
                "such as en or de",
            )
        return code

    @field_validator("timestamp_granularities")
    @classmethod
    def _segments_only(cls, value: list[str]) -> list[str]:
        if "word" in value:
            raise PydanticCustomError(
                "unsupported", "word timestamps are not offered; ask for segment timestamps"
            )
        return value

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool) -> bool:
        if value:
            raise PydanticCustomError(
                "unsupported", "streaming transcription is not offered; leave stream false"
            )
        return value


class TranscriptionJson(BaseModel):
    text: str


class TranscriptionSegment(BaseModel):
    id: int
    seek: int  # where the segment starts, in 10 ms frames (Whisper's unit)
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionVerbose(BaseModel):
    task: Literal["transcribe"] = "transcribe"
    language: str  # the language's English name, as OpenAI reports it ("english")
    duration: float
    text: str
    segments: list[TranscriptionSegment]


def render_transcript(transcript: Transcript, response_format: ResponseFormat) -> Response:
    """The response body and content type `response_format` asks for."""
    if response_format == "json":
        return JSONResponse(TranscriptionJson(text=transcript.text).model_dump())
    if response_format == "verbose_json":
        return JSONResponse(verbose(transcript).model_dump())
    if response_format == "srt":
        return PlainTextResponse(
            subtitles(transcript, "srt"), media_type="application/x-subrip; charset=utf-8"
        )
    if response_format == "vtt":
        return PlainTextResponse(subtitles(transcript, "vtt"), media_type="text/vtt")
    return PlainTextResponse(transcript.text + "\n")


def verbose(transcript: Transcript) -> TranscriptionVerbose:
    return TranscriptionVerbose(
        language=LANGUAGE_NAMES.get(transcript.language, transcript.language),
        duration=round(transcript.duration, 3),
        text=transcript.text,
        segments=[
            TranscriptionSegment(
                id=number,
                seek=round(s.start * 100),
                start=s.start,
                end=s.end,
                text=s.text,
                tokens=list(s.tokens),
                temperature=s.temperature,
                avg_logprob=s.avg_logprob,
                compression_ratio=s.compression_ratio,
                no_speech_prob=s.no_speech_prob,
            )
            for number, s in enumerate(transcript.segments)
        ],
    )


def subtitles(transcript: Transcript, kind: Literal["srt", "vtt"]) -> str:
    """SubRip or WebVTT cues, one per segment."""
    separator = "," if kind == "srt" else "."
    cues = []
    for number, s in enumerate(transcript.segments, start=1):
        timing = f"{_clock(s.start, separator)} --> {_clock(s.end, separator)}"
        cues.append(f"{number}\n{timing}\n{s.text}\n" if kind == "srt" else f"{timing}\n{s.text}\n")
    body = "\n".join(cues)
    return f"WEBVTT\n\n{body}" if kind == "vtt" else body


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"
