"""ResponseCache: the LLM reply cache, an O(1) LRU bounded by bytes and entries, and its client.

Large values are stored lz4-compressed; keys are digests of everything that shaped the
reply (model, system prompt version, scope, prompt, context digest), so a reply is never
served outside the scope that produced it. `CacheClient` routes keys to the shards.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import math
import os
import struct
import unicodedata
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import lz4.block
from pydantic import BaseModel, Field

from actors.base import Clock, Service, ShardedClient
from actors.metrics import counter, gauge
from actors.schemas import ServiceStats
from actors.sharding import group_by_shard

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger(__name__)


class CacheConfig(BaseModel):
    shards: int = Field(default=1, ge=1)
    max_entries: int = Field(default=100_000, ge=1)
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    #: default time to live of an entry; None keeps entries until they are evicted
    ttl_seconds: float | None = Field(default=24 * 3600, gt=0)
    #: values whose UTF-8 form is larger than this many bytes are stored lz4-compressed
    compress_threshold: int = Field(default=1024, ge=0)
    #: lz4 block level: 0 is lz4's fast mode; 1-12 is its high-compression mode. Sets run
    #: off the reply path, so the default pays a slower set for a better ratio; gets
    #: decompress equally fast either way
    compression_level: int = Field(default=3, ge=0, le=12)
    #: width of the time buckets expired entries are swept from (a lookup never serves
    #: an expired entry whatever this is; it only sets how soon the memory comes back)
    expiry_resolution_seconds: float = Field(default=1.0, gt=0)
    #: most expired entries one maintenance pass removes, so a pass never stalls requests
    expire_batch: int = Field(default=10_000, ge=1)
    #: on a clean shutdown write the entries to the state directory; reload them at start
    persist_on_shutdown: bool = False


def pack(raw: bytes, level: int) -> bytes:
    """An lz4 block without lz4's 4-byte size header: the entry keeps the raw size anyway."""
    # lz4 ships no type information: its results are bytes by its documentation
    packed: bytes
    if level:
        packed = lz4.block.compress(raw, mode="high_compression", compression=level, store_size=False)
    else:
        packed = lz4.block.compress(raw, store_size=False)
    return packed


def unpack(data: bytes, raw_size: int) -> bytes:
    raw: bytes = lz4.block.decompress(data, uncompressed_size=raw_size)
    return raw


def normalize_prompt(prompt: str) -> str:
    """Case, spacing and unicode form do not change what is being asked."""
    return " ".join(unicodedata.normalize("NFKC", prompt).casefold().split())


def cache_key(model: str, system_version: str, scope: str, prompt: str, context_digest: str) -> str:
    """Stable digest of everything that shaped a reply."""
    h = hashlib.blake2b(digest_size=16)
    for part in (model, system_version, scope, normalize_prompt(prompt), context_digest):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


@dataclass(slots=True)
class _Entry:
    data: bytes
    compressed: bool
    raw_size: int
    #: absolute expiry time; math.inf when the entry has no TTL
    expires: float
    scope: str
    user: str | None
    #: expiry bucket id, -1 when the entry has no TTL
    bucket: int


class CacheStats(ServiceStats):
    hits: int
    misses: int
    hit_rate: float
    evictions: int
    expirations: int
    #: values not stored because they alone exceed `max_bytes`
    rejected: int
    entries: int
    raw_bytes: int
    stored_bytes: int
    #: raw_bytes / stored_bytes: 2.0 means the values take half their raw size
    compression_ratio: float


# Snapshot file: magic, entry count, then per entry (oldest first) a fixed header and
# the key, scope, user and stored bytes it announces; a CRC-32 of all but the magic last.
#: version 2: compressed blocks carry no size header (the record's raw size says it)
_MAGIC = b"RAYCORD-CACHE-2\n"
_COUNT = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_RECORD = struct.Struct("<BdQIIII")
_COMPRESSED, _HAS_USER = 1, 2


def _check_item(key: object, value: object, scope: object, user: object) -> None:
    if (
        type(key) is str
        and key
        and type(value) is str
        and type(scope) is str
        and scope
        and (user is None or type(user) is str)
    ):
        return
    if not isinstance(key, str) or not key:
        raise ValueError(f"cache key must be a non-empty string, got {key!r}")
    if not isinstance(value, str):
        raise TypeError(f"cache value must be a string, got {type(value).__name__}")
    if not isinstance(scope, str) or not scope:
        raise ValueError(f"cache scope must be a non-empty string, got {scope!r}")
    if user is not None and not isinstance(user, str):
        raise ValueError(f"cache user must be a string or None, got {user!r}")


