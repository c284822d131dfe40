"""Speech-to-text on Hugging Face transformers: AutoProcessor + AutoModelForSpeechSeq2Seq.

Serves cohere-transcribe (`cohere_asr`, transformers >= 5.4) and Whisper checkpoints. What differs
between them is data in `FAMILIES`, keyed by the checkpoint's `config.model_type`, not branches
spread through the code:

- cohere-transcribe cannot detect a language: the language goes into the processor, which builds
  the decoder prompt from it; 14 languages; 35 s windows (its processor may split a window again
  at a quiet point and hands back `audio_chunk_index` to put the texts together); no text prompt.
- Whisper detects the language when none is given; the language goes to `generate(language=...)`
  (which sets the forced decoder ids); 30 s windows; takes a prompt (`prompt_ids`).

Audio longer than a window is cut at quiet points (`split_at_quiet_points`) and each window
transcribed on its own; each becomes one segment of the transcript.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from llmux.core.config import PhysicalModel
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
from runners.transcription import (
    SAMPLE_RATE,
    Segment,
    Transcript,
    UnsupportedLanguage,
    split_at_quiet_points,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Languages written without spaces between words: windows are joined without one.
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "yue", "th", "lo", "my", "km", "bo"})


@dataclass(frozen=True)
class AsrFamily:
    """What one model architecture needs from the runner."""

    window_s: float  # the longest audio one generate call takes
    max_new_tokens: int  # per window
    language_to: Literal["processor", "generate"]  # where the language is passed
    detects_language: bool  # False: a request must name one
    takes_prompt: bool  # a text prompt (prior context) can be given
    # The languages it knows; None: those of the checkpoint's generation config (`lang_to_id`).
    languages: frozenset[str] | None
    gpu_dtype: Literal["float16", "bfloat16", "auto"]  # "auto": the checkpoint's own


FAMILIES: dict[str, AsrFamily] = {
    # CohereLabs/cohere-transcribe-03-2026 (model card; transformers' cohere_asr processor).
    "cohere_asr": AsrFamily(
        window_s=35.0,
        max_new_tokens=512,
        language_to="processor",
        detects_language=False,
        takes_prompt=False,
        languages=frozenset(
            {"ar", "de", "el", "en", "es", "fr", "it", "ja", "ko", "nl", "pl", "pt", "vi", "zh"}
        ),
        gpu_dtype="auto",
    ),
    # Whisper decodes at most 448 positions; half is Whisper's own sample length.
    "whisper": AsrFamily(
        window_s=30.0,
        max_new_tokens=224,
        language_to="generate",
        detects_language=True,
        takes_prompt=True,
        languages=None,
        gpu_dtype="float16",
    ),
}


class TransformersAsrRunner:
    """A `TranscribeRunner` for a transformers speech-to-text checkpoint directory.

    One transcription at a time per model (`_lock`): two concurrent `generate` calls would each
    take activation memory the measured footprint does not include.
    """

    def __init__(
        self, physical_id: str, spec: PhysicalModel, weights: Path, *, device: Device = "auto"
    ) -> None:
        self.physical_id = physical_id
        self.spec = spec
        self.weights = weights
        self.device: Device = device
        self._lock = threading.Lock()
        self._model: Any = None
        self._processor: Any = None
        self._family: AsrFamily | None = None
        self._languages: frozenset[str] = frozenset()
        self._multilingual = True
        self._device = "cpu"
        self._dtype: torch.dtype | None = None
        self._max_new_tokens = 0

    def preflight(self) -> None:
        require_backend(self.physical_id, "torch", "transformers")
        require_files(self.physical_id, self.weights / "config.json")

    def load(self) -> None:
        self.preflight()
        import torch
        from transformers import AutoConfig, AutoModelForSpeechSeq2Seq, AutoProcessor

        config = AutoConfig.from_pretrained(self.weights, local_files_only=True)
        family = FAMILIES.get(config.model_type)
        if family is None:
            raise ModelLoadError(
                f"Model {self.physical_id!r} is a {config.model_type!r} checkpoint; the "
                f"transformers speech-to-text runner serves {', '.join(sorted(FAMILIES))}."
            )
        self._device = torch_device(self.device)
        on_gpu = self._device == "cuda"
        dtype: Any = family.gpu_dtype if on_gpu else "float32"
        if dtype != "auto":
            dtype = getattr(torch, dtype)
        try:
            self._processor = AutoProcessor.from_pretrained(self.weights, local_files_only=True)
            model = AutoModelForSpeechSeq2Seq.from_pretrained(
                self.weights, dtype=dtype, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"Model {self.physical_id!r}: transformers could not load {self.weights}: {exc}"
            ) from exc
        self._model = model.to(self._device).eval()
        self._dtype = self._model.dtype
        self._family = family
        self._languages, self._multilingual = self._known_languages(family)
        # A checkpoint whose generation config asks for fewer new tokens keeps its own limit.
        own_limit = getattr(self._model.generation_config, "max_new_tokens", None)
        self._max_new_tokens = min(family.max_new_tokens, own_limit or family.max_new_tokens)
        log.info(
            "loaded %s (%s) from %s on %s",
            self.physical_id,
            config.model_type,
            self.weights,
            self._device,
        )

    def _known_languages(self, family: AsrFamily) -> tuple[frozenset[str], bool]:
        """(languages, multilingual): the family's list, or the checkpoint's generation config."""
        if family.languages is not None:
            return family.languages, True
        generation = self._model.generation_config
        if not getattr(generation, "is_multilingual", False):
            return frozenset({"en"}), False  # an English-only checkpoint (*.en)
        lang_to_id = getattr(generation, "lang_to_id", None) or {}
        if not lang_to_id:
            raise ModelLoadError(
                f"Model {self.physical_id!r}: its generation_config.json is multilingual but "
                "lists no languages (lang_to_id); use a checkpoint that has them."
            )
        return frozenset(token.strip("<|>") for token in lang_to_id), True

    def unload(self) -> None:
        on_gpu = self._device == "cuda"
        self._model = None
        self._processor = None
        free_device_memory(on_gpu)

    def device_bytes(self) -> int | None:
        return torch_device_bytes(self._model)

    # --- Parkable -----------------------------------------------------------------------------

    def park(self) -> None:
        if self._model is None:
            raise NotLoaded(self.physical_id)
        park_torch_modules(self.physical_id, self._device, self._model)

    def unpark(self) -> None:
        if self._model is None:
            raise NotLoaded(self.physical_id)
        unpark_torch_modules(self.physical_id, self._device, self._model)

    def host_bytes(self) -> int:
        return 0 if self._model is None else torch_bytes(self._model)

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None,
        prompt: str | None,
        temperature: float,
        cancel: threading.Event | None = None,
    ) -> Transcript:
        family = self._family
        if family is None or self._model is None:
            raise NotLoaded(self.physical_id)
        if language is None and not family.detects_language:
            raise UnsupportedLanguage(self.physical_id, None, self._languages)
        if language is not None and language not in self._languages:
            raise UnsupportedLanguage(self.physical_id, language, self._languages)
        if prompt and not family.takes_prompt:
            log.info("%s takes no prompt; ignoring it", self.physical_id)
            prompt = None
        import torch

        windows = split_at_quiet_points(audio, family.window_s)
        segments: list[Segment] = []
        with self._lock, torch.inference_mode():
            if language is None:
                language = self._detect_language(audio[slice(*windows[0])])
            for start, end in windows:
                if cancel is not None and cancel.is_set():
                    break
                text, tokens = self._transcribe_window(
                    audio[start:end], family, language, prompt, temperature
                )
                segments.append(
                    Segment(
                        start=start / SAMPLE_RATE,
                        end=end / SAMPLE_RATE,
                        text=text,
                        tokens=tokens,
                        temperature=temperature,
                    )
                )
        joiner = "" if language in NO_SPACE_LANGUAGES else " "
        return Transcript(
            text=joiner.join(s.text for s in segments if s.text),
            language=language,
            duration=len(audio) / SAMPLE_RATE,
            segments=tuple(segments),
        )

    def _detect_language(self, window: np.ndarray) -> str:
        """The language of one window (Whisper's language token), or "en" for English-only."""
        if not self._multilingual:
            return "en"
        features = self._inputs(window, {})["input_features"]
        token_id = int(self._model.detect_language(features)[0])
        token = self._processor.tokenizer.convert_ids_to_tokens(token_id)
        return str(token).strip("<|>")

    def _inputs(self, window: np.ndarray, extra: dict[str, Any]) -> dict[str, Any]:
        """The processor's tensors for one window, on the model's device and dtype."""
        inputs = self._processor(window, sampling_rate=SAMPLE_RATE, return_tensors="pt", **extra)
        return {name: self._to_device(value) for name, value in inputs.items()}

    def _to_device(self, value: Any) -> Any:
        if not hasattr(value, "to"):
            return value  # e.g. cohere's audio_chunk_index, a list
        value = value.to(self._device)
        return value.to(self._dtype) if value.is_floating_point() else value

    def _prompt_ids(self, prompt: str) -> torch.Tensor:
        """Whisper's prompt tokens, cut from the front (as Whisper does) to leave room for the
        answer: the decoder holds `max_target_positions` tokens, prompt and answer together."""
        import torch

        ids = self._processor.get_prompt_ids(prompt, return_tensors="pt")
        # 4: <|startoftranscript|>, language, task, <|notimestamps|>.
        room = self._model.config.max_target_positions - self._max_new_tokens - 4
        if len(ids) > room:
            ids = torch.cat([ids[:1], ids[len(ids) - room + 1 :]])  # keep <|startofprev|>
        return ids.to(self._device)

    def _transcribe_window(
        self,
        window: np.ndarray,
        family: AsrFamily,
        language: str,
        prompt: str | None,
        temperature: float,
    ) -> tuple[str, tuple[int, ...]]:
        to_processor = {"language": language} if family.language_to == "processor" else {}
        inputs = self._inputs(window, to_processor)
        chunk_index = inputs.pop("audio_chunk_index", None)
        options: dict[str, Any] = {"max_new_tokens": self._max_new_tokens}
        if family.language_to == "generate" and self._multilingual:
            options.update(language=language, task="transcribe")
        if prompt:
            options["prompt_ids"] = self._prompt_ids(prompt)
        if temperature > 0:
            options.update(do_sample=True, temperature=temperature)
        else:
            options.update(do_sample=False)
        output = self._model.generate(**inputs, **options)
        if chunk_index is not None:
            texts = self._processor.decode(
                output, skip_special_tokens=True, audio_chunk_index=chunk_index, language=language
            )
        else:
            texts = self._processor.batch_decode(output, skip_special_tokens=True)
        special = set(self._processor.tokenizer.all_special_ids)
        tokens = tuple(int(t) for t in output[0].tolist() if int(t) not in special)
        return " ".join(t.strip() for t in texts if t.strip()), tokens
