"""The rate limiter's durable state: one SQLite file (or PostgreSQL schema) per shard,
one row per live key.

A row is a key's compact bucket counts (little-endian uint32) and the time of its last
allowed request; `expires` lets a restarted shard skip and delete drained keys at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.migrations import Migration, migrate_sqlite
from storage.postgres import PgCommitter, PgDatabase, PgTarget
from storage.sqlite import BatchCommitter, GroupCommitter, Statement, SyncMode, open_sqlite, run_transaction

STORE = "ratelimit"

#: the rate limiter's schema, oldest first; a new table is one more `Migration`
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        sqlite="""
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
""",
        postgres="""
CREATE TABLE ratelimit_state (
    key TEXT PRIMARY KEY,
    last_us BIGINT NOT NULL,
    expires_us BIGINT NOT NULL,
    counts BYTEA NOT NULL
);
CREATE INDEX ratelimit_state_by_last_us ON ratelimit_state(last_us);
CREATE TABLE ratelimit_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
""",
    ),
)

_UPSERT = (
    "INSERT INTO ratelimit_state (key, last_us, expires_us, counts) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET last_us = excluded.last_us, expires_us = excluded.expires_us, "
    "counts = excluded.counts"
)
_DELETE = "DELETE FROM ratelimit_state WHERE key = ?"
_SET_META = (
    "INSERT INTO ratelimit_meta (name, value) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)


def db_path(state_dir: Path | None, shard: int) -> Path:
    """`<state_dir>/ratelimit-<shard>.sqlite`, or an in-memory database without a state dir."""
    if state_dir is None:
        return Path(":memory:")
    return state_dir / f"ratelimit-{shard}.sqlite"


class RateLimitDB:
    """One shard's state: its group committer and the reads a restart needs.

    Raises (from the constructor):
        SchemaTooNew: the stored schema was written by a newer raycord.
        StateUnavailable: the PostgreSQL server cannot be reached.
    """

    def __init__(
        self,
        state: Path | PgTarget | None,
        shard: int = 0,
        synchronous: SyncMode = "NORMAL",
        commit_delay: float = 0.0,
    ) -> None:
        self.committer: BatchCommitter
        self._execute: Callable[[list[Statement]], None]
        if isinstance(state, PgTarget):
            db = PgDatabase(state, f"{STORE}_{shard}", STORE, MIGRATIONS)
            self.where = db.where
            self.committer = PgCommitter(db, max_delay=commit_delay)
            self._execute = db.execute
        else:
            path = db_path(state, shard)
            self.where = str(path)
            conn = open_sqlite(path, synchronous=synchronous)
            migrate_sqlite(conn, STORE, MIGRATIONS, self.where)
            self.committer = GroupCommitter(conn, max_delay=commit_delay)

            # at start only, before the committer takes the connection
            self._execute = functools.partial(run_transaction, conn)

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.committer.read(sql, params)

    def get_meta(self, name: str) -> str | None:
        rows = self.read("SELECT value FROM ratelimit_meta WHERE name = ?", (name,))
        return None if not rows else str(rows[0][0])

    def load_live(self, now_us: int) -> list[tuple[str, int, bytes]]:
        """Delete keys drained by `now_us`, then return (key, last_us, counts) of the rest,
        oldest activity first (the order idle-key cleanup relies on)."""
        self._execute([("DELETE FROM ratelimit_state WHERE expires_us <= ?", (now_us,))])
        rows = self.read("SELECT key, last_us, counts FROM ratelimit_state ORDER BY last_us")
        return [(str(key), int(last_us), bytes(counts)) for key, last_us, counts in rows]

    def close(self) -> None:
        self.committer.close()


def upsert(key: str, last_us: int, expires_us: int, counts: bytes) -> Statement:
    return (_UPSERT, (key, last_us, expires_us, counts))


def delete(key: str) -> Statement:
    return (_DELETE, (key,))


def set_meta(name: str, value: str) -> Statement:
    return (_SET_META, (name, value))
