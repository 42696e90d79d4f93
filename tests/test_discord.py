"""The Discord front-end through discord.py's own event path (dpytest), on real actors.

dpytest stands in for Discord's servers; the bot, its handlers, the pipeline and the
Ray actors behind it are the real ones. Interaction responses (slash commands) go to a
recording webhook adapter, Discord's HTTP side for interactions, which dpytest lacks.
These are the unit-level cases, on the unsharded `RaycordClient` (dpytest refuses sharded
clients); the wire-level ones drive `raycord run` against `raycord fake-discord`
(tests/test_discord_wire.py, _restart.py, _shards.py).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import discord.ext.test as dpytest
import discord.ext.test.backend as dpy_backend
import discord.ext.test.factories as dpy_facts
import pytest
import pytest_asyncio
from discord.webhook.async_ import AsyncWebhookAdapter, async_context

from actors.ratelimit import RateLimitConfig, WindowLimits
from bot.config import DiscordSettings, Settings
from bot.discord_app import ForgetConfirm, RaycordClient, RaycordCommands, StreamedReply
from bot.discord_text import DISCORD_LIMIT
from bot.pipeline import ChatPipeline
from bot.runtime import Runtime
from tests.conftest import make_settings

_ids = itertools.count(1_000_000_000_000_000_001)


async def start_bot(settings: Settings, pipeline: ChatPipeline) -> RaycordClient:
    # dpytest keeps its fake members in the member cache, which needs the members intent
    intents = discord.Intents.default()
    intents.members = True
    bot = RaycordClient(settings, pipeline, intents=intents)
    await bot._async_setup_hook()
    dpytest.configure(bot, members=2)
    # dpytest's state predates discord.py setting the loop at login (typing() needs it)
    bot._connection.loop = asyncio.get_running_loop()
    await bot.setup_hook()
    return bot


@pytest_asyncio.fixture
async def bot(runtime: Runtime) -> AsyncIterator[RaycordClient]:
    assert runtime.pipeline is not None
    settings = runtime.settings.model_copy(
        update={"discord": DiscordSettings(edit_interval_seconds=0, admin_user_ids=[])}
    )
    client = await start_bot(settings, runtime.pipeline)
    yield client
    await dpytest.empty_queue()


def mention(bot: RaycordClient, text: str) -> str:
    assert bot.user is not None
    return f"<@{bot.user.id}> {text}"


def sent_messages(channel: discord.abc.Messageable) -> list[dict[str, Any]]:
    """Every message dpytest's backend holds for the channel, as Discord would store it."""
    backend = dpy_backend._cur_config
    assert backend is not None
    return backend.messages.setdefault(channel.id, [])  # type: ignore[attr-defined]


def bot_replies(bot: RaycordClient, channel: discord.abc.Messageable) -> list[str]:
    """What the bot has in the channel now, after every edit."""
    assert bot.user is not None
    stored = sent_messages(channel)
    return [m["content"] for m in stored if int(m["author"]["id"]) == bot.user.id]


async def settle(bot: RaycordClient) -> None:
    await dpytest.run_all_events()
    await bot.pipeline.writes.drain(10)


@pytest.mark.asyncio
async def test_a_mention_gets_a_reply(bot: RaycordClient) -> None:
    channel = dpytest.get_config().channels[0]
    await dpytest.message(mention(bot, "what is a ray actor?"), channel=channel)
    replies = bot_replies(bot, channel)
    assert len(replies) == 1
    assert "\u201cwhat is a ray actor?\u201d" in replies[0]


@pytest.mark.asyncio
async def test_messages_not_for_the_bot_are_ignored(bot: RaycordClient) -> None:
    channel = dpytest.get_config().channels[0]
    await dpytest.message("just chatting with friends", channel=channel)
    assert bot_replies(bot, channel) == []
    assert dpytest.verify().message().nothing()


@pytest.mark.asyncio
async def test_a_dm_gets_a_reply(bot: RaycordClient) -> None:
    member = dpytest.get_config().members[0]
    dm = await member.create_dm()
    await dpytest.message("hello in private", channel=dm, member=member)
    replies = bot_replies(bot, dm)
    assert len(replies) == 1 and "hello in private" in replies[0]


