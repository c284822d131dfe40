"""The residency executor, driven with a recording fake runner and explicit events (no sleeps).

Fake runners block their `load`/`unload` on `threading.Event`s the test sets; the test waits for
the executor's state with `Residency.wait_until` and for the runners' calls with `Stage.seen`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import prometheus_client
import pytest

from llmux.core.concurrency import run_to_end
from llmux.core.config import Registry
from llmux.core.errors import ModelNotFound, ModelUnavailable
from llmux_policy.executor import INFERENCE_THREADS, Residency, ResidencySnapshot, ResidentInfo
from llmux_policy.memory import (
    GPU_SAFETY_MARGIN_BYTES,
    NO_GPU_BUDGET_BYTES,
    MemoryProbe,
    default_budget_bytes,
)
from llmux_policy.metrics import NoMetrics, ResidencyMetrics, ResidencyMetricsSink
from runners.base import ModelLoadError, OutOfDeviceMemory, Runner, WeightsMissing

GIB = 1024**3
T0 = 1_700_000_000.0  # the fake wall clock: 2023-11-14T22:13:20+00:00
T = TypeVar("T")

REGISTRY = Registry.model_validate(
    {
        "physical_models": {
            "asr": {"type": "asr", "backend": "faster_whisper", "estimated_vram_gb": 4},
            "tts": {
                "type": "tts",
                "backend": "chatterbox",
                "variant": "turbo",
                "estimated_vram_gb": 2,
            },
            "qwen-4b": {"type": "llm", "backend": "transformers", "estimated_vram_gb": 4},
            "qwen-9b": {"type": "llm", "backend": "transformers", "estimated_vram_gb": 9},
            "gpt-oss-20b": {"type": "llm", "backend": "transformers", "estimated_vram_gb": 13},
            "huge": {"type": "llm", "backend": "transformers", "estimated_vram_gb": 40},
        },
        "virtual_models": {},
    }
)


async def within(awaitable: Awaitable[T]) -> T:
    """Await with a generous limit, so that a bug fails the test instead of hanging it."""
    async with asyncio.timeout(10):
        return await awaitable


class FakeRunner:
    """Records its calls; blocks in load/unload while the stage holds a gate for its model."""

    def __init__(self, physical_id: str, stage: Stage) -> None:
        self.physical_id = physical_id
        self.stage = stage
        self.taken = 0

    def device_bytes(self) -> int | None:
        return self.stage.own_bytes.get(self.physical_id) if self.taken else None

    def preflight(self) -> None:
        self.stage.preflights.append(self.physical_id)
        error = self.stage.preflight_failures.pop(self.physical_id, None)
        if error is not None:
            raise error

    def load(self) -> None:
        self.stage.load_threads.append(threading.current_thread())
        with self.stage.active("load", self.physical_id):
            self.stage.pass_gate(self.stage.load_gates, self.physical_id)
            error = self.stage.failures.pop(self.physical_id, None)
            if error is not None:
                raise error
            taken = self.stage.actual_bytes.get(
                self.physical_id, REGISTRY.physical_models[self.physical_id].footprint_bytes
            )
            capacity = self.stage.capacity
            if capacity is not None and self.stage.device_used + taken > capacity:
                # A real device: the load fails part-way and gives back what it took.
                raise OutOfDeviceMemory(f"CUDA out of memory loading {self.physical_id}")
            self.taken = taken
            # Loaded into blocks the caching allocator kept from another model: the device
            # reading grows by less than the model takes.
            self.stage.move_device_memory(
                +self.taken - self.stage.hidden_bytes.get(self.physical_id, 0)
            )

    def unload(self) -> None:
        with self.stage.active("unload", self.physical_id):
            self.stage.pass_gate(self.stage.unload_gates, self.physical_id)
            self.stage.move_device_memory(
                -self.taken + self.stage.hidden_bytes.get(self.physical_id, 0)
            )
            self.taken = 0
            error = self.stage.unload_failures.pop(self.physical_id, None)
            if error is not None:
                raise error


class Stage:
    """The fake world behind the executor: runners, their calls, gates and device memory."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.calls: list[tuple[str, str]] = []  # ("load" | "unload", physical id), as they start
        self.made: list[FakeRunner] = []
        self.load_gates: dict[str, threading.Event] = {}
        self.unload_gates: dict[str, threading.Event] = {}
        self.failures: dict[str, BaseException] = {}
        self.preflight_failures: dict[str, BaseException] = {}
        self.preflights: list[str] = []  # physical ids, as checked (not in `calls`: no device work)
        self.unload_failures: dict[str, BaseException] = {}
        self.actual_bytes: dict[str, int] = {}
        self.device_used = 0
        self.capacity: int | None = None  # a device that runs out of memory when this is set
        self.own_bytes: dict[str, int] = {}  # what a torch-like runner counts of its own tensors
        self.hidden_bytes: dict[str, int] = {}  # of a load, what the device reading does not see
        self.max_active = 0
        self.residencies: list[Residency] = []
        self.tasks: list[asyncio.Task[Runner]] = []
        self.load_threads: list[threading.Thread] = []  # the thread each load ran on
        self._active = 0
        self._lock = threading.Lock()
        self._changed = asyncio.Event()

    def residency(
        self,
        *,
        budget: int = 16 * GIB,
        probe: MemoryProbe | None = None,
        metrics: ResidencyMetricsSink | None = None,
    ) -> Residency:
        residency = Residency(
            REGISTRY, self.factory, budget, probe=probe, metrics=metrics, clock=lambda: T0
        )
        self.residencies.append(residency)
        return residency

    def request(self, residency: Residency, physical_id: str) -> asyncio.Task[Runner]:
        """A request that uses its model and lets go at once, as a task."""
        task = asyncio.create_task(use_once(residency, physical_id))
        self.tasks.append(task)
        return task

    def holder(self, residency: Residency, physical_id: str) -> Holder:
        holder = Holder(residency, physical_id)
        self.tasks.append(holder.task)
        return holder

    def factory(self, physical_id: str) -> Runner:
        runner = FakeRunner(physical_id, self)
        with self._lock:
            self.made.append(runner)
        return runner

    def hold_load(self, physical_id: str) -> threading.Event:
        """Loads of `physical_id` block until the returned event is set."""
        gate = self.load_gates[physical_id] = threading.Event()
        return gate

    def hold_unload(self, physical_id: str) -> threading.Event:
        gate = self.unload_gates[physical_id] = threading.Event()
        return gate

    def pass_gate(self, gates: dict[str, threading.Event], physical_id: str) -> None:
        gate = gates.get(physical_id)
        if gate is not None and not gate.wait(timeout=10):
            raise AssertionError(f"the test never released {physical_id}")

    def active(self, what: str, physical_id: str) -> _Active:
        return _Active(self, what, physical_id)

    def move_device_memory(self, delta: int) -> None:
        with self._lock:
            self.device_used += delta

    def begin(self, what: str, physical_id: str) -> None:
        with self._lock:
            self.calls.append((what, physical_id))
            self._active += 1
            self.max_active = max(self.max_active, self._active)
        self.loop.call_soon_threadsafe(self._notify)

    def end(self) -> None:
        with self._lock:
            self._active -= 1

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def seen(self, what: str, physical_id: str) -> None:
        """Wait until a runner has started `what` ("load"/"unload") for `physical_id`."""
        async with asyncio.timeout(10):
            while (what, physical_id) not in self.calls:
                await self._changed.wait()


