"""RateLimiter: per-user (and per-server) limits over minute, hour and day windows.

Messages and commands are counted apart. `check()` both decides and records.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

from pydantic import BaseModel, Field

from actors.base import Clock, Service, ShardedClient
from actors.schemas import MessageKind, RateDecision, ServiceStats

WINDOWS: dict[str, float] = {"minute": 60.0, "hour": 3600.0, "day": 86400.0}


class WindowLimits(BaseModel):
    minute: int = Field(default=10, ge=1)
    hour: int = Field(default=100, ge=1)
    day: int = Field(default=500, ge=1)


class RateLimitConfig(BaseModel):
    shards: int = Field(default=1, ge=1)
    message: WindowLimits = WindowLimits()
    command: WindowLimits = WindowLimits(minute=20, hour=200, day=1000)
    #: messages per minute across a whole server; None turns the server limit off
    server_per_minute: int | None = Field(default=None, ge=1)


class RateLimitStats(ServiceStats):
    checks: int
    allowed: int
    denied: int
    keys: int


class RateLimiter(Service):
    def __init__(
        self,
        config: RateLimitConfig | None = None,
        state_dir: Path | None = None,
        shard: int = 0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(clock)
        self.config = config or RateLimitConfig()
        self.shard = shard
        self._logs: dict[tuple[str, str, str], deque[float]] = {}
        self.checks = self.allowed = self.denied = 0

    def _limits(self, kind: MessageKind, server: str | None) -> list[tuple[str, str, float, int]]:
        """(key owner, window name, window seconds, limit) for every limit that applies."""
        per_kind = self.config.message if kind == "message" else self.config.command
        out = [("user", name, secs, getattr(per_kind, name)) for name, secs in WINDOWS.items()]
        if server is not None and self.config.server_per_minute is not None:
            out.append(("server", "server_minute", 60.0, self.config.server_per_minute))
        return out

    async def check(
        self, user: str, kind: MessageKind = "message", server: str | None = None
    ) -> RateDecision:
        self._ensure_maintenance()
        now = self.clock()
        self.checks += 1
        remaining: dict[str, int] = {}
        denied: tuple[float, str, int] | None = None
        logs = []
        for owner, name, secs, limit in self._limits(kind, server):
            who = user if owner == "user" else f"server:{server}"
            log = self._logs.setdefault((who, kind if owner == "user" else "all", name), deque())
            while log and log[0] <= now - secs:
                log.popleft()
            logs.append(log)
            remaining[name] = limit - len(log)
            if len(log) >= limit:
                wait = log[0] + secs - now
                if denied is None or wait > denied[0]:
                    denied = (wait, name, limit)
        if denied is not None:
            self.denied += 1
            return RateDecision(
                allowed=False,
                remaining=remaining,
                retry_after=max(denied[0], 0.0),
                window=denied[1],
                limit=denied[2],
            )
        for log in logs:
            log.append(now)
        self.allowed += 1
        return RateDecision(allowed=True, remaining={k: v - 1 for k, v in remaining.items()})

    async def reset(self, user: str) -> int:
        doomed = [k for k in self._logs if k[0] == user]
        for k in doomed:
            del self._logs[k]
        return len(doomed)

    async def stats(self) -> RateLimitStats:
        return RateLimitStats(
            service="ratelimit",
            shard=self.shard,
            checks=self.checks,
            allowed=self.allowed,
            denied=self.denied,
            keys=len(self._logs),
        )


class RateLimitClient(ShardedClient):
    async def check(
        self, user: str, kind: MessageKind = "message", server: str | None = None
    ) -> RateDecision:
        return await self._call(self.handle_for(user), "check", user, kind, server)  # type: ignore[return-value]

    async def reset(self, user: str) -> int:
        return await self._call(self.handle_for(user), "reset", user)  # type: ignore[return-value]

    async def stats(self) -> list[RateLimitStats]:
        return await self._call_all("stats")  # type: ignore[return-value]
