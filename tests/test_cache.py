"""ResponseCache and CacheClient: LRU bounds, TTL, compression, scopes, invalidation,
warm restart, sharding through real Ray actors, and warming through the LLM."""

from __future__ import annotations

from pathlib import Path

import lz4.block
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.cache import CacheClient, CacheConfig, ResponseCache, cache_key
from actors.schemas import IncomingMessage
from bot.pipeline import cache_scope_id
from bot.runtime import Runtime
from tests.conftest import FakeClock, make_settings


def raw_cache(clock: FakeClock | None = None, tmp: Path | None = None, **config: object) -> ResponseCache:
    """A cache that stores every value uncompressed unless told otherwise."""
    config.setdefault("compress_threshold", 1 << 20)
    return ResponseCache(CacheConfig(**config), state_dir=tmp, clock=clock)  # type: ignore[arg-type]


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


def test_eviction_by_bytes_drops_the_least_recently_used_first() -> None:
    cache = raw_cache(max_bytes=30)
    for key in ("a", "b", "c"):
        cache.set_now(key, key * 10)
    assert cache.get_now("a") == "a" * 10  # a is now the most recently used
    cache.set_now("d", "d" * 10)
    assert cache.get_now("b") is None
    assert [cache.get_now(k) for k in ("a", "c", "d")] == ["a" * 10, "c" * 10, "d" * 10]
    assert cache._stored_bytes == 30 and cache.evictions == 1


def test_eviction_by_count_keeps_the_newest_and_the_recently_read() -> None:
    cache = raw_cache(max_entries=3)
    for key in "abc":
        cache.set_now(key, key)
    cache.get_now("a")
    cache.set_now("d", "d")
    cache.set_now("e", "e")
    assert [k for k in "abcde" if cache.get_now(k) is not None] == ["a", "d", "e"]
    assert cache.evictions == 2


def test_a_value_larger_than_the_whole_cache_is_refused_and_the_rest_kept() -> None:
    cache = raw_cache(max_bytes=100)
    cache.set_now("small", "x" * 50)
    assert cache.set_now("huge", "y" * 101) is False
    assert cache.get_now("small") == "x" * 50
    assert cache.get_now("huge") is None
    assert cache.rejected == 1 and cache.evictions == 0


