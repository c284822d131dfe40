"""Device memory: the budget llmux may fill and the probe that measures what a load took.

Nothing here touches a GPU: the service supplies the probe (`llmux.core.gpu.NvmlMemoryProbe`), since
BentoML imports the service, and so this package, in its parent process too.
"""

from __future__ import annotations

from typing import Protocol

GIB = 1024**3

# What the default budget leaves free on the GPU: the CUDA context of the process (about 0.3 to
# 0.5 GiB), cuBLAS/cuDNN workspaces and allocator fragmentation. Measured footprints cover the
# weights, not these, so the margin keeps a full budget from running the device out of memory.
GPU_SAFETY_MARGIN_BYTES = 1 * GIB

# The budget without a GPU (tests, demonstrations): the 16 GB card llmux is built for.
NO_GPU_BUDGET_BYTES = 16 * GIB


def default_budget_bytes(
    configured_gb: float | None,
    gpu_total_bytes: int | None,
    margin_bytes: int = GPU_SAFETY_MARGIN_BYTES,
) -> int:
    """The budget. With a GPU: the device's total memory less `margin_bytes`, or `gpu_budget_gb`
    when that is smaller (a configured 16 GB on a card that reports 15.99 GiB must not plan past
    the card). Without one: `gpu_budget_gb`, else `NO_GPU_BUDGET_BYTES`."""
    device = None if gpu_total_bytes is None else max(0, gpu_total_bytes - margin_bytes)
    configured = None if configured_gb is None else int(configured_gb * GIB)
    if device is not None and configured is not None:
        return min(device, configured)
    if device is not None:
        return device
    return configured if configured is not None else NO_GPU_BUDGET_BYTES


# The warm tier's default share of the machine's memory, and what it leaves free of what is
# available at start-up: the worker itself, tokenizers, audio buffers, the admin benchmark's
# CPU copies, and the rest of the machine.
HOST_SHARE = 0.5
HOST_MARGIN_BYTES = 2 * GIB


def default_host_budget_bytes(
    configured_gb: float | None,
    total_bytes: int | None,
    available_bytes: int | None,
    *,
    device_in_host_bytes: int = 0,
) -> int:
    """The warm tier's budget: `host_budget_gb` when set (0 turns the tier off); else
    `HOST_SHARE` of the machine's memory, never more than what is available now less
    `HOST_MARGIN_BYTES` and less `device_in_host_bytes`: without a GPU the resident models live
    in host memory too, so the (GPU) budget they may fill comes off first. Without a reading of
    the host's memory, no warm tier."""
    if configured_gb is not None:
        return int(configured_gb * GIB)
    if total_bytes is None or available_bytes is None:
        return 0
    free = available_bytes - HOST_MARGIN_BYTES - device_in_host_bytes
    return max(0, min(int(total_bytes * HOST_SHARE), free))


class MemoryProbe(Protocol):
    """Reads how much device memory is in use now.

    Called on a worker thread right before and right after each load, and from
    `Residency.snapshot()` on the event loop (possibly while a load runs): it must be quick and
    thread-safe. Device-wide readings suit best, since they see memory taken outside torch.
    """

    def used_bytes(self) -> int | None:
        """Device memory in use, in bytes; None when there is no device to measure."""

    def total_bytes(self) -> int | None:
        """The device's whole memory, in bytes; None when there is no device."""
