"""Piper (piper-tts): a small ONNX voice, one speaker, run by onnxruntime on the CPU.

The embedded default's text-to-speech: it installs from PyPI and runs anywhere. A Piper voice has
exactly one voice and one language (its `.onnx.json` says which); it cannot clone reference clips.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from llmux.core.config import PhysicalModel
from runners.base import Device, ModelLoadError, NotLoaded, require_backend, require_files

if TYPE_CHECKING:
    from piper import PiperVoice

log = logging.getLogger(__name__)


class PiperRunner:
    """Loads `<weights>/<model_file>` (plus `<model_file>.json`) with `piper.PiperVoice`."""

    # espeak-ng, which phonemizes for every Piper voice, is one process-wide C library state.
    _espeak_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self, physical_id: str, spec: PhysicalModel, weights: Path, *, device: Device = "auto"
    ) -> None:
        self.physical_id = physical_id
        self.spec = spec
        self.weights = weights
        self.device: Device = device  # onnxruntime on the CPU either way
        self.sample_rate = 0
        self._voice: PiperVoice | None = None

    def preflight(self) -> None:
        if not self.spec.model_file:
            raise ModelLoadError(
                f"Model {self.physical_id!r} (backend piper) needs model_file: the voice's .onnx "
                "file inside its directory."
            )
        require_backend(self.physical_id, "piper")
        model = self.weights / self.spec.model_file
        require_files(self.physical_id, model, model.with_name(model.name + ".json"))

    def load(self) -> None:
        self.preflight()
        model = self.weights / (self.spec.model_file or "")
        config = model.with_name(model.name + ".json")
        from piper import PiperVoice

        try:
            voice = PiperVoice.load(model, config_path=config, use_cuda=False)
        except Exception as exc:  # onnxruntime and json errors alike: the file is not a voice
            raise ModelLoadError(f"Cannot load the Piper voice {model}: {exc}") from exc
        self._voice = voice
        self.sample_rate = voice.config.sample_rate
        log.info("loaded piper voice %s (%d Hz)", model.name, self.sample_rate)

    def unload(self) -> None:
        self._voice = None

    def device_bytes(self) -> int | None:
        return None  # not torch: the executor reads the device around the load

    def speak(self, text: str, *, voice: Path | None, language: str, speed: float) -> np.ndarray:
        """One Piper voice speaks `text`; `speed` scales phoneme length (2.0 = twice as fast)."""
        if self._voice is None:
            raise NotLoaded(self.physical_id)
        if voice is not None:
            raise ValueError("a Piper voice cannot clone a reference clip")
        from piper import SynthesisConfig

        trained = self._voice.config
        variation = 1.0 if self.spec.voice_variation is None else self.spec.voice_variation
        config = SynthesisConfig(
            length_scale=(trained.length_scale or 1.0) / speed,
            noise_scale=trained.noise_scale * variation,
            noise_w_scale=trained.noise_w_scale * variation,
        )
        with self._espeak_lock:
            pieces = [chunk.audio_float_array for chunk in self._voice.synthesize(text, config)]
        if not pieces:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(pieces).astype(np.float32, copy=False)
