"""The whole message flow through real Ray actors."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from actors.errors import InputRejected, RateLimited
from actors.ratelimit import RateLimitConfig, WindowLimits
from actors.schemas import IncomingMessage
from bot.pipeline import ChatPipeline
from bot.runtime import Runtime
from storage.analytics_db import REPORTS
from tests.conftest import make_settings


def message(text: str, user: str, **kw: object) -> IncomingMessage:
    return IncomingMessage(text=text, user_id=user, scope=kw.pop("scope", "chan-1"), **kw)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_message_gets_a_reply(pipeline: ChatPipeline, user: str) -> None:
    reply = await pipeline.handle(message("what is raycord?", user))
    assert "what is raycord?" in reply.text
    assert reply.offline and not reply.cached
    assert reply.model == "offline-echo"


@pytest.mark.asyncio
async def test_the_same_question_twice_is_a_cache_hit(pipeline: ChatPipeline, user: str) -> None:
    first = await pipeline.handle(message("same question", user, stateless=True))
    await pipeline.writes.drain(10)
    second = await pipeline.handle(message("Same   question", user, stateless=True))
    assert not first.cached
    assert second.cached
    assert second.text == first.text
    other_user = await pipeline.handle(message("same question", user + "-b", stateless=True))
    assert not other_user.cached


@pytest.mark.asyncio
async def test_the_conversation_is_remembered(pipeline: ChatPipeline, user: str) -> None:
    first = await pipeline.handle(message("my name is Ada", user))
    await pipeline.writes.drain(10)
    built = await pipeline.context.build("chan-1", user)
    assert [(t[0], t[2]) for t in built.turns] == [("user", "my name is Ada"), ("model", first.text)]
    reply = await pipeline.handle(message("what is my name?", user))
    assert "1 earlier message" in reply.text


@pytest.mark.asyncio
async def test_a_user_over_the_limit_is_told_when_to_retry(ray_session: None, tmp_path: Path) -> None:
    limits = RateLimitConfig(
        message=WindowLimits(minute=2, hour=100, day=100), command=WindowLimits(minute=2, hour=100, day=100)
    )
    rt = Runtime(make_settings(tmp_path, ratelimit=limits))
    pipeline = await rt.start()
    try:
        await pipeline.handle(message("one", "u1"))
        await pipeline.handle(message("two", "u1"))
        with pytest.raises(RateLimited) as caught:
            await pipeline.handle(message("three", "u1"))
        assert caught.value.window == "minute"
        # bucketed windows may hold a request back up to one bucket past the minute
        assert 0 < caught.value.retry_after <= 60 * (1 + 1 / limits.buckets)
        assert "Try again in" in caught.value.user_message()
        # another user has their own budget
        assert (await pipeline.handle(message("hi", user="u2"))).text
        # a command's cache lookup shares the check's round trip, but a cached reply is
        # still refused once the user is over the command limit
        ask = message("what is ray?", "u3", kind="command", stateless=True)
        await pipeline.handle(ask)
        await pipeline.writes.drain(10)
        assert (await pipeline.handle(ask)).cached
        with pytest.raises(RateLimited):
            await pipeline.handle(ask)
    finally:
        await rt.shutdown(kill_actors=True)


@pytest.mark.asyncio
async def test_events_are_in_duckdb_after_shutdown(ray_session: None, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    rt = Runtime(settings)
    pipeline = await rt.start()
    for i in range(5):
        await pipeline.handle(message(f"question {i}", user=f"user-{i}"))
    await rt.shutdown(kill_actors=True)
    conn = duckdb.connect(str(settings.state_dir / "analytics.duckdb"), read_only=True)
    rows = conn.execute("SELECT user_id, type, cache_hit FROM events ORDER BY user_id").fetchall()
    conn.close()
    assert rows == [(f"user-{i}", "message", False) for i in range(5)]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("text", "reason"),
    [("   ", "the message is empty"), ("x" * 4001, "4,001 characters long; the limit is 4,000")],
)
async def test_rejected_input_carries_its_reason(
    pipeline: ChatPipeline, user: str, text: str, reason: str
) -> None:
    with pytest.raises(InputRejected) as caught:
        await pipeline.handle(message(text, user))
    assert reason in caught.value.reason


@pytest.mark.asyncio
async def test_malformed_input_is_rejected_with_the_field(pipeline: ChatPipeline) -> None:
    with pytest.raises(InputRejected) as caught:
        await pipeline.handle({"text": "hi", "user_id": "", "scope": "c"})
    assert caught.value.reason.startswith("user_id")


@pytest.mark.asyncio
async def test_per_minute_counters_count_messages_cache_hits_and_denials_per_server(
    pipeline: ChatPipeline, user: str
) -> None:
    server = f"server-{user}"
    limit = pipeline.settings.ratelimit.command.minute
    for _ in range(limit + 1):
        try:
            await pipeline.handle(
                message("a counted question", user, server_id=server, kind="command", stateless=True)
            )
        except RateLimited:
            pass
        await pipeline.writes.drain(10)
    await pipeline.analytics.flush()
    result = await pipeline.analytics.query(
        f"SELECT name, sum(count)::BIGINT FROM aggregates WHERE server_id = '{server}' GROUP BY 1 ORDER BY 1"
    )
    # the first answer is generated, every later allowed one is a cache hit, the last is denied
    assert dict(result.rows) == {"cache_hits": limit - 1, "messages": limit, "rate_limited": 1}
    minutes = await pipeline.analytics.query(REPORTS["minutes"])
    columns = list(minutes.columns)
    (row,) = [dict(zip(columns, r, strict=True)) for r in minutes.rows if r[1] == server]
    assert (row["messages"], row["cache_hits"], row["errors"], row["rate_limited"]) == (
        limit,
        limit - 1,
        0,
        1,
    )
