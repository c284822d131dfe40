"""Synthesized speech (float32 mono samples) to the bytes of one of OpenAI's response formats.

OpenAI's `/v1/audio/speech` formats: mp3 (its default), opus (in an Ogg container), aac (ADTS),
flac, wav and pcm (raw 16-bit little-endian at 24 kHz, no header). Everything goes through PyAV
(FFmpeg), resampling where a codec cannot take the model's rate. Pure CPU work that blocks: call
it from a worker thread.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal, get_args

import av
import numpy as np

ResponseFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
RESPONSE_FORMATS: tuple[str, ...] = get_args(ResponseFormat)

# OpenAI documents pcm as 24 kHz 16-bit signed little-endian; a client cannot be told another rate.
PCM_SAMPLE_RATE = 24_000


@dataclass(frozen=True)
class _Target:
    container: str | None  # None: raw samples, no container
    codec: str
    content_type: str
    sample_format: str
    rates: frozenset[int] | None  # rates the encoder takes; None: any
    fallback_rate: int  # used when the model's rate is not among `rates`


_TARGETS: dict[str, _Target] = {
    "mp3": _Target(
        "mp3",
        "libmp3lame",
        "audio/mpeg",
        "s16p",
        frozenset({8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000}),
        24000,
    ),
    "opus": _Target(
        "ogg", "libopus", "audio/ogg", "s16", frozenset({8000, 12000, 16000, 24000, 48000}), 24000
    ),
    "aac": _Target(
        "adts",
        "aac",
        "audio/aac",
        "fltp",
        frozenset(
            {
                7350,
                8000,
                11025,
                12000,
                16000,
                22050,
                24000,
                32000,
                44100,
                48000,
                64000,
                88200,
                96000,
            }
        ),
        24000,
    ),
    "flac": _Target("flac", "flac", "audio/flac", "s16", None, 24000),
    "wav": _Target("wav", "pcm_s16le", "audio/wav", "s16", None, 24000),
    "pcm": _Target(
        None, "pcm_s16le", "audio/pcm", "s16", frozenset({PCM_SAMPLE_RATE}), PCM_SAMPLE_RATE
    ),
}


@dataclass(frozen=True)
class EncodedAudio:
    data: bytes
    content_type: str
    sample_rate: int  # the rate of the encoded audio (may differ from the input's)


def content_type(response_format: ResponseFormat) -> str:
    """The Content-Type a response in this format carries."""
    return _TARGETS[response_format].content_type


def encode_audio(
    samples: np.ndarray, sample_rate: int, response_format: ResponseFormat
) -> EncodedAudio:
    """Encode mono float samples in [-1, 1] at `sample_rate` Hz as `response_format`.

    Samples outside [-1, 1] are clipped. No samples give what the container makes of none (for
    some formats zero bytes): callers that must play something check for empty audio first.
    Raises ValueError for an unknown format or a non-mono array.
    """
    target = _TARGETS.get(response_format)
    if target is None:
        raise ValueError(
            f"unknown response format {response_format!r}; choose one of {RESPONSE_FORMATS}"
        )
    mono = np.asarray(samples, dtype=np.float32)
    if mono.ndim != 1:
        raise ValueError(f"expected mono samples (a 1-D array), got shape {mono.shape}")
    mono = np.clip(np.nan_to_num(mono), -1.0, 1.0)
    keeps_rate = target.rates is None or sample_rate in target.rates
    rate = sample_rate if keeps_rate else target.fallback_rate
    if target.container is None:
        data = b"".join(
            frame.to_ndarray().astype("<i2").tobytes()
            for frame in _resampled_frames(mono, sample_rate, "s16", rate, frame_size=None)
        )
        return EncodedAudio(data, target.content_type, rate)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=target.container) as container:
        stream = container.add_stream(target.codec, rate=rate, layout="mono")
        assert isinstance(stream, av.AudioStream)
        stream.codec_context.format = target.sample_format
        if target.codec == "libmp3lame":
            stream.codec_context.bit_rate = 64_000  # speech: FFmpeg's 128k default doubles bytes
        stream.codec_context.open()  # fixes frame_size, which the resampler must chunk to
        frame_size = stream.codec_context.frame_size or None
        pts = 0
        for frame in _resampled_frames(mono, sample_rate, target.sample_format, rate, frame_size):
            frame.pts = pts
            pts += frame.samples
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return EncodedAudio(buffer.getvalue(), target.content_type, rate)


def _resampled_frames(
    mono: np.ndarray, in_rate: int, out_format: str, out_rate: int, frame_size: int | None
) -> list[av.AudioFrame]:
    """The samples as frames in the encoder's format, rate and frame size (the last one padded)."""
    resampler = av.AudioResampler(
        format=out_format, layout="mono", rate=out_rate, frame_size=frame_size
    )
    frames: list[av.AudioFrame] = []
    if mono.size:
        frame = av.AudioFrame.from_ndarray(mono[np.newaxis, :], format="flt", layout="mono")
        frame.sample_rate = in_rate
        frame.pts = 0
        frames.extend(resampler.resample(frame))
    frames.extend(resampler.resample(None))
    return frames
