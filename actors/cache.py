"""ResponseCache: the LLM reply cache, an O(1) LRU bounded by bytes and entries.

Large values are stored lz4-compressed; keys are digests of everything that shaped
the reply (model, system prompt version, scope, prompt, context digest), so a reply is
never served outside the scope that produced it.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import lz4.block
from pydantic import BaseModel, Field

from actors.base import Clock, Service, ShardedClient
from actors.schemas import ServiceStats


class CacheConfig(BaseModel):
    shards: int = Field(default=1, ge=1)
    max_entries: int = Field(default=100_000, ge=1)
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    ttl_seconds: float | None = Field(default=24 * 3600, gt=0)
    compress_threshold: int = Field(default=1024, ge=0)


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
    expires: float | None
    scope: str
    user: str | None


class CacheStats(ServiceStats):
    hits: int
    misses: int
    hit_rate: float
    evictions: int
    expirations: int
    entries: int
    raw_bytes: int
    stored_bytes: int
    compression_ratio: float


class ResponseCache(Service):
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
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._stored_bytes = 0
        self._raw_bytes = 0
        self.hits = self.misses = self.evictions = self.expirations = 0

    # -- plain, synchronous core -------------------------------------------------------

    def get_now(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires is not None and entry.expires <= self.clock():
            self._remove(key)
            self.expirations += 1
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        if entry.compressed:
            return lz4.block.decompress(entry.data).decode("utf-8")
        return entry.data.decode("utf-8")

    def set_now(
        self,
        key: str,
        value: str,
        scope: str = "global",
        user: str | None = None,
        ttl: float | None = None,
    ) -> None:
        raw = value.encode("utf-8")
        compressed = len(raw) > self.config.compress_threshold
        data = lz4.block.compress(raw) if compressed else raw
        ttl = ttl if ttl is not None else self.config.ttl_seconds
        expires = self.clock() + ttl if ttl is not None else None
        if key in self._entries:
            self._remove(key)
        if len(data) > self.config.max_bytes:
            return
        self._entries[key] = _Entry(data, compressed, len(raw), expires, scope, user)
        self._stored_bytes += len(data)
        self._raw_bytes += len(raw)
        while len(self._entries) > self.config.max_entries or self._stored_bytes > self.config.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.evictions += 1

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._stored_bytes -= len(entry.data)
        self._raw_bytes -= entry.raw_size

    # -- service API (actor methods) ---------------------------------------------------

    async def get(self, key: str) -> str | None:
        self._ensure_maintenance()
        return self.get_now(key)

    async def get_many(self, keys: list[str]) -> list[str | None]:
        self._ensure_maintenance()
        return [self.get_now(k) for k in keys]

    async def set(
        self,
        key: str,
        value: str,
        scope: str = "global",
        user: str | None = None,
        ttl: float | None = None,
    ) -> None:
        self._ensure_maintenance()
        self.set_now(key, value, scope, user, ttl)

    async def set_many(self, items: list[tuple[str, str, str, str | None]]) -> None:
        """Store `(key, value, scope, user)` tuples in one call."""
        self._ensure_maintenance()
        for key, value, scope, user in items:
            self.set_now(key, value, scope, user)

    async def invalidate_user(self, user: str) -> int:
        doomed = [k for k, e in self._entries.items() if e.user == user]
        for k in doomed:
            self._remove(k)
        return len(doomed)

    async def clear(self) -> int:
        n = len(self._entries)
        self._entries.clear()
        self._stored_bytes = self._raw_bytes = 0
        return n

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
            entries=len(self._entries),
            raw_bytes=self._raw_bytes,
            stored_bytes=self._stored_bytes,
            compression_ratio=self._stored_bytes / self._raw_bytes if self._raw_bytes else 1.0,
        )


class CacheClient(ShardedClient):
    """The bot's handle on the cache replicas."""

    async def get(self, key: str) -> str | None:
        return await self._call(self.handle_for(key), "get", key)  # type: ignore[return-value]

    async def set(self, key: str, value: str, scope: str, user: str | None) -> None:
        await self._call(self.handle_for(key), "set", key, value, scope, user)

    async def invalidate_user(self, user: str) -> int:
        return sum(await self._call_all("invalidate_user", user))  # type: ignore[arg-type]

    async def stats(self) -> list[CacheStats]:
        return await self._call_all("stats")  # type: ignore[return-value]
