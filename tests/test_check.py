"""`llmux check`: the acceptance plan's table, against servers on fake runners (each kind of row,
passing and failing), against the host's commands faked on PATH, and against a real `bentoml
serve` of the embedded default, where it must print all 22 rows with no failure and the GPU rows
skipped for want of a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from llmux import check
from llmux.check.context import PRODUCTION_MODELS, Context, Options
from llmux.cli import main as llmux
from llmux.core.config import Registry, load_registry
from tests.conftest import MODELS_DIR, REPO, TEST_KEY, LiveServer
from tests.test_bench import ADMIN_KEY, QWEN, make_state, needs

GIB = 1024**3
GPU_ROWS = {"TST-002", "TST-020", "TST-021", "TST-022"}


def served(state: object) -> LiveServer:
    from llmux.app import create_app

    return LiveServer(create_app(state.settings, state))  # type: ignore[attr-defined]


def row(url: str, check_id: str, key: str = ADMIN_KEY, **options: object) -> check.Row:
    ctx = Context(Options(url=url, key=key, **options))  # type: ignore[arg-type]
    _, name, fn = next(entry for entry in check.PLAN if entry[0] == check_id)
    return check.run_row(ctx, check_id, name, fn)


def test_the_plan_is_tst_001_to_022_and_knows_the_production_registry() -> None:
    assert [f"TST-{n:03d}" for n in range(1, 23)] == check.IDS
    production = load_registry(REPO / "config" / "models.yaml")
    assert list(PRODUCTION_MODELS) == list(production.virtual_models)


# --- failures say why -------------------------------------------------------------------------


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[str]:
    with served(make_state(tmp_path, gpu=True)) as live:
        yield live.url


def test_a_wrong_key_fails_the_rows_that_need_one_and_says_so(
    fake_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = llmux(
        ["--url", fake_server, "--key", "sk-wrong", "check", "--only", "TST-004,TST-005"]
    )
    out = capsys.readouterr().out
    assert status == 1
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("TST-")}
    assert lines["TST-004"].split()[1] == "pass"
    assert lines["TST-005"].split()[1] == "fail" and "401: Invalid API key." in lines["TST-005"]
    assert "2 checks: 1 passed, 1 failed, 0 skipped" in out


def test_an_ordinary_key_is_told_the_admin_rows_need_an_admin_key(fake_server: str) -> None:
    failed = row(fake_server, "TST-016", key=TEST_KEY)
    assert failed.status == "fail"
    assert failed.reason.startswith("403: This key is not an admin key")
    assert "llmux keys --admin NAME" in failed.reason


def test_a_server_that_is_not_there_fails_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    url = "http://127.0.0.1:9"
    assert llmux(["--url", url, "--key", "k", "check", "--json", "--only", "TST-004,TST-013"]) == 1
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["id"], r["status"]) for r in rows] == [("TST-004", "fail"), ("TST-013", "fail")]
    assert all(r["reason"].startswith(f"nothing answers at {url}") for r in rows)


def test_an_unknown_row_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert llmux(["--url", "http://127.0.0.1:9", "check", "--only", "TST-023"]) == 2
    assert "no row TST-023" in capsys.readouterr().err


# --- GPU against CPU, through the admin benchmark ---------------------------------------------


def test_the_benchmark_rows_pass_at_5x_and_fail_below(tmp_path: Path) -> None:
    with served(make_state(tmp_path / "fast", gpu=True)) as live:
        rows = {i: row(live.url, i) for i in ("TST-020", "TST-021", "TST-022")}
    assert {i: r.status for i, r in rows.items()} == dict.fromkeys(rows, "pass")
    assert rows["TST-021"].details[0].startswith("chat: CPU ")
    assert "tokens/s), GPU " in rows["TST-021"].details[0]
    assert "s per audio second" in rows["TST-022"].details[0]
    # A "GPU" as slow as the CPU: the speed-up is about 1x, under 5x.
    with served(make_state(tmp_path / "slow", gpu=True, gpu_pause_s=0.002)) as live:
        slow = row(live.url, "TST-021")
    assert slow.status == "fail" and "x faster on the GPU" in slow.reason


def test_without_a_gpu_the_benchmark_rows_skip_unless_one_is_expected(tmp_path: Path) -> None:
    with served(make_state(tmp_path, gpu=False)) as live:
        skipped = row(live.url, "TST-021")
        expected = row(live.url, "TST-021", gpu=True)
    assert skipped.status == "skipped" and skipped.reason.startswith("no GPU")
    assert "CPU " in skipped.details[0] and "no GPU run" in skipped.details[0]
    assert expected.status == "fail" and "a GPU is expected here" in expected.reason


# --- the residency scenarios, on the production sizes -----------------------------------------

SCENARIO_REGISTRY = Registry.model_validate(
    {
        "gpu_budget_gb": 16,
        "physical_models": {
            "asr-4": {"type": "asr", "backend": "faster_whisper", "estimated_vram_gb": 4},
            "tts-2": {
                "type": "tts",
                "backend": "piper",
                "model_file": "v.onnx",
                "estimated_vram_gb": 2,
            },
            **{
                f"llm-{gb}": {
                    "type": "llm",
                    "backend": "llamacpp",
                    "model_file": "m.gguf",
                    "estimated_vram_gb": gb,
                }
                for gb in (9, 4, 13)
            },
        },
        "virtual_models": {
            "ASR": {"physical": "asr-4"},
            "TTS": {"physical": "tts-2"},
            "Qwen-4B": {"physical": "llm-4"},
            "Qwen-9B": {"physical": "llm-9"},
            "GPT-OSS": {"physical": "llm-13"},
        },
    }
)


def test_the_residency_scenarios_hold_on_the_production_sizes(tmp_path: Path) -> None:
    with served(make_state(tmp_path, gpu=False, registry=SCENARIO_REGISTRY)) as live:
        rows = {i: row(live.url, i) for i in ("TST-016", "TST-017", "TST-018", "TST-019")}
    assert {i: r.status for i, r in rows.items()} == dict.fromkeys(rows, "pass"), rows
    assert rows["TST-016"].figures.startswith("asr-4 + tts-2 + llm-4 together")
    assert rows["TST-017"].figures.startswith("llm-9 replaced llm-4")
    assert "resident: llm-13 (13.0 of 16.0 GB)" in rows["TST-018"].figures
    assert "resident: asr-4 (4.0 of 16.0 GB)" in rows["TST-019"].figures


def test_a_scenario_that_does_not_hold_fails_with_what_is_resident(tmp_path: Path) -> None:
    # A 12 GB card: ASR + TTS + the 9B no longer fit, so the 9B evicts them (an LLM may).
    small = Registry.model_validate({**SCENARIO_REGISTRY.model_dump(), "gpu_budget_gb": 12})
    with served(make_state(tmp_path, gpu=False, registry=small)) as live:
        fits = row(live.url, "TST-016")
        broken = row(live.url, "TST-017")
    assert fits.status == "pass"
    assert broken.status == "fail"
    assert broken.reason == "llm-9 replaced llm-4: asr-4, tts-2 not resident"
    assert broken.figures == "resident: llm-9 (9.0 of 12.0 GB)"


# --- the host's rows, with podman, systemctl and loginctl faked on PATH -----------------------

FAKE_PODMAN = """#!/bin/bash
echo "podman $*" >> "$FAKE_LOG"
case "$1 $2" in
  "pod exists") [ "$3" = llmux_pod ] ;;
  "image exists") [ "$3" = localhost/llmux:latest ] ;;
  "exec llmux_ctr")
    case "$3" in
      python) echo '{"torch": "2.11.0+cu128", "cuda": "12.8", "llama_offload": true,'\
