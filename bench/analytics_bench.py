"""Analytics ingest into DuckDB: one INSERT per event vs `executemany` vs the AnalyticsSink.

All designs run side by side in one run on fresh database files: the plan's "before"
(an autocommitted INSERT per event), `executemany` in one transaction per flush, the
sink in-process with client-sized batches, and the client through the sink actor.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from actors.analytics import (
    AnalyticsClient,
    AnalyticsConfig,
    AnalyticsSink,
    event_row,
    open_db,
    rows_to_table,
    table_to_ipc,
)
from actors.schemas import AnalyticsEvent
from bench import floors
from bench.common import ratio, write_results
from storage.analytics_db import AnalyticsDB

SIZES: dict[str, dict[str, int]] = {
    # events per design; the per-row designs are slow, so they get fewer events
    "tiny": {"before": 50, "executemany": 100, "sink": 20_000, "actor": 5_000},
    # the sink runs are long enough for DuckDB's checkpoints and growing key index to show
    "full": {"before": 1_000, "executemany": 2_000, "sink": 600_000, "actor": 100_000},
}

_INSERT_ONE = "INSERT INTO events VALUES (?::UUID, make_timestamp(?), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?::JSON)"


def make_events(n: int) -> list[AnalyticsEvent]:
    return [
        AnalyticsEvent(
            type="message",
            server_id=f"s{i % 10}",
            channel_id=f"c{i % 100}",
            user_id=f"u{i % 1000}",
            latency_ms=float(i % 500),
            tokens_in=i % 300,
            tokens_out=i % 200,
            cache_hit=i % 3 == 0,
            payload={"model": "gemini-2.5-flash"} if i % 2 else {},
        )
        for i in range(n)
    ]


def _result(
    events: int, seconds: float, transactions: int, marks: list[tuple[float, int]] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "events": events,
        "seconds": seconds,
        "events_per_second": events / seconds if seconds else 0.0,
        "transactions_per_10k_events": transactions * 10_000 / events if events else 0.0,
    }
    if marks:
        out["events_per_second_by_quarter"] = _by_quarter(marks)
    return out


def _by_quarter(marks: list[tuple[float, int]]) -> list[float]:
    """Events per second over each quarter of a run, from (seconds, events done) marks:
    a sustained rate stays level as the table grows."""
    total = marks[-1][1]
    rates: list[float] = []
    last_t, last_n = 0.0, 0
    for q in (1, 2, 3, 4):
        t, n = next(m for m in marks if m[1] >= total * q / 4)
        if n > last_n:
            rates.append((n - last_n) / (t - last_t) if t > last_t else 0.0)
            last_t, last_n = t, n
        else:
            # one acknowledgement (one commit) covered this quarter and the last: its rate
            rates.append(rates[-1])
    return rates


def bench_before(rows: list[tuple[Any, ...]], path: Path) -> dict[str, float]:
    """The plan's "before": one INSERT per event, each its own (autocommit) transaction."""
    db = AnalyticsDB(path)
    start = time.perf_counter()
    for row in rows:
        db.conn.execute(_INSERT_ONE, list(row)).fetchall()
    seconds = time.perf_counter() - start
    db.close()
    return _result(len(rows), seconds, len(rows))


def bench_executemany(rows: list[tuple[Any, ...]], path: Path, flush_events: int) -> dict[str, float]:
    """What a user might pick instead: `executemany` in one transaction per flush."""
    db = AnalyticsDB(path)
    transactions = 0
    start = time.perf_counter()
    for i in range(0, len(rows), flush_events):
        db.conn.begin()
        db.conn.executemany(_INSERT_ONE, [list(r) for r in rows[i : i + flush_events]])
        db.conn.commit()
        transactions += 1
    seconds = time.perf_counter() - start
    db.close()
    return _result(len(rows), seconds, transactions)


