"""The bridges between a model's threads and the event loop (`llmux.core.concurrency`): a reader
that leaves early stops the thread and waits for it before going on, whichever bridge."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from llmux.core.concurrency import iterate_in_thread, iterate_pushed


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
