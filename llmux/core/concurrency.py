"""Blocking work on worker threads, without ever abandoning a thread that uses a model: a
function run to its end (`run_to_end`), a generator read from async code (`iterate_in_thread`),
or the items a producer computing on a thread of its own hands over (`iterate_pushed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor, Future
from typing import TypeVar

import anyio

T = TypeVar("T")


async def run_to_end(
    fn: Callable[[], T],
    stop: threading.Event | None = None,
    *,
    executor: Executor | None = None,
) -> T:
    """Run blocking `fn` on a worker thread (of `executor`, else the loop's default pool) and wait
    until it has ended.

    A thread cannot be stopped, so a cancellation (client gone, shutdown) does not abandon it:
    `stop` is set, so `fn` can end early if it watches it, and this keeps waiting for the thread,
    then raises `CancelledError` (dropping `fn`'s result). So the model `fn` uses stays held, never
    evicted, until the thread has let go of it.
    """
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    task = asyncio.ensure_future(loop.run_in_executor(executor, context.run, fn))
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
            if stop is not None:
                stop.set()
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not report it as lost
        raise asyncio.CancelledError
    return task.result()


_DONE = object()


async def iterate_in_thread(
    produce: Callable[[], Iterator[T]],
    cancel: threading.Event,
    *,
    executor: Executor | None = None,
) -> AsyncIterator[T]:
    """A blocking generator run on a worker thread, as an async iterator.

    Leaving early (break, error, cancellation) sets `cancel` and waits, shielded from
    cancellation, for the thread to return: whatever the generator uses (a model) must not be let
    go of while it computes. The generator is expected to end soon after `cancel` is set.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()

    def put(item: object) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def run() -> None:
        try:
            for item in produce():
                put(item)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)
        else:
            put(_DONE)

    worker: Awaitable[None] = loop.run_in_executor(executor, run)
    async with contextlib.aclosing(_handed_over(queue, cancel, worker)) as items:
        async for item in items:
            yield item  # type: ignore[misc]  # anything else came from `produce`


async def iterate_pushed(
    start: Callable[[Callable[[T], None]], Future[None]], cancel: threading.Event
) -> AsyncIterator[T]:
    """The items a producer hands over, as an async iterator: `start(emit)` begins the work on a
    thread of the producer's own, which calls `emit` with each item, and returns the Future of
    that work, done when the producer has let go of what it uses (its error, if any, raised here
    after the items emitted before it). One hand-over per item (producer thread to the event
    loop), where `iterate_in_thread` of a generator that relays a thread of its own takes two.

    Leaving early sets `cancel` and waits, shielded from cancellation, for the Future.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()

    def emit(item: object) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    running = start(emit)
    # Runs on the producer's thread once the work ends, after its last emit: the end comes last.
    running.add_done_callback(lambda done: emit(done.exception() or _DONE))
    work = asyncio.wrap_future(running)
    async with contextlib.aclosing(_handed_over(queue, cancel, work)) as items:
        async for item in items:
            yield item  # type: ignore[misc]  # anything else came from the producer


async def _handed_over(
    queue: asyncio.Queue[object], cancel: threading.Event, work: Awaitable[None]
) -> AsyncGenerator[object, None]:
    """What a thread puts on `queue` until `_DONE` (an exception put there is raised); leaving
    early sets `cancel`, and however it ends, `work` (the thread's) is awaited, shielded. Read
    it under `contextlib.aclosing`, so that leaving early runs this at once, not when the
    generator is collected."""
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()
        with anyio.CancelScope(shield=True):
            await work
