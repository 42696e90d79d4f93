"""Batched service calls: concurrent calls share round trips, each keeps its own outcome."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from actors.base import CallArgs, CallBatcher
from actors.cache import CacheClient
from actors.context import ContextClient
from actors.errors import ServiceUnavailable
from actors.schemas import Turn
from bot.runtime import Runtime
from tests.conftest import make_settings


class Recorder:
    """A stand-in transport that records each round trip and answers every call."""

    def __init__(self) -> None:
        self.round_trips: list[list[CallArgs]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail_with: Exception | None = None

    async def send(self, calls: list[CallArgs]) -> list[tuple[bool, Any]]:
        self.round_trips.append(calls)
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [(False, ValueError(f"bad {a[0]}")) if a[0] < 0 else (True, a[0] * 10) for a in calls]


@pytest.mark.asyncio
async def test_calls_made_during_a_round_trip_share_the_next_one() -> None:
    rec = Recorder()
    rec.release.clear()
    batcher = CallBatcher(rec.send, max_in_flight=1)
    first = asyncio.ensure_future(batcher.submit((1,)))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(batcher.submit((i,))) for i in range(2, 12)]
    await asyncio.sleep(0)
    assert [len(b) for b in rec.round_trips] == [1]
    rec.release.set()
    assert await first == 10
    assert await asyncio.gather(*rest) == [i * 10 for i in range(2, 12)]
    assert [[a[0] for a in b] for b in rec.round_trips] == [[1], list(range(2, 12))]
    assert (batcher.calls, batcher.batches) == (11, 2)


@pytest.mark.asyncio
async def test_an_idle_batcher_sends_at_once() -> None:
    rec = Recorder()
    batcher = CallBatcher(rec.send, max_in_flight=2)
    for i in range(3):
        assert await batcher.submit((i,)) == i * 10
    assert [len(b) for b in rec.round_trips] == [1, 1, 1]


@pytest.mark.asyncio
async def test_one_failing_call_fails_alone() -> None:
    rec = Recorder()
    rec.release.clear()
    batcher = CallBatcher(rec.send, max_in_flight=1)
    calls = [asyncio.ensure_future(batcher.submit((i,))) for i in (1, -2, 3)]
    await asyncio.sleep(0)
    rec.release.set()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert outcomes[0] == 10 and outcomes[2] == 30
    assert isinstance(outcomes[1], ValueError) and "bad -2" in str(outcomes[1])


@pytest.mark.asyncio
async def test_a_failed_round_trip_fails_every_call_in_it_and_the_next_goes_out() -> None:
    rec = Recorder()
    rec.release.clear()
    rec.fail_with = ServiceUnavailable("call_many failed: RayActorError")
    batcher = CallBatcher(rec.send, max_in_flight=1)
    calls = [asyncio.ensure_future(batcher.submit((i,))) for i in (1, 2)]
    await asyncio.sleep(0)
    rec.release.set()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, ServiceUnavailable) for o in outcomes)
    rec.fail_with = None
    assert await batcher.submit((4,)) == 40


@pytest.mark.asyncio
async def test_a_cancelled_caller_leaves_the_others_their_answer() -> None:
    rec = Recorder()
    rec.release.clear()
    batcher = CallBatcher(rec.send, max_in_flight=1)
    calls = [asyncio.ensure_future(batcher.submit((i,))) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    calls[1].cancel()
    rec.release.set()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert outcomes[0] == 10 and outcomes[2] == 30
    assert isinstance(outcomes[1], asyncio.CancelledError)


@pytest.mark.asyncio
async def test_a_lingering_call_rides_with_the_next_call_in_order() -> None:
    rec = Recorder()
    batcher = CallBatcher(rec.send, max_in_flight=2)
    # a linger longer than any test: only the next call can take it along
    lingering = asyncio.ensure_future(batcher.submit((1,), linger=3600))
    await asyncio.sleep(0)
    assert rec.round_trips == []
    assert await batcher.submit((2,)) == 20
    assert await lingering == 10
    assert [[a[0] for a in b] for b in rec.round_trips] == [[1, 2]]


@pytest.mark.asyncio
async def test_a_lingering_call_with_no_company_leaves_on_its_own() -> None:
    rec = Recorder()
    batcher = CallBatcher(rec.send, max_in_flight=2)
    assert await batcher.submit((3,), linger=0.001) == 30
    assert [[a[0] for a in b] for b in rec.round_trips] == [[3]]


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CallBatcher(Recorder().send, max_in_flight=0)


@pytest.mark.ray
@pytest.mark.asyncio
async def test_concurrent_checks_through_the_actor_share_round_trips_and_stay_exact(
    runtime: Runtime, user: str
) -> None:
    limiter = runtime.clients["ratelimit"]
    before = limiter.batching()
    limit = runtime.settings.ratelimit.message.minute
    decisions = await asyncio.gather(*(limiter.check(user, "message") for _ in range(limit + 20)))  # type: ignore[attr-defined]
    after = limiter.batching()
    assert sum(d.allowed for d in decisions) == limit
    calls = after["calls"] - before["calls"]
    trips = after["round_trips"] - before["round_trips"]
    assert calls == limit + 20
    assert trips < calls


@pytest.mark.ray
@pytest.mark.asyncio
async def test_call_many_refuses_what_is_not_a_public_service_method(runtime: Runtime) -> None:
    handle = runtime.handles["cache"][0]
    for method in ("_insert", "call_many", "close", "no_such_method"):
        with pytest.raises(ValueError, match="no batchable method"):
            await handle.call_many.remote([(method, ())])


@pytest.mark.ray
@pytest.mark.asyncio
async def test_a_background_cache_set_rides_with_the_next_get_which_sees_it(runtime: Runtime) -> None:
    cache = runtime.client("cache", CacheClient)
    key = f"ride-{uuid.uuid4().hex}"
    before = cache.batching()
    stored, found = await asyncio.gather(
        cache.set(key, "the reply", "global", None, background=True), cache.get(key, "global")
    )
    after = cache.batching()
    assert stored is True and found == "the reply"
    assert (after["calls"] - before["calls"], after["round_trips"] - before["round_trips"]) == (2, 1)


@pytest.mark.ray
@pytest.mark.asyncio
async def test_one_round_trip_carries_calls_of_several_methods(runtime: Runtime) -> None:
    handle = runtime.handles["cache"][0]
    key = f"mixed-{uuid.uuid4().hex}"
    outcomes = await handle.call_many.remote(
        [
            ("set", (key, "v", "global", None, None)),
            ("get", (key, "global")),
            ("set", ("", "v", "global", None, None)),
        ]
    )
    assert [ok for ok, _ in outcomes] == [True, True, False]
    assert outcomes[1][1] == "v"
    assert isinstance(outcomes[2][1], ValueError)


@pytest.mark.ray
@pytest.mark.asyncio
async def test_a_build_never_waits_in_a_round_trip_for_an_append_to_commit(
    runtime: Runtime, user: str
) -> None:
    context = runtime.client("context", ContextClient)
    scope = f"channel:lane-{uuid.uuid4().hex[:8]}"
    turns = [Turn(role="user", author=user, text="remember the blue door", time=1.0)]
    before = context.batching()
    await asyncio.gather(context.append(scope, user, turns, background=True), context.build(scope, user))
    after = context.batching()
    # the append (answered once durable, after the commit delay) and the build travel apart
    assert (after["calls"] - before["calls"], after["round_trips"] - before["round_trips"]) == (2, 2)


@pytest.mark.asyncio
async def test_a_get_riding_with_a_set_to_a_killed_actor_is_still_answered(
    ray_session: None, tmp_path: Path
) -> None:
    rt = Runtime(make_settings(tmp_path))
    try:
        await rt.start()
        cache = rt.client("cache", CacheClient)
        await cache.set("kept", "the reply", "global", None)
        handle = rt.handles["cache"][0]
        pid = await handle.__ray_call__.remote(lambda self: os.getpid())
        os.kill(pid, signal.SIGKILL)
        # one round trip carries both; a batch holding a write is not sent again as a whole
        stored, found = await asyncio.gather(
            cache.set("later", "another", "global", None, background=True),
            cache.get("kept", "global"),
            return_exceptions=True,
        )
        # the read is retried on its own until the cache is back (empty: it keeps nothing on
        # disk here); the write was applied or refused as unavailable, never lost silently
        assert found is None, found
        assert isinstance(stored, bool | ServiceUnavailable), stored
    finally:
        await rt.shutdown(kill_actors=True)