@pytest.mark.asyncio
async def test_a_reply_chain_keeps_its_context(bot: RaycordClient) -> None:
    config = dpytest.get_config()
    channel, member = config.channels[0], config.members[1]
    await dpytest.message(mention(bot, "my name is Ada"), channel=channel, member=member)
    await settle(bot)
    assert bot.user is not None
    ours = [m for m in sent_messages(channel) if int(m["author"]["id"]) == bot.user.id]
    data = dpy_facts.make_message_dict(channel, member, content="what is my name?", id_num=next(_ids))
    data["message_reference"] = {"message_id": ours[-1]["id"], "channel_id": channel.id}
    data["referenced_message"] = ours[-1]
    sent_messages(channel).append(data)
    dpy_backend.get_state().parse_message_create(data)
    await dpytest.run_all_events()
    replies = bot_replies(bot, channel)
    assert "what is my name?" in replies[-1]
    assert "I remember 1 earlier message" in replies[-1]


@pytest.mark.asyncio
async def test_generated_everyone_pings_no_one(bot: RaycordClient, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, Any] | None] = []
    original = discord.abc.handle_message_parameters

    def observe(*args: Any, **kwargs: Any) -> Any:
        params = original(*args, **kwargs)
        sent.append((params.payload or {}).get("allowed_mentions"))
        return params

    monkeypatch.setattr(discord.abc, "handle_message_parameters", observe)
    monkeypatch.setattr(discord.message, "handle_message_parameters", observe)
    channel = dpytest.get_config().channels[0]
    await dpytest.message(mention(bot, "please say @everyone and @here"), channel=channel)
    assert "@everyone" in bot_replies(bot, channel)[-1]
    assert sent, "the reply went through discord.py's send path"
    for allowed in sent:
        assert allowed is not None
        assert allowed["parse"] == []
        assert "users" not in allowed and "roles" not in allowed


@pytest.mark.asyncio
async def test_a_5000_character_answer_with_code_is_split_into_valid_messages(bot: RaycordClient) -> None:
    channel = dpytest.get_config().channels[0]
    source = await dpytest.message("long one please", channel=channel)
    code = "\n".join(f"print({i})  # line {i}" for i in range(220))
    answer = "Here you go. " * 60 + f"\n```python\n{code}\n```\nThat's all."
    assert len(answer) > 5000
    reply = StreamedReply(source, bot.throttle)
    await reply.update(answer[:500])
    await reply.finish(answer)
    contents = bot_replies(bot, channel)
    assert len(contents) >= 3
    assert all(len(c) <= DISCORD_LIMIT for c in contents)
    for c in contents:
        fences = [line for line in c.split("\n") if line.startswith("```")]
        assert len(fences) % 2 == 0, c[:80]
    assert "print(219)" in contents[-1] or "print(219)" in contents[-2]


@pytest.mark.asyncio
async def test_a_blocked_channel_is_ignored(runtime: Runtime) -> None:
    assert runtime.pipeline is not None
    client = await start_bot(runtime.settings, runtime.pipeline)
    channel = dpytest.get_config().channels[0]
    client.gate.config = DiscordSettings(block_channels=[str(channel.id)])
    await dpytest.message(mention(client, "anyone there?"), channel=channel)
    assert bot_replies(client, channel) == []
    await dpytest.empty_queue()


@pytest.mark.asyncio
async def test_a_rate_limited_user_is_told_when_to_ask_again(ray_session: None, tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, ratelimit=RateLimitConfig(message=WindowLimits(minute=1, hour=10, day=10))
    )
    rt = Runtime(settings)
    pipeline = await rt.start()
    try:
        client = await start_bot(settings, pipeline)
        channel = dpytest.get_config().channels[0]
        await dpytest.message(mention(client, "first"), channel=channel)
        await dpytest.message(mention(client, "second"), channel=channel)
        replies = bot_replies(client, channel)
        assert len(replies) == 2
        assert "Try again in" in replies[1]
        await dpytest.empty_queue()
    finally:
        await rt.shutdown(kill_actors=True)


# -- slash commands --------------------------------------------------------------------


