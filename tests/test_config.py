"""models.yaml and api_keys.yaml: every mistake stops start-up with the file, entry and field."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmux.core.config import ConfigError, load_registry
from llmux.keys import KeyRing, write_key_file
from llmux.keys import main as keys_main
from tests.conftest import REPO


def test_production_registry_has_nine_physical_and_sixteen_virtual_models() -> None:
    registry = load_registry(REPO / "config" / "models.yaml")
    assert len(registry.physical_models) == 9
    assert len(registry.virtual_models) == 16
    assert registry.gpu_budget_gb == 16
    by_type = {
        t: {p for p, m in registry.physical_models.items() if m.type == t}
        for t in ("llm", "asr", "tts")
    }
    assert len(by_type["llm"]) == 5 and by_type["asr"] == {"cohere-transcribe"}
    assert len(by_type["tts"]) == 3
    thinking = {
        n: v.params.enable_thinking
        for n, v in registry.virtual_models.items()
        if v.params.enable_thinking is not None
    }
    assert thinking == {
        "Qwen3.5-9B-FP8-Thinking": True,
        "Qwen3.5-9B-FP8-Instruct": False,
        "Qwen3.5-9B-FP8-Uncensored-Thinking": True,
        "Qwen3.5-9B-FP8-Uncensored-Instruct": False,
        "Qwen3.5-4B-Thinking": True,
        "Qwen3.5-4B-Instruct": False,
    }
    efforts = {
        n: v.params.reasoning_effort
        for n, v in registry.virtual_models.items()
        if v.params.reasoning_effort
    }
    assert len(efforts) == 6
    assert all(n.lower().endswith(e) for n, e in efforts.items())
    uncensored = registry.physical_models["qwen3.5-9b-fp8-uncensored"]
    assert uncensored.backend == "llamacpp" and uncensored.mmproj_file


def test_embedded_default_registry_is_valid() -> None:
    registry = load_registry(REPO / "config" / "local" / "models.yaml")
    types = [m.type for m in registry.physical_models.values()]
    assert sorted(set(types)) == ["asr", "embedding", "llm", "tts"]
    assert types.count("llm") == 2  # two LLMs to swap between
    chat_id = "qwen2.5-coder-0.5b"
    chat = registry.physical_models[chat_id]
    assert chat.supports_tools and chat.output_parser(chat_id) == "qwen2.5"
    # A second virtual model on the main chat model: behaviour without another load.
    on_qwen = [n for n, v in registry.virtual_models.items() if v.physical == chat_id]
    assert on_qwen == ["Qwen2.5-Coder-0.5B", "Qwen2.5-Coder-0.5B-Terse"]


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def valid() -> dict:  # type: ignore[type-arg]
    return {
        "physical_models": {
            "small": {
                "type": "llm",
                "backend": "llamacpp",
                "model_file": "m.gguf",
                "estimated_vram_gb": 1,
            },
        },
        "virtual_models": {"Small": {"physical": "small", "params": {"enable_thinking": False}}},
    }


def error_for(tmp_path: Path, data: object) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_registry(path)
    message = str(caught.value)
    assert str(path) in message
    return message


def test_valid_file_loads(tmp_path: Path) -> None:
    assert load_registry(write(tmp_path, valid())).resolve("Small")[0] == "small"  # type: ignore[index]


def test_unknown_key_names_entry_and_field(tmp_path: Path) -> None:
    data = valid()
    data["physical_models"]["small"]["estimated_vram"] = 3
    message = error_for(tmp_path, data)
    assert "physical_models.small.estimated_vram: unknown field" in message


def test_wrong_type_names_entry_and_field(tmp_path: Path) -> None:
    data = valid()
    data["physical_models"]["small"]["estimated_vram_gb"] = "lots"
    assert "physical_models.small.estimated_vram_gb" in error_for(tmp_path, data)


def test_a_batch_cache_of_fewer_than_two_contexts_is_refused(tmp_path: Path) -> None:
    """With sliding-window layers, one context's pages can hold less than one full-length
    request, and a lone request that cannot fit stops transformers' batch loop."""
    data = valid()
    data["physical_models"]["small"].update(backend="transformers", model_id="org/small")
    data["physical_models"]["small"].pop("model_file")
    data["physical_models"]["small"]["batch_cache_contexts"] = 1
    assert "physical_models.small.batch_cache_contexts" in error_for(tmp_path, data)
    data["physical_models"]["small"]["batch_cache_contexts"] = 3
    physical = load_registry(write(tmp_path, data)).physical_models["small"]
    assert physical.batch_cache_contexts == 3


