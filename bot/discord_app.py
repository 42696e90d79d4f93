"""The Discord front-end: discord.py client, message handling, slash commands.

Answers mentions, DMs and replies to its own messages; streams long answers by editing
its reply (throttled per channel); never pings anyone from generated text; turns every
typed error into a short, friendly reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from actors.errors import InputRejected, RaycordError
from actors.schemas import Attachment, IncomingMessage
from bot.config import DiscordSettings, Settings
from bot.discord_text import DISCORD_LIMIT, split_message
from bot.pipeline import ChatPipeline

log = logging.getLogger(__name__)

#: generated text may contain @everyone, role or user mentions: none of them notify; the
#: reply itself notifies the one person it answers
NO_PINGS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)
SOMETHING_WENT_WRONG = "Something went wrong on my side. Please try again."
NOT_AN_IMAGE = "I can only look at images (PNG, JPEG, WebP, GIF); I left out {names}."
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/heic", "image/heif")


class Gate:
    """Who and where the bot answers, from the allow and block lists in config."""

    def __init__(self, config: DiscordSettings) -> None:
        self.config = config

    @staticmethod
    def _passes(value: str | None, allow: list[str], block: list[str]) -> bool:
        if value is not None and value in block:
            return False
        return not allow or (value is not None and value in allow)

    def allows(self, message: discord.Message) -> bool:
        c = self.config
        guild = str(message.guild.id) if message.guild else None
        channel = str(message.channel.id)
        parent = getattr(message.channel, "parent_id", None)
        user = str(message.author.id)
        roles = [str(r.id) for r in getattr(message.author, "roles", [])]
        if guild is None and not c.answer_dms:
            return False
        if guild is not None and not self._passes(guild, c.allow_servers, c.block_servers):
            return False
        channels_ok = self._passes(channel, c.allow_channels, c.block_channels)
        if parent is not None and str(parent) in c.block_channels:
            channels_ok = False
        if not channels_ok:
            return False
        if not self._passes(user, c.allow_users, c.block_users):
            return False
        if any(r in c.block_roles for r in roles):
            return False
        return not c.allow_roles or any(r in c.allow_roles for r in roles)

    def is_admin(self, user_id: int) -> bool:
        return str(user_id) in self.config.admin_user_ids


class EditThrottle:
    """At most one edit per channel per `interval` seconds; other channels are unaffected."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[int, float] = {}

    def ready(self, channel_id: int) -> bool:
        now = asyncio.get_running_loop().time()
        if now - self._last.get(channel_id, float("-inf")) < self.interval:
            return False
        self._last[channel_id] = now
        return True


class StreamedReply:
    """One reply that grows as chunks arrive, then is split into messages when done."""

    def __init__(self, source: discord.Message, throttle: EditThrottle) -> None:
        self.source = source
        self.throttle = throttle
        self.messages: list[discord.Message] = []
        self._shown = ""

    async def update(self, text: str) -> None:
        preview = text if len(text) <= DISCORD_LIMIT else text[: DISCORD_LIMIT - 1] + "\u2026"
        if not preview.strip() or preview == self._shown:
            return
        if not self.messages:
            self.messages.append(await self.source.reply(preview, allowed_mentions=NO_PINGS))
            self._shown = preview
        elif self.throttle.ready(self.source.channel.id):
            await self.messages[0].edit(content=preview, allowed_mentions=NO_PINGS)
            self._shown = preview

    async def finish(self, text: str) -> list[discord.Message]:
        parts = split_message(text) if text.strip() else ["(no answer)"]
        if not self.messages:
            self.messages.append(await self.source.reply(parts[0], allowed_mentions=NO_PINGS))
        elif parts[0] != self._shown:
            await self.messages[0].edit(content=parts[0], allowed_mentions=NO_PINGS)
        for part in parts[1:]:
            self.messages.append(await self.source.channel.send(part, allowed_mentions=NO_PINGS))
        return self.messages


