"""Process settings, read once from the environment.

The embedded default (`config/local`, real small models from PyPI) is what runs when nothing is set;
production points `LLMUX_CONFIG_DIR` at the mounted `/config` and `LLMUX_MODELS_DIR` at `/models`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
EMBEDDED_CONFIG_DIR = REPO_DIR / "config" / "local"
MIB = 1024 * 1024

# The flags llmux is served with (`make serve`, the image's CMD, the tests, the soak, the bench).
# An idle keep-alive connection is held 75 s (uvicorn's default is 5 s): a client reuses a pooled
# connection for up to its own idle expiry (httpx and the openai SDK 5 s, aiohttp and so Open
# WebUI 15 s), and a server that closes one at the same moment as the client sends on it loses
# that request ("Server disconnected without sending a response"; the openai SDK retries it,
# `max_retries=0` and most other clients do not). The server must outlast the clients' expiry.
SERVE_FLAGS = ("--timeout-keep-alive", "75")


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def _config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def _env_float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def _env_bool(env: dict[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    config_dir: Path = EMBEDDED_CONFIG_DIR
    models_dir: Path = field(default_factory=lambda: _data_home() / "llmux" / "models")
    # Bodies over this are refused with 413 before they are read whole.
    max_body_bytes: int = 50 * MIB
    # Speech-to-text uploads: files over max_audio_bytes get 413, audio over max_audio_seconds 400.
    max_audio_bytes: int = 25 * MIB
    max_audio_seconds: float = 30 * 60
    # Origins allowed to call the API from a browser (CORS); "*" allows any.
    cors_origins: tuple[str, ...] = ("*",)
    # Text-to-speech: the longest `input` accepted, in characters (OpenAI's limit is 4096).
    tts_max_input_chars: int = 4096
    # Serve GET /v1/audio/voices and /v1/audio/models without a key (Open WebUI asks without one).
    open_audio_discovery: bool = False
    # A streaming client that reads nothing for this long is disconnected (its model was let go
    # of when its generation ended; this frees the connection).
    stream_stall_s: float = 30.0
    # At shutdown, generations still running after this long are cancelled.
    shutdown_grace_s: float = 10.0

    @property
    def models_file(self) -> Path:
        return self.config_dir / "models.yaml"

    # True when LLMUX_CONFIG_DIR is unset: the embedded default, whose config lives in the
    # repository, so its key file goes to the user's config dir and is made on first start.
    embedded: bool = False

    @property
    def api_keys_file(self) -> Path:
        if self.embedded:
            return _config_home() / "llmux" / "api_keys.yaml"
        return self.config_dir / "api_keys.yaml"

    @property
    def voices_file(self) -> Path:
        return self.config_dir / "voices.yaml"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        defaults = cls()
        origins = env.get("LLMUX_CORS_ORIGINS")
        return cls(
            config_dir=Path(env.get("LLMUX_CONFIG_DIR") or defaults.config_dir).expanduser(),
            embedded=not env.get("LLMUX_CONFIG_DIR"),
            models_dir=Path(env.get("LLMUX_MODELS_DIR") or defaults.models_dir).expanduser(),
            max_body_bytes=int(_env_float(env, "LLMUX_MAX_BODY_MB", 50) * MIB),
            max_audio_bytes=int(_env_float(env, "LLMUX_MAX_AUDIO_MB", 25) * MIB),
            max_audio_seconds=_env_float(env, "LLMUX_MAX_AUDIO_MINUTES", 30) * 60,
            cors_origins=tuple(o.strip() for o in origins.split(",") if o.strip())
            if origins is not None
            else defaults.cors_origins,
            tts_max_input_chars=int(_env_float(env, "LLMUX_TTS_MAX_INPUT_CHARS", 4096)),
            open_audio_discovery=_env_bool(env, "LLMUX_OPEN_AUDIO_DISCOVERY"),
            stream_stall_s=_env_float(env, "LLMUX_STREAM_STALL_S", 30),
            shutdown_grace_s=_env_float(env, "LLMUX_SHUTDOWN_GRACE_S", 10),
        )
