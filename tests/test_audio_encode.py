"""Encoding synthesized speech into OpenAI's response formats, checked by decoding it back."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from llmux.audio.encode import PCM_SAMPLE_RATE, RESPONSE_FORMATS, content_type, encode_audio

CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
CONTAINERS = {"mp3": "mp3", "opus": "ogg", "aac": "aac", "flac": "flac", "wav": "wav"}


def tone(seconds: float, rate: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def decode(data: bytes, response_format: str) -> tuple[np.ndarray, int, str]:
    """(mono float samples, rate, container format name) as a client's decoder sees them."""
    if response_format == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768, PCM_SAMPLE_RATE, "pcm"
    with av.open(io.BytesIO(data)) as container:
        frames = [
            f.to_ndarray().reshape(-1) if f.format.is_planar else f.to_ndarray()[0]
            for f in container.decode(audio=0)
        ]
        stream = container.streams.audio[0]
        samples = np.concatenate(frames).astype(np.float32)
        if samples.dtype.kind == "i" or np.abs(samples).max() > 1.5:
            samples = samples / 32768
        return samples, stream.sample_rate, container.format.name


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("response_format", RESPONSE_FORMATS)
@pytest.mark.parametrize("rate", [24_000, 22_050, 16_000, 44_100])
def test_every_format_decodes_back_to_the_same_sound(response_format: str, rate: int) -> None:
    encoded = encode_audio(tone(1.5, rate), rate, response_format)  # type: ignore[arg-type]
    assert encoded.content_type == CONTENT_TYPES[response_format] == content_type(response_format)  # type: ignore[arg-type]
    samples, decoded_rate, container = decode(encoded.data, response_format)
    # Opus decoders always put out 48 kHz, whatever rate was encoded.
    assert decoded_rate == (48_000 if response_format == "opus" else encoded.sample_rate)
    if response_format != "pcm":
        assert CONTAINERS[response_format] in container
    # Lossy codecs add priming and padding (ADTS cannot say how much): under 0.15 s here.
    assert abs(samples.size / decoded_rate - 1.5) < 0.15
    assert dominant_hz(samples, decoded_rate) == pytest.approx(440, abs=5)
    rms = float(np.sqrt(np.mean(samples[samples.size // 4 : -samples.size // 4] ** 2)))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.1)  # a 0.5-amplitude sine, level kept


def test_rates_a_codec_lacks_are_resampled() -> None:
    odd = encode_audio(tone(1.0, 11_000), 11_000, "opus")  # Opus: 8/12/16/24/48 kHz only
    assert odd.sample_rate == 24_000
    kept = encode_audio(tone(1.0, 22_050), 22_050, "wav")
    assert kept.sample_rate == 22_050


def test_pcm_is_24khz_16bit_little_endian_without_header() -> None:
    encoded = encode_audio(np.array([0.0, 0.5, -0.5, 1.0] * 6000, dtype=np.float32), 24_000, "pcm")
    assert len(encoded.data) == 2 * 24_000
    values = np.frombuffer(encoded.data[:8], dtype="<i2")
    assert values[0] == 0 and values[1] > 16000 and values[2] < -16000 and values[3] > 32000
    resampled = encode_audio(tone(1.0, 22_050), 22_050, "pcm")
    assert len(resampled.data) == pytest.approx(2 * 24_000, abs=64)


def test_out_of_range_and_nan_samples_are_clipped() -> None:
    loud = np.array([3.0, -3.0, np.nan] * 8000, dtype=np.float32)
    samples, _, _ = decode(encode_audio(loud, 24_000, "wav").data, "wav")
    assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="response format"):
        encode_audio(tone(0.1, 24_000), 24_000, "ogg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mono"):
        encode_audio(np.zeros((2, 100), dtype=np.float32), 24_000, "wav")
