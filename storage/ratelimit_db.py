"""The rate limiter's on-disk state: one SQLite file per shard, one row per live key.

A row is a key's compact bucket counts (little-endian uint32) and the time of its last
allowed request; `expires` lets a restarted shard skip and delete drained keys at once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from storage.sqlite import Statement, SyncMode, open_sqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS ratelimit_state (
    key TEXT PRIMARY KEY,
    last_us INTEGER NOT NULL,
    expires_us INTEGER NOT NULL,
    counts BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ratelimit_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_UPSERT = (
    "INSERT INTO ratelimit_state (key, last_us, expires_us, counts) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(key) DO UPDATE SET last_us = excluded.last_us, expires_us = excluded.expires_us, "
    "counts = excluded.counts"
)
_DELETE = "DELETE FROM ratelimit_state WHERE key = ?"
_SET_META = "INSERT OR REPLACE INTO ratelimit_meta (name, value) VALUES (?, ?)"


def db_path(state_dir: Path | None, shard: int) -> Path:
    """`<state_dir>/ratelimit-<shard>.sqlite`, or an in-memory database without a state dir."""
    if state_dir is None:
        return Path(":memory:")
    return state_dir / f"ratelimit-{shard}.sqlite"


def open_db(path: Path, synchronous: SyncMode = "NORMAL") -> sqlite3.Connection:
    return open_sqlite(path, SCHEMA, synchronous)


def upsert(key: str, last_us: int, expires_us: int, counts: bytes) -> Statement:
    return (_UPSERT, (key, last_us, expires_us, counts))


def delete(key: str) -> Statement:
    return (_DELETE, (key,))


def set_meta(name: str, value: str) -> Statement:
    return (_SET_META, (name, value))


def get_meta(conn: sqlite3.Connection, name: str) -> str | None:
    row = conn.execute("SELECT value FROM ratelimit_meta WHERE name = ?", (name,)).fetchone()
    return None if row is None else str(row[0])


def load_live(conn: sqlite3.Connection, now_us: int) -> Iterator[tuple[str, int, bytes]]:
    """Delete keys drained by `now_us`, then yield (key, last_us, counts) of the rest,
    oldest activity first (the order idle-key cleanup relies on)."""
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("DELETE FROM ratelimit_state WHERE expires_us <= ?", (now_us,))
    conn.execute("COMMIT")
    cursor = conn.execute("SELECT key, last_us, counts FROM ratelimit_state ORDER BY last_us")
    for key, last_us, counts in cursor:
        yield str(key), int(last_us), bytes(counts)
