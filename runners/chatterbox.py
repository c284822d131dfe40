"""Chatterbox (chatterbox-tts 0.1.7): original, Turbo and Multilingual, 24 kHz, voice cloning.

Each variant is its own class, loaded from a local folder with `from_local(folder, device)`:

- original: chatterbox.tts.ChatterboxTTS
- turbo: chatterbox.tts_turbo.ChatterboxTurboTTS
- multilingual: chatterbox.mtl_tts.ChatterboxMultilingualTTS (`language_id`)

The files each reads are in `REQUIRED_FILES`.

`conds.pt` is the built-in voice; without it the model speaks only with reference clips.
`generate` keeps per-call state on the model (its conditionals, the multilingual alignment
analyzer's hooks), so one generate runs at a time per model: `speak` holds a lock. Every output
carries Resemble's Perth watermark, as the classes apply it; a load without it is refused.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from llmux.core.config import PhysicalModel
from llmux.core.errors import ApiError, BadRequest
from runners.base import (
    Device,
    ModelLoadError,
    NotLoaded,
    free_device_memory,
    park_torch_modules,
    require_backend,
    require_files,
    torch_bytes,
    torch_device,
    torch_device_bytes,
    unpark_torch_modules,
)

log = logging.getLogger(__name__)

SAMPLE_RATE = 24_000  # chatterbox.models.s3gen.S3GEN_SR

# The files each variant's from_local opens; tokenizer_config.json stands for Turbo's tokenizer.
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "original": ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json"),
    "turbo": (
        "ve.safetensors",
        "t3_turbo_v1.safetensors",
        "s3gen_meanflow.safetensors",
        "tokenizer_config.json",
    ),
    "multilingual": (
        "ve.pt",
        "t3_mtl23ls_v2.safetensors",
        "s3gen.pt",
        "grapheme_mtl_merged_expanded_v1.json",
    ),
}


def _original() -> Any:
    from chatterbox.tts import ChatterboxTTS

    return ChatterboxTTS


def _turbo() -> Any:
    from chatterbox.tts_turbo import ChatterboxTurboTTS

    return ChatterboxTurboTTS


def _multilingual() -> Any:
    from chatterbox.mtl_tts import ChatterboxMultilingualTTS

    return ChatterboxMultilingualTTS


# variant -> the class, imported on first use (torch and chatterbox are heavy).
CHATTERBOX_CLASSES = {"original": _original, "turbo": _turbo, "multilingual": _multilingual}


class ChatterboxRunner:
    """One Chatterbox model. `speak` may be called from several threads; it runs one at a time."""

    sample_rate = SAMPLE_RATE

    def __init__(
        self, physical_id: str, spec: PhysicalModel, weights: Path, *, device: Device = "auto"
    ) -> None:
        if spec.variant not in CHATTERBOX_CLASSES:  # config validation makes this unreachable
            raise ModelLoadError(f"unknown chatterbox variant {spec.variant!r}")
        self.physical_id = physical_id
        self.variant: str = spec.variant
        self.weights = weights
        self.device: Device = device
        self._model: Any = None
        self._builtin: Any = None  # the conditionals of conds.pt, None without one
        self._cloned: dict[Path, Any] = {}  # reference clip -> its conditionals
        self._lock = threading.Lock()
        self._on_cuda = False

    def preflight(self) -> None:
        require_backend(self.physical_id, "torch", "chatterbox")
        require_files(
            self.physical_id, *(self.weights / name for name in REQUIRED_FILES[self.variant])
        )

    def load(self) -> None:
        self.preflight()
        _require_watermarker()
        device = torch_device(self.device)
        self._on_cuda = device == "cuda"
        try:
            model = load_chatterbox(self.variant, self.weights, device)
        except Exception as exc:  # wrong shapes, truncated files: the folder is not this variant
            raise ModelLoadError(
                f"Cannot load {self.physical_id!r} (chatterbox {self.variant}) from "
                f"{self.weights}: {type(exc).__name__}: {exc}"
            ) from exc
        self._model = model
        self._builtin = model.conds
        log.info(
            "loaded chatterbox %s from %s on %s (built-in voice: %s)",
            self.variant,
            self.weights,
            device,
            "yes" if model.conds is not None else "no",
        )

    def unload(self) -> None:
        with self._lock:  # a generate still running keeps its model until it returns
            self._model = None
            self._builtin = None
            self._cloned.clear()
        free_device_memory(self._on_cuda)

    def device_bytes(self) -> int | None:
        model = self._model
        return None if model is None else torch_device_bytes(model.t3, model.s3gen, model.ve)

    # --- Parkable -----------------------------------------------------------------------------
    # The three networks move; the voice conditionals (built-in and cloned, a few MB) stay where
    # they are, so a parked model still holds that much device memory.

    def park(self) -> None:
        with self._lock:
            model = self._require()
            device = "cuda" if self._on_cuda else "cpu"
            park_torch_modules(self.physical_id, device, model.t3, model.s3gen, model.ve)

    def unpark(self) -> None:
        with self._lock:
            model = self._require()
            device = "cuda" if self._on_cuda else "cpu"
            unpark_torch_modules(self.physical_id, device, model.t3, model.s3gen, model.ve)

    def host_bytes(self) -> int:
        model = self._model
        return 0 if model is None else torch_bytes(model.t3, model.s3gen, model.ve)

    def _require(self) -> Any:
        if self._model is None:
            raise NotLoaded(self.physical_id)
        return self._model

    def speak(self, text: str, *, voice: Path | None, language: str, speed: float) -> np.ndarray:
        """Synthesize `text`; blocks until this model's earlier requests are done.

        `speed` other than 1 time-stretches the result (pitch kept): Chatterbox has no pace input.
        """
        import torch

        with self._lock:
            model = self._model
            if model is None:
                raise NotLoaded(self.physical_id)
            model.conds = self._conditionals(model, voice)
            kwargs: dict[str, Any] = {}
            if self.variant == "multilingual":
                kwargs["language_id"] = language
            elif language != "en":
                raise ValueError(f"chatterbox {self.variant} speaks English only, not {language!r}")
            with torch.inference_mode():
                wav = model.generate(text, **kwargs)
        samples = wav.squeeze(0).detach().cpu().numpy().astype(np.float32, copy=False)
        if speed != 1.0 and samples.size:
            import librosa

            samples = librosa.effects.time_stretch(samples, rate=speed).astype(np.float32)
        return samples

    def _conditionals(self, model: Any, voice: Path | None) -> Any:
        """The conditionals for a voice: conds.pt, or a clip's, computed once and kept."""
        if voice is None:
            if self._builtin is None:
                raise BadRequest(
                    f"Model {self.physical_id!r} has no built-in voice ({self.weights}/conds.pt "
                    "is missing): ask for a voice with a reference clip."
                )
            return self._builtin
        if voice not in self._cloned:
            if not voice.is_file():
                raise ApiError(
                    f"The reference clip {voice} is missing on the server.",
                    status=503,
                    code="voice_unavailable",
                )
            try:
                model.prepare_conditionals(str(voice))
            except AssertionError as exc:  # Turbo: "Audio prompt must be longer than 5 seconds!"
                raise ApiError(
                    f"The reference clip {voice} is unusable for {self.physical_id}: {exc}",
                    status=503,
                    code="voice_unavailable",
                ) from exc
            self._cloned[voice] = model.conds
        return self._cloned[voice]


