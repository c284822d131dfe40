"""Hear SIGTERM as soon as it arrives, not after the server has drained its connections.

uvicorn (under BentoML's worker) answers SIGTERM by refusing new connections and then waiting for
every open one to finish, with no limit by default, before the app's lifespan shutdown runs. A
chat stream with a large `max_tokens` would hold the whole shutdown for its length (and BentoML's
process manager waits a day before it kills a worker). So llmux chains its own handler in front of
the server's: on SIGTERM or SIGINT it starts the bounded stop of generations at once (each gets
LLMUX_SHUTDOWN_GRACE_S, then ends with its final chunk and `[DONE]`), and the server's own
handler then runs as before. The server's handler is put back when the app stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("llmux.termination")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_termination(
    loop: asyncio.AbstractEventLoop, begin: Callable[[], None]
) -> Callable[[], None]:
    """Call `begin()` on `loop` at the first SIGTERM/SIGINT, then the handler that was there.
    Returns the function that restores the previous handlers. Outside the main thread (where
    Python allows no signal handlers, e.g. a test client) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    begun = False

    def handle(sig: int, frame: FrameType | None) -> None:
        nonlocal begun
        if not begun:
            begun = True
            log.info(
                "%s: stopping generations in progress, then shutting down", signal.Signals(sig).name
            )
            loop.call_soon_threadsafe(begin)
        chained = previous[signal.Signals(sig)]
        if callable(chained):
            chained(sig, frame)
        elif chained == signal.SIG_DFL and sig == signal.SIGINT:
            raise KeyboardInterrupt

    for sig in SIGNALS:
        signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is handle:
                signal.signal(sig, handler)

    return restore
