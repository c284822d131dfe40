"""Building the image with only podman on the host (scripts/build_image.sh).

`bentoml build` runs in a stock Python container (deploy/image/build_bento.sh), so the host needs
no compiler and none of CUDA torch's gigabytes. Here the inner script runs on this machine with
the model libraries made unimportable (what the container leaves out), and the outer script runs
against the fake podman (this machine cannot start a container).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_scripts import Host, make_host, only

ROOT = Path(__file__).resolve().parent.parent
BUILD_BENTO = ROOT / "deploy" / "image" / "build_bento.sh"
BUILDER = "docker.io/library/python:3.11-slim"
# What build_bento.sh leaves out of the container's install (its model_libraries), as modules.
LEFT_OUT = (
    "torch",
    "transformers",
    "accelerate",
    "xgrammar",
    "gguf",
    "openai_harmony",
    "llama_cpp",
)

BLOCKER = f"""
import importlib.abc, sys

class LeftOut(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {LEFT_OUT!r}:
            raise ModuleNotFoundError(f"{{name}} is not installed in the build container")
        return None

sys.meta_path.insert(0, LeftOut())
"""


@pytest.mark.slow
def test_the_bento_builds_without_torch_or_the_model_libraries(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__"))
    (src / "config" / "api_keys.yaml").write_text("api_keys: [{key: sk-secret, name: x}]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMUX_", "BENTOML_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin",
        PYTHONPATH=str(blocker),
        LLMUX_BUILD_SKIP_INSTALL="1",  # the venv stands in for the container's pip install
    )
    out = tmp_path / "bento"
    result = subprocess.run(
        ["bash", str(BUILD_BENTO), str(src), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (out / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM docker.io/pytorch/pytorch:" in dockerfile
    assert (out / "src" / "service.py").exists()
    assert not list(out.rglob("api_keys.yaml"))


def test_the_blocker_really_blocks(tmp_path: Path) -> None:
    """The build test above proves something only if the left-out libraries cannot import."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    probe = subprocess.run(
        [sys.executable, "-c", "import transformers"],
        env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
    )  # fmt: skip
    assert probe.returncode == 1
    assert "not installed in the build container" in probe.stderr


def test_what_the_container_leaves_out_is_what_the_build_test_blocks() -> None:
    script = BUILD_BENTO.read_text()
    left_out = re.search(r"model_libraries='([^']+)'", script)
    assert left_out, script
    names = left_out.group(1).split("|")
    pinned = {
        line.split("==")[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }  # fmt: skip
    assert set(names) <= pinned  # each one really is a requirement the grep removes
    assert "torch" not in pinned  # torch comes from the base image, never from pip here
    assert {name.replace("-", "_") for name in names} <= set(LEFT_OUT)


@pytest.fixture
def build_host(tmp_path: Path) -> Host:
    host = make_host(tmp_path)
    host.set_state("images", "localhost/llmux:v3\n")
    return host


def test_the_host_needs_only_podman(build_host: Host) -> None:
    result = build_host.run(
        "build_image.sh", "--tag", "localhost/llmux:v3", "--build-arg", "CUDA_ARCHITECTURES=89;120"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    calls = build_host.calls()
    [run] = only(calls, "podman", "run")
    assert run[:3] == ["podman", "run", "--rm"]
    assert f"{ROOT}:/src:ro" in run
    work = next(arg for arg in run if arg.endswith(":/out")).removesuffix(":/out")
    assert run[-5:] == [BUILDER, "bash", "/src/deploy/image/build_bento.sh", "/src", "/out/bento"]
    assert only(calls, "podman", "build") == [
        ["podman", "build", "-t", "localhost/llmux:v3",
         "-f", f"{work}/bento/env/docker/Dockerfile",
         "--build-arg", "CUDA_ARCHITECTURES=89;120", f"{work}/bento"]
    ]  # fmt: skip
    assert only(calls, "podman", "image", "prune") == [["podman", "image", "prune", "-f"]]
    assert "built localhost/llmux:v3" in result.stdout
    assert not Path(work).exists()  # the bento's scratch directory is cleaned up


def test_no_prune_keeps_the_build_stage(build_host: Host) -> None:
    result = build_host.run("build_image.sh", "--tag", "localhost/llmux:v3", "--no-prune")
    assert result.returncode == 0, result.stderr
    assert only(build_host.calls(), "podman", "image", "prune") == []


def test_without_podman_it_says_how_to_install_it(tmp_path: Path) -> None:
    host = make_host(tmp_path, without=("podman",))
    # Only what the script needs before its podman check: no system directory, so no podman.
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("bash", "env", "dirname"):
        (tools / tool).symlink_to(shutil.which(tool) or tool)
    host.env["PATH"] = str(tools)
    result = host.run("build_image.sh")
    assert result.returncode == 1
    assert "podman is not installed: sudo apt install podman" in result.stderr


# The operator's command on the host: `pipx install ~/llmux` installs pyproject's dependencies only.
ALLOWED = ("pydantic", "pydantic_core", "yaml", "_yaml", "typing_extensions", "annotated_types",
           "typing_inspection", "llmux")  # fmt: skip
ONLY_DECLARED = f"""
import importlib.abc, sys

class OnlyDeclared(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        stdlib = top in sys.stdlib_module_names or top.startswith("_sysconfigdata")
        if not stdlib and top not in {ALLOWED!r}:
            raise ModuleNotFoundError(f"{{name}} is not a dependency of the llmux command")
        return None

sys.meta_path.insert(0, OnlyDeclared())
"""


def test_the_operator_command_needs_only_its_declared_dependencies(tmp_path: Path) -> None:
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(re.split(r"[<>=]", d)[0] for d in declared) == ["pydantic", "pyyaml"]
    (tmp_path / "sitecustomize.py").write_text(ONLY_DECLARED)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "HOME": str(tmp_path)}
    keys = subprocess.run(
        [sys.executable, "-m", "llmux.cli", "keys", "--out", str(tmp_path / "k.yaml"), "a"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert keys.returncode == 0, keys.stderr
    assert "sk-llmux-" in (tmp_path / "k.yaml").read_text()
    ps = subprocess.run(
        [sys.executable, "-m", "llmux.cli", "--url", "http://127.0.0.1:9", "--key", "k", "ps"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ps.returncode == 3, ps.stderr  # cannot reach the server: imports were fine
    check = subprocess.run(
        [sys.executable, "-m", "llmux.cli", "--url", "http://127.0.0.1:9", "--key", "k", "check"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "22 checks:" in check.stdout, check.stdout + check.stderr  # every row ran, none crashed
