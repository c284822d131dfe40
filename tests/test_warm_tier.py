"""The warm tier in the executor, driven with the recording fake runners of test_executor.

A fake that can park records "park" and "unpark" beside "load" and "unload"; a request served from
the warm tier shows as an unpark with no preflight and no load, which is what reading no weights
from disk looks like to the executor. The real runners are in test_warm_tier_runners.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import prometheus_client
import pytest

from llmux_policy.executor import Residency, ResidencySnapshot, WarmInfo
from llmux_policy.memory import GIB, HOST_MARGIN_BYTES, default_host_budget_bytes
from llmux_policy.metrics import ResidencyMetrics, ResidencyMetricsSink
from runners.base import HostOutOfMemory, OutOfDeviceMemory, Parkable, Runner
from tests.test_executor import REGISTRY, T0, FakeRunner, Stage, use_once, within


class ParkingFakeRunner(FakeRunner):
    """A FakeRunner that can park: its device memory goes to the stage's host memory and back."""

    stage: WarmStage

    def park(self) -> None:
        with self.stage.active("park", self.physical_id):
            error = self.stage.park_failures.pop(self.physical_id, None)
            if error is not None:
                raise error
            self.stage.move_device_memory(-self.taken)

    def unpark(self) -> None:
        with self.stage.active("unpark", self.physical_id):
            error = self.stage.unpark_failures.pop(self.physical_id, None)
            if error is not None:
                raise error
            self.stage.move_device_memory(+self.taken)

    def host_bytes(self) -> int:
        if self.physical_id in self.stage.host_bytes_failures:
            raise RuntimeError("cannot count")
        return self.stage.host_bytes.get(
            self.physical_id, REGISTRY.physical_models[self.physical_id].footprint_bytes
        )


class WarmStage(Stage):
    def __init__(self) -> None:
        super().__init__()
        self.cannot_park: set[str] = set()
        self.host_bytes: dict[str, int] = {}
        self.host_bytes_failures: set[str] = set()
        self.park_failures: dict[str, BaseException] = {}
        self.unpark_failures: dict[str, BaseException] = {}

    def factory(self, physical_id: str) -> Runner:
        kind = FakeRunner if physical_id in self.cannot_park else ParkingFakeRunner
        runner = kind(physical_id, self)
        self.made.append(runner)
        return runner

    def warm_residency(
        self, host_budget: int, *, metrics: ResidencyMetricsSink | None = None
    ) -> Residency:
        residency = Residency(
            REGISTRY,
            self.factory,
            16 * GIB,
            metrics=metrics,
            clock=lambda: T0,
            host_budget_bytes=host_budget,
        )
        self.residencies.append(residency)
        return residency


@pytest.fixture
async def stage() -> AsyncIterator[WarmStage]:
    stage = WarmStage()
    yield stage
    for gate in [*stage.load_gates.values(), *stage.unload_gates.values()]:
        gate.set()
    for task in stage.tasks:
        task.cancel()
    await asyncio.gather(*stage.tasks, return_exceptions=True)
    for residency in stage.residencies:
        await within(residency.close())
    assert stage.max_active <= 1, "two swaps ran at once"


def warm_models(snapshot: ResidencySnapshot) -> dict[str, WarmInfo]:
    return {model["physical_id"]: model for model in snapshot["warm_models"]}


async def ask(residency: Residency, *physical_ids: str) -> list[Runner]:
    return [await within(use_once(residency, physical_id)) for physical_id in physical_ids]


def test_the_fakes_are_parkable_only_when_they_can_park() -> None:
    assert issubclass(ParkingFakeRunner, Parkable)
    assert not issubclass(FakeRunner, Parkable)


async def test_an_evicted_model_parks_warm_and_comes_back_without_touching_disk(
    stage: WarmStage,
) -> None:
    residency = stage.warm_residency(32 * GIB)
    first, _ = await ask(residency, "qwen-4b", "qwen-9b")

    assert stage.calls == [("load", "qwen-4b"), ("park", "qwen-4b"), ("load", "qwen-9b")]
    snapshot = residency.snapshot()
    assert warm_models(snapshot) == {
        "qwen-4b": {
            "physical_id": "qwen-4b",
            "type": "llm",
            "host_bytes": 4 * GIB,
            "footprint_bytes": 4 * GIB,
            "unparking": False,
            "last_used_at": "2023-11-14T22:13:20+00:00",
        }
    }
    assert (snapshot["host_budget_bytes"], snapshot["host_used_bytes"]) == (32 * GIB, 4 * GIB)

    (again,) = await ask(residency, "qwen-4b")

    assert again is first, "the warm runner itself came back"
    assert stage.calls[3:] == [("park", "qwen-9b"), ("unpark", "qwen-4b")]
    assert stage.preflights == ["qwen-4b", "qwen-9b"], "no preflight: the disk is not read"
    snapshot = residency.snapshot()
    assert set(warm_models(snapshot)) == {"qwen-9b"}
    (back,) = [m for m in snapshot["models"] if m["physical_id"] == "qwen-4b"]
    assert (back["loads"], back["unparks"]) == (1, 1)
    assert stage.device_used == 4 * GIB, "the parked model's device memory was given back"


