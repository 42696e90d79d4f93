"""The PostgreSQL state backend: asyncpg connections on a thread of its own, and a group
committer with the SQLite one's `write(statements)` shape.

The stores issue their memory change and its statements in one synchronous step and read
synchronously (a cache miss, a restart's recovery), as with SQLite. So the connections live on a
dedicated event loop thread: reads block the caller the way an SQLite read does, and
commits run there while the actor's loop keeps serving. Statements are written once, in
SQLite's dialect with `?` placeholders and portable SQL (`ON CONFLICT`, quoted `"user"`);
`pg_sql` numbers the placeholders for PostgreSQL. Each store shard owns one PostgreSQL
schema (`context_0`, `ratelimit_0`, ...), its search_path, so the SQL names no schema.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from storage.migrations import Migration, SchemaTooNew, migrate_postgres
from storage.sqlite import BatchCommitter, Statement

__all__ = ["PgCommitter", "PgDatabase", "PgTarget", "StateUnavailable", "pg_sql"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: how long one connection attempt may take before the database counts as unreachable
CONNECT_TIMEOUT = 5.0
#: a statement or read that takes longer than this means the server is gone or stuck
COMMAND_TIMEOUT = 30.0
#: how long closing a connection may wait for the server's goodbye
CLOSE_TIMEOUT = 5.0


class StateUnavailable(ConnectionError):
    """The state database cannot be reached now (down, restarting, unreachable, refusing
    the credentials); what failed was not acknowledged and may be retried."""


@dataclass(frozen=True, slots=True)
class PgTarget:
    """Where the durable state lives: a `postgresql://user@host:port/db` URL, and the
    password (None: libpq's `.pgpass` or no password). The password is never shown."""

    url: str
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(f"a state URL starts with postgresql://, got {parts.scheme or 'none'}://")
        if parts.password is not None:
            # a password in the URL would be printed wherever the URL is
            raise ValueError(
                "the state URL must not hold a password: set RAYCORD_STATE_PASSWORD or use .pgpass"
            )

    @property
    def where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """`sql` with SQLite's `?` placeholders numbered `$1, $2, ...` (our SQL holds no `?`
    inside a literal)."""
    pieces = sql.split("?")
    return (
        "".join(itertools.chain.from_iterable((p, f"${i}") for i, p in enumerate(pieces[:-1], start=1)))
        + pieces[-1]
    )


#: what a dropped, refused or timed-out connection raises in asyncpg
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.TooManyConnectionsError,
)


class _Slot:
    """One connection of the pool and the lock that gives it to one task at a time."""

    __slots__ = ("conn", "lock")

    def __init__(self) -> None:
        self.conn: asyncpg.Connection | None = None
        self.lock = asyncio.Lock()


