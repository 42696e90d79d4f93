"""AnalyticsSink: group-commits event batches into DuckDB; AnalyticsClient: the front-end side.

The client buffers validated events (sampled per type, weighted 1/rate) and counters,
sends batches without blocking the reply path, keeps each batch until the sink
acknowledges its commit, and spills what the sink cannot take to a local file that it
replays later. Event ids and aggregate batch ids make every resend count once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field, field_validator

from actors import metrics
from actors.base import Clock, Service, ShardedClient
from actors.errors import RaycordError
from actors.schemas import AnalyticsEvent, ServiceStats
from storage.analytics_db import (
    AGGREGATES_SCHEMA,
    EVENTS_SCHEMA,
    AnalyticsDB,
    AnalyticsStorageError,
    QueryResult,
)

log = logging.getLogger(__name__)

#: one event in `EVENTS_SCHEMA` order; time in epoch microseconds (cheap to build and to spill)
EventRow = tuple[Any, ...]
#: (name, server_id, minute as epoch seconds, count)
AggregateRow = tuple[str, str, int, int]


class AnalyticsConfig(BaseModel):
    #: the sink commits when its oldest pending event is this old...
    flush_seconds: float = Field(default=1.0, gt=0)
    #: ...or when this many events are pending
    flush_events: int = Field(default=5_000, ge=1)
    #: above this many pending events `append_batch` waits (backpressure)...
    max_pending_events: int = Field(default=100_000, ge=1)
    #: ...for at most this long, then raises `AnalyticsBusy`
    append_wait_seconds: float = Field(default=5.0, ge=0)
    #: the client sends a batch when this long has passed or this many events wait...
    #: (the sink commits once per `flush_seconds`, so sending much more often makes nothing
    #: durable sooner: it only costs the front-end a Ray call and a table per batch)
    client_batch_seconds: float = Field(default=0.5, gt=0)
    client_batch_events: int = Field(default=500, ge=1)
    #: ...and up to this many in one call when more have built up (the sender ran late, or
    #: every send slot was busy): a Ray call costs the same CPU on each side whatever it
    #: carries, so the events per call cap a sink's rate (BENCHMARKS.md, analytics)
    client_max_batch_events: int = Field(default=2_000, ge=1)
    #: batches the client may have unacknowledged at once. A batch is acknowledged after
    #: its commit, so these must cover what a commit holds and what queues for the next
    #: (32 x 2,000 stays under the sink's `max_pending_events`; BENCHMARKS.md has the runs)
    client_max_inflight: int = Field(default=32, ge=1)
    #: events the client holds in memory before spilling the excess to disk
    client_max_buffer_events: int = Field(default=50_000, ge=1)
    #: seconds after a failed delivery before spilled files are replayed
    client_replay_seconds: float = Field(default=1.0, gt=0)
    #: where unacknowledged batches go; default `<state_dir>/analytics-spill`
    spill_dir: Path | None = None
    #: event type -> fraction kept, in (0, 1]; a kept event stores weight 1/rate
    sample_rates: dict[str, float] = Field(default_factory=dict)
    #: the sink process's GIL switch interval (ms; 0 keeps Python's 5 ms). DuckDB takes the
    #: GIL back for each chunk of an Arrow scan, and waits up to this long each time while
    #: the loop converts the next batches, so Python's default slows its inserts
    gil_switch_interval_ms: float = Field(default=1.0, ge=0)
    #: DuckDB checkpoints (rewrites the event-id index) each time its write-ahead log grows
    #: this much: at DuckDB's own 16 MB the checkpoints grow with the table and the insert
    #: rate falls as it does; a large log keeps it flat. A restart replays at most this much.
    checkpoint_wal_mb: int = Field(default=256, ge=1)
    #: DuckDB's worker threads in the sink's process (0: one per core). One keeps its
    #: inserts from competing with the process's own threads for the interpreter lock and
    #: the cores. Operator queries run on them too.
    duckdb_threads: int = Field(default=1, ge=0)
    query_max_rows: int = Field(default=1_000, ge=1)
    query_timeout_seconds: float = Field(default=10.0, gt=0)
    #: how long after a forget the sink drops arriving events of that user that were
    #: recorded before it (still buffered or spilled in another front-end)
    forget_tombstone_seconds: float = Field(default=600.0, gt=0)

    @field_validator("sample_rates")
    @classmethod
    def _rates_in_range(cls, rates: dict[str, float]) -> dict[str, float]:
        for kind, rate in rates.items():
            if not 0 < rate <= 1:
                raise ValueError(f"sample rate for {kind!r} must be in (0, 1], got {rate}")
        return rates


class AnalyticsBusy(RaycordError):
    """The sink has more pending events than it may hold; the batch was not taken."""

    def __init__(self, pending: int, waited: float) -> None:
        super().__init__(f"analytics sink busy: {pending} events pending after waiting {waited:g}s")
        self.pending = pending
        self.waited = waited

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.pending, self.waited))


def event_row(event: AnalyticsEvent, weight: float | None = None) -> EventRow:
    """The plain tuple the client ships to the sink, in `EVENTS_SCHEMA` order."""
    return (
        # the 32-digit hex form: cheaper than str(), and DuckDB reads it as the same UUID
        event.event_id.hex,
        int(event.time.timestamp() * 1_000_000),
        event.type,
        event.server_id,
        event.channel_id,
        event.user_id,
        event.latency_ms,
        event.tokens_in,
        event.tokens_out,
        event.cache_hit,
        event.error,
        event.weight if weight is None else weight,
        # encoded here, so a payload JSON cannot hold fails its own event, not a whole
        # batch at the sink (orjson, for its speed)
        orjson.dumps(event.payload).decode() if event.payload else None,
    )


def table_to_ipc(table: pa.Table) -> bytes:
    """An Arrow IPC stream: how the client ships a batch. Ray's own Arrow serialization
    costs ~1 ms each way for 500 events here; this is ~0.1 ms each way."""
    out = pa.BufferOutputStream()
    with pa.ipc.new_stream(out, table.schema) as writer:
        writer.write_table(table)
    ipc: bytes = out.getvalue().to_pybytes()
    return ipc


def events_table(events: bytes | pa.Table | Sequence[EventRow]) -> pa.Table:
    """An appended batch as an `EVENTS_SCHEMA` table: rows are converted, an IPC stream
    read, a table checked.

    Raises:
        ValueError: not an Arrow IPC stream, or columns that are not `EVENTS_SCHEMA`'s
            (and cannot be cast to them).
    """
    if isinstance(events, bytes | bytearray | memoryview):
        try:
            events = pa.ipc.open_stream(events).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"event batch is not an Arrow IPC stream: {exc}") from None
    if not isinstance(events, pa.Table):
        return rows_to_table(events)
    if events.schema.equals(EVENTS_SCHEMA):
        return events
    missing = set(EVENTS_SCHEMA.names) - set(events.schema.names)
    if missing:
        raise ValueError(f"event table lacks columns {sorted(missing)}")
    try:
        return events.select(EVENTS_SCHEMA.names).cast(EVENTS_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"event table does not fit the events schema: {exc}") from None


def open_db(path: Path, config: AnalyticsConfig) -> AnalyticsDB:
    """The analytics database with the sink's DuckDB settings (checkpoints, threads).

    Raises:
        AnalyticsStorageError: the file cannot be opened.
    """
    return AnalyticsDB(path, checkpoint_bytes=config.checkpoint_wal_mb * 2**20, threads=config.duckdb_threads)


def rows_to_table(rows: Sequence[EventRow]) -> pa.Table:
    columns: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [[] for _ in EVENTS_SCHEMA]
    return pa.Table.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, EVENTS_SCHEMA, strict=True)],
        schema=EVENTS_SCHEMA,
    )


def aggregates_to_table(batches: Sequence[tuple[str, Sequence[AggregateRow]]]) -> pa.Table:
    flat = [(batch_id, *row) for batch_id, rows in batches for row in rows]
    columns: list[Sequence[Any]] = list(zip(*flat, strict=True)) if flat else [[] for _ in AGGREGATES_SCHEMA]
    return pa.Table.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, AGGREGATES_SCHEMA, strict=True)],
        schema=AGGREGATES_SCHEMA,
    )


def _insert_tables(
    db: AnalyticsDB, tables: list[pa.Table], aggs: Sequence[tuple[str, Sequence[AggregateRow]]]
) -> int:
    events = pa.concat_tables(tables) if tables else rows_to_table(())
    return db.insert_batch(events, aggregates_to_table(aggs) if aggs else None)


class AnalyticsStats(ServiceStats):
    received: int
    committed: int
    #: events received again after a resend and skipped by their id
    duplicates: int
    pending: int
    flushes: int
    transactions: int
    last_flush_size: int
    mean_flush_size: float
    last_commit_ms: float
    max_commit_ms: float
    events_per_second: float
    busy_rejections: int
    storage_errors: int
    last_error: str | None


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
        self.db_path = Path(state_dir or ".raycord") / "analytics.duckdb"
        if self.config.gil_switch_interval_ms:
            # process-wide: meant for the sink's own actor process (a sink built in
            # process, as in tests and the bench, sets it for its host process too)
            sys.setswitchinterval(self.config.gil_switch_interval_ms / 1000)
        self.db: AnalyticsDB | None = None
        #: each appended batch as an Arrow table, converted on arrival so the conversion
        #: overlaps the commit running on the writer thread (DuckDB releases the GIL)
        self._pending: list[pa.Table] = []
        self._pending_events = 0
        self._pending_aggs: list[tuple[str, Sequence[AggregateRow]]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._oldest: float | None = None
        self._flush_lock = asyncio.Lock()
        self._drained = asyncio.Condition()
        self._flusher: asyncio.Task[None] | None = None
        #: user -> wall-clock time (events carry wall-clock times) they were forgotten
        self._tombstones: dict[str, float] = {}
        self.received = self.committed = self.flushes = 0
        self.busy_rejections = self.storage_errors = 0
        self.last_flush_size = 0
        self.last_commit_ms = self.max_commit_ms = 0.0
        self.last_error: str | None = None
        self._rate_mark = (self.clock(), 0)
        self.events_per_second = 0.0
        self._m_depth = metrics.gauge("analytics_queue_depth", "events waiting for a commit")
        self._m_flush = metrics.histogram(
            "analytics_flush_events", "events per commit", (1, 10, 100, 500, 1000, 5000, 10000, 50000)
        )
        self._m_commit = metrics.histogram(
            "analytics_commit_ms", "DuckDB commit latency", metrics.LATENCY_MS_BOUNDARIES
        )
        self._m_committed = metrics.counter("analytics_events_committed", "events stored in DuckDB")
        self._m_rate = metrics.gauge("analytics_events_per_second", "events committed per second")
        # open eagerly so a bad state dir shows in the logs at start; appends retry the open
        with contextlib.suppress(AnalyticsStorageError):
            self._open()

    def _open(self) -> AnalyticsDB:
        if self.db is None:
            try:
                self.db = open_db(self.db_path, self.config)
            except AnalyticsStorageError as exc:
                self.storage_errors += 1
                self.last_error = str(exc)
                log.error("%s", exc)
                raise
        return self.db

    async def append_batch(
        self,
        events: bytes | pa.Table | list[EventRow],
        aggregates: Sequence[AggregateRow] = (),
        batch_id: str = "",
    ) -> int:
        """Queue a batch for the next group commit; returns once it is committed.

        `events` is an `EVENTS_SCHEMA` Arrow IPC stream (what the client sends: converted on
        the front-end, so the sink's loop leaves the interpreter to DuckDB), an Arrow table
        or a list of rows.

        Raises:
            ValueError: a malformed batch (refused to its sender alone, never failing a flush).
            AnalyticsStorageError: the database cannot be opened or the commit failed.
            AnalyticsBusy: the sink stayed over `max_pending_events` for `append_wait_seconds`.
        """
        self._ensure_maintenance()
        if aggregates and not batch_id:
            raise ValueError("aggregates need a batch_id so a resend is applied once")
        table = events_table(events)
        if self._tombstones and table.num_rows:
            table = self._drop_forgotten(table)
        count: int = table.num_rows
        if not count and not aggregates:
            return 0
        self._open()
        await self._wait_for_room()
        self.received += count
        if count:
            self._pending.append(table)
            self._pending_events += count
        if aggregates:
            self._pending_aggs.append((batch_id, aggregates))
        if self._oldest is None:
            self._oldest = self.clock()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        self._m_depth.set(self._pending_events)
        flusher_idle = self._flusher is None or self._flusher.done()
        if self._pending_events >= self.config.flush_events and flusher_idle:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_by_size())
        await done
        return count

    def _drop_forgotten(self, table: pa.Table) -> pa.Table:
        """`table` less the events of forgotten users recorded before their forget."""
        keep = None
        for user, at in self._tombstones.items():
            before = pa.scalar(int(at * 1_000_000), type=pa.timestamp("us", tz="UTC"))
            theirs = pc.and_(pc.equal(table["user_id"], user), pc.less_equal(table["time"], before))
            drop = pc.fill_null(theirs, False)
            keep = pc.invert(drop) if keep is None else pc.and_(keep, pc.invert(drop))
        return table if keep is None else table.filter(keep)

    async def forget_user(self, user: str) -> int:
        """Delete every stored event of `user`; returns how many. Events still pending are
        committed first and deleted with the rest; events of theirs recorded before now
        that arrive later are dropped on arrival. The per-minute counters name no user
        and stay, so totals do not change.

        Raises:
            ValueError: an empty user id.
            AnalyticsStorageError: the database cannot be opened or the delete failed.
        """
        self._ensure_maintenance()
        if not user:
            raise ValueError("user must not be empty")
        self._tombstones[user] = time.time()
        await self.flush()
        db = self._open()
        async with self._flush_lock:
            return await asyncio.to_thread(db.delete_user, user)

    async def _wait_for_room(self) -> None:
        if self._pending_events < self.config.max_pending_events:
            return
        started = time.monotonic()
        async with self._drained:
            try:
                await asyncio.wait_for(
                    self._drained.wait_for(lambda: self._pending_events < self.config.max_pending_events),
                    self.config.append_wait_seconds,
                )
            except TimeoutError:
                self.busy_rejections += 1
                raise AnalyticsBusy(self._pending_events, time.monotonic() - started) from None

    async def _flush_by_size(self) -> None:
        while self._pending_events >= self.config.flush_events:
            if not await self._commit_pending():
                return

    async def maintain(self) -> None:
        expired = time.time() - self.config.forget_tombstone_seconds
        for user in [u for u, at in self._tombstones.items() if at < expired]:
            del self._tombstones[user]
        now = self.clock()
        if self._oldest is not None and now - self._oldest >= self.config.flush_seconds:
            await self._commit_pending()
        mark_t, mark_n = self._rate_mark
        if now > mark_t:
            self.events_per_second = (self.committed - mark_n) / (now - mark_t)
            self._rate_mark = (now, self.committed)
        self._m_rate.set(self.events_per_second)
        self._m_depth.set(self._pending_events)

    async def _commit_pending(self) -> bool:
        """Commit everything pending in one transaction; wake its appenders. True on success."""
        async with self._flush_lock:
            if not self._pending and not self._pending_aggs:
                return True
            tables, aggs, waiters = self._pending, self._pending_aggs, self._waiters
            flush_size = self._pending_events
            self._pending, self._pending_aggs, self._waiters, self._oldest = [], [], [], None
            self._pending_events = 0
            error: Exception | None = None
            started = time.perf_counter()
            try:
                db = self._open()
                added = await asyncio.to_thread(_insert_tables, db, tables, aggs)
            except AnalyticsStorageError as exc:
                error = exc
                self.storage_errors += 1
                self.last_error = str(exc)
                # reopen on the next append: the file may be usable again by then
                if self.db is not None:
                    with contextlib.suppress(Exception):
                        self.db.close()
                    self.db = None
            except Exception as exc:  # anything else: the appenders are told, and resend
                error = exc
                self.last_error = f"{type(exc).__name__}: {exc}"
            if error is None:
                commit_ms = (time.perf_counter() - started) * 1000
                self.committed += added
                self.flushes += 1
                self.last_flush_size = flush_size
                self.last_commit_ms = commit_ms
                self.max_commit_ms = max(self.max_commit_ms, commit_ms)
            for w in waiters:
                if not w.done():
                    if error is None:
                        w.set_result(None)
                    else:
                        w.set_exception(error)
            if error is None:
                self._m_flush.observe(flush_size)
                self._m_commit.observe(commit_ms)
                if added:  # a Ray counter refuses 0 (all duplicates, or aggregates only)
                    self._m_committed.inc(added)
        async with self._drained:
            self._drained.notify_all()
        self._m_depth.set(self._pending_events)
        return error is None

    async def flush(self) -> None:
        """Commit everything pending now.

        Raises:
            AnalyticsStorageError: the commit failed (the appenders were told; they resend).
        """
        while self._pending or self._pending_aggs:
            if not await self._commit_pending():
                raise AnalyticsStorageError(self.db_path, self.last_error or "commit failed")

    async def query(self, sql: str, max_rows: int | None = None, timeout: float | None = None) -> QueryResult:
        """Run one read-only statement after committing what is pending.

        Raises:
            QueryRejected: not a single SELECT, or it failed or ran too long.
            AnalyticsStorageError: the database cannot be opened.
        """
        await self.flush()
        db = self._open()
        return await asyncio.to_thread(
            db.query,
            sql,
            max_rows or self.config.query_max_rows,
            timeout or self.config.query_timeout_seconds,
        )

    async def export_parquet(self, out_dir: str) -> dict[str, int]:
        """Write every table as Parquet under `out_dir` (on the sink's node); rows per table."""
        await self.flush()
        db = self._open()
        return await asyncio.to_thread(db.export_parquet, Path(out_dir))

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            if self.db is not None:
                self.db.close()
                self.db = None

    async def stats(self) -> AnalyticsStats:
        return AnalyticsStats(
            service="analytics",
            shard=self.shard,
            received=self.received,
            committed=self.committed,
            duplicates=self.received - self.committed,
            pending=self._pending_events,
            flushes=self.flushes,
            transactions=self.db.transactions if self.db is not None else 0,
            last_flush_size=self.last_flush_size,
            mean_flush_size=self.committed / self.flushes if self.flushes else 0.0,
            last_commit_ms=self.last_commit_ms,
            max_commit_ms=self.max_commit_ms,
            events_per_second=self.events_per_second,
            busy_rejections=self.busy_rejections,
            storage_errors=self.storage_errors,
            last_error=self.last_error,
        )


@dataclass(slots=True)
class _Batch:
    batch_id: str
    rows: list[EventRow]
    aggregates: list[AggregateRow]

    def to_json(self) -> str:
        return orjson.dumps({"id": self.batch_id, "rows": self.rows, "aggs": self.aggregates}).decode()

    @classmethod
    def from_json(cls, line: str) -> _Batch:
        doc = orjson.loads(line)
        return cls(doc["id"], [tuple(r) for r in doc["rows"]], [tuple(a) for a in doc["aggs"]])


class ClientStats(BaseModel):
    recorded: int
    sampled_out: int
    #: events handed to the sink (first sends, not resends)
    sent: int
    #: calls that handed them over
    batches_sent: int
    #: events the sink acknowledged as committed (first sends and replays)
    committed: int
    spilled: int
    replayed: int
    buffered: int
    inflight_batches: int
    spill_files: int
    failed_deliveries: int


class AnalyticsClient(ShardedClient):
    """Front-end side: `record()` costs a tuple and a list append; a sender task ships batches."""

    def __init__(
        self,
        handles: list[object],
        config: AnalyticsConfig | None = None,
        state_dir: Path | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(handles)
        self.config = config or AnalyticsConfig()
        self.clock: Clock = clock or time.time
        self._rng = rng or random.Random()
        self._rates = self.config.sample_rates
        self.spill_dir = self.config.spill_dir or Path(state_dir or ".raycord") / "analytics-spill"
        self._buffer: list[EventRow] = []
        self._counts: dict[tuple[str, str, int], int] = {}
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._replayer: asyncio.Task[bool] | None = None
        self._inflight: set[asyncio.Task[bool]] = set()
        self._retry: list[_Batch] = []
        self._spill_file: IO[str] | None = None
        self._spill_path: Path | None = None
        self._last_failure = float("-inf")
        self.recorded = self.sampled_out = self.sent = self.batches_sent = self.committed = 0
        self.spilled = self.replayed = self.failed_deliveries = 0
        # pyarrow imports pandas the first time it builds a table: pay that once here, at
        # start, rather than in the front-end's loop on the first batch of events
        table_to_ipc(rows_to_table(()))

    def record(self, event: AnalyticsEvent) -> None:
        """Buffer one validated event (or drop it by its type's sample rate). Never blocks."""
        rate = self._rates.get(event.type)
        if rate is None:
            row = event_row(event)
        elif self._rng.random() < rate:
            row = event_row(event, event.weight / rate)
        else:
            self.sampled_out += 1
            return
        self._buffer.append(row)
        self.recorded += 1
        self._start_sender()
        if len(self._buffer) >= self.config.client_batch_events:
            self._wake.set()

    def count(self, name: str, server_id: str | None = None, n: int = 1) -> None:
        """Add `n` to a per-minute counter, stored as one aggregated row, not a row per event."""
        key = (name, server_id or "", int(self.clock() // 60 * 60))
        self._counts[key] = self._counts.get(key, 0) + n
        self._start_sender()

    def _start_sender(self) -> None:
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_loop())

    async def _send_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.client_batch_seconds)
            self._wake.clear()
            self._ship()
            if self.clock() - self._last_failure >= self.config.client_replay_seconds:
                self._start_replay()

    def _next_batch(self) -> _Batch:
        # a backlog goes out in bigger calls; otherwise a batch is what the triggers gathered
        size = max(self.config.client_batch_events, self.config.client_max_batch_events)
        rows = self._buffer[:size]
        del self._buffer[: len(rows)]
        aggs = [(name, server, minute, n) for (name, server, minute), n in self._counts.items()]
        self._counts.clear()
        return _Batch(uuid.uuid4().hex, rows, aggs)

    def _ship(self) -> None:
        """Turn the buffer into batches: deliver while there is room in flight, spill the excess."""
        while self._retry and len(self._inflight) < self.config.client_max_inflight:
            self._deliver_soon(self._retry.pop(0))
        while self._buffer or self._counts:
            if len(self._inflight) < self.config.client_max_inflight:
                batch = self._next_batch()
                self.sent += len(batch.rows)
                self.batches_sent += 1
                self._deliver_soon(batch)
            elif len(self._buffer) > self.config.client_max_buffer_events:
                self._spill(self._next_batch())
            else:
                return

    def _deliver_soon(self, batch: _Batch) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(batch, spill_on_failure=True))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _deliver(self, batch: _Batch, spill_on_failure: bool) -> bool:
        try:
            # converted here, not at the sink: its loop then leaves the interpreter lock to
            # DuckDB's insert (which takes it back for each chunk it scans)
            events = table_to_ipc(rows_to_table(batch.rows)) if batch.rows else []
            await self._call(
                self.handles[0], AnalyticsSink.append_batch, events, batch.aggregates, batch.batch_id
            )
        except Exception as exc:
            self.failed_deliveries += 1
            self._last_failure = self.clock()
            log.warning("analytics batch of %d not acknowledged: %s", len(batch.rows), exc)
            if spill_on_failure:
                self._spill(batch)
            return False
        self.committed += len(batch.rows)
        return True

    def _spill(self, batch: _Batch) -> None:
        """Append a batch to the current spill file, durably; keep it in memory if that fails."""
        try:
            if self._spill_file is None:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                self._spill_path = self.spill_dir / f"spill-{time.time_ns()}-{uuid.uuid4().hex[:8]}.jsonl"
                self._spill_file = self._spill_path.open("a", encoding="utf-8")
            self._spill_file.write(batch.to_json() + "\n")
            self._spill_file.flush()
            os.fsync(self._spill_file.fileno())
        except OSError as exc:
            log.error("cannot spill analytics to %s (%s); keeping the batch in memory", self.spill_dir, exc)
            self._retry.append(batch)
            return
        self.spilled += len(batch.rows)

    def _spill_files(self) -> list[Path]:
        if not self.spill_dir.is_dir():
            return []
        return sorted(p for p in self.spill_dir.glob("spill-*.jsonl") if p != self._spill_path)

    def _start_replay(self) -> None:
        if self._replayer is not None and not self._replayer.done():
            return
        if self._spill_file is None and not self._spill_files():
            return
        self._replayer = asyncio.get_running_loop().create_task(self.replay())

    async def replay(self) -> bool:
        """Resend every spilled batch; delete a file only once all of it is acknowledged.

        Returns True when no spilled events remain.
        """
        # new spills go to a new file, so the one being replayed is complete
        if self._spill_file is not None:
            self._spill_file.close()
            self._spill_file = self._spill_path = None
        for path in self._spill_files():
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                log.error("cannot read spilled analytics %s: %s", path, exc)
                return False
            batches = [_Batch.from_json(line) for line in lines if line.strip()]
            acked = await asyncio.gather(*(self._deliver(b, spill_on_failure=False) for b in batches))
            if not all(acked):
                return False
            self.replayed += sum(len(b.rows) for b in batches)
            path.unlink()
        return True

    async def flush(self) -> None:
        """Ship everything buffered, wait for the acknowledgements, then try a replay.

        What the sink cannot take now stays spilled on disk for a later replay.
        """
        while self._buffer or self._counts or self._retry or self._inflight:
            self._ship()
            if self._inflight:
                await asyncio.wait(set(self._inflight), return_when=asyncio.FIRST_COMPLETED)
        if self._replayer is not None and not self._replayer.done():
            await self._replayer
        self._start_replay()
        if self._replayer is not None and not self._replayer.done():
            await self._replayer

    async def close(self) -> None:
        await self.flush()
        for task in (self._sender, self._replayer):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._spill_file is not None:
            self._spill_file.close()
            self._spill_file = self._spill_path = None

    def stats_local(self) -> ClientStats:
        return ClientStats(
            recorded=self.recorded,
            sampled_out=self.sampled_out,
            sent=self.sent,
            batches_sent=self.batches_sent,
            committed=self.committed,
            spilled=self.spilled,
            replayed=self.replayed,
            buffered=len(self._buffer),
            inflight_batches=len(self._inflight),
            spill_files=len(self._spill_files()) + (self._spill_file is not None),
            failed_deliveries=self.failed_deliveries,
        )

    async def query(self, sql: str, max_rows: int | None = None, timeout: float | None = None) -> QueryResult:
        return await self._call(self.handles[0], AnalyticsSink.query, sql, max_rows, timeout)

    async def export_parquet(self, out_dir: str) -> dict[str, int]:
        return await self._call(self.handles[0], AnalyticsSink.export_parquet, out_dir)

    async def forget_user(self, user: str) -> int:
        """Delete every event of `user`: those still buffered here are dropped, those in
        flight are let through first, then the sink deletes what it stored; returns how
        many the sink deleted."""
        self._buffer = [row for row in self._buffer if row[5] != user]
        await self.flush()
        deleted: int = await self._call(self.handles[0], AnalyticsSink.forget_user, user)
        return deleted

    async def stats(self) -> list[AnalyticsStats]:
        return await self._call_all(AnalyticsSink.stats)