class _Active:
    def __init__(self, stage: Stage, what: str, physical_id: str) -> None:
        self.stage, self.what, self.physical_id = stage, what, physical_id

    def __enter__(self) -> None:
        self.stage.begin(self.what, self.physical_id)

    def __exit__(self, *exc: object) -> None:
        self.stage.end()


class FakeProbe:
    """Reads the stage's device memory, as a real probe reads the GPU's."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    def used_bytes(self) -> int | None:
        return self.stage.device_used


class NoGpuProbe:
    def used_bytes(self) -> int | None:
        return None


class Holder:
    """A request that holds its model until the test lets it go (a stream, say)."""

    def __init__(self, residency: Residency, physical_id: str) -> None:
        self.inside = asyncio.Event()
        self.release = asyncio.Event()
        self.task = asyncio.create_task(self._run(residency, physical_id))

    async def _run(self, residency: Residency, physical_id: str) -> Runner:
        async with residency.use(physical_id) as runner:
            self.inside.set()
            await self.release.wait()
        return runner

    async def finish(self) -> Runner:
        self.release.set()
        return await within(self.task)


async def use_once(residency: Residency, physical_id: str) -> Runner:
    async with residency.use(physical_id) as runner:
        return runner


def model(snapshot: ResidencySnapshot, physical_id: str) -> ResidentInfo:
    """The snapshot's entry for `physical_id`; fails the test when it is not resident."""
    found = [m for m in snapshot["models"] if m["physical_id"] == physical_id]
    assert found, f"{physical_id} is not resident: {snapshot}"
    return found[0]


def has(physical_id: str, **fields: object) -> Callable[[ResidencySnapshot], bool]:
    """A `wait_until` predicate: `physical_id` is resident with these field values."""

    def check(snapshot: ResidencySnapshot) -> bool:
        found: list[dict[str, object]] = [
            dict(m) for m in snapshot["models"] if m["physical_id"] == physical_id
        ]
        return any(all(m[k] == v for k, v in fields.items()) for m in found)

    return check


def resident(residency: Residency) -> set[str]:
    return {m["physical_id"] for m in residency.snapshot()["models"]}


def waiting(count: int) -> Callable[[ResidencySnapshot], bool]:
    return lambda snapshot: snapshot["waiting_for_swap"] == count


@pytest.fixture
async def stage() -> AsyncIterator[Stage]:
    stage = Stage()
    yield stage
    for gate in [*stage.load_gates.values(), *stage.unload_gates.values()]:
        gate.set()  # never leave a worker thread blocked
    for task in stage.tasks:
        task.cancel()  # requests a failed test left waiting or holding
    await asyncio.gather(*stage.tasks, return_exceptions=True)
    for residency in stage.residencies:
        await within(residency.close())
    assert stage.max_active <= 1, "two loads/unloads ran at once"


# --- sharing and serialising loads --------------------------------------------------------------


