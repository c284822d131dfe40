"""The operations scripts, run against fake podman, systemctl, curl, hf, nvidia-ctk and loginctl.

The fakes (tests/fakes/) come first on PATH, append their argv to a log (one line per call, fields
separated by tabs) and keep state in files, so a second run sees what the first one made.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from llmux.core.config import load_registry

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
FAKES = Path(__file__).resolve().parent / "fakes"
REGISTRY = ROOT / "config" / "models.yaml"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
FAKE_NAMES = ("podman", "systemctl", "curl", "hf", "nvidia-ctk", "loginctl", "journalctl")

IMAGE = "localhost/llmux:latest"
POD_UNIT = "pod-llmux_pod.service"
CTR_UNIT = "container-llmux_ctr.service"
GATED_REPO = "CohereLabs/cohere-transcribe-03-2026"


@dataclass
class Host:
    """A pretend host: HOME, weights, config and the fakes' state under tmp_path."""

    root: Path
    env: dict[str, str]

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def models(self) -> Path:
        return self.home / ".local/share/llmux_pod/models"

    @property
    def config(self) -> Path:
        return self.home / ".local/share/llmux_pod/config"

    @property
    def state(self) -> Path:
        return Path(self.env["FAKE_STATE"])

    @property
    def units(self) -> Path:
        return self.home / ".config/systemd/user"

    def run(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPTS / script), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def calls(self) -> list[list[str]]:
        """Every recorded call since the last reset, as argv lists."""
        log = Path(self.env["FAKE_LOG"])
        if not log.exists():
            return []
        return [line.split("\t") for line in log.read_text().splitlines()]

    def reset_log(self) -> None:
        Path(self.env["FAKE_LOG"]).unlink(missing_ok=True)

    def set_state(self, name: str, content: str = "") -> None:
        (self.state / name).write_text(content)


def make_host(tmp_path: Path, without: tuple[str, ...] = ()) -> Host:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "_record.sh").symlink_to(FAKES / "_record.sh")
    for name in FAKE_NAMES:
        if name not in without:
            (bin_dir / name).symlink_to(FAKES / name)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LLMUX_", "HF_", "XDG_", "FAKE_"))
    }
    env.update(
        HOME=str(tmp_path / "home"),
        # Only system directories after the fakes, so no real podman, hf... is ever reached.
        PATH=f"{bin_dir}:{SYSTEM_PATH}",
        FAKE_LOG=str(tmp_path / "calls.log"),
        FAKE_STATE=str(tmp_path / "state"),
        XDG_RUNTIME_DIR=str(tmp_path / "run"),
        LLMUX_USER=getpass.getuser(),
        LLMUX_PYTHON=sys.executable,
        LLMUX_HEALTH_TIMEOUT="0",
        LLMUX_HEALTH_INTERVAL="0",
        LLMUX_CDI_SPEC_DIRS=str(tmp_path / "cdi"),
    )
    host = Host(tmp_path, env)
    host.state.mkdir()
    host.config.mkdir(parents=True)
    shutil.copy(REGISTRY, host.config / "models.yaml")
    return host


@pytest.fixture
def pod_host(tmp_path: Path) -> Host:
    """A host ready for create_pod_llmux.sh: weights, config, image, CDI spec, linger."""
    host = make_host(tmp_path)
    (host.models / "qwen3.5-4b").mkdir(parents=True)
    keys = host.config / "api_keys.yaml"
    keys.write_text("- {key: sk-test, name: openwebui}\n")
    keys.chmod(0o600)
    host.set_state("images", IMAGE + "\n")
    host.set_state("linger")
    return host


@pytest.fixture
def dl_host(tmp_path: Path) -> Host:
    """A host ready for download_models.sh: registry in the config dir, a token."""
    host = make_host(tmp_path)
    token = host.home / ".cache/huggingface/token"
    token.parent.mkdir(parents=True)
    token.write_text("hf_test\n")
    # The disk check reads this instead of df: the fakes write kilobytes, not the registry's
    # gigabytes, so the real free space of whatever disk runs the tests must not decide them.
    host.env["LLMUX_FREE_KB"] = str(1024 * 1024 * 1024)  # 1 TB
    return host


def only(calls: list[list[str]], *prefix: str) -> list[list[str]]:
    return [call for call in calls if call[: len(prefix)] == list(prefix)]