class PgDatabase:
    """Two asyncpg connections for one store shard, on its own event loop thread: one
    commits (group commit serializes commits anyway), one reads, so a read never waits for
    a commit in flight. A connection that fails is dropped and the next use reconnects.
    The shard's schema is created and migrated before the constructor returns.

    asyncpg's `Pool` is not used: two connections need none, and after a server restart
    under load its `close()` was seen waiting forever on a connection it still counted as
    in use.

    Raises (from the constructor):
        StateUnavailable: the server cannot be reached or refuses the credentials.
        SchemaTooNew: the schema was written by a newer raycord.
    """

    def __init__(
        self,
        target: PgTarget,
        schema: str,
        store: str,
        migrations: Sequence[Migration],
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        if not schema.replace("_", "").isalnum():
            raise ValueError(f"schema must be letters, digits and underscores, got {schema!r}")
        self.target = target
        self.schema = schema
        self.where = f"{target.where} schema {schema}"
        self.connect_timeout = connect_timeout
        self._commit_slot, self._read_slot = _Slot(), _Slot()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"pg-{schema}", daemon=True)
        self._thread.start()
        try:
            self._run(self._open(store, migrations))
        except BaseException:
            self.close()
            raise

    async def _open(self, store: str, migrations: Sequence[Migration]) -> None:
        async with self._commit_slot.lock:
            conn = await self._connection(self._commit_slot)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await migrate_postgres(conn, store, migrations, self.where)

    async def _connection(self, slot: _Slot) -> asyncpg.Connection:
        """The slot's open connection, connecting first when it has none (the caller holds
        the slot's lock)."""
        if slot.conn is None or slot.conn.is_closed():
            slot.conn = None
            slot.conn = await asyncpg.connect(
                self.target.url,
                password=self.target.password,
                timeout=self.connect_timeout,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={"search_path": self.schema, "application_name": f"raycord-{self.schema}"},
            )
        return slot.conn

    @staticmethod
    def _drop(slot: _Slot) -> None:
        """Forget a connection whose last use failed, so the next use reconnects."""
        if slot.conn is not None:
            slot.conn.terminate()
            slot.conn = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the connections' loop and wait for it; connection failures become
        `StateUnavailable`, with a message that names the server, never the password."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except SchemaTooNew:
            raise
        except _CONNECTION_ERRORS as exc:
            raise StateUnavailable(self.describe(exc)) from None

    def describe(self, exc: BaseException) -> str:
        detail = str(exc).replace(self.target.password, "***") if self.target.password else str(exc)
        return f"PostgreSQL state at {self.where} unavailable: {type(exc).__name__}: {detail or 'no detail'}"

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a query over committed state, as tuples (blocks the caller)."""
        return self._run(self._fetch(pg_sql(sql), params))

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        slot = self._read_slot
        async with slot.lock:
            try:
                conn = await self._connection(slot)
                return [tuple(r) for r in await conn.fetch(sql, *params)]
            except BaseException:
                # a failure can leave the protocol mid-operation ("another operation is in
                # progress" on the next use): start over on a fresh connection
                self._drop(slot)
                raise

    def execute(self, statements: Sequence[Statement]) -> None:
        """Run `statements` in order in one transaction; return once committed (blocks)."""
        self._run(self._execute(statements))

    async def _execute(self, statements: Sequence[Statement]) -> None:
        slot = self._commit_slot
        async with slot.lock:
            try:
                conn = await self._connection(slot)
                async with conn.transaction():
                    # runs of one statement go as one pipelined executemany; order is kept
                    for sql, group in itertools.groupby(statements, key=lambda s: s[0]):
                        rows = [params for _, params in group]
                        if len(rows) == 1:
                            await conn.execute(pg_sql(sql), *rows[0])
                        else:
                            await conn.executemany(pg_sql(sql), rows)
            except BaseException:
                # a failure can leave the protocol mid-operation ("another operation is in
                # progress" on the next use): start over on a fresh connection
                self._drop(slot)
                raise

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._close_connections())
        except StateUnavailable:
            log.warning("closing the connections to %s: the server was already gone", self.where)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _close_connections(self) -> None:
        for slot in (self._commit_slot, self._read_slot):
            async with slot.lock:
                if slot.conn is not None and not slot.conn.is_closed():
                    try:
                        await slot.conn.close(timeout=CLOSE_TIMEOUT)
                    except _CONNECTION_ERRORS:
                        slot.conn.terminate()
                slot.conn = None


class PgCommitter(BatchCommitter):
    """Group commit (one transaction per batch of waiting writers, the commit delay,
    urgent writers) over a `PgDatabase`. A commit is durable when the server says so
    (its own `synchronous_commit`), so nothing is left unsynced here."""

    def __init__(self, db: PgDatabase, max_delay: float = 0.0, max_batch: int = 10_000) -> None:
        super().__init__(max_delay, max_batch)
        self.db = db

    def _commit(self, statements: list[Statement]) -> None:
        # on the committer's thread, waiting for the connections' loop to commit
        self.db.execute(statements)
        self.commits += 1
        self.statements += len(statements)

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.db.read(sql, params)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        self._thread.shutdown(wait=True)
        self.db.close()
