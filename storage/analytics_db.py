"""The DuckDB analytics database: schema, batched Arrow inserts and read-only queries.

Only one process may write a DuckDB file, so the analytics sink actor owns the
connection and everyone else queries through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

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

_CREATE_EVENTS = """
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
)
"""


class AnalyticsDB:
    """One DuckDB file; `insert_events` is one transaction per call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = duckdb.connect(str(path))
        self.conn.execute(_CREATE_EVENTS).fetchall()
        self.transactions = 0

    def insert_events(self, table: pa.Table) -> int:
        """Insert an Arrow table of events in one transaction, skipping known event ids.

        Returns the number of rows newly stored.
        """
        if table.num_rows == 0:
            return 0
        self.conn.begin()
        try:
            before = self._count()
            self.conn.register("incoming_events", table)
            self.conn.execute(
                "INSERT OR IGNORE INTO events SELECT * EXCLUDE (payload), payload::JSON FROM incoming_events"
            ).fetchall()
            self.conn.unregister("incoming_events")
            added = self._count() - before
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise
        self.transactions += 1
        return added

    def _count(self) -> int:
        row = self.conn.execute("SELECT count(*) FROM events").fetchall()[0]
        return int(row[0]) if row else 0

    def query(self, sql: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
        cur = self.conn.execute(sql, params or [])
        columns = [d[0] for d in cur.description or []]
        return columns, cur.fetchall()

    def close(self) -> None:
        self.conn.close()
