"""The context store: windows, built-context cache, social graph, cleanup, memory budget,
durability (store reopen, actor kill, full restart), forget, concurrency, failures."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from actors.context import DAY, ContextClient, ContextConfig, ContextStore, conversation_key, graph_key
from actors.errors import ServiceUnavailable
from actors.schemas import Turn
from actors.sharding import shard_index
from bot.runtime import Runtime
from storage.context_db import db_path
from storage.sqlite import DURABILITY_INTERVAL
from tests.conftest import FakeClock, MakeStore, StateBackend, both_backends, make_settings


def turn(text: str, clock: FakeClock, role: str = "user", author: str = "u") -> Turn:
    return Turn(role=role, author=author, text=text, time=clock())  # type: ignore[arg-type]


def texts(turns: tuple[tuple[str, str, str], ...]) -> list[str]:
    return [t[2] for t in turns]


def disk_texts(store: ContextStore) -> list[str]:
    """Every turn's text stored by `store`'s shard, in order of arrival (committed only)."""
    return [r[0] for r in store._db._rows("SELECT text FROM turns ORDER BY id")]


@both_backends
@pytest.mark.asyncio
async def test_window_keeps_at_most_max_turns_and_max_chars_dropping_the_oldest(
    make_store: MakeStore, clock: FakeClock, tmp_path: Path
) -> None:
    store = make_store(max_turns=3, max_chars=100, trim_to=1)
    for i in range(5):
        await store.append("chan", "u", [turn(f"t{i}", clock)])
    assert texts((await store.build("chan", "u")).turns) == ["t2", "t3", "t4"]
    await store.append("chan", "u", [turn("x" * 60, clock), turn("y" * 30, clock)])
    built = await store.build("chan", "u")
    assert texts(built.turns) == ["t4", "x" * 60, "y" * 30]
    await store.append("chan", "u", [turn("z" * 20, clock)])
    assert texts((await store.build("chan", "u")).turns) == ["y" * 30, "z" * 20]
    # one turn over the character bound keeps its start instead of vanishing
    await store.append("chan", "u", [turn("w" * 500, clock)])
    (only,) = (await store.build("chan", "u")).turns
    assert len(only[2]) == 100 and only[2].startswith("www")
    # disk holds the same window as memory
    assert disk_texts(store) == [only[2]]


@both_backends
@pytest.mark.asyncio
async def test_a_full_window_drops_turns_in_a_step_so_it_starts_alike_for_several_turns(
    make_store: MakeStore, clock: FakeClock
) -> None:
    store = make_store(max_turns=8, max_chars=10_000, trim_to=0.5)
    firsts = []
    for i in range(12):
        await store.append("chan", "u", [turn(f"q{i}", clock), turn(f"a{i}", clock, role="model")])
        firsts.append((await store.build("chan", "u")).turns[0][2])
    # full at 8 turns; the fifth message's pair overflows it and the window drops to 4,
    # then grows again: it starts at the same turn for three messages in a row
    assert firsts == ["q0"] * 4 + ["q3"] * 3 + ["q6"] * 3 + ["q9"] * 2
    assert disk_texts(store)[0] == "q9" and len(disk_texts(store)) == 6


@both_backends
@pytest.mark.asyncio
async def test_append_then_build_shows_the_new_turn_at_once_and_a_repeat_build_is_a_cache_hit(
    make_store: MakeStore, clock: FakeClock
) -> None:
    store = make_store()
    seen = []
    for i in range(4):
        version = await store.append("chan", "u", [turn(f"t{i}", clock)])
        built = await store.build("chan", "u")
        assert built.turns[-1][2] == f"t{i}" and built.version == version
        seen.append(built.digest)
        again = await store.build("chan", "u")
        assert again is built
    assert len(set(seen)) == 4
    stats = await store.stats()
    assert (stats.built_hits, stats.built_misses) == (4, 4)
    assert stats.built_hit_rate == pytest.approx(0.5)
    # each append waited for its own commit: the state-file writes are counted
    assert stats.commits == 4


@pytest.mark.asyncio
async def test_a_thread_or_reply_chain_is_its_own_conversation(
    make_store: MakeStore, clock: FakeClock
) -> None:
    store = make_store()
    await store.append("chan:1", "u", [turn("in the channel", clock)])
    await store.append("thread:9", "u", [turn("in the thread", clock)])
    await store.append("chain:chan:1:msg:42", "u", [turn("in the reply chain", clock)])
    assert texts((await store.build("chan:1", "u")).turns) == ["in the channel"]
    assert texts((await store.build("thread:9", "u")).turns) == ["in the thread"]
    assert texts((await store.build("chain:chan:1:msg:42", "u")).turns) == ["in the reply chain"]


@both_backends
@pytest.mark.asyncio
async def test_social_graph_counts_both_ways_and_a_graph_change_invalidates_the_built_context(
    make_store: MakeStore, clock: FakeClock
) -> None:
    store = make_store()
    await store.append("chan", "ada", [turn("hello", clock)])
    before = await store.build("chan", "ada", "srv")
    assert before.social == ""
    assert await store.record_interaction("srv", "ada", ["bob", "cy", "ada"], reply_to="bob") == 2
    await store.record_interaction("srv", "bob", [], reply_to="ada")
    built = await store.build("chan", "ada", "srv")
    assert built.social.startswith("In this server, ada talks most with: bob (3 mentions or replies")
    assert "cy (1 mentions or replies" in built.social
    assert built.digest != before.digest and built.turns == before.turns
    assert (await store.build("chan", "ada", "srv")) is built
    # cy's view: mentioned once by ada
    assert "ada (1 mentions or replies" in await store.social("srv", "cy")
    # the graph is per server, and a build without a server carries no social line
    assert (await store.build("chan", "ada", "other-srv")).social == ""
    assert (await store.build("chan", "ada")).social == ""
    await store.record_interaction("srv", "cy", ["ada"])
    assert (await store.build("chan", "ada", "srv")).digest != built.digest


@pytest.mark.asyncio
async def test_contacts_per_user_are_capped_dropping_the_least_recently_seen(
    make_store: MakeStore, clock: FakeClock
) -> None:
    store = make_store(max_contacts=2)
    for other in ("a", "b", "c"):
        clock.advance(1)
        await store.record_interaction("srv", "u", [other])
    line = await store.social("srv", "u")
    assert "b (" in line and "c (" in line and "a (" not in line
    assert "u (" not in await store.social("srv", "a")


@both_backends
@pytest.mark.asyncio
async def test_cleanup_after_31_days_removes_idle_conversations_and_edges_in_memory_and_on_disk(
    make_store: MakeStore, clock: FakeClock, tmp_path: Path
) -> None:
    store = make_store()
    await store.append("chan", "idle", [turn("old news", clock)])
    await store.append("chan", "idle-spilled", [turn("older news", clock)])
    await store.record_interaction("srv", "idle", ["idle-spilled"])
    # a conversation that lives only on disk is cleaned up too
    store._drop(conversation_key("chan", "idle-spilled"))
    clock.advance(31 * DAY)
    await store.append("chan", "active", [turn("fresh", clock)])
    await store.record_interaction("srv", "active", ["idle"])
    await store.maintain()
    stats = await store.stats()
    assert stats.cleaned_conversations == 2 and stats.cleaned_edges == 2
    assert (stats.conversations, stats.conversations_on_disk, stats.graph_edges) == (1, 1, 2)
    assert disk_texts(store) == ["fresh"]
    assert await store.disk_rows("idle-spilled") == (0, 0)
    assert (await store.build("chan", "idle")).turns == ()
    assert "idle (" in await store.social("srv", "active")
    # what survived is remembered after a reopen
    await store.close()
    reopened = make_store()
    assert texts((await reopened.build("chan", "active")).turns) == ["fresh"]
    assert (await reopened.stats()).graph_edges == 2


@both_backends
@pytest.mark.asyncio
async def test_a_stale_conversation_reached_before_cleanup_is_gone_and_stays_gone(
    make_store: MakeStore, clock: FakeClock, tmp_path: Path
) -> None:
    store = make_store()
    await store.append("chan", "u", [turn("ancient", clock)])
    await store.close()
    clock.advance(31 * DAY)
    reopened = make_store()
    assert (await reopened.build("chan", "u")).turns == ()
    await reopened.append("chan", "u", [turn("new", clock)])
    assert disk_texts(reopened) == ["new"]


@both_backends
@pytest.mark.asyncio
async def test_over_the_memory_budget_conversations_move_to_disk_and_load_back_on_demand(
    make_store: MakeStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store(memory_budget_bytes=20_000)
    for i in range(40):
        clock.advance(1)
        await store.append(f"chan{i}", "u", [turn(f"message {i} " + "x" * 400, clock)])
    assert (await store.stats()).bytes > 20_000
    with caplog.at_level(logging.WARNING, logger="actors.context"):
        await store.maintain()
    stats = await store.stats()
    assert stats.bytes <= 20_000 and stats.spilled > 0
    assert stats.conversations + stats.spilled == 40 and stats.conversations_on_disk == 40
    assert "over its memory budget" in caplog.text and "moved" in caplog.text
    # the least recently active went first, and come back whole
    built = await store.build("chan0", "u")
    assert texts(built.turns) == ["message 0 " + "x" * 400]
    assert (await store.stats()).reloaded == 1
    await store.append("chan0", "u", [turn("after reload", clock)])
    assert texts((await store.build("chan0", "u")).turns)[-1] == "after reload"


@both_backends
@pytest.mark.asyncio
async def test_a_reopened_store_remembers_conversations_graph_and_versions(
    make_store: MakeStore, clock: FakeClock
) -> None:
    store = make_store()
    await store.append("chan", "u", [turn("one", clock), turn("two", clock, "model", "raycord")])
    await store.record_interaction("srv", "u", ["v"])
    built = await store.build("chan", "u", "srv")
    await store.close()
    reopened = make_store()
    again = await reopened.build("chan", "u", "srv")
    assert again.turns == built.turns and again.digest == built.digest and again.version == built.version


@both_backends
@pytest.mark.asyncio
async def test_with_a_commit_delay_appends_wait_for_each_other_and_a_reset_or_forget_does_not(
    make_store: MakeStore, clock: FakeClock, tmp_path: Path
) -> None:
    store = make_store(commit_delay_seconds=1.0)
    await store.append("chan", "warm", [turn("first", clock)])  # the delay is waited out here
    # from here a commit waits a minute for more writers, unless an urgent one joins
    store._db.committer.max_delay = 60.0
    for command in ("reset", "forget"):
        appends = [
            asyncio.create_task(store.append("chan", f"u{i}", [turn(f"hi {i}", clock)])) for i in range(5)
        ]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in appends)  # waiting for more writers
        commits = (await store.stats()).commits
        urgent = store.reset("chan", "warm") if command == "reset" else store.forget("warm")
        await asyncio.wait_for(asyncio.gather(urgent, *appends), 30)
        # one commit took the waiting appends and the reset (or forget) along, before the
        # delay ran out: the user who reset was not kept waiting for it
        assert (await store.stats()).commits == commits + 1
    assert "hi 4" in disk_texts(store)  # the gathered appends are on disk
    await store.close()


@both_backends
@pytest.mark.asyncio
async def test_forget_leaves_no_trace_in_memory_on_disk_or_in_the_cache(
    make_store: MakeStore, clock: FakeClock, tmp_path: Path
) -> None:
    store = make_store()
    await store.append("chan", "gone", [turn("secret one", clock, author="gone")])
    await store.append("dm:gone", "gone", [turn("secret two", clock, author="gone")])
    await store.append("spilled", "gone", [turn("secret three", clock, author="gone")])
    await store.append("chan", "stays", [turn("kept", clock)])
    await store.record_interaction("srv", "gone", ["stays"])
    await store.record_interaction("srv", "stays", [], reply_to="gone")
    await store.build("chan", "gone", "srv")
    before = await store.build("chan", "stays", "srv")
    assert "gone (" in before.social
    store._drop(conversation_key("spilled", "gone"))
    assert await store.forget("gone") == 3
    stats = await store.stats()
    assert (stats.conversations, stats.conversations_on_disk, stats.graph_edges) == (1, 1, 0)
    assert await store.disk_rows("gone") == (0, 0)
    assert all("secret" not in t for t in disk_texts(store))
    assert (await store.build("chan", "gone", "srv")).turns == ()
    after = await store.build("chan", "stays", "srv")
    assert after.social == "" and texts(after.turns) == ["kept"]
    await store.close()
    reopened = make_store()
    assert (await reopened.build("spilled", "gone")).turns == ()
    assert (await reopened.stats()).graph_edges == 0


@both_backends
@pytest.mark.asyncio
async def test_concurrent_appends_to_one_conversation_keep_every_turn_in_order_of_arrival(
    make_store: MakeStore, clock: FakeClock, tmp_path: Path
) -> None:
    store = make_store(max_turns=500, max_chars=100_000)
    versions = await asyncio.gather(
        *(
            store.append("chan", "u", [turn(f"q{i}", clock), turn(f"a{i}", clock, "model")])
            for i in range(100)
        )
    )
    assert sorted(versions) == list(range(1, 101))
    expected = [x for i in range(100) for x in (f"q{i}", f"a{i}")]
    assert texts((await store.build("chan", "u")).turns) == expected
    assert disk_texts(store) == expected
    # group commit: far fewer transactions than appends
    assert store._db.committer.commits < 100


@pytest.mark.asyncio
async def test_bad_input_is_refused_with_a_clear_error_and_changes_nothing(
    make_store: MakeStore, clock: FakeClock
) -> None:
    store = make_store()
    await store.append("chan", "u", [turn("kept", clock)])
    with pytest.raises(ValueError, match="scope must be a non-empty string"):
        await store.append("", "u", [turn("x", clock)])
    with pytest.raises(ValueError, match="role"):
        await store.append("chan", "u", [{"role": "wizard", "author": "u", "text": "x", "time": 0}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="mentions must be a list"):
        await store.record_interaction("srv", "u", "bob")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="server must be"):
        await store.build("chan", "u", "")
    assert texts((await store.build("chan", "u")).turns) == ["kept"]
    assert (await store.stats()).conversations_on_disk == 1


@pytest.mark.asyncio
async def test_a_failed_commit_raises_keeps_no_phantom_turn_and_later_writes_succeed(
    make_store: MakeStore, clock: FakeClock, tmp_path: Path
) -> None:
    store = make_store()
    await store.append("chan", "u", [turn("before", clock)])
    # a real SQLite failure: the database refuses one text
    conn = sqlite3.connect(db_path(tmp_path / "state", 0))
    conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON turns WHEN NEW.text = 'boom' "
        "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
    )
    conn.commit()
    conn.close()
    with pytest.raises(sqlite3.IntegrityError, match="disk says no"):
        await store.append("chan", "u", [turn("boom", clock)])
    assert texts((await store.build("chan", "u")).turns) == ["before"]
    await store.append("chan", "u", [turn("after", clock)])
    assert texts((await store.build("chan", "u")).turns) == ["before", "after"]
    assert disk_texts(store) == ["before", "after"]


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        ContextConfig(memory_budget_bytes=0)
    with pytest.raises(ValueError):
        ContextConfig(stale_after_seconds=-1)
    with pytest.raises(ValueError, match="state_dir"):
        ContextStore(ContextConfig())


# --- through Ray actors ---


async def _actor_pid(handle: Any) -> int:
    return int(await handle.__ray_call__.remote(lambda self: os.getpid()))


async def _wait_until_answering(handle: Any, attempts: int = 150) -> None:
    for _ in range(attempts):
        try:
            await handle.ping.remote()
            return
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            await asyncio.sleep(0.2)
    raise AssertionError("the context actor did not come back")


@pytest.mark.asyncio
async def test_context_survives_an_actor_kill_and_routes_the_graph_by_server(
    ray_session: None, tmp_path: Path
) -> None:
    rt = Runtime(make_settings(tmp_path, context={"shards": 2}))
    try:
        await rt.start()
        client = rt.clients["context"]
        assert isinstance(client, ContextClient)
        # a conversation on one shard, the server's graph on the other
        user = "ada"
        scope = next(
            f"chan-{i}" for i in range(100) if shard_index(conversation_key(f"chan-{i}", user), 2) == 0
        )
        server = next(f"srv-{i}" for i in range(100) if shard_index(graph_key(f"srv-{i}"), 2) == 1)
        await client.append(scope, user, [Turn(role="user", author=user, text="remember me", time=1.0)])
        await client.record_interaction(server, user, ["bob"])
        built = await client.build(scope, user, server)
        assert texts(built.turns) == ["remember me"] and "bob (1 mentions or replies" in built.social
        shards = await client.stats()
        assert shards[0].graph_edges == 0 and shards[1].graph_edges >= 1  # the graph is on its server's shard
        assert shards[0].conversations == 1 and shards[1].conversations == 0

        handle = rt.handles["context"][0]
        os.kill(await _actor_pid(handle), signal.SIGKILL)
        await _wait_until_answering(handle)
        again = await client.build(scope, user, server)
        assert again.turns == built.turns and again.digest == built.digest
        stats = await client.stats()
        assert sum(s.conversations_on_disk for s in stats) == 1
        assert await client.forget(user) == 1
        assert (await client.build(scope, user, server)).turns == ()
        assert (await client.build(scope, user, server)).social == ""
    finally:
        await rt.shutdown(kill_actors=True)


@both_backends
@pytest.mark.asyncio
async def test_every_acknowledged_turn_survives_a_sigkill_of_the_actor_mid_load(
    ray_session: None, tmp_path: Path, backend: StateBackend
) -> None:
    window = {"commit_delay_seconds": 0.0, "max_turns": 10_000, "max_chars": 1_000_000}
    rt = Runtime(make_settings(tmp_path, context=window, **backend.settings()))
    try:
        await rt.start()
        client = rt.clients["context"]
        assert isinstance(client, ContextClient)
        handle = rt.handles["context"][0]
        pid = await _actor_pid(handle)
        acked: dict[int, list[str]] = {w: [] for w in range(8)}
        enough, killed = asyncio.Event(), asyncio.Event()

        async def writer(w: int) -> None:
            # until the kill is seen: a writer that missed it stops once the kill is done
            for i in itertools.count():
                if killed.is_set():
                    return
                text = f"w{w}-{i}"
                try:
                    await client.append(
                        f"chan-{w}", "ada", [Turn(role="user", author="ada", text=text, time=1.0)]
                    )
                except ServiceUnavailable:
                    return
                acked[w].append(text)
                if sum(map(len, acked.values())) >= 100:
                    enough.set()

        writers = [asyncio.create_task(writer(w)) for w in range(8)]
        await enough.wait()
        os.kill(pid, signal.SIGKILL)
        killed.set()
        await asyncio.gather(*writers)
        await _wait_until_answering(handle)
        assert await _actor_pid(handle) != pid
        for w, texts_acked in acked.items():
            stored = texts((await client.build(f"chan-{w}", "ada")).turns)
            # every acknowledged turn, in order; at most the one in flight at the kill besides
            assert stored[: len(texts_acked)] == texts_acked
            assert len(stored) - len(texts_acked) <= 1
    finally:
        await rt.shutdown(kill_actors=True)


@pytest.mark.asyncio
async def test_context_survives_a_full_restart_of_the_runtime(ray_session: None, tmp_path: Path) -> None:
    first = Runtime(make_settings(tmp_path))
    try:
        pipeline = await first.start()
        reply = await pipeline.handle({"text": "my name is Ada", "user_id": "ada", "scope": "chan-1"})
        await first.flush()
        built = await pipeline.context.build("chan-1", "ada")
        assert texts(built.turns) == ["my name is Ada", reply.text]
    finally:
        await first.shutdown(kill_actors=True)
    second = Runtime(make_settings(tmp_path))
    try:
        pipeline = await second.start()
        again = await pipeline.context.build("chan-1", "ada")
        assert again.turns == built.turns and again.version == built.version
    finally:
        await second.shutdown(kill_actors=True)


@pytest.mark.asyncio
async def test_with_synchronous_normal_a_hard_kill_mid_load_loses_no_acknowledged_turn(
    ray_session: None, tmp_path: Path
) -> None:
    # NORMAL answers once the commit is in the OS's page cache: the process's death loses nothing
    rt = Runtime(make_settings(tmp_path, context={"synchronous": "NORMAL", "commit_delay_seconds": 0}))
    try:
        await rt.start()
        client = rt.clients["context"]
        assert isinstance(client, ContextClient)
        handle = rt.handles["context"][0]
        pid = await _actor_pid(handle)
        acknowledged: list[int] = []
        some_acknowledged = asyncio.Event()

        async def append(i: int) -> None:
            await client.append(
                f"chan-{i}", "ada", [Turn(role="user", author="ada", text=f"turn {i}", time=1.0)]
            )
            acknowledged.append(i)
            if len(acknowledged) >= 30:
                some_acknowledged.set()

        calls = [asyncio.ensure_future(append(i)) for i in range(300)]
        await some_acknowledged.wait()
        os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*calls, return_exceptions=True)
        assert 30 <= len(acknowledged)
        await _wait_until_answering(handle)
        assert await _actor_pid(handle) != pid
        for i in acknowledged:
            assert texts((await client.build(f"chan-{i}", "ada")).turns) == [f"turn {i}"]
    finally:
        await rt.shutdown(kill_actors=True)


@pytest.mark.asyncio
async def test_a_burst_of_appends_syncs_at_most_once_per_durability_interval_and_never_idle(
    make_store: MakeStore, clock: FakeClock
) -> None:
    store = make_store(synchronous="NORMAL")
    start = time.monotonic()
    for i in range(200):
        await store.append(f"chan-{i % 10}", "ada", [turn(f"turn {i}", clock)])
    await store.synced()
    stats = await store.stats()
    assert stats.unsynced_commits == 0
    elapsed = time.monotonic() - start
    # every append was committed before it was answered, and synced once per interval at most
    assert stats.commits >= 200
    assert 1 <= stats.syncs <= elapsed / DURABILITY_INTERVAL + 1
    await asyncio.sleep(2.5 * DURABILITY_INTERVAL)
    assert (await store.stats()).syncs == stats.syncs
