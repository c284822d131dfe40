"""The voices file (voices.yaml), validated when llmux starts, and what each speech model can do.

A voice is either a model's built-in voice (Chatterbox's shipped conditionals, a Piper voice's one
speaker) or a reference clip that a cloning model (Chatterbox) imitates, with the clip's language.
OpenAI's voice names (alloy, ...) map to configured voices, so clients that only know those work.

```yaml
voices:
  anna:
    reference: voices/anna.wav   # relative to LLMUX_MODELS_DIR, or absolute
    language: de                 # the multilingual model speaks German with it by default
    name: Anna (German)          # shown by GET /v1/audio/voices; default: the id
default_voice: default           # OpenAI names not listed below; default: default (built-in)
openai_voices:
  nova: anna
```

The voice `default` (each model's built-in voice) always exists unless the file redefines it.
Nothing here imports a backend: the file is read by the BentoML parent process too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, ValidationError, field_validator, model_validator

from llmux.core.config import (
    ConfigError,
    PhysicalModel,
    StrictModel,
    describe_validation_error,
    read_yaml,
)
from llmux.core.errors import BadRequest

log = logging.getLogger(__name__)

OpenAIVoice = Literal[
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "onyx",
    "nova",
    "sage",
    "shimmer",
    "verse",
    "marin",
    "cedar",
]
OPENAI_VOICES: tuple[str, ...] = get_args(OpenAIVoice)
BUILTIN_VOICE = "default"

# chatterbox.mtl_tts.SUPPORTED_LANGUAGES (chatterbox-tts 0.1.7), kept here so that a request is
# checked without importing the backend; tests/test_voices.py compares the two.
MULTILINGUAL_LANGUAGES = frozenset(
    {
        "ar",
        "da",
        "de",
        "el",
        "en",
        "es",
        "fi",
        "fr",
        "he",
        "hi",
        "it",
        "ja",
        "ko",
        "ms",
        "nl",
        "no",
        "pl",
        "pt",
        "ru",
        "sv",
        "sw",
        "tr",
        "zh",
    }
)


class VoiceEntry(StrictModel):
    """One voice clients can ask for by name."""

    reference: str | None = Field(
        None,
        description="A clip of the voice for cloning models to imitate (wav, mp3, flac, ...; "
        "Chatterbox Turbo needs more than 5 s), relative to LLMUX_MODELS_DIR or absolute. "
        "Without it: the model's built-in voice.",
    )
    language: str | None = Field(
        None, description="The voice's language (e.g. de): the multilingual model's default for it."
    )
    name: str | None = Field(None, description="Display name for voice lists; default: the id.")

    @field_validator("language")
    @classmethod
    def _known_language(cls, language: str | None) -> str | None:
        if language is not None and normalize_language(language) not in MULTILINGUAL_LANGUAGES:
            raise ValueError(
                f"{language!r} is not one of {', '.join(sorted(MULTILINGUAL_LANGUAGES))}"
            )
        return language


class VoicesFile(StrictModel):
    """The whole voices.yaml."""

    voices: dict[str, VoiceEntry] = Field(default_factory=dict)
    default_voice: str = Field(
        BUILTIN_VOICE, description="The voice for OpenAI names that openai_voices does not list."
    )
    openai_voices: dict[OpenAIVoice, str] = Field(
        default_factory=dict, description="OpenAI voice name -> a voice of this file (or default)."
    )

    @model_validator(mode="after")
    def _names_resolve(self) -> VoicesFile:
        known = set(self.voices) | {BUILTIN_VOICE}
        clash = sorted(set(self.voices) & set(OPENAI_VOICES))
        if clash:
            raise ValueError(
                f"voices {clash} use OpenAI's names; name the voice otherwise and map the OpenAI "
                "name to it under openai_voices"
            )
        if self.default_voice not in known:
            raise ValueError(f"default_voice {self.default_voice!r} is not a voice of this file")
        for alias, target in self.openai_voices.items():
            if target not in known:
                raise ValueError(f"openai_voices.{alias}: {target!r} is not a voice of this file")
        return self


@dataclass(frozen=True)
class Voice:
    id: str
    name: str
    reference: Path | None  # None: the model's built-in voice
    language: str | None


@dataclass(frozen=True)
class Voices:
    """The voices clients can name: configured ones, then OpenAI's names (aliases)."""

    voices: dict[str, Voice]
    aliases: dict[str, str]  # OpenAI name -> voice id

    @classmethod
    def builtin(cls) -> Voices:
        """What llmux serves without a voices file: every name means the built-in voice."""
        return cls.from_file(VoicesFile(), Path("."))

    @classmethod
    def from_file(cls, file: VoicesFile, models_dir: Path) -> Voices:
        voices = {BUILTIN_VOICE: Voice(BUILTIN_VOICE, "Built-in voice", None, None)}
        for voice_id, entry in file.voices.items():
            reference = models_dir / entry.reference if entry.reference else None  # abs stays abs
            language = normalize_language(entry.language) if entry.language else None
            voices[voice_id] = Voice(voice_id, entry.name or voice_id, reference, language)
        mapped: dict[str, str] = {str(name): voice for name, voice in file.openai_voices.items()}
        aliases = {name: mapped.get(name, file.default_voice) for name in OPENAI_VOICES}
        return cls(voices, aliases)

    def get(self, name: str) -> Voice | None:
        return self.voices.get(self.aliases.get(name, name))

    def listed(self, *, clips: bool = True) -> list[tuple[str, str]]:
        """(id, display name) of every name a client may send, configured voices first, then
        OpenAI's names. Without `clips`, only the names that mean a built-in voice."""
        rows = [(v.id, v.name) for v in self.voices.values() if clips or v.reference is None]
        rows += [
            (alias, f"{alias} ({self.voices[target].name})")
            for alias, target in self.aliases.items()
            if clips or self.voices[target].reference is None
        ]
        return rows


