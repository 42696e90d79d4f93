"""/forget means gone: through the terminal chat, a user's text leaves every file of the
state directory (SQLite's main file and WAL, the cache, DuckDB), their analytics events
are deleted, late writes from before the forget bring nothing back, and the rate-limit
counts stay."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pytest

from actors.analytics import AnalyticsConfig, AnalyticsSink
from actors.context import ContextStore
from actors.schemas import AnalyticsEvent, Turn
from bot.console import ConsoleChat
from bot.pipeline import ChatPipeline
from bot.runtime import Runtime
from tests.conftest import FakeClock, make_settings


async def _chat(pipeline: ChatPipeline, user: str, text: str) -> list[str]:
    out = io.StringIO()
    await ConsoleChat(pipeline, stdin=io.StringIO(text), stdout=out, user=user).run()
    return out.getvalue().splitlines()


def _files_holding(state_dir: Path, marker: str) -> list[str]:
    """Every file under `state_dir` whose bytes hold `marker`, as UTF-8 or UTF-16."""
    needles = (marker.encode(), marker.encode("utf-16-le"))
    return sorted(
        str(p.relative_to(state_dir))
        for p in state_dir.rglob("*")
        if p.is_file() and any(n in p.read_bytes() for n in needles)
    )


async def _events_of(pipeline: ChatPipeline, user: str) -> int:
    result = await pipeline.analytics.query(f"SELECT count(*) FROM events WHERE user_id = '{user}'")
    return int(result.rows[0][0])


@pytest.mark.asyncio
async def test_forget_through_the_chat_leaves_the_users_text_in_no_file_of_the_state_directory(
    ray_session: None, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    state_dir = Path(settings.state_dir)
    marker, kept = f"zebra-{uuid.uuid4().hex}", f"okapi-{uuid.uuid4().hex}"
    user, other = "forgetful", "stays"

    # the first session's text reaches the main database file (a clean close checkpoints it)
    runtime = Runtime(settings)
    pipeline = await runtime.start()
    await _chat(pipeline, user, f"my secret is {marker}\n")
    await _chat(pipeline, other, f"{kept} is my word\n")
    await runtime.shutdown(kill_actors=True)

    runtime = Runtime(settings)
    pipeline = await runtime.start()
    try:
        # the second session's text is in the WAL (and an answer to it in the cache)
        await _chat(pipeline, user, f"{marker} again, twice: {marker}\n")
        await pipeline.writes.drain(10)
        await pipeline.analytics.flush()
        before = _files_holding(state_dir, marker)
        assert any(name.startswith("context-") for name in before), before
        assert await _events_of(pipeline, user) == 2
        used = sum(u.used for u in await pipeline.limits(user))

        lines = await _chat(pipeline, user, "/forget\ny\n")

        assert "rate-limit counts are kept" in lines[-1]
        assert "deleted 1 conversation(s)" in lines[-1] and "2 analytics event(s)" in lines[-1]
        assert _files_holding(state_dir, marker) == []
        assert _files_holding(state_dir, kept) != []  # only the forgotten user's text went
        assert await _events_of(pipeline, user) == 0
        assert await _events_of(pipeline, other) == 1
        assert sum(u.used for u in await pipeline.limits(user)) == used
    finally:
        await runtime.shutdown(kill_actors=True)
    # nor after a clean close, which checkpoints and writes the cache's snapshot
    assert _files_holding(state_dir, marker) == []


@pytest.mark.asyncio
async def test_a_turn_written_before_the_forget_that_arrives_after_it_is_not_stored(
    tmp_path: Path, clock: FakeClock
) -> None:
    store = ContextStore(state_dir=tmp_path, clock=clock)
    late = Turn(role="user", author="late", text="in flight", time=clock())
    clock.advance(1)
    await store.forget("late")
    await store.append("chan", "late", [late])
    assert (await store.build("chan", "late")).turns == ()
    fresh = Turn(role="user", author="late", text="after the forget", time=clock() + 1)
    await store.append("chan", "late", [fresh])
    assert [t[2] for t in (await store.build("chan", "late")).turns] == ["after the forget"]
    await store.close()


@pytest.mark.asyncio
async def test_the_sink_deletes_a_users_events_and_drops_their_late_ones(tmp_path: Path) -> None:
    from actors.analytics import event_row

    sink = AnalyticsSink(AnalyticsConfig(flush_events=1), state_dir=tmp_path)
    late = event_row(AnalyticsEvent(type="message", user_id="gone"))
    await sink.append_batch([event_row(AnalyticsEvent(type="message", user_id=u)) for u in ("gone", "kept")])
    assert await sink.forget_user("gone") == 1
    # recorded before the forget, delivered after it (another front-end's buffer)
    await sink.append_batch([late, event_row(AnalyticsEvent(type="message", user_id="gone"))])
    result = await sink.query("SELECT user_id, count(*) FROM events GROUP BY ALL ORDER BY 1")
    assert result.rows == [("gone", 1), ("kept", 1)]
    await sink.close()
