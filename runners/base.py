"""What every runner offers, whatever its backend.

Only the residency executor (`llmux_policy.executor`) calls `load` and `unload` (and `park` and
`unpark`, for runners that are `Parkable`); routes reach a runner through `Residency.use(...)`,
which keeps it resident while they run.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
import weakref
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from llmux.core.errors import BadRequest, ModelUnavailable


class Runner(Protocol):
    """A model that can be put on a device and taken off again.

    `load` and `unload` block (they move weights) and are called on a worker thread, never
    concurrently with each other for the same runner. After `unload` returns, the runner's device
    memory has been handed back (caches emptied), so the executor can measure what it freed.
    """

    physical_id: str

    def preflight(self) -> None:
        """Cheap checks made before anything is evicted for this model: its weights are there and
        look sane (files present, not empty, the right format) and its backend is installed.
        Raises `ModelLoadError` (`WeightsMissing` for files) saying what to do. Reads no weights
        and touches no device, so a load that cannot succeed costs the resident models nothing."""

    def load(self) -> None:
        """Put the weights on the device. Raises `ModelLoadError` with a message a user can use."""

    def unload(self) -> None:
        """Drop every reference to the weights and return device memory."""

    def device_bytes(self) -> int | None:
        """GPU memory the loaded model holds by its backend's own count (torch: its parameters
        and buffers on the device), or None where the backend cannot tell (llama.cpp, CTranslate2,
        ONNX, or no GPU): the executor then reads the device before and after the load."""


@runtime_checkable
class Parkable(Protocol):
    """A runner that can step off the device into host memory and come back without reading its
    weights again (the warm tier). Runners that cannot (llama.cpp's device weights) lack these
    methods and are dropped on eviction, as before.

    `park` and `unpark` block and run on the executor's swap thread, like `load` and `unload`,
    and only on a loaded runner. After `park` the runner holds no device memory; after `unpark`
    it serves exactly as after `load` (same tokens for a seeded request). `unload` works in
    either state and drops everything.
    """

    def park(self) -> None:
        """Move the model to host memory and give its device memory back. Raises
        `HostOutOfMemory` (nothing moved) when the host cannot take it."""

    def unpark(self) -> None:
        """Move a parked model back to the device; reads nothing from disk. Raises
        `OutOfDeviceMemory` like `load`, leaving the model parked."""

    def host_bytes(self) -> int:
        """Host memory the model holds once parked (asked before `park`, to plan for it)."""


# Where a runner puts its model: "auto" is how llmux serves (the GPU when there is one, else the
# CPU); "cpu" never touches the GPU, whatever is installed: the admin benchmark's CPU half
# (llama.cpp with n_gpu_layers 0 and no op offload, torch on "cpu", CTranslate2 in int8).
Device = Literal["auto", "cpu"]


def torch_device(device: Device) -> str:
    """The torch device a runner built for `device` loads onto. Imports torch."""
    import torch

    return "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"


class ModelLoadError(ModelUnavailable):
    """A load failed; the message says why and what to do."""

    code = "model_load_failed"


class WeightsMissing(ModelLoadError):
    """The model's weights are not on disk: say where we looked and how to get them."""

    code = "model_weights_missing"

    def __init__(self, physical_id: str, path: Path) -> None:
        super().__init__(
            f"The weights of model {physical_id!r} are not at {path}. Download them with "
            f"scripts/download_models.sh (it reads config/models.yaml), or fix `path` / "
            f"LLMUX_MODELS_DIR."
        )
        self.path = path


class OutOfDeviceMemory(ModelLoadError):
    """A load ran out of device memory. The runner has already let go of what the load took;
    the executor raises the model's estimate and tries once more with more room."""

    code = "model_out_of_memory"


class HostOutOfMemory(ModelLoadError):
    """A park found too little free host memory for the model; it stayed on the device."""

    code = "host_out_of_memory"


class NotLoaded(ModelLoadError):
    """A runner was asked to work while its weights are not on the device.

    The executor only hands out loaded runners, so this is a bug in llmux, not the client's doing;
    it still reaches the client as a 503 rather than a crash.
    """

    code = "model_not_loaded"

    def __init__(self, physical_id: str) -> None:
        super().__init__(f"{physical_id!r} is not loaded")


def completion_budget(
    physical_id: str, context_length: int, prompt_tokens: int, max_tokens: int | None
) -> int:
    """How many tokens the answer may take: what the context has left, capped by `max_tokens`.

    A prompt that already fills the context is the client's to shorten (400)."""
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest("max_tokens must be at least 1.", param="max_tokens")
    room = context_length - prompt_tokens
    if room <= 0:
        raise BadRequest(
            f"The prompt is {prompt_tokens} tokens; {physical_id!r} has a context of "
            f"{context_length} tokens. Shorten the conversation.",
            param="messages",
            code="context_length_exceeded",
        )
    return min(room, max_tokens) if max_tokens else room


def free_device_memory(on_cuda: bool) -> None:
    """Hand memory the caller has dropped every reference to back to the device.

    `gc.collect()` first: a model's modules hold reference cycles, and torch's caching allocator
    can only return blocks whose tensors are gone. Call it after `del`, not while an exception (or
    a frame) still references the tensors."""
    gc.collect()
    if on_cuda:
        import torch

        torch.cuda.empty_cache()


def require_files(physical_id: str, *paths: Path) -> None:
    """Each path is a file with something in it; else `WeightsMissing` naming the first that is
    not (an empty file is what an interrupted download or a failed copy leaves)."""
    for path in paths:
        if not path.is_file() or path.stat().st_size == 0:
            raise WeightsMissing(physical_id, path)


def require_gguf(physical_id: str, path: Path) -> None:
    """`path` is a GGUF file: present, and starting with the format's magic bytes."""
    require_files(physical_id, path)
    with path.open("rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{path} is not a GGUF file (it starts with {magic!r}); model {physical_id!r} needs "
            "the GGUF its `model_file` names. Download it again with scripts/download_models.sh."
        )


def require_backend(physical_id: str, *modules: str) -> None:
    """The backend's packages are installed (found, not imported: that happens at load)."""
    for module in modules:
        if find_spec(module) is None:
            raise ModelLoadError(
                f"Model {physical_id!r} needs the Python package {module!r}, which is not "
                "installed; run `make setup` (or scripts/setup.sh)."
            )


def torch_device_bytes(*modules: Any) -> int | None:
    """Bytes of the parameters and buffers of `modules` that live on a CUDA device; None when
    none do (a CPU load: nothing to count against the GPU budget, and no reading to correct)."""
    total = 0
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_cuda:
                total += tensor.numel() * tensor.element_size()
    return total or None


def torch_bytes(*modules: Any) -> int:
    """Bytes of the parameters and buffers of `modules`, wherever they live."""
    return sum(
        tensor.numel() * tensor.element_size()
        for module in modules
        if module is not None
        for tensor in [*module.parameters(), *module.buffers()]
    )


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo; None where there is none (not Linux)."""
    return _meminfo("MemAvailable")


def host_total_bytes() -> int | None:
    """MemTotal from /proc/meminfo; None where there is none (not Linux)."""
    return _meminfo("MemTotal")


def _meminfo(field: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def park_torch_modules(physical_id: str, device: Any, *modules: Any) -> None:
    """`park` for torch models: on CUDA, move `modules` to host memory and empty the cache. On the
    CPU there is nothing to move: the loaded modules stay as they are, and their bytes count
    against the host budget instead. `device` is where the runner loaded them (a torch.device or
    its name).

    Where the host has room for it twice over, the weights go to page-locked memory of exactly
    their size (`_park_pinned`), so that they come back at full PCIe speed; page-locked memory
    cannot be swapped out, hence the margin. Elsewhere they go to ordinary memory."""
    if not str(device).startswith("cuda"):
        return
    settle_host_memory()  # memory an unpark is still unlocking counts as available
    needed = torch_bytes(*modules)
    available = host_available_bytes()
    if available is not None and needed > available:
        raise HostOutOfMemory(
            f"parking {physical_id!r} needs {needed / 1024**3:.1f} GiB of host memory; "
            f"{available / 1024**3:.1f} GiB is available"
        )
    pin = available is not None and 2 * needed <= available
    for module in modules:
        if module is not None and not (pin and _park_pinned(module)):
            module.to("cpu")
    free_device_memory(on_cuda=True)


def unpark_torch_modules(physical_id: str, device: Any, *modules: Any) -> None:
    """`unpark` for torch models: move `modules` back to `device` (a no-op on the CPU). Out of
    device memory, what moved goes back to the host and `OutOfDeviceMemory` is raised.

    The page-locked host copies are handed back to the OS after this returns, on a thread of
    their own: unlocking pages takes longer than copying them (on an H200 host, 160 ms against
    42 ms for 2 GiB), and a request waiting for the model need not wait for it."""
    if not str(device).startswith("cuda"):
        return
    import torch

    message: str | None = None
    try:
        for module in modules:
            if module is not None:
                module.to(device, non_blocking=True)
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError as exc:
        message = str(exc)
    if message is not None:
        # What did not move still lives in the page-locked copies: they stay until the next try.
        for module in modules:
            if module is not None:
                module.to("cpu")
        free_device_memory(on_cuda=True)
        raise OutOfDeviceMemory(f"{physical_id!r} does not fit in the free GPU memory: {message}")
    unlocks = [_PINNED.pop(module) for module in modules if module in _PINNED]
    if unlocks:
        release = threading.Thread(
            target=lambda: [unlock() for unlock in unlocks],
            name=f"unpin-{physical_id}",
            daemon=True,
        )
        with _RELEASES_LOCK:
            _RELEASES[:] = [*(r for r in _RELEASES if r.is_alive()), release]
        release.start()


# Each parked module's page-locked host block (see `_park_pinned`), as the call that unlocks it:
# made by its unpark, or when the module is collected (a parked model unloaded).
_PINNED: weakref.WeakKeyDictionary[Any, weakref.finalize[Any, Any]] = weakref.WeakKeyDictionary()
# Threads handing unparked modules' page-locked memory back (`settle_host_memory` waits for them).
_RELEASES: list[threading.Thread] = []
_RELEASES_LOCK = threading.Lock()
# Each tensor's offset in a parked module's host block is a multiple of this (any dtype's size).
_HOST_ALIGN = 64


def _park_pinned(module: Any) -> bool:
    """Copy `module`'s CUDA tensors into one page-locked host block of exactly their size and
    point the tensors at it; False (nothing moved) where the host refuses to lock the memory.

    Not `tensor.pin_memory()`: torch's pinned-memory cache rounds each block up to a power of two,
    so a model of 288 MiB tensors would lock 1.8 times its size. Locking one ordinary block in
    place (cudaHostRegister) locks what the weights need, and the copy goes straight from the
    device into it."""
    import torch

    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.is_cuda]
    if any(type(t.data) is not torch.Tensor for t in tensors):
        return False  # a tensor subclass (a quantized layout): `Module.to` knows how to move it
    offsets: list[int] = []
    total = 0
    for tensor in tensors:
        offsets.append(total)
        size = tensor.numel() * tensor.element_size()
        total += -(-size // _HOST_ALIGN) * _HOST_ALIGN
    if total == 0:
        return False
    block = torch.empty(total, dtype=torch.uint8)
    if not _host_register(block.data_ptr(), total):
        return False
    copies = []
    try:
        for tensor, offset in zip(tensors, offsets, strict=True):
            size = tensor.numel() * tensor.element_size()
            copy = block[offset : offset + size].view(tensor.dtype).view(tensor.shape)
            copy.copy_(tensor.data, non_blocking=True)
            copies.append(copy)
        torch.cuda.synchronize()
    except BaseException:
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()  # copies already queued into the block finish first
        _unlock([block])  # never free a block the driver still has locked
        raise
    for tensor, copy in zip(tensors, copies, strict=True):
        tensor.data = copy
    unlock = weakref.finalize(module, _unlock, [block])
    unlock.atexit = False  # the process's exit frees it anyway
    _PINNED[module] = unlock
    return True


def _host_register(pointer: int, size: int) -> bool:
    """cudaHostRegister the block (portable: pinned for every device's context), on a thread of
    its own. A refusal leaves its error as the calling thread's last CUDA error, and torch's
    check after that thread's next kernel launch raised it as the kernel's own (seen on an
    H200); the last error is per host thread, so here it goes with the helper."""
    import torch

    cudart: Any = torch.cuda.cudart()
    outcome: list[int] = []
    helper = threading.Thread(
        target=lambda: outcome.append(int(cudart.cudaHostRegister(pointer, size, 1))),
        name="host-register",
    )
    helper.start()
    helper.join()
    return outcome == [0]


def _unlock(blocks: list[Any]) -> None:
    """Unlock page-locked host blocks; each is freed when its last reference goes (here, unless a
    tensor still views it: unlocked memory stays valid memory)."""
    import torch

    cudart: Any = torch.cuda.cudart()
    for block in blocks:
        cudart.cudaHostUnregister(block.data_ptr())
    blocks.clear()


def settle_host_memory(timeout_s: float = 60) -> None:
    """Wait for the page-locked memory of the models unparked so far to be handed back."""
    with _RELEASES_LOCK:
        pending = _RELEASES[:]
        _RELEASES.clear()
    for release in pending:
        release.join(timeout_s)


# glibc's mallopt parameters, and the values they are pinned at. The mmap threshold is glibc's
# own dynamic ceiling (32 MiB on 64-bit): every block a CPU forward pass allocates at a step
# (activations, a row of logits) stays below it and is reused from the heap. The trim threshold
# is what an arena may keep of a freed top: 8 MiB holds a step's working set (a 0.5B model's
# activations of a short prompt), so the next operation does not fault those pages in again, and
# bounds what each arena keeps between requests. At glibc's own start (128 KiB), as it was, a
# 0.5B model on the CPU took 20,000 page faults and 70 ms of system time per request.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HOST_MMAP_THRESHOLD = 32 * 1024 * 1024
HOST_TRIM_THRESHOLD = 8 * 1024 * 1024


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def pin_malloc_thresholds() -> None:
    """Keep glibc from moving its mmap and trim thresholds after large frees (it raises them up
    to 32/64 MB). Moved, they let each backend's native threads keep the freed top of their own
    arena resident for good, and with backends taking turns in one process the idle RSS
    ratcheted up by 1-6 MB per load: an allocator effect, not a leak (README, "Reliability").

    The mmap threshold is pinned at 32 MiB, above what a CPU forward pass allocates at a step.
    Pinned at 128 KiB, as it first was, every tensor of that size or more was mapped,
    page-faulted, zeroed and unmapped at each operation: 5-25 % of a 0.5B model's compute, and
    58 ms more to its first token. The trim threshold is pinned at 8 MiB: a freed top up to that
    stays for the next operation, a larger one goes back to the OS. Idempotent; a no-op off
    glibc."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_TRIM_THRESHOLD, HOST_TRIM_THRESHOLD)
        libc.mallopt(M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD)


def release_host_memory() -> None:
    """Give freed host memory back to the OS after an unload: glibc keeps freed heap pages of a
    model's host-side buffers (tokenizers, ONNX sessions, llama.cpp's host allocations) in its
    arenas, and the worker's RSS would ratchet up with every swap. A no-op off glibc."""
    gc.collect()
    libc = _glibc()
    if libc is None:
        return
    pin_malloc_thresholds()
    libc.malloc_trim(0)
