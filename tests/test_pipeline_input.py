"""Every input `ChatPipeline.validate` accepts runs to a reply or a typed error, on the
real service actors; background writes retry only what can succeed."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.errors import InputRejected, RaycordError, ServiceUnavailable
from actors.schemas import IncomingMessage
from bot.pipeline import BackgroundWrites, ChatPipeline

#: any text at all, lone surrogates and control characters included
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=60)
ids = st.one_of(any_text, st.sampled_from(["", "\x1f", "a\x1fb", "\ud800", "x" * 300]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=any_text,
    user_suffix=ids,
    scope=ids,
    server=st.one_of(st.none(), ids),
    mentions=st.lists(ids, max_size=3),
    reply_to=st.one_of(st.none(), ids),
    stateless=st.booleans(),
)
@pytest.mark.asyncio
async def test_arbitrary_text_and_ids_get_a_reply_or_a_typed_error(
    pipeline: ChatPipeline,
    user: str,
    text: str,
    user_suffix: str,
    scope: str,
    server: str | None,
    mentions: list[str],
    reply_to: str | None,
    stateless: bool,
) -> None:
    raw: dict[str, Any] = {
        "text": text,
        "user_id": user + user_suffix,
        "user_name": text[:10],
        "scope": scope,
        "server_id": server,
        "mentions": mentions,
        "reply_to_user": reply_to,
        "stateless": stateless,
    }
    dropped = pipeline.writes.dropped
    try:
        reply = await pipeline.handle(raw)
    except RaycordError:
        return
    assert reply.text
    # what was accepted can be stored: no background write of it is refused
    assert await pipeline.writes.drain(10) == 0
    assert pipeline.writes.dropped == dropped


@pytest.mark.asyncio
async def test_ids_no_store_can_key_by_are_refused_with_the_field_named(pipeline: ChatPipeline) -> None:
    refused: list[tuple[str, Any]] = [
        ("user_id", "a\x1fb"),
        ("scope", "\ud800"),
        ("server_id", ""),
        ("mentions", ["x\x00"]),
    ]
    for field, value in refused:
        raw: dict[str, Any] = {"text": "hi", "user_id": "u", "scope": "s", field: value}
        with pytest.raises(InputRejected, match=field):
            pipeline.validate(raw)


@pytest.mark.asyncio
async def test_a_lone_surrogate_in_the_text_is_replaced_not_a_crash(
    pipeline: ChatPipeline, user: str
) -> None:
    msg = pipeline.validate(IncomingMessage(text="broken \ud800 text", user_id=user, scope="s"))
    assert msg.text == "broken \ufffd text"
    reply = await pipeline.handle(msg)
    assert "\ufffd" in reply.text


@pytest.mark.asyncio
async def test_background_writes_retry_what_can_succeed_and_drop_what_cannot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writes = BackgroundWrites(max_backoff=0.01)
    attempts = {"restarting": 0, "refused": 0}

    async def restarting() -> None:
        attempts["restarting"] += 1
        if attempts["restarting"] < 3:
            raise ServiceUnavailable("append failed: RayActorError")

    async def refused() -> None:
        attempts["refused"] += 1
        raise ValueError("user must be a non-empty string")

    with caplog.at_level(logging.ERROR, logger="bot.pipeline"):
        writes.submit("context.append", restarting, "user=u1")
        writes.submit("cache.set", refused, "user=u2 scope=s")
        assert await writes.drain(5) == 0
    assert attempts == {"restarting": 3, "refused": 1}
    assert (writes.failures, writes.dropped) == (2, 1)
    refusals = [r.getMessage() for r in caplog.records if "refused for good" in r.getMessage()]
    assert len(refusals) == 1 and "user=u2 scope=s" in refusals[0]