async def test_least_recently_used_warm_models_go_cold_first_never_the_one_coming_back(
    stage: WarmStage,
) -> None:
    stage.host_bytes.update({"qwen-4b": 4 * GIB, "qwen-9b": 5 * GIB, "gpt-oss-20b": 5 * GIB})
    residency = stage.warm_residency(10 * GIB)
    await ask(residency, "qwen-4b", "qwen-9b", "gpt-oss-20b")
    assert set(warm_models(residency.snapshot())) == {"qwen-4b", "qwen-9b"}

    # qwen-4b (least recent) comes back; parking gpt-oss-20b needs room, and qwen-4b still holds
    # its host memory, so qwen-9b goes cold rather than the model on its way back.
    await ask(residency, "qwen-4b")
    assert stage.calls[-3:] == [
        ("unload", "qwen-9b"),
        ("park", "gpt-oss-20b"),
        ("unpark", "qwen-4b"),
    ]
    assert set(warm_models(residency.snapshot())) == {"gpt-oss-20b"}

    await ask(residency, "qwen-9b")  # cold: from disk again
    assert stage.preflights.count("qwen-9b") == 2
    assert stage.calls[-1] == ("load", "qwen-9b")


async def test_a_model_bigger_than_the_host_budget_is_dropped(stage: WarmStage) -> None:
    registry = prometheus_client.CollectorRegistry()
    residency = stage.warm_residency(
        2 * GIB, metrics=ResidencyMetrics(prometheus_client, registry=registry)
    )
    await ask(residency, "qwen-4b", "qwen-9b")

    assert ("unload", "qwen-4b") in stage.calls and ("park", "qwen-4b") not in stage.calls
    assert residency.snapshot()["warm_models"] == []
    labels = {"model": "qwen-4b", "outcome": "no_room"}
    assert registry.get_sample_value("llmux_model_parks_total", labels) == 1


async def test_without_a_host_budget_or_a_runner_that_can_park_evicted_models_are_dropped(
    stage: WarmStage,
) -> None:
    off = stage.warm_residency(0)
    await ask(off, "qwen-4b", "qwen-9b")
    assert ("unload", "qwen-4b") in stage.calls
    await within(off.close())

    stage.calls.clear()
    stage.cannot_park.add("asr")
    residency = stage.warm_residency(32 * GIB)
    await ask(residency, "asr", "gpt-oss-20b")  # 4 + 13 > 16: the LLM evicts the ASR model
    assert stage.calls == [("load", "asr"), ("unload", "asr"), ("load", "gpt-oss-20b")]
    assert residency.snapshot()["warm_models"] == []


async def test_a_failed_park_drops_the_model_and_says_so(
    stage: WarmStage, caplog: pytest.LogCaptureFixture
) -> None:
    registry = prometheus_client.CollectorRegistry()
    residency = stage.warm_residency(
        32 * GIB, metrics=ResidencyMetrics(prometheus_client, registry=registry)
    )
    stage.park_failures["qwen-4b"] = HostOutOfMemory("parking 'qwen-4b' needs 4.0 GiB")
    with caplog.at_level(logging.ERROR, logger="llmux_policy.executor"):
        await ask(residency, "qwen-4b", "qwen-9b")

    assert stage.calls == [
        ("load", "qwen-4b"),
        ("park", "qwen-4b"),
        ("unload", "qwen-4b"),
        ("load", "qwen-9b"),
    ]
    assert "parking 'qwen-4b' in host memory failed; dropping it" in caplog.text
    assert residency.snapshot()["warm_models"] == []
    labels = {"model": "qwen-4b", "outcome": "error"}
    assert registry.get_sample_value("llmux_model_parks_total", labels) == 1
    await ask(residency, "qwen-4b")
    assert stage.calls[-1] == ("load", "qwen-4b")


async def test_an_unpark_that_fails_falls_back_to_a_load_from_disk_in_the_same_swap(
    stage: WarmStage,
) -> None:
    registry = prometheus_client.CollectorRegistry()
    residency = stage.warm_residency(
        32 * GIB, metrics=ResidencyMetrics(prometheus_client, registry=registry)
    )
    await ask(residency, "qwen-4b", "qwen-9b")
    stage.unpark_failures["qwen-4b"] = OutOfDeviceMemory("CUDA out of memory")

    (runner,) = await ask(residency, "qwen-4b")

    assert stage.calls[-4:] == [
        ("park", "qwen-9b"),
        ("unpark", "qwen-4b"),
        ("unload", "qwen-4b"),  # the warm copy is let go of
        ("load", "qwen-4b"),
    ]
    assert runner is stage.made[-1] and stage.preflights[-1] == "qwen-4b"
    assert "qwen-4b" not in warm_models(residency.snapshot())
    unparks = {"model": "qwen-4b", "outcome": "error"}
    assert registry.get_sample_value("llmux_model_unparks_total", unparks) == 1


