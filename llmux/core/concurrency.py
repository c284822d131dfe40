"""Blocking work on worker threads, without ever abandoning a thread that uses a model: a
function run to its end (`run_to_end`), or a generator read from async code
(`iterate_in_thread`).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor
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
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]  # anything else came from `produce`
    finally:
        cancel.set()
        with anyio.CancelScope(shield=True):
            await worker
