"""Admission to one model's generations: batched ones together, everything else alone, in order.

A model that batches (continuous batching) runs up to its batch size of batched generations at
once; a generation that cannot join the batch (a seeded or JSON-schema request, a vision prompt,
any request of a model that does not batch) and the admin benchmark's timed run need the model
alone. `GenerationGate` admits strictly first come first served: a waiter is admitted only when
every waiter ahead of it has been, so a generation that needs the model alone is never starved by
a stream of batched ones, and a batched one never overtakes an earlier one that waits alone.

Contract: the event loop is the only thread that touches a gate (no locks). A waiter cancelled
before it is admitted leaves the queue; one cancelled just as it was admitted gives its place
back, so no slot is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class _Waiter:
    alone: bool
    capacity: int
    admitted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class GenerationGate:
    """FIFO admission of shared (batched, up to a capacity) and exclusive (alone) holders."""

    def __init__(self) -> None:
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._shared = 0
        self._alone = False

    @property
    def holders(self) -> int:
        """How many hold the gate now (snapshot)."""
        return self._shared + self._alone

    @contextlib.asynccontextmanager
    async def shared(self, capacity: int) -> AsyncIterator[None]:
        """Hold the gate beside at most `capacity - 1` other shared holders, and no one alone."""
        async with self._hold(_Waiter(alone=False, capacity=max(1, capacity))):
            yield

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        """Hold the gate with no one else."""
        async with self._hold(_Waiter(alone=True, capacity=1)):
            yield

    @contextlib.asynccontextmanager
    async def _hold(self, waiter: _Waiter) -> AsyncIterator[None]:
        self._waiting.append(waiter)
        self._admit()
        try:
            await waiter.admitted
        except asyncio.CancelledError:
            if waiter.admitted.done() and not waiter.admitted.cancelled():
                self._release(waiter)  # admitted as it was cancelled: give the place back
            else:
                self._waiting.remove(waiter)
                self._admit()  # it may have blocked the waiters behind it
            raise
        try:
            yield
        finally:
            self._release(waiter)

    def _release(self, waiter: _Waiter) -> None:
        if waiter.alone:
            self._alone = False
        else:
            self._shared -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiting:
            head = self._waiting[0]
            if head.alone:
                if self._alone or self._shared:
                    return
                self._alone = True
            else:
                if self._alone or self._shared >= head.capacity:
                    return
                self._shared += 1
            self._waiting.popleft()
            head.admitted.set_result(None)