class RaycordBot(commands.Bot):
    """The discord.py client wired to one `ChatPipeline`."""

    def __init__(self, settings: Settings, pipeline: ChatPipeline, **options: Any) -> None:
        intents = options.pop("intents", None) or discord.Intents.default()
        intents.message_content = True
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=NO_PINGS,
            **options,
        )
        self.settings = settings
        self.pipeline = pipeline
        self.gate = Gate(settings.discord)
        self.throttle = EditThrottle(settings.discord.edit_interval_seconds)
        #: our reply message id -> the conversation scope it belongs to (bounded)
        self._scopes: OrderedDict[int, str] = OrderedDict()

    async def setup_hook(self) -> None:
        await self.add_cog(RaycordCommands(self))

    # -- messages ----------------------------------------------------------------------

    def conversation_of(self, message: discord.Message) -> str | None:
        """The scope of the conversation `message` belongs to, or None if not for us."""
        me = self.user
        if me is None:
            return None
        ref = message.reference
        if ref is not None and ref.message_id is not None:
            resolved = ref.resolved
            if isinstance(resolved, discord.Message) and resolved.author.id == me.id:
                return self._scopes.get(ref.message_id, f"chain:{ref.message_id}")
        if message.guild is None:
            return f"dm:{message.author.id}"
        if isinstance(message.channel, discord.Thread) and me in message.mentions:
            return f"thread:{message.channel.id}"
        if me in message.mentions:
            return f"channel:{message.channel.id}"
        return None

    def _replied_user(self, message: discord.Message) -> str | None:
        """The other user this message replies to, for the server's social graph."""
        ref = message.reference
        resolved = ref.resolved if ref is not None else None
        if isinstance(resolved, discord.Message) and resolved.author != self.user:
            return str(resolved.author.id)
        return None

    def _remember_scope(self, messages: list[discord.Message], scope: str) -> None:
        for m in messages:
            self._scopes[m.id] = scope
        while len(self._scopes) > 50_000:
            self._scopes.popitem(last=False)

    def _prompt_text(self, message: discord.Message) -> str:
        text = message.content
        if self.user is not None:
            for form in (f"<@{self.user.id}>", f"<@!{self.user.id}>"):
                text = text.replace(form, "")
        return text.strip()

    async def _images(self, message: discord.Message) -> tuple[Attachment, ...]:
        refused = [a.filename for a in message.attachments if (a.content_type or "") not in _IMAGE_TYPES]
        if refused:
            raise InputRejected(NOT_AN_IMAGE.format(names=", ".join(refused)).rstrip("."))
        limit = self.settings.discord.max_image_bytes
        too_big = [a.filename for a in message.attachments if a.size > limit]
        if too_big:
            raise InputRejected(f"{', '.join(too_big)} is over the {limit // (1024 * 1024)} MiB image limit")
        images = []
        for a in message.attachments:
            data = await a.read()
            images.append(
                Attachment(filename=a.filename, content_type=a.content_type, size=a.size, data=data)
            )
        return tuple(images)

    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or (self.user is not None and message.author.id == self.user.id):
            return
        scope = self.conversation_of(message)
        if scope is None or not self.gate.allows(message):
            return
        try:
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
                attachments=await self._images(message),
            )
            reply = StreamedReply(message, self.throttle)
            async with message.channel.typing():
                answer = await self.pipeline.handle(incoming, on_chunk=reply.update)
            self._remember_scope(await reply.finish(answer.text), scope)
        except RaycordError as exc:
            await self._reply_safely(message, exc.user_message())
        except Exception:
            log.exception("failed to answer message %s", message.id)
            await self._reply_safely(message, SOMETHING_WENT_WRONG)

    @staticmethod
    async def _reply_safely(message: discord.Message, text: str) -> None:
        try:
            await message.reply(text, allowed_mentions=NO_PINGS)
        except discord.DiscordException:
            log.exception("could not send an error reply")


class ForgetConfirm(discord.ui.View):
    """Two buttons: forgetting everything about a user needs their confirmation."""

    def __init__(self, commands_cog: RaycordCommands, user_id: int) -> None:
        super().__init__(timeout=60)
        self.cog = commands_cog
        self.user_id = user_id

    @discord.ui.button(label="Forget me", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, _: discord.ui.Button[ForgetConfirm]) -> None:
        if interaction.user.id != self.user_id:
            await interaction.response.send_message("This button is not for you.", ephemeral=True)
            return
        removed = await self.cog.forget_user(str(self.user_id))
        self.stop()
        await interaction.response.edit_message(
            content=f"Done: I deleted {removed} conversation(s) and every cached reply of yours.", view=None
        )

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, _: discord.ui.Button[ForgetConfirm]) -> None:
        self.stop()
        await interaction.response.edit_message(content="Nothing was deleted.", view=None)