class RecordingAdapter(AsyncWebhookAdapter):
    """Discord's interaction endpoints, recording what the bot answered."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def request(
        self,
        route: Any,
        session: Any,
        *,
        payload: dict[str, Any] | None = None,
        multipart: list[dict[str, Any]] | None = None,
        **_: Any,
    ) -> Any:
        body = payload or {}
        if multipart:
            import json

            body = json.loads(multipart[0]["value"])
        self.calls.append((route.method, route.path, body))
        if route.path.endswith("/callback"):
            return {"interaction": {"id": str(next(_ids)), "type": 2}}
        if route.method == "POST" and route.path.startswith("/webhooks/"):
            # an interaction follow-up: discord.py waits for the message Discord returns
            return {
                "id": str(next(_ids)),
                "channel_id": str(dpytest.get_config().channels[0].id),
                "author": {
                    "id": str(next(_ids)),
                    "username": "raycord",
                    "discriminator": "0",
                    "avatar": None,
                },
                "content": body.get("content", ""),
                "timestamp": "2024-01-01T00:00:00+00:00",
                "edited_timestamp": None,
                "tts": False,
                "mention_everyone": False,
                "mentions": [],
                "mention_roles": [],
                "attachments": [],
                "embeds": [],
                "pinned": False,
                "type": 0,
                "flags": body.get("flags", 0),
            }
        return None

    def texts(self) -> list[str]:
        out = []
        for _, _, body in self.calls:
            content = body.get("content") or body.get("data", {}).get("content")
            if content:
                out.append(content)
        return out


def interaction_data(
    bot: RaycordClient, member: discord.Member, kind: int, data: dict[str, Any]
) -> dict[str, Any]:
    """An interaction of `kind` (2: slash command, 3: component) from `member` in the
    first channel, as Discord's gateway delivers it."""
    channel = dpytest.get_config().channels[0]
    return {
        "id": str(next(_ids)),
        "application_id": str(bot.application_id or bot.user.id),  # type: ignore[union-attr]
        "type": kind,
        "token": "interaction-token",
        "version": 1,
        "channel_id": str(channel.id),
        # discord.py 2.7 takes the channel from this partial object
        "channel": {
            "id": str(channel.id),
            "type": 0,
            "guild_id": str(channel.guild.id),
            "name": channel.name,
            "position": 0,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
        },
        "guild_id": str(channel.guild.id),
        "member": {
            "user": {"id": str(member.id), "username": member.name, "discriminator": "0000", "avatar": None},
            "roles": [],
            "joined_at": "2024-01-01T00:00:00+00:00",
            "deaf": False,
            "flags": 0,
            "mute": False,
            "permissions": "0",
        },
        "app_permissions": "0",
        "attachment_size_limit": 8 * 2**20,
        "locale": "en-US",
        "guild_locale": "en-US",
        "entitlements": [],
        "data": data,
    }


async def invoke(
    bot: RaycordClient, command: str, member: discord.Member, **options: str
) -> RecordingAdapter:
    """Run a slash command as `member`; the adapter holds what the bot answered."""
    command_data = {
        "id": str(next(_ids)),
        "name": command,
        "type": 1,
        "options": [{"name": k, "type": 3, "value": v} for k, v in options.items()],
    }
    adapter = RecordingAdapter()
    token = async_context.set(adapter)
    try:
        payload = interaction_data(bot, member, 2, command_data)
        interaction = discord.Interaction(data=payload, state=bot._connection)  # type: ignore[arg-type]
        await bot.tree._call(interaction)
    finally:
        async_context.reset(token)
    return adapter


async def invoke_sub(
    bot: RaycordClient, group: str, command: str, member: discord.Member, **options: str
) -> RecordingAdapter:
    """Run the slash subcommand `group command` as `member`."""
    sub = {
        "name": command,
        "type": 1,
        "options": [{"name": k, "type": 3, "value": v} for k, v in options.items()],
    }
    command_data = {"id": str(next(_ids)), "name": group, "type": 1, "options": [sub]}
    adapter = RecordingAdapter()
    token = async_context.set(adapter)
    try:
        payload = interaction_data(bot, member, 2, command_data)
        interaction = discord.Interaction(data=payload, state=bot._connection)  # type: ignore[arg-type]
        await bot.tree._call(interaction)
    finally:
        async_context.reset(token)
    return adapter