async def test_concurrent_requests_share_one_load(stage: Stage) -> None:
    residency = stage.residency()
    gate = stage.hold_load("qwen-4b")
    tasks = [stage.request(residency, "qwen-4b") for _ in range(5)]
    await stage.seen("load", "qwen-4b")
    snapshot = await within(residency.wait_until(waiting(5)))
    assert model(snapshot, "qwen-4b") == {
        "physical_id": "qwen-4b",
        "type": "llm",
        "state": "loading",
        "declared_bytes": 4 * GIB,
        "measured_bytes": None,
        "footprint_bytes": 4 * GIB,
        "in_flight": 0,
        "evicting": False,
        "last_used_at": None,
        "loads": 0,
        "unparks": 0,
    }

    gate.set()
    runners = await within(asyncio.gather(*tasks))

    assert stage.calls == [("load", "qwen-4b")]
    assert len(stage.made) == 1
    assert all(runner is stage.made[0] for runner in runners)
    snapshot = residency.snapshot()
    assert snapshot["waiting_for_swap"] == 0
    assert model(snapshot, "qwen-4b") == {
        "physical_id": "qwen-4b",
        "type": "llm",
        "state": "ready",
        "declared_bytes": 4 * GIB,
        "measured_bytes": None,
        "footprint_bytes": 4 * GIB,
        "in_flight": 0,
        "evicting": False,
        "last_used_at": "2023-11-14T22:13:20+00:00",
        "loads": 1,
        "unparks": 0,
    }


async def test_loads_and_inference_calls_run_on_threads_that_end_with_them(
    stage: Stage,
) -> None:
    # torch's OpenMP threads last as long as the thread that started them; too many of them
    # make every team sleep between parallel regions (llmux.core.concurrency.ThreadPerCall).
    residency = stage.residency()
    await use_once(residency, "qwen-4b")
    threads = residency.inference_threads("qwen-4b")
    ran_on = [await within(run_to_end(threading.current_thread, executor=threads)) for _ in "ab"]

    assert len(stage.load_threads) == 1
    assert [t.is_alive() for t in [*stage.load_threads, *ran_on]] == [False, False, False]
    assert ran_on[0] is not ran_on[1]


async def test_loads_run_one_at_a_time(stage: Stage) -> None:
    residency = stage.residency()
    gate = stage.hold_load("asr")
    asr = stage.request(residency, "asr")
    await stage.seen("load", "asr")
    tts = stage.request(residency, "tts")
    await within(residency.wait_until(waiting(2)))
    await asyncio.to_thread(lambda: None)  # one round trip: the tts swap runs as far as it can
    assert stage.calls == [("load", "asr")]

    gate.set()
    await within(asyncio.gather(asr, tts))
    assert stage.calls == [("load", "asr"), ("load", "tts")]
    assert resident(residency) == {"asr", "tts"}


async def test_a_fresh_model_goes_to_its_waiters_before_the_next_swap_can_take_it(
    stage: Stage,
) -> None:
    residency = stage.residency()
    gate = stage.hold_load("qwen-4b")
    first = stage.request(residency, "qwen-4b")
    await stage.seen("load", "qwen-4b")
    second = stage.request(residency, "qwen-9b")  # its swap is next in line and evicts the 4B
    await within(residency.wait_until(waiting(2)))
    gate.set()

    runners = await within(asyncio.gather(first, second))

    assert [runner.physical_id for runner in runners] == ["qwen-4b", "qwen-9b"]
    assert stage.calls == [("load", "qwen-4b"), ("unload", "qwen-4b"), ("load", "qwen-9b")]