@pytest.mark.asyncio
async def test_malformed_items_are_refused_with_a_clear_error_and_nothing_is_stored() -> None:
    cache = raw_cache()
    with pytest.raises(ValueError, match="scope"):
        await cache.set_many([("k1", "v1", "user:1", "1"), ("k2", "v2", "", "1")])
    with pytest.raises(TypeError, match="value must be a string"):
        await cache.set("k3", b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        await cache.set("k4", "v", ttl=0)
    assert (await cache.stats()).entries == 0


@pytest.mark.asyncio
async def test_an_expired_entry_is_never_served_and_maintenance_sweeps_it(clock: FakeClock) -> None:
    cache = raw_cache(clock, ttl_seconds=60)
    cache.set_now("default", "d")
    cache.set_now("short", "s", ttl=5)
    cache.set_now("long", "l", ttl=600)
    cache.set_now("unread", "u", ttl=5)
    clock.advance(6)
    assert cache.get_now("short") is None
    assert cache.get_now("default") == "d"
    clock.advance(60)
    # not yet swept, and still not served
    assert cache.get_now("default") is None
    assert cache.get_now("long") == "l"
    stats = await cache.stats()
    assert stats.expirations == 2 and stats.entries == 2  # "long", and "unread" that no one asked for
    # the maintenance sweep removes what expired without being read
    assert cache.expire_now() == 1
    stats = await cache.stats()
    assert stats.expirations == 3 and stats.entries == 1
    assert cache.contains_now("long") and not cache.contains_now("unread")


@pytest.mark.asyncio
async def test_maintenance_expires_in_bounded_chunks_and_keeps_the_accounts(clock: FakeClock) -> None:
    cache = raw_cache(clock, ttl_seconds=10)
    for i in range(5):
        cache.set_now(f"k{i}", "v" * 10, scope="server:1", user="u")
    cache.set_now("forever", "f", ttl=10_000)
    clock.advance(11)
    assert cache.expire_now(limit=3) == 3
    await cache.maintain()
    stats = await cache.stats()
    assert stats.expirations == 5 and stats.entries == 1
    assert stats.raw_bytes == stats.stored_bytes == 1
    # the indexes forgot the swept keys too
    assert cache.invalidate_user_now("u") == 0
    assert cache.get_now("forever") == "f"


@given(st.text(max_size=3000))
@settings(max_examples=200, deadline=None)
def test_any_unicode_text_comes_back_unchanged_compressed_or_not(text: str) -> None:
    cache = ResponseCache(CacheConfig(compress_threshold=16))
    cache.set_now("k", text)
    assert cache.get_now("k") == text
    assert cache._raw_bytes == len(text.encode("utf-8"))


def test_large_values_are_stored_as_lz4_block_bytes_and_small_ones_as_they_are() -> None:
    cache = ResponseCache(CacheConfig(compress_threshold=1024))
    small = "a short reply"
    large = "## Answer\n\n" + "Ray actors keep state between calls. " * 100
    cache.set_now("small", small)
    assert cache._stored_bytes == cache._raw_bytes == len(small)
    cache.set_now("large", large)
    level = cache.config.compression_level
    packed = lz4.block.compress(
        large.encode("utf-8"), mode="high_compression", compression=level, store_size=False
    )
    # exactly the lz4 block: no base64, size header or other wrapping on top
    assert cache._stored_bytes == len(small) + len(packed)
    assert cache._stored_bytes < cache._raw_bytes / 2
    assert cache.get_now("large") == large


def test_high_compression_level_stores_less_and_reads_back_the_same() -> None:
    reply = "## Caching\n\n" + " ".join(
        f"Shard {i % 7} keeps key {i} warm for user {i % 13}." for i in range(200)
    )
    fast, high = (
        ResponseCache(CacheConfig(compression_level=0)),
        ResponseCache(CacheConfig(compression_level=9)),
    )
    for cache in (fast, high):
        cache.set_now("k", reply)
        assert cache.get_now("k") == reply
    assert high._stored_bytes <= fast._stored_bytes < len(reply)


def test_a_reply_is_never_served_outside_its_scope() -> None:
    cache = ResponseCache()
    key_a = cache_key("m", "1", "user:A", "what is ray?", "")
    key_b = cache_key("m", "1", "user:B", "what is ray?", "")
    cache.set_now(key_a, "for A", scope="user:A", user="A")
    assert cache.get_now(key_b) is None
    assert cache.get_now(key_b, scope="user:B") is None
    # even with A's key, a lookup on behalf of another scope is a miss
    assert cache.get_now(key_a, scope="user:B") is None
    assert cache.get_now(key_a, scope="user:A") == "for A"


def test_per_user_scope_is_the_default_and_shared_scopes_are_opt_in() -> None:
    alice = IncomingMessage(text="hi", user_id="alice", scope="c", server_id="s1")
    assert cache_scope_id(alice) == "user:alice"
    assert cache_scope_id(alice.model_copy(update={"cache_scope": "server"})) == "server:s1"
    assert cache_scope_id(alice.model_copy(update={"cache_scope": "global"})) == "global"


@pytest.mark.asyncio
async def test_invalidation_by_user_and_of_everything() -> None:
    cache = raw_cache()
    cache.set_now("u1-own", "1", scope="user:u1", user="u1")
    cache.set_now("u1-server", "2", scope="server:s", user="u1")
    cache.set_now("u2-server", "3", scope="server:s", user="u2")
    cache.set_now("u2-own", "4", scope="user:u2", user="u2")
    cache.set_now("u3-global", "5", scope="global", user="u3")

    assert await cache.invalidate_user("u1") == 2
    assert cache.get_now("u1-own") is None and cache.get_now("u1-server") is None
    assert cache.get_now("u2-server") == "3"
    assert cache.get_now("u2-own") == "4"
    assert await cache.delete("u2-own") is True
    assert await cache.delete("u2-own") is False
    assert await cache.clear() == 2  # u2-server and u3-global
    stats = await cache.stats()
    assert stats.entries == 0 and stats.stored_bytes == 0 and stats.raw_bytes == 0


@pytest.mark.asyncio
async def test_warm_restart_reloads_values_order_and_expiry(tmp_path: Path, clock: FakeClock) -> None:
    big = "Paragraph about caching. " * 200
    cache = raw_cache(clock, tmp_path, persist_on_shutdown=True, max_entries=3, compress_threshold=1024)
    cache.set_now("old", "o", scope="user:1", user="1")
    cache.set_now("big", big, scope="server:s", user="2")
    cache.set_now("brief", "b", ttl=5)
    cache.get_now("old")  # LRU order now: big, brief, old
    await cache.close()
    assert (tmp_path / "cache-0.bin").is_file()

    clock.advance(10)
    again = raw_cache(clock, tmp_path, persist_on_shutdown=True, max_entries=3, compress_threshold=1024)
    assert not (tmp_path / "cache-0.bin").exists()
    assert again.get_now("brief") is None  # expired while down: not reloaded
    stats = await again.stats()
    assert stats.entries == 2 and stats.stored_bytes < stats.raw_bytes
    again.set_now("new1", "n")
    again.set_now("new2", "n")
    # big was the least recently used before the restart, so it goes first
    assert again.get_now("big") is None
    assert again.get_now("old") == "o"
    assert await again.invalidate_user("1") == 1


@pytest.mark.asyncio
async def test_without_persistence_shutdown_writes_nothing(tmp_path: Path) -> None:
    cache = raw_cache(tmp=tmp_path)
    cache.set_now("k", "v")
    await cache.close()
    assert not (tmp_path / "cache-0.bin").exists()
    assert not (tmp_path / "cache-0.bin.tmp").exists()
    assert raw_cache(tmp=tmp_path).get_now("k") is None


@pytest.mark.asyncio
async def test_forget_me_is_not_undone_by_an_older_snapshot(tmp_path: Path) -> None:
    cache = raw_cache(tmp=tmp_path, persist_on_shutdown=True)
    cache.set_now("k", "private", scope="user:1", user="1")
    await cache.flush()
    assert await cache.invalidate_user("1") == 1
    # the actor crashes here, without a clean shutdown
    assert raw_cache(tmp=tmp_path, persist_on_shutdown=True).get_now("k") is None


@pytest.mark.asyncio
@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not a snapshot"])
async def test_a_damaged_snapshot_is_set_aside_and_the_cache_starts_empty(
    tmp_path: Path, damage: str
) -> None:
    cache = raw_cache(tmp=tmp_path, persist_on_shutdown=True, compress_threshold=16)
    cache.set_now("k", "the reply we cached, long enough to be compressed " * 4, scope="user:1", user="1")
    await cache.close()
    snapshot = tmp_path / "cache-0.bin"
    blob = bytearray(snapshot.read_bytes())
    if damage == "truncated":
        del blob[-10:]
    elif damage == "flipped byte":
        blob[len(blob) // 2] ^= 0x40
    else:
        blob[:4] = b"junk"
    snapshot.write_bytes(bytes(blob))

    again = raw_cache(tmp=tmp_path, persist_on_shutdown=True)
    assert again.get_now("k") is None
    assert (tmp_path / "cache-0.bin.corrupt").read_bytes() == bytes(blob)  # kept for a look, not lost
    again.set_now("k2", "v")
    assert again.get_now("k2") == "v"


@pytest.mark.ray
@pytest.mark.asyncio
async def test_sharding_sends_each_key_to_exactly_one_replica_and_spreads_them(
    ray_session: None, tmp_path: Path
) -> None:
    rt = Runtime(make_settings(tmp_path, cache=CacheConfig(shards=3)))
    try:
        await rt.start()
        client = rt.clients["cache"]
        assert isinstance(client, CacheClient) and len(client.handles) == 3
        keys = [f"key-{i}" for i in range(300)]
        assert await client.set_many([(k, f"value-{k}", "global", None) for k in keys]) == 300
        owners = [await h.contains_many.remote(keys) for h in client.handles]
        for i in range(len(keys)):
            assert sum(owned[i] for owned in owners) == 1
        per_shard = [s.entries for s in await client.stats()]
        assert sum(per_shard) == 300 and min(per_shard) > 0
        assert await client.get_many([*reversed(keys), "absent"]) == [
            *(f"value-{k}" for k in reversed(keys)),
            None,
        ]
        assert await client.get(keys[0]) == f"value-{keys[0]}"
        assert await client.clear() == 300
    finally:
        await rt.shutdown(kill_actors=True)
