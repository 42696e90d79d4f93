"""AnalyticsSink: group-commits event batches into DuckDB; the front-end's buffering client.

The client buffers validated events and sends them in batches without blocking the
reply path; it keeps a batch until the sink acknowledges it (after commit) and resends
it otherwise. Event ids are primary keys, so a resend never counts twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, Field

from actors.base import Clock, Service, ShardedClient
from actors.schemas import AnalyticsEvent, ServiceStats
from storage.analytics_db import EVENTS_SCHEMA, AnalyticsDB

log = logging.getLogger(__name__)

EventRow = tuple[Any, ...]


class AnalyticsConfig(BaseModel):
    flush_seconds: float = Field(default=1.0, gt=0)
    flush_events: int = Field(default=5_000, ge=1)
    client_batch_seconds: float = Field(default=0.1, gt=0)
    client_batch_events: int = Field(default=500, ge=1)


def event_row(event: AnalyticsEvent) -> EventRow:
    """The plain tuple the client ships to the sink, in `EVENTS_SCHEMA` order."""
    return (
        str(event.event_id),
        event.time,
        event.type,
        event.server_id,
        event.channel_id,
        event.user_id,
        event.latency_ms,
        event.tokens_in,
        event.tokens_out,
        event.cache_hit,
        event.error,
        event.weight,
        json.dumps(event.payload, separators=(",", ":")),
    )


def rows_to_table(rows: list[EventRow]) -> pa.Table:
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in EVENTS_SCHEMA]
    return pa.Table.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, EVENTS_SCHEMA, strict=True)],
        schema=EVENTS_SCHEMA,
    )


class AnalyticsStats(ServiceStats):
    received: int
    committed: int
    pending: int
    flushes: int
    transactions: int


class AnalyticsSink(Service):
    def __init__(
        self,
        config: AnalyticsConfig | None = None,
        state_dir: Path | None = None,
        shard: int = 0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(clock)
        self.config = config or AnalyticsConfig()
        self.shard = shard
        self.maintenance_interval = min(self.config.flush_seconds, 1.0)
        self.db = AnalyticsDB(Path(state_dir or ".raycord") / "analytics.duckdb")
        self._pending: list[EventRow] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._oldest: float | None = None
        self._flush_lock = asyncio.Lock()
        self.received = self.committed = self.flushes = 0

    async def append_batch(self, rows: list[EventRow]) -> int:
        """Queue rows for the next group commit; returns once they are committed."""
        self._ensure_maintenance()
        if not rows:
            return 0
        self.received += len(rows)
        self._pending.extend(rows)
        if self._oldest is None:
            self._oldest = self.clock()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        if len(self._pending) >= self.config.flush_events:
            await self.flush()
        await done
        return len(rows)

    async def maintain(self) -> None:
        if self._oldest is not None and self.clock() - self._oldest >= self.config.flush_seconds:
            await self.flush()

    async def flush(self) -> None:
        async with self._flush_lock:
            if not self._pending:
                return
            rows, waiters = self._pending, self._waiters
            self._pending, self._waiters, self._oldest = [], [], None
            try:
                self.committed += self.db.insert_events(rows_to_table(rows))
                self.flushes += 1
            except Exception as exc:
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                raise
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def query(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        await self.flush()
        return self.db.query(sql)

    async def close(self) -> None:
        await super().close()
        self.db.close()

    async def stats(self) -> AnalyticsStats:
        return AnalyticsStats(
            service="analytics",
            shard=self.shard,
            received=self.received,
            committed=self.committed,
            pending=len(self._pending),
            flushes=self.flushes,
            transactions=self.db.transactions,
        )


class AnalyticsClient(ShardedClient):
    """Front-end side: `record()` costs a list append; a sender task ships batches."""

    def __init__(self, handles: list[object], config: AnalyticsConfig | None = None) -> None:
        super().__init__(handles)
        self.config = config or AnalyticsConfig()
        self._buffer: list[EventRow] = []
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._inflight: list[EventRow] = []
        self._send_lock = asyncio.Lock()
        self.sent = 0

    def record(self, event: AnalyticsEvent) -> None:
        self._buffer.append(event_row(event))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_loop())
        if len(self._buffer) >= self.config.client_batch_events:
            self._wake.set()

    async def _send_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.client_batch_seconds)
            self._wake.clear()
            await self._send_pending()

    async def _send_pending(self) -> None:
        """Send the buffer; a batch stays owned by the client until the sink acknowledges it."""
        async with self._send_lock:
            await self._send_locked()

    async def _send_locked(self) -> None:
        while self._buffer or self._inflight:
            if not self._inflight:
                self._inflight = self._buffer[: self.config.client_batch_events]
                del self._buffer[: len(self._inflight)]
            try:
                await self._call(self.handles[0], "append_batch", self._inflight)
            except Exception as exc:
                log.warning(
                    "analytics batch of %d not acknowledged, will resend: %s", len(self._inflight), exc
                )
                await asyncio.sleep(0.5)
                continue
            self.sent += len(self._inflight)
            self._inflight = []

    async def flush(self) -> None:
        """Send everything buffered and wait for the sink's acknowledgement."""
        await self._send_pending()

    async def close(self) -> None:
        await self.flush()
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender

    async def query(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        return await self._call(self.handles[0], "query", sql)  # type: ignore[return-value]

    async def stats(self) -> list[AnalyticsStats]:
        return await self._call_all("stats")  # type: ignore[return-value]
