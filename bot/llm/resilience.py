"""The building blocks around an upstream call: a circuit breaker and the backoff schedule.

Each is small, backend-agnostic and tested on its own; `bot.llm.gateway` composes them
with its fair queue and single-flight table.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


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
