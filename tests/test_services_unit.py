"""The four service classes without Ray: the minimum the pipeline relies on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from actors.analytics import AnalyticsSink, event_row
from actors.cache import CacheConfig, ResponseCache, cache_key
from actors.schemas import AnalyticsEvent
from actors.sharding import group_by_shard, shard_index, stable_hash


@pytest.mark.asyncio
async def test_cache_returns_what_was_set_and_evicts_least_recently_used() -> None:
    cache = ResponseCache(CacheConfig(max_entries=2))
    await cache.set("a", "A")
    await cache.set("b", "B" * 5000)
    assert await cache.get("a") == "A"
    await cache.set("c", "C")
    assert await cache.get("b") is None
    assert await cache.get_many(["a", "c"]) == ["A", "C"]
    stats = await cache.stats()
    assert stats.evictions == 1 and stats.entries == 2


def test_cache_key_depends_on_every_part_but_not_on_spacing_or_case() -> None:
    base = cache_key("m", "1", "user:1", "Hello  World", "ctx")
    assert base == cache_key("m", "1", "user:1", "hello world", "ctx")
    for other in (
        cache_key("m2", "1", "user:1", "hello world", "ctx"),
        cache_key("m", "2", "user:1", "hello world", "ctx"),
        cache_key("m", "1", "user:2", "hello world", "ctx"),
        cache_key("m", "1", "user:1", "hello world", "ctx2"),
    ):
        assert other != base


@pytest.mark.asyncio
async def test_analytics_sink_commits_a_batch_once_even_when_resent(tmp_path: Path) -> None:
    sink = AnalyticsSink(state_dir=tmp_path)
    rows = [event_row(AnalyticsEvent(type="message", user_id=f"u{i}")) for i in range(10)]
    await asyncio.gather(sink.append_batch(rows), sink.flush())
    await asyncio.gather(sink.append_batch(rows), sink.flush())
    _, result = await sink.query("SELECT count(*), count(DISTINCT user_id) FROM events")
    assert result == [(10, 10)]
    await sink.close()


def test_sharding_is_stable_and_spreads_keys() -> None:
    assert stable_hash("user-1") == stable_hash("user-1")
    # pinned: every process and every node must route the same key to the same shard
    assert stable_hash("user-1") == 0x9AAC5A8621EAE188
    counts = [0, 0, 0, 0]
    for i in range(4000):
        counts[shard_index(f"user-{i}", 4)] += 1
    assert min(counts) > 800
    groups = group_by_shard(["a", "b", "a"], 3)
    assert sorted(p for ps in groups.values() for p in ps) == [0, 1, 2]
