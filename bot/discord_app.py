"""The Discord front-end: discord.py client, message handling, slash commands.

Answers mentions, DMs, replies to its own messages (across restarts: the links live in the
context store) and threads it answered in; streams long answers by editing its reply (at
most one write per channel per interval); never pings anyone from generated text; every
entry (messages, commands, buttons, context menus) passes one gate, and every typed error
becomes a short, friendly reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import discord
import yarl
from discord import app_commands
from discord.ext import commands

from actors import metrics
from actors.errors import RaycordError
from actors.schemas import Attachment, IncomingMessage
from bot.attachments import Fetch
from bot.config import DiscordSettings, Settings
from bot.discord_text import DISCORD_LIMIT, split_message
from bot.pipeline import FORGET_QUESTION, ChatPipeline, Forgotten

log = logging.getLogger(__name__)

#: generated text may contain @everyone, role or user mentions: none of them notify; the
#: reply itself notifies the one person it answers
NO_PINGS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)
SOMETHING_WENT_WRONG = "Something went wrong on my side. Please try again."
REFUSED = "I'm not available to you here."
UNKNOWN_COMMAND = "I don't know that command any more; it may have been removed. Try /ask."
#: Discord's "Unknown interaction": the 3-second window (or the token) has passed
_UNKNOWN_INTERACTION = 10062
_UNKNOWN_MESSAGE = 10008
COMMAND_HASH_FILE = "discord-commands.json"
DISCORD_API_BASE = "https://discord.com"


class Gate:
    """Who and where the bot answers, from the allow and block lists in config: one rule
    for messages, slash commands, context menus and buttons."""

    def __init__(self, config: DiscordSettings) -> None:
        self.config = config

    @staticmethod
    def _passes(value: str | None, allow: list[str], block: list[str]) -> bool:
        if value is not None and value in block:
            return False
        return not allow or (value is not None and value in allow)

    def admits(
        self,
        *,
        guild: int | None,
        channel: int | None,
        parent: int | None,
        user: int,
        roles: list[int],
    ) -> bool:
        c = self.config
        if guild is None and not c.answer_dms:
            return False
        if guild is not None and not self._passes(str(guild), c.allow_servers, c.block_servers):
            return False
        channels_ok = self._passes(
            None if channel is None else str(channel), c.allow_channels, c.block_channels
        )
        if parent is not None and str(parent) in c.block_channels:
            channels_ok = False
        if not channels_ok:
            return False
        if not self._passes(str(user), c.allow_users, c.block_users):
            return False
        role_ids = [str(r) for r in roles]
        if any(r in c.block_roles for r in role_ids):
            return False
        return not c.allow_roles or any(r in c.allow_roles for r in role_ids)

    def allows(self, message: discord.Message) -> bool:
        return self.admits(
            guild=message.guild.id if message.guild else None,
            channel=message.channel.id,
            parent=getattr(message.channel, "parent_id", None),
            user=message.author.id,
            roles=[r.id for r in getattr(message.author, "roles", [])],
        )

    def allows_interaction(self, interaction: discord.Interaction[Any]) -> bool:
        return self.admits(
            guild=interaction.guild_id,
            channel=interaction.channel_id,
            parent=getattr(interaction.channel, "parent_id", None),
            user=interaction.user.id,
            roles=[r.id for r in getattr(interaction.user, "roles", [])],
        )

    def is_admin(self, user_id: int) -> bool:
        return str(user_id) in self.config.admin_user_ids


class EditThrottle:
    """At most one write (the first send or an edit) of a streamed reply per channel per
    `interval` seconds; other channels are unaffected."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next: dict[int, float] = {}

    def ready(self, channel_id: int) -> bool:
        """Take the channel's slot if it is free now."""
        now = asyncio.get_running_loop().time()
        if now < self._next.get(channel_id, float("-inf")):
            return False
        self._next[channel_id] = now + self.interval
        return True

    async def wait(self, channel_id: int) -> None:
        """Take the channel's next free slot, waiting for it (a final edit must not be skipped)."""
        now = asyncio.get_running_loop().time()
        at = max(now, self._next.get(channel_id, float("-inf")))
        self._next[channel_id] = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)