def position(calls: list[list[str]], *prefix: str) -> int:
    """Index of the first call starting with prefix (fails the test if there is none)."""
    for index, call in enumerate(calls):
        if call[: len(prefix)] == list(prefix):
            return index
    raise AssertionError(f"no call {' '.join(prefix)!r} in {calls}")


# --- shellcheck -----------------------------------------------------------------------------------


FAKE_SCRIPTS = sorted(p for p in FAKES.iterdir() if p.name in FAKE_NAMES or p.suffix == ".sh")
SHELL_SCRIPTS = [*sorted(SCRIPTS.glob("*.sh")), ROOT / "deploy/image/build_bento.sh", *FAKE_SCRIPTS]


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed (apt-get install -y shellcheck)",
)
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_shellcheck_clean(script: Path) -> None:
    result = subprocess.run(
        ["shellcheck", "--external-sources", str(script.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


OPERATIONS_SCRIPTS = ("create_pod_llmux.sh", "download_models.sh")


def test_scripts_are_strict_and_have_help(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    for script in (SCRIPTS / name for name in OPERATIONS_SCRIPTS):
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script.name
        assert "\nset -euo pipefail\n" in text, script.name
        result = host.run(script.name, "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Usage:"), script.name
    assert host.calls() == []


# --- create_pod_llmux.sh --------------------------------------------------------------------------


def test_first_run_creates_the_pod_hands_it_to_systemd_and_waits_for_health(pod_host: Host) -> None:
    result = pod_host.run("create_pod_llmux.sh")
    assert result.returncode == 0, result.stderr
    calls = pod_host.calls()

    assert only(calls, "podman", "pod", "create") == [
        ["podman", "pod", "create", "--name", "llmux_pod", "--publish", "127.0.0.1:8081:8081"]
    ]
    assert only(calls, "podman", "create") == [
        [
            "podman", "create", "--pod", "llmux_pod", "--name", "llmux_ctr",
            "--stop-timeout", "30",
            "--user", "0:0",
            "--device", "nvidia.com/gpu=all",
            "--volume", f"{pod_host.models}:/models:ro",
            "--volume", f"{pod_host.config}:/config:ro",
            "--env", "LLMUX_CONFIG_DIR=/config",
            "--env", "LLMUX_MODELS_DIR=/models",
            IMAGE,
        ]
    ]  # fmt: skip
    assert only(calls, "podman", "generate") == [
        ["podman", "generate", "systemd", "--new", "--files", "--no-header", "--name", "llmux_pod"]
    ]
    assert only(calls, "systemctl", "--user", "daemon-reload") == [
        ["systemctl", "--user", "daemon-reload"]
    ]
    assert only(calls, "systemctl", "--user", "enable") == [
        ["systemctl", "--user", "enable", POD_UNIT]
    ]
    assert only(calls, "curl") == [
        ["curl", "--fail", "--silent", "--show-error", "--max-time", "5",
         "http://127.0.0.1:8081/health"]
    ]  # fmt: skip

    # Prerequisites first; the manual pod only seeds the units; systemd runs the real one.
    assert position(calls, "podman", "image", "exists", IMAGE) < position(
        calls, "podman", "pod", "create"
    )
    assert position(calls, "nvidia-ctk", "cdi", "list") < position(calls, "podman", "pod", "create")
    assert (
        position(calls, "podman", "create")
        < position(calls, "podman", "generate")
        < position(calls, "systemctl", "--user", "daemon-reload")
        < position(calls, "systemctl", "--user", "enable")
        < position(calls, "podman", "pod", "rm", "--force", "llmux_pod")
        < position(calls, "systemctl", "--user", "restart", POD_UNIT)
        < position(calls, "curl")
    )
    for unit in (POD_UNIT, CTR_UNIT):
        assert (pod_host.units / unit).read_text().startswith("[Unit]")
    assert "enable-linger" not in result.stderr  # linger is on in this fixture


def test_second_run_changes_nothing(pod_host: Host) -> None:
    assert pod_host.run("create_pod_llmux.sh").returncode == 0
    unit_files = {unit: (pod_host.units / unit).stat().st_mtime_ns for unit in (POD_UNIT, CTR_UNIT)}
    pod_host.reset_log()

    result = pod_host.run("create_pod_llmux.sh")
    assert result.returncode == 0, result.stderr
    assert "leaving it as it is" in result.stdout
    calls = pod_host.calls()
    mutating = [
        call
        for call in calls
        if call[:2] in (["podman", "create"], ["podman", "generate"])
        or call[:3] in (["podman", "pod", "create"], ["podman", "pod", "rm"])
        or (call[0] == "systemctl" and call[2] in ("daemon-reload", "enable", "start", "restart"))
    ]
    assert mutating == []
    assert only(calls, "curl")  # it still checks the service answers
    assert {u: (pod_host.units / u).stat().st_mtime_ns for u in unit_files} == unit_files


def test_second_run_starts_a_stopped_service(pod_host: Host) -> None:
    assert pod_host.run("create_pod_llmux.sh").returncode == 0
    subprocess.run(["systemctl", "--user", "stop", POD_UNIT], env=pod_host.env, check=True)
    pod_host.reset_log()

    # The --new units removed the pod on stop; it is created again to regenerate identical units.
    result = pod_host.run("create_pod_llmux.sh")
    assert result.returncode == 0, result.stderr
    calls = pod_host.calls()
    assert only(calls, "systemctl", "--user", "restart", POD_UNIT)
    assert only(calls, "systemctl", "--user", "daemon-reload") == []  # units are unchanged
    assert only(calls, "systemctl", "--user", "enable") == []


def test_recreate_replaces_an_existing_pod(pod_host: Host) -> None:
    assert pod_host.run("create_pod_llmux.sh").returncode == 0
    pod_host.reset_log()

    result = pod_host.run("create_pod_llmux.sh", "--recreate", "--image", "localhost/llmux:v2")
    assert result.returncode == 1  # the new image is not there: checked before anything changes
    assert "localhost/llmux:v2 not found" in result.stderr
    assert only(pod_host.calls(), "systemctl", "--user", "stop") == []

    pod_host.set_state("images", f"{IMAGE}\nlocalhost/llmux:v2\n")
    pod_host.reset_log()
    result = pod_host.run("create_pod_llmux.sh", "--recreate", "--image", "localhost/llmux:v2")
    assert result.returncode == 0, result.stderr
    calls = pod_host.calls()
    assert position(calls, "systemctl", "--user", "stop", POD_UNIT) < position(
        calls, "podman", "pod", "create"
    )
    assert only(calls, "podman", "create")[0][-1] == "localhost/llmux:v2"
    assert only(calls, "systemctl", "--user", "restart", POD_UNIT)


def test_dry_run_prints_every_command_and_runs_none(pod_host: Host) -> None:
    result = pod_host.run("create_pod_llmux.sh", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert pod_host.calls() == []
    assert not pod_host.units.exists()
    out = result.stdout
    for line in (
        f"+ podman image exists {IMAGE}",
        "+ nvidia-ctk cdi list",
        "+ podman pod create --name llmux_pod --publish 127.0.0.1:8081:8081",
        "+ podman create --pod llmux_pod --name llmux_ctr --stop-timeout 30 --user 0:0 "
        "--device nvidia.com/gpu=all "
        f"--volume {pod_host.models}:/models:ro --volume {pod_host.config}:/config:ro "
        f"--env LLMUX_CONFIG_DIR=/config --env LLMUX_MODELS_DIR=/models {IMAGE}",
        "+ podman generate systemd --new --files --no-header --name llmux_pod",
        "+ systemctl --user daemon-reload",
        f"+ systemctl --user enable {POD_UNIT}",
        f"+ systemctl --user restart {POD_UNIT}",
        "+ curl --fail --silent --show-error --max-time 5 http://127.0.0.1:8081/health",
        f"+ loginctl show-user {pod_host.env['LLMUX_USER']} --property=Linger --value",
    ):
        assert line in out, f"{line!r} not in dry-run output:\n{out}"


def test_dry_run_reports_missing_prerequisites_without_stopping(pod_host: Host) -> None:
    shutil.rmtree(pod_host.models)
    result = pod_host.run("create_pod_llmux.sh", "--dry-run")
    assert result.returncode == 0
    assert "download_models.sh" in result.stderr
    assert "+ podman pod create" in result.stdout
    assert pod_host.calls() == []


def _remove_weights(host: Host) -> None:
    shutil.rmtree(host.models)


def _remove_registry(host: Host) -> None:
    (host.config / "models.yaml").unlink()


def _remove_keys(host: Host) -> None:
    (host.config / "api_keys.yaml").unlink()


def _remove_image(host: Host) -> None:
    host.set_state("images", "")


def _remove_cdi(host: Host) -> None:
    host.set_state("no_cdi")


def _wrong_user(host: Host) -> None:
    host.env["LLMUX_USER"] = "llm-someone-else"


def _no_user_session(host: Host) -> None:
    del host.env["XDG_RUNTIME_DIR"]


@pytest.mark.parametrize(
    ("break_host", "advice"),
    [
        (_remove_weights, "Download them first: download_models.sh"),
        (_remove_registry, "install -D -m 0644 config/models.yaml"),
        (_remove_keys, "python -m llmux.keys"),
        (_remove_image, f"image {IMAGE} not found"),
        (_remove_cdi, "sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"),
        (_wrong_user, "run this as the user llm-someone-else"),
        (_no_user_session, "XDG_RUNTIME_DIR is not set"),
    ],
    ids=["weights", "models.yaml", "api_keys.yaml", "image", "cdi", "user", "session"],
)
def test_missing_prerequisite_stops_with_advice(pod_host: Host, break_host, advice: str) -> None:
    break_host(pod_host)
    result = pod_host.run("create_pod_llmux.sh")
    assert result.returncode == 1
    assert advice in result.stderr
    assert only(pod_host.calls(), "podman", "pod", "create") == []
    assert not pod_host.units.exists()


def test_cdi_spec_file_is_enough_without_nvidia_ctk(tmp_path: Path) -> None:
    if shutil.which("nvidia-ctk", path=SYSTEM_PATH):
        pytest.skip("a real nvidia-ctk is on PATH")
    host = make_host(tmp_path, without=("nvidia-ctk",))
    (host.models / "x").mkdir(parents=True)
    (host.config / "api_keys.yaml").write_text("[]\n")
    host.set_state("images", IMAGE + "\n")
    host.set_state("linger")

    result = host.run("create_pod_llmux.sh")
    assert result.returncode == 1
    assert "no CDI device nvidia.com/gpu=all" in result.stderr

    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\n")
    result = host.run("create_pod_llmux.sh")
    assert result.returncode == 0, result.stderr


def test_health_timeout_says_where_to_look(pod_host: Host) -> None:
    pod_host.set_state("unhealthy")
    result = pod_host.run("create_pod_llmux.sh")
    assert result.returncode == 1
    assert "did not answer http://127.0.0.1:8081/health within 0s" in result.stderr
    assert f"journalctl --user -u {CTR_UNIT}" in result.stderr


def test_a_failed_unit_stops_the_health_wait_and_shows_its_journal(pod_host: Host) -> None:
    pod_host.set_state("unhealthy")
    pod_host.set_state(f"failed.{CTR_UNIT}")
    pod_host.env["LLMUX_HEALTH_TIMEOUT"] = "600"  # it must not wait these out
    result = pod_host.run("create_pod_llmux.sh")
    assert result.returncode == 1
    assert f"{CTR_UNIT} failed" in result.stderr
    assert "fake journal: Error: unresolvable CDI devices" in result.stderr
    assert only(pod_host.calls(), "journalctl") == [
        ["journalctl", "--user", "-u", CTR_UNIT, "-n", "40", "--no-pager"]
    ]


def test_a_gpu_the_container_cannot_see_stops_before_anything_is_created(pod_host: Host) -> None:
    pod_host.set_state("no-gpu")
    result = pod_host.run("create_pod_llmux.sh")
    assert result.returncode == 1
    assert "cannot see the GPU" in result.stderr and "nvidia-ctk cdi generate" in result.stderr
    calls = pod_host.calls()
    assert only(calls, "podman", "run") == [
        ["podman", "run", "--rm", "--device", "nvidia.com/gpu=all", IMAGE, "nvidia-smi", "-L"]
    ]
    assert only(calls, "podman", "pod", "create") == [] and only(calls, "systemctl") == []


def test_the_installed_units_wait_between_restarts(pod_host: Host) -> None:
    result = pod_host.run("create_pod_llmux.sh")
    assert result.returncode == 0, result.stderr
    for unit in (POD_UNIT, CTR_UNIT):
        assert "[Service]\nRestartSec=10\n" in (pod_host.units / unit).read_text()


def test_no_wait_skips_the_health_check(pod_host: Host) -> None:
    pod_host.set_state("unhealthy")
    result = pod_host.run("create_pod_llmux.sh", "--no-wait")
    assert result.returncode == 0, result.stderr
    assert only(pod_host.calls(), "curl") == []


def test_linger_off_is_reported_with_the_command(pod_host: Host) -> None:
    (pod_host.state / "linger").unlink()
    result = pod_host.run("create_pod_llmux.sh")
    assert result.returncode == 0, result.stderr
    assert f"sudo loginctl enable-linger {pod_host.env['LLMUX_USER']}" in result.stderr


def test_paths_and_image_are_configurable(pod_host: Host, tmp_path: Path) -> None:
    models, config = tmp_path / "w", tmp_path / "c"
    shutil.copytree(pod_host.models, models)
    shutil.copytree(pod_host.config, config)
    pod_host.set_state("images", "registry.example/llmux:1\n")
    pod_host.env["LLMUX_HOST_CONFIG_DIR"] = str(config)
    result = pod_host.run(
        "create_pod_llmux.sh", "--models-dir", str(models), "--image", "registry.example/llmux:1"
    )
    assert result.returncode == 0, result.stderr
    create = only(pod_host.calls(), "podman", "create")[0]
    assert f"{models}:/models:ro" in create
    assert f"{config}:/config:ro" in create
    assert create[-1] == "registry.example/llmux:1"


# --- download_models.sh ---------------------------------------------------------------------------


HEADER = ["--include", "config.json", "--include", "*.safetensors.index.json"]


def is_header(call: list[str]) -> bool:
    """The config.json-and-index fetch that precedes a whole repository's download."""
    return call[3:7] == HEADER


def weight_downloads(host: Host) -> list[list[str]]:
    return [call for call in only(host.calls(), "hf", "download") if not is_header(call)]


def hf_downloads(host: Host) -> dict[str, list[str]]:
    """hf download calls of the weights by destination directory name (the physical id)."""
    result = {}
    for call in weight_downloads(host):
        local_dir = Path(call[call.index("--local-dir") + 1])
        assert local_dir.parent == host.models
        result[local_dir.name] = call
    return result


def test_downloads_every_registry_model_into_its_directory(dl_host: Host) -> None:
    result = dl_host.run("download_models.sh")
    assert result.returncode == 0, result.stderr
    registry = load_registry(REGISTRY)
    calls = hf_downloads(dl_host)
    assert len(weight_downloads(dl_host)) == len(registry.physical_models) == 9
    # Each whole repository's header came first, so an impossible checkpoint is never fetched.
    whole = [pid for pid, call in calls.items() if call[3] == "--exclude"]
    assert whole and [c[2] for c in only(dl_host.calls(), "hf") if is_header(c)] == [
        registry.physical_models[pid].model_id for pid in whole
    ]
    for physical_id, model in registry.physical_models.items():
        call = calls[physical_id]
        assert call[2] == model.model_id
        assert Path(call[-1]) == model.weights_path(physical_id, dl_host.models)
        assert (dl_host.models / physical_id / ".llmux-download-complete").is_file()

    gguf = registry.physical_models["qwen3.5-9b-fp8-uncensored"]
    assert calls["qwen3.5-9b-fp8-uncensored"] == [
        "hf", "download", gguf.model_id, gguf.model_file, gguf.mmproj_file,
        "--local-dir", str(dl_host.models / "qwen3.5-9b-fp8-uncensored"),
    ]  # fmt: skip
    assert calls["chatterbox"][3:-2] == [
        "ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt",
    ]  # fmt: skip
    assert calls["chatterbox-multilingual"][2] == "ResembleAI/chatterbox"
    assert calls["chatterbox-multilingual"][3:-2] == [
        "ve.pt", "t3_mtl23ls_v2.safetensors", "s3gen.pt",
        "grapheme_mtl_merged_expanded_v1.json", "conds.pt", "Cangjie5_TC.json",
    ]  # fmt: skip
    assert calls["chatterbox-turbo"][2] == "ResembleAI/chatterbox-turbo"
    assert "--include" in calls["chatterbox-turbo"]
    # Whole-repository models skip the duplicate original/ and metal/ weights of gpt-oss.
    assert calls["gpt-oss-20b"][3:7] == ["--exclude", "original/*", "--exclude", "metal/*"]

    assert (dl_host.state / "hf_token_path").read_text().strip() == str(
        dl_host.home / ".cache/huggingface/token"
    )
    assert "Total on disk:" in result.stdout
    assert "All 9 models are complete." in result.stdout


def test_models_come_from_the_registry_file_not_a_list_in_the_script(dl_host: Host) -> None:
    registry = yaml.safe_load(REGISTRY.read_text())
    registry["physical_models"] = {
        "tiny-llm": {
            "type": "llm", "backend": "transformers", "model_id": "acme/tiny",
            "estimated_vram_gb": 1,
        },
        "tiny-gguf": {
            "type": "llm", "backend": "llamacpp", "model_id": "acme/tiny-GGUF",
            "model_file": "tiny-Q4_K_M.gguf", "estimated_vram_gb": 1, "path": "gguf/tiny",
        },
    }  # fmt: skip
    registry["virtual_models"] = {"Tiny": {"physical": "tiny-llm"}}
    config = dl_host.root / "elsewhere.yaml"
    config.write_text(yaml.safe_dump(registry, sort_keys=False))

    result = dl_host.run("download_models.sh", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert only(dl_host.calls(), "hf") == [
        ["hf", "download", "acme/tiny", *HEADER, "--local-dir", str(dl_host.models / "tiny-llm")],
        ["hf", "download", "acme/tiny", "--exclude", "original/*", "--exclude", "metal/*",
         "--exclude", "*.gguf", "--exclude", "onnx/*", "--local-dir",
         str(dl_host.models / "tiny-llm")],
        ["hf", "download", "acme/tiny-GGUF", "tiny-Q4_K_M.gguf", "--local-dir",
         str(dl_host.models / "gguf/tiny")],
    ]  # fmt: skip


GPT_OSS_BF16_CONFIG = '{"model_type": "gpt_oss", "torch_dtype": "bfloat16"}'
GPT_OSS_MXFP4_CONFIG = '{"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}'


def test_a_gpt_oss_checkpoint_that_is_not_mxfp4_is_refused_before_its_weights(
    dl_host: Host,
) -> None:
    """aoxo/gpt-oss-20b-uncensored, if it is bf16, is ~42 GB no 16 GB GPU holds: say so before
    fetching it, and fetch the rest."""
    dl_host.set_state("config.aoxo_gpt-oss-20b-uncensored", GPT_OSS_BF16_CONFIG)
    dl_host.set_state("config.openai_gpt-oss-20b", GPT_OSS_MXFP4_CONFIG)
    result = dl_host.run("download_models.sh")
    assert result.returncode == 1
    assert (
        "gpt-oss-20b-uncensored (aoxo/gpt-oss-20b-uncensored) is not downloaded: it is not an "
        "MXFP4 checkpoint (quantization: none), so transformers would load gpt-oss in bf16, "
        "about 42 GB"
    ) in result.stderr
    fetched = hf_downloads(dl_host)
    assert "gpt-oss-20b-uncensored" not in fetched  # only its config.json came
    assert "gpt-oss-20b" in fetched  # the MXFP4 one, and everything else, downloads
    assert len(fetched) == 8
    assert "not downloaded: gpt-oss-20b-uncensored" in result.stderr


def test_weights_over_the_gpu_budget_are_refused_before_they_are_fetched(dl_host: Host) -> None:
    index = '{"metadata": {"total_size": 19000000000}, "weight_map": {}}'
    dl_host.set_state("index.Qwen_Qwen3.5-4B", index)
    result = dl_host.run("download_models.sh", "--only", "qwen3.5-4b")
    assert result.returncode == 1
    assert (
        "its weights are 17.7 GB (model.safetensors.index.json), more than the GPU budget of 16 GB"
        in (result.stderr)
    )
    assert hf_downloads(dl_host) == {}


def test_second_run_downloads_nothing(dl_host: Host) -> None:
    assert dl_host.run("download_models.sh").returncode == 0
    dl_host.reset_log()
    result = dl_host.run("download_models.sh")
    assert result.returncode == 0, result.stderr
    assert dl_host.calls() == []
    assert result.stdout.count("complete, skipped") == 9


def test_gated_model_fails_with_what_to_do_and_the_rest_still_downloads(dl_host: Host) -> None:
    dl_host.set_state("gated", GATED_REPO + "\n")
    result = dl_host.run("download_models.sh")
    assert result.returncode == 1
    assert f"access to {GATED_REPO} was refused: it is a gated model" in result.stderr
    assert f"https://huggingface.co/{GATED_REPO}" in result.stderr
    assert "accept its terms" in result.stderr
    assert "hf auth whoami" in result.stderr
    assert "not downloaded: cohere-transcribe" in result.stderr
    assert len(hf_downloads(dl_host)) == 9
    assert not (dl_host.models / "cohere-transcribe/.llmux-download-complete").exists()
    assert (dl_host.models / "qwen3.5-4b/.llmux-download-complete").exists()

    # Once the terms are accepted, a second run fetches only the missing model.
    (dl_host.state / "gated").unlink()
    dl_host.reset_log()
    result = dl_host.run("download_models.sh")
    assert result.returncode == 0, result.stderr
    assert list(hf_downloads(dl_host)) == ["cohere-transcribe"]


def test_an_incomplete_whole_repository_is_not_marked_complete(dl_host: Host) -> None:
    dl_host.set_state("interrupted", "Qwen/Qwen3.5-4B\n")
    result = dl_host.run("download_models.sh")
    assert result.returncode == 1
    assert (
        "model-00002-of-00002.safetensors (listed in model.safetensors.index.json) is missing"
        in (result.stderr)
    )
    assert "qwen3.5-4b: the download is incomplete" in result.stderr
    assert not (dl_host.models / "qwen3.5-4b" / ".llmux-download-complete").exists()
    assert (dl_host.models / "qwen3.5-9b-fp8" / ".llmux-download-complete").exists()  # others go on


def test_too_little_disk_stops_before_any_download(dl_host: Host) -> None:
    dl_host.env["LLMUX_FREE_KB"] = str(20 * 1024 * 1024)  # 20 GB free; the registry needs more
    result = dl_host.run("download_models.sh")
    assert result.returncode == 1
    assert "need at least" in result.stderr and "20 GB free" in result.stderr
    assert hf_downloads(dl_host) == {}


def test_changed_gguf_file_is_fetched_again(dl_host: Host) -> None:
    assert dl_host.run("download_models.sh").returncode == 0
    registry = dl_host.config / "models.yaml"
    registry.write_text(registry.read_text().replace("-Q8_0.gguf", "-Q6_K.gguf"))
    dl_host.reset_log()
    result = dl_host.run("download_models.sh")
    assert result.returncode == 0, result.stderr
    calls = hf_downloads(dl_host)
    assert list(calls) == ["qwen3.5-9b-fp8-uncensored"]
    assert (
        "Qwen3.5-9B-Uncensored-HauhauCS-Aggressive-Q6_K.gguf" in calls["qwen3.5-9b-fp8-uncensored"]
    )


def test_only_and_force(dl_host: Host) -> None:
    assert dl_host.run("download_models.sh", "--only", "chatterbox").returncode == 0
    assert list(hf_downloads(dl_host)) == ["chatterbox"]
    dl_host.reset_log()
    assert dl_host.run("download_models.sh", "--only", "chatterbox").returncode == 0
    assert dl_host.calls() == []
    result = dl_host.run("download_models.sh", "--only", "chatterbox", "--force", "chatterbox")
    assert result.returncode == 0, result.stderr
    assert list(hf_downloads(dl_host)) == ["chatterbox"]
    result = dl_host.run("download_models.sh", "--only", "no-such-model")
    assert result.returncode == 1
    assert "no physical model named no-such-model" in result.stderr


def test_download_dry_run_prints_commands_and_runs_none(dl_host: Host) -> None:
    result = dl_host.run("download_models.sh", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert dl_host.calls() == []
    assert result.stdout.count("+ hf download ") == 9
    gguf_dir = dl_host.models / "qwen3.5-9b-fp8-uncensored"
    assert (
        "+ hf download HauhauCS/Qwen3.5-9B-Uncensored-HauhauCS-Aggressive "
        "Qwen3.5-9B-Uncensored-HauhauCS-Aggressive-Q8_0.gguf "
        f"mmproj-Qwen3.5-9B-Uncensored-HauhauCS-Aggressive-BF16.gguf --local-dir {gguf_dir}"
    ) in result.stdout
    assert not gguf_dir.exists()


def test_missing_registry_or_hf_is_explained(dl_host: Host, tmp_path: Path) -> None:
    (dl_host.config / "models.yaml").unlink()
    result = dl_host.run("download_models.sh")
    assert result.returncode == 1
    assert "no registry at" in result.stderr
    assert "install -D -m 0644 config/models.yaml" in result.stderr

    if shutil.which("hf", path=SYSTEM_PATH):
        pytest.skip("a real hf is installed in the system directories")
    (tmp_path / "nohf").mkdir()
    host = make_host(tmp_path / "nohf", without=("hf",))
    result = host.run("download_models.sh")
    assert result.returncode == 1
    assert "pipx install huggingface_hub" in result.stderr


def test_missing_token_warns_how_to_log_in(dl_host: Host) -> None:
    (dl_host.home / ".cache/huggingface/token").unlink()
    result = dl_host.run("download_models.sh", "--only", "chatterbox")
    assert result.returncode == 0, result.stderr
    assert "no Hugging Face token" in result.stderr
    assert "hf auth login" in result.stderr


def test_plan_places_weights_where_the_registry_says(tmp_path: Path) -> None:
    """download_plan.py (PyYAML only, for the bare host) agrees with llmux.core.config."""
    plan = subprocess.run(
        [sys.executable, str(SCRIPTS / "download_plan.py"), "--config", str(REGISTRY),
         "--models-dir", str(tmp_path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    registry = load_registry(REGISTRY)
    rows = [line.split("\t") for line in plan.splitlines()]
    assert {row[0]: (row[1], Path(row[2])) for row in rows} == {
        physical_id: (model.model_id, model.weights_path(physical_id, tmp_path))
        for physical_id, model in registry.physical_models.items()
    }


# --- deploy/ ------------------------------------------------------------------------------------


def test_traefik_routes_the_host_on_the_wireguard_entry_point_to_llmux() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "traefik" / "llmux.yml").read_text())
    routers = config["http"]["routers"]
    assert list(routers) == ["llmux"]
    router = routers["llmux"]
    assert router["rule"] == "Host(`kidirekt.kischdle.com`)"
    assert router["entryPoints"] == ["wghttp"]
    assert "middlewares" not in router  # Traefik only routes; llmux checks keys
    servers = config["http"]["services"][router["service"]]["loadBalancer"]["servers"]
    assert servers == [{"url": "http://10.0.2.2:8081"}]


def test_open_webui_env_points_every_engine_at_llmux() -> None:
    lines = (ROOT / "deploy" / "openwebui.env").read_text().splitlines()
    settings = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    base = "http://127.0.0.1:8081/v1"
    key = "<OPEN_WEBUI_KEY>"
    assert settings == {
        "ENABLE_PERSISTENT_CONFIG": "False",
        "ENABLE_OLLAMA_API": "False",
        "OPENAI_API_BASE_URLS": base,
        "OPENAI_API_KEYS": key,
        "AUDIO_STT_ENGINE": "openai",
        "AUDIO_STT_OPENAI_API_BASE_URL": base,
        "AUDIO_STT_OPENAI_API_KEY": key,
        "AUDIO_STT_MODEL": "cohere-transcribe",
        "AUDIO_TTS_ENGINE": "openai",
        "AUDIO_TTS_OPENAI_API_BASE_URL": base,
        "AUDIO_TTS_OPENAI_API_KEY": key,
        "AUDIO_TTS_MODEL": "Chatterbox-Multilingual",
        "AUDIO_TTS_VOICE": "alloy",
    }
    registry = load_registry(REGISTRY)
    assert settings["AUDIO_STT_MODEL"] in registry.virtual_models
    assert settings["AUDIO_TTS_MODEL"] in registry.virtual_models
    # --env-file takes the rest of the line literally: no trailing comments, no quotes.
    assert not any("#" in value or '"' in value for value in settings.values())
