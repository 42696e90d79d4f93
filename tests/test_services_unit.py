"""The four service classes without Ray: the minimum the pipeline relies on."""

from __future__ import annotations

import pytest

from actors.cache import CacheConfig, ResponseCache, cache_key
from actors.context import ContextConfig, ContextStore
from actors.ratelimit import RateLimitConfig, RateLimiter, WindowLimits
from actors.schemas import Turn
from actors.sharding import group_by_shard, shard_index, stable_hash
from tests.conftest import FakeClock


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
async def test_context_build_shows_a_new_turn_at_once_and_window_drops_oldest(clock: FakeClock) -> None:
    store = ContextStore(ContextConfig(max_turns=3), clock=clock)
    for i in range(4):
        await store.append("s", "u", [Turn(role="user", author="u", text=f"t{i}", time=clock())])
        built = await store.build("s", "u")
        assert built.turns[-1][2] == f"t{i}"
    assert [t[2] for t in built.turns] == ["t1", "t2", "t3"]
    again = await store.build("s", "u")
    assert again.digest == built.digest
    assert (await store.stats()).built_hits == 1


@pytest.mark.asyncio
async def test_rate_limiter_denies_over_the_limit_and_says_when(clock: FakeClock) -> None:
    limiter = RateLimiter(RateLimitConfig(message=WindowLimits(minute=2, hour=10, day=10)), clock=clock)
    assert (await limiter.check("u")).allowed
    clock.advance(10)
    assert (await limiter.check("u")).allowed
    denied = await limiter.check("u")
    assert not denied.allowed and denied.window == "minute"
    assert denied.retry_after == pytest.approx(50.0)
    assert (await limiter.check("u", "command")).allowed
    clock.advance(50)
    assert (await limiter.check("u")).allowed


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
