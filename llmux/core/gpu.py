"""The GPU as NVML sees it: device-wide memory in use, and the total.

NVML rather than torch: it is cheap to import, creates no CUDA context (BentoML's parent process
imports the service too), and counts memory taken outside torch, such as llama.cpp's.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("llmux.core.gpu")


class NvmlMemoryProbe:
    """`used_bytes()` / `total_bytes()` of one device; None for both without an NVIDIA GPU."""

    def __init__(self, index: int = 0) -> None:
        self._index = index
        self._handle: object | None = None
        self._ready = False
        self._lock = threading.Lock()

    def _device(self) -> object | None:
        with self._lock:
            if not self._ready:
                self._ready = True
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._handle = pynvml.nvmlDeviceGetHandleByIndex(self._index)
                except Exception as exc:
                    log.info("no NVIDIA GPU visible (%s): using the configured budget", exc)
                    self._handle = None
            return self._handle

    def _memory(self) -> object | None:
        handle = self._device()
        if handle is None:
            return None
        import pynvml

        return pynvml.nvmlDeviceGetMemoryInfo(handle)

    def used_bytes(self) -> int | None:
        info = self._memory()
        return None if info is None else int(info.used)  # type: ignore[attr-defined]

    def total_bytes(self) -> int | None:
        info = self._memory()
        return None if info is None else int(info.total)  # type: ignore[attr-defined]
