"""RateLimiter: exactness against a reference sliding log, retry_after, budgets, the server
limit across shards, durability across a hard kill of the actor, idle-key cleanup, reset."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from actors.errors import ServiceUnavailable
from actors.ratelimit import (
    SERVER_WINDOWS,
    USER_WINDOWS,
    RateLimitClient,
    RateLimitConfig,
    RateLimiter,
    WindowLimits,
    server_key,
)
from actors.schemas import MessageKind, RateDecision
from actors.sharding import shard_index
from bot.runtime import SERVICES, service_handles
from storage.sqlite import DURABILITY_INTERVAL
from tests.conftest import FakeClock, StateBackend, both_backends, make_settings

US = 1_000_000
BASE = 1_700_000_000.0


class TraceClock(FakeClock):
    """A clock set in whole microseconds from a fixed base, so the test knows exact times."""

    def __init__(self) -> None:
        super().__init__(BASE)
        self.us = 0

    def set_us(self, us: int) -> None:
        self.us = us
        self.now = BASE + us / US


def violations(times: list[int], window_us: int, limit: int) -> int:
    """How many allowed requests had more than `limit` allowed ones in the window ending at them."""
    bad, low = 0, 0
    for high, t in enumerate(times):
        while times[low] <= t - window_us:
            low += 1
        if high - low + 1 > limit:
            bad += 1
    return bad


def ideal_admitted(times: list[int], window_us: int, limit: int) -> int:
    """What an ideal sliding log would admit of the same requests (one window)."""
    admitted: list[int] = []
    low = 0
    for t in times:
        while low < len(admitted) and admitted[low] <= t - window_us:
            low += 1
        if len(admitted) - low < limit:
            admitted.append(t)
    return len(admitted)


requests = st.lists(
    st.tuples(
        # gaps from back-to-back up to ten minutes, in microseconds
        st.one_of(st.integers(0, 2_000_000), st.integers(0, 600 * US)),
        st.sampled_from(["u1", "u2"]),
        st.sampled_from(["message", "command"]),
        st.sampled_from([None, "s1"]),
    ),
    min_size=1,
    max_size=120,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trace=requests, buckets=st.sampled_from([1, 3, 10, 20, 60]))
@pytest.mark.asyncio
async def test_no_window_ever_holds_more_than_the_limit_and_retry_after_is_exact(
    trace: list[tuple[int, str, MessageKind, str | None]], buckets: int
) -> None:
    config = RateLimitConfig(
        message=WindowLimits(minute=3, hour=6, day=9),
        command=WindowLimits(minute=2, hour=4, day=12),
        server_per_minute=4,
        buckets=buckets,
    )
    clock = TraceClock()
    limiter = RateLimiter(config, clock=clock)
    allowed: dict[str, list[int]] = {}
    offered: dict[str, list[int]] = {}
    now = 0

    async def check(user: str, kind: MessageKind, server: str | None) -> Any:
        clock.set_us(now)
        decision = await limiter.check(user, kind, server)
        if decision.allowed:
            allowed.setdefault(f"{user}:{kind}", []).append(now)
            if server is not None:
                allowed.setdefault(server, []).append(now)
        return decision

    for gap, user, kind, server in trace:
        now += gap
        offered.setdefault(f"{user}:{kind}", []).append(now)
        decision = await check(user, kind, server)
        if decision.allowed:
            continue
        retry_us = round(decision.retry_after * US)
        assert retry_us > 0
        start = now
        now = start + retry_us - 1
        assert not (await check(user, kind, server)).allowed, "allowed before retry_after"
        now = start + retry_us
        assert (await check(user, kind, server)).allowed, "still denied at retry_after"

    for key, times in allowed.items():
        if key == "s1":
            assert violations(times, SERVER_WINDOWS[0][1] * US, 4) == 0
            continue
        limits = config.message if key.endswith(":message") else config.command
        for name, seconds in USER_WINDOWS:
            assert violations(times, seconds * US, getattr(limits, name)) == 0, (key, name)
    # how close to the ideal: share of what a sliding log (minute window only) would admit
    for key, times in offered.items():
        if key.endswith(":message"):
            ideal = ideal_admitted(times, 60 * US, 3)
            event(f"buckets={buckets}: admitted/ideal >= 0.9: {len(allowed.get(key, [])) >= 0.9 * ideal}")
    await limiter.close()


@pytest.mark.asyncio
async def test_retry_after_names_the_window_and_the_wait_follows_the_buckets(clock: FakeClock) -> None:
    # 20 buckets: a minute bucket is 3 s; a request at 10 s leaves the window when t // 3 > 3 + 20
    clock.now = 0.0
    limiter = RateLimiter(RateLimitConfig(message=WindowLimits(minute=2, hour=10, day=10)), clock=clock)
    clock.now = 1.0
    assert (await limiter.check("u")).allowed
    clock.now = 10.0
    ok = await limiter.check("u")
    assert ok.allowed and ok.remaining == {"minute": 0, "hour": 8, "day": 8}
    denied = await limiter.check("u")
    assert not denied.allowed and denied.window == "minute" and denied.limit == 2
    # the first request sits in bucket 0, counted until t // 3 reaches 21: t = 63 s
    assert denied.retry_after == pytest.approx(53.0)
    assert denied.remaining["minute"] == 0
    await limiter.close()


@pytest.mark.asyncio
async def test_message_and_command_budgets_are_independent(clock: FakeClock) -> None:
    limits = WindowLimits(minute=1, hour=5, day=5)
    limiter = RateLimiter(RateLimitConfig(message=limits, command=limits), clock=clock)
    assert (await limiter.check("u", "message")).allowed
    assert not (await limiter.check("u", "message")).allowed
    assert (await limiter.check("u", "command")).allowed
    assert not (await limiter.check("u", "command")).allowed
    assert (await limiter.check("other", "message")).allowed
    await limiter.close()


@pytest.mark.asyncio
async def test_the_server_limit_is_shared_by_its_users_and_a_denial_costs_nothing(clock: FakeClock) -> None:
    config = RateLimitConfig(message=WindowLimits(minute=2, hour=9, day=9), server_per_minute=3)
    limiter = RateLimiter(config, clock=clock)
    for user in ("a", "b", "c"):
        assert (await limiter.check(user, "message", "s1")).allowed
    denied = await limiter.check("d", "message", "s1")
    assert not denied.allowed and denied.window == "server_minute"
    # d's own budget was not spent by the denied request
    assert (await limiter.check("d", "message", "s2")).remaining["minute"] == 1
    # a user's own denial does not spend the server's budget
    assert (await limiter.check("d", "message", "s3")).allowed
    assert not (await limiter.check("d", "message", "s3")).allowed
    assert (await limiter.check("e", "message", "s3")).remaining["server_minute"] == 1
    await limiter.close()


@pytest.mark.asyncio
async def test_usage_reports_every_budget_and_costs_nothing(clock: FakeClock) -> None:
    config = RateLimitConfig(
        message=WindowLimits(minute=2, hour=9, day=9),
        command=WindowLimits(minute=3, hour=9, day=9),
        server_per_minute=5,
    )
    limiter = RateLimiter(config, clock=clock)
    assert (await limiter.check("u", "message", "s1")).allowed
    clock.advance(10)
    before = await limiter.usage("u", "s1")
    assert await limiter.usage("u", "s1") == before, "reading the budget spends none of it"
    by_window = {(u.kind, u.window): u for u in before}
    minute = by_window["message", "minute"]
    assert (minute.limit, minute.used, minute.left) == (2, 1, 1)
    # the request counted 10 s ago leaves the minute window within a bucket (3 s) of 50 s
    assert 50 <= minute.frees_in <= 53
    assert (by_window["command", "minute"].used, by_window["command", "minute"].frees_in) == (0, 0)
    assert (by_window["server", "minute"].limit, by_window["server", "minute"].left) == (5, 4)
    assert {kind for kind, _ in by_window} == {"message", "command", "server"}
    assert (await limiter.check("u", "message", "s1")).remaining["minute"] == 0
    await limiter.close()


@pytest.mark.asyncio
async def test_bad_input_is_refused_and_changes_nothing(clock: FakeClock) -> None:
    limiter = RateLimiter(RateLimitConfig(message=WindowLimits(minute=1, hour=5, day=5)), clock=clock)
    with pytest.raises(ValueError, match="kind"):
        await limiter.check("u", "shout")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        await limiter.check("")
    with pytest.raises(ValueError, match="divide"):
        RateLimitConfig(buckets=7)
    assert (await limiter.check("u")).allowed
    assert (await limiter.stats()).keys == 1
    await limiter.close()


@both_backends
@pytest.mark.asyncio
async def test_concurrent_checks_share_group_commits_and_survive_a_restart(
    backend: StateBackend, clock: FakeClock
) -> None:
    config = RateLimitConfig(message=WindowLimits(minute=50, hour=50, day=50))
    limiter = RateLimiter(config, backend.location, clock=clock)
    decisions = await asyncio.gather(*(limiter.check(f"u{i % 10}") for i in range(200)))
    assert sum(d.allowed for d in decisions) == 200
    stats = await limiter.stats()
    assert stats.commits < 50 and stats.checks_per_commit > 4
    await limiter.close()
    again = RateLimiter(config, backend.location, clock=clock)
    assert (await again.check("u3")).remaining["day"] == 50 - 21
    await again.close()


@both_backends
@pytest.mark.asyncio
async def test_idle_keys_are_dropped_from_memory_and_disk(backend: StateBackend, clock: FakeClock) -> None:
    limiter = RateLimiter(RateLimitConfig(server_per_minute=5), backend.location, clock=clock)
    await limiter.check("old", "message", "s1")
    clock.advance(3600)
    await limiter.check("new")
    clock.advance(86400 - 3600 + 86400 / 20)
    await limiter.maintain()
    stats = await limiter.stats()
    # the server's minute drained long ago, "old"'s day has just drained, "new"'s has not
    assert stats.keys == 1 and stats.idle_dropped == 2
    db = limiter._state.opened
    assert db is not None
    assert [r[0] for r in db.read("SELECT key FROM ratelimit_state")] == ["m:new"]
    await limiter.close()


@both_backends
@pytest.mark.asyncio
async def test_reset_gives_a_fresh_budget_that_a_restart_keeps(
    backend: StateBackend, clock: FakeClock
) -> None:
    config = RateLimitConfig(message=WindowLimits(minute=1, hour=5, day=5))
    limiter = RateLimiter(config, backend.location, clock=clock)
    await limiter.check("u")
    await limiter.check("u", "command")
    assert not (await limiter.check("u")).allowed
    assert await limiter.reset("u") == 2
    await limiter.close()
    again = RateLimiter(config, backend.location, clock=clock)
    assert (await again.check("u")).allowed
    await again.close()


@both_backends
@pytest.mark.asyncio
async def test_new_limits_apply_to_the_counts_already_kept(backend: StateBackend, clock: FakeClock) -> None:
    tight = RateLimitConfig(message=WindowLimits(minute=2, hour=5, day=5))
    limiter = RateLimiter(tight, backend.location, clock=clock)
    await limiter.check("u")
    await limiter.check("u")
    assert not (await limiter.check("u")).allowed
    loose = tight.model_copy(update={"message": WindowLimits(minute=4, hour=5, day=5)})
    await limiter.reconfigure(loose)
    assert (await limiter.check("u")).remaining["minute"] == 1
    await limiter.close()
    # the live change outlives a restart with the same deployment config
    again = RateLimiter(tight, backend.location, clock=clock)
    assert (await again.check("u")).remaining["minute"] == 0
    await again.close()
    # other buckets: counts are kept (folded into the latest bucket, never under-counted)
    finer = RateLimitConfig(message=WindowLimits(minute=4, hour=5, day=5), buckets=60)
    third = RateLimiter(finer, backend.location, clock=clock)
    assert not (await third.check("u")).allowed
    await third.close()


def _split_server(shards: int) -> tuple[str, str]:
    """A user and a server whose counters live on different shards."""
    server = "guild-1"
    owner = shard_index(server_key(server), shards)
    user = next(f"user-{i}" for i in range(100) if shard_index(f"user-{i}", shards) != owner)
    return user, server


@both_backends
@pytest.mark.asyncio
async def test_actors_enforce_a_server_limit_across_shards_and_keep_decisions_through_a_hard_kill(
    ray_session: None, tmp_path: Path, backend: StateBackend
) -> None:
    config = RateLimitConfig(
        shards=2,
        message=WindowLimits(minute=1000, hour=1000, day=1000),
        server_per_minute=3,
    )
    settings = make_settings(tmp_path, ratelimit=config, **backend.settings())
    spec = next(s for s in SERVICES if s.name == "ratelimit")
    handles = service_handles(settings, spec)
    client = RateLimitClient(handles)
    try:
        # the server limit across shards: the user's shard and the server's shard agree
        user, server = _split_server(2)
        assert [(await client.check(user, "message", server)).allowed for _ in range(4)] == [
            True,
            True,
            True,
            False,
        ]
        # the denied request was refunded on the user's shard
        assert (await client.check(user)).remaining["day"] == 1000 - 4

        victim = handles[shard_index("victim", 2)]
        pid = await victim.__ray_call__.remote(lambda actor: os.getpid())
        answered = 0
        fifty_answered = asyncio.Event()

        async def check_victim() -> RateDecision:
            nonlocal answered
            decision = await client.check("victim")
            answered += 1
            if answered >= 50:
                fifty_answered.set()
            return decision

        calls = [asyncio.ensure_future(check_victim()) for _ in range(1000)]
        await fifty_answered.wait()
        os.kill(pid, signal.SIGKILL)
        results = await asyncio.gather(*calls, return_exceptions=True)
        returned_allowed = sum(1 for r in results if not isinstance(r, BaseException) and r.allowed)
        failed = [r for r in results if isinstance(r, BaseException)]
        # the kill landed mid-stream: some checks were answered, some were cut off
        assert returned_allowed >= 50 and failed
        assert all(isinstance(r, ServiceUnavailable) for r in failed)

        for _ in range(600):
            try:
                after = await client.check("victim")
                break
            except ServiceUnavailable:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the rate limiter did not come back")
        assert await victim.__ray_call__.remote(lambda actor: os.getpid()) != pid
        counted = 1000 - 1 - after.remaining["day"]
        # every allowance returned before the kill is still counted: no fresh budget
        assert returned_allowed <= counted <= len(calls)
    finally:
        for handle in handles:
            ray.kill(handle, no_restart=True)


@pytest.mark.asyncio
async def test_with_synchronous_normal_a_hard_kill_mid_load_loses_no_acknowledged_decision(
    ray_session: None, tmp_path: Path
) -> None:
    # NORMAL answers once the commit is in the OS's page cache: the process's death loses nothing
    config = RateLimitConfig(message=WindowLimits(minute=1000, hour=1000, day=1000), synchronous="NORMAL")
    settings = make_settings(tmp_path, ratelimit=config)
    spec = next(s for s in SERVICES if s.name == "ratelimit")
    handles = service_handles(settings, spec)
    client = RateLimitClient(handles)
    try:
        pid = await handles[0].__ray_call__.remote(lambda actor: os.getpid())
        allowed = 0
        some_allowed = asyncio.Event()

        async def check() -> RateDecision:
            nonlocal allowed
            decision = await client.check("loaded")
            allowed += decision.allowed
            if allowed >= 30:
                some_allowed.set()
            return decision

        calls = [asyncio.ensure_future(check()) for _ in range(400)]
        await some_allowed.wait()
        os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*calls, return_exceptions=True)
        acknowledged = allowed
        for _ in range(600):
            try:
                after = await client.check("loaded")
                break
            except ServiceUnavailable:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the rate limiter did not come back")
        counted = 1000 - 1 - after.remaining["day"]
        assert acknowledged <= counted <= len(calls)
        (stats,) = await client.stats()
        assert stats.syncs <= stats.commits
    finally:
        for handle in handles:
            ray.kill(handle, no_restart=True)


@pytest.mark.asyncio
async def test_a_burst_of_allowed_checks_syncs_at_most_once_per_durability_interval_and_never_idle(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = RateLimitConfig(message=WindowLimits(minute=1000, hour=1000, day=1000), synchronous="NORMAL")
    limiter = RateLimiter(config, tmp_path, clock=clock)
    try:
        start = time.monotonic()
        for i in range(200):
            assert (await limiter.check(f"burst-{i % 20}")).allowed
        await limiter.synced()
        stats = await limiter.stats()
        assert stats.unsynced_commits == 0
        elapsed = time.monotonic() - start
        # every allowed check was committed before it was answered; the syncs covering them
        # came at one durability point per interval at most, not one per commit
        assert stats.commits >= 1 and stats.allowed == 200
        assert 1 <= stats.syncs <= elapsed / DURABILITY_INTERVAL + 1
        await asyncio.sleep(2.5 * DURABILITY_INTERVAL)
        assert (await limiter.stats()).syncs == stats.syncs
    finally:
        await limiter.close()
