"""The optimization plan's starting point, kept only as a comparison point.

Everything in one process, as the plan's TypeScript bot was: an array-based LRU
(linear scans), rate-limit state rewritten to a JSON file on every check, one database
insert per analytics event, and sequential awaits on the reply path.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from actors.cache import cache_key
from actors.errors import InputRejected, RateLimited
from actors.schemas import ChatReply, IncomingMessage
from bot.llm.base import LLM, LLMRequest


class ArrayLRU:
    """The plan's cache: a dict of entries plus an access-order array scanned on every use."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.entries: dict[str, str] = {}
        self.access_order: list[str] = []

    def _touch(self, key: str) -> None:
        if key in self.access_order:
            self.access_order.remove(key)  # indexOf + splice: O(n)
        self.access_order.append(key)

    def get(self, key: str) -> str | None:
        value = self.entries.get(key)
        if value is not None:
            self._touch(key)
        return value

    def set(self, key: str, value: str) -> None:
        if key not in self.entries and len(self.entries) >= self.max_entries:
            oldest = self.access_order.pop(0)  # shift: O(n)
            del self.entries[oldest]
        self.entries[key] = value
        self._touch(key)


class JsonFileLimiter:
    """The plan's limiter: timestamps per user in a JSON file rewritten on every check."""

    def __init__(self, path: Path, per_minute: int, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.per_minute = per_minute
        self.clock = clock
        self.file_writes = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text("{}")

    def check(self, user: str) -> tuple[bool, float]:
        state: dict[str, list[float]] = json.loads(self.path.read_text())
        now = self.clock()
        stamps = [t for t in state.get(user, []) if t > now - 60]
        allowed = len(stamps) < self.per_minute
        if allowed:
            stamps.append(now)
        state[user] = stamps
        with open(self.path, "w") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        self.file_writes += 1
        return allowed, 0.0 if allowed else stamps[0] + 60 - now


class RowPerEventAnalytics:
    """One INSERT (one transaction) per event."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = duckdb.connect(str(path))
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS events "
            "(user_id VARCHAR, type VARCHAR, latency_ms DOUBLE, cache_hit BOOLEAN)"
        ).fetchall()
        self.db_writes = 0

    def insert(self, user: str, type_: str, latency_ms: float, cache_hit: bool) -> None:
        self.conn.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?)", [user, type_, latency_ms, cache_hit]
        ).fetchall()
        self.db_writes += 1

    def close(self) -> None:
        self.conn.close()


class NaivePipeline:
    """Sequential awaits, every write on the reply path, a 5-minute TTL context cache."""

    def __init__(
        self,
        state_dir: Path,
        llm: LLM,
        per_minute: int = 10_000,
        max_entries: int = 10_000,
        max_chars: int = 4000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.llm = llm
        self.model = getattr(llm, "name", "model")
        self.cache = ArrayLRU(max_entries)
        self.limiter = JsonFileLimiter(state_dir / "naive-ratelimit.json", per_minute, clock)
        self.analytics = RowPerEventAnalytics(state_dir / "naive-analytics.duckdb")
        self.histories: dict[str, list[tuple[str, str, str]]] = {}
        self.context_cache: dict[str, tuple[float, tuple[tuple[str, str, str], ...]]] = {}
        self.max_chars = max_chars
        self.clock = clock

    async def _check(self, user: str) -> tuple[bool, float]:
        return self.limiter.check(user)

    async def _context(self, key: str) -> tuple[tuple[str, str, str], ...]:
        cached = self.context_cache.get(key)
        if cached and cached[0] > self.clock():
            return cached[1]  # may be stale: the plan's 5-minute TTL
        built = tuple(self.histories.get(key, [])[-20:])
        self.context_cache[key] = (self.clock() + 300, built)
        return built

    async def handle(self, msg: IncomingMessage, on_chunk: Any = None) -> ChatReply:
        started = self.clock()
        if not msg.text.strip() or len(msg.text) > self.max_chars:
            raise InputRejected("bad length")
        allowed, retry = await self._check(msg.user_id)
        if not allowed:
            raise RateLimited(retry, "minute")
        conv = f"{msg.scope}:{msg.user_id}"
        history = () if msg.stateless else await self._context(conv)
        scope = f"server:{msg.server_id}" if msg.cache_scope == "server" else f"user:{msg.user_id}"
        key = cache_key(self.model, "1", scope, msg.text, str(hash(history)))
        cached = self.cache.get(key)
        llm_ms = 0.0
        if cached is None:
            t = self.clock()
            result = await self.llm.generate(LLMRequest(prompt=msg.text, model=self.model, history=history))
            llm_ms = (self.clock() - t) * 1000
            text = result.text
            self.cache.set(key, text)
        else:
            text = cached
        if not msg.stateless:
            self.histories.setdefault(conv, []).extend(
                [("user", msg.user_id, msg.text), ("model", "raycord", text)]
            )
        latency_ms = (self.clock() - started) * 1000
        self.analytics.insert(msg.user_id, msg.kind, latency_ms, cached is not None)
        return ChatReply(
            text=text, model=self.model, cached=cached is not None, latency_ms=latency_ms, llm_ms=llm_ms
        )

    @property
    def db_writes(self) -> int:
        return self.analytics.db_writes

    @property
    def file_writes(self) -> int:
        return self.limiter.file_writes

    def close(self) -> None:
        self.analytics.close()
