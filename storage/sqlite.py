"""The crash-safe operational state store: SQLite in WAL mode with group commit, and the
one sync policy both stores use.

Many concurrent writers hand their statements to one `GroupCommitter`; it runs all
that is waiting in one transaction on a dedicated thread, then wakes every writer.
A writer's `await` returns once its transaction is committed; when that transaction
reaches the disk is the store's `synchronous` policy (see `SYNC_MODES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Statement = tuple[str, Sequence[Any]]
log = logging.getLogger(__name__)
SyncMode = Literal["FULL", "NORMAL"]

#: NORMAL (the default): a commit is written to the WAL, i.e. into the OS's page cache,
#: before its writers are answered, so the death of the process (SIGKILL included) loses
#: nothing acknowledged; the WAL is fsynced at one durability point per
#: `DURABILITY_INTERVAL` in which something was committed, so a power loss loses at most
#: that last interval. A store so makes one sync per interval at any load, none while
#: idle, plus a checkpoint's few each time `CHECKPOINT_PAGES` of WAL have been written.
#: FULL: SQLite fsyncs the WAL in every commit before it is acknowledged (nothing is lost
#: even to a power loss), one sync per group commit.
SYNC_MODES: tuple[SyncMode, ...] = ("FULL", "NORMAL")
#: seconds between two durability points of a NORMAL store (the most a power loss loses)
DURABILITY_INTERVAL = 1.0
#: WAL pages past which a durability point checkpoints the WAL into the database file
#: (with 4 KiB pages, a WAL of some 40 MB: a restart replays at most that much). SQLite's
#: automatic checkpoint is off on our connections: at its default of 1,000 pages it
#: would run inside whichever commit crossed it, ten times as often, each time adding its
#: syncs to one durability point's. Larger means rarer checkpoint syncs, a longer replay.
CHECKPOINT_PAGES = 10_000
#: a NORMAL-mode batch of up to this many statements commits on the event loop
INLINE_STATEMENTS = 256
#: what one checkpoint costs in syncs, as SQLite's wal.c makes them: the WAL before pages
#: are copied and the database file after. The next write then starts a new log, whose
#: header SQLite syncs on its own: counted with that write (`LOG_START_SYNCS`).
CHECKPOINT_SYNCS = 2
#: the sync of a new log's header, made by the first commit into an empty WAL
LOG_START_SYNCS = 1


def open_sqlite(
    path: Path, schema: str = "", synchronous: SyncMode = "NORMAL", secure_delete: bool = False
) -> sqlite3.Connection:
    """A connection in WAL mode, autocommit off, automatic checkpoints off, with `schema`
    applied. With `secure_delete`, SQLite overwrites what a DELETE removes (cells and
    freed pages) with zeros instead of leaving it in the file until the page is reused
    (SQLite's upstream default is off): a store that promises erasure needs it.

    Raises:
        ValueError: `synchronous` is not one of `SYNC_MODES`.
        OSError: the directory cannot be created.
        sqlite3.OperationalError: the file cannot be opened or written.
    """
    if synchronous not in SYNC_MODES:
        raise ValueError(f"synchronous must be one of {SYNC_MODES}, got {synchronous!r}")
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("PRAGMA busy_timeout=5000")
    if secure_delete:
        conn.execute("PRAGMA secure_delete=ON")
    if schema:
        conn.executescript(schema)
    return conn


def run_transaction(conn: sqlite3.Connection, statements: Iterable[Statement]) -> None:
    """Run `statements` in one write transaction on `conn`: all of them, or none."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, params in statements:
            conn.execute(sql, params)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _main_file(conn: sqlite3.Connection) -> str:
    """The database file of `conn`'s main schema; "" for an in-memory database."""
    for _, name, file in conn.execute("PRAGMA database_list").fetchall():
        if name == "main":
            return str(file or "")
    return ""


@dataclass(slots=True)
class _Batch:
    statements: list[Statement] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    #: a writer someone is waiting on joined: commit without waiting out `max_delay`
    urgent: bool = False


class BatchCommitter:
    """Group commit, whatever the database: many writers hand in statements, one thread
    runs all that is waiting in one transaction, then wakes every writer.

    `max_delay` lets a commit wait briefly for more writers to join it; 0 commits as
    soon as the previous commit is done (writers that arrive meanwhile share the next).
    An urgent writer (one a user is waiting on) cuts that wait short for its batch.
    A subclass runs a batch (`_commit`, on the committer's thread) and reads (`read`).
    """

    def __init__(self, max_delay: float = 0.0, max_batch: int = 10_000) -> None:
        self.max_delay = max_delay
        self.max_batch = max_batch
        self._pending = _Batch()
        self._wake: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="group-commit")
        self._lock = threading.Lock()
        self.commits = 0
        self.statements = 0
        #: syncs of the store's files made by this committer (a database server's own
        #: are its business, not counted here)
        self.syncs = 0

    async def write(self, statements: Iterable[Statement], urgent: bool = False) -> None:
        """Run `statements` in the next group commit; return once it is committed. An
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
        self._writing(loop)
        self._wake.set()
        await done

    def _writing(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on each write, on the loop: a subclass starts its own periodic work."""

    def _committed_batch(self) -> None:
        """Called on the loop after each successful commit."""

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
                if not self._commit_inline(batch.statements):
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(self._thread, self._commit, batch.statements)
            except Exception as exc:
                for w in batch.waiters:
                    if not w.done():
                        w.set_exception(exc)
                continue
            self._committed_batch()
            for w in batch.waiters:
                if not w.done():
                    w.set_result(None)

    def _commit(self, statements: list[Statement]) -> None:
        """Run `statements` in one transaction (on the committer's thread)."""
        raise NotImplementedError

    def _commit_inline(self, statements: list[Statement]) -> bool:
        """Commit `statements` on the event loop when that is cheaper than two thread
        hand-offs; True when done (by default never: the committer's thread commits)."""
        return False

    @property
    def unsynced(self) -> int:
        """Commits acknowledged and not yet on disk: none unless a subclass defers syncs."""
        return 0

    async def synced(self) -> None:
        """Return once every commit answered so far is on disk."""

    async def truncate_log(self) -> bool:
        """Leave no copy of deleted data in the store's log: True once that is so. A
        database server keeps its own log (nothing for a committer to do)."""
        return True

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class GroupCommitter(BatchCommitter):
    """Group commit over one SQLite connection, with the store's durability points.

    `syncs` counts every sync of the store's files, where it is made: a FULL commit's,
    a durability point's `os.fsync`, a checkpoint's.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        max_delay: float = 0.0,
        max_batch: int = 10_000,
        durability_interval: float = DURABILITY_INTERVAL,
        checkpoint_pages: int = CHECKPOINT_PAGES,
    ) -> None:
        super().__init__(max_delay, max_batch)
        self.conn = conn
        self.durability_interval = durability_interval
        self.checkpoint_pages = checkpoint_pages
        mode = int(conn.execute("PRAGMA synchronous").fetchone()[0])
        #: SQLite's codes: 1 NORMAL, 2 FULL, 3 EXTRA
        self.synchronous: SyncMode = "FULL" if mode >= 2 else "NORMAL"
        db_file = _main_file(conn)
        self._wal_file = f"{db_file}-wal" if db_file else ""
        self._durability: asyncio.Task[None] | None = None
        self.checkpoints = 0
        #: commits not yet covered by a durability point (NORMAL only)
        self._unsynced = 0
        self._last_point = time.monotonic()
        #: the next commit starts a new log (an empty or absent WAL) and syncs its header
        self._log_start = bool(self._wal_file) and self._wal_frames() == 0
        #: an erasure's checkpoint was held back by a reader: the next point retries it
        self._truncate_due = False
        self._committed: asyncio.Event | None = None
        self._synced: asyncio.Event | None = None

    def _writing(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._committed is None:
            self._committed = asyncio.Event()
        if self._wal_file and (self._durability is None or self._durability.done()):
            self._durability = loop.create_task(self._durability_points())

    def _committed_batch(self) -> None:
        if self._committed is not None:
            self._committed.set()

    def _commit_inline(self, statements: list[Statement]) -> bool:
        # With NORMAL a commit writes the WAL and syncs nothing, so a small batch costs less
        # than the hand-off to the committer's thread and back; a FULL commit's fsync, the
        # header sync of a new log, a big batch, or a batch meeting a durability point's
        # sync (which holds the lock) stays off the loop.
        if self.synchronous == "FULL" or self._log_start or len(statements) > INLINE_STATEMENTS:
            return False
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._commit_locked(statements)
        finally:
            self._lock.release()
        return True

    def _commit(self, statements: list[Statement]) -> None:
        with self._lock:
            self._commit_locked(statements)

    def _commit_locked(self, statements: list[Statement]) -> None:
        run_transaction(self.conn, statements)
        self.commits += 1
        self.statements += len(statements)
        if not self._wal_file:
            return
        if self._log_start:
            self.syncs += LOG_START_SYNCS
            self._log_start = False
        if self.synchronous == "FULL":
            # SQLite fsyncs the WAL inside this COMMIT
            self.syncs += 1
        else:
            self._unsynced += 1

    async def _durability_points(self) -> None:
        """One durability point per interval in which something was committed; none idle."""
        assert self._committed is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._committed.wait()
            self._committed.clear()
            wait = self._last_point + self.durability_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await loop.run_in_executor(self._thread, self.durability_point)
            except (OSError, sqlite3.Error):
                # the commits stay unsynced and the next interval tries again
                log.exception("durability point of %s failed", self._wal_file)
                self._committed.set()
                continue
            if self._synced is not None:
                self._synced.set()

    def durability_point(self) -> None:
        """Make every commit so far durable: one fsync of the WAL, or a checkpoint once the
        WAL has grown past `checkpoint_pages`. A no-op when nothing is pending."""
        with self._lock:
            self._last_point = time.monotonic()
            full = self.synchronous == "FULL"
            idle = (full and self.commits == 0) or (not full and not self._unsynced)
            if not self._wal_file or (idle and not self._truncate_due):
                return
            frames = self._wal_frames()
            if frames >= self.checkpoint_pages or self._truncate_due:
                self._truncate_due = not self._checkpoint()
            elif not full:
                self._fsync_wal()
            self._unsynced = 0

    def _wal_frames(self) -> int:
        try:
            size = os.path.getsize(self._wal_file)
        except FileNotFoundError:
            return 0
        page = int(self.conn.execute("PRAGMA page_size").fetchone()[0])
        # a 32-byte header, then one 24-byte header and one page per frame
        return max(0, (size - 32) // (page + 24))

    def _checkpoint(self) -> bool:
        """Copy the WAL into the database file and empty it; True when it was emptied."""
        # TRUNCATE empties the WAL file once copied, so its size keeps counting the frames
        # written since (a restarted log would otherwise reuse the grown file); it also
        # leaves no frame of an older page version (deleted rows' text) behind in the log
        busy, log, moved = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy and log >= 0 and moved == log:
            self.checkpoints += 1
            self.syncs += CHECKPOINT_SYNCS
            self._log_start = True
            return True
        # a reader held the log back: SQLite made its syncs if it copied anything, and the
        # commits since the last point are made durable here regardless
        self.syncs += CHECKPOINT_SYNCS if moved > 0 else 0
        self._fsync_wal()
        return False

    async def truncate_log(self) -> bool:
        """Checkpoint now and empty the WAL, so a deletion committed before this call leaves
        no older copy of its pages in the log (with `secure_delete`, none in the database
        file either). False when a reader held the log back past the busy timeout: the
        next durability point checkpoints again until one succeeds."""
        if not self._wal_file:
            return True
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._truncate_now)

    def _truncate_now(self) -> bool:
        with self._lock:
            self._last_point = time.monotonic()
            emptied = self._checkpoint()
            self._unsynced = 0
            self._truncate_due = not emptied
            return emptied

    def _fsync_wal(self) -> None:
        fd = os.open(self._wal_file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.syncs += 1

    @property
    def unsynced(self) -> int:
        """Commits acknowledged and not yet covered by a durability point."""
        return self._unsynced

    async def synced(self) -> None:
        """Return once every commit answered so far is on disk (at once in FULL mode)."""
        while self._unsynced:
            if self._synced is None:
                self._synced = asyncio.Event()
            self._synced.clear()
            await self._synced.wait()

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A synchronous read on the same connection (sees every committed write)."""
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        """Stop, make what is committed durable, close the connection."""
        for task in (self._runner, self._durability):
            if task is not None:
                task.cancel()
        self._thread.shutdown(wait=True)
        self.durability_point()
        with self._lock:
            self.conn.close()
