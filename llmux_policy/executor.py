"""The residency executor: carries out the planner's plans and keeps requests' models resident.

`Residency` is the only code that calls `Runner.load` and `Runner.unload`, and `Parkable.park` and
`unpark` (on a swap thread of its own, so that inference filling the default pool never delays a
swap). Routes reach a runner with

    async with residency.use(physical_id) as runner:
        ...  # the model stays resident until the block ends (a whole stream included)

Contracts:
- One load or unload at a time (`_swap_lock`). A request whose model must be loaded waits for the
  swap that loads it; concurrent requests for one model share that one load. A request for a model
  that is ready and not about to be evicted is served at once, even while another model swaps:
  it needs no swap, and holding it back would only add latency.
- A request holds its model from `use()` until its block exits; a model with requests in flight
  is never evicted: the swap that needs it gone waits. Once a swap waits to evict a model, new
  requests for it wait behind the swap (writer preference), so a stream of requests cannot starve
  it. A request must not hold one model while it asks for another: the swap for the second could
  be waiting for the first to be released.
- State lives on the event loop and changes only in synchronous methods (no `await` inside), so
  each decision and the change it leads to happen in one step no other coroutine can split: the
  event loop is the state lock. "Ensure loaded" is decided in one place, `_admit`. Releasing a
  request's hold never awaits, so a cancelled request (client gone) cannot leak its count.
- Loads run in background tasks owned by `Residency`, not by a request: a request that gives up
  while its model loads leaves the load running, and the model stays resident when it is done
  (the evictions are already paid for, and the next request may want it). A swap nobody waits for
  any more is dropped before it evicts anything.
- Before anything is evicted for a model, its runner is made and `preflight()`ed (weights present
  and sane, backend installed): a load that cannot succeed costs the resident models nothing.
  Between evictions the swap checks again that someone still waits for it.
- A failed load leaves nothing registered: every request waiting for it gets the same error (the
  runner's `ModelLoadError`, or any other exception wrapped in one) and the next request retries.
  After a failed or cancelled load the runner's `unload()` is called once, best effort, so it can
  give back what the partial load took; runners must accept that.
- A thread cannot be stopped: a load or unload that is cancelled (only `close()` cancels swaps)
  is waited for, then undone or forgotten, before the cancellation goes on.
- Footprints start as each model's declared `footprint_bytes`. With a memory probe that returns
  numbers, device memory is read right before and after each load and the difference replaces the
  declared footprint in later plans (kept per model across unloads). When the model's first
  requests end, the reading is taken again and what they added (the first inference's peak, which
  the CUDA caching allocator keeps) joins the measured footprint, provided nothing else loaded or
  unloaded in between. Both declared and measured show in `snapshot()`.
  The difference is what the load took (weights, mostly), not what inference adds later (KV cache,
  activations), and it also counts whatever else moved meanwhile (a resident model serving): the
  budget's margin has to cover both.
- The warm tier: a model evicted to make room (`replace_same_type`, `make_room`) or for being idle,
  whose runner is `Parkable`, parks in host memory when `plan_parking` finds room for it in the
  host budget (least recently used warm models are dropped first); otherwise, or when the park
  fails, it is dropped as before (logged). A request for a warm model is a swap like any other
  (same lock, same plan, same holds) that calls `unpark` instead of `preflight` and `load`: no
  disk is read. An unpark that fails falls back to a load from disk within the same swap. An
  operator's unload and shutdown drop models, warm ones included.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Literal, TypedDict

from llmux.core.concurrency import ThreadPerCall, run_to_end
from llmux.core.config import ModelType, PhysicalModel, Registry
from llmux.core.errors import ApiError, ModelNotFound, ModelUnavailable
from llmux_policy.memory import GIB, MemoryProbe
from llmux_policy.metrics import EvictionCause, NoMetrics, ResidencyMetricsSink
from llmux_policy.planner import (
    AlreadyResident,
    Drop,
    Load,
    Park,
    Plan,
    Refuse,
    Request,
    Resident,
    ResidentState,
    Wait,
    Warm,
    eviction_key,
    plan_parking,
    plan_residency,
)
from runners.base import (
    ModelLoadError,
    OutOfDeviceMemory,
    Parkable,
    Runner,
    release_host_memory,
)

log = logging.getLogger(__name__)

# Inference threads per model. Chat generations on one model take turns anyway; speech and
# transcription may overlap a little; more threads would only compete for the same device.
INFERENCE_THREADS = 4

# Evictions after which a model that can park is kept warm. An operator's unload and shutdown
# mean "give the memory back", so they drop it.
PARKING_CAUSES: frozenset[EvictionCause] = frozenset({"replace_same_type", "make_room", "idle"})


class ResidentInfo(TypedDict):
    physical_id: str
    type: ModelType
    state: ResidentState
    declared_bytes: int
    measured_bytes: int | None
    footprint_bytes: int  # what plans use: measured when known, else declared
    in_flight: int
    evicting: bool  # a swap waits to evict it; new requests for it wait
    last_used_at: str | None  # ISO 8601, UTC
    loads: int  # loads of this model (from disk) that succeeded since start
    unparks: int  # times it came back from the warm tier since start


class WarmInfo(TypedDict):
    physical_id: str
    type: ModelType
    host_bytes: int  # host memory it holds while parked
    footprint_bytes: int  # what it will take on the GPU again
    unparking: bool  # a swap is bringing it back
    last_used_at: str | None  # ISO 8601, UTC


class LoadError(TypedDict):
    message: str
    at: str  # ISO 8601, UTC


class SwapInfo(TypedDict):
    model: str  # the physical model the swap brings in
    waiting: int  # requests waiting for it


class ResidencySnapshot(TypedDict):
    budget_bytes: int
    used_bytes: int  # sum of the resident models' footprints
    device_used_bytes: int | None  # what the memory probe reads; None without one
    waiting_for_swap: int
    swaps: list[SwapInfo]  # swaps under way or queued, and who waits for each
    last_load_errors: dict[str, LoadError]  # the last failed load of each model that had one
    closing: bool  # close() has begun: no new requests are taken
    models: list[ResidentInfo]
    host_budget_bytes: int  # the warm tier's budget; 0: no warm tier
    host_used_bytes: int  # sum of the warm models' host bytes
    warm_models: list[WarmInfo]


@dataclass(eq=False)
class _Entry:
    """A resident model. Changed only by `Residency`'s synchronous methods."""

    physical_id: str
    model: PhysicalModel
    runner: Runner
    state: ResidentState = "loading"
    in_flight: int = 0
    evicting: bool = False
    last_used: int = 0
    last_used_at: float | None = None
    # Device memory in use before this model loaded, and the count of loads and unloads then;
    # kept until its first request ends, to measure that request's peak (see `_release`).
    baseline_bytes: int | None = None
    device_changes_at_load: int = 0