class ResponseCache(Service):
    """One shard of the reply cache. The `*_now` methods are the plain synchronous core;
    the async methods are what the actor serves."""

    def __init__(
        self,
        config: CacheConfig | None = None,
        state_dir: Path | None = None,
        shard: int = 0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(clock)
        self.config = config or CacheConfig()
        self.shard = shard
        self.snapshot_path = Path(state_dir) / f"cache-{shard}.bin" if state_dir is not None else None
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # a secondary index, so forgetting a user costs what it removes rather than a scan
        self._by_user: dict[str, set[str]] = {}
        # expiry time buckets, and a heap of the bucket ids that exist, soonest first
        self._expiry: dict[int, set[str]] = {}
        self._expiry_heap: list[int] = []
        self._stored_bytes = 0
        self._raw_bytes = 0
        self.hits = self.misses = self.evictions = self.expirations = self.rejected = 0
        self._tags = {"shard": str(shard)}
        self._counters = {
            name: counter(f"cache_{name}", f"response cache {name}", ("shard",))
            for name in ("hits", "misses", "evictions", "expirations", "rejected")
        }
        self._published = dict.fromkeys(self._counters, 0)
        self._gauges = {
            name: gauge(f"cache_{name}", f"response cache {name}", ("shard",))
            for name in ("entries", "raw_bytes", "stored_bytes")
        }
        if self.config.persist_on_shutdown:
            self._reload()

    # -- plain, synchronous core -------------------------------------------------------

    def get_now(self, key: str, scope: str | None = None) -> str | None:
        """The value under `key`, or None. With `scope`, an entry of another scope is a miss."""
        entry = self._entries.get(key)
        if entry is None or (scope is not None and entry.scope != scope):
            self.misses += 1
            return None
        if entry.expires <= self.clock():
            self._remove(key)
            self.expirations += 1
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        data = entry.data
        return (unpack(data, entry.raw_size) if entry.compressed else data).decode("utf-8")

    def contains_now(self, key: str) -> bool:
        """Whether an unexpired value is under `key`; counts no hit or miss but keeps it warm."""
        entry = self._entries.get(key)
        if entry is None or entry.expires <= self.clock():
            return False
        self._entries.move_to_end(key)
        return True

    def set_now(
        self,
        key: str,
        value: str,
        scope: str = "global",
        user: str | None = None,
        ttl: float | None = None,
    ) -> bool:
        """Store `value`; False when it alone is larger than the whole cache may hold.

        Raises:
            ValueError, TypeError: the key, value, scope, user or ttl is malformed.
        """
        _check_item(key, value, scope, user)
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be positive, got {ttl!r}")
        raw = value.encode("utf-8")
        data, compressed = raw, False
        if len(raw) > self.config.compress_threshold:
            packed = pack(raw, self.config.compression_level)
            # incompressible text is kept as it is: smaller, and nothing to undo on a hit
            if len(packed) < len(raw):
                data, compressed = packed, True
        life = ttl if ttl is not None else self.config.ttl_seconds
        if key in self._entries:
            self._remove(key)
        if len(data) > self.config.max_bytes:
            self.rejected += 1
            return False
        expires = self.clock() + life if life is not None else math.inf
        self._insert(key, self._entry(data, compressed, len(raw), expires, scope, user))
        self._evict_over_bounds()
        return True

    def _entry(
        self, data: bytes, compressed: bool, raw_size: int, expires: float, scope: str, user: str | None
    ) -> _Entry:
        bucket = int(expires // self.config.expiry_resolution_seconds) if expires != math.inf else -1
        return _Entry(data, compressed, raw_size, expires, scope, user, bucket)

    def delete_now(self, key: str) -> bool:
        if key not in self._entries:
            return False
        self._remove(key)
        self._drop_snapshot()
        return True

    def invalidate_user_now(self, user: str) -> int:
        return self._remove_all(self._by_user.get(user))

    def clear_now(self) -> int:
        removed = len(self._entries)
        self._entries.clear()
        self._by_user.clear()
        self._expiry.clear()
        self._expiry_heap.clear()
        self._stored_bytes = self._raw_bytes = 0
        return removed

    def expire_now(self, limit: int | None = None) -> int:
        """Remove up to `limit` expired entries; costs what it removes, never a scan."""
        budget = self.config.expire_batch if limit is None else limit
        resolution = self.config.expiry_resolution_seconds
        now = self.clock()
        removed = 0
        heap = self._expiry_heap
        while heap and removed < budget:
            bucket = heap[0]
            # only buckets wholly in the past: every entry in them has expired
            if (bucket + 1) * resolution > now:
                break
            keys = self._expiry.get(bucket)
            while keys and removed < budget:
                key = keys.pop()
                self._unindex(key, self._entries.pop(key))
                removed += 1
            if not keys:
                heapq.heappop(heap)
                self._expiry.pop(bucket, None)
        self.expirations += removed
        return removed

    def _insert(self, key: str, entry: _Entry) -> None:
        # index upkeep is written out inline: this runs on every set and eviction
        self._entries[key] = entry
        self._stored_bytes += len(entry.data)
        self._raw_bytes += entry.raw_size
        if entry.user is not None:
            keys = self._by_user.get(entry.user)
            if keys is None:
                self._by_user[entry.user] = {key}
            else:
                keys.add(key)
        if entry.bucket >= 0:
            keys = self._expiry.get(entry.bucket)
            if keys is None:
                self._expiry[entry.bucket] = {key}
                heapq.heappush(self._expiry_heap, entry.bucket)
            else:
                keys.add(key)

    def _unindex(self, key: str, entry: _Entry) -> None:
        """Undo `_insert`'s accounting for an entry already popped from `_entries`."""
        self._stored_bytes -= len(entry.data)
        self._raw_bytes -= entry.raw_size
        if entry.user is not None:
            keys = self._by_user.get(entry.user)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_user[entry.user]
        if entry.bucket >= 0:
            # an emptied bucket stays until its time passes, so its id is pushed only once
            keys = self._expiry.get(entry.bucket)
            if keys is not None:
                keys.discard(key)

    def _remove(self, key: str) -> None:
        self._unindex(key, self._entries.pop(key))

    def _remove_all(self, keys: set[str] | None) -> int:
        if not keys:
            return 0
        doomed = list(keys)
        for key in doomed:
            self._remove(key)
        self._drop_snapshot()
        return len(doomed)

    def _evict_over_bounds(self) -> None:
        max_entries, max_bytes = self.config.max_entries, self.config.max_bytes
        while len(self._entries) > max_entries or self._stored_bytes > max_bytes:
            key, entry = self._entries.popitem(last=False)
            self._unindex(key, entry)
            self.evictions += 1

    # -- warm restart --------------------------------------------------------------------

    def _drop_snapshot(self) -> None:
        # an invalidated entry ("forget me") must not come back from an older snapshot
        if self.snapshot_path is not None and self.config.persist_on_shutdown:
            self.snapshot_path.unlink(missing_ok=True)

    def _reload(self) -> None:
        path = self.snapshot_path
        if path is None or not path.is_file():
            return
        try:
            records = _read_snapshot(path.read_bytes())
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            kept = path.with_suffix(".bin.corrupt")
            log.warning("ignoring unreadable cache snapshot %s (%s); kept as %s", path, exc, kept)
            path.replace(kept)
            return
        now = self.clock()
        for key, data, compressed, raw_size, expires, scope, user in records:
            if expires > now:
                self._insert(key, self._entry(data, compressed, raw_size, expires, scope, user))
        self._evict_over_bounds()
        # the entries live in memory now; a crash later must not resurrect this copy
        path.unlink()
        log.info("reloaded %d cache entries from %s", len(self._entries), path)

    async def flush(self) -> None:
        """With `persist_on_shutdown`, write the entries (oldest first) atomically."""
        if not self.config.persist_on_shutdown or self.snapshot_path is None:
            return
        now = self.clock()
        # entries are replaced on set, never mutated, so this copy is a consistent snapshot
        items = [(k, e) for k, e in self._entries.items() if e.expires > now]
        await asyncio.to_thread(_write_snapshot, self.snapshot_path, items)

    # -- service API (actor methods) ---------------------------------------------------

    async def get(self, key: str, scope: str | None = None) -> str | None:
        self._ensure_maintenance()
        value = self.get_now(key, scope)
        self._export_metrics()
        return value

    async def get_many(self, keys: Sequence[str], scope: str | None = None) -> list[str | None]:
        """Values in the order of `keys`, None for each miss: one round trip for many keys."""
        self._ensure_maintenance()
        values = [self.get_now(k, scope) for k in keys]
        self._export_metrics()
        return values

    async def contains_many(self, keys: Sequence[str]) -> list[bool]:
        self._ensure_maintenance()
        return [self.contains_now(k) for k in keys]

    async def set(
        self,
        key: str,
        value: str,
        scope: str = "global",
        user: str | None = None,
        ttl: float | None = None,
    ) -> bool:
        self._ensure_maintenance()
        stored = self.set_now(key, value, scope, user, ttl)
        self._export_metrics()
        return stored

    async def set_many(
        self, items: Sequence[tuple[str, str, str, str | None]], ttl: float | None = None
    ) -> int:
        """Store `(key, value, scope, user)` tuples; returns how many were stored.

        Raises:
            ValueError, TypeError: an item is malformed; then nothing is stored.
        """
        self._ensure_maintenance()
        for item in items:
            if len(item) != 4:
                raise ValueError(f"set_many takes (key, value, scope, user) tuples, got {item!r:.80}")
            _check_item(*item)
        stored = sum(self.set_now(key, value, scope, user, ttl) for key, value, scope, user in items)
        self._export_metrics()
        return stored

    async def delete(self, key: str) -> bool:
        return self.delete_now(key)

    async def invalidate_user(self, user: str) -> int:
        """Drop every entry written for `user`, in any scope ("forget me")."""
        return self.invalidate_user_now(user)

    async def clear(self) -> int:
        removed = self.clear_now()
        self._drop_snapshot()
        return removed

    async def maintain(self) -> None:
        self.expire_now()
        self._export_metrics()
        self._gauges["entries"].set(len(self._entries), tags=self._tags)
        self._gauges["raw_bytes"].set(self._raw_bytes, tags=self._tags)
        self._gauges["stored_bytes"].set(self._stored_bytes, tags=self._tags)

    def _export_metrics(self) -> None:
        for name, metric in self._counters.items():
            value = getattr(self, name)
            if value != self._published[name]:
                metric.inc(value - self._published[name], tags=self._tags)
                self._published[name] = value

    async def stats(self) -> CacheStats:
        lookups = self.hits + self.misses
        return CacheStats(
            service="cache",
            shard=self.shard,
            hits=self.hits,
            misses=self.misses,
            hit_rate=self.hits / lookups if lookups else 0.0,
            evictions=self.evictions,
            expirations=self.expirations,
            rejected=self.rejected,
            entries=len(self._entries),
            raw_bytes=self._raw_bytes,
            stored_bytes=self._stored_bytes,
            compression_ratio=self._raw_bytes / self._stored_bytes if self._stored_bytes else 1.0,
        )


def _write_snapshot(path: Path, items: list[tuple[str, _Entry]]) -> None:
    """Write `items` to `path` atomically: a temporary file, fsynced, then renamed."""
    tmp = path.with_suffix(".bin.tmp")
    crc = 0
    with open(tmp, "wb", buffering=1 << 20) as out:

        def put(chunk: bytes) -> None:
            nonlocal crc
            crc = zlib.crc32(chunk, crc)
            out.write(chunk)

        out.write(_MAGIC)
        put(_COUNT.pack(len(items)))
        for key, e in items:
            k, s = key.encode("utf-8"), e.scope.encode("utf-8")
            u = e.user.encode("utf-8") if e.user is not None else b""
            flags = (_COMPRESSED if e.compressed else 0) | (_HAS_USER if e.user is not None else 0)
            put(_RECORD.pack(flags, e.expires, e.raw_size, len(k), len(s), len(u), len(e.data)))
            for chunk in (k, s, u, e.data):
                put(chunk)
        out.write(_CRC.pack(crc))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


_Record = tuple[str, bytes, bool, int, float, str, str | None]


def _read_snapshot(blob: bytes) -> list[_Record]:
    """Parse a snapshot; ValueError or struct.error when it is not a whole, intact one."""
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _COUNT.size + _CRC.size:
        raise ValueError("not a raycord cache snapshot")
    body_end = len(blob) - _CRC.size
    view = memoryview(blob)
    (crc,) = _CRC.unpack_from(view, body_end)
    if zlib.crc32(view[len(_MAGIC) : body_end]) != crc:
        raise ValueError("snapshot checksum mismatch")
    pos = len(_MAGIC)
    (count,) = _COUNT.unpack_from(view, pos)
    pos += _COUNT.size
    records: list[_Record] = []
    for _ in range(count):
        flags, expires, raw_size, nk, ns, nu, nd = _RECORD.unpack_from(view, pos)
        pos += _RECORD.size
        end = pos + nk + ns + nu + nd
        if end > body_end:
            raise ValueError("snapshot is truncated")
        key = bytes(view[pos : pos + nk]).decode("utf-8")
        scope = bytes(view[pos + nk : pos + nk + ns]).decode("utf-8")
        user = bytes(view[pos + nk + ns : pos + nk + ns + nu]).decode("utf-8") if flags & _HAS_USER else None
        data = bytes(view[end - nd : end])
        records.append((key, data, bool(flags & _COMPRESSED), raw_size, expires, scope, user))
        pos = end
    if pos != body_end:
        raise ValueError("snapshot has trailing bytes")
    return records


class CacheClient(ShardedClient):
    """The bot's handle on the cache replicas: each key goes to the one shard that owns it.

    Raises (every method):
        ServiceUnavailable: a shard died or is restarting; the call may be retried.
    """

    async def get(self, key: str, scope: str | None = None) -> str | None:
        return await self._batched(self.handle_for(key), ResponseCache.get, key, scope)

    async def get_many(self, keys: Sequence[str], scope: str | None = None) -> list[str | None]:
        """Values in the order of `keys`, None for misses: one concurrent call per shard."""
        return await self._per_shard(ResponseCache.get_many, keys, scope)

    async def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return await self._per_shard(ResponseCache.contains_many, keys)

    #: the cache stores a value without waiting, so a set may ride with a get's round trip
    batch_lanes = {"set": "get"}

    async def set(
        self,
        key: str,
        value: str,
        scope: str,
        user: str | None,
        ttl: float | None = None,
        *,
        background: bool = False,
    ) -> bool:
        """Store `value` under `key`. `background`: nobody waits for it, so it rides with
        the shard's next get (or leaves after `linger_seconds`)."""
        send = self._background if background else self._batched
        return await send(self.handle_for(key), ResponseCache.set, key, value, scope, user, ttl)

    async def set_many(
        self, items: Sequence[tuple[str, str, str, str | None]], ttl: float | None = None
    ) -> int:
        """Store `(key, value, scope, user)` tuples with one call per shard; returns how many were stored."""
        groups = group_by_shard([item[0] for item in items], len(self.handles))
        stored = await asyncio.gather(
            *(
                self._call(self.handles[shard], ResponseCache.set_many, [items[p] for p in positions], ttl)
                for shard, positions in groups.items()
            )
        )
        return sum(stored)

    async def delete(self, key: str) -> bool:
        return await self._call(self.handle_for(key), ResponseCache.delete, key)

    async def invalidate_user(self, user: str) -> int:
        return sum(await self._call_all(ResponseCache.invalidate_user, user))

    async def clear(self) -> int:
        return sum(await self._call_all(ResponseCache.clear))

    async def stats(self) -> list[CacheStats]:
        return await self._call_all(ResponseCache.stats)

    async def _per_shard(
        self,
        method: Callable[Concatenate[Any, Sequence[str], P], Awaitable[list[T]]],
        keys: Sequence[str],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> list[T]:
        """`method` over `keys`, one call per shard holding some; results in `keys` order."""
        found: dict[int, T] = {}

        async def one(shard: int, positions: list[int]) -> None:
            part = [keys[p] for p in positions]
            values = await self._call(self.handles[shard], method, part, *args, **kwargs)
            found.update(zip(positions, values, strict=True))

        await asyncio.gather(*(one(s, ps) for s, ps in group_by_shard(keys, len(self.handles)).items()))
        return [found[i] for i in range(len(keys))]
