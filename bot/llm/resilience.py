"""The asyncio building blocks around an upstream call: a FIFO concurrency gate,
single-flight coalescing, a circuit breaker, and the backoff schedule.

Each is small, backend-agnostic and tested on its own; `bot.llm.gemini` composes them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class ConcurrencyGate:
    """At most `limit` holders at once; the rest wait in arrival order.

    A freed slot is handed straight to the oldest waiter, so a newcomer can never
    overtake the queue (asyncio.Semaphore does not promise that).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.in_flight = 0
        self.peak_in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # the slot was handed to us as we were cancelled: pass it on
                self.release()
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1


@dataclass(slots=True)
class _Flight(Generic[T]):
    task: asyncio.Task[T]
    waiters: int = 0


class SingleFlight(Generic[T]):
    """Concurrent calls with the same key share one execution.

    Each caller awaits the shared task through `asyncio.shield`, so a caller that is
    cancelled leaves the others their answer; the shared task is cancelled only when
    every caller has gone.
    """

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}
        self.started = 0
        self.joined = 0

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: str) -> bool:
        return key in self._flights

    async def do(self, key: str, make: Callable[[], Awaitable[T]]) -> T:
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight(asyncio.get_running_loop().create_task(_await(make)))
            self._flights[key] = flight
            flight.task.add_done_callback(lambda task: self._finished(key, task))
            self.started += 1
        else:
            self.joined += 1
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                # nobody wants the answer any more; a later caller starts afresh
                self._forget(key, flight)
                flight.task.cancel()

    def _forget(self, key: str, flight: _Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def _finished(self, key: str, task: asyncio.Task[T]) -> None:
        flight = self._flights.get(key)
        if flight is not None and flight.task is task:
            del self._flights[key]
        if not task.cancelled():
            # every waiter may have gone: mark the outcome seen so asyncio does not log it
            task.exception()


async def _await(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


class CircuitBreaker:
    """closed → open after `threshold` consecutive upstream failures → half-open after
    `cooldown` seconds, when one probe call decides: success closes, failure reopens."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.times_opened = 0
        self._probing = False

    def retry_after(self) -> float:
        """Seconds until a call may go through; 0 when one may go now."""
        if self.state == self.OPEN:
            return max(0.0, self.opened_at + self.cooldown - self.clock())
        if self.state == self.HALF_OPEN and self._probing:
            return self.cooldown
        return 0.0

    def allow(self) -> bool:
        """May a call go upstream now? Claims the probe when half-open."""
        if self.state == self.OPEN:
            if self.clock() - self.opened_at < self.cooldown:
                return False
            self.state = self.HALF_OPEN
            self._probing = False
        if self.state == self.HALF_OPEN:
            if self._probing:
                return False
            self._probing = True
        return True

    def record_success(self) -> None:
        self.state = self.CLOSED
        self.failures = 0
        self._probing = False

    def record_failure(self) -> None:
        self.failures += 1
        if self.state == self.HALF_OPEN or self.failures >= self.threshold:
            if self.state != self.OPEN:
                self.times_opened += 1
            self.state = self.OPEN
            self.opened_at = self.clock()
            self._probing = False

    def record_abandoned(self) -> None:
        """The call ended without telling us anything (it was cancelled): free the probe."""
        self._probing = False


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with equal jitter, never shorter than the server asked for."""

    base: float
    cap: float

    def delay(
        self, attempt: int, server_delay: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait before retry number `attempt` (1 = the first retry)."""
        ceiling = min(self.cap, self.base * 2 ** (attempt - 1))
        jittered = (rng or random).uniform(ceiling / 2, ceiling)
        if server_delay is not None:
            # honour RetryInfo, with a little jitter on top so callers do not return in lockstep
            return server_delay + (rng or random).uniform(0, min(self.base, server_delay) / 4)
        return jittered