@dataclass(eq=False)
class _Parked:
    """A model in the warm tier. Changed only by `Residency`, with `_swap_lock` held."""

    physical_id: str
    model: PhysicalModel
    runner: Runner
    host_bytes: int
    last_used: int
    last_used_at: float | None
    unparking: bool = False


@dataclass(eq=False)
class _Swap:
    """A load on its way, and the requests waiting for it."""

    physical_id: str
    tickets: set[_Ticket] = field(default_factory=set)


@dataclass(eq=False)
class _Ticket:
    """One request's claim on its model, from `use()` until it holds the model or gives up."""

    physical_id: str
    swap: _Swap | None = None  # the swap it waits for
    entry: _Entry | None = None  # set once it holds the model (counted in)
    error: BaseException | None = None  # set when the swap it waited for failed
    error_traceback: TracebackType | None = None


class Residency:
    """Keeps models resident on one GPU within a budget, by the rules of `llmux_policy.planner`.

    Create it and use it on one event loop. `runner_factory(physical_id)` makes a fresh runner for
    each load; it is called on a worker thread (it may import a backend) and must not load weights.
    `clock` gives wall-clock seconds for display only; the order of use is an internal counter.
    `host_budget_bytes` is the warm tier's room in host memory (0: evicted models are dropped).
    """

    def __init__(
        self,
        registry: Registry,
        runner_factory: Callable[[str], Runner],
        budget_bytes: int,
        *,
        probe: MemoryProbe | None = None,
        metrics: ResidencyMetricsSink | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        thrash_window_s: float = 60.0,
        host_budget_bytes: int = 0,
    ) -> None:
        self._registry = registry
        self._runner_factory = runner_factory
        self._budget = budget_bytes
        self._probe = probe
        self._metrics: ResidencyMetricsSink = metrics if metrics is not None else NoMetrics()
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._warm: dict[str, _Parked] = {}
        self._host_budget = host_budget_bytes
        self._swaps: dict[str, _Swap] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._measured: dict[str, int] = {}
        self._loads: dict[str, int] = {}  # successful loads per model, for /health
        self._unparks: dict[str, int] = {}  # successful unparks per model, for /health
        self._raised: dict[str, int] = {}  # estimates raised after out-of-memory loads
        self._at_rest_bytes: int | None = None  # device use with no model resident
        self._load_errors: dict[str, LoadError] = {}  # the last failed load of each model
        self._llm_evicted_at: dict[str, float] = {}  # monotonic time each LLM was last replaced
        self._thrash_window_s = thrash_window_s
        self._thrash_warned_at = -math.inf
        self._monotonic = monotonic
        self._device_changes = 0  # loads and unloads done, to tell whether a reading is clean
        self._waiting = 0
        self._closed = False
        self._ticks = itertools.count(1)
        self._swap_lock = asyncio.Lock()
        # Loads, unloads and preflights run on a thread of their own: inference fills the default
        # pool (a burst of transcriptions), and a swap must never queue behind it. Each call on a
        # thread that ends with it (`ThreadPerCall`: torch's OpenMP threads go with it).
        self._swap_thread = ThreadPerCall(max_workers=1, thread_name_prefix="llmux-swap")
        self._inference: dict[str, ThreadPerCall] = {}
        self._changed = asyncio.Event()

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def host_budget_bytes(self) -> int:
        return self._host_budget

    def inference_threads(self, physical_id: str) -> ThreadPerCall:
        """The worker threads for `physical_id`'s inference: a small pool per model, so that a
        burst of requests for one model (transcriptions, say) cannot take the threads another
        model's requests, or the swaps, need. Each call runs on a thread that ends with it."""
        pool = self._inference.get(physical_id)
        if pool is None:
            pool = self._inference[physical_id] = ThreadPerCall(
                max_workers=INFERENCE_THREADS, thread_name_prefix=f"llmux-{physical_id}"
            )
        return pool

    # --- requests -------------------------------------------------------------------------------

    @asynccontextmanager
    async def use(self, physical_id: str) -> AsyncIterator[Runner]:
        """Hold `physical_id` resident for the block; load it first if needed.

        Blocks while the model loads, or while a swap evicts it (then it is loaded again). Raises
        `ModelNotFound` for an unknown id, `ModelLoadError` when the load fails, and
        `ModelUnavailable` when the model exceeds the budget or llmux is shutting down.
        """
        entry = await self._acquire(physical_id)
        try:
            yield entry.runner
        finally:
            self._release(entry)

    async def _acquire(self, physical_id: str) -> _Entry:
        if physical_id not in self._registry.physical_models:
            raise ModelNotFound(physical_id, param=None)
        ticket = _Ticket(physical_id)
        try:
            entry = self._admit(ticket)
            if entry is not None:
                return entry
            self._count_waiting(+1)
            started = time.monotonic()
            try:
                while entry is None:
                    await self._changed.wait()
                    entry = self._admit(ticket)
                return entry
            finally:
                self._count_waiting(-1)
                self._metrics.waited_for_swap(time.monotonic() - started)
        except BaseException:
            self._abandon(ticket)
            raise

    def _admit(self, ticket: _Ticket) -> _Entry | None:
        """Decide whether the request holds its model now: the one place "ensure loaded" is decided.

        Returns the entry with the request counted in, or None when it must wait for the next
        change of state (having joined or started the swap that brings its model in). Raises the
        error of the swap it waited for, or `ModelUnavailable` once shutting down.
        """
        if ticket.entry is not None:
            return ticket.entry
        if ticket.error is not None:
            # One error object for every waiter; restore its traceback so raising it in each
            # waiter does not pile their frames onto it (as asyncio.Future does).
            raise ticket.error.with_traceback(ticket.error_traceback)
        if self._closed:
            raise ModelUnavailable("llmux is shutting down and takes no more requests.")
        entry = self._entries.get(ticket.physical_id)
        if entry is not None and entry.state == "ready" and not entry.evicting:
            self._count_in(entry, ticket)
            return entry
        if (entry is None or entry.state == "loading") and ticket.swap is None:
            swap = self._swaps.get(ticket.physical_id) or self._start_swap(ticket.physical_id)
            swap.tickets.add(ticket)
            ticket.swap = swap
        # Otherwise it is being evicted: wait until it is gone, then start a swap to bring it back.
        return None

    def _count_in(self, entry: _Entry, ticket: _Ticket) -> None:
        entry.in_flight += 1
        ticket.entry = entry
        self._touch(entry)

    def _release(self, entry: _Entry) -> None:
        entry.in_flight -= 1
        self._touch(entry)
        if entry.in_flight == 0 and entry.baseline_bytes is not None:
            self._measure_first_use(entry)

    def _measure_first_use(self, entry: _Entry) -> None:
        """After a model's first requests, count what they added to its footprint.

        The CUDA caching allocator keeps what inference took (activations, KV cache), so device
        memory read now, less what was in use before the load, is the load plus the first
        inference's peak. Only clean when nothing else loaded or unloaded since; else skipped.
        """
        baseline, entry.baseline_bytes = entry.baseline_bytes, None
        if self._probe is None or self._device_changes != entry.device_changes_at_load:
            return
        now = self._probe.used_bytes()
        if baseline is None or now is None:
            return
        peak = now - baseline
        if peak > self._measured.get(entry.physical_id, 0):
            self._measured[entry.physical_id] = peak
            self._metrics.resident_bytes(entry.physical_id, peak)

    def _abandon(self, ticket: _Ticket) -> None:
        """Undo whatever a request that gives up (error or cancellation) still holds."""
        if ticket.entry is not None:
            self._release(ticket.entry)
            ticket.entry = None
        elif ticket.swap is not None:
            ticket.swap.tickets.discard(ticket)
            ticket.swap = None
            self._notify()

    def _touch(self, entry: _Entry) -> None:
        entry.last_used = next(self._ticks)
        entry.last_used_at = self._clock()
        self._notify()

    def _count_waiting(self, delta: int) -> None:
        self._waiting += delta
        self._metrics.waiting_for_swap(self._waiting)
        self._notify()

    def _notify(self) -> None:
        """Wake every waiter for a change of state; each checks again (wake-ups may be spurious)."""
        self._changed.set()
        self._changed = asyncio.Event()

    # --- swaps ----------------------------------------------------------------------------------

    def _start_swap(self, physical_id: str) -> _Swap:
        swap = _Swap(physical_id)
        self._swaps[physical_id] = swap
        task = asyncio.create_task(self._run_swap(swap), name=f"llmux-load-{physical_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return swap

    async def _run_swap(self, swap: _Swap) -> None:
        """Bring one model in and hand it to the requests waiting for it, or give them its error."""
        try:
            async with self._swap_lock:
                started = time.monotonic()
                entry = await self._make_room_and_load(swap)
                if entry is not None:
                    self._metrics.swap_finished(swap.physical_id, time.monotonic() - started)
        except asyncio.CancelledError:
            message = f"Loading model {swap.physical_id!r} was cancelled: llmux is shutting down."
            self._end_swap(swap, error=ModelUnavailable(message))
            raise
        except ApiError as exc:
            self._note_load_error(swap.physical_id, exc.message)
            self._end_swap(swap, error=exc)
        except Exception as exc:  # a bug here must still answer the waiting requests
            log.exception("swap for %r failed", swap.physical_id)
            self._note_load_error(swap.physical_id, repr(exc))
            self._end_swap(swap, error=ModelLoadError(f"Model {swap.physical_id!r}: {exc!r}"))
        else:
            if entry is not None:
                self._end_swap(swap, entry=entry)

    async def _make_room_and_load(self, swap: _Swap) -> _Entry | None:
        """Preflight, plan, wait for busy victims, evict, load. Called with `_swap_lock` held.

        Returns the ready entry, or None when every request gave up before anything more was
        evicted. A load that runs out of device memory is retried once, with the model's estimate
        raised and a plan that evicts everything it may (down to loading it alone).
        """
        physical_id = swap.physical_id
        parked = self._warm.get(physical_id)
        if parked is not None:
            parked.unparking = True  # it must not go cold while room is made for it
            try:
                if not await self._make_room(swap, self._footprint(physical_id)):
                    return None
            finally:
                parked.unparking = False
            try:
                return await self._load(physical_id, parked.runner, unpark=True)
            except ModelLoadError as exc:
                log.warning(
                    "%r did not come back from host memory (%s); loading it from disk",
                    physical_id,
                    exc.message,
                )
        runner = await self._prepare(physical_id)
        beside = sorted(self._entries)
        if not await self._make_room(swap, self._footprint(physical_id)):
            return None
        try:
            return await self._load(physical_id, runner)
        except OutOfDeviceMemory as first:
            self._raise_estimate(physical_id)
            log.warning(
                "%r ran out of device memory loading beside %s (%s); raised its estimate to "
                "%.1f GiB and trying once more with everything else that may go evicted",
                physical_id,
                ", ".join(beside) or "nothing",
                first,
                self._footprint(physical_id) / GIB,
            )
        runner = await self._prepare(physical_id)  # the failed one gave back what it took
        if not await self._make_room(swap, self._budget):
            return None
        try:
            return await self._load(physical_id, runner)
        except OutOfDeviceMemory as second:
            kept = sorted(self._entries)
            raise ModelUnavailable(
                f"Model {physical_id!r} ran out of GPU memory while loading, first beside "
                f"{', '.join(beside) or 'nothing'}, then again beside "
                f"{', '.join(kept) or 'nothing'} ({second}). Its estimated_vram_gb is too low "
                "for this GPU, or memory is taken outside llmux.",
                code="model_out_of_memory",
            ) from second

    async def _make_room(self, swap: _Swap, footprint: int) -> bool:
        """Evict what the plan for `footprint` bytes of `swap`'s model needs gone, waiting for
        busy victims. False (nothing more evicted) when every request for it gave up."""
        marked: set[str] = set()
        try:
            while True:
                if not swap.tickets:
                    self._drop_swap(swap)
                    return False
                plan = self._plan(swap.physical_id, footprint)
                match plan:
                    case Refuse(reason=reason, code=code):
                        raise ModelUnavailable(reason, code=code)
                    case Wait(evictions=evictions):
                        marked = self._mark_evicting({e.physical_id for e in evictions}, marked)
                        await self._changed.wait()
                    case Load(evictions=evictions):
                        marked = self._mark_evicting({e.physical_id for e in evictions}, marked)
                        for eviction in evictions:
                            if not swap.tickets:  # everyone gave up: evict nothing more
                                self._drop_swap(swap)
                                return False
                            await self._evict(self._entries[eviction.physical_id], eviction.reason)
                        return True
                    case AlreadyResident():  # only this swap registers its model
                        raise RuntimeError(f"{swap.physical_id!r} resident while its swap runs")
        finally:
            self._mark_evicting(set(), marked)

    def _note_llm_swap(self, evicted: str) -> None:
        """Count an LLM replaced by another, and warn when two alternate fast (ping-pong): each
        switch pays a whole load, so two clients of two LLMs can keep the GPU loading."""
        self._metrics.llm_swapped()
        now = self._monotonic()
        self._llm_evicted_at[evicted] = now
        recent = [
            physical_id
            for physical_id, at in self._llm_evicted_at.items()
            if now - at < self._thrash_window_s
        ]
        if len(recent) >= 2 and now - self._thrash_warned_at >= self._thrash_window_s:
            self._thrash_warned_at = now
            log.warning(
                "LLMs are swapping back and forth (%s evicted within %.0f s): every switch moves "
                "a whole model onto the GPU; give these clients one model, or use virtual models "
                "of one physical model (switching between those costs no load)",
                ", ".join(sorted(recent)),
                self._thrash_window_s,
            )

    def _note_load_error(self, physical_id: str, message: str) -> None:
        self._load_errors[physical_id] = {"message": message, "at": _iso(self._clock()) or ""}

    def _raise_estimate(self, physical_id: str) -> None:
        """After an out-of-memory load: half as much again as the footprint used, at least
        1 GiB more, never above the budget. Kept until a load measures the real footprint."""
        used = self._footprint(physical_id)
        self._measured.pop(physical_id, None)
        self._raised[physical_id] = min(self._budget, max(used * 3 // 2, used + GIB))

    def _plan(self, physical_id: str, footprint: int) -> Plan:
        resident = [self._resident(entry) for entry in self._entries.values()]
        model = self._registry.physical_models[physical_id]
        return plan_residency(resident, Request(physical_id, model.type, footprint), self._budget)

    def _resident(self, entry: _Entry) -> Resident:
        return Resident(
            entry.physical_id,
            entry.model.type,
            self._footprint(entry.physical_id),
            entry.in_flight,
            entry.last_used,
            entry.state,
        )

    def _mark_evicting(self, ids: set[str], marked: set[str]) -> set[str]:
        """Hold new requests off `ids` (writer preference); release those of `marked` not in it."""
        for physical_id in marked - ids:
            if (entry := self._entries.get(physical_id)) is not None:
                entry.evicting = False
        for physical_id in ids - marked:
            self._entries[physical_id].evicting = True
        if ids != marked:
            self._notify()
        return ids

    def _drop_swap(self, swap: _Swap) -> None:
        if self._swaps.get(swap.physical_id) is swap:
            del self._swaps[swap.physical_id]
        self._notify()

    def _end_swap(
        self, swap: _Swap, *, entry: _Entry | None = None, error: BaseException | None = None
    ) -> None:
        """Count every waiting request in on `entry`, or give each the same `error`."""
        self._drop_swap(swap)
        for ticket in swap.tickets:
            ticket.swap = None
            if entry is not None:
                self._count_in(entry, ticket)
            else:
                ticket.error = error
                ticket.error_traceback = error.__traceback__ if error is not None else None
        swap.tickets.clear()

    # --- loads and unloads (called with _swap_lock held) --------------------------------------

    async def _evict(self, entry: _Entry, reason: EvictionCause) -> None:
        """Unload one idle model. Blocks until its runner has let go; the entry is gone after."""
        if reason == "replace_same_type" and entry.model.type == "llm":
            self._note_llm_swap(entry.physical_id)
        entry.state = "unloading"
        self._notify()
        try:
            if reason in PARKING_CAUSES and await self._park(entry):
                return
            await run_to_end(entry.runner.unload, executor=self._swap_thread)
            await run_to_end(release_host_memory, executor=self._swap_thread)
        except Exception:
            # Keeping a model registered that may be half gone would be worse; the device probe
            # shows any memory it kept.
            log.exception("unloading %r failed; treating it as unloaded", entry.physical_id)
        finally:
            self._forget(entry)
            self._device_changes += 1
            self._metrics.evicted(entry.physical_id, reason)

    async def _park(self, entry: _Entry) -> bool:
        """Move an evicted model into the warm tier when its runner can park and the host budget
        has room, dropping least recently used warm models first. False when it could not (the
        caller drops it): no warm tier, a runner that cannot park, no room, or a failed park."""
        runner = entry.runner
        if self._host_budget <= 0 or not isinstance(runner, Parkable):
            return False
        physical_id = entry.physical_id
        try:
            host_bytes = await run_to_end(runner.host_bytes, executor=self._swap_thread)
        except Exception:
            log.exception("%r could not say its host bytes; dropping it", physical_id)
            self._metrics.parked(physical_id, "error")
            return False
        warm = [
            Warm(p.physical_id, p.host_bytes, p.last_used, p.unparking) for p in self._warm.values()
        ]
        match plan_parking(warm, Warm(physical_id, host_bytes, entry.last_used), self._host_budget):
            case Drop(reason=why):
                log.info("%s is dropped, not parked: %s", physical_id, why)
                self._metrics.parked(physical_id, "no_room")
                return False
            case Park(cold=cold):
                for cold_id in cold:
                    self._metrics.went_cold(cold_id)
                    await self._go_cold(self._warm[cold_id])
        try:
            await run_to_end(runner.park, executor=self._swap_thread)
        except Exception:
            log.exception("parking %r in host memory failed; dropping it", physical_id)
            self._metrics.parked(physical_id, "error")
            return False
        self._warm[physical_id] = _Parked(
            physical_id, entry.model, runner, host_bytes, entry.last_used, entry.last_used_at
        )
        self._metrics.parked(physical_id, "ok")
        self._metrics.warm_bytes(physical_id, host_bytes)
        log.info("%s parked in host memory (%.2f GiB)", physical_id, host_bytes / GIB)
        return True

    async def _go_cold(self, parked: _Parked) -> None:
        """Drop a warm model: its next request loads it from disk."""
        del self._warm[parked.physical_id]
        self._metrics.warm_bytes(parked.physical_id, 0)
        self._notify()
        try:
            await run_to_end(parked.runner.unload, executor=self._swap_thread)
            await run_to_end(release_host_memory, executor=self._swap_thread)
        except Exception:
            log.exception("dropping warm %r failed; treating it as dropped", parked.physical_id)

    async def _prepare(self, physical_id: str) -> Runner:
        """Make the model's runner and check, before anything is evicted for it, that it can
        load at all (`Runner.preflight`: weights present and sane, backend installed). A model
        whose load cannot succeed is refused here, at no cost to the resident ones."""

        def make_and_check() -> Runner:
            # On a thread: making a runner imports its backend's module the first time.
            runner = self._runner_factory(physical_id)
            runner.preflight()
            return runner

        try:
            return await run_to_end(make_and_check, executor=self._swap_thread)
        except Exception as exc:
            self._metrics.load_finished(physical_id, "error", 0.0)
            if isinstance(exc, ModelLoadError):
                raise
            raise _load_failed(physical_id, exc) from exc

    async def _load(self, physical_id: str, runner: Runner, *, unpark: bool = False) -> _Entry:
        """Load one model into the room made for it (`unpark`: bring its warm runner back from
        host memory instead). Blocks for the whole load.

        Returns the ready entry with no request counted in yet. On failure or cancellation nothing
        of it stays registered (nor warm) and the runner has been asked to give back what it took.
        """
        started = time.monotonic()
        if unpark:
            del self._warm[physical_id]
            self._metrics.warm_bytes(physical_id, 0)
        alone = not self._entries  # nothing else resident: the reading before is llmux at rest
        entry = _Entry(physical_id, self._registry.physical_models[physical_id], runner)
        self._entries[physical_id] = entry
        self._metrics.resident_bytes(physical_id, self._footprint(physical_id))
        self._notify()
        try:
            before, measured, after = await run_to_end(
                partial(self._load_and_measure, runner, unpark), executor=self._swap_thread
            )
        except BaseException as exc:
            self._forget(entry)
            cancelled = isinstance(exc, asyncio.CancelledError)
            outcome: Literal["cancelled", "error"] = "cancelled" if cancelled else "error"
            if unpark:
                self._metrics.unpark_finished(physical_id, outcome, time.monotonic() - started)
            else:
                self._metrics.load_finished(physical_id, outcome, time.monotonic() - started)
            await self._discard(runner)
            if isinstance(exc, Exception) and not isinstance(exc, ModelLoadError):
                raise _load_failed(physical_id, exc) from exc
            raise
        if unpark:
            self._metrics.unpark_finished(physical_id, "ok", time.monotonic() - started)
            self._unparks[physical_id] = self._unparks.get(physical_id, 0) + 1
        else:
            self._metrics.load_finished(physical_id, "ok", time.monotonic() - started)
            self._loads[physical_id] = self._loads.get(physical_id, 0) + 1
        self._load_errors.pop(physical_id, None)
        self._device_changes += 1
        if measured is not None:
            self._measured[physical_id] = measured
            entry.baseline_bytes = before
            entry.device_changes_at_load = self._device_changes
        if alone and before is not None:
            self._at_rest_bytes = before
        self._cover_device_use(physical_id, after)
        self._metrics.resident_bytes(physical_id, self._footprint(physical_id))
        entry.state = "ready"
        self._touch(entry)
        return entry

    def _cover_device_use(self, physical_id: str, device_used: int | None) -> None:
        """Keep the plans honest: the footprints of the resident models must add up to at least
        what the device shows llmux using beyond its memory at rest. Whatever no footprint
        accounts for (a torch model's count misses the caching allocator's slack, say) is added
        to the model just loaded, the one that made it appear."""
        if device_used is None or self._at_rest_bytes is None:
            return
        in_use = device_used - self._at_rest_bytes
        counted = sum(self._footprint(other) for other in self._entries)
        if in_use > counted:
            self._measured[physical_id] = self._footprint(physical_id) + in_use - counted
            log.info(
                "%s: %.2f GiB in use on the device beyond the footprints; counted to it",
                physical_id,
                (in_use - counted) / GIB,
            )

    def _load_and_measure(
        self, runner: Runner, unpark: bool
    ) -> tuple[int | None, int | None, int | None]:
        """On a worker thread: load (or unpark), reading device memory before and after when a
        probe can. Returns (in use before, what the load took, in use after), each None without
        a reading."""
        before = self._probe.used_bytes() if self._probe is not None else None
        if unpark:
            assert isinstance(runner, Parkable)
            runner.unpark()
        else:
            runner.load()
        after = self._probe.used_bytes() if self._probe is not None else None
        # A torch model counts its own tensors: torch's caching allocator may have put it into
        # blocks another model freed, so the device reading alone can say it took nothing.
        own = runner.device_bytes()
        if own is not None:
            return before, own, after
        if before is None or after is None:
            return before, None, after
        return before, max(0, after - before), after

    async def _discard(self, runner: Runner) -> None:
        """Best effort: let a runner whose load failed give back what the partial load took."""
        try:
            await run_to_end(runner.unload, executor=self._swap_thread)
        except Exception:
            log.exception("unloading %r after its failed load failed", runner.physical_id)

    def _forget(self, entry: _Entry) -> None:
        if self._entries.get(entry.physical_id) is entry:
            del self._entries[entry.physical_id]
        self._metrics.resident_bytes(entry.physical_id, 0)
        self._notify()

    def _footprint(self, physical_id: str) -> int:
        """What plans count for a model: its latest measurement, else its raised estimate after
        an out-of-memory load, else its declared footprint."""
        declared = self._registry.physical_models[physical_id].footprint_bytes
        return self._measured.get(physical_id, self._raised.get(physical_id, declared))

    # --- observation and shutdown -----------------------------------------------------------

    def snapshot(self) -> ResidencySnapshot:
        """Plain data for /health, copied now (later changes do not show in it). Reads the probe."""
        models: list[ResidentInfo] = [
            {
                "physical_id": entry.physical_id,
                "type": entry.model.type,
                "state": entry.state,
                "declared_bytes": entry.model.footprint_bytes,
                "measured_bytes": self._measured.get(entry.physical_id),
                "footprint_bytes": self._footprint(entry.physical_id),
                "in_flight": entry.in_flight,
                "evicting": entry.evicting,
                "last_used_at": _iso(entry.last_used_at),
                "loads": self._loads.get(entry.physical_id, 0),
                "unparks": self._unparks.get(entry.physical_id, 0),
            }
            for entry in self._entries.values()
        ]
        warm: list[WarmInfo] = [
            {
                "physical_id": parked.physical_id,
                "type": parked.model.type,
                "host_bytes": parked.host_bytes,
                "footprint_bytes": self._footprint(parked.physical_id),
                "unparking": parked.unparking,
                "last_used_at": _iso(parked.last_used_at),
            }
            for parked in self._warm.values()
        ]
        return {
            "budget_bytes": self._budget,
            "used_bytes": sum(model["footprint_bytes"] for model in models),
            "device_used_bytes": self._probe.used_bytes() if self._probe is not None else None,
            "waiting_for_swap": self._waiting,
            "swaps": [
                {"model": swap.physical_id, "waiting": len(swap.tickets)}
                for swap in self._swaps.values()
            ],
            "last_load_errors": dict(self._load_errors),
            "closing": self._closed,
            "models": models,
            "host_budget_bytes": self._host_budget,
            "host_used_bytes": sum(model["host_bytes"] for model in warm),
            "warm_models": warm,
        }

    async def unload(
        self, physical_id: str, *, wait_s: float, reason: EvictionCause = "admin"
    ) -> bool:
        """Unload a resident model on request (the operator's, or its idle time running out),
        through the one-swap-at-a-time lock, as any eviction. New requests for it wait meanwhile
        (writer preference); those in flight get `wait_s` to finish. Returns False when it was
        not resident; raises `ModelBusy` (409) when requests still hold it then (it stays).
        The operator's unload (`admin`) drops the model, and drops a warm one from host memory;
        an unload for idleness (`idle`) parks it when it can, as any eviction."""
        async with self._swap_lock:
            entry = self._entries.get(physical_id)
            if entry is None and physical_id in self._warm:
                await self._go_cold(self._warm[physical_id])
                return True
            if entry is None or entry.state != "ready":
                return False
            marked = self._mark_evicting({physical_id}, set())
            try:
                try:
                    async with asyncio.timeout(wait_s):
                        while entry.in_flight:
                            await self._changed.wait()
                except TimeoutError:
                    raise ModelBusy(physical_id, entry.in_flight, wait_s) from None
                await self._evict(entry, reason)
                return True
            finally:
                self._mark_evicting(set(), marked)

    async def preload(self, physical_ids: list[str]) -> None:
        """Load these models, in order, as requests would (the planner decides evictions); for
        start-up, as a background task. A failure is logged, and the next one is tried."""
        for physical_id in physical_ids:
            try:
                async with self.use(physical_id):
                    log.info("preloaded %s", physical_id)
            except ApiError as exc:
                log.warning("preloading %s failed: %s", physical_id, exc.message)

    async def unload_idle(self, *, every_s: float) -> None:
        """Forever (a background task): every `every_s`, unload the models idle longer than
        their `idle_ttl_s`, each as an eviction through the swap lock (never one in use)."""
        while not self._closed:
            await asyncio.sleep(every_s)
            now = self._clock()
            for entry in list(self._entries.values()):
                ttl = self._registry.idle_ttl(entry.physical_id)
                idle = entry.in_flight == 0 and entry.state == "ready" and not entry.evicting
                if ttl is None or not idle or entry.last_used_at is None:
                    continue
                if now - entry.last_used_at >= ttl:
                    log.info("%s was idle %.0f s: unloading it", entry.physical_id, ttl)
                    with contextlib.suppress(ModelBusy):  # a request came in meanwhile
                        await self.unload(entry.physical_id, wait_s=0, reason="idle")

    async def wait_until(self, predicate: Callable[[ResidencySnapshot], bool]) -> ResidencySnapshot:
        """Block until `predicate(snapshot())` holds, checking again after every change of state.

        For readiness checks and tests; it has no time limit of its own.
        """
        while True:
            changed = self._changed
            snapshot = self.snapshot()
            if predicate(snapshot):
                return snapshot
            await changed.wait()

    async def close(self) -> None:
        """Shut down: unload every model (eviction reason `shutdown`).

        Refuses new requests at once and cancels swaps not yet done (a load already running ends in
        its thread and is then unloaded; its waiters get `ModelUnavailable`). Then waits, with no
        time limit, for requests in flight to finish, and unloads the models one at a time. Wrap it
        in a timeout if requests may hang.
        """
        self._closed = True
        self._notify()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async with self._swap_lock:
            entries = sorted(
                self._entries.values(), key=lambda entry: eviction_key(self._resident(entry))
            )
            marked = self._mark_evicting({entry.physical_id for entry in entries}, set())
            try:
                while any(entry.in_flight for entry in entries):
                    await self._changed.wait()
                for entry in entries:
                    await self._evict(entry, "shutdown")
                for parked in list(self._warm.values()):
                    await self._go_cold(parked)
            finally:
                self._mark_evicting(set(), marked)
        self._swap_thread.shutdown(wait=False)
        for pool in self._inference.values():
            pool.shutdown(wait=False)


class ModelBusy(ApiError):
    """An unload asked for while requests still hold the model."""

    status = 409
    code = "model_busy"

    def __init__(self, physical_id: str, in_flight: int, wait_s: float) -> None:
        super().__init__(
            f"{physical_id!r} still serves {in_flight} request(s) after {wait_s:.0f} s, so it "
            "stays resident; try again when they are done."
        )


def _load_failed(physical_id: str, exc: Exception) -> ModelLoadError:
    """The error every waiter sees when a load raised something other than ModelLoadError."""
    return ModelLoadError(
        f"Model {physical_id!r} failed to load: {type(exc).__name__}: {exc}. "
        f"The server log has the details; the next request for it tries again."
    )


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat()
