"""The operator's handles: /admin/ (admin keys only) and the `llmux` command over it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from llmux.cli import main as llmux
from llmux.core.config import Registry
from llmux.keys import KeyRing
from llmux.services.chat import ChatService
from llmux.settings import Settings
from llmux.state import AppState
from llmux_policy.executor import Residency
from tests.conftest import TEST_KEY, LiveServer, write_config
from tests.runner_fakes import ParkingRecordingRunner, RecordingRunner

GIB = 1024**3
ADMIN_KEY = "sk-llmux-admin-key-for-the-tests"
REGISTRY = Registry.model_validate(
    {
        "physical_models": {
            "llm-a": {
                "type": "llm",
                "backend": "llamacpp",
                "model_file": "a.gguf",
                "estimated_vram_gb": 6,
            },
            "llm-b": {
                "type": "llm",
                "backend": "llamacpp",
                "model_file": "b.gguf",
                "estimated_vram_gb": 6,
            },
            "ears": {"type": "asr", "backend": "faster_whisper", "estimated_vram_gb": 4},
            "big-voice": {"type": "tts", "backend": "piper", "estimated_vram_gb": 13},
        },
        "virtual_models": {
            "A": {"physical": "llm-a"},
            "B": {"physical": "llm-b"},
            "Ears": {"physical": "ears"},
            "Big-Voice": {"physical": "big-voice"},
        },
    }
)


def fake_runner(physical_id: str, log: list[tuple[str, str]]) -> RecordingRunner:
    return RecordingRunner(physical_id, lambda what, pid: log.append((what, pid)))


@pytest.fixture
def state(tmp_path: Path) -> AppState:
    return make_state(tmp_path)


def make_state(tmp_path: Path, *, host_budget: int = 0) -> AppState:
    """The app's state over fake runners; with a host budget they park (the warm tier)."""
    config = write_config(tmp_path / "config", "physical_models: {}\nvirtual_models: {}\n")
    (config / "api_keys.yaml").write_text(
        f"api_keys:\n  - {{key: {TEST_KEY}, name: test-client}}\n"
        f"  - {{key: {ADMIN_KEY}, name: operator, role: admin}}\n"
    )
    settings = Settings(config_dir=config, models_dir=tmp_path)
    log: list[tuple[str, str]] = []

    def runner(physical_id: str) -> RecordingRunner:
        if not host_budget:
            return fake_runner(physical_id, log)
        return ParkingRecordingRunner(physical_id, lambda what, pid: log.append((what, pid)))

    residency = Residency(REGISTRY, runner, 16 * GIB, host_budget_bytes=host_budget)
    made = AppState(
        settings=settings,
        registry=REGISTRY,
        keys=KeyRing.load(settings.api_keys_file),
        residency=residency,
        chat=ChatService(REGISTRY, residency),
    )
    made.calls = log  # type: ignore[attr-defined]
    return made


@pytest.fixture
def http(state: AppState) -> Iterator[TestClient]:
    from llmux.app import create_app

    with TestClient(create_app(state.settings, state), base_url="http://llmux.test") as client:
        yield client


def admin(http: TestClient, method: str, path: str, key: str | None = ADMIN_KEY) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http.request(method, path, headers=headers)


def test_ordinary_keys_cannot_reach_admin(http: TestClient) -> None:
    assert admin(http, "GET", "/admin/models", key=None).status_code == 401
    refused = admin(http, "GET", "/admin/models", key=TEST_KEY)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "admin_key_required"
    assert admin(http, "POST", "/admin/models/A/load", key=TEST_KEY).status_code == 403
    assert admin(http, "GET", "/admin/nope", key=TEST_KEY).status_code == 403  # 403 before 404
    assert admin(http, "GET", "/admin/nope").status_code == 404


def test_load_list_and_unload_through_the_residency_rules(
    http: TestClient, state: AppState
) -> None:
    loaded = admin(http, "POST", "/admin/models/A/load")  # a virtual name works
    assert loaded.status_code == 200 and loaded.json()["model"]["where"] == "gpu"
    assert admin(http, "POST", "/admin/models/ears/load").status_code == 200
    rows = {m["id"]: m for m in admin(http, "GET", "/admin/models").json()["models"]}
    assert rows["llm-a"]["state"] == "ready" and rows["llm-a"]["names"] == ["A"]
    assert rows["llm-b"]["where"] == "disk"
    # Loading B replaces A (one LLM at a time), as a request would.
    admin(http, "POST", "/admin/models/B/load")
    assert {m["physical_id"] for m in state.residency.snapshot()["models"]} == {"llm-b", "ears"}
    # A TTS that would need ASR gone is refused with the planner's reason, as a 409.
    refused = admin(http, "POST", "/admin/models/Big-Voice/load")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_does_not_fit"
    assert admin(http, "POST", "/admin/models/llm-b/unload").json() == {"unloaded": ["llm-b"]}
    assert admin(http, "POST", "/admin/models/llm-b/unload").json() == {"unloaded": []}
    assert admin(http, "POST", "/admin/unload-all").json() == {"unloaded": ["ears"]}
    assert state.residency.snapshot()["models"] == []
    assert admin(http, "POST", "/admin/models/nope/load").status_code == 404


