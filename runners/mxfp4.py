"""Refuse an MXFP4 checkpoint (gpt-oss) that transformers would silently dequantize.

transformers 5.23 (`quantizers/quantizer_mxfp4.py`, `Mxfp4HfQuantizer.validate_environment`)
keeps a pre-quantized MXFP4 checkpoint in MXFP4 only when all of these hold; otherwise it logs a
warning and dequantizes the experts to bf16 (gpt-oss-20b: ~13 GB becomes ~42 GB):
- the model goes to a CUDA GPU of compute capability >= 7.5 (or an XPU; on the CPU only with
  `use_kernels=True`, which llmux does not use, so the CPU always dequantizes);
- `triton` >= 3.4.0 is installed (3.5.0 for XPU/CPU);
- the `kernels` package is installed in the range transformers pins (`KERNELS_MIN_VERSION` <=
  version < `KERNELS_MAX_VERSION`, 0.18.2 <= v < 0.19.0 in 5.23); it then fetches the
  `kernels-community/gpt-oss-triton-kernels` kernel from the Hugging Face Hub cache (the image
  bakes it in at build time: llmux/hub_kernels.py).

`mxfp4_blockers` is the pure decision (what is missing, given what was probed);
`probe_mxfp4_environment` asks torch and transformers' own availability checks, so the two
cannot disagree about versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any

# transformers' minimum compute capability for the MXFP4 triton kernels.
MIN_CUDA_CAPABILITY = (7, 5)
CUDA_TRITON_MIN_VERSION = "3.4.0"


@dataclass(frozen=True)
class Mxfp4Environment:
    """What the MXFP4 path needs, as found on this machine."""

    cuda_capability: tuple[int, int] | None  # None: no CUDA device
    triton_version: str | None  # None: not installed
    triton_ok: bool
    kernels_version: str | None  # None: not installed
    kernels_ok: bool
    kernels_range: str  # the versions transformers accepts, for the message


def is_mxfp4_checkpoint(quantization_config: Any) -> bool:
    """True for a pre-quantized MXFP4 checkpoint that is not explicitly set to dequantize."""
    if quantization_config is None:
        return False
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    return bool(
        quantization_config.get("quant_method") == "mxfp4"
        and not quantization_config.get("dequantize", False)
    )


def mxfp4_blockers(env: Mxfp4Environment) -> list[str]:
    """What stops transformers from running MXFP4 natively here; empty when nothing does."""
    blockers = []
    if env.cuda_capability is None:
        blockers.append("no CUDA GPU (on the CPU transformers dequantizes MXFP4)")
    elif env.cuda_capability < MIN_CUDA_CAPABILITY:
        major, minor = env.cuda_capability
        blockers.append(f"the GPU has compute capability {major}.{minor}, MXFP4 needs >= 7.5")
    if not env.triton_ok:
        found = f"{env.triton_version} is installed" if env.triton_version else "not installed"
        blockers.append(f"triton >= {CUDA_TRITON_MIN_VERSION} ({found})")
    if not env.kernels_ok:
        found = f"{env.kernels_version} is installed" if env.kernels_version else "not installed"
        blockers.append(f"the `kernels` package, {env.kernels_range} ({found})")
    return blockers


def probe_mxfp4_environment() -> Mxfp4Environment:
    """Probe torch, triton and kernels the way transformers does. Imports torch."""
    import torch
    from transformers.utils.import_utils import (
        KERNELS_MAX_VERSION,
        KERNELS_MIN_VERSION,
        is_kernels_available,
        is_triton_available,
    )

    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    return Mxfp4Environment(
        cuda_capability=capability,
        triton_version=_version("triton"),
        triton_ok=is_triton_available(CUDA_TRITON_MIN_VERSION),
        kernels_version=_version("kernels"),
        kernels_ok=is_kernels_available(),
        kernels_range=f">={KERNELS_MIN_VERSION},<{KERNELS_MAX_VERSION}",
    )


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
