"""The DuckDB analytics database: schema, batched Arrow inserts, read-only queries, export.

Only one process may write a DuckDB file, so the analytics sink actor owns the
connection and everyone else queries through it. Every write is one transaction.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

EVENTS_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
        ("type", pa.string()),
        ("server_id", pa.string()),
        ("channel_id", pa.string()),
        ("user_id", pa.string()),
        ("latency_ms", pa.float64()),
        ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()),
        ("cache_hit", pa.bool_()),
        ("error", pa.string()),
        ("weight", pa.float64()),
        ("payload", pa.string()),
    ]
)

AGGREGATES_SCHEMA = pa.schema(
    [
        ("batch_id", pa.string()),
        ("name", pa.string()),
        ("server_id", pa.string()),
        ("minute", pa.timestamp("s", tz="UTC")),
        ("count", pa.int64()),
    ]
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id UUID PRIMARY KEY,
    time TIMESTAMPTZ NOT NULL,
    type VARCHAR NOT NULL,
    server_id VARCHAR,
    channel_id VARCHAR,
    user_id VARCHAR,
    latency_ms DOUBLE,
    tokens_in BIGINT NOT NULL DEFAULT 0,
    tokens_out BIGINT NOT NULL DEFAULT 0,
    cache_hit BOOLEAN,
    error VARCHAR,
    weight DOUBLE NOT NULL DEFAULT 1.0,
    payload JSON
);
CREATE TABLE IF NOT EXISTS aggregates (
    name VARCHAR NOT NULL,
    server_id VARCHAR NOT NULL,
    minute TIMESTAMPTZ NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (name, server_id, minute)
);
CREATE TABLE IF NOT EXISTS applied_batches (
    batch_id VARCHAR PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
"""

# A plain INSERT checks the event-id key faster than INSERT OR IGNORE, and a batch holds a
# known id only after a resend: so a batch goes in plainly first, and only when that hits
# the key is it redone skipping them.
_EVENTS_FROM_ARROW = "events SELECT * EXCLUDE (payload), payload::JSON FROM incoming_events"
_INSERT_EVENTS = f"INSERT INTO {_EVENTS_FROM_ARROW}"
_INSERT_NEW_EVENTS = f"INSERT OR IGNORE INTO {_EVENTS_FROM_ARROW}"
# A resent aggregate batch must not count twice: counts are added only for batch ids
# not applied before, and the batch ids are recorded in the same transaction.
_UPSERT_AGGREGATES = """
INSERT INTO aggregates
SELECT name, server_id, minute, sum(count) FROM incoming_aggregates
WHERE batch_id NOT IN (SELECT batch_id FROM applied_batches)
GROUP BY ALL
ON CONFLICT DO UPDATE SET count = aggregates.count + excluded.count
"""
_RECORD_BATCHES = (
    "INSERT OR IGNORE INTO applied_batches (batch_id) SELECT DISTINCT batch_id FROM incoming_aggregates"
)

