"""ContextStore: per (scope, user) conversation windows and the context the LLM receives.

A built context is cached under the conversation's version, which every write bumps,
so `build()` never returns a stale context.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from actors.base import Clock, Service, ShardedClient
from actors.schemas import ServiceStats, Turn


class ContextConfig(BaseModel):
    shards: int = Field(default=1, ge=1)
    max_turns: int = Field(default=20, ge=1)
    max_chars: int = Field(default=8_000, ge=100)
    built_cache_entries: int = Field(default=10_000, ge=1)


@dataclass(slots=True, frozen=True)
class BuiltContext:
    """What the LLM receives as history: `(role, author, text)` turns, oldest first."""

    turns: tuple[tuple[str, str, str], ...]
    digest: str
    version: int


@dataclass(slots=True)
class _Conversation:
    turns: deque[tuple[str, str, str, float]] = field(default_factory=deque)
    chars: int = 0
    version: int = 0
    last_active: float = 0.0


class ContextStats(ServiceStats):
    conversations: int
    turns: int
    chars: int
    built_hits: int
    built_misses: int


def conversation_key(scope: str, user: str) -> str:
    return f"{scope}\x1f{user}"


class ContextStore(Service):
    def __init__(
        self,
        config: ContextConfig | None = None,
        state_dir: Path | None = None,
        shard: int = 0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(clock)
        self.config = config or ContextConfig()
        self.shard = shard
        self._conversations: dict[str, _Conversation] = {}
        self._built: OrderedDict[str, BuiltContext] = OrderedDict()
        self.built_hits = self.built_misses = 0

    async def append(self, scope: str, user: str, turns: list[Turn]) -> int:
        """Add turns to the (scope, user) conversation; returns its new version."""
        self._ensure_maintenance()
        key = conversation_key(scope, user)
        conv = self._conversations.setdefault(key, _Conversation())
        for t in turns:
            conv.turns.append((t.role, t.author, t.text, t.time))
            conv.chars += len(t.text)
        while conv.turns and (len(conv.turns) > self.config.max_turns or conv.chars > self.config.max_chars):
            conv.chars -= len(conv.turns.popleft()[2])
        conv.version += 1
        conv.last_active = self.clock()
        self._built.pop(key, None)
        return conv.version

    async def build(self, scope: str, user: str) -> BuiltContext:
        self._ensure_maintenance()
        key = conversation_key(scope, user)
        conv = self._conversations.get(key)
        version = conv.version if conv else 0
        cached = self._built.get(key)
        if cached is not None and cached.version == version:
            self._built.move_to_end(key)
            self.built_hits += 1
            return cached
        self.built_misses += 1
        turns = tuple((r, a, t) for r, a, t, _ in conv.turns) if conv else ()
        h = hashlib.blake2b(digest_size=16)
        for role, author, text in turns:
            h.update(f"{role}\x1f{author}\x1f{text}\x1e".encode())
        built = BuiltContext(turns, h.hexdigest(), version)
        self._built[key] = built
        if len(self._built) > self.config.built_cache_entries:
            self._built.popitem(last=False)
        return built

    async def reset(self, scope: str, user: str) -> bool:
        key = conversation_key(scope, user)
        self._built.pop(key, None)
        return self._conversations.pop(key, None) is not None

    async def forget(self, user: str) -> int:
        doomed = [k for k in self._conversations if k.endswith(f"\x1f{user}")]
        for k in doomed:
            del self._conversations[k]
            self._built.pop(k, None)
        return len(doomed)

    async def stats(self) -> ContextStats:
        return ContextStats(
            service="context",
            shard=self.shard,
            conversations=len(self._conversations),
            turns=sum(len(c.turns) for c in self._conversations.values()),
            chars=sum(c.chars for c in self._conversations.values()),
            built_hits=self.built_hits,
            built_misses=self.built_misses,
        )


class ContextClient(ShardedClient):
    async def append(self, scope: str, user: str, turns: list[Turn]) -> int:
        key = conversation_key(scope, user)
        return await self._call(self.handle_for(key), "append", scope, user, turns)  # type: ignore[return-value]

    async def build(self, scope: str, user: str) -> BuiltContext:
        key = conversation_key(scope, user)
        return await self._call(self.handle_for(key), "build", scope, user)  # type: ignore[return-value]

    async def reset(self, scope: str, user: str) -> bool:
        key = conversation_key(scope, user)
        return await self._call(self.handle_for(key), "reset", scope, user)  # type: ignore[return-value]

    async def forget(self, user: str) -> int:
        return sum(await self._call_all("forget", user))  # type: ignore[arg-type]

    async def stats(self) -> list[ContextStats]:
        return await self._call_all("stats")  # type: ignore[return-value]
