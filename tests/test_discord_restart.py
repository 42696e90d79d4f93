"""`raycord run` restarted against `raycord fake-discord`: command registration by tree hash,
and reply chains that survive a restart and a SIGKILL of the bot.

One stand-in and one lifecycle for the module, observed by each test: start A (fresh state)
→ SIGINT → start B (same tree) → SIGKILL → start C (changed tree, auto threads) →
`raycord discord sync`. The bots connect to the session's Ray with `--address`; after the
SIGKILL the context store's actor is killed too, so C reads the conversations and reply
links back from its SQLite file.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from bot.runtime import project_root
from tests.discord_harness import TOKEN, BotProcess, StandIn, answer_to, kill_services, reply_to, wait_for

COMMANDS_GLOBAL = "/applications/{application_id}/commands"
EVERY_COMMAND = {"ask", "reset", "forget", "limits", "stats", "model", "persona", "Ask raycord"}


@dataclass
class Lifecycle:
    #: the bulk upserts (PUT) each start made: their bodies' command names
    upserts: dict[str, list[set[str]]] = field(default_factory=dict)
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    sync_exit: int | None = None
    sync_output: str = ""
    thread: dict[str, Any] = field(default_factory=dict)


def _upserts_since(stand_in: StandIn, since: float) -> list[set[str]]:
    return [
        {c["name"] for c in r["body"]}
        for r in stand_in.requests(since)
        if r["method"] == "PUT" and r["route"] == COMMANDS_GLOBAL and r["status"] == 200
    ]


def _durable(state: Path, message_id: str, turns: int) -> bool:
    """The reply link of `message_id` and `turns` turns of its conversation are committed."""
    with sqlite3.connect(f"file:{state / 'context-0.sqlite'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT key FROM reply_links WHERE message_id = ?", (message_id,)).fetchone()
        if row is None:
            return False
        stored = db.execute("SELECT count(*) FROM turns WHERE key = ?", (row[0],)).fetchone()[0]
        return int(stored) >= turns


def _latest(stand_in: StandIn) -> float:
    requests = stand_in.requests()
    return requests[-1]["at"] if requests else 0.0


@pytest.fixture(scope="module")
def lifecycle(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lifecycle]:
    stand_in = StandIn()
    namespace = f"restart-{uuid.uuid4().hex[:8]}"
    address = ray.get_runtime_context().gcs_address
    root = tmp_path_factory.mktemp("restart")
    state = root / "state"
    seen = Lifecycle()
    running: BotProcess | None = None
    try:
        guild = stand_in.state()["guilds"][0]["id"]
        channel = stand_in.call("channels", {"guild_id": guild, "name": "restarts"})["id"]
        user = stand_in.call("users", {"name": "ada"})["id"]
        base = {"edit_interval_seconds": 0}

        def start(name: str, sessions: int, **discord: Any) -> BotProcess:
            since = _latest(stand_in)
            bot = BotProcess(
                stand_in, state, {**base, **discord}, address=address, namespace=namespace, log_name=name
            )
            bot.wait_connected(sessions)
            seen.upserts[name] = _upserts_since(stand_in, since)
            return bot

        running = start("a", 0)
        asked = reply_to(stand_in, channel, user, "my name is Ada", mention_bot=True)
        first = seen.answers["a"] = answer_to(stand_in, channel, asked["id"])
        wait_for("A's reply link and turns to commit", lambda: _durable(state, first["id"], 2))
        running.stop(signal.SIGINT)

        running = start("b", 1)
        asked = reply_to(stand_in, channel, user, "what is my name?", reply_to=first["id"])
        second = seen.answers["b"] = answer_to(stand_in, channel, asked["id"])
        wait_for("B's reply link and turns to commit", lambda: _durable(state, second["id"], 4))
        running.stop(signal.SIGKILL)
        # the context store goes down too and comes back from its file
        ray.kill(ray.get_actor("context-0", namespace=namespace), no_restart=False)

        running = start("c", 2, disabled_commands=["model"], auto_thread=True)
        asked = reply_to(stand_in, channel, user, "and now?", reply_to=second["id"])
        seen.answers["c"] = answer_to(stand_in, channel, asked["id"])
        # auto_thread: a new channel conversation gets a thread, which then needs no mention
        opened = reply_to(stand_in, channel, user, "start a thread about rays", mention_bot=True)
        thread = opened["id"]
        started = wait_for("the thread's first answer", lambda: _final(stand_in, thread))
        wait_for("the thread's link and turns to commit", lambda: _durable(state, thread, 2))
        follow = reply_to(stand_in, thread, user, "go on")
        seen.thread = {
            "opened": opened,
            "first": started,
            "follow": wait_for(
                "the thread's follow-up", lambda: _final(stand_in, thread, after=started["id"])
            ),
            "follow_id": follow["id"],
        }
        running.stop(signal.SIGINT)
        running = None

        since = _latest(stand_in)
        config = root / "sync.yaml"
        config.write_text(yaml.safe_dump({"discord": {"api_base_url": stand_in.url, **base}}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAYCORD_")}
        env["RAYCORD_DISCORD_TOKEN"] = TOKEN
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bot.cli",
                "discord",
                "sync",
                "--config",
                str(config),
                "--state-dir",
                str(state),
            ],
            cwd=project_root(),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        seen.sync_exit, seen.sync_output = done.returncode, done.stdout + done.stderr
        seen.upserts["sync"] = _upserts_since(stand_in, since)
        yield seen
    finally:
        if running is not None:
            running.stop(signal.SIGINT)
        kill_services(namespace)
        stand_in.stop()


def _final(stand_in: StandIn, channel: str, after: str | None = None) -> dict[str, Any] | None:
    for m in stand_in.bot_messages(channel):
        if "offline mode" in m["content"] and (after is None or int(m["id"]) > int(after)):
            return m
    return None


def test_the_first_start_registers_every_command_in_one_bulk_upsert(lifecycle: Lifecycle) -> None:
    assert lifecycle.upserts["a"] == [EVERY_COMMAND]


def test_a_restart_with_the_same_tree_registers_nothing(lifecycle: Lifecycle) -> None:
    assert lifecycle.upserts["b"] == []


def test_a_changed_tree_is_registered_once(lifecycle: Lifecycle) -> None:
    assert lifecycle.upserts["c"] == [EVERY_COMMAND - {"model"}]


def test_raycord_discord_sync_forces_a_registration(lifecycle: Lifecycle) -> None:
    assert lifecycle.sync_exit == 0, lifecycle.sync_output
    assert lifecycle.upserts["sync"] == [EVERY_COMMAND]


def test_a_reply_continues_its_conversation_after_a_restart(lifecycle: Lifecycle) -> None:
    assert "what is my name?" in lifecycle.answers["b"]["content"]
    assert "I remember 1 earlier message" in lifecycle.answers["b"]["content"]


def test_a_reply_continues_its_conversation_after_a_sigkill(lifecycle: Lifecycle) -> None:
    assert "and now?" in lifecycle.answers["c"]["content"]
    assert "I remember 2 earlier message" in lifecycle.answers["c"]["content"]


def test_auto_thread_opens_a_thread_for_a_new_channel_conversation(lifecycle: Lifecycle) -> None:
    thread = lifecycle.thread
    assert thread["first"]["channel_id"] == thread["opened"]["id"]
    assert "start a thread about rays" in thread["first"]["content"]
    assert "go on" in thread["follow"]["content"]
    assert "I remember 1 earlier message" in thread["follow"]["content"]
