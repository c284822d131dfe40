"""Clients that go away: noticed from a request's first await, not only once it streams.

A request that waits (in a model's queue, for a swap, for a load) or works (transcribing,
speaking) is tied to its client: when the client disconnects, the work is cancelled, so a client
that gave up causes no eviction, no load and no inference. A stream whose client stops reading
is cut after `stall_s` (`LLMUX_STREAM_STALL_S`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llmux.core.errors import ApiError

log = logging.getLogger("llmux.disconnects")
T = TypeVar("T")
ReceiveFn = Callable[[], Awaitable[MutableMapping[str, Any]]]


class ClientGone(ApiError):
    """The client disconnected before its answer was ready; nobody reads this response."""

    status = 499  # nginx's "client closed request": for the access log only
    code = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("The client disconnected before the answer was ready.")


async def wait_for_disconnect(receive: ReceiveFn) -> None:
    """Return once the client has disconnected (the request body must already be read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(
    receive: ReceiveFn,
    work: Coroutine[Any, Any, T],
    *,
    abandon: Callable[[T], Awaitable[None]] | None = None,
) -> T:
    """`await work`, cancelled as soon as the client disconnects; then `ClientGone` is raised.

    If `work` finished in the same instant, its result is handed to `abandon` (close what it
    opened) before `ClientGone` is raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not watcher.done() or watcher.cancelled():
        return await task  # the work came first
    task.cancel()
    try:
        result = await task
    except asyncio.CancelledError:
        log.info("client disconnected while its request waited or ran: cancelled")
        raise ClientGone() from None
    if abandon is not None:
        await abandon(result)
    raise ClientGone()


async def set_on_disconnect(receive: ReceiveFn, cancel: threading.Event) -> None:
    """Set `cancel` when the client disconnects (for work that watches an event, not a task)."""
    await wait_for_disconnect(receive)
    cancel.set()


class HeldStreamingResponse(StreamingResponse):
    """A server-sent event stream that runs `on_close` however it ends (finished, failed, client
    gone) and cuts a client that reads nothing for `stall_s`: a send that cannot complete for that
    long means the client's socket is full and nobody drains it."""

    def __init__(
        self,
        body: AsyncIterator[str],
        on_close: Callable[[], Awaitable[None]],
        *,
        stall_s: float,
    ) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close
        self._stall_s = stall_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        loop = asyncio.get_running_loop()
        sending_since: float | None = None
        watchdog: asyncio.TimerHandle | None = None
        try:
            async with asyncio.timeout(None) as cut:

                def watch() -> None:
                    # One timer per stream rather than one per event: it wakes every `stall_s`
                    # at most, and when a send has waited that long, ends the stream.
                    nonlocal watchdog
                    now = loop.time()
                    if sending_since is not None and now - sending_since >= self._stall_s:
                        cut.reschedule(now)
                    else:
                        since = now if sending_since is None else sending_since
                        watchdog = loop.call_at(since + self._stall_s, watch)

                watchdog = loop.call_later(self._stall_s, watch)
                try:
                    async for chunk in self.body_iterator:
                        body = chunk.encode(self.charset) if isinstance(chunk, str) else chunk
                        sending_since = loop.time()
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                        sending_since = None
                finally:
                    watchdog.cancel()
        except TimeoutError:
            if not cut.expired():
                raise
            # Returning without the last body message makes the server close the connection.
            log.warning(
                "the client read nothing for %.0f s (LLMUX_STREAM_STALL_S): disconnected it",
                self._stall_s,
            )
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