def load_voices(path: Path, models_dir: Path) -> Voices:
    """Read and validate voices.yaml; without one, every name means the built-in voice.

    Raises ConfigError naming the file, entry and field. A reference clip that is missing is
    logged here and refused (503) when a request needs it: the weights folder may be mounted later.
    """
    if not path.exists():
        log.info("no voices file at %s: every voice name means each model's built-in voice", path)
        return Voices.builtin()
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with voices, default_voice, openai_voices")
    try:
        voices = Voices.from_file(VoicesFile.model_validate(data), models_dir)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from None
    for voice in voices.voices.values():
        if voice.reference is not None and not voice.reference.is_file():
            log.warning(
                "%s: voice %r: reference clip %s does not exist (yet)",
                path,
                voice.id,
                voice.reference,
            )
    return voices


def normalize_language(code: str) -> str:
    """en, EN, en-US and en_US all mean en."""
    return code.strip().lower().replace("_", "-").split("-")[0]


@dataclass(frozen=True)
class SpeechAbilities:
    """What a text-to-speech model can do, known from its config alone (nothing loaded)."""

    clones: bool  # imitates reference clips
    languages: frozenset[str]
    default_language: str


def speech_abilities(spec: PhysicalModel) -> SpeechAbilities:
    default = normalize_language(spec.default_language or "en")
    if spec.backend == "chatterbox" and spec.variant == "multilingual":
        return SpeechAbilities(True, MULTILINGUAL_LANGUAGES, default)
    if spec.backend == "chatterbox":  # original and turbo speak English only
        return SpeechAbilities(True, frozenset({"en"}), "en")
    return SpeechAbilities(False, frozenset({default}), default)  # piper: one voice, one language


def choose_voice(
    voices: Voices, physical_id: str, spec: PhysicalModel, voice_name: str, language: str | None
) -> tuple[Voice, str]:
    """The voice and language a request gets, or BadRequest saying what the client can send.

    Language: the request's, else the voice's (when the model speaks it), else the model's default.
    """
    abilities = speech_abilities(spec)
    voice = voices.get(voice_name)
    usable = [v.id for v in voices.voices.values() if abilities.clones or v.reference is None]
    if voice is None:
        raise BadRequest(
            f"Unknown voice {voice_name!r}. Voices: {', '.join(usable)}; OpenAI's names "
            f"({', '.join(OPENAI_VOICES)}) work too. GET /v1/audio/voices lists them.",
            param="voice",
        )
    if voice.reference is not None and not abilities.clones:
        raise BadRequest(
            f"Voice {voice_name!r} is a reference clip and model {physical_id!r} cannot clone "
            f"voices; it speaks with: {', '.join(usable)}.",
            param="voice",
        )
    if language is not None:
        chosen = normalize_language(language)
        if chosen not in abilities.languages:
            raise BadRequest(
                f"Language {language!r} is not spoken by this model; choose one of "
                f"{', '.join(sorted(abilities.languages))}.",
                param="language",
            )
    elif voice.language in abilities.languages:
        chosen = voice.language
    else:
        chosen = abilities.default_language
    return voice, chosen