async def click(
    bot: RaycordClient, button: discord.ui.Button[Any], member: discord.Member
) -> RecordingAdapter:
    """Press `button` as `member`; the adapter holds what the bot answered."""
    adapter = RecordingAdapter()
    token = async_context.set(adapter)
    try:
        payload = interaction_data(bot, member, 3, {"custom_id": button.custom_id, "component_type": 2})
        interaction = discord.Interaction(data=payload, state=bot._connection)  # type: ignore[arg-type]
        await button.callback(interaction)
    finally:
        async_context.reset(token)
    return adapter


@pytest.mark.asyncio
async def test_slash_ask_answers_and_is_cached_per_server(bot: RaycordClient) -> None:
    member = dpytest.get_config().members[0]
    question = f"what is ray? {next(_ids)}"
    llm = bot.pipeline.llm
    hits_before = sum(s.hits for s in await bot.pipeline.cache.stats())
    calls_before = llm.calls  # type: ignore[attr-defined]
    first = await invoke(bot, "ask", member, question=question)
    assert any(question in t for t in first.texts())
    await bot.pipeline.writes.drain(10)
    other = dpytest.get_config().members[1]
    second = await invoke(bot, "ask", other, question=question)
    assert second.texts() == first.texts()
    # the second member's answer came from the cache, not from the model
    assert llm.calls == calls_before + 1  # type: ignore[attr-defined]
    assert sum(s.hits for s in await bot.pipeline.cache.stats()) == hits_before + 1


@pytest.mark.asyncio
async def test_slash_reset_and_forget_clear_memory(bot: RaycordClient) -> None:
    config = dpytest.get_config()
    channel, member = config.channels[0], config.members[0]
    await dpytest.message(mention(bot, "remember me"), channel=channel, member=member)
    await settle(bot)
    scope = f"channel:{channel.id}"
    assert (await bot.pipeline.context.build(scope, str(member.id))).turns
    reset = await invoke(bot, "reset", member)
    assert reset.texts() == ["Conversation cleared."]
    assert (await bot.pipeline.context.build(scope, str(member.id))).turns == ()
    forget = await invoke(bot, "forget", member)
    assert "Sure?" in forget.texts()[0]
    buttons = [c for row in forget.calls[0][2]["data"]["components"] for c in row["components"]]
    assert [b["label"] for b in buttons] == ["Forget me", "Cancel"]


@pytest.mark.asyncio
async def test_the_forget_button_deletes_conversations_and_cached_replies_for_its_user_only(
    bot: RaycordClient,
) -> None:
    config = dpytest.get_config()
    channel, member, other = config.channels[0], config.members[0], config.members[1]
    scope = f"channel:{channel.id}"
    question = f"remember me {next(_ids)}"
    await dpytest.message(mention(bot, question), channel=channel, member=member)
    await settle(bot)
    assert (await bot.pipeline.context.build(scope, str(member.id))).turns
    cached = sum(s.entries for s in await bot.pipeline.cache.stats())
    asked = await invoke(bot, "ask", member, question=question)
    await bot.pipeline.writes.drain(10)
    assert sum(s.entries for s in await bot.pipeline.cache.stats()) == cached + 1
    cog = bot.get_cog("RaycordCommands")
    assert isinstance(cog, RaycordCommands)
    # the view the /forget command sends; its buttons answer only the user who asked
    view = ForgetConfirm(cog, member.id)
    confirm = view.children[0]
    assert isinstance(confirm, discord.ui.Button) and confirm.label == "Forget me"
    refused = await click(bot, confirm, other)
    assert refused.texts() == ["This button is not for you."]
    assert (await bot.pipeline.context.build(scope, str(member.id))).turns
    done = await click(bot, confirm, member)
    [text] = done.texts()
    assert text.startswith("Done: I deleted 1 conversation(s), 2 cached reply(ies)")
    assert text.endswith("Your rate-limit counts are kept: forgetting them would reset your limits.")
    assert (await bot.pipeline.context.build(scope, str(member.id))).turns == ()
    # the /ask reply cached for the server was written for this user: it is gone too
    calls = bot.pipeline.llm.calls  # type: ignore[attr-defined]
    again = await invoke(bot, "ask", other, question=question)
    assert again.texts() == asked.texts()
    assert bot.pipeline.llm.calls == calls + 1  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_slash_limits_shows_the_budget_and_admin_commands_need_an_admin(bot: RaycordClient) -> None:
    member = dpytest.get_config().members[0]
    limits = await invoke(bot, "limits", member)
    assert "minute:" in limits.texts()[0] and "left" in limits.texts()[0]
    refused = await invoke(bot, "stats", member)
    assert refused.texts() == ["That command is for the bot's admins."]
    refused_model = await invoke(bot, "model", member, name="gemini-2.5-pro")
    assert refused_model.texts() == ["Choosing the model needs the Manage Server permission."]
    bot.gate.config = bot.gate.config.model_copy(update={"admin_user_ids": [str(member.id)]})
    stats = await invoke(bot, "stats", member)
    assert "hit rate" in stats.texts()[0]
    before = bot.pipeline.model
    server = str(member.guild.id)
    try:
        unknown = await invoke(bot, "model", member, name="gemini-x")
        assert "gemini-x is not an allowed model; choose one of gemini-2.5-flash" in unknown.texts()[0]
        switched = await invoke(bot, "model", member, name="gemini-2.5-pro")
        assert switched.texts() == [f"This server's model switched from {before} to gemini-2.5-pro."]
        # the server's choice persists in the context store; the front-end's default is unchanged
        assert bot.pipeline.model == before
        assert await bot.pipeline.server_model(server) == "gemini-2.5-pro"
        assert "model: gemini-2.5-pro" in (await invoke(bot, "stats", member)).texts()[0]
    finally:
        await bot.pipeline.set_model(server, "")