class DiscordErrors:
    """Discord API failures of the front-end, counted apart from the model's errors."""

    def __init__(self) -> None:
        self.count = 0
        self._counter = metrics.counter(
            "discord_errors", "Discord API calls the front-end made that failed", ("operation", "status")
        )

    def record(self, operation: str, exc: discord.HTTPException) -> None:
        self.count += 1
        self._counter.inc(tags={"operation": operation, "status": str(exc.status)})
        log.warning(
            "Discord refused %s: %s %s (code %s); counted as a Discord error",
            operation,
            exc.status,
            exc.text,
            exc.code,
        )


def _retry_after(exc: discord.HTTPException) -> float:
    headers = getattr(exc.response, "headers", {}) or {}
    try:
        return float(headers.get("Retry-After", 1.0))
    except ValueError:
        return 1.0


class StreamedReply:
    """One reply that grows as chunks arrive, then is split into messages when done.

    A Discord failure while streaming never reaches the pipeline (it is not the model's):
    it is counted, the text is kept, and `finish` retries after Discord's `retry_after`
    or sends a new message when the one being edited is gone."""

    def __init__(
        self,
        source: discord.Message,
        throttle: EditThrottle,
        *,
        target: discord.abc.Messageable | None = None,
        errors: DiscordErrors | None = None,
        on_first: Any = None,
    ) -> None:
        self.source = source
        self.throttle = throttle
        #: where the reply goes: the source's channel (as a reply), or a thread opened for it
        self.target = target
        self.errors = errors or DiscordErrors()
        self.on_first = on_first
        self.messages: list[discord.Message] = []
        self._shown = ""

    @property
    def _channel_id(self) -> int:
        target = self.target if self.target is not None else self.source.channel
        return int(getattr(target, "id", self.source.channel.id))

    async def _send(self, text: str) -> discord.Message:
        if self.on_first is not None:
            first, self.on_first = self.on_first, None
            await first()
        if self.target is not None:
            return await self.target.send(text, allowed_mentions=NO_PINGS)
        return await self.source.reply(text, allowed_mentions=NO_PINGS)

    async def update(self, text: str) -> None:
        preview = text if len(text) <= DISCORD_LIMIT else text[: DISCORD_LIMIT - 1] + "\u2026"
        if not preview.strip() or preview == self._shown:
            return
        if not self.throttle.ready(self._channel_id):
            return
        try:
            if not self.messages:
                self.messages.append(await self._send(preview))
            else:
                await self.messages[0].edit(content=preview, allowed_mentions=NO_PINGS)
            self._shown = preview
        except discord.HTTPException as exc:
            self.errors.record("a streamed edit" if self.messages else "a reply", exc)
            if isinstance(exc, discord.NotFound) and self.messages:
                # the message being edited is gone: the final text goes to a new one
                self.messages.clear()

    async def finish(self, text: str) -> list[discord.Message]:
        parts = split_message(text) if text.strip() else ["(no answer)"]
        if not self.messages or parts[0] != self._shown:
            await self._write_first(parts[0])
        for part in parts[1:]:
            target = self.target if self.target is not None else self.source.channel
            self.messages.append(await target.send(part, allowed_mentions=NO_PINGS))
        return self.messages

    async def _write_first(self, text: str) -> None:
        """The final text of the first message: edited in place, within the throttle;
        once more after Discord's `retry_after`; a new message when the original is gone."""
        for attempt in range(2):
            await self.throttle.wait(self._channel_id)
            try:
                if self.messages:
                    await self.messages[0].edit(content=text, allowed_mentions=NO_PINGS)
                else:
                    self.messages.append(await self._send(text))
                self._shown = text
                return
            except discord.NotFound as exc:
                self.errors.record("the final edit", exc)
                if exc.code != _UNKNOWN_MESSAGE or not self.messages:
                    raise
                self.messages.clear()
            except discord.HTTPException as exc:
                self.errors.record("the final edit", exc)
                if exc.status != 429 or attempt:
                    raise
                await asyncio.sleep(_retry_after(exc))
        if not self.messages:
            self.messages.append(await self._send(text))
            self._shown = text


