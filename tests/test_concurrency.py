"""The bridges between a model's threads and the event loop (`llmux.core.concurrency`): a reader
that leaves early stops the thread and waits for it before going on, whichever bridge; and the
pool whose calls each run on a thread of their own (`ThreadPerCall`)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from llmux.core.concurrency import ThreadPerCall, iterate_in_thread, iterate_pushed

ROOT = Path(__file__).resolve().parents[1]


def counting(cancel: threading.Event, ended: threading.Event) -> Iterator[int]:
    """0, 1, 2, ... every 10 ms until cancelled; `ended` once it has returned."""
    try:
        for item in range(10_000):
            if cancel.is_set():
                return
            yield item
            time.sleep(0.01)
    finally:
        time.sleep(0.05)  # letting go of a model takes a moment
        ended.set()


def bridge(
    kind: str, produce: Callable[[], Iterator[int]], cancel: threading.Event
) -> AsyncIterator[int]:
    """`produce`'s items through `iterate_in_thread`, or pushed from a thread of its own."""
    if kind == "in_thread":
        return iterate_in_thread(produce, cancel)
    own = ThreadPoolExecutor(1)

    def start(emit: Callable[[int], None]) -> Future[None]:
        def run() -> None:
            for item in produce():
                emit(item)

        return own.submit(run)

    return iterate_pushed(start, cancel)


@pytest.mark.parametrize("kind", ["in_thread", "pushed"])
async def test_a_reader_that_leaves_early_has_the_thread_stopped_when_it_goes_on(
    kind: str,
) -> None:
    cancel, ended = threading.Event(), threading.Event()
    items = bridge(kind, lambda: counting(cancel, ended), cancel)
    assert [await anext(items) for _ in range(3)] == [0, 1, 2]
    await items.aclose()  # what `break` or a cancelled reader does
    assert cancel.is_set() and ended.is_set()


@pytest.mark.parametrize("kind", ["in_thread", "pushed"])
async def test_an_error_comes_after_the_items_made_before_it(kind: str) -> None:
    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise RuntimeError("out of memory")

    cancel = threading.Event()
    items = bridge(kind, failing, cancel)
    seen: list[int] = []
    with pytest.raises(RuntimeError, match="out of memory"):
        async for item in items:
            seen.append(item)
    assert seen == [1, 2] and cancel.is_set()


# --- ThreadPerCall ---------------------------------------------------------------------------


def test_each_call_runs_on_a_new_thread_that_has_ended_when_it_returns() -> None:
    pool = ThreadPerCall(max_workers=2, thread_name_prefix="test")
    try:
        ran_on = [pool.submit(threading.current_thread).result(timeout=5) for _ in range(3)]
    finally:
        pool.shutdown()
    assert len({id(thread) for thread in ran_on}) == 3
    assert [thread.is_alive() for thread in ran_on] == [False, False, False]
    assert all(thread.name == "test-call" for thread in ran_on)


def test_a_call_returns_its_result_and_raises_its_error() -> None:
    pool = ThreadPerCall(max_workers=1, thread_name_prefix="test")

    def fail(message: str) -> None:
        raise ValueError(message)

    try:
        assert pool.submit(lambda a, b: a + b, 2, b=3).result(timeout=5) == 5
        with pytest.raises(ValueError, match="bad input"):
            pool.submit(fail, "bad input").result(timeout=5)
    finally:
        pool.shutdown()


def test_max_workers_still_bounds_the_calls_running_at_once() -> None:
    pool = ThreadPerCall(max_workers=1, thread_name_prefix="test")
    running, most = 0, 0
    lock = threading.Lock()

    def call() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    try:
        for future in [pool.submit(call) for _ in range(4)]:
            future.result(timeout=5)
    finally:
        pool.shutdown()
    assert most == 1


# A parallel CPU operation of torch's, run through the pool named in argv: the OpenMP worker
# threads it started that are still alive afterwards (threads of the process, not Python's).
# The count is read until it is back to where it was, for up to 3 s: a thread that has ended
# (joined) leaves /proc/self/task a moment later, and its OpenMP workers, told to stop when it
# ends, on their own schedule. Counted at once, a loaded CI machine saw both still there.
OPENMP_PROBE = """
import os, sys, time
from concurrent.futures import ThreadPoolExecutor
import torch
from llmux.core.concurrency import ThreadPerCall

def threads():
    return len(os.listdir("/proc/self/task"))

pool = (ThreadPerCall if sys.argv[1] == "per_call" else ThreadPoolExecutor)(1, "probe")
pool.submit(lambda: None).result()  # the pool's own thread, before counting
time.sleep(0.2)
before = threads()
pool.submit(lambda: float((torch.ones(4_000_000) * 2).sum())).result()
deadline = time.monotonic() + 3
while threads() > before and time.monotonic() < deadline:
    time.sleep(0.01)
print(threads() - before)
"""


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2,
    reason="needs 2 or more CPU cores: on one, torch starts no OpenMP team to leave behind",
)
def test_torch_openmp_threads_end_with_the_call_that_started_them() -> None:
    def left_behind(pool: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", OPENMP_PROBE, pool],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return int(done.stdout.split()[-1])

    # A long-lived pool thread keeps its team (the control: this probe sees it); a call's own
    # thread takes it along when it ends.
    assert left_behind("plain") >= 1
    assert left_behind("per_call") == 0