def load_chatterbox(variant: str, folder: Path, device: str) -> Any:
    """The variant's class `from_local(folder, device)`, made to work with this environment."""
    if variant == "multilingual":
        _cangjie_from_folder()
    _quiet_progress_bars()
    model = CHATTERBOX_CLASSES[variant]().from_local(folder, device)
    if variant == "turbo":
        _keep_reference_float32(model)
    return model


def _quiet_progress_bars() -> None:
    """Sampling and flow matching draw tqdm bars on stderr for every sentence: a server log is
    not a terminal. Silence chatterbox's own bars only."""
    import functools

    from chatterbox.models.s3gen import flow_matching
    from chatterbox.models.t3 import t3
    from tqdm import tqdm

    for module in (t3, flow_matching):
        if getattr(module, "tqdm", None) is tqdm:
            module.tqdm = functools.partial(tqdm, disable=True)


def _cangjie_from_folder() -> None:
    """The multilingual tokenizer fetches Cangjie5_TC.json (Chinese) from the Hub on every load,
    with `cache_dir` set to the model folder, retrying for half a minute when offline. llmux never
    downloads at run time: scripts/download_models.sh puts the file in the folder; read it there,
    and without it Chinese is tokenized without Cangjie codes (the tokenizer logs that)."""
    from chatterbox.models.tokenizers import tokenizer

    def local_file(
        repo_id: str, filename: str, cache_dir: str | Path | None = None, **_: Any
    ) -> str:
        path = Path(cache_dir or ".") / filename
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing (llmux does not download {repo_id} files at run time)"
            )
        return str(path)

    tokenizer.hf_hub_download = local_file


def _keep_reference_float32(model: Any) -> None:
    """Turbo's loudness normalization multiplies the float32 clip by a NumPy float64 gain: under
    NumPy 2's promotion rules (chatterbox pins numpy<2) the clip becomes float64 and the speech
    tokenizer's float32 mel filters refuse it. Cast the result back, on this instance only."""
    normalize = model.norm_loudness

    def norm_loudness_float32(wav: np.ndarray, sr: int, target_lufs: float = -27) -> np.ndarray:
        return np.asarray(normalize(wav, sr, target_lufs), dtype=np.float32)

    model.norm_loudness = norm_loudness_float32


def _require_watermarker() -> None:
    """Refuse to load when Perth cannot watermark: the classes would fail on every request."""
    try:
        import perth
    except ImportError as exc:
        raise ModelLoadError(
            f"resemble-perth (the watermarker Chatterbox applies) is not installed ({exc}); run "
            "scripts/setup.sh."
        ) from exc
    if getattr(perth, "PerthImplicitWatermarker", None) is None:
        raise ModelLoadError(
            "resemble-perth could not load its watermarker (it imports pkg_resources, which "
            "setuptools 81 and later no longer ship): install setuptools<81 (scripts/setup.sh "
            "does)."
        )