class RaycordTree(app_commands.CommandTree[Any]):
    """The command tree: every interaction passes the bot's gate first, and one error
    handler turns any failure into a short ephemeral answer."""

    async def interaction_check(self, interaction: discord.Interaction[Any], /) -> bool:
        bot = self.client
        if not isinstance(bot, RaycordClient) or bot.gate.allows_interaction(interaction):
            return True
        await answer_ephemeral(interaction, REFUSED)
        return False

    async def on_error(
        self, interaction: discord.Interaction[Any], error: app_commands.AppCommandError, /
    ) -> None:
        cause: BaseException = error
        if isinstance(error, app_commands.CommandInvokeError):
            cause = error.original
        if isinstance(cause, app_commands.CommandNotFound):
            log.warning("interaction for an unknown command %r", cause.name)
            text = UNKNOWN_COMMAND
        elif isinstance(cause, RaycordError):
            text = cause.user_message()
        elif isinstance(cause, discord.NotFound) and cause.code == _UNKNOWN_INTERACTION:
            log.warning("interaction %s answered after its window; dropped", interaction.id)
            return
        else:
            log.error("command %s failed", getattr(interaction.command, "name", "?"), exc_info=cause)
            text = SOMETHING_WENT_WRONG
        await answer_ephemeral(interaction, text)


async def answer_ephemeral(interaction: discord.Interaction[Any], text: str) -> None:
    """An ephemeral answer, as a response or a follow-up; an expired interaction is a logged drop."""
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_PINGS)
        else:
            await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_PINGS)
    except discord.HTTPException as exc:
        log.warning("could not answer interaction %s (%s %s); dropped", interaction.id, exc.status, exc.text)