' "gpu": "NVIDIA GeForce RTX 5070 Ti", "capability": [12, 0]}' ;;
      nvidia-smi) echo "GPU 0: NVIDIA GeForce RTX 5070 Ti (UUID: GPU-0)" ;;
      sh) printf '/models %s\\n/config read-only\\nmodels 9\\nmodels.yaml readable\\n'\
'api_keys.yaml readable\\n' "${FAKE_MODELS_MOUNT:-read-only}" ;;
    esac ;;
  *) exit 125 ;;
esac
"""
FAKE_SYSTEMCTL = """#!/bin/bash
echo "systemctl $*" >> "$FAKE_LOG"
case "$2" in is-enabled) echo enabled ;; is-active) echo "${FAKE_ACTIVE:-active}" ;; esac
"""
FAKE_LOGINCTL = """#!/bin/bash
echo "loginctl $*" >> "$FAKE_LOG"
echo Linger=yes
"""


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fakes first on PATH; returns their log of calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (
        ("podman", FAKE_PODMAN),
        ("systemctl", FAKE_SYSTEMCTL),
        ("loginctl", FAKE_LOGINCTL),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("USER", "llm")
    return log


def test_the_pods_rows_look_inside_the_container(host: Path, fake_server: str) -> None:
    rows = {i: row(fake_server, i) for i in ("TST-001", "TST-002", "TST-003", "TST-007")}
    assert {i: r.status for i, r in rows.items()} == dict.fromkeys(rows, "pass"), rows
    assert "torch 2.11.0+cu128 (CUDA 12.8), llama.cpp GPU offload yes" in rows["TST-001"].figures
    assert rows["TST-002"].figures.startswith(
        "NVIDIA GeForce RTX 5070 Ti (compute capability 12.0)"
    )
    assert "/models (9 entries) and /config read-only" in rows["TST-003"].figures
    assert "Linger=yes" in rows["TST-007"].figures
    calls = host.read_text()
    assert "podman image exists localhost/llmux:latest" in calls
    assert "podman exec llmux_ctr python -c" in calls
    assert "systemctl --user is-enabled pod-llmux_pod.service" in calls
    assert "loginctl show-user llm --property=Linger" in calls


def test_a_writable_mount_and_a_stopped_unit_fail(
    host: Path, fake_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MODELS_MOUNT", "writable")
    monkeypatch.setenv("FAKE_ACTIVE", "failed")
    assert row(fake_server, "TST-003").reason == "/models is writable"
    units = row(fake_server, "TST-007")
    assert units.status == "fail"
    assert "pod-llmux_pod.service is failed" in units.reason


def test_without_the_pod_its_rows_skip_and_production_fails_them(
    host: Path, fake_server: str
) -> None:
    other = {"pod": "another_pod"}
    skipped = row(fake_server, "TST-001", **other)
    assert skipped.status == "skipped"
    assert skipped.reason.startswith("no pod another_pod on this host")
    on_the_box = row(fake_server, "TST-001", production=True, **other)
    assert on_the_box.status == "fail" and on_the_box.reason == skipped.reason


# --- the command on the host, and against the real embedded default ---------------------------


def test_llmux_check_needs_only_the_commands_declared_dependencies(tmp_path: Path) -> None:
    from tests.test_build_image import ONLY_DECLARED

    (tmp_path / "sitecustomize.py").write_text(ONLY_DECLARED)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}", "HOME": str(tmp_path)}
    ran = subprocess.run(
        [sys.executable, "-m", "llmux.cli", "--url", "http://127.0.0.1:9", "--key", "k", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 1, ran.stderr  # every row fails: nothing answers; imports were fine
    assert "22 checks: 0 passed" in ran.stdout


@needs(QWEN)
def test_llmux_check_against_the_embedded_default(tmp_path: Path) -> None:
    from tests.test_serve import start_server, stop_server

    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    saved = os.environ.pop("LLMUX_CONFIG_DIR", None)
    try:
        proc, base, log = start_server(
            REPO / "config" / "local", tmp_path, env, embedded=True, models_dir=MODELS_DIR
        )
    finally:
        if saved is not None:
            os.environ["LLMUX_CONFIG_DIR"] = saved
    try:
        # The console script, with the key found as an operator's would be: the embedded
        # default's key file (an admin key).
        ran = subprocess.run(
            [str(Path(sys.executable).parent / "llmux"), "--url", base, "check", "--json"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        stop_server(proc, log)
    rows = {r["id"]: r for r in json.loads(ran.stdout)["rows"]}
    assert list(rows) == check.IDS
    assert ran.returncode == 0, [r for r in rows.values() if r["status"] == "fail"]
    passing = {i for i, r in rows.items() if r["status"] == "pass"}
    assert passing >= {
        "TST-004", "TST-008", "TST-009", "TST-010", "TST-011", "TST-012", "TST-013", "TST-015",
        "TST-016", "TST-017",
    }  # fmt: skip
    assert "3/3 answered" in rows["TST-009"]["figures"]
    assert "get_weather" in rows["TST-015"]["details"][0]
    for check_id in ("TST-005", "TST-014", "TST-018", "TST-019"):
        assert rows[check_id]["status"] == "skipped", rows[check_id]
    assert rows["TST-005"]["reason"].startswith("not the production registry")
    assert rows["TST-018"]["reason"].startswith("not in this registry")
    if shutil.which("nvidia-smi") is None:
        for check_id in GPU_ROWS:
            assert rows[check_id]["status"] == "skipped", rows[check_id]
            assert rows[check_id]["reason"].startswith("no GPU"), rows[check_id]
    else:  # a GPU here: the rows ran both halves, whatever this stack makes of them
        for check_id in GPU_ROWS - {"TST-002"}:
            assert rows[check_id]["status"] != "skipped", rows[check_id]
    # The CPU half ran for real: figures for every benchmarked model.
    assert [d.split(":")[0] for d in rows["TST-021"]["details"]] == [
        "qwen2.5-coder-0.5b",
        "gemma3-270m",
    ]
    assert all("tokens/s" in d for d in rows["TST-021"]["details"])
    assert "minilm-l6-v2: CPU" in rows["TST-020"]["details"][0]
    assert "s per audio second" in rows["TST-022"]["details"][0]
    key_file = tmp_path / "xdg" / "llmux" / "api_keys.yaml"
    assert yaml.safe_load(key_file.read_text())["api_keys"][0]["role"] == "admin"


def test_the_deploy_guide_maps_every_row_to_its_line_of_output() -> None:
    guide = (REPO / "docs" / "deploy.md").read_text()
    section = guide[guide.index("## 12. Check it: `llmux check`") :]
    for check_id, name, _ in check.PLAN:
        assert f"| `{check_id} {name}` |" in section, check_id
    assert "llmux check --production" in section
