"""The SQLite group committer: durable before return, many writers per transaction."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from storage.sqlite import CHECKPOINT_SYNCS, INLINE_STATEMENTS, LOG_START_SYNCS, GroupCommitter, open_sqlite

SCHEMA = "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v INTEGER NOT NULL);"


@pytest.mark.asyncio
async def test_concurrent_writers_share_commits_and_every_write_is_visible_to_a_new_connection(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite"
    committer = GroupCommitter(open_sqlite(path, SCHEMA))
    await asyncio.gather(
        *(committer.write([("INSERT INTO kv VALUES (?, ?)", (f"k{i}", i))]) for i in range(200))
    )
    assert committer.statements == 200
    assert committer.commits < 200
    other = sqlite3.connect(path)
    assert other.execute("SELECT count(*), sum(v) FROM kv").fetchone() == (200, sum(range(200)))
    other.close()
    committer.close()


@pytest.mark.asyncio
async def test_a_failed_batch_raises_in_each_writer_and_later_writes_still_commit(tmp_path: Path) -> None:
    committer = GroupCommitter(open_sqlite(tmp_path / "s.sqlite", SCHEMA))
    await committer.write([("INSERT INTO kv VALUES ('a', 1)", ())])
    with pytest.raises(sqlite3.IntegrityError):
        await committer.write([("INSERT INTO kv VALUES ('a', 2)", ())])
    await committer.write([("INSERT INTO kv VALUES ('b', 2)", ())])
    assert committer.read("SELECT k, v FROM kv ORDER BY k") == [("a", 1), ("b", 2)]
    committer.close()


@pytest.mark.asyncio
async def test_a_delayed_commit_gathers_writers_and_an_urgent_writer_cuts_the_wait_short(
    tmp_path: Path,
) -> None:
    committer = GroupCommitter(open_sqlite(tmp_path / "s.sqlite", SCHEMA), max_delay=60.0)
    background = [
        asyncio.create_task(committer.write([("INSERT INTO kv VALUES (?, ?)", (f"k{i}", i))]))
        for i in range(5)
    ]
    await asyncio.sleep(0.2)
    # the commit is waiting out its delay: nothing acknowledged, nothing on disk
    assert not any(task.done() for task in background)
    assert committer.commits == 0
    # a writer a user waits on commits now, and takes every waiting writer with it
    await asyncio.wait_for(committer.write([("INSERT INTO kv VALUES ('reset', 99)", ())], urgent=True), 30)
    await asyncio.wait_for(asyncio.gather(*background), 30)
    assert committer.commits == 1
    assert committer.read("SELECT count(*) FROM kv") == [(6,)]
    # the next batch waits again
    late = asyncio.create_task(committer.write([("INSERT INTO kv VALUES ('late', 1)", ())]))
    await asyncio.sleep(0.2)
    assert not late.done()
    committer.close()
    late.cancel()


@pytest.mark.asyncio
async def test_normal_mode_makes_at_most_one_sync_per_durability_interval_under_a_burst_and_none_idle(
    tmp_path: Path,
) -> None:
    interval = 0.2
    committer = GroupCommitter(open_sqlite(tmp_path / "s.sqlite", SCHEMA), durability_interval=interval)
    start = time.monotonic()
    for i in range(300):
        await committer.write([("INSERT INTO kv VALUES (?, ?)", (f"k{i}", i))])
    await committer.synced()
    assert committer.unsynced == 0
    elapsed = time.monotonic() - start
    assert committer.commits == 300
    # every commit was acknowledged, and the syncs covering them came once per interval at most
    assert 1 <= committer.syncs <= elapsed / interval + 1
    idle = committer.syncs
    await asyncio.sleep(5 * interval)
    assert committer.syncs == idle
    committer.close()


@pytest.mark.asyncio
async def test_full_mode_syncs_every_commit(tmp_path: Path) -> None:
    committer = GroupCommitter(open_sqlite(tmp_path / "s.sqlite", SCHEMA, "FULL"), durability_interval=3600)
    for i in range(20):
        await committer.write([("INSERT INTO kv VALUES (?, ?)", (f"k{i}", i))])
    assert (committer.commits, committer.syncs, committer.unsynced) == (20, 20, 0)
    committer.close()


@pytest.mark.asyncio
async def test_a_grown_wal_is_checkpointed_at_a_durability_point_and_its_syncs_are_counted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sqlite"
    committer = GroupCommitter(open_sqlite(path, SCHEMA), durability_interval=3600, checkpoint_pages=5)
    for i in range(20):
        await committer.write([("INSERT INTO kv VALUES (?, ?)", (f"k{i}", i))])
    # SQLite's own automatic checkpoint is off: nothing has synced or copied the WAL yet
    assert (committer.syncs, committer.checkpoints) == (0, 0)
    assert await asyncio.to_thread(os.path.getsize, f"{path}-wal") > 0
    committer.durability_point()
    assert (committer.syncs, committer.checkpoints, committer.unsynced) == (CHECKPOINT_SYNCS, 1, 0)
    assert await asyncio.to_thread(os.path.getsize, f"{path}-wal") == 0
    # the next commit starts a new log, whose header SQLite syncs; the next point syncs the WAL
    await committer.write([("INSERT INTO kv VALUES ('after', 1)", ())])
    assert committer.syncs == CHECKPOINT_SYNCS + LOG_START_SYNCS
    committer.durability_point()
    assert committer.syncs == CHECKPOINT_SYNCS + LOG_START_SYNCS + 1
    other = sqlite3.connect(path)
    assert other.execute("SELECT count(*) FROM kv").fetchone() == (21,)
    other.close()
    committer.close()


def test_an_unknown_sync_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        open_sqlite(tmp_path / "s.sqlite", SCHEMA, "OFF")  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["NORMAL", "FULL"])
async def test_a_small_normal_commit_runs_on_the_loop_and_a_syncing_or_big_one_on_the_thread(
    tmp_path: Path, mode: str
) -> None:
    conn = open_sqlite(tmp_path / "s.sqlite", SCHEMA, mode)
    committer = GroupCommitter(conn, durability_interval=3600)
    threads: list[int] = []
    # the thread each INSERT runs on (the first commit of a new log is left off the loop too)
    conn.set_trace_callback(lambda sql: threads.append(threading.get_ident()) if "INSERT" in sql else None)
    await committer.write([("INSERT INTO kv VALUES ('first', 0)", ())])
    threads.clear()
    await committer.write([("INSERT INTO kv VALUES ('small', 1)", ())])
    small = set(threads)
    threads.clear()
    big = [("INSERT INTO kv VALUES (?, ?)", (f"k{i}", i)) for i in range(INLINE_STATEMENTS + 1)]
    await committer.write(big)
    loop_thread = threading.get_ident()
    assert (small == {loop_thread}) == (mode == "NORMAL")
    assert loop_thread not in threads
    assert committer.read("SELECT count(*) FROM kv") == [(INLINE_STATEMENTS + 3,)]
    committer.close()
