"""Pydantic models shared by the services and the bot: what crosses a boundary.

Hot paths inside a service use plain tuples and slotted dataclasses; these models
validate at the edges (incoming messages, analytics events, stats).
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MessageKind = Literal["message", "command"]
CacheScope = Literal["user", "server", "global"]


class Attachment(BaseModel):
    model_config = ConfigDict(frozen=True)

    filename: str
    content_type: str | None = None
    size: int = Field(ge=0)
    data: bytes | None = None
    url: str | None = None


class IncomingMessage(BaseModel):
    """One message from a front-end, before any service sees it."""

    model_config = ConfigDict(frozen=True)

    text: str
    user_id: str = Field(min_length=1)
    user_name: str = ""
    #: conversation scope: a channel, a thread, a reply chain or a DM (`dm:<user>`)
    scope: str = Field(min_length=1)
    server_id: str | None = None
    channel_id: str | None = None
    message_id: str | None = None
    kind: MessageKind = "message"
    #: who may be served this reply from the cache: the user alone, the server, everyone
    cache_scope: CacheScope = "user"
    #: a stateless question (e.g. /ask): no conversation context is used or written
    stateless: bool = False
    mentions: tuple[str, ...] = ()
    reply_to_user: str | None = None
    attachments: tuple[Attachment, ...] = ()


class ChatReply(BaseModel):
    text: str
    model: str
    cached: bool = False
    offline: bool = False
    finish_reason: str = "STOP"
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float = 0.0
    llm_ms: float = 0.0
    #: of `llm_ms`, the upstream call's own time as the LLM gateway measured it (0: not known)
    upstream_ms: float = 0.0


class Turn(BaseModel):
    """One turn of a conversation as stored by the context store."""

    role: Literal["user", "model"]
    author: str
    text: str
    time: float


class RateDecision(BaseModel):
    allowed: bool
    #: remaining budget per window name ("minute", "hour", "day", "server_minute", ...)
    remaining: dict[str, int] = Field(default_factory=dict)
    retry_after: float = 0.0
    #: the window that denied the request, when denied
    window: str = ""
    limit: int = 0


class WindowUsage(BaseModel):
    """One window of one budget, as `/limits` shows it."""

    kind: str
    window: str
    limit: int
    used: int
    left: int
    #: seconds until the oldest counted request leaves the window (0 when none is counted)
    frees_in: float = 0.0


_V4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_V4_SET = (0x8000 << 48) | (0x4000 << 64)
_new_object = object.__new__
_set_slot = object.__setattr__


def new_event_id() -> uuid.UUID:
    """A random (version 4) UUID, with `uuid.uuid4()`'s version and variant bits.

    `uuid4()` costs 10-16 µs here, the largest part of building an event: an `os.urandom`
    system call and the pure-Python constructor's checks. An event id must be unique,
    not unpredictable, so its 122 random bits come from `random`'s generator, which is
    seeded from `os.urandom` and reseeded in a forked child, and the UUID is built
    without the constructor: 3.7 µs.
    """
    event_id = _new_object(uuid.UUID)
    _set_slot(event_id, "int", random.getrandbits(128) & _V4_CLEAR | _V4_SET)
    _set_slot(event_id, "is_safe", uuid.SafeUUID.unknown)
    return event_id


class AnalyticsEvent(BaseModel):
    """One analytics event, validated at the front-end before it is buffered."""

    event_id: uuid.UUID = Field(default_factory=new_event_id)
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    type: str = Field(min_length=1, max_length=64)
    server_id: str | None = None
    channel_id: str | None = None
    user_id: str | None = None
    latency_ms: float | None = Field(default=None, ge=0)
    tokens_in: int = Field(default=0, ge=0)
    tokens_out: int = Field(default=0, ge=0)
    cache_hit: bool | None = None
    error: str | None = None
    weight: float = Field(default=1.0, gt=0)
    payload: dict[str, Any] = Field(default_factory=dict)


class ServiceStats(BaseModel):
    """Common shape of every service's `stats()`; services subclass it."""

    service: str
    shard: int = 0
