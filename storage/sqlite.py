"""The crash-safe operational state store: SQLite in WAL mode with group commit.

Many concurrent writers hand their statements to one `GroupCommitter`; it runs all
that is waiting in one transaction (one fsync) on a dedicated thread, then wakes every
writer. A writer's `await` returns only after its statements are durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Statement = tuple[str, Sequence[Any]]


def open_sqlite(path: Path, schema: str = "", synchronous: str = "FULL") -> sqlite3.Connection:
    """A connection in WAL mode, autocommit off, with `schema` applied.

    Raises:
        OSError: the directory cannot be created.
        sqlite3.OperationalError: the file cannot be opened or written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=5000")
    if schema:
        conn.executescript(schema)
    return conn


@dataclass(slots=True)
class _Batch:
    statements: list[Statement] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    #: a writer someone is waiting on joined: commit without waiting out `max_delay`
    urgent: bool = False


class GroupCommitter:
    """One SQLite connection, one writer thread, one transaction per batch of writers.

    `max_delay` lets a commit wait briefly for more writers to join it; 0 commits as
    soon as the previous commit is done (writers that arrive meanwhile share the next).
    An urgent writer (one a user is waiting on) cuts that wait short for its batch.
    """

    def __init__(self, conn: sqlite3.Connection, max_delay: float = 0.0, max_batch: int = 10_000) -> None:
        self.conn = conn
        self.max_delay = max_delay
        self.max_batch = max_batch
        self._pending = _Batch()
        self._wake: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-commit")
        self._lock = threading.Lock()
        self.commits = 0
        self.statements = 0

    async def write(self, statements: Iterable[Statement], urgent: bool = False) -> None:
        """Run `statements` in the next group commit; return once it is durable. An
        `urgent` write does not wait out `max_delay`."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.statements.extend(statements)
        self._pending.waiters.append(done)
        if self._wake is None:
            self._wake, self._hurry = asyncio.Event(), asyncio.Event()
        if urgent:
            self._pending.urgent = True
            assert self._hurry is not None
            self._hurry.set()
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        self._wake.set()
        await done

    async def _run(self) -> None:
        assert self._wake is not None and self._hurry is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending = self._pending
            if self.max_delay > 0 and len(pending.waiters) < self.max_batch and not pending.urgent:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), self.max_delay)
            self._hurry.clear()
            batch, self._pending = self._pending, _Batch()
            if not batch.waiters:
                continue
            try:
                await asyncio.get_running_loop().run_in_executor(self._thread, self._commit, batch.statements)
            except Exception as exc:
                for w in batch.waiters:
                    if not w.done():
                        w.set_exception(exc)
                continue
            for w in batch.waiters:
                if not w.done():
                    w.set_result(None)

    def _commit(self, statements: list[Statement]) -> None:
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    conn.execute(sql, params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self.commits += 1
            self.statements += len(statements)

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A synchronous read on the same connection (sees every committed write)."""
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        self._thread.shutdown(wait=True)
        with self._lock:
            self.conn.close()
