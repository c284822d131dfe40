"""Speech-to-text on faster-whisper: a Whisper model converted to CTranslate2.

The weights directory holds what a conversion writes (`model.bin`, `config.json`, the tokenizer and
`vocabulary.txt`). On a CUDA device it runs in float16, on the CPU in int8 (the fast path there;
quality stays close to float32). faster-whisper cuts long audio into Whisper's 30 s windows itself
and carries the text of one window over as context into the next.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmux.core.config import PhysicalModel
from runners.base import (
    Device,
    ModelLoadError,
    NotLoaded,
    free_device_memory,
    require_backend,
    require_files,
)
from runners.transcription import (
    FALLBACK_TEMPERATURES,
    SAMPLE_RATE,
    Segment,
    Transcript,
    UnsupportedLanguage,
)

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

log = logging.getLogger(__name__)


class FasterWhisperRunner:
    """A `TranscribeRunner` for a CTranslate2 Whisper model directory.

    faster-whisper may be called from several threads at once (CTranslate2 queues the calls on
    its workers), so `transcribe` takes no lock.
    """

    def __init__(
        self, physical_id: str, spec: PhysicalModel, weights: Path, *, device: Device = "auto"
    ) -> None:
        self.physical_id = physical_id
        self.spec = spec
        self.weights = weights
        self.device: Device = device
        self._model: WhisperModel | None = None
        self._languages: frozenset[str] = frozenset()

    def preflight(self) -> None:
        require_backend(self.physical_id, "faster_whisper", "ctranslate2")
        require_files(self.physical_id, self.weights / "model.bin")

    def load(self) -> None:
        self.preflight()
        import ctranslate2
        from faster_whisper import WhisperModel

        on_gpu = self.device == "auto" and ctranslate2.get_cuda_device_count() > 0
        device, compute_type = ("cuda", "float16") if on_gpu else ("cpu", "int8")
        try:
            self._model = WhisperModel(
                str(self.weights), device=device, compute_type=compute_type, local_files_only=True
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelLoadError(
                f"Model {self.physical_id!r}: faster-whisper could not load {self.weights} on "
                f"{device} ({compute_type}): {exc}"
            ) from exc
        self._languages = frozenset(self._model.supported_languages)
        log.info(
            "loaded %s from %s on %s (%s)", self.physical_id, self.weights, device, compute_type
        )

    def unload(self) -> None:
        self._model = None
        # CTranslate2 frees device memory when the model object is collected; it has no cache.
        free_device_memory(on_cuda=False)

    def device_bytes(self) -> int | None:
        return None  # not torch: the executor reads the device around the load

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None,
        prompt: str | None,
        temperature: float,
        cancel: threading.Event | None = None,
    ) -> Transcript:
        model = self._model
        if model is None:
            raise NotLoaded(self.physical_id)
        if language is not None and language not in self._languages:
            raise UnsupportedLanguage(self.physical_id, language, self._languages)
        segments, info = model.transcribe(
            audio,
            language=language,
            initial_prompt=prompt or None,
            temperature=list(FALLBACK_TEMPERATURES) if temperature == 0 else temperature,
            vad_filter=False,
        )
        # The segments are a generator: decoding happens while it is consumed, here, one 30 s
        # window at a time, so a cancel is seen between windows.
        decoded = []
        for segment in segments:
            decoded.append(segment)
            if cancel is not None and cancel.is_set():
                break
        found = tuple(
            Segment(
                start=s.start,
                end=s.end,
                text=s.text.strip(),
                tokens=tuple(s.tokens),
                temperature=s.temperature or 0.0,
                avg_logprob=s.avg_logprob,
                compression_ratio=s.compression_ratio,
                no_speech_prob=s.no_speech_prob,
            )
            for s in decoded
        )
        return Transcript(
            # Whisper's segment texts carry their own leading space where the language uses them.
            text="".join(s.text for s in decoded).strip(),
            language=info.language,
            duration=len(audio) / SAMPLE_RATE,
            segments=found,
        )
