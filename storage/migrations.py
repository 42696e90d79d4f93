"""Versioned schema migrations, one mechanism for both state backends.

Each store (context, rate limiter) has an ordered list of `Migration`s, each with its SQL
for SQLite and for PostgreSQL. A `schema_version` table in the store's SQLite file (or its
PostgreSQL schema) records how far it has been migrated; opening a store applies what is
missing, in order, and refuses a schema newer than the code knows. Adding a table is
appending one `Migration`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Migration", "SchemaTooNew", "check_order", "migrate_postgres", "migrate_sqlite"]

_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (store TEXT PRIMARY KEY, version INTEGER NOT NULL)"
)
_GET = "SELECT version FROM schema_version WHERE store = ?"
_SET = (
    "INSERT INTO schema_version (store, version) VALUES (?, ?) "
    "ON CONFLICT (store) DO UPDATE SET version = excluded.version"
)


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of a store's schema: `version` counts from 1 with no gaps."""

    version: int
    sqlite: str
    postgres: str


class SchemaTooNew(RuntimeError):
    """The stored schema was written by a newer raycord: running against it could lose data."""

    def __init__(self, store: str, found: int, known: int, where: str) -> None:
        super().__init__(
            f"the {store} state at {where} has schema version {found}, newer than this raycord "
            f"knows ({known}); upgrade raycord, or point it at another state location"
        )
        self.store, self.found, self.known = store, found, known


def check_order(migrations: Sequence[Migration]) -> int:
    """The latest version; raises ValueError unless the versions are 1, 2, ... in order."""
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise ValueError(f"migration {migration.version} is out of order (expected {expected})")
    return len(migrations)


def migrate_sqlite(conn: sqlite3.Connection, store: str, migrations: Sequence[Migration], where: str) -> int:
    """Bring `store`'s schema on `conn` (autocommit off) to the latest version, one
    transaction per migration; returns the version now stored.

    Raises:
        SchemaTooNew: the file's schema is newer than `migrations`.
    """
    latest = check_order(migrations)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_VERSION_TABLE)
        row = conn.execute(_GET, (store,)).fetchone()
        current = 0 if row is None else int(row[0])
        if current > latest:
            raise SchemaTooNew(store, current, latest, where)
        for migration in migrations[current:]:
            # executescript would commit the open transaction; run statements one by one
            for statement in _split(migration.sqlite):
                conn.execute(statement)
            conn.execute(_SET, (store, migration.version))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return latest


async def migrate_postgres(conn: Any, store: str, migrations: Sequence[Migration], where: str) -> int:
    """Bring `store`'s schema to the latest version on an asyncpg connection whose
    search_path is the store's schema; one transaction, under an advisory lock, so actors
    starting together migrate once.

    Raises:
        SchemaTooNew: the stored schema is newer than `migrations`.
    """
    latest = check_order(migrations)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", where)
        await conn.execute(_VERSION_TABLE)
        current = await conn.fetchval(_GET.replace("?", "$1"), store)
        current = 0 if current is None else int(current)
        if current > latest:
            raise SchemaTooNew(store, current, latest, where)
        for migration in migrations[current:]:
            await conn.execute(migration.postgres)
            await conn.execute(_SET.replace("?", "$1", 1).replace("?", "$2", 1), store, migration.version)
    return latest


def _split(script: str) -> list[str]:
    """The statements of a migration script (our scripts hold no ';' inside literals)."""
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