async def _feed(
    batches: Sequence[Any], inflight: int, append: Callable[[Any], Awaitable[int]]
) -> list[tuple[float, int]]:
    """Append every batch, `inflight` at a time, as a client does; (seconds since the start,
    events acknowledged) after each acknowledgement."""
    room = asyncio.Semaphore(inflight)
    marks: list[tuple[float, int]] = []
    done = 0
    start = time.perf_counter()

    async def send(batch: Any) -> None:
        nonlocal done
        async with room:
            done += await append(batch)
            marks.append((time.perf_counter() - start, done))

    await asyncio.gather(*(send(b) for b in batches))
    return marks


def bench_storage_ceiling(rows: list[tuple[Any, ...]], path: Path, flush_events: int) -> dict[str, float]:
    """The storage layer alone: Arrow tables built beforehand, inserted by the sink's own
    statements with its checkpoint setting. What the sink could reach at best."""
    db = open_db(path, AnalyticsConfig())
    tables = [rows_to_table(rows[i : i + flush_events]) for i in range(0, len(rows), flush_events)]
    marks: list[tuple[float, int]] = []
    start = time.perf_counter()
    for table in tables:
        db.insert_batch(table)
        marks.append((time.perf_counter() - start, len(marks) * flush_events + table.num_rows))
    seconds = time.perf_counter() - start
    transactions = db.transactions
    db.close()
    return _result(len(rows), seconds, transactions, marks)


async def bench_sink(
    rows: list[tuple[Any, ...]], state_dir: Path, config: AnalyticsConfig
) -> dict[str, float]:
    """The sink in-process, fed client-sized batches with the client's in-flight bound, as
    the Arrow tables the client converts them to (that conversion is the front-end's cost,
    reported by `bench_record`)."""
    sink = AnalyticsSink(config, state_dir=state_dir)
    batch = config.client_batch_events
    tables = [rows_to_table(rows[i : i + batch]) for i in range(0, len(rows), batch)]
    start = time.perf_counter()
    marks = await _feed(tables, config.client_max_inflight, sink.append_batch)
    await sink.flush()
    seconds = time.perf_counter() - start
    stats = await sink.stats()
    await sink.close()
    assert stats.committed == len(rows), stats
    return _result(len(rows), seconds, stats.transactions, marks)


