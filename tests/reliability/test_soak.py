"""The soak's short run in CI: mixed traffic over every virtual model of the embedded default
with swaps forced between kinds (`make soak` runs the long one). It must lose nothing, answer
no 5xx, break no residency invariant, and keep the idle RSS flat after warm-up (5 % + 32 MB:
before glibc's thresholds were pinned, 400 requests grew it by 168 MB)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import GEMMA, MODELS_DIR, REPO, real_models

pytestmark = real_models(GEMMA, MODELS_DIR / "qwen2.5-coder-0.5b", MODELS_DIR / "minilm-l6-v2")


def test_a_short_soak_loses_nothing_and_breaks_no_invariant() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "scripts/soak.py",
            "--requests",
            "160",
            "--clients",
            "8",
            "--max-seconds",
            "900",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr
    assert run.returncode == 0, run.stdout + run.stderr
    assert summary.startswith("soak passed: 160 requests, 0 5xx, 0 lost, 0 broken invariants")
    loads = int(summary.rsplit(",", 1)[1].split()[0])
    assert loads > 6  # the small budget really made the kinds evict each other
