"""The reply links behind Discord's reply chains: message → conversation, durable in the
context store, bounded, and gone with their conversation (reset, forget, stale cleanup)."""

from __future__ import annotations

import pytest

from actors.context import DAY, ContextStore
from actors.schemas import Turn
from tests.conftest import FakeClock, MakeStore, both_backends


async def talk(store: ContextStore, scope: str, user: str, clock: FakeClock, *replies: str) -> None:
    turns = [Turn(role="user", author=user, text="hi", time=clock())]
    await store.append(scope, user, turns)
    await store.link_replies(scope, user, list(replies))


@both_backends
@pytest.mark.asyncio
async def test_a_reply_link_survives_a_restart_of_the_store(make_store: MakeStore, clock: FakeClock) -> None:
    store = make_store()
    await talk(store, "channel:1", "ada", clock, "m1", "m2")
    await store.close()
    reopened = make_store()
    assert await reopened.reply_scope("m1") == "channel:1"
    assert await reopened.reply_scope("m2") == "channel:1"
    assert await reopened.reply_scope("m3") is None


@both_backends
@pytest.mark.asyncio
async def test_forget_deletes_the_users_links_only(make_store: MakeStore, clock: FakeClock) -> None:
    store = make_store()
    await talk(store, "channel:1", "ada", clock, "a1")
    await talk(store, "channel:1", "bob", clock, "b1")
    await store.forget("ada")
    assert await store.reply_scope("a1") is None
    assert await store.reply_scope("b1") == "channel:1"


@both_backends
@pytest.mark.asyncio
async def test_reset_and_stale_cleanup_take_the_links_with_the_conversation(
    make_store: MakeStore, clock: FakeClock
) -> None:
    store = make_store(stale_after_seconds=DAY, cleanup_interval_seconds=60)
    await talk(store, "channel:1", "ada", clock, "r1")
    await talk(store, "channel:2", "ada", clock, "s1")
    await store.reset("channel:1", "ada")
    assert await store.reply_scope("r1") is None
    assert await store.reply_scope("s1") == "channel:2"
    clock.advance(2 * DAY)
    await store.maintain()
    assert await store.reply_scope("s1") is None


@both_backends
@pytest.mark.asyncio
async def test_links_are_bounded_oldest_first(make_store: MakeStore, clock: FakeClock) -> None:
    store = make_store(max_reply_links=3)
    await talk(store, "channel:1", "ada", clock, "x1", "x2")
    await talk(store, "channel:1", "ada", clock, "x3", "x4")
    assert await store.reply_scope("x1") is None
    assert [await store.reply_scope(m) for m in ("x2", "x3", "x4")] == ["channel:1"] * 3


@both_backends
@pytest.mark.asyncio
async def test_a_malformed_link_is_refused_and_stores_nothing(
    make_store: MakeStore, clock: FakeClock
) -> None:
    store = make_store()
    with pytest.raises(ValueError, match="list of ids"):
        await store.link_replies("channel:1", "ada", "m1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="message_id"):
        await store.link_replies("channel:1", "ada", ["ok", ""])
    assert await store.reply_scope("ok") is None
