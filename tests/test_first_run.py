"""The first run of the embedded default, as a newcomer meets it: a key made once, and a real
`bentoml serve` that passes the smoke command (chat, speech, transcription back)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from llmux.first_run import ensure_local_key
from llmux.settings import Settings
from tests.conftest import REPO
from tests.test_serve import start_server, stop_server


def test_first_start_makes_one_key_and_later_starts_reuse_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    settings = Settings.from_env({})
    assert settings.embedded
    banner = ensure_local_key(settings)
    path = tmp_path / "llmux" / "api_keys.yaml"
    assert banner and str(path) in banner
    entry = yaml.safe_load(path.read_text())["api_keys"][0]
    key = entry["key"]
    assert entry["role"] == "admin"  # its user operates the box: llmux ps, load, unload
    assert "llmux ps" in banner
    assert f"Bearer {key}" in banner and f'api_key="{key}"' in banner  # curl and the SDK
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_local_key(Settings.from_env({})) is None  # said once
    assert yaml.safe_load(path.read_text())["api_keys"][0]["key"] == key


def test_an_explicit_config_dir_never_gets_a_key(tmp_path: Path) -> None:
    settings = Settings.from_env({"LLMUX_CONFIG_DIR": str(tmp_path)})
    assert not settings.embedded
    assert ensure_local_key(settings) is None
    assert not (tmp_path / "api_keys.yaml").exists()


@pytest.mark.slow
def test_bentoml_serve_of_the_embedded_default_passes_the_smoke_command(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    models_dir = Path(
        os.environ.get("LLMUX_MODELS_DIR") or Path.home() / ".local/share/llmux/models"
    )
    saved = os.environ.pop("LLMUX_CONFIG_DIR", None)
    try:
        proc, base, log = start_server(
            REPO / "config" / "local", tmp_path, env, embedded=True, models_dir=models_dir
        )
    finally:
        if saved is not None:
            os.environ["LLMUX_CONFIG_DIR"] = saved
    try:
        output = (tmp_path / "serve.log").read_text()
        assert "created an API key" in output and "curl -s" in output
        key_file = tmp_path / "xdg" / "llmux" / "api_keys.yaml"
        key = yaml.safe_load(key_file.read_text())["api_keys"][0]["key"]
        assert httpx.get(f"{base}/v1/models").status_code == 401
        smoke = subprocess.run(
            [sys.executable, "scripts/smoke.py", "--url", base, "--key", key, "--max-wer", "0.1"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr
        assert "round-trip word error rate" in smoke.stdout
        health = httpx.get(f"{base}/health").json()
        # The smoke ends on the main chat model after swapping to Gemma and back.
        assert set(health["loaded_models"]) == {
            "qwen2.5-coder-0.5b",
            "whisper-base",
            "piper-joe",
            "minilm-l6-v2",
        }
        for line in ("Paris", "get_weather(", "cosine(paraphrase)", "after Gemma-3-270M"):
            assert line in smoke.stdout, smoke.stdout
        metrics = httpx.get(f"{base}/metrics").text
        assert 'llmux_model_loads_total{model="gemma3-270m",outcome="ok"} 1.0' in metrics
        assert "llmux_model_load_seconds_bucket" in metrics
    finally:
        stop_server(proc, log)