def test_virtual_pointing_at_missing_physical(tmp_path: Path) -> None:
    data = valid()
    data["virtual_models"]["Ghost"] = {"physical": "nowhere"}
    message = error_for(tmp_path, data)
    assert "virtual_models.Ghost.physical" in message and "nowhere" in message


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    text = yaml.safe_dump(valid()) + ""
    text = text.replace("virtual_models:\n", "virtual_models:\n  Small:\n    physical: small\n")
    assert "duplicate name 'Small'" in error_for(tmp_path, text)


def test_backend_that_does_not_exist(tmp_path: Path) -> None:
    data = valid()
    data["physical_models"]["small"]["backend"] = "vllm"
    message = error_for(tmp_path, data)
    assert "physical_models.small" in message and "'vllm' does not exist" in message


def test_backend_that_cannot_serve_the_type(tmp_path: Path) -> None:
    data = valid()
    data["physical_models"]["small"]["type"] = "tts"
    assert "cannot serve type 'tts'" in error_for(tmp_path, data)


def test_bad_virtual_param_value(tmp_path: Path) -> None:
    data = valid()
    data["virtual_models"]["Small"]["params"] = {"reasoning_effort": "extreme"}
    assert "virtual_models.Small.params.reasoning_effort" in error_for(tmp_path, data)


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    assert "not valid YAML" in error_for(tmp_path, "physical_models: [unclosed")
    with pytest.raises(ConfigError, match="cannot read"):
        load_registry(tmp_path / "absent.yaml")


def test_service_refuses_to_start_on_a_bad_file(tmp_path: Path) -> None:
    data = valid()
    data["physical_models"]["small"]["colour"] = "blue"
    write(tmp_path, data)
    result = subprocess.run(
        [sys.executable, "-c", "import service"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"LLMUX_CONFIG_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=120,
    )
    assert result.returncode == 1
    assert "configuration error" in result.stderr
    assert "physical_models.small.colour: unknown field" in result.stderr
    assert "Traceback" not in result.stderr


# --- API keys -----------------------------------------------------------------------------------


def test_key_generator_writes_0600_and_never_overwrites(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "conf" / "api_keys.yaml"
    assert keys_main(["--out", str(path), "open-webui", "opencode"]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = KeyRing.load(path)
    entries = yaml.safe_load(path.read_text())["api_keys"]
    assert [e["name"] for e in entries] == ["open-webui", "opencode"]
    assert all(len(e["key"]) >= 40 for e in entries)
    assert len({e["key"] for e in entries}) == 2
    assert ring.client_for(entries[1]["key"]) == "opencode"
    assert ring.client_for(entries[1]["key"] + "x") is None

    before = path.read_text()
    assert keys_main(["--out", str(path), "someone"]) == 1
    assert "--force" in capsys.readouterr().err
    assert path.read_text() == before

    path.chmod(0o644)
    assert keys_main(["--out", str(path), "--force", "someone"]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert KeyRing.load(path).client_for(entries[0]["key"]) is None


def test_default_clients(tmp_path: Path) -> None:
    keys = write_key_file(tmp_path / "k.yaml", ["open-webui", "whisper-clients", "opencode"])
    assert set(keys) == {"open-webui", "whisper-clients", "opencode"}


def test_key_file_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "api_keys.yaml"
    path.write_text("api_keys:\n  - key: short\n    name: a\n")
    with pytest.raises(ConfigError, match=r"api_keys\.0\.key"):
        KeyRing.load(path)
    path.write_text(
        "api_keys:\n  - {key: aaaaaaaaaaaaaaaaaaaa, name: a}\n"
        "  - {key: bbbbbbbbbbbbbbbbbbbb, name: a}\n"
    )
    with pytest.raises(ConfigError, match="duplicate client names"):
        KeyRing.load(path)


def test_missing_key_file_is_an_empty_ring(tmp_path: Path) -> None:
    ring = KeyRing.load(tmp_path / "api_keys.yaml")
    assert ring.empty and ring.client_for("anything") is None