async def test_an_operators_unload_and_shutdown_drop_instead_of_parking(stage: WarmStage) -> None:
    residency = stage.warm_residency(32 * GIB)
    await ask(residency, "qwen-4b", "qwen-9b")
    assert await residency.unload("qwen-9b", wait_s=1)
    assert stage.calls[-1] == ("unload", "qwen-9b")
    assert set(warm_models(residency.snapshot())) == {"qwen-4b"}

    assert await residency.unload("qwen-4b", wait_s=1), "a warm model can be unloaded too"
    assert stage.calls[-1] == ("unload", "qwen-4b")
    assert residency.snapshot()["warm_models"] == []
    assert not await residency.unload("qwen-4b", wait_s=1)

    await ask(residency, "qwen-4b", "qwen-9b")
    await within(residency.close())
    assert stage.calls[-2:] == [("unload", "qwen-9b"), ("unload", "qwen-4b")]
    assert residency.snapshot()["warm_models"] == []


async def test_parks_and_unparks_are_counted(stage: WarmStage) -> None:
    registry = prometheus_client.CollectorRegistry()
    stage.host_bytes.update({"qwen-4b": 4 * GIB, "qwen-9b": 5 * GIB, "gpt-oss-20b": 5 * GIB})
    residency = stage.warm_residency(
        10 * GIB, metrics=ResidencyMetrics(prometheus_client, registry=registry)
    )
    await ask(residency, "qwen-4b", "qwen-9b", "gpt-oss-20b", "qwen-9b")

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    # qwen-4b parked, then went cold to make room for gpt-oss-20b beside qwen-9b, which holds its
    # host memory until it is back on the device.
    assert sample("llmux_model_parks_total", model="qwen-4b", outcome="ok") == 1
    assert sample("llmux_model_cold_total", model="qwen-4b") == 1
    assert sample("llmux_model_warm_bytes", model="qwen-4b") == 0
    assert sample("llmux_model_unparks_total", model="qwen-9b", outcome="ok") == 1
    assert sample("llmux_model_unpark_seconds_count", model="qwen-9b") == 1
    assert sample("llmux_model_warm_bytes", model="gpt-oss-20b") == 5 * GIB
    assert sample("llmux_model_loads_total", model="qwen-9b", outcome="ok") == 1


@pytest.mark.parametrize(
    ("configured_gb", "total", "available", "expected"),
    [
        (None, 64 * GIB, 60 * GIB, 32 * GIB),  # half the machine
        (None, 64 * GIB, 20 * GIB, 20 * GIB - HOST_MARGIN_BYTES),  # never more than is free
        (None, 8 * GIB, 1 * GIB, 0),  # nothing to spare: no warm tier
        (None, None, None, 0),  # no reading: no warm tier
        (12, 64 * GIB, 20 * GIB, 12 * GIB),  # host_budget_gb decides
        (0, 64 * GIB, 60 * GIB, 0),  # host_budget_gb 0 turns it off
    ],
)
def test_default_host_budget(
    configured_gb: float | None, total: int | None, available: int | None, expected: int
) -> None:
    assert default_host_budget_bytes(configured_gb, total, available) == expected


def test_without_a_gpu_the_resident_models_budget_comes_off_the_host_budget_first() -> None:
    """The resident models of a CPU-only machine live in host memory too: 24 GB available,
    less the 2 GB margin and a 16 GB (GPU) budget, leaves 6 GB for the warm tier."""
    budget = default_host_budget_bytes(None, 32 * GIB, 24 * GIB, device_in_host_bytes=16 * GIB)
    assert budget == 24 * GIB - HOST_MARGIN_BYTES - 16 * GIB
    assert default_host_budget_bytes(None, 16 * GIB, 12 * GIB, device_in_host_bytes=16 * GIB) == 0


async def test_a_runner_that_cannot_count_its_host_bytes_is_dropped(stage: WarmStage) -> None:
    residency = stage.warm_residency(32 * GIB)
    stage.host_bytes_failures.add("qwen-4b")
    await ask(residency, "qwen-4b", "qwen-9b")
    assert ("unload", "qwen-4b") in stage.calls and ("park", "qwen-4b") not in stage.calls
    assert residency.snapshot()["warm_models"] == []


async def test_an_unload_for_idleness_parks_an_operators_drops(stage: WarmStage) -> None:
    residency = stage.warm_residency(32 * GIB)
    await ask(residency, "qwen-4b", "asr")
    assert await residency.unload("qwen-4b", wait_s=1, reason="idle")
    assert await residency.unload("asr", wait_s=1)
    assert stage.calls[-2:] == [("park", "qwen-4b"), ("unload", "asr")]
    assert set(warm_models(residency.snapshot())) == {"qwen-4b"}