class CancelWhenLoaded(NoMetrics):
    """A metrics sink that cancels a task as soon as a load succeeds: its wake-up is then
    already scheduled, so the cancellation lands after the model was handed to it."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Runner] | None = None

    def load_finished(self, physical_id: str, outcome: str, seconds: float) -> None:
        if outcome == "ok" and self.task is not None:
            asyncio.get_running_loop().call_soon(self.task.cancel)


async def test_a_waiter_cancelled_as_its_model_is_handed_over_leaks_no_count(
    stage: Stage,
) -> None:
    sink = CancelWhenLoaded()
    residency = stage.residency(metrics=sink)
    sink.task = stage.request(residency, "qwen-4b")

    with pytest.raises(asyncio.CancelledError):
        await within(sink.task)

    info = model(residency.snapshot(), "qwen-4b")
    assert (info["state"], info["in_flight"]) == ("ready", 0)


async def test_a_resident_model_serves_while_another_loads(stage: Stage) -> None:
    residency = stage.residency()
    await within(use_once(residency, "asr"))
    gate = stage.hold_load("qwen-9b")
    llm = stage.request(residency, "qwen-9b")
    await stage.seen("load", "qwen-9b")

    runner = await within(use_once(residency, "asr"))  # no swap needed, so no waiting

    assert runner is stage.made[0]
    assert not llm.done()
    gate.set()
    await within(llm)


# --- eviction waits for requests, and is not starved by them ---------------------------------


async def test_swap_waits_for_an_in_flight_stream_then_happens(stage: Stage) -> None:
    residency = stage.residency()
    stream = stage.holder(residency, "qwen-4b")
    await within(stream.inside.wait())

    switch = stage.request(residency, "qwen-9b")
    snapshot = await within(residency.wait_until(has("qwen-4b", evicting=True)))
    assert model(snapshot, "qwen-4b")["in_flight"] == 1
    assert ("unload", "qwen-4b") not in stage.calls
    assert not switch.done()

    await stream.finish()
    runner = await within(switch)

    assert runner.physical_id == "qwen-9b"
    assert stage.calls == [("load", "qwen-4b"), ("unload", "qwen-4b"), ("load", "qwen-9b")]
    assert resident(residency) == {"qwen-9b"}


async def test_new_requests_for_the_model_being_evicted_do_not_starve_the_swap(
    stage: Stage,
) -> None:
    residency = stage.residency()
    stream = stage.holder(residency, "qwen-4b")
    await within(stream.inside.wait())
    switch = stage.request(residency, "qwen-9b")
    await within(residency.wait_until(has("qwen-4b", evicting=True)))

    # More requests for the model the swap wants gone: they would keep it busy forever if they
    # got in. They wait behind the swap instead (and never get to set their `inside`).
    late = [stage.holder(residency, "qwen-4b") for _ in range(3)]
    snapshot = await within(residency.wait_until(waiting(4)))
    assert model(snapshot, "qwen-4b")["in_flight"] == 1

    await stream.finish()
    assert (await within(switch)).physical_id == "qwen-9b"  # while the late ones still wait
    assert not any(holder.inside.is_set() for holder in late)

    # Then they get their model back, in one load that replaces the 9B.
    for holder in late:
        holder.release.set()
    runners = await within(asyncio.gather(*(holder.task for holder in late)))
    assert len({id(runner) for runner in runners}) == 1
    assert stage.calls == [
        ("load", "qwen-4b"),
        ("unload", "qwen-4b"),
        ("load", "qwen-9b"),
        ("unload", "qwen-9b"),
        ("load", "qwen-4b"),
    ]
    assert residency.snapshot()["waiting_for_swap"] == 0


async def test_a_swap_that_makes_room_evicts_lowest_priority_first(stage: Stage) -> None:
    residency = stage.residency()
    for physical_id in ("asr", "tts", "qwen-4b"):
        await within(use_once(residency, physical_id))
    assert residency.snapshot()["used_bytes"] == 10 * GIB

    await within(use_once(residency, "gpt-oss-20b"))
    assert resident(residency) == {"gpt-oss-20b"}
    await within(use_once(residency, "asr"))
    assert resident(residency) == {"asr"}

    assert stage.calls[3:] == [
        ("unload", "qwen-4b"),
        ("unload", "tts"),
        ("unload", "asr"),
        ("load", "gpt-oss-20b"),
        ("unload", "gpt-oss-20b"),
        ("load", "asr"),
    ]


# --- failures -----------------------------------------------------------------------------------


async def test_a_failed_load_reaches_every_waiter_and_the_next_request_retries(
    stage: Stage,
) -> None:
    residency = stage.residency()
    error = ModelLoadError("the weights of 'qwen-4b' are corrupt")
    stage.failures["qwen-4b"] = error
    gate = stage.hold_load("qwen-4b")
    tasks = [stage.request(residency, "qwen-4b") for _ in range(3)]
    await within(residency.wait_until(waiting(3)))
    gate.set()

    results = await within(asyncio.gather(*tasks, return_exceptions=True))

    assert all(result is error for result in results)
    snapshot = residency.snapshot()
    assert snapshot["models"] == [] and snapshot["waiting_for_swap"] == 0
    # The failed runner was asked to give back what its partial load took.
    assert stage.calls == [("load", "qwen-4b"), ("unload", "qwen-4b")]

    runner = await within(use_once(residency, "qwen-4b"))
    assert runner is stage.made[1]
    assert resident(residency) == {"qwen-4b"}


async def test_a_model_whose_weights_are_missing_evicts_nothing(stage: Stage) -> None:
    """With ASR, TTS and an LLM resident, a request for a model that cannot load (weights gone)
    is refused before anything is evicted for it, on the first try and on every retry."""
    residency = stage.residency()
    for physical_id in ("asr", "tts", "qwen-4b"):
        await within(use_once(residency, physical_id))
    for _ in range(2):
        missing = WeightsMissing("gpt-oss-20b", Path("/models/gpt-oss-20b/config.json"))
        stage.preflight_failures["gpt-oss-20b"] = missing
        with pytest.raises(WeightsMissing) as info:
            await within(use_once(residency, "gpt-oss-20b"))
        assert info.value.status == 503 and info.value.code == "model_weights_missing"
    assert resident(residency) == {"asr", "tts", "qwen-4b"}
    assert [call for call in stage.calls if call[0] == "unload"] == []
    assert stage.preflights.count("gpt-oss-20b") == 2


async def test_out_of_memory_raises_the_estimate_and_retries_once_with_more_room(
    stage: Stage,
) -> None:
    """qwen-9b declares 9 GiB but takes 13: beside ASR (4 GiB) on a 16 GiB device it runs out of
    memory. The retry evicts everything it may (an LLM may take ASR) and loads it alone."""
    stage.capacity = 16 * GIB
    stage.actual_bytes["qwen-9b"] = 13 * GIB
    residency = stage.residency()
    await within(use_once(residency, "asr"))

    await within(use_once(residency, "qwen-9b"))

    assert stage.calls == [
        ("load", "asr"),
        ("load", "qwen-9b"),  # beside ASR: out of memory
        ("unload", "qwen-9b"),  # the failed runner gives back what it took
        ("unload", "asr"),  # the retry makes room for a model now estimated at 13.5 GiB
        ("load", "qwen-9b"),
    ]
    assert resident(residency) == {"qwen-9b"}
    assert model(residency.snapshot(), "qwen-9b")["footprint_bytes"] == int(13.5 * GIB)
    # The next plan for it uses the raised estimate from the start: no failed load first.
    await within(use_once(residency, "asr"))
    await within(use_once(residency, "qwen-9b"))
    assert stage.calls[-3:] == [("load", "asr"), ("unload", "asr"), ("load", "qwen-9b")]


async def test_out_of_memory_twice_is_a_503_that_says_what_was_tried(stage: Stage) -> None:
    stage.capacity = 10 * GIB
    stage.actual_bytes["qwen-9b"] = 11 * GIB  # more than the device has at all
    residency = stage.residency()
    await within(use_once(residency, "asr"))

    with pytest.raises(
        ModelUnavailable, match="first beside asr, then again beside nothing"
    ) as info:
        await within(use_once(residency, "qwen-9b"))

    assert info.value.status == 503 and info.value.code == "model_out_of_memory"
    assert residency.snapshot()["models"] == [] and stage.device_used == 0


async def test_a_reload_is_measured_again_and_the_footprint_follows_it(stage: Stage) -> None:
    residency = stage.residency(probe=FakeProbe(stage))
    stage.actual_bytes["qwen-9b"] = 12 * GIB
    await within(use_once(residency, "qwen-9b"))
    assert model(residency.snapshot(), "qwen-9b")["measured_bytes"] == 12 * GIB
    await within(use_once(residency, "gpt-oss-20b"))  # replaces it
    stage.actual_bytes["qwen-9b"] = 8 * GIB
    await within(use_once(residency, "qwen-9b"))
    assert model(residency.snapshot(), "qwen-9b")["measured_bytes"] == 8 * GIB


async def test_a_torch_model_is_measured_by_its_own_tensors_not_the_device_reading(
    stage: Stage,
) -> None:
    """Loaded into blocks torch's caching allocator kept from another model, a 9 GiB model moves
    the device reading by nothing; its runner's own count is what plans use."""
    residency = stage.residency(probe=FakeProbe(stage))
    stage.hidden_bytes["qwen-9b"] = 9 * GIB
    stage.own_bytes["qwen-9b"] = 9 * GIB
    await within(use_once(residency, "qwen-9b"))
    assert model(residency.snapshot(), "qwen-9b")["measured_bytes"] == 9 * GIB
    # Without its own count (llama.cpp, say), the device reading is all there is.
    stage.hidden_bytes["qwen-4b"] = 0
    await within(use_once(residency, "qwen-4b"))
    assert model(residency.snapshot(), "qwen-4b")["measured_bytes"] == 4 * GIB


