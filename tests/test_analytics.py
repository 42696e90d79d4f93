"""AnalyticsSink and AnalyticsClient: group commit into DuckDB, no event lost, read-only SQL.

The plain sink runs in-process; the client tests go through real sink actors in the
session Ray, each with its own namespace and state directory.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import random
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import ray

from actors.analytics import (
    AnalyticsBusy,
    AnalyticsClient,
    AnalyticsConfig,
    AnalyticsSink,
    event_row,
    rows_to_table,
    table_to_ipc,
)
from actors.schemas import AnalyticsEvent
from bot.analytics_cli import analytics_client
from bot.cli import main
from bot.config import Settings
from storage.analytics_db import QueryRejected
from tests.conftest import FakeClock, make_settings

REFUSED = {
    "INSERT": "INSERT INTO events (event_id, time, type) VALUES (uuid(), now(), 'x')",
    "UPDATE": "UPDATE events SET weight = 2",
    "DELETE": "DELETE FROM events",
    "DROP": "DROP TABLE events",
    "ATTACH": "ATTACH '/tmp/other.duckdb' AS other",
    "COPY": "COPY events TO '/tmp/events.csv'",
    "PRAGMA": "PRAGMA database_list",
    "EXPLAIN ANALYZE": "EXPLAIN ANALYZE DELETE FROM events",
    "multi-statement": "SELECT 1; DROP TABLE events",
}


def rows_for(n: int, **fields: Any) -> list[tuple[Any, ...]]:
    return [event_row(AnalyticsEvent(type="message", user_id=f"u{i}", **fields)) for i in range(n)]


async def until(condition: Callable[[], Any], what: str, attempts: int = 300) -> None:
    """Poll until `condition()` (sync or async) is truthy, a bounded number of times."""
    for _ in range(attempts):
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# --- the plain sink -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_event_round_trips_into_duckdb_with_every_field(tmp_path: Path) -> None:
    sink = AnalyticsSink(state_dir=tmp_path)
    event = AnalyticsEvent(
        time=datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC),
        type="message",
        server_id="s1",
        channel_id="c1",
        user_id="u1",
        latency_ms=12.5,
        tokens_in=7,
        tokens_out=9,
        cache_hit=True,
        error="UpstreamUnavailable",
        weight=2.0,
        payload={"model": "m", "n": [1, 2]},
    )
    await asyncio.gather(sink.append_batch([event_row(event)]), sink.flush())
    result = await sink.query("SELECT * FROM events")
    stored = dict(zip(result.columns, result.rows[0], strict=True))
    assert stored["event_id"] == event.event_id
    assert stored["time"] == event.time
    assert json.loads(stored.pop("payload")) == event.payload
    assert {k: v for k, v in stored.items() if k not in ("event_id", "time")} == event.model_dump(
        exclude={"event_id", "time", "payload"}
    )
    await sink.close()


@pytest.mark.asyncio
async def test_many_appends_are_committed_in_few_transactions(tmp_path: Path) -> None:
    sink = AnalyticsSink(AnalyticsConfig(flush_events=1_000), state_dir=tmp_path)
    batches = [rows_for(100) for _ in range(40)]
    await asyncio.gather(*(sink.append_batch(b) for b in batches), sink.flush())
    stats = await sink.stats()
    assert stats.committed == 4_000
    assert stats.transactions <= 5
    await sink.close()


@pytest.mark.asyncio
async def test_the_clients_arrow_ipc_batches_are_stored_and_a_malformed_batch_fails_alone(
    tmp_path: Path,
) -> None:
    sink = AnalyticsSink(state_dir=tmp_path)
    ipc_rows, table_rows = rows_for(20, server_id="s1"), rows_for(5, server_id="s2")
    other_schema = rows_to_table(rows_for(1)).drop_columns(["payload"])
    with pytest.raises(ValueError, match="not an Arrow IPC stream"):
        await sink.append_batch(b"not arrow")
    with pytest.raises(ValueError, match=r"lacks columns \['payload'\]"):
        await sink.append_batch(table_to_ipc(other_schema))
    await asyncio.gather(
        sink.append_batch(table_to_ipc(rows_to_table(ipc_rows))),
        sink.append_batch(rows_to_table(table_rows)),
        sink.flush(),
    )
    result = await sink.query("SELECT server_id, count(*) FROM events GROUP BY ALL ORDER BY 1")
    assert result.rows == [("s1", 20), ("s2", 5)]
    stats = await sink.stats()
    assert (stats.received, stats.committed) == (25, 25)
    await sink.close()


@pytest.mark.asyncio
async def test_a_resent_batch_is_counted_once(tmp_path: Path) -> None:
    sink = AnalyticsSink(state_dir=tmp_path)
    rows = rows_for(10)
    await asyncio.gather(sink.append_batch(rows), sink.flush())
    await asyncio.gather(sink.append_batch(rows), sink.flush())
    result = await sink.query("SELECT count(*), count(DISTINCT user_id) FROM events")
    assert result.rows == [(10, 10)]
    assert (await sink.stats()).duplicates == 10
    await sink.close()


@pytest.mark.asyncio
async def test_a_flush_mixing_resent_and_new_events_stores_each_new_event_once(tmp_path: Path) -> None:
    # the plain INSERT hits the key, the flush is redone skipping known ids, nothing half-stored
    sink = AnalyticsSink(state_dir=tmp_path)
    first, fresh = rows_for(10), rows_for(5)
    await asyncio.gather(sink.append_batch(first), sink.flush())
    await asyncio.gather(sink.append_batch(first[:3] + fresh), sink.append_batch(first[3:]), sink.flush())
    result = await sink.query("SELECT count(*), count(DISTINCT event_id) FROM events")
    assert result.rows == [(15, 15)]
    stats = await sink.stats()
    assert (stats.committed, stats.duplicates) == (15, 10)
    assert sink.db is not None and sink.db.dedup_retries == 1
    await sink.close()


def test_event_ids_are_distinct_version_4_uuids() -> None:
    ids = [AnalyticsEvent(type="message").event_id for _ in range(50_000)]
    assert len(set(ids)) == len(ids)
    for event_id in ids[:100]:
        assert (event_id.version, event_id.variant) == (4, uuid.RFC_4122)
        assert uuid.UUID(str(event_id)) == event_id
        assert hash(uuid.UUID(event_id.hex)) == hash(event_id)


@pytest.mark.asyncio
async def test_aggregate_counts_add_up_and_a_resent_aggregate_batch_adds_once(tmp_path: Path) -> None:
    sink = AnalyticsSink(state_dir=tmp_path)
    minute = 1_700_000_040
    await asyncio.gather(sink.append_batch([], [("messages", "s1", minute, 5)], "b1"), sink.flush())
    await asyncio.gather(sink.append_batch([], [("messages", "s1", minute, 5)], "b1"), sink.flush())
    await asyncio.gather(sink.append_batch([], [("messages", "s1", minute, 3)], "b2"), sink.flush())
    result = await sink.query("SELECT name, server_id, epoch(minute)::BIGINT, count FROM aggregates")
    assert result.rows == [("messages", "s1", minute, 8)]
    with pytest.raises(ValueError, match="batch_id"):
        await sink.append_batch([], [("messages", "s1", minute, 1)])
    await sink.close()


@pytest.mark.asyncio
async def test_appends_wait_while_the_sink_is_full_then_fail_busy(tmp_path: Path, clock: FakeClock) -> None:
    # the injected clock stands still, so only the explicit flushes below commit
    config = AnalyticsConfig(flush_events=1_000, max_pending_events=10, append_wait_seconds=60)
    sink = AnalyticsSink(config, state_dir=tmp_path / "waits", clock=clock)
    first = asyncio.create_task(sink.append_batch(rows_for(10)))
    await until(lambda: _pending(sink, 10), "the first batch to be pending")
    # over the bound: the next append waits, and proceeds once a flush makes room
    waiting = asyncio.create_task(sink.append_batch(rows_for(5)))
    await asyncio.sleep(0)
    assert not waiting.done()
    await sink.flush()
    assert await first == 10 and await waiting == 5
    assert (await sink.stats()).committed == 15
    await sink.close()
    # nobody flushes: the wait is bounded and ends in a typed error
    busy = AnalyticsSink(
        config.model_copy(update={"append_wait_seconds": 0.1}), state_dir=tmp_path / "busy", clock=clock
    )
    held = asyncio.create_task(busy.append_batch(rows_for(10)))
    await until(lambda: _pending(busy, 10), "the bound to be reached")
    with pytest.raises(AnalyticsBusy):
        await busy.append_batch(rows_for(1))
    assert (await busy.stats()).busy_rejections == 1
    await busy.flush()
    await held
    await busy.close()


async def _pending(sink: AnalyticsSink, n: int) -> bool:
    return (await sink.stats()).pending == n


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", sorted(REFUSED))
async def test_sql_refuses_anything_but_one_select(tmp_path: Path, kind: str) -> None:
    sink = AnalyticsSink(state_dir=tmp_path)
    with pytest.raises(QueryRejected):
        await sink.query(REFUSED[kind])
    assert (await sink.query("SELECT count(*) AS n FROM events")).rows == [(0,)]
    await sink.close()


@pytest.mark.asyncio
async def test_sql_is_bounded_in_rows_and_time_and_cannot_read_files(tmp_path: Path) -> None:
    sink = AnalyticsSink(state_dir=tmp_path)
    result = await sink.query("SELECT * FROM range(50)", max_rows=10)
    assert len(result.rows) == 10 and result.truncated
    with pytest.raises(QueryRejected, match="longer than"):
        await sink.query("SELECT sum(a.range * b.range) FROM range(100000) a, range(100000) b", timeout=0.2)
    with pytest.raises(QueryRejected, match="disabled"):
        await sink.query("SELECT * FROM read_csv('/etc/hostname')")
    await sink.close()


# --- the client and the sink actor ----------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def shared_settings(
    ray_session: None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Settings]:
    """One sink actor for the client tests that need no state of their own."""
    settings = make_settings(tmp_path_factory.mktemp("analytics"))
    client = analytics_client(settings)
    await client.stats()
    yield settings
    ray.kill(client.handles[0], no_restart=True)


@pytest.mark.asyncio
async def test_sampled_events_store_weight_one_over_rate(shared_settings: Settings) -> None:
    tag = uuid.uuid4().hex
    config = AnalyticsConfig(sample_rates={"reply": 0.25})
    client = AnalyticsClient(
        analytics_client(shared_settings).handles, config, shared_settings.state_dir, rng=random.Random(7)
    )
    for _ in range(2_000):
        client.record(AnalyticsEvent(type="reply", server_id=tag))
    for _ in range(100):
        client.record(AnalyticsEvent(type="message", server_id=tag))
    await client.close()
    draws = random.Random(7)
    kept = sum(draws.random() < 0.25 for _ in range(2_000))
    result = await client.query(
        f"SELECT type, count(*), min(weight), max(weight), sum(weight) FROM events "
        f"WHERE server_id = '{tag}' GROUP BY type ORDER BY type"
    )
    assert result.rows == [("message", 100, 1.0, 1.0, 100.0), ("reply", kept, 4.0, 4.0, 4.0 * kept)]
    assert client.stats_local().sampled_out == 2_000 - kept


@pytest.mark.asyncio
async def test_a_backlog_goes_out_in_bigger_calls_and_each_event_is_stored_once(
    shared_settings: Settings,
) -> None:
    tag = uuid.uuid4().hex
    config = AnalyticsConfig(client_batch_events=10, client_max_batch_events=40)
    client = AnalyticsClient(analytics_client(shared_settings).handles, config, shared_settings.state_dir)
    # 100 events recorded before the sender runs: a backlog of ten batches' worth
    for i in range(100):
        client.record(AnalyticsEvent(type="message", server_id=tag, user_id=f"u{i}"))
    await client.flush()
    # then one batch's worth, sent on its own as soon as it is there
    for i in range(10):
        client.record(AnalyticsEvent(type="message", server_id=tag, user_id=f"late{i}"))
    await client.close()
    local = client.stats_local()
    assert (local.sent, local.committed, local.batches_sent) == (110, 110, 4)  # 40 + 40 + 20, 10
    result = await client.query(
        f"SELECT count(*), count(DISTINCT user_id) FROM events WHERE server_id = '{tag}'"
    )
    assert result.rows == [(110, 110)]


@pytest.mark.asyncio
async def test_counters_are_stored_as_one_row_per_server_and_minute(
    shared_settings: Settings, clock: FakeClock
) -> None:
    tag = uuid.uuid4().hex
    client = AnalyticsClient(analytics_client(shared_settings).handles, clock=clock)
    clock.now = 1_700_000_040.0
    for i in range(500):
        client.count("messages", server_id=tag)
        if i == 250:
            await client.flush()
    clock.advance(60)
    client.count("messages", server_id=tag, n=300)
    await client.close()
    result = await client.query(
        f"SELECT epoch(minute)::BIGINT, count FROM aggregates WHERE server_id = '{tag}' ORDER BY 1"
    )
    assert result.rows == [(1_700_000_040, 500), (1_700_000_100, 300)]
    events = await client.query(f"SELECT count(*) FROM events WHERE server_id = '{tag}'")
    assert events.rows == [(0,)]


async def _record_for_reports(settings: Settings, user: str) -> None:
    client = analytics_client(settings)
    for _ in range(3):
        client.record(AnalyticsEvent(type="message", user_id=user, weight=1000.0, tokens_in=3, tokens_out=5))
    client.record(AnalyticsEvent(type="rate_limited", user_id=user))
    await client.close()


def test_analytics_command_answers_select_in_every_format_and_refuses_writes(
    shared_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RAYCORD_NAMESPACE", shared_settings.namespace)
    base = ["analytics", "--state-dir", str(shared_settings.state_dir)]
    assert main([*base, "SELECT 1 AS one, 'x' AS two"]) == 0
    assert capsys.readouterr().out.splitlines()[:3] == ["one  two", "---  ---", "1    x"]
    assert main([*base, "--format", "csv", "SELECT 1 AS one, 'x' AS two"]) == 0
    assert capsys.readouterr().out == "one,two\n1,x\n"
    assert main([*base, "--format", "json", "SELECT 1 AS one, 'x' AS two"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"one": 1, "two": "x"}]
    for report in ("daily", "top-users"):
        assert main([*base, "--report", report]) == 0
        assert capsys.readouterr().out.splitlines()[1].startswith("---")  # a table under its header

    def report(name: str) -> list[dict[str, Any]]:
        assert main([*base, "--report", name, "--format", "json"]) == 0
        rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
        return rows

    days_before = report("daily")
    user = f"reporter-{uuid.uuid4().hex}"
    asyncio.run(_record_for_reports(shared_settings, user))
    days = report("daily")

    def total(rows: list[dict[str, Any]], column: str) -> float:
        return sum(row[column] or 0 for row in rows)

    # 3 messages weighing 1,000 each (sampled at 1/1000), 3 + 5 tokens each; a rate-limited one
    assert total(days, "messages") - total(days_before, "messages") == 3_000
    assert total(days, "tokens_in") - total(days_before, "tokens_in") == 9_000
    assert total(days, "tokens_out") - total(days_before, "tokens_out") == 15_000
    (mine,) = [row for row in report("top-users") if row["user_id"] == user]
    assert (mine["messages"], mine["tokens"], mine["rate_limited"]) == (3_000, 24_000, 1)
    assert main([*base, "DROP TABLE events"]) == 2
    assert "only SELECT" in capsys.readouterr().err


def test_analytics_command_exports_parquet(
    shared_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    import pyarrow.parquet as pq

    monkeypatch.setenv("RAYCORD_NAMESPACE", shared_settings.namespace)
    out = tmp_path / "export"
    assert main(["analytics", "--state-dir", str(shared_settings.state_dir), "--export", str(out)]) == 0
    assert "events.parquet" in capsys.readouterr().out
    assert "event_id" in pq.read_schema(out / "events.parquet").names
    assert "count" in pq.read_schema(out / "aggregates.parquet").names


async def _count(client: AnalyticsClient, tag: str) -> tuple[int, int]:
    result = await client.query(
        f"SELECT count(*), count(DISTINCT event_id) FROM events WHERE server_id = '{tag}'"
    )
    return result.rows[0]


@pytest.mark.asyncio
async def test_killing_the_sink_mid_stream_loses_and_doubles_nothing(
    ray_session: None, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    client = analytics_client(settings)
    handle = client.handles[0]
    tag = uuid.uuid4().hex
    try:
        for i in range(100_000):
            client.record(AnalyticsEvent(type="message", server_id=tag, user_id=f"u{i % 97}"))
            if i % 500 == 499:
                await asyncio.sleep(0)
            if i == 30_000:
                await until(lambda: client.committed >= 10_000, "some events to be committed")
                pid = await handle.__ray_call__.remote(lambda self: os.getpid())
                os.kill(pid, signal.SIGKILL)
        await until(lambda: _flushed(client), "every event to be acknowledged")
        assert await _count(client, tag) == (100_000, 100_000)
        local = client.stats_local()
        assert local.failed_deliveries > 0 and local.spilled == local.replayed
    finally:
        await client.close()
        ray.kill(handle, no_restart=True)


async def _flushed(client: AnalyticsClient) -> bool:
    await client.flush()
    return client.stats_local().spill_files == 0


@pytest.mark.asyncio
async def test_an_unwritable_database_spills_events_then_replays_each_once(
    ray_session: None, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    # the database path is a directory: DuckDB cannot open it, as root or not
    blocked = settings.state_dir / "analytics.duckdb"
    blocked.mkdir(parents=True)
    (blocked / "not-a-database").write_text("x")
    client = analytics_client(settings)
    handle = client.handles[0]
    tag = uuid.uuid4().hex
    try:
        for i in range(3_000):
            client.record(AnalyticsEvent(type="message", server_id=tag, user_id=f"u{i}"))
        await client.flush()
        local = client.stats_local()
        assert local.spilled == 3_000 and local.spill_files >= 1 and local.replayed == 0
        (sink_stats,) = await client.stats()
        assert sink_stats.storage_errors > 0 and str(blocked) in (sink_stats.last_error or "")
        with pytest.raises(Exception, match=r"analytics\.duckdb"):
            await client.query("SELECT 1")
        shutil.rmtree(blocked)
        await until(lambda: _flushed(client), "the spilled events to be replayed")
        assert await _count(client, tag) == (3_000, 3_000)
        assert client.stats_local().replayed == 3_000
    finally:
        await client.close()
        ray.kill(handle, no_restart=True)
