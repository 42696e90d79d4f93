"""A Discord stand-in (aiohttp): REST API v10 and Gateway v10 on the wire, for an unmodified
discord.py client, plus a control API (`/_control/...`) that injects messages and
interactions, makes routes answer Discord's real 429, drops gateway connections, and
returns every request the bot made and every message as stored.

Point the bot at it with `discord.api_base_url` (env `RAYCORD_DISCORD__API_BASE_URL`).
Guilds go to gateway shards as on Discord: `(guild_id >> 22) % num_shards`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from bot.standin import serve_until_stopped

DISCORD_EPOCH_MS = 1_420_070_400_000
API = "/api/v10"
#: how long Discord lets a bot answer an interaction before its token stops working
INTERACTION_WINDOW_SECONDS = 3.0
EPHEMERAL = 1 << 6
_DEFAULT_GUILDS = 2
#: gateway opcodes
DISPATCH, HEARTBEAT, IDENTIFY, RESUME, RECONNECT, INVALID_SESSION, HELLO, HEARTBEAT_ACK = (
    0,
    1,
    2,
    6,
    7,
    9,
    10,
    11,
)
RESUMABLE_EVENTS = 1000
#: a request's JSON body, read once for the log and the handler
_BODY = web.RequestKey("raycord_body", object)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(slots=True)
class LoggedRequest:
    """One REST request the bot made, as the stand-in saw it."""

    method: str
    #: the route template, e.g. `/channels/{channel_id}/messages`
    route: str
    path: str
    status: int
    body: Any
    at: float


@dataclass(slots=True)
class RouteFault:
    """Answer `count` requests to (method, route) with Discord's 429."""

    method: str
    route: str
    retry_after: float = 1.0
    is_global: bool = False
    count: int = 1


@dataclass
class Session:
    """One gateway session: its shard, its events (kept for RESUME) and its live socket."""

    session_id: str
    shard: tuple[int, int]
    seq: int = 0
    events: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    ws: web.WebSocketResponse | None = None
    send: Any = None
    resumes: int = 0