async def test_measured_footprints_cover_what_the_device_shows_in_use(stage: Stage) -> None:
    """A torch model's own count (4 GiB) misses what its load really took on the device (6 GiB:
    the allocator's slack): the plans count the 6, so they never overfill the device."""
    stage.device_used = GIB // 2  # llmux at rest: the CUDA context
    residency = stage.residency(probe=FakeProbe(stage))
    stage.actual_bytes["qwen-4b"] = 6 * GIB
    stage.own_bytes["qwen-4b"] = 4 * GIB
    await within(use_once(residency, "asr"))
    holder = stage.holder(residency, "qwen-4b")  # its first request outlasts the next load,
    await within(holder.inside.wait())
    await within(use_once(residency, "tts"))  # so no first-use reading will correct it later
    await holder.finish()
    snapshot = residency.snapshot()
    assert model(snapshot, "qwen-4b")["footprint_bytes"] == 6 * GIB
    assert snapshot["used_bytes"] == stage.device_used - GIB // 2


async def test_other_load_exceptions_become_a_model_load_error(stage: Stage) -> None:
    residency = stage.residency()
    cause = RuntimeError("CUDA out of memory")
    stage.failures["qwen-9b"] = cause

    expected = "'qwen-9b' failed to load: RuntimeError: CUDA out of memory"
    with pytest.raises(ModelLoadError, match=expected) as info:
        await within(use_once(residency, "qwen-9b"))

    assert info.value.__cause__ is cause
    assert info.value.status == 503 and info.value.code == "model_load_failed"
    assert residency.snapshot()["models"] == []


async def test_a_model_bigger_than_the_budget_is_refused(stage: Stage) -> None:
    residency = stage.residency()
    await within(use_once(residency, "asr"))

    with pytest.raises(ModelUnavailable, match="more than the whole budget") as info:
        await within(use_once(residency, "huge"))

    assert info.value.code == "model_exceeds_budget"
    assert stage.calls == [("load", "asr")]  # nothing was evicted for it
    assert resident(residency) == {"asr"}


async def test_an_unknown_model_is_not_found(stage: Stage) -> None:
    with pytest.raises(ModelNotFound):
        await within(use_once(stage.residency(), "nope"))