class RaycordCommands(commands.Cog):
    """Slash commands: /ask /reset /forget /limits /stats /model."""

    def __init__(self, bot: RaycordBot) -> None:
        self.bot = bot

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

    async def forget_user(self, user_id: str) -> int:
        removed = await self.pipeline.context.forget(user_id)
        await self.pipeline.cache.invalidate_user(user_id)
        return removed

    async def _send(self, interaction: discord.Interaction, text: str, *, ephemeral: bool = True) -> None:
        parts = split_message(text)
        if interaction.response.is_done():
            for part in parts:
                await interaction.followup.send(part, ephemeral=ephemeral, allowed_mentions=NO_PINGS)
            return
        await interaction.response.send_message(parts[0], ephemeral=ephemeral, allowed_mentions=NO_PINGS)
        for part in parts[1:]:
            await interaction.followup.send(part, ephemeral=ephemeral, allowed_mentions=NO_PINGS)

    async def _admin_only(self, interaction: discord.Interaction) -> bool:
        if self.bot.gate.is_admin(interaction.user.id):
            return True
        await self._send(interaction, "That command is for the bot's admins.")
        return False

    @app_commands.command(name="ask", description="Ask a one-off question (no conversation memory)")
    @app_commands.describe(question="What you want to know")
    async def ask(self, interaction: discord.Interaction, question: str) -> None:
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

    @app_commands.command(name="reset", description="Clear my conversation with the bot in this channel")
    async def reset(self, interaction: discord.Interaction) -> None:
        cleared = await self.pipeline.context.reset(self._scope(interaction), str(interaction.user.id))
        await self._send(interaction, "Conversation cleared." if cleared else "There was nothing to clear.")

    @app_commands.command(name="forget", description="Delete everything the bot remembers about me")
    async def forget(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(
            "This deletes all your conversations with me and my cached replies to you. Sure?",
            view=ForgetConfirm(self, interaction.user.id),
            ephemeral=True,
        )

    @app_commands.command(name="limits", description="My remaining message and command budget")
    async def limits(self, interaction: discord.Interaction) -> None:
        decision = await self.pipeline.limiter.check(
            str(interaction.user.id), "command", str(interaction.guild_id) if interaction.guild_id else None
        )
        lines = [f"{window}: {left} left" for window, left in decision.remaining.items()]
        if not decision.allowed:
            lines.append(f"Next command in {decision.retry_after:.0f}s.")
        await self._send(interaction, "Your command budget after this one:\n" + "\n".join(lines))

    @app_commands.command(name="stats", description="(admins) cache hit rate, latency, queue depths")
    async def stats(self, interaction: discord.Interaction) -> None:
        if not await self._admin_only(interaction):
            return
        cache = await self.pipeline.cache.stats()
        hits = sum(s.hits for s in cache)
        lookups = hits + sum(s.misses for s in cache)
        hit_rate = f"{hits / lookups:.0%}" if lookups else "n/a"
        analytics = await self.pipeline.analytics.stats()
        lines = [
            f"model: {self.pipeline.model}",
            f"cache: {hit_rate} hit rate ({hits}/{lookups}), {sum(s.entries for s in cache)} entries",
            f"background writes pending: {self.pipeline.writes.pending}",
            f"analytics events pending: {sum(s.pending for s in analytics)}",
        ]
        await self._send(interaction, "\n".join(lines))

    @app_commands.command(name="model", description="(admins) switch the model")
    @app_commands.describe(name="Model name, e.g. gemini-2.5-flash")
    async def model(self, interaction: discord.Interaction, name: str) -> None:
        if not await self._admin_only(interaction):
            return
        previous, self.pipeline.model = self.pipeline.model, name.strip()
        await self._send(interaction, f"Model switched from {previous} to {self.pipeline.model}.")


async def run_discord(settings: Settings, pipeline: ChatPipeline, stop: asyncio.Event) -> None:
    """Run the Discord client until `stop` is set or the connection closes for good."""
    if settings.discord_token is None:
        raise ValueError("DISCORD_TOKEN is not set")
    bot = RaycordBot(settings, pipeline)
    async with bot:
        runner = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if runner in done:
            runner.result()
        await bot.close()
