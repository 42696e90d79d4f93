"""`raycord run` against `raycord fake-discord`: Discord's real REST and Gateway on the wire.

One stand-in and one bot subprocess for the module (each test uses its own channel and
users). The bot connects to the session's Ray with `--address` (an embedded Ray per bot
process costs a long start on a shared 2-core machine) and keeps the edit throttle on.
"""

from __future__ import annotations

import base64
import itertools
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from actors.errors import ServiceUnavailable
from bot.discord_app import REFUSED, UNKNOWN_COMMAND
from tests.discord_harness import BotProcess, StandIn, answer_to, kill_services, reply_to, wait_for

INTERVAL = 1.0
EPHEMERAL = 1 << 6
MESSAGES = "/channels/{channel_id}/messages"
MESSAGE = "/channels/{channel_id}/messages/{message_id}"
# a 1x1 PNG
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


class World:
    def __init__(self, stand_in: StandIn, bot: BotProcess, blocked: str, namespace: str) -> None:
        self.namespace = namespace
        #: a test took a service away: the bot cannot drain at shutdown, so it is killed
        self.broken = False
        self.stand_in = stand_in
        self.bot = bot
        self.blocked = blocked
        self.guild = stand_in.state()["guilds"][0]["id"]

    def channel(self) -> str:
        return str(
            self.stand_in.call("channels", {"guild_id": self.guild, "name": uuid.uuid4().hex[:8]})["id"]
        )

    def user(self) -> str:
        return str(self.stand_in.call("users", {"name": f"u{uuid.uuid4().hex[:6]}"})["id"])

    def writes(self, channel: str) -> list[dict[str, Any]]:
        """The bot's message writes (sends and edits) in `channel`, oldest first."""
        return [
            r
            for r in self.stand_in.requests()
            if f"/channels/{channel}/messages" in r["path"] and r["method"] in ("POST", "PATCH")
        ]

    def interact(self, channel: str, user: str, **body: Any) -> dict[str, Any]:
        """Inject an interaction; returns the bot's first response to it (the callback body)."""
        ids = self.stand_in.call("interactions", {"channel_id": channel, "user_id": user, **body})

        def responded() -> dict[str, Any] | None:
            got = self.stand_in.call("interactions", id=ids["id"])
            return got if got["responses"] else None

        return wait_for("the interaction's response", responded)

    def answer(self, channel: str, user: str, **body: Any) -> dict[str, Any]:
        """Inject a command the bot defers; returns its answer (the response message once
        the first follow-up has replaced the "thinking" state)."""
        ids = self.stand_in.call("interactions", {"channel_id": channel, "user_id": user, **body})

        def answered() -> dict[str, Any] | None:
            got = self.stand_in.call("interactions", id=ids["id"])
            original = got["original"] or {}
            return original if original.get("content") else None

        return wait_for("the interaction's answer", answered)