@pytest.mark.asyncio
async def test_persona_needs_manage_server_and_is_shown_and_reset(bot: RaycordClient) -> None:
    member = dpytest.get_config().members[0]
    server = str(member.guild.id)
    refused = await invoke_sub(bot, "persona", "set", member, text="You are a pirate.")
    assert refused.texts() == ["Changing the persona needs the Manage Server permission."]
    assert (await invoke_sub(bot, "persona", "show", member)).texts() == ["This server has no persona."]
    bot.gate.config = bot.gate.config.model_copy(update={"admin_user_ids": [str(member.id)]})
    try:
        done = await invoke_sub(bot, "persona", "set", member, text="You are a pirate.")
        assert done.texts() == ["Persona set (17 characters)."]
        shown = await invoke_sub(bot, "persona", "show", member)
        assert shown.texts() == ["This server's persona:\nYou are a pirate."]
        assert await bot.pipeline.persona(server) == "You are a pirate."
        empty = await invoke_sub(bot, "persona", "set", member, text="   ")
        assert "a persona cannot be empty" in empty.texts()[0]
        assert (await invoke_sub(bot, "persona", "reset", member)).texts() == ["Persona removed."]
        assert await bot.pipeline.persona(server) == ""
    finally:
        bot.gate.config = bot.gate.config.model_copy(update={"admin_user_ids": []})
        await bot.pipeline.reset_persona(server)


@pytest.mark.asyncio
async def test_an_upstream_500_gives_the_friendly_message(runtime: Runtime) -> None:
    from bot.config import LLMSettings
    from bot.llm.fake_server import FakeGemini, FakeGeminiConfig
    from bot.llm.gemini import GeminiLLM

    server = FakeGemini(config=FakeGeminiConfig(latency=0.0))
    url = await server.start()
    settings = runtime.settings.model_copy(
        update={
            "llm": LLMSettings(
                base_url=url, max_attempts=2, backoff_base_seconds=0.01, backoff_max_seconds=0.02
            )
        }
    )
    llm = GeminiLLM(settings)
    pipeline = ChatPipeline(
        settings,
        cache=runtime.clients["cache"],  # type: ignore[arg-type]
        context=runtime.clients["context"],  # type: ignore[arg-type]
        limiter=runtime.clients["ratelimit"],  # type: ignore[arg-type]
        analytics=runtime.clients["analytics"],  # type: ignore[arg-type]
        llm=llm,
    )
    try:
        client = await start_bot(settings, pipeline)
        channel = dpytest.get_config().channels[0]
        server.fail_next(5, "500")
        await dpytest.message(mention(client, "are you there?"), channel=channel)
        replies = bot_replies(client, channel)
        assert replies == ["I couldn't reach the model just now. Please try again in a moment."]
        assert server.calls == 2  # retried once, then gave up with a friendly reply
        await dpytest.empty_queue()
    finally:
        await pipeline.writes.drain(10)
        await llm.aclose()
        await server.stop()
