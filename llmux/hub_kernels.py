"""The Hugging Face Hub kernels the production models need, baked into the image at build time.

transformers fetches some compute kernels from the Hub when it loads a checkpoint, through the
`kernels` package:
- gpt-oss (MXFP4): `integrations/mxfp4.py` calls
  `get_kernel("kernels-community/gpt-oss-triton-kernels", version=1)`; without it transformers
  dequantizes the experts to bf16 (~42 GB), which llmux refuses (runners/mxfp4.py).
- Qwen3.5-9B-FP8 (fine-grained FP8, 128x128 blocks): `integrations/finegrained_fp8.py` loads
  `_HUB_KERNEL_MAPPING["finegrained-fp8"]`.

The running pod is offline (HF_HUB_OFFLINE=1, a `--rm` container), so the kernels must already be
in the image: `python -m llmux.hub_kernels bake` downloads them into KERNELS_CACHE during the image
build, and `python -m llmux.hub_kernels verify` then imports each one offline, as the running
service will. tests/test_bento_build.py checks that this list is what the installed transformers
asks for, so a transformers upgrade that moves a kernel fails a test instead of a load.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class HubKernel:
    repo_id: str
    version: int
    needed_by: str


HUB_KERNELS = (
    HubKernel("kernels-community/gpt-oss-triton-kernels", 1, "gpt-oss-20b (MXFP4)"),
    HubKernel("kernels-community/finegrained-fp8", 4, "Qwen3.5-9B-FP8 (fine-grained FP8)"),
)


def bake() -> None:
    """Download every kernel into the cache (needs the network: the image build)."""
    from kernels import install_kernel  # the image's package; not in the development venv

    for kernel in HUB_KERNELS:
        path = install_kernel(kernel.repo_id, version=kernel.version)
        print(f"baked {kernel.repo_id} v{kernel.version} for {kernel.needed_by}: {path}")


def verify() -> list[str]:
    """Import every kernel from the cache alone; what failed, each with why."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub reads its constants
    from kernels import get_kernel

    failures = []
    for kernel in HUB_KERNELS:
        try:
            # check_arch=False: the build has no GPU to compare the kernel's architectures with.
            get_kernel(kernel.repo_id, version=kernel.version, check_arch=False)
        except Exception as exc:  # every failure is reported, with its reason
            failures.append(f"{kernel.repo_id} v{kernel.version} ({kernel.needed_by}): {exc}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmux.hub_kernels", description=__doc__)
    parser.add_argument("action", choices=["bake", "verify"])
    args = parser.parse_args(argv)
    if "KERNELS_CACHE" not in os.environ:
        print("KERNELS_CACHE is not set: the kernels would go to the HF cache", file=sys.stderr)
        return 2
    if args.action == "bake":
        bake()
        return 0
    failures = verify()
    for failure in failures:
        print(f"cannot load offline: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