async def test_a_failed_unload_still_frees_the_slot(stage: Stage) -> None:
    residency = stage.residency()
    await within(use_once(residency, "qwen-4b"))
    stage.unload_failures["qwen-4b"] = RuntimeError("driver hiccup")

    runner = await within(use_once(residency, "qwen-9b"))

    assert runner.physical_id == "qwen-9b"
    assert resident(residency) == {"qwen-9b"}


# --- cancellation -------------------------------------------------------------------------------


async def test_a_waiter_cancelled_during_a_load_leaks_no_count(stage: Stage) -> None:
    residency = stage.residency()
    gate = stage.hold_load("qwen-4b")
    gone = stage.request(residency, "qwen-4b")
    stays = stage.holder(residency, "qwen-4b")
    await within(residency.wait_until(waiting(2)))

    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    await within(residency.wait_until(waiting(1)))
    gate.set()
    await within(stays.inside.wait())

    assert model(residency.snapshot(), "qwen-4b")["in_flight"] == 1
    await stays.finish()
    assert model(residency.snapshot(), "qwen-4b")["in_flight"] == 0
    # Nothing holds it, so a switch evicts it without waiting.
    await within(use_once(residency, "qwen-9b"))
    assert resident(residency) == {"qwen-9b"}


async def test_a_load_whose_waiters_all_left_completes_and_stays(stage: Stage) -> None:
    residency = stage.residency()
    gate = stage.hold_load("qwen-4b")
    gone = stage.request(residency, "qwen-4b")
    await stage.seen("load", "qwen-4b")
    gone.cancel()
    await within(residency.wait_until(waiting(0)))
    gate.set()

    snapshot = await within(residency.wait_until(has("qwen-4b", state="ready")))
    assert model(snapshot, "qwen-4b")["in_flight"] == 0
    assert stage.calls == [("load", "qwen-4b")]


async def test_a_swap_nobody_waits_for_any_more_is_dropped_before_it_evicts(
    stage: Stage,
) -> None:
    residency = stage.residency()
    await within(use_once(residency, "qwen-4b"))
    gate = stage.hold_load("asr")
    asr = stage.request(residency, "asr")
    await stage.seen("load", "asr")
    switch = stage.request(residency, "qwen-9b")  # queued behind the asr load
    await within(residency.wait_until(waiting(2)))
    switch.cancel()
    await within(residency.wait_until(waiting(1)))
    gate.set()
    await within(asr)

    await within(use_once(residency, "tts"))  # queued after the dropped swap, so it ran first

    assert stage.calls == [("load", "qwen-4b"), ("load", "asr"), ("load", "tts")]
    assert resident(residency) == {"qwen-4b", "asr", "tts"}


async def test_a_request_cancelled_while_waiting_for_an_eviction_leaks_nothing(
    stage: Stage,
) -> None:
    residency = stage.residency()
    stream = stage.holder(residency, "qwen-4b")
    await within(stream.inside.wait())
    switch = stage.request(residency, "qwen-9b")
    await within(residency.wait_until(has("qwen-4b", evicting=True)))
    late = stage.request(residency, "qwen-4b")
    await within(residency.wait_until(waiting(2)))

    late.cancel()
    with pytest.raises(asyncio.CancelledError):
        await late
    await within(residency.wait_until(waiting(1)))
    assert model(residency.snapshot(), "qwen-4b")["in_flight"] == 1

    await stream.finish()
    await within(switch)
    assert resident(residency) == {"qwen-9b"}
    assert stage.calls[-3] == ("load", "qwen-4b")  # the cancelled request loaded nothing


async def test_a_request_cancelled_mid_stream_releases_its_model(stage: Stage) -> None:
    residency = stage.residency()
    stream = stage.holder(residency, "qwen-4b")
    await within(stream.inside.wait())

    stream.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stream.task

    assert model(residency.snapshot(), "qwen-4b")["in_flight"] == 0
    await within(use_once(residency, "qwen-9b"))
    assert resident(residency) == {"qwen-9b"}


# --- footprints ---------------------------------------------------------------------------------


async def test_the_measured_footprint_replaces_the_declared_one(stage: Stage) -> None:
    residency = stage.residency(probe=FakeProbe(stage))
    stage.actual_bytes["gpt-oss-20b"] = 6 * GIB  # declared 13 GiB

    await within(use_once(residency, "gpt-oss-20b"))
    snapshot = residency.snapshot()
    info = model(snapshot, "gpt-oss-20b")
    assert (info["declared_bytes"], info["measured_bytes"], info["footprint_bytes"]) == (
        13 * GIB,
        6 * GIB,
        6 * GIB,
    )
    assert snapshot["used_bytes"] == snapshot["device_used_bytes"] == 6 * GIB

    # Declared, 13 + 4 would not fit in 16 GiB; measured, 6 + 4 + 2 does: nothing is evicted.
    await within(use_once(residency, "asr"))
    await within(use_once(residency, "tts"))
    assert resident(residency) == {"gpt-oss-20b", "asr", "tts"}
    assert [call for call in stage.calls if call[0] == "unload"] == []