def bench_record(events: list[AnalyticsEvent], repeats: int = 5) -> dict[str, float]:
    """The front-end's cost per event, alone on the loop (no sink, the sender not yet run):
    `record()` of a built event, and building (validating) one and recording it; then,
    off the reply path, the sender's conversion of each batch to Arrow. Best of `repeats`,
    since other processes share the cores."""

    async def once() -> tuple[float, float, float]:
        # the client's sender task is created but never runs: nothing yields in here,
        # and `asyncio.run` cancels it on the way out
        client = AnalyticsClient([None], AnalyticsConfig(client_batch_events=len(events) * 2 + 1))
        start = time.perf_counter()
        for event in events:
            client.record(event)
        recorded = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(len(events)):
            client.record(
                AnalyticsEvent(
                    type="reply",
                    server_id="s1",
                    user_id=f"u{i % 1000}",
                    latency_ms=12.0,
                    payload={"llm_ms": 310.5, "model": "gemini-2.5-flash"},
                )
            )
        built = time.perf_counter() - start
        buffered = client._buffer
        assert len(buffered) == 2 * len(events)
        step = AnalyticsConfig().client_batch_events
        start = time.perf_counter()
        for i in range(0, len(buffered), step):
            table_to_ipc(rows_to_table(buffered[i : i + step]))
        converted = time.perf_counter() - start
        return recorded / len(events), built / len(events), converted / len(buffered)

    runs = [asyncio.run(once()) for _ in range(repeats)]
    return {
        "events": len(events),
        "record_us": min(r[0] for r in runs) * 1e6,
        "build_and_record_us": min(r[1] for r in runs) * 1e6,
        "record_us_median": sorted(r[0] for r in runs)[len(runs) // 2] * 1e6,
        # per event, in the sender task after the reply: rows to the Arrow IPC stream it ships
        "convert_to_arrow_us": min(r[2] for r in runs) * 1e6,
    }


def _sink_actor(state_dir: Path, config: AnalyticsConfig) -> tuple[list[Any], bool]:
    """The analytics service as the bot starts it: (its handles, whether Ray was started here)."""
    from bot.config import Settings
    from bot.runtime import SERVICES, init_ray, service_handles

    settings = Settings(
        state_dir=state_dir,
        namespace=f"bench-analytics-{time.time_ns()}",
        dashboard=False,
        analytics=config,
    )
    owns_ray = init_ray(settings, num_cpus=2, include_dashboard=False)
    spec = next(s for s in SERVICES if s.name == "analytics")
    return service_handles(settings, spec), owns_ray


async def _stop_sink_actor(handles: list[Any], owns_ray: bool) -> None:
    import ray

    await handles[0].close.remote()
    ray.kill(handles[0], no_restart=True)
    if owns_ray:
        ray.shutdown()


async def bench_sink_actor(
    rows: list[tuple[Any, ...]], state_dir: Path, config: AnalyticsConfig
) -> dict[str, Any]:
    """The sink actor's sustained rate: the calls a client with a backlog makes (full
    batches, as Arrow IPC streams) from this process, `client_max_inflight` at a time, through Ray into
    DuckDB. Building the events is left out: that is the front-ends' cost, and several
    front-ends may feed one sink."""
    handles, owns_ray = _sink_actor(state_dir, config)
    # a client under sustained load has a backlog, so it sends full calls
    batch = max(config.client_batch_events, config.client_max_batch_events)
    batches = [table_to_ipc(rows_to_table(rows[i : i + batch])) for i in range(0, len(rows), batch)]

    async def append(ipc: bytes) -> int:
        return int(await handles[0].append_batch.remote(ipc))

    try:
        await handles[0].ping.remote()
        start = time.perf_counter()
        marks = await _feed(batches, config.client_max_inflight, append)
        seconds = time.perf_counter() - start
        stats = await handles[0].stats.remote()
        assert stats.committed == len(rows), stats
        out = _result(len(rows), seconds, stats.transactions, marks)
        out["mean_flush_size"] = stats.mean_flush_size
        out["max_commit_ms"] = stats.max_commit_ms
        return out
    finally:
        await _stop_sink_actor(handles, owns_ray)


async def bench_actor(
    events: list[AnalyticsEvent], state_dir: Path, config: AnalyticsConfig
) -> dict[str, Any]:
    """The whole path from one front-end: `AnalyticsClient.record` → batches → sink actor
    → DuckDB commit."""
    handles, owns_ray = _sink_actor(state_dir, config)
    client = AnalyticsClient(handles, config, state_dir=state_dir)
    try:
        await handles[0].ping.remote()
        record_seconds = build_seconds = 0.0
        built = len(events) // 2
        step = config.client_batch_events
        start = time.perf_counter()
        for i in range(0, len(events), step):
            t0 = time.perf_counter()
            for event in events[i : i + step]:
                client.record(event)
            record_seconds += time.perf_counter() - t0
            # the reply path yields between messages; this is where the sender runs
            await asyncio.sleep(0)
        for i in range(0, built, step):
            t0 = time.perf_counter()
            for j in range(i, min(i + step, built)):
                client.record(
                    AnalyticsEvent(type="reply", server_id="s1", user_id=f"u{j % 1000}", latency_ms=12.0)
                )
            build_seconds += time.perf_counter() - t0
            await asyncio.sleep(0)
        await client.flush()
        seconds = time.perf_counter() - start
        (stats,) = await client.stats()
        local = client.stats_local()
        total = len(events) + built
        # no event lost; when the sink falls behind the burst, the client spills and
        # replays (the designed backpressure), which the figures below report
        assert local.committed == total, local
        out: dict[str, Any] = _result(total, seconds, stats.transactions)
        out["spilled"] = local.spilled
        out["replayed"] = local.replayed
        # front-end cost per event while the sink works on the other core: `record()` of a
        # built event, and building + recording
        out["record_us"] = record_seconds / len(events) * 1e6
        out["build_and_record_us"] = build_seconds / built * 1e6
        out["mean_flush_size"] = stats.mean_flush_size
        out["max_commit_ms"] = stats.max_commit_ms
        return out
    finally:
        await client.close()
        await _stop_sink_actor(handles, owns_ray)


async def _run(size: str, work: Path, with_actor: bool) -> dict[str, Any]:
    n = SIZES[size]
    config = AnalyticsConfig()
    events = make_events(max(n.values()))
    rows = [event_row(e) for e in events]
    # pyarrow imports its pandas shim on the first conversion (seconds here): not ingest time
    rows_to_table(rows[:10])
    # the fixture (a million events and rows) is no part of what is measured: frozen, it
    # is not walked by every full collection this process makes while it drives the sink
    gc.collect()
    gc.freeze()
    # the machine is shared: the load average says how much of it this run had
    results: dict[str, Any] = {
        "size": size,
        "config": config.model_dump(mode="json"),
        "load_average_1m_at_start": os.getloadavg()[0],
    }
    results["before_insert_per_event"] = bench_before(rows[: n["before"]], work / "before.duckdb")
    results["executemany"] = bench_executemany(
        rows[: n["executemany"]], work / "executemany.duckdb", config.flush_events
    )
    results["storage_ceiling_arrow_insert"] = bench_storage_ceiling(
        rows[: n["sink"]], work / "ceiling.duckdb", config.flush_events
    )
    results["sink_in_process"] = await bench_sink(rows[: n["sink"]], work / "sink", config)
    if with_actor:
        results["sink_actor_arrow_batches"] = await bench_sink_actor(
            rows[: n["sink"]], work / "actor-batches", config
        )
        results["sink_actor_end_to_end"] = await bench_actor(events[: n["actor"]], work / "actor", config)
    ours = results["sink_in_process"]["events_per_second"]
    results["ratios"] = {
        "sink_vs_before_events_per_second": ratio(
            results["before_insert_per_event"]["events_per_second"], ours
        ),
        "sink_vs_executemany_events_per_second": ratio(results["executemany"]["events_per_second"], ours),
        # below 1: the share of the storage layer's own rate the whole sink keeps
        "sink_vs_storage_ceiling_events_per_second": ours
        / results["storage_ceiling_arrow_insert"]["events_per_second"],
    }
    if with_actor:
        results["ratios"]["sink_actor_vs_storage_ceiling_events_per_second"] = (
            results["sink_actor_arrow_batches"]["events_per_second"]
            / results["storage_ceiling_arrow_insert"]["events_per_second"]
        )
    results["targets"] = {
        "events_per_second_min": 50_000,
        "transactions_per_10k_max": 20,
        "record_us_max": 20,
    }
    results["load_average_1m_at_end"] = os.getloadavg()[0]
    gc.unfreeze()
    return results


def run(size: str = "full", results_dir: Path | None = None, with_actor: bool = True) -> dict[str, Any]:
    with floors.watch(size) as watch:
        # first, alone: the front-end's cost per event, before any database or actor runs
        record = bench_record(make_events(20_000 if size == "full" else 500))
        with tempfile.TemporaryDirectory(prefix="analytics-bench-") as tmp:
            results = asyncio.run(_run(size, Path(tmp), with_actor))
    results["record_in_isolation"] = record
    results["floors"] = watch.result
    write_results("analytics_bench", results, results_dir)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--no-actor", action="store_true", help="skip the run through a Ray actor")
    args = parser.parse_args()
    results = run(args.size, with_actor=not args.no_actor)
    for name, value in results.items():
        if isinstance(value, dict) and name != "config":
            print(name, {k: round(v, 2) if isinstance(v, float) else v for k, v in value.items()})


if __name__ == "__main__":
    main()
