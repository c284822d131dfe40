"""The warm tier on a real GPU: parking moves a torch model's memory to the host and back.

Skipped (saying so) without CUDA. On a GPU box it checks what the CPU tests cannot: a park gives
the device memory back and pins the host copy, an unpark answers with the same tokens, and an
unpark runs near the PCIe bandwidth (within 1.5x of bytes / the bandwidth a plain pinned copy of
the same size reaches on this machine).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from llmux.core.config import PhysicalModel
from runners.base import (
    park_torch_modules,
    settle_host_memory,
    torch_bytes,
    unpark_torch_modules,
)
from runners.chat import GenerationRequest
from runners.transformers_llm import TransformersChatRunner
from tests.conftest import gpu_only
from tests.tiny_models import build_tiny_qwen35_vl

pytestmark = gpu_only()

GIB = 1024**3


def resident_bytes() -> int:
    """This process's resident memory (page-locked host memory is resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def tokens(runner: TransformersChatRunner, **sampling: Any) -> list[int]:
    request = GenerationRequest(
        messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, **sampling
    )
    return [t for chunk in runner.generate(request, threading.Event()) for t in chunk.token_ids]


def test_a_parked_llm_gives_its_device_memory_back_and_answers_the_same_after(
    tmp_path: Path,
) -> None:
    import torch

    build_tiny_qwen35_vl(tmp_path)
    spec = PhysicalModel(
        type="llm",
        backend="transformers",
        estimated_vram_gb=0.1,
        supports_vision=True,
        parser="qwen3.5",
    )
    runner = TransformersChatRunner("tiny-qwen3.5", spec, tmp_path)
    runner.load()
    greedy = tokens(runner, temperature=0)
    seeded = tokens(runner, temperature=1.0, seed=7)
    on_device = runner.device_bytes()
    assert on_device and runner.host_bytes() == on_device

    allocated = torch.cuda.memory_allocated()
    runner.park()
    assert runner.device_bytes() is None
    assert torch.cuda.memory_allocated() <= allocated - on_device
    model: Any = runner._loaded.model  # type: ignore[union-attr]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in model.parameters())

    runner.unpark()
    assert runner.device_bytes() == on_device
    assert tokens(runner, temperature=0) == greedy
    assert tokens(runner, temperature=1.0, seed=7) == seeded
    runner.unload()


def test_an_unpark_runs_within_one_and_a_half_times_bytes_over_the_pcie_bandwidth() -> None:
    import torch

    layers = torch.nn.Sequential(*(torch.nn.Linear(8192, 8192) for _ in range(8))).cuda()
    size = torch_bytes(layers)  # 8 x 256 MiB in float32: 2 GiB
    assert size > GIB
    park_torch_modules("synthetic", torch.device("cuda"), layers)
    assert all(p.is_pinned() for p in layers.parameters())

    # The bandwidth one pinned host-to-device copy of the same size reaches here (the faster of
    # two, so that the first copy's set-up does not flatter the unpark).
    pinned = torch.empty(size, dtype=torch.uint8).pin_memory()
    seconds = []
    for _ in range(2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        on_device = pinned.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        del on_device
    bandwidth = size / min(seconds)
    del pinned
    torch.cuda.empty_cache()
    torch._C._host_emptyCache()  # this test's own pinned block: freed before the clock starts

    started = time.perf_counter()
    unpark_torch_modules("synthetic", torch.device("cuda"), layers)
    unpark_s = time.perf_counter() - started

    assert all(p.is_cuda for p in layers.parameters())
    ideal_s = size / bandwidth
    print(
        f"\nunpark of {size / GIB:.2f} GiB: {unpark_s * 1000:.0f} ms; "
        f"bytes / bandwidth ({bandwidth / GIB:.1f} GiB/s): {ideal_s * 1000:.0f} ms"
    )
    assert unpark_s <= 1.5 * ideal_s
    settle_host_memory()


def test_a_parked_model_locks_its_own_size_of_host_memory_and_hands_it_back() -> None:
    """Tensors of 288 MiB: torch's pinned-memory cache would lock 512 MiB for each (it rounds
    blocks up to a power of two). A park locks the model's bytes, and its unpark returns them."""
    import torch

    layers = torch.nn.Sequential(
        *(torch.nn.Linear(8192, 9216, bias=False) for _ in range(8))
    ).cuda()
    size = torch_bytes(layers)  # 8 x 288 MiB: 2.25 GiB
    before = resident_bytes()
    park_torch_modules("synthetic", torch.device("cuda"), layers)
    parked = resident_bytes() - before
    assert all(p.is_pinned() and not p.is_cuda for p in layers.parameters())
    assert 0.95 * size <= parked <= 1.1 * size, f"{parked / GIB:.2f} GiB for {size / GIB:.2f}"

    unpark_torch_modules("synthetic", torch.device("cuda"), layers)
    settle_host_memory()
    assert all(p.is_cuda for p in layers.parameters())
    assert resident_bytes() - before <= 0.1 * size


def test_a_host_that_refuses_to_lock_memory_parks_unpinned_and_leaves_no_cuda_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cudaHostRegister refused (here: the range is already registered): the park falls back to
    ordinary host memory, and the refusal's error does not surface at the next kernel launch."""
    import torch

    real = torch.cuda.cudart()

    class Refusing:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def cudaHostRegister(self, ptr: int, size: int, flags: int) -> Any:
            assert int(real.cudaHostRegister(ptr, size, flags)) == 0
            refused = real.cudaHostRegister(ptr, size, flags)  # already registered: an error
            real.cudaHostUnregister(ptr)
            return refused

    layers = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)).cuda()
    before = [p.detach().clone() for p in layers.parameters()]
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Refusing())
    park_torch_modules("synthetic", torch.device("cuda"), layers)
    assert all(not p.is_cuda and not p.is_pinned() for p in layers.parameters())
    torch.ones(4, device="cuda").add_(1)  # a kernel launch on the same thread
    torch.cuda.synchronize()

    unpark_torch_modules("synthetic", torch.device("cuda"), layers)
    assert all(
        p.is_cuda and torch.equal(p, b) for p, b in zip(layers.parameters(), before, strict=True)
    )
