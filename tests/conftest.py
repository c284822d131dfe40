"""Shared fixtures: config directories written per test, the app in process, SDK clients."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

REPO = Path(__file__).resolve().parent.parent
TEST_KEY = "sk-test-" + "k" * 32


@pytest.fixture
def prod_config_dir(tmp_path: Path) -> Path:
    """A config dir holding the production models.yaml and a key file with one client."""
    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(REPO / "config" / "models.yaml", config / "models.yaml")
    (config / "api_keys.yaml").write_text(
        f"api_keys:\n  - key: {TEST_KEY}\n    name: test-client\n", encoding="utf-8"
    )
    return config


@pytest.fixture
def settings(prod_config_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    from llmux.settings import Settings

    return Settings(config_dir=prod_config_dir, models_dir=tmp_path / "models")


@pytest.fixture
def app(settings):  # type: ignore[no-untyped-def]
    from llmux.app import create_app

    return create_app(settings)


@pytest.fixture
def client(app) -> Iterator:  # type: ignore[no-untyped-def]
    """The official openai SDK, talking to the app in process."""
    import openai
    from starlette.testclient import TestClient

    with TestClient(app, base_url="http://llmux.test") as http:
        yield openai.OpenAI(api_key=TEST_KEY, base_url="http://llmux.test/v1", http_client=http)


MODELS_DIR = Path(os.environ.get("LLMUX_MODELS_DIR") or Path.home() / ".local/share/llmux/models")
GEMMA = MODELS_DIR / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"


def real_models(*paths: Path) -> list[pytest.MarkDecorator]:
    """Marks for a module that runs the real models `make setup` lays out: slow, and skipped
    (saying so) where they are missing, except in CI (`CI` set), where setup lays them out and a
    missing one must fail rather than quietly skip."""
    missing = [str(p) for p in paths if not p.exists()]
    return [
        pytest.mark.slow,
        pytest.mark.skipif(
            bool(missing) and not os.environ.get("CI"),
            reason=f"run `make setup`: {', '.join(missing)} missing",
        ),
    ]


def gpu_only() -> list[pytest.MarkDecorator]:
    """Marks for a module that needs a CUDA GPU: `gpu`, and skipped (saying so) without one."""
    try:
        import torch

        cuda = bool(torch.cuda.is_available())
    except ImportError:
        cuda = False
    return [pytest.mark.gpu, pytest.mark.skipif(not cuda, reason="needs a CUDA GPU")]


def write_config(config_dir: Path, models_yaml: str) -> Path:
    """A config dir with `models_yaml`, the gemma3 template and the test key."""
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "models.yaml").write_text(models_yaml, encoding="utf-8")
    (config_dir / "templates").mkdir(exist_ok=True)
    shutil.copy(REPO / "config/local/templates/gemma3.jinja", config_dir / "templates/gemma3.jinja")
    (config_dir / "api_keys.yaml").write_text(
        f"api_keys:\n  - key: {TEST_KEY}\n    name: test-client\n", encoding="utf-8"
    )
    return config_dir


def gemma_transformers() -> Path:
    """The Gemma GGUF as a transformers checkpoint, dequantized once and kept under build/ (as
    the bench keeps its Qwen): transformers dequantizes a GGUF in Python at every load, about
    80 s here, where the float32 checkpoint loads in seconds. Loading the GGUF itself is
    tested in tests/test_transformers_chat_runner.py."""
    from bench.qwen_transformers import convert_gguf

    return convert_gguf(GEMMA, REPO / "build" / "gemma3-270m-transformers")


def gemma_entry(
    gb: float = 0.5, *, tools: bool = True, backend: str = "llamacpp", converted: bool = False
) -> str:
    """A physical-model entry for the real Gemma 3 270M GGUF (laid out by `make setup`), or
    with `converted`, its transformers checkpoint (`gemma_transformers`)."""
    where = (
        f"    path: {gemma_transformers()}\n"
        if converted
        else f"    path: {GEMMA.parent}\n    model_file: {GEMMA.name}\n"
    )
    return (
        f"    type: llm\n    backend: {backend}\n{where}"
        f"    estimated_vram_gb: {gb}\n"
        f"    supports_tools: {str(tools).lower()}\n    parser: plain\n"
        f"    context_length: 2048\n    chat_template: templates/gemma3.jinja\n"
    )


class LiveServer:
    """The app under uvicorn on a free loopback port, in a thread: a real socket, so client
    disconnects are real too."""

    def __init__(self, app) -> None:  # type: ignore[no-untyped-def]
        import socket
        import threading

        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
