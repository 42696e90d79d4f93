"""What every service shares: an injected clock, one maintenance loop per actor, and
batched calls.

Periodic work (flush, cleanup, snapshot, gauges) runs from `maintain()`, called by a
single loop that the service starts on its first call, so a restarted actor resumes it
without anyone having to remember to. Calls made while earlier ones are in flight leave
together as one `call_many` round trip (`CallBatcher`): on a loaded front-end, submitting
a Ray call costs more CPU than the call does. A write nobody waits for may linger a moment
to ride with the next call to its replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar, cast

import psutil
from pydantic import BaseModel

from actors import metrics

Clock = Callable[[], float]
#: one call of a batch: positional arguments of the method
CallArgs = tuple[Any, ...]
#: one call of a mixed batch: the method's name and its positional arguments
NamedCall = tuple[str, CallArgs]
#: a Ray actor handle (its methods are looked up by name, so Ray gives them no static type)
Handle = Any
P = ParamSpec("P")
R = TypeVar("R")
#: a service method named by the plain class's own function (`ResponseCache.get`), so the
#: arguments a client sends and the result it gets back are checked against the service
Method = Callable[Concatenate[Any, P], Awaitable[R]]

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

    async def call_many(self, calls: Sequence[NamedCall]) -> list[tuple[bool, Any]]:
        """Run each `(method, args)` call, concurrently and started in order; one
        `(True, result)` or `(False, exception)` per call, so one bad call fails alone.

        Raises:
            ValueError: a method is not a public coroutine method of this service.
        """
        methods: dict[str, Callable[..., Awaitable[Any]]] = {}
        for method, _ in calls:
            if method not in methods:
                fn = getattr(self, method, None) if not method.startswith("_") else None
                if fn is None or method in _NOT_BATCHABLE or not asyncio.iscoroutinefunction(fn):
                    raise ValueError(f"{type(self).__name__} has no batchable method {method!r}")
                methods[method] = fn
        outcomes = await asyncio.gather(
            *(methods[method](*args) for method, args in calls), return_exceptions=True
        )
        return [(not isinstance(o, BaseException), o) for o in outcomes]

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


_NOT_BATCHABLE = frozenset({"call_many", "close", "flush", "maintain"})


class CallBatcher:
    """Coalesces concurrent calls of one method on one actor into `call_many` round trips.

    A call goes out at once while fewer than `max_in_flight` batches are in flight; calls
    made meanwhile wait and leave together when one returns. So an idle front-end adds
    no delay, and a loaded one pays one round trip for many calls (the client-side twin
    of a group commit). Calls leave in arrival order and the actor starts them in order.
    A call submitted with a `linger` does not start a round trip itself: it leaves with
    the next call that does, or after `linger` seconds.
    """

    def __init__(
        self,
        send: Callable[[list[CallArgs]], Awaitable[list[tuple[bool, Any]]]],
        *,
        max_in_flight: int = 2,
        max_batch: int = 256,
    ) -> None:
        if max_in_flight < 1 or max_batch < 1:
            raise ValueError("max_in_flight and max_batch must be at least 1")
        self._send = send
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self._queue: list[tuple[CallArgs, asyncio.Future[Any]]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._lingering: asyncio.TimerHandle | None = None
        self.calls = 0
        self.batches = 0

    async def submit(self, args: CallArgs, linger: float | None = None) -> Any:
        """The call's result, or the exception it raised (or `ServiceUnavailable`). With
        `linger`, the call waits up to that many seconds for another to leave with."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        self.calls += 1
        if linger is not None:
            if self._lingering is None:
                self._lingering = loop.call_later(linger, self._linger_over)
        elif len(self._in_flight) < self.max_in_flight:
            self._launch()
        # a cancelled caller's call may still run (as a cancelled single call could)
        return await future

    def _linger_over(self) -> None:
        self._lingering = None
        if self._queue and len(self._in_flight) < self.max_in_flight:
            self._launch()

    def _launch(self) -> None:
        if self._lingering is not None and len(self._queue) <= self.max_batch:
            # what lingered leaves now
            self._lingering.cancel()
            self._lingering = None
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        self.batches += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._in_flight.add(task)

    async def _run(self, batch: list[tuple[CallArgs, asyncio.Future[Any]]]) -> None:
        try:
            outcomes = await self._send([args for args, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._in_flight.discard(task)
            if self._queue and len(self._in_flight) < self.max_in_flight:
                self._launch()


class ShardedClient:
    """The bot's handle on one service: N actor replicas, each key routed to one.

    Subclasses add typed methods; `_call` turns a dead or restarting actor into
    `ServiceUnavailable` so the front-end can answer with a retryable error.
    """

    #: calls that may run twice without changing the outcome: only these are sent again
    #: when a replica died mid-call or was unreachable (a write might have been applied)
    idempotent_methods: frozenset[str] = frozenset(
        {"get", "get_many", "contains_many", "build", "social", "stats", "health", "ping", "query", "usage"}
    )
    #: how long an idempotent call keeps retrying a replica that is down: long enough for
    #: Ray to notice a dead node and restart the actor elsewhere
    retry_seconds: float = 30.0

    #: batched round trips in flight per actor and lane (see `CallBatcher`)
    default_max_in_flight: int = 2
    #: method -> the lane its batched calls share round trips with (by default its own):
    #: a method the actor answers without waiting may ride with a read's round trip
    batch_lanes: ClassVar[dict[str, str]] = {}
    #: how long a write sent with `_background` waits for a call to ride with
    linger_seconds: float = 0.05

    def __init__(self, handles: Sequence[Handle], *, max_in_flight: int | None = None) -> None:
        if not handles:
            raise ValueError("a service needs at least one replica")
        self.handles: list[Handle] = list(handles)
        self.max_in_flight = max_in_flight or self.default_max_in_flight
        self._batchers: dict[tuple[int, str], CallBatcher] = {}
        self._batch_loop: asyncio.AbstractEventLoop | None = None
        #: Ray calls made (a batch is one), retries not counted
        self.ray_calls = 0

    def handle_for(self, key: str) -> Handle:
        from actors.sharding import pick

        return pick(key, self.handles)

    async def _call(self, handle: Handle, method: Method[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """`method` on the replica `handle`, as a Ray call; an idempotent method is retried
        while the replica restarts.

        Raises:
            ServiceUnavailable: the replica died mid-call or stayed unreachable.
        """
        import ray.exceptions

        from actors.errors import ServiceUnavailable

        name = method.__name__
        self.ray_calls += 1
        # a batch of calls is as idempotent as the methods it carries
        if name == "call_many" and args:
            batch = cast(Sequence[NamedCall], args[0])
            retryable = all(called in self.idempotent_methods for called, _ in batch)
        else:
            retryable = name in self.idempotent_methods
        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                result: R = await getattr(handle, name).remote(*args, **kwargs)
                return result
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                now = time.monotonic()
                deadline = deadline or now + self.retry_seconds
                if not retryable or now >= deadline:
                    raise ServiceUnavailable(f"{name} failed: {type(exc).__name__}") from exc
                log.warning("%s failed (%s); retrying in %.2fs", name, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _batched(self, handle: Handle, method: Method[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """`_call(handle, method, *args)`, sharing a round trip with concurrent calls
        (positional arguments only: a batch carries argument tuples)."""
        if kwargs:
            raise TypeError("batched calls take positional arguments only")
        result: R = await self._batcher(handle, method.__name__).submit((method.__name__, args))
        return result

    async def _background(
        self, handle: Handle, method: Method[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """`_batched(handle, method, *args)` for a write nobody waits for: it leaves with
        the next call in its lane, or after `linger_seconds`, so it seldom costs a round
        trip of its own."""
        if kwargs:
            raise TypeError("batched calls take positional arguments only")
        name = method.__name__
        result: R = await self._batcher(handle, name).submit((name, args), self.linger_seconds)
        return result

    def _batcher(self, handle: Handle, method: str) -> CallBatcher:
        loop = asyncio.get_running_loop()
        if loop is not self._batch_loop:
            # futures belong to one loop: a client reused from another loop starts afresh
            self._batchers, self._batch_loop = {}, loop
        slot = (id(handle), self.batch_lanes.get(method, method))
        batcher = self._batchers.get(slot)
        if batcher is None:

            async def send(calls: list[CallArgs]) -> list[tuple[bool, Any]]:
                return await self._send_batch(handle, cast(list[NamedCall], calls))

            batcher = self._batchers[slot] = CallBatcher(send, max_in_flight=self.max_in_flight)
        return batcher

    async def _send_batch(self, handle: Handle, calls: list[NamedCall]) -> list[tuple[bool, Any]]:
        """One `call_many` round trip. A batch mixing reads and writes is not sent again
        when its replica died mid-call (a write in it may have been applied), so its reads
        are then sent again on their own, retried as any read is; its writes fail with
        `ServiceUnavailable`, which a background write retries."""
        from actors.errors import ServiceUnavailable

        try:
            return await self._call(handle, Service.call_many, calls)
        except ServiceUnavailable as exc:
            reads = [i for i, (method, _) in enumerate(calls) if method in self.idempotent_methods]
            if not reads or len(reads) == len(calls):
                raise
            outcomes: list[tuple[bool, Any]] = [(False, exc)] * len(calls)
            again = await self._call(handle, Service.call_many, [calls[i] for i in reads])
            for i, outcome in zip(reads, again, strict=True):
                outcomes[i] = outcome
            return outcomes

    def batching(self) -> dict[str, int]:
        """Service calls made (batched or not) and the Ray round trips that carried them."""
        batched = sum(b.calls for b in self._batchers.values())
        batches = sum(b.batches for b in self._batchers.values())
        return {"calls": self.ray_calls - batches + batched, "round_trips": self.ray_calls}

    async def _call_all(self, method: Method[P, R], /, *args: P.args, **kwargs: P.kwargs) -> list[R]:
        """`method` on every replica, concurrently; results in replica order."""
        return list(await asyncio.gather(*(self._call(h, method, *args, **kwargs) for h in self.handles)))
