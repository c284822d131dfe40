"""llmux.audio.decode: every accepted format decodes by content; everything else is refused."""

from __future__ import annotations

import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from llmux.audio.decode import SAMPLE_RATE, AudioTooLong, decode_audio
from llmux.core.errors import BadRequest
from runners.transcription import split_at_quiet_points
from tests.audio_fixtures import FORMATS, Clips, ffmpeg, make_clips, silence

MAX = 600.0


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    return make_clips(tmp_path_factory.mktemp("clips"))


def seconds_of(path: Path) -> float:
    """The source clip's length, read from the WAV header (22.05 kHz mono 16-bit)."""
    return (path.stat().st_size - 44) / (22050 * 2)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("language", ["en", "de"])
def test_every_format_decodes_to_16k_mono_float32(clips: Clips, language: str, fmt: str) -> None:
    reference = decode_audio(clips[language, "wav"].read_bytes(), max_seconds=MAX)
    audio = decode_audio(clips[language, fmt].read_bytes(), max_seconds=MAX)
    assert audio.dtype == np.float32 and audio.ndim == 1
    # Lossy codecs add a few ms of encoder delay and padding, never whole words.
    assert abs(len(audio) - len(reference)) < 0.1 * SAMPLE_RATE
    assert 0.2 < float(np.abs(audio).max()) < 1.5  # lossy codecs may overshoot full scale a little
    loudness = float(np.sqrt(np.mean(np.square(audio))))
    assert loudness == pytest.approx(float(np.sqrt(np.mean(np.square(reference)))), rel=0.25)


def test_wav_length_matches_its_source(clips: Clips) -> None:
    audio = decode_audio(clips["en", "wav"].read_bytes(), max_seconds=MAX)
    assert len(audio) / SAMPLE_RATE == pytest.approx(seconds_of(clips["en", "wav"]), abs=0.01)


def test_stereo_44k_is_mixed_down_and_resampled(tmp_path: Path, clips: Clips) -> None:
    stereo = tmp_path / "stereo.flac"
    ffmpeg("-i", clips["en", "wav"], "-ac", "2", "-ar", "44100", *FORMATS["flac"], stereo)
    audio = decode_audio(stereo.read_bytes(), max_seconds=MAX)
    mono = decode_audio(clips["en", "wav"].read_bytes(), max_seconds=MAX)
    assert audio.ndim == 1
    assert abs(len(audio) - len(mono)) < 0.01 * SAMPLE_RATE


def test_video_file_gives_its_audio_and_one_without_audio_is_refused(
    tmp_path: Path, clips: Clips
) -> None:
    video = tmp_path / "video.mp4"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=duration=2:size=64x64:rate=5",
        "-i",
        clips["en", "wav"],
        "-shortest",
        "-c:v",
        "mpeg4",
        "-c:a",
        "aac",
        "-f",
        "mp4",
        video,
    )
    assert len(decode_audio(video.read_bytes(), max_seconds=MAX)) > SAMPLE_RATE
    mute = tmp_path / "mute.mp4"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=duration=1:size=64x64:rate=5",
        "-c:v",
        "mpeg4",
        "-f",
        "mp4",
        mute,
    )
    with pytest.raises(BadRequest, match="no audio stream") as caught:
        decode_audio(mute.read_bytes(), max_seconds=MAX)
    assert caught.value.param == "file" and caught.value.code == "invalid_audio"


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", "empty_audio"),
        (b"this is a text file, not audio\n" * 20, "invalid_audio"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "invalid_audio"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "invalid_audio"),  # a WAV header cut short
    ],
    ids=["empty", "text", "noise-bytes", "truncated-header"],
)
def test_not_audio_is_a_bad_request_on_file(data: bytes, code: str) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_audio(data, max_seconds=MAX)
    assert caught.value.status == 400
    assert caught.value.param == "file"
    assert caught.value.code == code


def test_formats_outside_the_list_are_refused_even_when_ffmpeg_knows_them(
    tmp_path: Path, clips: Clips
) -> None:
    au = tmp_path / "clip.au"
    ffmpeg("-i", clips["en", "wav"], "-f", "au", au)
    with pytest.raises(BadRequest, match="Supported formats: flac, mp3"):
        decode_audio(au.read_bytes(), max_seconds=MAX)
    # A playlist would make ffmpeg open other files (or URLs): never.
    playlist = (
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n"
        f"file://{clips['en', 'mp3']}\n#EXT-X-ENDLIST\n"
    ).encode()
    with pytest.raises(BadRequest):
        decode_audio(playlist, max_seconds=MAX)


def test_a_recording_cut_short_gives_what_it_holds(clips: Clips) -> None:
    whole = clips["en", "webm"].read_bytes()
    full = decode_audio(whole, max_seconds=MAX)
    part = decode_audio(whole[: len(whole) // 2], max_seconds=MAX)
    assert SAMPLE_RATE // 2 < len(part) < len(full)


def test_duration_cap_stops_decoding_early(tmp_path: Path) -> None:
    # 20 minutes of silence is a few hundred KB of FLAC; decoded it would be 77 MB.
    long = silence(tmp_path / "long.flac", 20 * 60)
    assert long.stat().st_size < 2_000_000
    started = time.monotonic()
    with pytest.raises(AudioTooLong) as caught:
        decode_audio(long.read_bytes(), max_seconds=30)
    assert time.monotonic() - started < 5  # stopped at the cap, not after decoding it all
    assert caught.value.status == 400 and caught.value.code == "audio_too_long"
    assert "30 seconds" in caught.value.message
    assert len(decode_audio(long.read_bytes(), max_seconds=21 * 60)) == 20 * 60 * SAMPLE_RATE


def test_split_at_quiet_points_cuts_in_the_silence() -> None:
    rng = np.random.default_rng(1)
    audio = rng.uniform(-0.5, 0.5, 70 * SAMPLE_RATE).astype(np.float32)
    audio[27 * SAMPLE_RATE : int(27.5 * SAMPLE_RATE)] = 0.0  # a pause inside the search region
    ranges = split_at_quiet_points(audio, 30.0)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(audio)
    assert all(end == next_start for (_, end), (next_start, _) in pairwise(ranges))
    assert all(end - start <= 30 * SAMPLE_RATE for start, end in ranges)
    assert 27 * SAMPLE_RATE <= ranges[0][1] <= 27.5 * SAMPLE_RATE
    assert split_at_quiet_points(audio[: 10 * SAMPLE_RATE], 30.0) == [(0, 10 * SAMPLE_RATE)]