@pytest.fixture(scope="module")
def world(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    stand_in = StandIn()
    namespace = f"wire-{uuid.uuid4().hex[:8]}"
    bot: BotProcess | None = None
    world: World | None = None
    try:
        blocked = str(stand_in.call("users", {"name": "blocked"})["id"])
        root = tmp_path_factory.mktemp("wire")
        bot = BotProcess(
            stand_in,
            root / "state",
            {"edit_interval_seconds": INTERVAL, "block_users": [blocked]},
            address=ray.get_runtime_context().gcs_address,
            namespace=namespace,
        )
        bot.wait_connected(0)
        world = World(stand_in, bot, blocked, namespace)
        yield world
    finally:
        if bot is not None:
            bot.stop(signal.SIGKILL if world is not None and world.broken else signal.SIGINT)
        kill_services(namespace)
        stand_in.stop()


def test_a_mention_is_answered_and_typing_shows_until_the_first_chunk(world: World) -> None:
    channel, user = world.channel(), world.user()
    asked = reply_to(world.stand_in, channel, user, "what is a ray actor?", mention_bot=True)
    answer = answer_to(world.stand_in, channel, asked["id"])
    assert "\u201cwhat is a ray actor?\u201d" in answer["content"]
    calls = [r for r in world.stand_in.requests() if f"/channels/{channel}/" in r["path"]]
    first_send = next(i for i, r in enumerate(calls) if r["route"] == MESSAGES and r["method"] == "POST")
    typing = [i for i, r in enumerate(calls) if r["route"].endswith("/typing")]
    assert typing and max(typing) < first_send


def test_raycord_run_says_who_it_logged_in_as(world: World) -> None:
    me = world.stand_in.call("state")["bot_user"]
    wait_for("the logged-in line", lambda: "logged in to Discord as" in world.bot.log() or None)
    lines = [line for line in world.bot.log().splitlines() if "logged in to Discord as" in line]
    assert len(lines) == 1 and me["username"] in lines[0], lines


def test_streamed_writes_in_one_channel_keep_the_throttle_final_edits_included(world: World) -> None:
    channel = world.channel()
    asked = [
        reply_to(world.stand_in, channel, world.user(), f"question {i} for the throttle", mention_bot=True)
        for i in range(2)
    ]
    for message in asked:
        answer_to(world.stand_in, channel, message["id"])
    times = [r["at"] for r in world.writes(channel) if r["status"] < 400]
    # two replies: each a send and a final edit, or one send when its first chunk had to
    # wait for the slot anyway; one write per interval at most, whichever reply it is
    assert len(times) >= 3
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= INTERVAL * 0.95, gaps


def test_a_blocked_user_is_refused_ephemerally_by_commands_menus_and_buttons(world: World) -> None:
    channel, user = world.channel(), world.user()
    for body in (
        {"name": "ask", "options": {"question": "secret?"}},
        {"name": "limits"},
        {"name": "Ask raycord", "command_type": 3, "target_message_id": _some_message(world, channel, user)},
    ):
        got = world.interact(channel, world.blocked, **body)
        response = got["responses"][0]
        assert response["type"] == 4, body
        assert response["data"]["content"] == REFUSED
        assert response["data"]["flags"] & EPHEMERAL
    # the forget confirmation's button, pressed by the blocked user, is refused the same way
    asked = world.interact(channel, user, name="forget")
    view = asked["original"]
    button = view["components"][0]["components"][0]
    pressed = world.interact(channel, world.blocked, custom_id=button["custom_id"], message_id=view["id"])
    assert pressed["responses"][0]["data"]["content"] == REFUSED
    # and the blocked user's mention gets no answer at all
    ignored = reply_to(world.stand_in, channel, world.blocked, "hello?", mention_bot=True)
    check = reply_to(world.stand_in, channel, user, "after the blocked one", mention_bot=True)
    answer_to(world.stand_in, channel, check["id"])
    replied_to = {
        (m.get("message_reference") or {}).get("message_id") for m in world.stand_in.bot_messages(channel)
    }
    assert ignored["id"] not in replied_to


def _some_message(world: World, channel: str, user: str) -> str:
    return str(reply_to(world.stand_in, channel, user, "a message to ask about")["id"])


def test_the_message_menu_answers_about_its_target(world: World) -> None:
    channel, user = world.channel(), world.user()
    target = reply_to(world.stand_in, channel, user, "why is the sky blue")
    ids = world.stand_in.call(
        "interactions",
        {
            "channel_id": channel,
            "user_id": user,
            "name": "Ask raycord",
            "command_type": 3,
            "target_message_id": target["id"],
        },
    )

    def answered() -> dict[str, Any] | None:
        got = world.stand_in.call("interactions", id=ids["id"])
        return got if "why is the sky blue" in (got["original"] or {}).get("content", "") else None

    got = wait_for("the menu's answer", answered)
    assert got["responses"][0]["type"] == 5  # deferred with "thinking", then edited


def test_limits_shows_used_left_and_when_each_window_frees_and_counts_nothing(world: World) -> None:
    channel, user = world.channel(), world.user()
    asked = reply_to(world.stand_in, channel, user, "count me", mention_bot=True)
    answer_to(world.stand_in, channel, asked["id"])
    first = world.answer(channel, user, name="limits")
    second = world.answer(channel, user, name="limits")
    assert first["flags"] & EPHEMERAL
    assert "message per minute: 1/" in first["content"] and "frees in" in first["content"]
    # asking for the limits counts nothing: the command budget is untouched after two asks
    assert "command per minute: 0/" in first["content"]
    assert "command per minute: 0/" in second["content"]


def test_an_unknown_command_gets_a_clear_ephemeral_answer(world: World) -> None:
    got = world.interact(world.channel(), world.user(), name="no-such-command")
    data = got["responses"][0]["data"]
    assert data["content"] == UNKNOWN_COMMAND and data["flags"] & EPHEMERAL


def test_an_interaction_answered_after_its_window_is_dropped_cleanly(world: World) -> None:
    channel, user = world.channel(), world.user()
    ids = world.stand_in.call(
        "interactions", {"channel_id": channel, "user_id": user, "name": "reset", "window": 0}
    )
    path = f"/interactions/{ids['id']}/"
    wait_for(
        "the late callback",
        lambda: [r for r in world.stand_in.requests() if r["path"].startswith(f"/api/v10{path}")],
    )
    wait_for("the logged drop", lambda: f"interaction {ids['id']}" in world.bot.log())
    assert "dropped" in world.bot.log().split(f"interaction {ids['id']}", 1)[1].split("\n", 1)[0]
    # nothing else broke: the next message is answered
    asked = reply_to(world.stand_in, channel, user, "still there?", mention_bot=True)
    answer_to(world.stand_in, channel, asked["id"])


def test_a_429_on_an_edit_is_waited_out_and_is_not_blamed_on_the_model(world: World) -> None:
    channel, user = world.channel(), world.user()
    world.stand_in.call("faults", {"method": "PATCH", "route": MESSAGE, "retry_after": 0.5})
    asked = reply_to(world.stand_in, channel, user, "edit me despite a 429", mention_bot=True)
    answer = answer_to(world.stand_in, channel, asked["id"])
    assert "couldn't reach the model" not in answer["content"]
    edits = [r for r in world.writes(channel) if r["method"] == "PATCH"]
    assert [r["status"] for r in edits] == [429, 200]
    assert edits[1]["at"] - edits[0]["at"] >= 0.5


def test_a_global_429_on_a_send_is_waited_out(world: World) -> None:
    channel, user = world.channel(), world.user()
    world.stand_in.call("faults", {"method": "POST", "route": MESSAGES, "retry_after": 0.3, "global": True})
    asked = reply_to(world.stand_in, channel, user, "send me despite a global 429", mention_bot=True)
    answer_to(world.stand_in, channel, asked["id"])
    sends = [r["status"] for r in world.writes(channel) if r["method"] == "POST"]
    assert sends[:2] == [429, 200]


def test_an_edit_of_a_deleted_reply_becomes_a_new_message(world: World) -> None:
    channel, user = world.channel(), world.user()
    asked = reply_to(world.stand_in, channel, user, "delete my reply before it is done", mention_bot=True)
    # the throttle holds the final edit back for an interval: delete the first send meanwhile
    first = wait_for("the first send", lambda: world.stand_in.bot_messages(channel))[0]
    world.stand_in.call("delete-message", {"channel_id": channel, "message_id": first["id"]})
    answer = answer_to(world.stand_in, channel, asked["id"])
    assert answer["id"] != first["id"]
    assert [r["status"] for r in world.writes(channel) if r["method"] == "PATCH"] == [404]
    assert "counted as a Discord error" in world.bot.log()


def test_a_gateway_drop_mid_reply_resumes_and_loses_nothing(world: World) -> None:
    channel, user = world.channel(), world.user()
    before = {s["session_id"]: s["resumes"] for s in world.stand_in.state()["sessions"]}
    first = reply_to(world.stand_in, channel, user, "before the drop", mention_bot=True)
    assert world.stand_in.call("drop", {})["dropped"] == 1
    # sent while the bot is away: the stand-in keeps it for the RESUME
    second = reply_to(world.stand_in, channel, user, "during the drop", mention_bot=True)
    answer_to(world.stand_in, channel, first["id"])
    answer_to(world.stand_in, channel, second["id"])
    after = {s["session_id"]: s["resumes"] for s in world.stand_in.state()["sessions"]}
    assert after.keys() == before.keys()  # resumed, not a new IDENTIFY
    assert sum(after.values()) == sum(before.values()) + 1


def test_a_thread_the_bot_answered_in_continues_without_a_mention(world: World) -> None:
    channel, user = world.channel(), world.user()
    thread = world.stand_in.call("threads", {"channel_id": channel, "name": "talk", "owner_id": user})["id"]
    asked = reply_to(world.stand_in, thread, user, "my name is Ada", mention_bot=True)
    answer_to(world.stand_in, thread, asked["id"])
    wait_for("the thread's turns and link to commit", lambda: _linked(world, thread))
    follow = reply_to(world.stand_in, thread, user, "what is my name?")
    answer = answer_to(world.stand_in, thread, follow["id"])
    assert "I remember 1 earlier message" in answer["content"]
    # in a thread the bot never answered, a message without a mention is left alone
    other = world.stand_in.call("threads", {"channel_id": channel, "name": "quiet", "owner_id": user})["id"]
    reply_to(world.stand_in, other, user, "just us here")
    check = reply_to(world.stand_in, other, user, "now you", mention_bot=True)
    answer_to(world.stand_in, other, check["id"])
    assert len(world.stand_in.bot_messages(other)) == 1


def _linked(world: World, message_id: str) -> bool:
    import sqlite3

    state = world.bot.log_path.parent / "state" / "context-0.sqlite"
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as db:
        return (
            db.execute("SELECT 1 FROM reply_links WHERE message_id = ?", (message_id,)).fetchone() is not None
        )


def test_an_image_attachment_is_read_from_the_cdn(world: World) -> None:
    channel, user = world.channel(), world.user()
    attachment = {
        "filename": "dot.png",
        "content_type": "image/png",
        "data_base64": base64.b64encode(PNG).decode(),
    }
    asked = reply_to(
        world.stand_in, channel, user, "what is this?", mention_bot=True, attachments=[attachment]
    )
    answer = answer_to(world.stand_in, channel, asked["id"])
    assert "You sent 1 image(s)" in answer["content"]


def _text(name: str, data: bytes, content_type: str | None = "text/plain") -> dict[str, Any]:
    file: dict[str, Any] = {"filename": name, "data_base64": base64.b64encode(data).decode()}
    if content_type is not None:
        file["content_type"] = content_type
    return file


def test_text_files_go_into_the_prompt_a_pdf_and_an_image_inline_and_the_excess_is_named(
    world: World,
) -> None:
    channel, user = world.channel(), world.user()
    files = [
        _text("dot.png", PNG, "image/png"),
        _text("paper.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "application/pdf"),
        _text("notes.md", b"# Plan\nship it", "text/markdown"),
        _text("data.csv", b"a,b\n1,2", None),
        *(_text(f"extra{i}.txt", b"more") for i in range(6)),
    ]
    asked = reply_to(world.stand_in, channel, user, "summarise", mention_bot=True, attachments=files)
    answer = answer_to(world.stand_in, channel, asked["id"])["content"]
    # the offline model quotes its prompt and counts the inline parts
    assert "summarise notes.md: ``` # Plan ship it ``` data.csv: ``` a,b 1,2 ```" in answer
    assert "You sent 2 image(s)" in answer
    refused = "; ".join(f"extra{i}.txt (over the limit of 4 files per message)" for i in range(6))
    assert answer.endswith(f"I left out {refused}.")


def test_bad_files_are_each_named_with_the_reason_and_the_message_is_still_answered(world: World) -> None:
    channel, user = world.channel(), world.user()
    files = [
        _text("legacy.txt", "café crème".encode("latin-1")),
        _text("empty.txt", b""),
        _text("fake.pdf", b"this is not a PDF", "application/pdf"),
        _text("../../etc/passwd", b"root:x:0:0"),
    ]
    asked = reply_to(world.stand_in, channel, user, "look at these", mention_bot=True, attachments=files)
    answer = answer_to(world.stand_in, channel, asked["id"])["content"]
    assert "you said \u201clook at these\u201d" in answer
    assert answer.endswith(
        "I left out legacy.txt (it is not UTF-8 text (a legacy encoding?); save it as UTF-8); "
        "empty.txt (it is empty); "
        "fake.pdf (it is labelled application/pdf but is not a PDF); "
        "../../etc/passwd (its name holds a path separator or a control character)."
    )
    # a 50 MB file is refused from its size alone, and a file name's control character shown
    big = {"filename": "huge.bin", "text": "x" * 50_000_000}  # 50 MB, served from the CDN
    bell = _text("bell\x07.txt", b"ding")
    asked = reply_to(world.stand_in, channel, user, "and these", mention_bot=True, attachments=[big, bell])
    answer = answer_to(world.stand_in, channel, asked["id"])["content"]
    assert answer.endswith(
        "I left out huge.bin (47.7 MiB; the limit for a file is 14.0 MiB); "
        "bell?.txt (its name holds a path separator or a control character)."
    )


def test_a_service_failure_in_a_command_gets_a_short_ephemeral_answer(world: World) -> None:
    # the last test of the module: the context store goes away for good
    world.broken = True
    ray.kill(ray.get_actor("context-0", namespace=world.namespace), no_restart=True)
    answer = world.answer(world.channel(), world.user(), name="reset")
    assert answer["flags"] & EPHEMERAL
    assert answer["content"] == ServiceUnavailable("context down").user_message()
