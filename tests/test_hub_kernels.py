"""The Hub kernels baked into the image are the ones the installed transformers asks for.

transformers fetches the MXFP4 (gpt-oss) and fine-grained FP8 (Qwen3.5-9B-FP8) kernels from the
Hub at load time; the pod is offline, so llmux/hub_kernels.py bakes them in at build time. These
tests read transformers' own source and constants, so an upgrade that moves a kernel, or changes
the `kernels` versions it accepts, fails here rather than at the first load on the GPU box.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

from llmux.hub_kernels import HUB_KERNELS

ROOT = Path(__file__).resolve().parent.parent
IMAGE_REQUIREMENTS = ROOT / "deploy" / "image" / "requirements.txt"


def image_requirement(name: str) -> Requirement:
    for line in IMAGE_REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-") and Requirement(line).name == name:
            return Requirement(line)
    raise AssertionError(f"{name} is not in {IMAGE_REQUIREMENTS}")


def baked(repo_id: str) -> int:
    versions = [k.version for k in HUB_KERNELS if k.repo_id == repo_id]
    assert versions, f"{repo_id} is not baked into the image (llmux/hub_kernels.py)"
    return versions[0]


def test_the_mxfp4_kernel_is_baked_at_the_version_transformers_loads() -> None:
    from transformers.integrations import mxfp4

    calls = re.findall(r'get_kernel\("([^"]+)", version=(\d+)\)', inspect.getsource(mxfp4))
    assert calls, "transformers' MXFP4 integration no longer calls get_kernel(repo, version=N)"
    for repo_id, version in calls:
        assert baked(repo_id) == int(version)


def test_the_finegrained_fp8_kernel_is_baked_at_the_version_transformers_loads() -> None:
    from transformers.integrations.hub_kernels import _HUB_KERNEL_MAPPING

    entry = _HUB_KERNEL_MAPPING["finegrained-fp8"]
    assert baked(entry["repo_id"]) == entry["version"]


def test_the_image_installs_the_kernels_versions_transformers_accepts() -> None:
    from transformers.utils.import_utils import KERNELS_MAX_VERSION, KERNELS_MIN_VERSION

    specifier = image_requirement("kernels").specifier
    assert {str(s) for s in specifier} == {f">={KERNELS_MIN_VERSION}", f"<{KERNELS_MAX_VERSION}"}


def test_the_image_installs_the_qwen35_fast_path() -> None:
    """transformers' Qwen3.5 picks the `fla` and `causal_conv1d` kernels when they import."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    source = inspect.getsource(modeling_qwen3_5)
    assert '"fla")' in source and '"causal_conv1d")' in source
    assert image_requirement("flash-linear-attention").specifier.contains("0.6.0")


def test_the_bake_refuses_without_a_cache_directory_of_its_own(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "llmux" / "hub_kernels.py"), "bake"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "KERNELS_CACHE is not set" in result.stderr