class FakeDiscord:
    """The stand-in's state: one bot application, its guilds, channels, users and messages."""

    def __init__(self, token: str = "fake-token", guilds: int = _DEFAULT_GUILDS) -> None:
        self.token = token
        self._seq = itertools.count(1)
        self.bot_user = self._user("raycord", bot=True)
        self.app_id = self.bot_user["id"]
        self.users: dict[str, dict[str, Any]] = {}
        self.guilds: dict[str, dict[str, Any]] = {}
        self.channels: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, dict[str, Any]]] = {}
        self.attachments: dict[str, bytes] = {}
        self.interactions: dict[str, dict[str, Any]] = {}
        self.commands: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[LoggedRequest] = []
        self.faults: list[RouteFault] = []
        self.sessions: dict[str, Session] = {}
        self.identifies: list[list[int]] = []
        self.base_url = ""
        self.started = time.time()
        self._runner: web.AppRunner | None = None
        for i in range(guilds):
            self.add_guild(f"guild {i}", index=i)

    # --- the world ------------------------------------------------------------------------

    def snowflake(self, shard_index: int | None = None) -> str:
        """A Discord id; with `shard_index`, one whose `id >> 22` is that index modulo 1024
        (so a guild's shard is predictable for any shard count dividing 1024)."""
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        n = next(self._seq)
        if shard_index is not None:
            ms = (ms // 1024) * 1024 + shard_index
        return str((ms << 22) | (n & 0x3FFFFF))

    def _user(self, name: str, bot: bool = False) -> dict[str, Any]:
        return {
            "id": self.snowflake(),
            "username": name,
            "global_name": name,
            "discriminator": "0",
            "avatar": None,
            "bot": bot,
            "public_flags": 0,
        }

    def add_user(self, name: str) -> dict[str, Any]:
        user = self._user(name)
        self.users[user["id"]] = user
        return user

    def add_guild(self, name: str, index: int | None = None) -> dict[str, Any]:
        gid = self.snowflake(index)
        guild: dict[str, Any] = {"id": gid, "name": name, "channels": [], "threads": []}
        self.guilds[gid] = guild
        self.add_channel(gid, "general", dispatch=False)
        return guild

    def shard_of(self, guild_id: str | None, num_shards: int) -> int:
        return 0 if guild_id is None else (int(guild_id) >> 22) % num_shards

    def add_channel(self, guild_id: str, name: str, dispatch: bool = True) -> dict[str, Any]:
        guild = self._guild(guild_id)
        channel: dict[str, Any] = {
            "id": self.snowflake(),
            "type": 0,
            "guild_id": guild_id,
            "name": name,
            "position": len(guild["channels"]),
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
        }
        guild["channels"].append(channel)
        self.channels[channel["id"]] = channel
        if dispatch:
            self.dispatch("CHANNEL_CREATE", channel, guild_id)
        return channel

    def add_thread(
        self, channel_id: str, name: str, owner_id: str, message_id: str | None = None
    ) -> dict[str, Any]:
        parent = self._channel(channel_id)
        guild_id = parent["guild_id"]
        thread = {
            "id": message_id or self.snowflake(),
            "type": 11,
            "guild_id": guild_id,
            "parent_id": channel_id,
            "owner_id": owner_id,
            "name": name,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "message_count": 0,
            "member_count": 1,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": _now_iso(),
                "locked": False,
            },
            "flags": 0,
        }
        self._guild(guild_id)["threads"].append(thread)
        self.channels[thread["id"]] = thread
        self.dispatch("THREAD_CREATE", {**thread, "newly_created": True}, guild_id)
        return thread

    def _guild(self, guild_id: str) -> dict[str, Any]:
        if guild_id not in self.guilds:
            raise KeyError(f"unknown guild {guild_id}")
        return self.guilds[guild_id]

    def _channel(self, channel_id: str) -> dict[str, Any]:
        if channel_id not in self.channels:
            raise KeyError(f"unknown channel {channel_id}")
        return self.channels[channel_id]

    def _member(self, user: dict[str, Any]) -> dict[str, Any]:
        return {
            "user": user,
            "roles": [],
            "joined_at": datetime.fromtimestamp(self.started, UTC).isoformat(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "nick": None,
            "pending": False,
            "permissions": str((1 << 41) - 1),
        }

    def _guild_create(self, guild: dict[str, Any]) -> dict[str, Any]:
        gid = guild["id"]
        members = [self._member(u) for u in (self.bot_user, *self.users.values())]
        return {
            "id": gid,
            "name": guild["name"],
            "icon": None,
            "owner_id": self.bot_user["id"],
            "unavailable": False,
            "member_count": len(members),
            "large": False,
            "joined_at": datetime.fromtimestamp(self.started, UTC).isoformat(),
            "roles": [
                {
                    "id": gid,
                    "name": "@everyone",
                    "permissions": str((1 << 41) - 1),
                    "position": 0,
                    "color": 0,
                    "hoist": False,
                    "managed": False,
                    "mentionable": False,
                    "flags": 0,
                }
            ],
            "emojis": [],
            "stickers": [],
            "features": [],
            "channels": [{k: v for k, v in c.items() if k != "guild_id"} for c in guild["channels"]],
            "threads": guild["threads"],
            "members": members,
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "nsfw_level": 0,
        }

    def _message(
        self,
        channel_id: str,
        author: dict[str, Any],
        content: str,
        *,
        mentions: Sequence[dict[str, Any]] = (),
        reference: str | None = None,
        attachments: Sequence[dict[str, Any]] = (),
        flags: int = 0,
        interaction_id: str | None = None,
        components: list[Any] | None = None,
    ) -> dict[str, Any]:
        channel = self._channel(channel_id)
        guild_id = channel.get("guild_id")
        message: dict[str, Any] = {
            "id": self.snowflake(),
            "channel_id": channel_id,
            "author": author,
            "content": content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [{**u, "member": self._member(u)} if guild_id else u for u in mentions],
            "mention_roles": [],
            "attachments": list(attachments),
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": flags,
            "components": components or [],
        }
        if guild_id:
            message["guild_id"] = guild_id
            message["member"] = {k: v for k, v in self._member(author).items() if k != "user"}
        if reference is not None:
            ref = self.find_message(reference)
            message["type"] = 19
            message["message_reference"] = {
                "message_id": reference,
                "channel_id": ref["channel_id"] if ref else channel_id,
                "guild_id": guild_id,
            }
            message["referenced_message"] = ref
        if interaction_id is not None:
            entry = self.interactions.get(interaction_id)
            payload = entry["payload"] if entry else {}
            user = (payload.get("member") or {}).get("user") or payload.get("user") or author
            message["interaction_metadata"] = {"id": interaction_id, "type": 2, "user": user}
        # ephemeral messages are stored too (their buttons can be pressed), flagged as such
        self.messages.setdefault(channel_id, {})[message["id"]] = message
        if not flags & EPHEMERAL:
            channel["last_message_id"] = message["id"]
        return message

    def find_message(self, message_id: str) -> dict[str, Any] | None:
        for stored in self.messages.values():
            if message_id in stored:
                return stored[message_id]
        return None

    def inject_message(self, body: dict[str, Any]) -> dict[str, Any]:
        """A user's message, as Discord would deliver it (MESSAGE_CREATE)."""
        author = self.users[str(body["author_id"])]
        channel_id = str(body["channel_id"])
        content = str(body.get("content", ""))
        mentions = [self.users[str(u)] for u in body.get("mentions", [])]
        if body.get("mention_bot"):
            content = f"<@{self.bot_user['id']}> {content}"
            mentions.insert(0, self.bot_user)
        attachments = []
        for a in body.get("attachments", []):
            aid = self.snowflake()
            data = (
                base64.b64decode(a.get("data_base64", ""))
                if "data_base64" in a
                else a.get("text", "").encode()
            )
            url = f"{self.base_url}/_cdn/attachments/{channel_id}/{aid}/{a['filename']}"
            self.attachments[f"{channel_id}/{aid}/{a['filename']}"] = data
            attachments.append(
                {
                    "id": aid,
                    "filename": a["filename"],
                    "size": len(data),
                    "url": url,
                    "proxy_url": url,
                    "content_type": a.get("content_type"),
                }
            )
        message = self._message(
            channel_id,
            author,
            content,
            mentions=mentions,
            reference=str(body["reply_to"]) if body.get("reply_to") else None,
            attachments=attachments,
        )
        self.dispatch("MESSAGE_CREATE", message, message.get("guild_id"))
        return message

    def inject_interaction(self, body: dict[str, Any]) -> dict[str, Any]:
        """A slash command (`name`, `options`) or a button press (`custom_id`, `message_id`)."""
        user = self.users[str(body["user_id"])]
        channel = self._channel(str(body["channel_id"]))
        guild_id = channel.get("guild_id")
        iid, token = self.snowflake(), f"itoken-{next(self._seq)}"
        payload: dict[str, Any] = {
            "id": iid,
            "application_id": self.app_id,
            "token": token,
            "version": 1,
            "channel_id": channel["id"],
            "channel": channel,
            "locale": "en-US",
            "app_permissions": str((1 << 41) - 1),
            "attachment_size_limit": 8 * 2**20,
            "entitlements": [],
            "authorizing_integration_owners": {"0": guild_id} if guild_id else {"1": user["id"]},
            "context": 0 if guild_id else 1,
        }
        if guild_id:
            payload["guild_id"] = guild_id
            payload["guild_locale"] = "en-US"
            payload["member"] = self._member(user)
        else:
            payload["user"] = user
        if "custom_id" in body:
            message = self.find_message(str(body["message_id"]))
            if message is None:
                raise KeyError(f"unknown message {body['message_id']}")
            payload["type"] = 3
            payload["message"] = message
            payload["data"] = {"custom_id": body["custom_id"], "component_type": 2}
        else:
            command = self._registered(str(body["name"]), guild_id)
            payload["type"] = 2
            payload["data"] = {
                "id": command["id"] if command else self.snowflake(),
                "name": body["name"],
                "type": int(body.get("command_type", 1)),
                "options": [
                    {"name": k, "type": 3, "value": v} for k, v in dict(body.get("options", {})).items()
                ],
            }
            if "target_message_id" in body:
                target = self.find_message(str(body["target_message_id"]))
                payload["data"]["target_id"] = body["target_message_id"]
                payload["data"]["resolved"] = {"messages": {body["target_message_id"]: target}}
        self.interactions[iid] = {
            "payload": payload,
            "created": time.monotonic(),
            "window": float(body.get("window", INTERACTION_WINDOW_SECONDS)),
            "responses": [],
            "original": None,
        }
        self.dispatch("INTERACTION_CREATE", payload, guild_id)
        return {"id": iid, "token": token}

    def _registered(self, name: str, guild_id: str | None) -> dict[str, Any] | None:
        for scope in (guild_id, "global"):
            for command in self.commands.get(scope or "global", []):
                if command["name"] == name:
                    return command
        return None

    # --- the gateway ----------------------------------------------------------------------

    def dispatch(self, event: str, data: dict[str, Any], guild_id: str | None) -> None:
        """Send an event to every session whose shard holds `guild_id` (DMs go to shard 0)."""
        for session in self.sessions.values():
            shard_id, num_shards = session.shard
            if self.shard_of(guild_id, num_shards) == shard_id:
                self._send_event(session, event, data)

    def _send_event(self, session: Session, event: str, data: dict[str, Any]) -> None:
        session.seq += 1
        frame = {"op": DISPATCH, "t": event, "s": session.seq, "d": data}
        session.events.append((session.seq, frame))
        del session.events[:-RESUMABLE_EVENTS]
        if session.send is not None:
            asyncio.get_running_loop().create_task(session.send(frame))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        compress = request.query.get("compress") == "zlib-stream"
        deflate = zlib.compressobj()
        lock = asyncio.Lock()

        async def send(frame: dict[str, Any]) -> None:
            data = json.dumps(frame).encode()
            async with lock:
                if ws.closed:
                    return
                with contextlib.suppress(ConnectionError, RuntimeError):
                    if compress:
                        await ws.send_bytes(deflate.compress(data) + deflate.flush(zlib.Z_SYNC_FLUSH))
                    else:
                        await ws.send_str(data.decode())

        await send({"op": HELLO, "d": {"heartbeat_interval": 41_250}, "s": None, "t": None})
        session: Session | None = None
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op, d = frame.get("op"), frame.get("d")
                if op == HEARTBEAT:
                    await send({"op": HEARTBEAT_ACK, "d": None, "s": None, "t": None})
                elif op == IDENTIFY:
                    if d.get("token") != self.token:
                        await ws.close(code=4004, message=b"Authentication failed.")
                        break
                    session = await self._identify(d, ws, send)
                elif op == RESUME:
                    session = self.sessions.get(str(d.get("session_id")))
                    if session is None or d.get("token") != self.token:
                        await send({"op": INVALID_SESSION, "d": False, "s": None, "t": None})
                        continue
                    session.ws, session.send = ws, send
                    session.resumes += 1
                    for seq, event in session.events:
                        if seq > int(d.get("seq") or 0):
                            await send(event)
                    session.seq += 1
                    await send({"op": DISPATCH, "t": "RESUMED", "s": session.seq, "d": {}})
        finally:
            if session is not None and session.ws is ws:
                session.ws, session.send = None, None
        return ws

    async def _identify(self, d: dict[str, Any], ws: web.WebSocketResponse, send: Any) -> Session:
        shard_id, num_shards = (d.get("shard") or [0, 1])[:2]
        self.identifies.append([shard_id, num_shards])
        session = Session(session_id=f"session-{next(self._seq)}", shard=(shard_id, num_shards))
        self.sessions[session.session_id] = session
        guilds = [g for g in self.guilds.values() if self.shard_of(g["id"], num_shards) == shard_id]
        ready = {
            "v": 10,
            "user": self.bot_user,
            "guilds": [{"id": g["id"], "unavailable": True} for g in guilds],
            "session_id": session.session_id,
            "resume_gateway_url": f"{self.ws_url}",
            "shard": [shard_id, num_shards],
            "application": {"id": self.app_id, "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "user_settings": {},
        }
        session.ws, session.send = ws, send
        self._send_event(session, "READY", ready)
        for guild in guilds:
            self._send_event(session, "GUILD_CREATE", self._guild_create(guild))
        return session

    async def drop(self, shard: int | None = None) -> int:
        """Close the live sockets (of one shard, or all) as a failing gateway would."""
        dropped = 0
        for session in self.sessions.values():
            if session.ws is not None and (shard is None or session.shard[0] == shard):
                ws = session.ws
                session.ws, session.send = None, None
                await ws.close(code=4000, message=b"dropped by the stand-in")
                dropped += 1
        return dropped

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1) + "/gateway"

    # --- REST -----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith(API):
            passed: web.StreamResponse = await handler(request)
            return passed
        info = request.match_info
        route = info.route.resource.canonical if info.route.resource is not None else request.path
        route = route.removeprefix(API)
        body = await _body(request)
        fault = self._take_fault(request.method, route)
        if fault is not None:
            response: web.StreamResponse = _rate_limited(fault)
        elif request.headers.get("Authorization") != f"Bot {self.token}" and not route.startswith(
            ("/interactions/", "/webhooks/")
        ):
            response = _error(401, 0, "401: Unauthorized")
        else:
            try:
                response = await handler(request)
            except KeyError as exc:
                response = _error(404, 10003, f"Unknown: {exc.args[0] if exc.args else exc}")
        self.requests.append(
            LoggedRequest(request.method, route, request.path, response.status, body, time.time())
        )
        if isinstance(response, web.Response) and response.status < 400:
            response.headers.update(_bucket_headers())
        return response

    def _take_fault(self, method: str, route: str) -> RouteFault | None:
        for fault in self.faults:
            if fault.method == method and fault.route == route and fault.count > 0:
                fault.count -= 1
                return fault
        return None

    async def _rest_gateway_bot(self, request: web.Request) -> web.Response:
        return _json(
            {
                "url": self.ws_url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 1000,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    async def _rest_gateway(self, request: web.Request) -> web.Response:
        return _json({"url": self.ws_url})

    async def _rest_me(self, request: web.Request) -> web.Response:
        return _json(self.bot_user)

    async def _rest_application(self, request: web.Request) -> web.Response:
        return _json(
            {
                "id": self.app_id,
                "name": "raycord",
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": self.bot_user,
                "verify_key": "0" * 64,
                "flags": 0,
                "summary": "",
                "team": None,
            }
        )

    async def _rest_channel(self, request: web.Request) -> web.Response:
        return _json(self._channel(request.match_info["channel_id"]))

    async def _rest_create_message(self, request: web.Request) -> web.Response:
        channel_id = request.match_info["channel_id"]
        body = await _body(request)
        reference = (body.get("message_reference") or {}).get("message_id")
        message = self._message(
            channel_id,
            self.bot_user,
            body.get("content") or "",
            reference=str(reference) if reference else None,
            components=body.get("components"),
        )
        self.dispatch("MESSAGE_CREATE", message, message.get("guild_id"))
        return _json(message)

    async def _rest_edit_message(self, request: web.Request) -> web.Response:
        message = self._stored(request.match_info["channel_id"], request.match_info["message_id"])
        if message is None:
            return _error(404, 10008, "Unknown Message")
        body = await _body(request)
        self._apply_edit(message, body)
        self.dispatch("MESSAGE_UPDATE", message, message.get("guild_id"))
        return _json(message)

    async def _rest_get_message(self, request: web.Request) -> web.Response:
        message = self._stored(request.match_info["channel_id"], request.match_info["message_id"])
        return _json(message) if message else _error(404, 10008, "Unknown Message")

    async def _rest_history(self, request: web.Request) -> web.Response:
        stored = list(self.messages.get(request.match_info["channel_id"], {}).values())
        limit = int(request.query.get("limit", 50))
        return _json(list(reversed(stored))[:limit])

    async def _rest_delete_message(self, request: web.Request) -> web.Response:
        channel_id, message_id = request.match_info["channel_id"], request.match_info["message_id"]
        if self.messages.get(channel_id, {}).pop(message_id, None) is None:
            return _error(404, 10008, "Unknown Message")
        return web.Response(status=204)

    async def _rest_typing(self, request: web.Request) -> web.Response:
        self._channel(request.match_info["channel_id"])
        return web.Response(status=204)

    async def _rest_thread_from_message(self, request: web.Request) -> web.Response:
        body = await _body(request)
        thread = self.add_thread(
            request.match_info["channel_id"],
            str(body.get("name", "thread")),
            self.bot_user["id"],
            message_id=request.match_info["message_id"],
        )
        return _json(thread, status=201)

    async def _rest_thread(self, request: web.Request) -> web.Response:
        body = await _body(request)
        thread = self.add_thread(
            request.match_info["channel_id"], str(body.get("name", "thread")), self.bot_user["id"]
        )
        return _json(thread, status=201)

    async def _rest_interaction_callback(self, request: web.Request) -> web.Response:
        entry = self.interactions.get(request.match_info["interaction_id"])
        if entry is None or entry["payload"]["token"] != request.match_info["interaction_token"]:
            return _error(404, 10062, "Unknown interaction")
        if time.monotonic() - entry["created"] > entry["window"]:
            return _error(404, 10062, "Unknown interaction")
        if entry["responses"]:
            return _error(400, 40060, "Interaction has already been acknowledged.")
        body = await _body(request)
        entry["responses"].append(body)
        kind, data = int(body.get("type", 0)), body.get("data") or {}
        payload = entry["payload"]
        flags = int(data.get("flags") or 0)
        message: dict[str, Any] | None = None
        if kind in (4, 5):
            message = self._message(
                payload["channel_id"],
                self.bot_user,
                data.get("content") or "",
                flags=flags,
                interaction_id=payload["id"],
                components=data.get("components"),
            )
            entry["original"] = message
        elif kind == 7:
            message = self.find_message(payload["message"]["id"])
            if message is not None:
                self._apply_edit(message, data)
            entry["original"] = message
        elif kind == 6:
            entry["original"] = self.find_message(payload["message"]["id"])
        result: dict[str, Any] = {
            "interaction": {
                "id": payload["id"],
                "type": payload["type"],
                "response_message_id": message["id"] if message else None,
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool(flags & EPHEMERAL),
            },
            "resource": {"type": kind, "message": message} if message else {"type": kind},
        }
        return _json(result)

    def _interaction_by_token(self, token: str) -> dict[str, Any]:
        for entry in self.interactions.values():
            if entry["payload"]["token"] == token:
                return entry
        raise KeyError("Unknown Webhook")

    async def _rest_followup(self, request: web.Request) -> web.Response:
        entry = self._interaction_by_token(request.match_info["webhook_token"])
        body = await _body(request)
        original = entry["original"]
        loading = entry["responses"] and entry["responses"][0].get("type") == 5
        if original is not None and loading and not any("followup" in r for r in entry["responses"]):
            # as on Discord, the first follow-up of a deferred ("thinking") response replaces it
            entry["responses"].append({"followup": body})
            self._apply_edit(original, body)
            return _json(original)
        message = self._message(
            entry["payload"]["channel_id"],
            self.bot_user,
            body.get("content") or "",
            flags=int(body.get("flags") or 0),
            interaction_id=entry["payload"]["id"],
        )
        entry["responses"].append({"followup": body})
        return _json(message)

    async def _rest_webhook_message(self, request: web.Request) -> web.Response:
        entry = self._interaction_by_token(request.match_info["webhook_token"])
        message_id = request.match_info["message_id"]
        message = entry["original"] if message_id == "@original" else self.find_message(message_id)
        if message is None:
            return _error(404, 10008, "Unknown Message")
        if request.method == "PATCH":
            body = await _body(request)
            self._apply_edit(message, body)
            entry["responses"].append({"edit": body})
        return _json(message)

    async def _rest_commands(self, request: web.Request) -> web.Response:
        scope = request.match_info.get("guild_id", "global")
        if scope != "global":
            self._guild(scope)
        if request.method == "PUT":
            body = await _body(request)
            stored = []
            for command in body:
                previous = self._registered(command["name"], None if scope == "global" else scope)
                stored.append(
                    {
                        "id": previous["id"] if previous else self.snowflake(),
                        "application_id": self.app_id,
                        "version": self.snowflake(),
                        "default_member_permissions": None,
                        "description": "",
                        "type": 1,
                        **command,
                        **({} if scope == "global" else {"guild_id": scope}),
                    }
                )
            self.commands[scope] = stored
        return _json(self.commands.get(scope, []))

    def _stored(self, channel_id: str, message_id: str) -> dict[str, Any] | None:
        return self.messages.get(channel_id, {}).get(message_id)

    @staticmethod
    def _apply_edit(message: dict[str, Any], body: dict[str, Any]) -> None:
        if "content" in body:
            message["content"] = body["content"] or ""
        if "components" in body:
            message["components"] = body["components"] or []
        message["edited_timestamp"] = _now_iso()

    async def _cdn(self, request: web.Request) -> web.Response:
        info = request.match_info
        key = f"{info['channel_id']}/{info['attachment_id']}/{info['filename']}"
        if key not in self.attachments:
            return web.Response(status=404)
        return web.Response(body=self.attachments[key])

    # --- control API ----------------------------------------------------------------------

    async def _control(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        body = await _body(request) if request.method == "POST" else {}
        try:
            result = await self._control_action(action, request, body)
        except (KeyError, ValueError, TypeError) as exc:
            return _json({"error": f"{type(exc).__name__}: {exc}"}, status=400)
        return _json(result)

    async def _control_action(self, action: str, request: web.Request, body: dict[str, Any]) -> Any:
        if action == "state":
            return {
                "bot_user": self.bot_user,
                "application_id": self.app_id,
                "guilds": [
                    {"id": g["id"], "name": g["name"], "channels": g["channels"]}
                    for g in self.guilds.values()
                ],
                "users": list(self.users.values()),
                "commands": self.commands,
                "identifies": self.identifies,
                "sessions": [
                    {
                        "session_id": s.session_id,
                        "shard": list(s.shard),
                        "connected": s.ws is not None,
                        "resumes": s.resumes,
                    }
                    for s in self.sessions.values()
                ],
            }
        if action == "users":
            return self.add_user(str(body.get("name", "user")))
        if action == "channels":
            return self.add_channel(str(body["guild_id"]), str(body.get("name", "channel")))
        if action == "threads":
            owner = str(body.get("owner_id") or self.bot_user["id"])
            return self.add_thread(str(body["channel_id"]), str(body.get("name", "thread")), owner)
        if action == "messages":
            if request.method == "GET":
                channel = request.query["channel_id"]
                return list(self.messages.get(channel, {}).values())
            return self.inject_message(body)
        if action == "delete-message":
            message = self.messages.get(str(body["channel_id"]), {}).pop(str(body["message_id"]))
            self.dispatch(
                "MESSAGE_DELETE",
                {
                    "id": message["id"],
                    "channel_id": message["channel_id"],
                    "guild_id": message.get("guild_id"),
                },
                message.get("guild_id"),
            )
            return {"deleted": message["id"]}
        if action == "interactions":
            if request.method == "GET":
                entry = self.interactions[request.query["id"]]
                return {"responses": entry["responses"], "original": entry["original"]}
            return self.inject_interaction(body)
        if action == "faults":
            fault = RouteFault(
                method=str(body["method"]).upper(),
                route=str(body["route"]),
                retry_after=float(body.get("retry_after", 1.0)),
                is_global=bool(body.get("global", False)),
                count=int(body.get("count", 1)),
            )
            self.faults.append(fault)
            return asdict(fault)
        if action == "drop":
            shard = body.get("shard")
            return {"dropped": await self.drop(None if shard is None else int(shard))}
        if action == "requests":
            since = float(request.query.get("since", 0))
            return [asdict(r) for r in self.requests if r.at >= since]
        raise KeyError(f"unknown control action {action!r}")

    # --- serving --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._middleware])
        r = app.router
        r.add_get("/gateway", self._gateway)
        r.add_get(f"{API}/gateway/bot", self._rest_gateway_bot)
        r.add_get(f"{API}/gateway", self._rest_gateway)
        r.add_get(f"{API}/users/@me", self._rest_me)
        r.add_get(f"{API}/oauth2/applications/@me", self._rest_application)
        r.add_get(f"{API}/channels/{{channel_id}}", self._rest_channel)
        r.add_post(f"{API}/channels/{{channel_id}}/messages", self._rest_create_message)
        r.add_get(f"{API}/channels/{{channel_id}}/messages", self._rest_history)
        r.add_get(f"{API}/channels/{{channel_id}}/messages/{{message_id}}", self._rest_get_message)
        r.add_patch(f"{API}/channels/{{channel_id}}/messages/{{message_id}}", self._rest_edit_message)
        r.add_delete(f"{API}/channels/{{channel_id}}/messages/{{message_id}}", self._rest_delete_message)
        r.add_post(f"{API}/channels/{{channel_id}}/typing", self._rest_typing)
        r.add_post(
            f"{API}/channels/{{channel_id}}/messages/{{message_id}}/threads", self._rest_thread_from_message
        )
        r.add_post(f"{API}/channels/{{channel_id}}/threads", self._rest_thread)
        r.add_post(
            f"{API}/interactions/{{interaction_id}}/{{interaction_token}}/callback",
            self._rest_interaction_callback,
        )
        r.add_post(f"{API}/webhooks/{{application_id}}/{{webhook_token}}", self._rest_followup)
        for method in ("GET", "PATCH"):
            r.add_route(
                method,
                f"{API}/webhooks/{{application_id}}/{{webhook_token}}/messages/{{message_id}}",
                self._rest_webhook_message,
            )
        for method in ("GET", "PUT"):
            r.add_route(method, f"{API}/applications/{{application_id}}/commands", self._rest_commands)
            r.add_route(
                method,
                f"{API}/applications/{{application_id}}/guilds/{{guild_id}}/commands",
                self._rest_commands,
            )
        r.add_get("/_cdn/attachments/{channel_id}/{attachment_id}/{filename}", self._cdn)
        r.add_route("*", "/_control/{action}", self._control)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on `host:port` (0 picks a free port); returns the base URL."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.base_url = f"http://{host}:{self._runner.addresses[0][1]}"
        return self.base_url

    async def stop(self) -> None:
        for session in self.sessions.values():
            if session.ws is not None:
                await session.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def _body(request: web.Request) -> Any:
    """The JSON body, from `payload_json` when discord.py sent multipart (files); read once
    (the log and the handler both want it)."""
    if _BODY in request:
        return request[_BODY]
    body: Any = {}
    if request.content_type.startswith("multipart/"):
        form = await request.post()
        raw = form.get("payload_json")
        body = json.loads(str(raw)) if raw is not None else {}
    elif request.can_read_body:
        text = await request.text()
        body = json.loads(text) if text else {}
    request[_BODY] = body
    return body


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response whose Content-Type is exactly `application/json`, as Discord sends it
    (discord.py compares the header whole; a charset suffix makes it read the body as text)."""
    response = web.Response(body=json.dumps(data).encode(), status=status, headers=headers)
    response.headers["Content-Type"] = "application/json"
    return response


def _error(status: int, code: int, message: str) -> web.Response:
    return _json({"message": message, "code": code}, status=status)


def _bucket_headers() -> dict[str, str]:
    return {
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "4",
        "X-RateLimit-Reset": f"{time.time() + 1:.3f}",
        "X-RateLimit-Reset-After": "1.000",
        "X-RateLimit-Bucket": "fake-bucket",
    }


def _rate_limited(fault: RouteFault) -> web.Response:
    """Discord's 429: `Via` tells discord.py it comes from Discord, not a Cloudflare ban."""
    headers = {
        "Retry-After": str(max(1, round(fault.retry_after))),
        "Via": "1.1 google",
        "X-RateLimit-Scope": "global" if fault.is_global else "user",
    }
    if fault.is_global:
        headers["X-RateLimit-Global"] = "true"
    else:
        headers.update(
            {
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": f"{time.time() + fault.retry_after:.3f}",
                "X-RateLimit-Reset-After": f"{fault.retry_after:.3f}",
                "X-RateLimit-Bucket": "fake-bucket",
            }
        )
    body = {
        "message": "You are being rate limited.",
        "retry_after": fault.retry_after,
        "global": fault.is_global,
    }
    return _json(body, status=429, headers=headers)


class FakeDiscordControl:
    """A blocking client of the stand-in's control API (for tests and scripts)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def call(self, action: str, body: dict[str, Any] | None = None, **query: Any) -> Any:
        url = f"{self.base_url}/_control/{action}"
        if query:
            url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ValueError(f"control {action}: {exc.code} {exc.read().decode()}") from exc


async def serve(host: str, port: int, token: str, guilds: int) -> None:
    """Run the stand-in until SIGINT/SIGTERM; prints its base URL first."""
    await serve_until_stopped(FakeDiscord(token=token, guilds=guilds), "fake discord", host, port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766, help="0 picks a free port")
    parser.add_argument("--token", default="fake-token", help="the bot token it accepts")
    parser.add_argument("--guilds", type=int, default=_DEFAULT_GUILDS, help="guilds the bot is in")