class RaycordClient(commands.Bot):
    """The discord.py client wired to one `ChatPipeline` (one gateway connection; `RaycordBot`
    runs the same over shards)."""

    def __init__(self, settings: Settings, pipeline: ChatPipeline | None, **options: Any) -> None:
        intents = options.pop("intents", None) or discord.Intents.default()
        intents.message_content = True
        config = settings.discord
        if config.shard_count is not None:
            options.setdefault("shard_count", config.shard_count)
        if config.shard_ids is not None:
            options.setdefault("shard_ids", config.shard_ids)
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=NO_PINGS,
            tree_cls=RaycordTree,
            **options,
        )
        self.settings = settings
        self._pipeline = pipeline
        self.gate = Gate(config)
        self.throttle = EditThrottle(config.edit_interval_seconds)
        self.discord_errors = DiscordErrors()
        #: threads this process saw the bot answer in (the durable record is in the context store)
        self._answered_threads: set[int] = set()

    @property
    def pipeline(self) -> ChatPipeline:
        if self._pipeline is None:
            raise RuntimeError("this client was built to sync commands; it has no pipeline")
        return self._pipeline

    async def setup_hook(self) -> None:
        await self.add_cog(RaycordCommands(self))
        for name in self.settings.discord.disabled_commands:
            self.tree.remove_command(name)

    # -- command registration ---------------------------------------------------------

    def _sync_targets(self) -> list[discord.Object | None]:
        ids = self.settings.discord.sync_guild_ids
        return [discord.Object(id=int(g)) for g in ids] if ids else [None]

    def command_payload(self, guild: discord.Object | None) -> list[dict[str, Any]]:
        """What a sync sends for `guild` (None: global), as discord.py builds it."""
        if guild is not None:
            self.tree.copy_global_to(guild=guild)
        return [c.to_dict(self.tree) for c in self.tree.get_commands(guild=guild)]

    async def sync_commands(self, force: bool = False) -> int:
        """Register the command tree where it differs from the last successful sync (a hash
        per target in the state directory); returns how many targets were synced."""
        path = self.settings.state_dir / COMMAND_HASH_FILE
        try:
            synced: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            log.warning("unreadable %s; syncing the command tree", path)
            synced = {}
        done = 0
        for guild in self._sync_targets():
            target = "global" if guild is None else str(guild.id)
            payload = self.command_payload(guild)
            digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
            if not force and synced.get(target) == digest:
                continue
            try:
                await self.tree.sync(guild=guild)
            except discord.HTTPException as exc:
                self.discord_errors.record(f"the command sync ({target})", exc)
                continue
            synced[target] = digest
            done += 1
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(synced, indent=2))
            tmp.replace(path)
            log.info("synced %d commands to %s", len(payload), target)
        return done

    # -- messages ----------------------------------------------------------------------

    async def conversation_of(self, message: discord.Message) -> tuple[str, bool] | None:
        """The scope of the conversation `message` belongs to, and whether it starts a new
        conversation in a channel (which `auto_thread` moves to a thread); None if not for us."""
        me = self.user
        if me is None:
            return None
        ref = message.reference
        if ref is not None and ref.message_id is not None:
            resolved = ref.resolved
            if isinstance(resolved, discord.Message) and resolved.author.id == me.id:
                linked = await self.pipeline.context.reply_scope(str(ref.message_id))
                return linked or f"chain:{ref.message_id}", False
        if message.guild is None:
            return f"dm:{message.author.id}", False
        if isinstance(message.channel, discord.Thread):
            thread = message.channel
            if me in message.mentions or thread.id in self._answered_threads:
                return f"thread:{thread.id}", False
            linked = await self.pipeline.context.reply_scope(str(thread.id))
            if linked is None:
                return None
            self._answered_threads.add(thread.id)
            return linked, False
        if me in message.mentions:
            return f"channel:{message.channel.id}", True
        return None

    def _replied_user(self, message: discord.Message) -> str | None:
        """The other user this message replies to, for the server's social graph."""
        ref = message.reference
        resolved = ref.resolved if ref is not None else None
        if isinstance(resolved, discord.Message) and resolved.author != self.user:
            return str(resolved.author.id)
        return None

    def _link(self, scope: str, user: str, ids: list[int]) -> None:
        """Make replies to these messages continue the conversation, after any restart."""
        message_ids = [str(i) for i in ids]
        context = self.pipeline.context
        self.pipeline.writes.submit(
            "context.link_replies", lambda: context.link_replies(scope, user, message_ids)
        )

    def _prompt_text(self, message: discord.Message) -> str:
        text = message.content
        if self.user is not None:
            for form in (f"<@{self.user.id}>", f"<@!{self.user.id}>"):
                text = text.replace(form, "")
        return text.strip()

    @staticmethod
    def _attachments(message: discord.Message) -> tuple[tuple[Attachment, ...], Fetch]:
        """The message's files as metadata, and how to download one: the pipeline fetches
        them only after the rate-limit check, and only those the attachment policy lets by."""
        files = tuple(
            Attachment(filename=a.filename, content_type=a.content_type, size=a.size, url=a.url)
            for a in message.attachments
        )
        by_url = {a.url: a for a in message.attachments}

        async def fetch(attachment: Attachment) -> bytes:
            return await by_url[attachment.url or ""].read()

        return files, fetch

    async def _open_thread(self, message: discord.Message) -> discord.Thread | None:
        """With `auto_thread`, a new channel conversation gets its own thread."""
        if not self.settings.discord.auto_thread or not isinstance(message.channel, discord.TextChannel):
            return None
        name = (self._prompt_text(message) or "conversation")[:90]
        try:
            return await message.create_thread(name=name)
        except discord.HTTPException as exc:
            self.discord_errors.record("opening a thread", exc)
            return None

    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or (self.user is not None and message.author.id == self.user.id):
            return
        if not self.gate.allows(message):
            return
        try:
            found = await self.conversation_of(message)
            if found is None:
                return
            scope, new_in_channel = found
            thread = await self._open_thread(message) if new_in_channel else None
            if thread is not None:
                scope = f"thread:{thread.id}"
            files, fetch = self._attachments(message)
            incoming = IncomingMessage(
                text=self._prompt_text(message),
                user_id=str(message.author.id),
                user_name=message.author.display_name,
                scope=scope,
                server_id=str(message.guild.id) if message.guild else None,
                channel_id=str(message.channel.id),
                message_id=str(message.id),
                mentions=tuple(str(u.id) for u in message.mentions if u != self.user),
                reply_to_user=self._replied_user(message),
                attachments=files,
            )
            await self._answer(message, incoming, thread, fetch)
        except RaycordError as exc:
            await self._reply_safely(message, exc.user_message())
        except Exception:
            log.exception("failed to answer message %s", message.id)
            await self._reply_safely(message, SOMETHING_WENT_WRONG)

    async def _answer(
        self,
        message: discord.Message,
        incoming: IncomingMessage,
        thread: discord.Thread | None,
        fetch: Fetch | None = None,
    ) -> None:
        target: discord.abc.Messageable = thread if thread is not None else message.channel
        async with contextlib.AsyncExitStack() as typing:
            # typing shows until the first chunk is on screen, not for the whole stream
            await typing.enter_async_context(target.typing())
            reply = StreamedReply(
                message, self.throttle, target=thread, errors=self.discord_errors, on_first=typing.aclose
            )
            answer = await self.pipeline.handle(incoming, on_chunk=reply.update, fetch=fetch)
            sent = await reply.finish(answer.text)
        ids = [m.id for m in sent]
        if isinstance(target, discord.Thread):
            self._answered_threads.add(target.id)
            ids.append(target.id)
        self._link(incoming.scope, incoming.user_id, ids)

    async def _reply_safely(self, message: discord.Message, text: str) -> None:
        try:
            await message.reply(text, allowed_mentions=NO_PINGS)
        except discord.HTTPException as exc:
            self.discord_errors.record("an error reply", exc)


