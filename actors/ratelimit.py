"""RateLimiter: exact per-user (and per-server) limits over minute, hour and day windows.

Every key counts its allowed requests in a bucketed sliding window per window length;
an allowed decision is returned only after its new state is group-committed to SQLite
(or PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from array import array
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

from actors import metrics
from actors.base import Clock, Service, ShardedClient
from actors.errors import ServiceUnavailable
from actors.schemas import MessageKind, RateDecision, ServiceStats, WindowUsage
from actors.sharding import shard_index
from actors.state import StateLocation, StateOpener, needs_state
from storage import ratelimit_db
from storage.postgres import PgTarget
from storage.ratelimit_db import RateLimitDB
from storage.sqlite import BatchCommitter, Statement, SyncMode

US = 1_000_000
#: the user windows; the server limit has one window of a minute
USER_WINDOWS: tuple[tuple[str, int], ...] = (("minute", 60), ("hour", 3600), ("day", 86400))
SERVER_WINDOWS: tuple[tuple[str, int], ...] = (("server_minute", 60),)
KINDS: tuple[MessageKind, ...] = ("message", "command")
#: one uint32 per bucket: counts never exceed a limit, and limits stay under 2**31
_COUNT_CODE = "I" if array("I").itemsize == 4 else "L"
_LIMIT_MAX = 2**31 - 1


class WindowLimits(BaseModel):
    minute: int = Field(default=10, ge=1, le=_LIMIT_MAX)
    hour: int = Field(default=100, ge=1, le=_LIMIT_MAX)
    day: int = Field(default=500, ge=1, le=_LIMIT_MAX)


class RateLimitConfig(BaseModel):
    shards: int = Field(default=1, ge=1)
    message: WindowLimits = WindowLimits()
    command: WindowLimits = WindowLimits(minute=20, hour=200, day=1000)
    #: requests (messages and commands) per minute across a whole server; None turns it off
    server_per_minute: int | None = Field(default=None, ge=1, le=_LIMIT_MAX)
    #: sub-buckets per window: more admits closer to the ideal sliding log (a request can
    #: be held back at most one bucket, window/buckets, longer) at 4 bytes each per key
    buckets: int = Field(default=20, ge=1, le=1000)
    #: how long a group commit waits for more checks to join it (fewer commits under load)
    commit_delay_ms: float = Field(default=1.0, ge=0, le=100)
    #: when a decision reaches the disk (storage.sqlite.SYNC_MODES): NORMAL survives any
    #: death of the actor's process and loses at most the last durability interval to a
    #: power loss, at most one sync per interval; FULL syncs every group commit
    synchronous: SyncMode = "NORMAL"

    @field_validator("buckets")
    @classmethod
    def _whole_microsecond_buckets(cls, value: int) -> int:
        # bucket edges must be whole microseconds, or bucket arithmetic would round
        if (60 * US) % value:
            raise ValueError(f"buckets must divide 60,000,000 (a minute in microseconds), got {value}")
        return value


class RateLimitStats(ServiceStats):
    checks: int
    allowed: int
    denied: int
    refunds: int
    #: live keys (a user's messages and commands are two keys, a server one)
    keys: int
    idle_dropped: int
    #: group commits (transactions) of the state file
    commits: int
    checks_per_commit: float
    #: syncs of the state file to the disk (storage.sqlite.GroupCommitter.syncs)
    syncs: int = 0
    #: commits answered and not yet synced (NORMAL: until the next durability point)
    unsynced_commits: int = 0


class _KeyState:
    """One key: the time of its last allowed request and a ring of bucket counts per window."""

    __slots__ = ("counts", "last_us")

    def __init__(self, last_us: int, counts: array[int]) -> None:
        self.last_us = last_us
        self.counts = counts


class _Layout:
    """The windows one family of keys is counted over, each cut into `k` buckets.

    A window of length T at time t counts every bucket from `t // w - k` to `t // w`
    (w = T / k): k + 1 buckets covering at least (t - T, t]. The count therefore never
    under-counts, so no request is admitted that would put more than the limit into
    any window of length T; the price is that a request can wait up to one bucket
    longer than an ideal sliding log would make it.
    """

    __slots__ = ("k", "names", "size", "slots", "states", "widths")

    def __init__(self, windows: tuple[tuple[str, int], ...], buckets: int) -> None:
        self.names = tuple(name for name, _ in windows)
        self.k = buckets
        self.slots = buckets + 1
        self.widths = tuple(seconds * US // buckets for _, seconds in windows)
        self.size = self.slots * len(windows)
        #: ordered by last allowed request, so the idle keys are always at the front
        self.states: OrderedDict[str, _KeyState] = OrderedDict()

    def new_state(self, now_us: int) -> _KeyState:
        return _KeyState(now_us, array(_COUNT_CODE, bytes(4 * self.size)))

    def count(self, state: _KeyState, j: int, now_us: int) -> int:
        """Requests in window `j` at `now_us` (>= the state's last request)."""
        w = self.widths[j]
        head = state.last_us // w
        low = max(now_us // w - self.k, head - self.k)
        if low > head:
            return 0
        base = j * self.slots
        start, end = low % self.slots, head % self.slots
        counts = state.counts
        if start <= end:
            return sum(counts[base + start : base + end + 1])
        return sum(counts[base + start : base + self.slots]) + sum(counts[base : base + end + 1])

    def wait_us(self, state: _KeyState, j: int, now_us: int, need: int) -> int:
        """Microseconds from `now_us` until `need` requests have left window `j`."""
        w = self.widths[j]
        head = state.last_us // w
        base = j * self.slots
        dropped = 0
        for bucket in range(max(max(now_us, state.last_us) // w - self.k, head - self.k), head + 1):
            dropped += state.counts[base + bucket % self.slots]
            if dropped >= need:
                # the bucket leaves the window once t // w passes bucket + k
                return (bucket + self.k + 1) * w - now_us
        raise AssertionError("need exceeds the window's count")

    def record(self, state: _KeyState, now_us: int) -> None:
        """Count one request at `now_us` (>= the state's last request)."""
        counts = state.counts
        for j, w in enumerate(self.widths):
            base = j * self.slots
            head, bucket = state.last_us // w, now_us // w
            # buckets between the old head and the new one start empty
            for stale in range(head + 1, min(bucket, head + self.slots) + 1):
                counts[base + stale % self.slots] = 0
            counts[base + bucket % self.slots] += 1
        state.last_us = now_us

    def refund(self, state: _KeyState, at_us: int) -> bool:
        """Take back one request counted at `at_us`, if its buckets are still held."""
        changed = False
        for j, w in enumerate(self.widths):
            bucket, head = at_us // w, state.last_us // w
            slot = j * self.slots + bucket % self.slots
            if head - self.k <= bucket <= head and state.counts[slot] > 0:
                state.counts[slot] -= 1
                changed = True
        return changed

    def expires_us(self, state: _KeyState) -> int:
        """When every window has drained (nothing is counted after the last request)."""
        return max((state.last_us // w + self.k + 1) * w for w in self.widths)

    def fold(self, counts: array[int], last_us: int) -> _KeyState:
        """A state of this layout from counts of another bucket count: each window's total
        is put in the bucket of the last request, which over-counts and so stays safe."""
        windows = len(self.widths)
        old_slots = len(counts) // windows
        state = self.new_state(last_us)
        for j, w in enumerate(self.widths):
            total = sum(counts[j * old_slots : (j + 1) * old_slots])
            state.counts[j * self.slots + (last_us // w) % self.slots] = total
        return state

    def statement(self, key: str, state: _KeyState) -> Statement:
        return ratelimit_db.upsert(key, state.last_us, self.expires_us(state), state.counts.tobytes())


def _user_key(user: str, kind: MessageKind) -> str:
    return f"{kind[0]}:{user}"


def server_key(server: str) -> str:
    """The routing key of a server's counter: it lives on the shard owning this key."""
    return f"server:{server}"


class RateLimiter(Service):
    def __init__(
        self,
        config: RateLimitConfig | None = None,
        state_dir: StateLocation | None = None,
        shard: int = 0,
        clock: Clock | None = None,
    ) -> None:
        """`state_dir`: the directory of the shard's SQLite file, a `PgTarget`, or None
        (an in-memory SQLite database: nothing survives the process).

        Raises:
            SchemaTooNew: the stored schema was written by a newer raycord.
        """
        super().__init__(clock)
        self.shard = shard
        given = config or RateLimitConfig()
        self._base_json = given.model_dump_json()
        self._apply_config(given)
        self.checks = self.allowed = self.denied = self.refunds = self.idle_dropped = 0
        #: keys whose memory state differs from what is stored (a commit of theirs failed)
        self._unsaved: set[tuple[_Layout, str]] = set()
        location = state_dir if isinstance(state_dir, PgTarget) or state_dir is None else Path(state_dir)
        self._state = StateOpener(lambda: self._open_state(location, given), f"rate-limit shard {shard}")
        with contextlib.suppress(ServiceUnavailable):
            # the database is down: the actor answers "restarting" and retries the open
            self._state.get()
        tags = ("shard",)
        self._tags = {"shard": str(shard)}
        self._metric_counters = {
            name: metrics.counter(f"ratelimit_{name}", f"rate-limit {name}", tags)
            for name in ("checks", "allowed", "denied")
        }
        self._reported = dict.fromkeys(self._metric_counters, 0)
        self._gauges = {
            name: metrics.gauge(f"ratelimit_{name}", description, tags)
            for name, description in (
                ("keys", "rate-limit keys in memory"),
                ("commits", "rate-limit group commits"),
                ("syncs", "rate-limit state-file syncs"),
                ("checks_per_commit", "rate-limit checks per group commit"),
            )
        }

    def _open_state(self, location: StateLocation | None, given: RateLimitConfig) -> RateLimitDB:
        db = RateLimitDB(location, self.shard, given.synchronous)
        try:
            self._apply_config(self._stored_override(db, given))
            db.committer.max_delay = self.config.commit_delay_ms / 1000
            self._recover(db)
        except BaseException:
            db.close()
            raise
        return db

    @property
    def _committer(self) -> BatchCommitter:
        """The shard's opened state's committer (every public method has opened it first)."""
        return self._state.get().committer

    # configuration

    def _stored_override(self, db: RateLimitDB, given: RateLimitConfig) -> RateLimitConfig:
        """A live `reconfigure` survives restarts of this actor, until the deployment's
        own config changes (then the new config file is what the operator means)."""
        raw = db.get_meta("override")
        if raw is None:
            return given
        stored = json.loads(raw)
        if stored["base"] != self._base_json:
            return given
        return RateLimitConfig.model_validate_json(stored["config"])

    def _apply_config(self, config: RateLimitConfig) -> None:
        self.config = config
        self._limits: dict[str, tuple[int, ...]] = {
            kind: (limits.minute, limits.hour, limits.day)
            for kind, limits in (("message", config.message), ("command", config.command))
        }
        old = getattr(self, "_layouts", None)
        if old is not None and old[0].k == config.buckets:
            return
        self._user = _Layout(USER_WINDOWS, config.buckets)
        self._server = _Layout(SERVER_WINDOWS, config.buckets)
        self._layouts = (self._user, self._server)
        if old is not None:
            for before, after in zip(old, self._layouts, strict=True):
                for key, state in before.states.items():
                    after.states[key] = after.fold(state.counts, state.last_us)

    @needs_state
    async def reconfigure(self, config: RateLimitConfig | dict[str, Any]) -> RateLimitConfig:
        """Change limits (or buckets, commit delay) live, keeping every key's counts.

        Raises:
            ValueError: the config is invalid or changes the shards or the sync mode.
        """
        new = config if isinstance(config, RateLimitConfig) else RateLimitConfig.model_validate(config)
        for fixed in ("shards", "synchronous"):
            if getattr(new, fixed) != getattr(self.config, fixed):
                raise ValueError(f"{fixed} cannot change while running; it takes effect on a restart")
        self._apply_config(new)
        self._committer.max_delay = new.commit_delay_ms / 1000
        override = json.dumps({"base": self._base_json, "config": new.model_dump_json()})
        await self._committer.write([ratelimit_db.set_meta("override", override)])
        return new

    # state

    def _recover(self, db: RateLimitDB) -> None:
        for key, last_us, blob in db.load_live(self._now_us()):
            layout = self._server if key.startswith("s:") else self._user
            counts = array(_COUNT_CODE)
            counts.frombytes(blob)
            if len(counts) == layout.size:
                layout.states[key] = _KeyState(last_us, counts)
            else:
                layout.states[key] = layout.fold(counts, last_us)

    def _now_us(self) -> int:
        return round(self.clock() * US)

    def _targets(
        self, user: str | None, kind: MessageKind, server: str | None
    ) -> list[tuple[_Layout, str, tuple[int, ...]]]:
        """(layout, key, limit per window) of every counter a request is checked against."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        shards = self.config.shards
        targets = []
        if user is not None:
            if not user:
                raise ValueError("user must be a non-empty string")
            if shard_index(user, shards) != self.shard:
                raise ValueError(f"user {user!r} belongs to shard {shard_index(user, shards)}")
            targets.append((self._user, _user_key(user, kind), self._limits[kind]))
        if server is not None and self.config.server_per_minute is not None:
            if not server:
                raise ValueError("server must be a non-empty string")
            owner = shard_index(server_key(server), shards)
            if owner != self.shard:
                raise ValueError(f"server {server!r} belongs to shard {owner}")
            targets.append((self._server, f"s:{server}", (self.config.server_per_minute,)))
        return targets

    def _decide(
        self, targets: list[tuple[_Layout, str, tuple[int, ...]]], now_us: int
    ) -> tuple[RateDecision, list[Statement]]:
        """Decide and, when allowed, count: synchronous, so no check interleaves with it."""
        remaining: dict[str, int] = {}
        wait_us, window, limit_hit = -1, "", 0
        states: list[_KeyState | None] = []
        for layout, key, limits in targets:
            state = layout.states.get(key)
            states.append(state)
            for j, name in enumerate(layout.names):
                limit = limits[j]
                count = 0 if state is None else layout.count(state, j, max(now_us, state.last_us))
                if count < limit:
                    remaining[name] = limit - count - 1
                    continue
                remaining[name] = 0
                assert state is not None
                wait = layout.wait_us(state, j, now_us, count + 1 - limit)
                if wait > wait_us:
                    wait_us, window, limit_hit = wait, name, limit
        if wait_us >= 0:
            return RateDecision(
                allowed=False, remaining=remaining, retry_after=wait_us / US, window=window, limit=limit_hit
            ), []
        statements = []
        for (layout, key, _), found in zip(targets, states, strict=True):
            if found is None:
                state = layout.states[key] = layout.new_state(now_us)
            else:
                state = found
                layout.states.move_to_end(key)
            layout.record(state, max(now_us, state.last_us))
            statements.append(layout.statement(key, state))
        return RateDecision(allowed=True, remaining=remaining), statements

    @needs_state
    async def check_part(
        self, user: str | None, kind: MessageKind = "message", server: str | None = None
    ) -> tuple[RateDecision, int]:
        """`check` over the counters given (a user's, a server's or both) that this shard owns;
        also returns the decision's time, which `refund` needs to take it back.

        Raises:
            ValueError: bad kind, empty id, or a key another shard owns.
        """
        self._ensure_maintenance()
        now_us = self._now_us()
        targets = self._targets(user, kind, server)
        decision, statements = self._decide(targets, now_us)
        self.checks += 1
        if decision.allowed:
            self.allowed += 1
        else:
            self.denied += 1
        if statements:
            # a denial changes nothing, so only an allowance waits for the disk
            try:
                await self._committer.write(statements)
            except Exception:
                # the caller is told the check failed: it must not count, now or when retried
                self._take_back(targets, now_us)
                raise
        return decision, now_us

    def _take_back(self, targets: list[tuple[_Layout, str, tuple[int, ...]]], at_us: int) -> None:
        """Uncount a decision whose commit failed. A later commit may have stored the count
        already (its statement was built first): the key is rewritten by the next flush."""
        self.allowed -= 1
        for layout, key, _ in targets:
            state = layout.states.get(key)
            if state is not None and layout.refund(state, at_us):
                self._unsaved.add((layout, key))

    def _unsaved_statements(self) -> list[Statement]:
        statements = []
        for layout, key in self._unsaved:
            state = layout.states.get(key)
            statements.append(ratelimit_db.delete(key) if state is None else layout.statement(key, state))
        return statements

    async def flush(self) -> None:
        """Store the keys whose last commit failed, as memory holds them."""
        if not self._unsaved:
            # nothing to write, so nothing to wait for, even with the database down
            return
        unsaved, statements = set(self._unsaved), self._unsaved_statements()
        if statements:
            await self._committer.write(statements)
            self._unsaved -= unsaved

    @needs_state
    async def check(
        self, user: str, kind: MessageKind = "message", server: str | None = None
    ) -> RateDecision:
        """Decide whether `user` may send one `kind` request (in `server`) now, and count it.

        An allowed decision is durable when it is returned. The server limit is checked
        here too, so the server must live on this shard (always true with one shard).

        Raises:
            ValueError: bad kind, empty id, or a key another shard owns.
        """
        decision, _ = await self.check_part(user, kind, server)
        return decision

    @needs_state
    async def usage(self, user: str | None, server: str | None = None) -> list[WindowUsage]:
        """The budgets of `user` (messages and commands) and of `server`, each of those this
        shard owns: used, left and when each window frees. Counts nothing.

        Raises:
            ValueError: empty id, or a key another shard owns.
        """
        now_us = self._now_us()
        report: list[WindowUsage] = []
        labelled = [("message", t) for t in self._targets(user, "message", None)]
        labelled += [("command", t) for t in self._targets(user, "command", None)]
        labelled += [("server", t) for t in self._targets(None, "message", server)]
        for kind, (layout, key, limits) in labelled:
            state = layout.states.get(key)
            for j, name in enumerate(layout.names):
                used = 0 if state is None else layout.count(state, j, max(now_us, state.last_us))
                frees_us = 0 if state is None or used == 0 else layout.wait_us(state, j, now_us, 1)
                report.append(
                    WindowUsage(
                        kind=kind,
                        window=name.removeprefix("server_"),
                        limit=limits[j],
                        used=min(used, limits[j]),
                        left=max(limits[j] - used, 0),
                        frees_in=max(frees_us, 0) / US,
                    )
                )
        return report

    @needs_state
    async def refund(self, user: str | None, kind: MessageKind, server: str | None, at_us: int) -> bool:
        """Take back a request allowed at `at_us` by `check_part` (the other shard denied it)."""
        statements = []
        for layout, key, _ in self._targets(user, kind, server):
            state = layout.states.get(key)
            if state is not None and layout.refund(state, at_us):
                statements.append(layout.statement(key, state))
        if statements:
            self.refunds += 1
            await self._committer.write(statements)
        return bool(statements)

    @needs_state
    async def reset(self, user: str) -> int:
        """Forget every count of `user` (messages and commands); returns the keys removed."""
        statements = []
        for kind in KINDS:
            key = _user_key(user, kind)
            if self._user.states.pop(key, None) is not None:
                statements.append(ratelimit_db.delete(key))
        if statements:
            await self._committer.write(statements)
        return len(statements)

    async def maintain(self) -> None:
        """Drop drained keys from memory and disk (oldest first, so cost follows what goes)."""
        if not self._state.try_open():
            # the database is down: the open was retried (or is not due yet), and logged
            return
        now_us = self._now_us()
        statements = []
        for layout in self._layouts:
            states = layout.states
            while states:
                key, state = next(iter(states.items()))
                if layout.expires_us(state) > now_us:
                    break
                del states[key]
                statements.append(ratelimit_db.delete(key))
        self.idle_dropped += len(statements)
        self._export_metrics()
        if statements:
            await self._committer.write(statements)
        await self.flush()

    def _export_metrics(self) -> None:
        stats = self._stats()
        for name, counter in self._metric_counters.items():
            value = getattr(self, name)
            if value > self._reported[name]:
                counter.inc(value - self._reported[name], tags=self._tags)
                self._reported[name] = value
        for name, gauge in self._gauges.items():
            gauge.set(getattr(stats, name), tags=self._tags)

    def _stats(self) -> RateLimitStats:
        db = self._state.opened
        commits = 0 if db is None else db.committer.commits
        return RateLimitStats(
            service="ratelimit",
            shard=self.shard,
            checks=self.checks,
            allowed=self.allowed,
            denied=self.denied,
            refunds=self.refunds,
            keys=sum(len(layout.states) for layout in self._layouts),
            idle_dropped=self.idle_dropped,
            commits=commits,
            checks_per_commit=self.checks / commits if commits else 0.0,
            syncs=0 if db is None else db.committer.syncs,
            unsynced_commits=0 if db is None else db.committer.unsynced,
        )

    async def stats(self) -> RateLimitStats:
        return self._stats()

    @needs_state
    async def synced(self) -> None:
        """Return once every decision answered so far is on disk (the next durability point)."""
        await self._committer.synced()

    async def close(self) -> None:
        await super().close()
        db = self._state.opened
        if db is not None:
            db.close()


def _merge(first: RateDecision, second: RateDecision) -> RateDecision:
    remaining = {**first.remaining, **second.remaining}
    if first.allowed and second.allowed:
        return RateDecision(allowed=True, remaining=remaining)
    denied = [d for d in (first, second) if not d.allowed]
    worst = max(denied, key=lambda d: d.retry_after)
    return worst.model_copy(update={"remaining": remaining})


class RateLimitClient(ShardedClient):
    #: one batch of checks in flight: every check that arrives meanwhile joins the next
    #: batch, so each group commit covers all waiting callers, not half of them
    default_max_in_flight = 1

    async def check(
        self, user: str, kind: MessageKind = "message", server: str | None = None
    ) -> RateDecision:
        """One round trip when the user's and the server's counters share a shard.

        Otherwise both shards check at once; when one denies, what the other counted is
        refunded, so a denial costs neither budget. Until the refund lands the other
        counter over-counts by one, which errs on the safe side.

        Raises:
            ServiceUnavailable: a shard died mid-call; the check may be retried.
        """
        mine = self.handle_for(user)
        theirs = mine if server is None else self.handle_for(server_key(server))
        if theirs is mine:
            return await self._batched(mine, RateLimiter.check, user, kind, server)
        (for_user, user_at), (for_server, server_at) = await asyncio.gather(
            self._batched(mine, RateLimiter.check_part, user, kind, None),
            self._batched(theirs, RateLimiter.check_part, None, kind, server),
        )
        if for_user.allowed != for_server.allowed:
            if for_user.allowed:
                await self._call(mine, RateLimiter.refund, user, kind, None, user_at)
            else:
                await self._call(theirs, RateLimiter.refund, None, kind, server, server_at)
        return _merge(for_user, for_server)

    async def usage(self, user: str, server: str | None = None) -> list[WindowUsage]:
        """The user's budgets (and the server's), without counting a request."""
        mine = self.handle_for(user)
        theirs = mine if server is None else self.handle_for(server_key(server))
        if theirs is mine:
            return await self._call(mine, RateLimiter.usage, user, server)
        parts = await asyncio.gather(
            self._call(mine, RateLimiter.usage, user, None),
            self._call(theirs, RateLimiter.usage, None, server),
        )
        return [u for part in parts for u in part]

    async def stats(self) -> list[RateLimitStats]:
        return await self._call_all(RateLimiter.stats)
