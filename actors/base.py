"""What every service shares: an injected clock and one maintenance loop per actor.

Periodic work (flush, cleanup, snapshot, gauges) runs from `maintain()`, called by a
single loop that the service starts on its first call, so a restarted actor resumes it
without anyone having to remember to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import psutil
from pydantic import BaseModel

from actors import metrics

Clock = Callable[[], float]

log = logging.getLogger(__name__)


class ServiceHealth(BaseModel):
    """What `health()` answers: who is serving, where, and how much memory it holds."""

    service: str
    shard: int
    pid: int
    #: Ray node id of the actor's process; None outside Ray
    node_id: str | None
    rss_bytes: int
    uptime_seconds: float
    maintenance_running: bool


def _node_id() -> str | None:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class Service:
    """Base of the four services. Subclasses override `maintain` and `flush`."""

    #: seconds between two runs of `maintain()`
    maintenance_interval: float = 1.0

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or time.time
        self._maintenance: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self._process: psutil.Process | None = None

    def _ensure_maintenance(self) -> None:
        """Start the maintenance loop if a loop is running and it is not started yet."""
        if self._maintenance is not None and not self._maintenance.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._maintenance = loop.create_task(self._maintenance_loop())

    async def _maintenance_loop(self) -> None:
        rss = metrics.gauge("service_rss_bytes", "resident memory of a service process", ("service", "shard"))
        tags = {"service": type(self).__name__, "shard": str(getattr(self, "shard", 0))}
        while True:
            await asyncio.sleep(self.maintenance_interval)
            try:
                await self.maintain()
            except Exception:
                # a failed pass is retried on the next tick; the loop must outlive it
                log.exception("%s maintenance failed", type(self).__name__)
            rss.set(self._memory().rss, tags=tags)

    def _memory(self) -> Any:
        """This process's memory counters (one read of /proc on Linux)."""
        if self._process is None:
            self._process = psutil.Process(os.getpid())
        return self._process.memory_info()

    async def maintain(self) -> None:
        """One pass of periodic work. Must be safe to run at any time."""

    async def flush(self) -> None:
        """Make everything the service holds durable (called on shutdown)."""

    async def ping(self) -> str:
        """Cheap health check."""
        self._ensure_maintenance()
        return type(self).__name__

    async def health(self) -> ServiceHealth:
        """Cheap health check with the figures a dashboard needs: no I/O beyond one
        read of this process's memory counters."""
        self._ensure_maintenance()
        return ServiceHealth(
            service=type(self).__name__,
            shard=getattr(self, "shard", 0),
            pid=os.getpid(),
            node_id=_node_id(),
            rss_bytes=self._memory().rss,
            uptime_seconds=time.monotonic() - self._started,
            maintenance_running=self._maintenance is not None and not self._maintenance.done(),
        )

    async def close(self) -> None:
        """Flush and stop the maintenance loop."""
        await self.flush()
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None


class ShardedClient:
    """The bot's handle on one service: N actor replicas, each key routed to one.

    Subclasses add typed methods; `_call` turns a dead or restarting actor into
    `ServiceUnavailable` so the front-end can answer with a retryable error.
    """

    #: calls that may run twice without changing the outcome: only these are sent again
    #: when a replica died mid-call or was unreachable (a write might have been applied)
    idempotent_methods: frozenset[str] = frozenset(
        {"get", "get_many", "contains_many", "build", "social", "stats", "health", "ping", "query"}
    )
    #: how long an idempotent call keeps retrying a replica that is down: long enough for
    #: Ray to notice a dead node and restart the actor elsewhere
    retry_seconds: float = 30.0

    def __init__(self, handles: list[object]) -> None:
        if not handles:
            raise ValueError("a service needs at least one replica")
        self.handles = handles

    def handle_for(self, key: str) -> object:
        from actors.sharding import pick

        return pick(key, self.handles)

    async def _call(self, handle: object, method: str, *args: object, **kwargs: object) -> object:
        import ray.exceptions

        from actors.errors import ServiceUnavailable

        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                return await getattr(handle, method).remote(*args, **kwargs)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                now = time.monotonic()
                deadline = deadline or now + self.retry_seconds
                if method not in self.idempotent_methods or now >= deadline:
                    raise ServiceUnavailable(f"{method} failed: {type(exc).__name__}") from exc
                log.warning("%s failed (%s); retrying in %.2fs", method, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _call_all(self, method: str, *args: object, **kwargs: object) -> list[object]:
        return list(await asyncio.gather(*(self._call(h, method, *args, **kwargs) for h in self.handles)))