class RaycordBot(RaycordClient, commands.AutoShardedBot):
    """The front-end `raycord run` starts: `RaycordClient` over the configured gateway shards
    (`discord.shard_count`, `discord.shard_ids`; Discord's recommendation when unset), which
    registers its command tree at start when it changed since the last sync (unless
    `sync_at_start` is False: front-end actors leave the sync to their driver)."""

    def __init__(
        self, settings: Settings, pipeline: ChatPipeline | None, *, sync_at_start: bool = True, **options: Any
    ) -> None:
        super().__init__(settings, pipeline, **options)
        self.sync_at_start = sync_at_start

    async def setup_hook(self) -> None:
        await super().setup_hook()
        # after login (the application id is known), before the gateway connects
        if self.settings.discord.api_base_url != DISCORD_API_BASE:
            await self._use_base_gateway()
        if self.sync_at_start:
            await self.sync_commands()

    async def _use_base_gateway(self) -> None:
        """With a fixed shard count, and when a reconnect fails, discord.py connects to
        `DiscordWebSocket.DEFAULT_GATEWAY` (a public class attribute) instead of asking
        `/gateway/bot`: point it at the gateway of the configured API base."""
        _, url, _ = await self.http.get_bot_gateway()
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)


class ForgetConfirm(discord.ui.View):
    """Two buttons: forgetting everything about a user needs their confirmation."""

    def __init__(self, commands_cog: RaycordCommands, user_id: int) -> None:
        super().__init__(timeout=60)
        self.cog = commands_cog
        self.user_id = user_id

    async def interaction_check(self, interaction: discord.Interaction[Any], /) -> bool:
        """Buttons pass the same gate as every other entry."""
        if self.cog.bot.gate.allows_interaction(interaction):
            return True
        await answer_ephemeral(interaction, REFUSED)
        return False

    async def on_error(self, interaction: discord.Interaction[Any], error: Exception, item: Any, /) -> None:
        if isinstance(error, RaycordError):
            await answer_ephemeral(interaction, error.user_message())
            return
        log.error("button %s failed", getattr(item, "label", item), exc_info=error)
        await answer_ephemeral(interaction, SOMETHING_WENT_WRONG)

    @discord.ui.button(label="Forget me", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, _: discord.ui.Button[ForgetConfirm]) -> None:
        if interaction.user.id != self.user_id:
            await interaction.response.send_message("This button is not for you.", ephemeral=True)
            return
        forgotten = await self.cog.forget_user(str(self.user_id))
        self.stop()
        await interaction.response.edit_message(content=forgotten.message(), view=None)

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, _: discord.ui.Button[ForgetConfirm]) -> None:
        self.stop()
        await interaction.response.edit_message(content="Nothing was deleted.", view=None)


def _frees_in(seconds: float) -> str:
    if seconds <= 0:
        return "nothing counted"
    if seconds < 120:
        return f"frees in {seconds:.0f}s"
    if seconds < 7200:
        return f"frees in {seconds / 60:.0f} min"
    return f"frees in {seconds / 3600:.1f} h"


