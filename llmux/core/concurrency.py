"""Blocking work on worker threads, without ever abandoning a thread that uses a model: a
function run to its end (`run_to_end`), a generator read from async code (`iterate_in_thread`),
or the items a producer computing on a thread of its own hands over (`iterate_pushed`); and the
pool that model work is submitted to (`ThreadPerCall`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import anyio

T = TypeVar("T")
P = ParamSpec("P")


class ThreadPerCall(ThreadPoolExecutor):
    """A thread pool whose calls each run on a new thread that ends with the call: the pool's own
    threads only start and join them, so `max_workers` still bounds how many run at once.

    Why: torch's OpenMP runtime (libgomp) gives each thread that runs a parallel CPU operation a
    team of worker threads of its own, kept until that thread ends, and counts every team. Once
    it counts more threads than the machine has cores, all teams' workers sleep between parallel
    regions instead of spinning, and every region then waits for them to wake. A model loaded on
    a long-lived swap thread left such a team behind; beside the batch loop's own, a 0.5B model's
    requests on a 2-core CPU each took 1,400 futex waits and about 100 ms more to the first
    token. A thread that ends takes its team with it."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._call_names = f"{thread_name_prefix}-call"

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        return super().submit(_on_a_new_thread, lambda: fn(*args, **kwargs), self._call_names)


def _on_a_new_thread(call: Callable[[], T], name: str) -> T:
    """`call()` on a thread started for it, waited for here: its result, or its error raised."""
    outcome: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # raised again on the waiting thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        assert isinstance(value, BaseException)
        raise value
    return value  # type: ignore[return-value]  # what `call` returned


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