_REPLY_TYPES = "type IN ('message', 'command')"
#: the event of one upstream LLM call (the gateway's), with its model, token kinds and cost
LLM_CALL = "type = 'llm_call'"
#: an llm_call event's estimated cost, weighted by its sampling
_COST = "weight * coalesce((payload->>'cost_usd')::DOUBLE, 0)"
#: days are UTC days, whatever the database's time zone
_UTC_DAY = "timezone('UTC', time)::DATE"
#: the whole bot's estimated LLM spend so far this UTC day (what /stats shows)
SPEND_TODAY = f"""
SELECT coalesce(sum({_COST}), 0) AS cost_usd, coalesce(sum(weight), 0)::BIGINT AS calls
FROM events WHERE {LLM_CALL} AND {_UTC_DAY} = timezone('UTC', now())::DATE
"""
#: built-in operator reports; each is one SELECT, so it goes through `check_read_only` too
REPORTS: dict[str, str] = {
    "daily": f"""
SELECT time::DATE AS day,
       sum(weight) FILTER (WHERE {_REPLY_TYPES}) AS messages,
       count(DISTINCT user_id) AS users,
       round(sum(weight * cache_hit::INT) FILTER (WHERE {_REPLY_TYPES})
             / sum(weight) FILTER (WHERE {_REPLY_TYPES}), 3) AS cache_hit_rate,
       round(quantile_cont(latency_ms, 0.5) FILTER (WHERE {_REPLY_TYPES}), 1) AS p50_ms,
       round(quantile_cont(latency_ms, 0.95) FILTER (WHERE {_REPLY_TYPES}), 1) AS p95_ms,
       coalesce(sum(weight) FILTER (WHERE type = 'error'), 0) AS errors,
       coalesce(sum(weight * tokens_in) FILTER (WHERE {_REPLY_TYPES}), 0)::BIGINT AS tokens_in,
       coalesce(sum(weight * tokens_out) FILTER (WHERE {_REPLY_TYPES}), 0)::BIGINT AS tokens_out
FROM events GROUP BY day ORDER BY day DESC
""",
    "top-users": f"""
SELECT user_id,
       sum(weight) FILTER (WHERE {_REPLY_TYPES}) AS messages,
       coalesce(sum(weight * (tokens_in + tokens_out)) FILTER (WHERE {_REPLY_TYPES}), 0)::BIGINT AS tokens,
       coalesce(sum(weight) FILTER (WHERE type = 'rate_limited'), 0) AS rate_limited,
       max(time) AS last_seen
FROM events WHERE user_id IS NOT NULL
GROUP BY user_id ORDER BY messages DESC NULLS LAST, tokens DESC LIMIT 20
""",
    # the per-minute counters the pipeline keeps (exact: never sampled), last hour first
    "minutes": """
SELECT minute, nullif(server_id, '') AS server_id,
       coalesce(sum(count) FILTER (WHERE name = 'messages'), 0) AS messages,
       coalesce(sum(count) FILTER (WHERE name = 'cache_hits'), 0) AS cache_hits,
       coalesce(sum(count) FILTER (WHERE name = 'errors'), 0) AS errors,
       coalesce(sum(count) FILTER (WHERE name = 'rate_limited'), 0) AS rate_limited
FROM aggregates WHERE minute >= now() - INTERVAL 1 HOUR
GROUP BY ALL ORDER BY minute DESC, messages DESC
""",
    # what the LLM cost, from the gateway's event per upstream call (coalesced requests
    # made none; a fallback's call is under the model that answered), by UTC day, server,
    # user and model, the day's most expensive first
    "cost": f"""
SELECT {_UTC_DAY} AS day, server_id, user_id, payload->>'model' AS model,
       sum(weight)::BIGINT AS calls,
       sum(weight * tokens_in)::BIGINT AS prompt_tokens,
       sum(weight * coalesce((payload->>'cached')::BIGINT, 0))::BIGINT AS cached_tokens,
       sum(weight * tokens_out)::BIGINT AS output_tokens,
       sum(weight * coalesce((payload->>'thinking')::BIGINT, 0))::BIGINT AS thinking_tokens,
       round(sum({_COST}), 6) AS cost_usd
FROM events WHERE {LLM_CALL}
GROUP BY ALL ORDER BY day DESC, cost_usd DESC, server_id NULLS LAST, user_id NULLS LAST, model
""",
}

#: statement types an operator's query may have (not EXPLAIN: EXPLAIN ANALYZE runs a write)
READ_STATEMENTS = frozenset({duckdb.StatementType.SELECT})
EXPORT_TABLES = ("events", "aggregates")


class AnalyticsStorageError(RuntimeError):
    """The database file cannot be opened or written; `path` says which file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"analytics database {path} is not usable: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (Path(self.path), self.reason))


class QueryRejected(ValueError):
    """An operator's SQL is not a single read statement, or failed; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason,))


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    #: more rows matched than `max_rows`
    truncated: bool