class RaycordCommands(commands.Cog):
    """Slash commands /ask /reset /forget /limits /stats /model, and the "Ask raycord"
    message menu. Failures go to the tree's one error handler."""

    def __init__(self, bot: RaycordClient) -> None:
        self.bot = bot
        self.ask_menu = app_commands.ContextMenu(name="Ask raycord", callback=self._ask_about_message)
        bot.tree.add_command(self.ask_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.ask_menu.name, type=self.ask_menu.type)

    @property
    def pipeline(self) -> ChatPipeline:
        return self.bot.pipeline

    @staticmethod
    def _scope(interaction: discord.Interaction) -> str:
        if interaction.guild_id is None:
            return f"dm:{interaction.user.id}"
        if isinstance(interaction.channel, discord.Thread):
            return f"thread:{interaction.channel_id}"
        return f"channel:{interaction.channel_id}"

    async def forget_user(self, user_id: str) -> Forgotten:
        return await self.pipeline.forget(user_id)

    async def _send(self, interaction: discord.Interaction, text: str, *, ephemeral: bool = True) -> None:
        parts = split_message(text)
        if interaction.response.is_done():
            for part in parts:
                await interaction.followup.send(part, ephemeral=ephemeral, allowed_mentions=NO_PINGS)
            return
        await interaction.response.send_message(parts[0], ephemeral=ephemeral, allowed_mentions=NO_PINGS)
        for part in parts[1:]:
            await interaction.followup.send(part, ephemeral=ephemeral, allowed_mentions=NO_PINGS)

    @staticmethod
    async def _defer(interaction: discord.Interaction) -> None:
        """Acknowledge within Discord's 3-second window before calling a service, so a slow or
        failing service still gets its (ephemeral) answer to the user as a follow-up."""
        await interaction.response.defer(ephemeral=True, thinking=True)

    async def _admin_only(self, interaction: discord.Interaction) -> bool:
        if self.bot.gate.is_admin(interaction.user.id):
            return True
        await self._send(interaction, "That command is for the bot's admins.")
        return False

    async def _one_off(self, interaction: discord.Interaction, question: str) -> None:
        await interaction.response.defer(thinking=True)
        try:
            reply = await self.pipeline.handle(
                IncomingMessage(
                    text=question,
                    user_id=str(interaction.user.id),
                    user_name=interaction.user.display_name,
                    scope=self._scope(interaction),
                    server_id=str(interaction.guild_id) if interaction.guild_id else None,
                    channel_id=str(interaction.channel_id),
                    kind="command",
                    stateless=True,
                    cache_scope="server" if interaction.guild_id else "user",
                )
            )
            text = reply.text
        except RaycordError as exc:
            text = exc.user_message()
        await self._send(interaction, text, ephemeral=False)

    @app_commands.command(name="ask", description="Ask a one-off question (no conversation memory)")
    @app_commands.describe(question="What you want to know")
    async def ask(self, interaction: discord.Interaction, question: str) -> None:
        await self._one_off(interaction, question)

    async def _ask_about_message(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await self._one_off(interaction, message.content)

    @app_commands.command(name="reset", description="Clear my conversation with the bot in this channel")
    async def reset(self, interaction: discord.Interaction) -> None:
        await self._defer(interaction)
        cleared = await self.pipeline.reset(self._scope(interaction), str(interaction.user.id))
        await self._send(interaction, "Conversation cleared." if cleared else "There was nothing to clear.")

    @app_commands.command(name="forget", description="Delete everything the bot remembers about me")
    async def forget(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(
            FORGET_QUESTION,
            view=ForgetConfirm(self, interaction.user.id),
            ephemeral=True,
        )

    @app_commands.command(name="limits", description="My message and command budget (asking costs nothing)")
    async def limits(self, interaction: discord.Interaction) -> None:
        await self._defer(interaction)
        usage = await self.pipeline.limits(
            str(interaction.user.id), str(interaction.guild_id) if interaction.guild_id else None
        )
        lines = [
            f"{u.kind} per {u.window}: {u.used}/{u.limit} used, {u.left} left, {_frees_in(u.frees_in)}"
            for u in usage
        ]
        await self._send(
            interaction, "Your budget:\n" + "\n".join(lines) if lines else "No limits apply to you."
        )

    @app_commands.command(name="stats", description="(admins) cache hit rate, latency, queue depths")
    async def stats(self, interaction: discord.Interaction) -> None:
        if not await self._admin_only(interaction):
            return
        await self._defer(interaction)
        lines = (
            await self.pipeline.summary(str(interaction.guild_id) if interaction.guild_id else None)
        ).lines()
        await self._send(interaction, "\n".join(lines))

    persona = app_commands.Group(
        name="persona", description="This server's persona for the bot (Manage Server)", guild_only=True
    )

    async def _may_manage_server(
        self, interaction: discord.Interaction, what: str = "Changing the persona"
    ) -> bool:
        member = interaction.user
        if self.bot.gate.is_admin(member.id) or (
            isinstance(member, discord.Member) and member.guild_permissions.manage_guild
        ):
            return True
        await self._send(interaction, f"{what} needs the Manage Server permission.")
        return False

    @persona.command(name="set", description="Give the bot a persona in this server")
    @app_commands.describe(text="The persona: a system prompt sent after the bot's own")
    async def persona_set(self, interaction: discord.Interaction, text: str) -> None:
        if interaction.guild_id is None or not await self._may_manage_server(interaction):
            return
        await self._defer(interaction)
        await self.pipeline.set_persona(str(interaction.guild_id), text)
        await self._send(interaction, f"Persona set ({len(text):,} characters).")

    @persona.command(name="show", description="Show the bot's persona in this server")
    async def persona_show(self, interaction: discord.Interaction) -> None:
        if interaction.guild_id is None:
            return
        await self._defer(interaction)
        text = await self.pipeline.persona(str(interaction.guild_id))
        shown = f"This server's persona:\n{text}" if text else "This server has no persona."
        await self._send(interaction, shown)

    @persona.command(name="reset", description="Remove the bot's persona in this server")
    async def persona_reset(self, interaction: discord.Interaction) -> None:
        if interaction.guild_id is None or not await self._may_manage_server(interaction):
            return
        await self._defer(interaction)
        had = await self.pipeline.reset_persona(str(interaction.guild_id))
        await self._send(interaction, "Persona removed." if had else "This server had no persona.")

    @app_commands.command(name="model", description="Choose this server's model (Manage Server or admins)")
    @app_commands.describe(name="One of the allowed models")
    async def model(self, interaction: discord.Interaction, name: str) -> None:
        name = name.strip()
        if interaction.guild_id is None:
            # outside a server there is no server to choose for: the bot's admins switch
            # the default model of this front-end (in memory)
            if not await self._admin_only(interaction):
                return
            allowed = self.bot.settings.llm.allowed_models
            if name not in allowed:
                await self._send(
                    interaction, f"{name} is not an allowed model; choose one of {', '.join(allowed)}."
                )
                return
            previous, self.pipeline.model = self.pipeline.model, name
            await self._send(interaction, f"Model switched from {previous} to {name}.")
            return
        if not await self._may_manage_server(interaction, "Choosing the model"):
            return
        await self._defer(interaction)
        server = str(interaction.guild_id)
        previous = await self.pipeline.server_model(server)
        await self.pipeline.set_model(server, name)
        await self._send(interaction, f"This server's model switched from {previous} to {name}.")

    @model.autocomplete("name")
    async def _model_choices(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        allowed = self.bot.settings.llm.allowed_models
        return [app_commands.Choice(name=m, value=m) for m in allowed if current.lower() in m.lower()][:25]


def use_api_base(url: str) -> None:
    """Point discord.py's REST calls (and so its gateway lookup) at `url`.

    `Route.BASE` is discord.py's public class attribute for the API base; every REST call,
    interaction webhooks included, is built from it. The gateway URL comes from
    `/gateway/bot` on that base."""
    discord.http.Route.BASE = f"{url.rstrip('/')}/api/v10"


async def run_discord(
    settings: Settings,
    pipeline: ChatPipeline,
    stop: asyncio.Event,
    on_ready: Callable[[str, int], None] | None = None,
    bot: RaycordBot | None = None,
) -> None:
    """Run the Discord client (`bot`, or a new `RaycordBot` over `pipeline`) until `stop` is
    set or the connection closes for good; `on_ready(bot name, servers)` is told once the bot
    has logged in."""
    if settings.discord_token is None:
        raise ValueError("DISCORD_TOKEN is not set")
    use_api_base(settings.discord.api_base_url)
    bot = bot or RaycordBot(settings, pipeline)
    if on_ready is not None:
        announce, told = on_ready, False

        async def ready() -> None:
            nonlocal told
            if not told:  # READY comes again after each new session; say it once
                told = True
                announce(str(bot.user), len(bot.guilds))

        bot.add_listener(ready, "on_ready")
    async with bot:
        runner = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if runner in done:
            runner.result()
        await bot.close()


async def sync_commands_now(settings: Settings) -> int:
    """`raycord discord sync`: log in over REST, register the command tree, record its hash."""
    if settings.discord_token is None:
        print("raycord: DISCORD_TOKEN is not set", flush=True)
        return 2
    use_api_base(settings.discord.api_base_url)
    bot = RaycordClient(settings, None)
    async with bot:
        await bot.login(settings.discord_token.get_secret_value())
        synced = await bot.sync_commands(force=True)
    targets = len(bot._sync_targets())
    print(f"raycord: synced the command tree to {synced} of {targets} target(s)", flush=True)
    return 0 if synced == targets else 1
