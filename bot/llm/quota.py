"""The gateway's bookkeeping, free of I/O: a model's quota over rolling windows (requests
and prompt tokens per minute, requests per day) and the fair queue that serves waiting
requests round-robin by server, then by user.

Both take the time as an argument, so tests drive them with an injected clock.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from bot.llm.base import LLMRequest

__all__ = ["FairQueue", "ModelLimits", "ModelQuota", "Ticket", "estimate_prompt_tokens"]

T = TypeVar("T")

MINUTE = 60.0
DAY = 86_400.0
#: what Gemini counts for one inline image, whatever its size (up to 384 px a side)
IMAGE_TOKENS = 258


def estimate_prompt_tokens(request: LLMRequest) -> int:
    """The prompt's tokens as Gemini will count them, roughly: ~4 characters a token."""
    chars = len(request.prompt) + len(request.system_prompt) + len(request.note)
    chars += sum(len(author) + len(text) + 2 for _, author, text in request.history)
    return chars // 4 + 1 + IMAGE_TOKENS * len(request.images)


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """One model's quota; None is no limit on that dimension."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    requests_per_day: int | None = None

    def split(self, parts: int) -> ModelLimits:
        """This quota shared by `parts` gateways: each gets its share, at least 1."""

        def share(value: int | None) -> int | None:
            return None if value is None else max(1, value // parts)

        return ModelLimits(
            share(self.requests_per_minute), share(self.tokens_per_minute), share(self.requests_per_day)
        )


class Ticket:
    """One request counted against a quota; its tokens are corrected after the call."""

    __slots__ = ("at", "tokens")

    def __init__(self, at: float, tokens: int) -> None:
        self.at = at
        self.tokens = tokens


class ModelQuota:
    """A model's requests and prompt tokens over the last minute and requests over the
    last day, as rolling windows of what was admitted."""

    def __init__(self, limits: ModelLimits) -> None:
        self.limits = limits
        self._minute: deque[Ticket] = deque()
        self._day: deque[float] = deque()
        self._tokens = 0

    def _trim(self, now: float) -> None:
        while self._minute and self._minute[0].at <= now - MINUTE:
            self._tokens -= self._minute.popleft().tokens
        while self._day and self._day[0] <= now - DAY:
            self._day.popleft()

    def used(self, now: float) -> tuple[int, int, int]:
        """(requests this minute, prompt tokens this minute, requests today)."""
        self._trim(now)
        return len(self._minute), self._tokens, len(self._day)

    def wait(self, now: float, tokens: int) -> float:
        """Seconds until one more request of `tokens` prompt tokens fits; 0 when it fits now."""
        return self.eta(now, 0, tokens)

    def eta(self, now: float, ahead: int, tokens: int = 0) -> float:
        """Seconds until a request fits with `ahead` requests to be admitted before it.

        Tokens are counted for this request only: what the requests ahead will send is
        not known yet.
        """
        self._trim(now)
        lim = self.limits
        wait = 0.0
        if lim.requests_per_minute is not None:
            wait = max(
                wait, _slot_free(now, [t.at for t in self._minute], ahead, lim.requests_per_minute, MINUTE)
            )
        if lim.requests_per_day is not None:
            wait = max(wait, _slot_free(now, list(self._day), ahead, lim.requests_per_day, DAY))
        if lim.tokens_per_minute is not None and self._minute:
            # a prompt larger than the whole budget goes once the window is empty
            need = min(tokens, lim.tokens_per_minute)
            excess = self._tokens + need - lim.tokens_per_minute
            for ticket in self._minute:
                if excess <= 0:
                    break
                excess -= ticket.tokens
                wait = max(wait, ticket.at + MINUTE - now)
        return wait

    def take(self, now: float, tokens: int) -> Ticket:
        self._trim(now)
        ticket = Ticket(now, tokens)
        self._minute.append(ticket)
        self._day.append(now)
        self._tokens += tokens
        return ticket

    def correct(self, ticket: Ticket, tokens: int) -> None:
        """Replace the estimate with what the API counted (`usage_metadata`)."""
        # a ticket already out of the window no longer counts (identity: tickets are unique)
        if any(t is ticket for t in self._minute):
            self._tokens += tokens - ticket.tokens
        ticket.tokens = tokens


def _slot_free(now: float, times: list[float], ahead: int, limit: int, window: float) -> float:
    """Seconds until the window of `times` (oldest first) has room for `ahead + 1` more.

    Admissions beyond the limit take the slots as they free: the i-th goes one window
    after the slot it reuses was taken, which itself may have been reused before.
    """
    overflow = len(times) + ahead + 1 - limit
    if overflow <= 0:
        return 0.0
    # the window full: what is in it now, then the requests that go at once
    slots = sorted(times)[-limit:] + [now] * max(0, limit - len(times))
    rounds, slot = divmod(overflow - 1, limit)
    return slots[slot] + window * (rounds + 1) - now


class FairQueue(Generic[T]):
    """Waiting items served round-robin: servers take turns, and within a server, users do.

    One user's burst therefore waits behind every other user's next item, never in front
    of it; bounded only by what the caller allows in (`len`).
    """

    def __init__(self) -> None:
        self._servers: OrderedDict[str, OrderedDict[str, deque[T]]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        for users in self._servers.values():
            for items in users.values():
                yield from items

    def push(self, server: str, user: str, item: T) -> None:
        users = self._servers.setdefault(server, OrderedDict())
        users.setdefault(user, deque()).append(item)
        self._size += 1

    def peek(self) -> T | None:
        """The item whose turn it is, left in place."""
        for users in self._servers.values():
            for items in users.values():
                return items[0]
        return None

    def pop(self) -> T:
        """Take the item whose turn it is; its user and server go to the back of the line."""
        server, users = next(iter(self._servers.items()))
        user, items = next(iter(users.items()))
        item = items.popleft()
        self._size -= 1
        if items:
            users.move_to_end(user)
        else:
            del users[user]
        if users:
            self._servers.move_to_end(server)
        else:
            del self._servers[server]
        return item

    def remove(self, server: str, user: str, item: T) -> bool:
        """Take `item` out (its caller gave up); False if it was not queued."""
        users = self._servers.get(server)
        if users is None:
            return False
        items = users.get(user)
        if items is None or item not in items:
            return False
        items.remove(item)
        self._size -= 1
        if not items:
            del users[user]
            if not users:
                del self._servers[server]
        return True

    def ahead(self, server: str, user: str) -> int:
        """How many queued items round-robin serves before a new one from `user`."""
        users = self._servers.get(server)
        mine = users.get(user) if users is not None else None
        own = len(mine) if mine is not None else 0
        others = sum(
            min(len(items), own + 1)
            for s, users in self._servers.items()
            for u, items in users.items()
            if (s, u) != (server, user)
        )
        return own + others
