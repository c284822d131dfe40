"""Speech: real-time factors (seconds of work per second of audio) of transcription and
synthesis through llmux and in process, interleaved."""

from __future__ import annotations

import io
import time
import wave
from pathlib import Path

import httpx

from bench.context import ASR, TTS, TTS_FILE, Bench
from bench.inprocess import Isolated, PiperInProcess, WhisperInProcess
from bench.stats import Section, interleave, median, ratio

SENTENCE = (
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find "
    "its friends before the sun goes down."
)


def _clip() -> Path:
    from llmux.audio.samples import CLIPS

    return CLIPS / "en.mp3"


def _clip_seconds(clip: Path) -> float:
    import av

    with av.open(str(clip)) as container:
        stream = container.streams.audio[0]
        frames = sum(frame.samples for frame in container.decode(stream))
        return frames / stream.rate


def speech(bench: Bench) -> Section:
    clip = _clip()
    clip_s = _clip_seconds(clip)
    whisper = Isolated(WhisperInProcess, bench.models_dir / ASR)
    voice = Isolated(PiperInProcess, bench.models_dir / TTS_FILE)
    wav_out = bench.work / "speech.wav"
    url, auth = bench.llmux.base, bench.auth

    def asr_llmux() -> tuple[float, float]:
        started = time.perf_counter()
        response = httpx.post(
            f"{url}/v1/audio/transcriptions",
            headers=auth,
            data={"model": ASR, "language": "en"},
            files={"file": ("en.mp3", clip.read_bytes(), "audio/mpeg")},
            timeout=900,
        )
        response.raise_for_status()
        return time.perf_counter() - started, clip_s

    def tts_llmux() -> tuple[float, float]:
        started = time.perf_counter()
        response = httpx.post(
            f"{url}/v1/audio/speech",
            headers=auth,
            json={"model": TTS, "input": SENTENCE, "voice": "alloy", "response_format": "wav"},
            timeout=900,
        )
        response.raise_for_status()
        took = time.perf_counter() - started
        with wave.open(io.BytesIO(response.content)) as wav:
            return took, wav.getnframes() / wav.getframerate()

    contenders = {
        ("ASR", "llmux"): asr_llmux,
        ("ASR", "in-process"): lambda: (whisper.call("seconds", clip), clip_s),
        ("TTS", "llmux"): tts_llmux,
        ("TTS", "in-process"): lambda: voice.call("seconds", SENTENCE, wav_out),
    }
    names = list(contenders)
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {name: [] for name in names}
    try:
        for name in names:  # warm-up (and llmux's loads)
            contenders[name]()
        for index in range(max(1, min(bench.options.rounds, 3))):
            for name in interleave(names, index):
                runs[name].append(contenders[name]())
    finally:
        whisper.close()
        voice.close()
    section = Section(
        "speech",
        f"speech real-time factors: {ASR} on a {clip_s:.1f} s clip, {TTS} speaking a sentence",
        ["kind", "path", "seconds", "audio s", "RTF", "x in-process"],
    )
    rtf = {name: median(took / audio for took, audio in runs[name]) for name in names}
    for kind, path in names:
        section.rows.append(
            {
                "kind": kind,
                "path": path,
                "seconds": median(t for t, _ in runs[(kind, path)]),
                "audio s": median(a for _, a in runs[(kind, path)]),
                "RTF": rtf[(kind, path)],
                "x in-process": ratio(rtf[(kind, path)], rtf[(kind, "in-process")]),
            }
        )
    section.figures["asr_rtf"] = rtf[("ASR", "llmux")]
    section.figures["tts_rtf"] = rtf[("TTS", "llmux")]
    section.figures["asr_rtf_ratio"] = ratio(rtf[("ASR", "llmux")], rtf[("ASR", "in-process")])
    section.figures["tts_rtf_ratio"] = ratio(rtf[("TTS", "llmux")], rtf[("TTS", "in-process")])
    section.notes.append(
        "RTF: seconds of work per second of audio (below 1 is faster than real time); llmux "
        "includes the upload, decoding and encoding; in process: faster-whisper on the file "
        "with llmux's settings, Piper writing a WAV"
    )
    return section