def check_read_only(sql: str) -> None:
    """Accept exactly one SELECT statement, judged by DuckDB's own parser.

    Raises:
        QueryRejected: empty, unparsable, several statements, or not a read.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRejected(f"cannot parse the query: {exc}") from None
    if not statements:
        raise QueryRejected("the query is empty")
    if len(statements) > 1:
        raise QueryRejected(f"one statement at a time, got {len(statements)}")
    kind = statements[0].type
    if kind not in READ_STATEMENTS:
        raise QueryRejected(f"only SELECT queries are allowed, got {kind.name}")


class AnalyticsDB:
    """One DuckDB file; each `insert_batch` is one transaction.

    Raises:
        AnalyticsStorageError: the file cannot be opened (a directory, a read-only or
            missing parent, or another process holds its lock).
    """

    def __init__(self, path: Path, checkpoint_bytes: int | None = None, threads: int | None = None) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = duckdb.connect(str(path))
        except (OSError, duckdb.Error) as exc:
            raise AnalyticsStorageError(path, str(exc)) from None
        try:
            self.conn.execute(_SCHEMA).fetchall()
            # queries are operator-supplied: no file, network or extension access from
            # SQL (the sink's own inserts read registered Arrow tables, not files)
            self.conn.execute("SET enable_external_access = false").fetchall()
            if threads:
                self.conn.execute(f"SET threads = {int(threads)}").fetchall()
            if checkpoint_bytes is not None:
                self.conn.execute(f"SET checkpoint_threshold = '{int(checkpoint_bytes)}B'").fetchall()
            self.conn.execute("SET lock_configuration = true").fetchall()
        except duckdb.Error as exc:
            self.conn.close()
            raise AnalyticsStorageError(path, str(exc)) from None
        self.transactions = 0
        #: batches redone with INSERT OR IGNORE because they held an already stored id
        self.dedup_retries = 0
        self._write_lock = threading.Lock()

    def insert_batch(self, events: pa.Table, aggregates: pa.Table | None = None) -> int:
        """Insert events (skipping known ids) and add aggregate counts, in one transaction.

        Returns the number of events newly stored.

        Raises:
            AnalyticsStorageError: the transaction could not be committed (rolled back).
        """
        has_aggs = aggregates is not None and aggregates.num_rows > 0
        if events.num_rows == 0 and not has_aggs:
            return 0
        with self._write_lock:
            try:
                try:
                    added = self._transaction(events, aggregates if has_aggs else None, _INSERT_EVENTS)
                except duckdb.ConstraintException:
                    # a resent event is already stored: redo the batch, skipping known ids
                    # (the rolled-back attempt counts as a transaction too)
                    self.dedup_retries += 1
                    self.transactions += 1
                    added = self._transaction(events, aggregates if has_aggs else None, _INSERT_NEW_EVENTS)
            except duckdb.Error as exc:
                raise AnalyticsStorageError(self.path, str(exc)) from None
            self.transactions += 1
            return added

    def _transaction(self, events: pa.Table, aggregates: pa.Table | None, insert_events: str) -> int:
        """One transaction, rolled back on any error (which propagates)."""
        conn = self.conn
        names = ["incoming_events"] + (["incoming_aggregates"] if aggregates is not None else [])
        conn.register("incoming_events", events)
        if aggregates is not None:
            conn.register("incoming_aggregates", aggregates)
        try:
            conn.begin()
            try:
                added = int(conn.execute(insert_events).fetchall()[0][0]) if events.num_rows else 0
                if aggregates is not None:
                    conn.execute(_UPSERT_AGGREGATES).fetchall()
                    conn.execute(_RECORD_BATCHES).fetchall()
                conn.commit()
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    conn.rollback()  # may be gone already; either way nothing was stored
                raise
        finally:
            # after the rollback: an aborted transaction refuses even an unregister
            for name in names:
                with contextlib.suppress(duckdb.Error):
                    conn.unregister(name)
        return added

    def query(self, sql: str, max_rows: int, timeout: float) -> QueryResult:
        """Run one read statement on its own cursor, bounded in rows and seconds.

        Raises:
            QueryRejected: not a single read statement, or it failed or timed out.
        """
        check_read_only(sql)
        with self._write_lock:
            cur = self.conn.cursor()
        timer = threading.Timer(timeout, cur.interrupt)
        timer.start()
        try:
            cur.execute(sql)
            columns = [d[0] for d in cur.description or []]
            rows = cur.fetchmany(max_rows + 1)
        except duckdb.InterruptException:
            raise QueryRejected(f"the query ran longer than {timeout:g}s and was stopped") from None
        except duckdb.Error as exc:
            raise QueryRejected(str(exc)) from None
        finally:
            timer.cancel()
            cur.close()
        return QueryResult(columns, rows[:max_rows], len(rows) > max_rows)

    def export_parquet(self, out_dir: Path) -> dict[str, int]:
        """Write each table to `<out_dir>/<table>.parquet`, streaming; returns rows per table."""
        out_dir.mkdir(parents=True, exist_ok=True)
        written: dict[str, int] = {}
        with self._write_lock:
            cur = self.conn.cursor()
        try:
            for table in EXPORT_TABLES:
                reader = cur.sql(f"SELECT * FROM {table}").to_arrow_reader(65_536)
                tmp = out_dir / f".{table}.parquet.tmp"
                rows = 0
                with pq.ParquetWriter(tmp, reader.schema) as writer:
                    for batch in reader:
                        writer.write_batch(batch)
                        rows += batch.num_rows
                # readers never see a half-written file
                tmp.replace(out_dir / f"{table}.parquet")
                written[table] = rows
        finally:
            cur.close()
        return written

    def delete_user(self, user: str) -> int:
        """Delete every event of `user` in one transaction, then checkpoint, so the
        deletion reaches the database file and DuckDB's log no longer holds the rows;
        returns how many were deleted.

        Raises:
            AnalyticsStorageError: the delete could not be committed (rolled back).
        """
        with self._write_lock:
            try:
                rows = self.conn.execute("DELETE FROM events WHERE user_id = ?", [user]).fetchall()
                deleted = int(rows[0][0])
                self.conn.execute("CHECKPOINT").fetchall()
            except duckdb.Error as exc:
                raise AnalyticsStorageError(self.path, str(exc)) from None
            self.transactions += 1
            return deleted

    def close(self) -> None:
        self.conn.close()
