"""Uploaded audio to model input: decoded by content with PyAV, resampled to mono float32.

The file name and the declared content type are never consulted: clients name files loosely
(Open WebUI uploads `.webm` recordings as whatever the browser made), and the bytes are what ffmpeg
reads anyway. Only the demuxers of the formats OpenAI's transcription API accepts (flac, mp3, mp4,
mpeg, mpga, m4a, ogg, wav, webm) may open an upload: ffmpeg's other demuxers include playlists and
concat lists that would read other files or URLs.

Decoding blocks (call it on a worker thread). The duration cap is enforced while frames decode,
so a small file that expands to hours of audio is refused before it fills memory.
"""

from __future__ import annotations

import io
import itertools
import logging

import av
import av.error
import numpy as np

from llmux.core.errors import ApiError, BadRequest
from runners.transcription import SAMPLE_RATE

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("flac", "mp3", "mp4", "mpeg", "mpga", "m4a", "ogg", "wav", "webm")
# ffmpeg demuxer names for those formats (a demuxer matches when any of its comma-separated names
# is listed): mov covers mp4/m4a, matroska covers webm, mp3 covers mpga, mpeg is MPEG-PS.
_DEMUXERS = "wav,flac,mp3,ogg,mov,matroska,mpeg"


class AudioTooLarge(ApiError):
    status = 413
    code = "audio_too_large"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(
            f"The audio file is larger than this server's limit of {max_bytes / 2**20:g} MB "
            "(LLMUX_MAX_AUDIO_MB).",
            param="file",
        )


class AudioTooLong(BadRequest):
    code = "audio_too_long"

    def __init__(self, max_seconds: float) -> None:
        super().__init__(
            f"The audio is longer than this server's limit of {max_seconds:g} seconds "
            "(LLMUX_MAX_AUDIO_MINUTES); split it and send the parts.",
            param="file",
        )


def _unreadable(reason: str) -> BadRequest:
    return BadRequest(
        f"The file could not be decoded as audio ({reason}). Supported formats: "
        f"{', '.join(SUPPORTED_FORMATS)}.",
        param="file",
        code="invalid_audio",
    )


def decode_audio(data: bytes, *, max_seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode `data` (any supported format, found by content) to mono float32 at `sample_rate`.

    Raises `BadRequest` (param "file") for empty input, unknown or broken formats and files
    without audio, and `AudioTooLong` once more than `max_seconds` have decoded. A stream that
    breaks after some audio decoded (a recording cut short) yields what decoded, with a log line.
    """
    if not data:
        raise BadRequest("The audio file is empty.", param="file", code="empty_audio")
    limit = int(max_seconds * sample_rate)
    pieces: list[np.ndarray] = []
    decoded = 0
    try:
        container = av.open(io.BytesIO(data), mode="r", options={"format_whitelist": _DEMUXERS})
    except (av.error.FFmpegError, ValueError) as exc:
        raise _unreadable("not a supported audio format, or damaged") from exc
    with container:
        if not container.streams.audio:
            raise _unreadable(f"the {container.format.name} file has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        frames = container.decode(container.streams.audio[0])
        try:
            for frame in itertools.chain(frames, [None]):  # None flushes the resampler
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    decoded += samples.size
                    if decoded > limit:
                        raise AudioTooLong(max_seconds)
                    pieces.append(samples)
        except (av.error.FFmpegError, ValueError) as exc:
            if not decoded:
                raise _unreadable("the audio stream is damaged") from exc
            log.warning(
                "audio broke off after %.1f s (%s); transcribing what decoded",
                decoded / sample_rate,
                exc,
            )
    if not decoded:
        raise BadRequest(
            "The audio file contains no sound (zero samples decoded).",
            param="file",
            code="empty_audio",
        )
    return np.concatenate(pieces).astype(np.float32, copy=False)
