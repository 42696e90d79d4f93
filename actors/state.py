"""Where a stateful service keeps its durable state, and what it does while that state
cannot be reached.

A store opens its state when it starts. With PostgreSQL the server may be down then (or
restarting later): the actor still starts, every call meanwhile fails at once with the
retryable `ServiceUnavailable` ("restarting, try again"), and the open is retried with
exponential backoff until it succeeds. Storage's `StateUnavailable` becomes that same
error wherever a call meets it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar

from actors.errors import ServiceUnavailable
from storage.postgres import PgTarget, StateUnavailable

__all__ = ["StateLocation", "StateOpener", "needs_state"]

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

#: a state directory (SQLite files) or a PostgreSQL database
StateLocation = Path | PgTarget


class StateOpener(Generic[T]):
    """Opens a store's state once; while that fails with `StateUnavailable`, calls fail
    fast with `ServiceUnavailable` and the next attempt waits out a doubling delay."""

    def __init__(
        self,
        open_state: Callable[[], T],
        what: str,
        first_delay: float = 0.5,
        max_delay: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open = open_state
        self.what = what
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._monotonic = monotonic
        self._value: T | None = None
        self._delay = first_delay
        self._next_attempt = 0.0
        self._last_error = ""
        self.attempts = 0

    @property
    def opened(self) -> T | None:
        return self._value

    def try_open(self) -> bool:
        """Whether the state is open, attempting the open when its backoff has run out
        (the maintenance loop retries this way while no call comes)."""
        try:
            self.get()
        except ServiceUnavailable:
            return False
        return True

    def get(self) -> T:
        """The opened state.

        Raises:
            ServiceUnavailable: the state cannot be reached (now, or at the last attempt,
                whose backoff has not run out).
        """
        if self._value is not None:
            return self._value
        now = self._monotonic()
        if now < self._next_attempt:
            raise ServiceUnavailable(
                f"{self.what} is waiting for its state: {self._last_error} "
                f"(next attempt in {self._next_attempt - now:.1f}s)"
            )
        self.attempts += 1
        try:
            self._value = self._open()
        except StateUnavailable as exc:
            self._last_error = str(exc)
            self._next_attempt = now + self._delay
            log.error("%s cannot open its state (retrying in %.1fs): %s", self.what, self._delay, exc)
            self._delay = min(self._delay * 2, self.max_delay)
            raise ServiceUnavailable(f"{self.what} is waiting for its state: {exc}") from None
        self._delay = self.first_delay
        if self.attempts > 1:
            log.warning("%s opened its state after %d attempts", self.what, self.attempts)
        return self._value


class _Stateful(Protocol):
    _state: StateOpener[Any]


S = TypeVar("S", bound=_Stateful)


def needs_state(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """A service method that opens the service's state first (`ServiceUnavailable` while
    it cannot be), and turns storage's `StateUnavailable` (a read or commit that met the
    database going away) into the same retryable error."""

    @functools.wraps(method)
    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        self._state.get()
        try:
            return await method(self, *args, **kwargs)
        except StateUnavailable as exc:
            raise ServiceUnavailable(str(exc)) from None

    return wrapper