def test_warm_models_show_on_the_host_and_unload_all_drops_them_too(tmp_path: Path) -> None:
    from llmux.app import create_app

    state = make_state(tmp_path, host_budget=8 * GIB)
    with TestClient(create_app(state.settings, state), base_url="http://llmux.test") as http:
        admin(http, "POST", "/admin/models/A/load")
        admin(http, "POST", "/admin/models/B/load")  # A parks in host memory
        rows = {m["id"]: m for m in admin(http, "GET", "/admin/models").json()["models"]}
        assert (rows["llm-a"]["where"], rows["llm-b"]["where"]) == ("host", "gpu")
        assert rows["ears"]["where"] == "disk"
        health = http.get("/health").json()
        assert health["warm_models"]["llm-a"]["host_bytes"] == GIB
        assert (health["host_budget_bytes"], health["host_used_bytes"]) == (8 * GIB, GIB)

        unloaded = admin(http, "POST", "/admin/unload-all").json()["unloaded"]

        assert sorted(unloaded) == ["llm-a", "llm-b"]
        assert state.calls[-2:] == [("unload", "llm-b"), ("unload", "llm-a")]  # type: ignore[attr-defined]
        assert http.get("/health").json()["warm_models"] == {}


async def test_unload_waits_for_requests_in_flight_then_reports_busy(state: AppState) -> None:
    from llmux_policy.executor import ModelBusy

    held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with state.residency.use("llm-a"):
            held.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await held.wait()
    with pytest.raises(ModelBusy) as info:
        await state.residency.unload("llm-a", wait_s=0.1)
    assert info.value.status == 409
    assert ("unload", "llm-a") not in state.calls  # type: ignore[attr-defined]
    unloading = asyncio.create_task(state.residency.unload("llm-a", wait_s=5))
    await asyncio.sleep(0.05)
    release.set()
    assert await unloading is True
    await holder
    await state.residency.close()


@pytest.fixture
def server(state: AppState) -> Iterator[LiveServer]:
    from llmux.app import create_app

    with LiveServer(create_app(state.settings, state)) as live:
        yield live


def test_the_llmux_command(server: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--url", server.url, "--key", ADMIN_KEY]
    assert llmux([*base, "load", "A"]) == 0
    assert "llm-a is resident (6.0 GB)" in capsys.readouterr().out
    assert llmux([*base, "ps"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "TYPE", "SIZE", "WHERE", "IN", "FLIGHT", "LAST", "USED"]
    row = next(line for line in table if line.startswith("llm-a"))
    assert row.split()[:5] == ["llm-a", "llm", "6.0", "GB", "gpu"]
    assert llmux([*base, "unload", "--all"]) == 0
    assert "unloaded: llm-a" in capsys.readouterr().out
    # Exit codes a script can use: the key refused, the server down, the server refused.
    assert llmux(["--url", server.url, "--key", TEST_KEY, "ps"]) == 4
    assert "403" in capsys.readouterr().err
    assert llmux(["--url", "http://127.0.0.1:9", "--key", ADMIN_KEY, "ps"]) == 3
    assert "cannot reach llmux" in capsys.readouterr().err
    assert llmux([*base, "load", "Ears"]) == 0
    capsys.readouterr()
    assert llmux([*base, "load", "Big-Voice"]) == 1  # would need ASR gone: the plan refuses
    assert "409" in capsys.readouterr().err


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "llmux"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ps" in result.stdout and "unload" in result.stdout


# --- preloading and the idle TTL ----------------------------------------------------------------


def test_preload_loads_in_order_after_start_up_without_blocking_health(
    state: AppState, tmp_path: Path
) -> None:
    from llmux.app import create_app

    registry = Registry.model_validate({**REGISTRY.model_dump(), "preload": ["ears", "llm-a"]})
    state.registry = registry
    state.residency._registry = registry  # the same registry the executor plans with
    with TestClient(create_app(state.settings, state), base_url="http://llmux.test") as http:
        assert http.get("/health").status_code == 200
        for _ in range(200):
            if {m["physical_id"] for m in state.residency.snapshot()["models"]} == {
                "ears",
                "llm-a",
            }:
                break
            time.sleep(0.02)
    assert state.calls[:2] == [("load", "ears"), ("load", "llm-a")]  # type: ignore[attr-defined]


def test_a_preload_of_an_unknown_model_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="preload: 'nope' is not a physical model"):
        Registry.model_validate({**REGISTRY.model_dump(), "preload": ["nope"]})


async def test_the_idle_ttl_unloads_a_model_idle_that_long_never_one_in_use() -> None:
    now = [1000.0]
    log: list[tuple[str, str]] = []
    data = REGISTRY.model_dump()
    data["physical_models"]["llm-a"]["idle_ttl_s"] = 60
    data["physical_models"]["llm-b"]["idle_ttl_s"] = 60
    registry = Registry.model_validate(data)
    residency = Residency(
        registry, lambda pid: fake_runner(pid, log), 16 * GIB, clock=lambda: now[0]
    )
    watcher = asyncio.create_task(residency.unload_idle(every_s=0.01))
    try:
        async with residency.use("ears"):
            pass  # no TTL of its own, none global: it stays
        async with residency.use("llm-a"):
            now[0] += 120  # idle time passes while it is in use: it must stay
            await asyncio.sleep(0.05)
            assert ("unload", "llm-a") not in log
        await asyncio.sleep(0.05)
        assert ("unload", "llm-a") not in log  # used just now: its idle time starts again
        now[0] += 61
        await asyncio.wait_for(
            residency.wait_until(
                lambda snap: [m["physical_id"] for m in snap["models"]] == ["ears"]
            ),
            5,
        )
        assert ("unload", "llm-a") in log
    finally:
        watcher.cancel()
        await residency.close()