async def test_the_first_inference_peak_joins_the_measured_footprint(stage: Stage) -> None:
    residency = stage.residency(probe=FakeProbe(stage))
    stage.actual_bytes["qwen-4b"] = 3 * GIB

    stream = stage.holder(residency, "qwen-4b")
    await within(stream.inside.wait())
    assert model(residency.snapshot(), "qwen-4b")["measured_bytes"] == 3 * GIB
    stage.device_used += GIB // 2  # activations the allocator keeps after the first answer
    stream.release.set()
    await within(stream.task)
    assert model(residency.snapshot(), "qwen-4b")["measured_bytes"] == 3 * GIB + GIB // 2

    stage.device_used += GIB  # later growth is not the first inference's: not counted
    await within(use_once(residency, "qwen-4b"))
    assert model(residency.snapshot(), "qwen-4b")["measured_bytes"] == 3 * GIB + GIB // 2


async def test_a_first_use_peak_is_not_read_across_another_load(stage: Stage) -> None:
    residency = stage.residency(probe=FakeProbe(stage))
    stage.actual_bytes.update({"qwen-4b": 3 * GIB, "asr": 2 * GIB})

    stream = stage.holder(residency, "qwen-4b")
    await within(stream.inside.wait())
    await within(use_once(residency, "asr"))  # loads while qwen's first request is running
    stream.release.set()
    await within(stream.task)
    assert model(residency.snapshot(), "qwen-4b")["measured_bytes"] == 3 * GIB


async def test_without_a_gpu_the_declared_footprint_is_used(stage: Stage) -> None:
    residency = stage.residency(probe=NoGpuProbe())

    await within(use_once(residency, "gpt-oss-20b"))
    assert model(residency.snapshot(), "gpt-oss-20b")["measured_bytes"] is None
    assert residency.snapshot()["device_used_bytes"] is None
    await within(use_once(residency, "asr"))

    assert resident(residency) == {"asr"}  # 13 + 4 GiB does not fit: the LLM went


@pytest.mark.parametrize(
    ("configured_gb", "gpu_total", "expected"),
    [
        (16, None, 16 * GIB),
        (12.5, 80 * GIB, int(12.5 * GIB)),
        (None, 24 * GIB, 24 * GIB - GPU_SAFETY_MARGIN_BYTES),
        (None, None, NO_GPU_BUDGET_BYTES),
        # A configured 16 GB on a card that reports 15.99 GiB: the card, less the margin, wins.
        (16, int(15.99 * GIB), int(15.99 * GIB) - GPU_SAFETY_MARGIN_BYTES),
    ],
)
def test_default_budget(configured_gb: float | None, gpu_total: int | None, expected: int) -> None:
    assert default_budget_bytes(configured_gb, gpu_total) == expected


def test_the_margin_is_configurable() -> None:
    assert default_budget_bytes(None, 16 * GIB, margin_bytes=2 * GIB) == 14 * GIB
    assert default_budget_bytes(15, 16 * GIB, margin_bytes=0) == 15 * GIB


# --- shutdown -----------------------------------------------------------------------------------


async def test_close_waits_for_requests_then_unloads_everything(stage: Stage) -> None:
    residency = stage.residency()
    for physical_id in ("asr", "tts"):
        await within(use_once(residency, physical_id))
    stream = stage.holder(residency, "qwen-4b")
    await within(stream.inside.wait())

    closing = asyncio.create_task(residency.close())
    await within(
        residency.wait_until(lambda s: s["closing"] and all(m["evicting"] for m in s["models"]))
    )
    with pytest.raises(ModelUnavailable, match="shutting down"):
        await within(use_once(residency, "asr"))
    assert [call for call in stage.calls if call[0] == "unload"] == []

    await stream.finish()
    await within(closing)
    assert sorted(call for call in stage.calls if call[0] == "unload") == [
        ("unload", "asr"),
        ("unload", "qwen-4b"),
        ("unload", "tts"),
    ]
    assert residency.snapshot()["models"] == []


async def test_close_during_a_load_lets_it_finish_then_unloads_it(stage: Stage) -> None:
    registry = prometheus_client.CollectorRegistry()
    residency = stage.residency(metrics=ResidencyMetrics(prometheus_client, registry=registry))
    gate = stage.hold_load("qwen-4b")
    waiter = stage.request(residency, "qwen-4b")
    await stage.seen("load", "qwen-4b")

    closing = asyncio.create_task(residency.close())
    await within(residency.wait_until(lambda s: s["closing"]))
    # The thread cannot be stopped: the model stays registered as loading until it ends.
    assert model(residency.snapshot(), "qwen-4b")["state"] == "loading"
    gate.set()
    await within(closing)

    with pytest.raises(ModelUnavailable, match="shutting down"):
        await within(waiter)
    assert stage.calls == [("load", "qwen-4b"), ("unload", "qwen-4b")]
    assert residency.snapshot()["models"] == []
    assert stage.device_used == 0
    labels = {"model": "qwen-4b", "outcome": "cancelled"}
    assert registry.get_sample_value("llmux_model_loads_total", labels) == 1


# --- metrics ------------------------------------------------------------------------------------


async def test_metrics_series_move(stage: Stage) -> None:
    registry = prometheus_client.CollectorRegistry()
    residency = stage.residency(metrics=ResidencyMetrics(prometheus_client, registry=registry))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    gate = stage.hold_load("qwen-4b")
    first = stage.request(residency, "qwen-4b")
    await within(residency.wait_until(waiting(1)))
    assert value("llmux_requests_waiting_for_swap") == 1
    gate.set()
    await within(first)
    assert value("llmux_requests_waiting_for_swap") == 0
    assert value("llmux_model_loads_total", model="qwen-4b", outcome="ok") == 1
    assert value("llmux_model_load_seconds_count", model="qwen-4b") == 1
    assert value("llmux_model_resident_bytes", model="qwen-4b") == 4 * GIB

    await within(use_once(residency, "qwen-9b"))
    assert value("llmux_model_evictions_total", model="qwen-4b", reason="replace_same_type") == 1
    assert value("llmux_model_resident_bytes", model="qwen-4b") == 0
    assert value("llmux_model_resident_bytes", model="qwen-9b") == 9 * GIB

    for physical_id in ("asr", "tts", "gpt-oss-20b"):
        await within(use_once(residency, physical_id))
    assert value("llmux_model_evictions_total", model="qwen-9b", reason="replace_same_type") == 1
    assert value("llmux_model_evictions_total", model="tts", reason="make_room") == 1
    assert value("llmux_model_evictions_total", model="asr", reason="make_room") == 1

    stage.failures["asr"] = ModelLoadError("no weights")
    with pytest.raises(ModelLoadError):
        await within(use_once(residency, "asr"))
    assert value("llmux_model_loads_total", model="asr", outcome="error") == 1
    assert value("llmux_model_load_seconds_count", model="asr") == 1  # the failure adds no sample

    await within(use_once(residency, "tts"))
    await within(residency.close())
    assert value("llmux_model_evictions_total", model="tts", reason="shutdown") == 1
    assert value("llmux_model_resident_bytes", model="tts") == 0
    # Swaps and the waits for them are timed; an LLM replacing another is counted.
    assert value("llmux_swap_seconds_count", model="qwen-4b") == 1
    assert value("llmux_swap_wait_seconds_count") == 7  # every request whose model had to load
    assert value("llmux_llm_swaps_total") == 2  # 4b -> 9b -> 20b


async def test_two_llms_alternating_fast_are_counted_and_warned_about(
    stage: Stage, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    residency = Residency(
        REGISTRY,
        stage.factory,
        16 * GIB,
        clock=lambda: T0,
        monotonic=lambda: now[0],
        thrash_window_s=60,
    )
    stage.residencies.append(residency)
    for physical_id in ("qwen-4b", "qwen-9b"):
        await within(use_once(residency, physical_id))
        now[0] += 100  # slow switching: no warning
    assert "swapping back and forth" not in caplog.text
    for physical_id in ("qwen-4b", "qwen-9b", "qwen-4b"):
        await within(use_once(residency, physical_id))
        now[0] += 5
    warnings = [r for r in caplog.records if "swapping back and forth" in r.getMessage()]
    assert len(warnings) == 1  # once per window, not per switch
    assert "qwen-4b, qwen-9b" in warnings[0].getMessage()


async def test_health_names_each_swap_and_the_last_load_error(stage: Stage) -> None:
    residency = stage.residency()
    gate = stage.hold_load("qwen-4b")
    first = [stage.request(residency, "qwen-4b") for _ in range(2)]
    await within(residency.wait_until(waiting(2)))
    assert residency.snapshot()["swaps"] == [{"model": "qwen-4b", "waiting": 2}]
    gate.set()
    await within(asyncio.gather(*first))
    assert residency.snapshot()["swaps"] == []

    stage.failures["asr"] = ModelLoadError("the weights of 'asr' are corrupt")
    with pytest.raises(ModelLoadError):
        await within(use_once(residency, "asr"))
    errors = residency.snapshot()["last_load_errors"]
    assert errors == {
        "asr": {"message": "the weights of 'asr' are corrupt", "at": "2023-11-14T22:13:20+00:00"}
    }
    await within(use_once(residency, "asr"))  # a successful load clears it
    assert residency.snapshot()["last_load_errors"] == {}


async def test_a_swap_does_not_queue_behind_inference_on_the_default_pool(stage: Stage) -> None:
    """Inference (transcriptions, say) fills every worker of the loop's default pool; a load
    still runs, on the executor's own swap thread."""
    loop = asyncio.get_running_loop()
    release = threading.Event()
    pool = ThreadPoolExecutor(max_workers=2)
    loop.set_default_executor(pool)
    busy = [loop.run_in_executor(None, release.wait, 10) for _ in range(2)]
    try:
        residency = stage.residency()
        await within(use_once(residency, "asr"))
        assert resident(residency) == {"asr"}
    finally:
        release.set()
        await asyncio.gather(*busy)
        pool.shutdown()


async def test_each_model_has_inference_threads_of_its_own(stage: Stage) -> None:
    """A burst of requests for one model (more than its threads) leaves another model's
    requests their own threads."""
    residency = stage.residency()
    ears = residency.inference_threads("asr")
    assert residency.inference_threads("asr") is ears
    assert residency.inference_threads("tts") is not ears
    loop = asyncio.get_running_loop()
    release = threading.Event()
    burst = [loop.run_in_executor(ears, release.wait, 10) for _ in range(INFERENCE_THREADS + 2)]
    try:
        voice = residency.inference_threads("tts")
        assert await within(loop.run_in_executor(voice, lambda: "spoken")) == "spoken"
    finally:
        release.set()
        await asyncio.gather(*burst)
