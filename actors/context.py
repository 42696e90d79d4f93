"""ContextStore: per (scope, user) conversation windows, the per-server social graph, and
the context the LLM receives, durable in one SQLite file (or PostgreSQL schema) per shard.

A built context is cached under the conversation's version, which every write bumps,
so `build()` never returns a stale context. Memory is bounded by a byte budget (the least
recently active conversations move to disk) and by stale cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sys
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

from actors import metrics
from actors.base import Clock, Service, ShardedClient
from actors.errors import ServiceUnavailable
from actors.schemas import ServiceStats, Turn
from actors.state import StateLocation, StateOpener, needs_state
from storage.context_db import ContextDB, EdgeRow, StoredConversation, TurnRow
from storage.postgres import PgTarget
from storage.sqlite import Statement, SyncMode

log = logging.getLogger(__name__)

DAY = 86_400.0
_SEP = "\x1f"

# Approximate CPython sizes (64-bit), measured with tracemalloc in bench/context_bench.py:
# what one conversation costs besides its turns (slotted object, list, key, LRU and
# user-index entries), one turn besides its text, one graph edge, one built context.
_CONVERSATION_BYTES = 480
_TURN_BYTES = 130
_EDGE_BYTES = 330
_BUILT_BYTES = 420
_BUILT_TURN_BYTES = 88


class ContextConfig(BaseModel):
    shards: int = Field(default=1, ge=1)
    max_turns: int = Field(default=20, ge=1)
    max_chars: int = Field(default=8_000, ge=100)
    #: a window that outgrows `max_turns` or `max_chars` loses its oldest turns until it
    #: holds at most this share of both: it then starts at the same turn for the next few
    #: turns, so each request begins like the one before and Gemini's implicit cache serves
    #: that prefix (1 drops only what is over, and the window's start moves every turn)
    trim_to: float = Field(default=0.75, gt=0, le=1)
    built_cache_entries: int = Field(default=10_000, ge=1)
    #: conversations and graph edges idle longer than this are removed
    stale_after_seconds: float = Field(default=30 * DAY, gt=0)
    #: how often, on the injected clock, the maintenance loop removes stale entries
    cleanup_interval_seconds: float = Field(default=60.0, gt=0)
    #: approximate bytes held in memory; above it the least recently active conversations move to disk
    memory_budget_bytes: int = Field(default=256 * 2**20, ge=4096)
    #: frequent contacts named in a built context's social line; 0 leaves the line out
    social_contacts: int = Field(default=3, ge=0)
    #: contacts remembered per (server, user); the least recently seen one goes first
    max_contacts: int = Field(default=50, ge=1)
    #: how long a commit may wait for more writers to join it. Appends and interactions
    #: are acknowledged that much later (the bot sends them after its reply, in the
    #: background, and resends any that fail); a reset or forget never waits for it.
    #: The bot's settings set their own (bot.config); 0 commits as soon as the previous
    #: commit is done.
    commit_delay_seconds: float = Field(default=0.0, ge=0, le=1)
    #: when a write reaches the disk (storage.sqlite.SYNC_MODES): NORMAL survives any
    #: death of the actor's process and loses at most the last durability interval to a
    #: power loss, at most one sync per interval; FULL syncs every group commit
    synchronous: SyncMode = "NORMAL"
    #: front-end messages (bot replies, threads) remembered per shard as belonging to a
    #: conversation; past it the oldest links go first
    max_reply_links: int = Field(default=200_000, ge=1)
    #: how long after a forget a late write for that user (one still in flight from
    #: another front-end) is checked: turns written before the forget are dropped
    forget_tombstone_seconds: float = Field(default=600.0, gt=0)
    #: the longest persona a server may set (a system prompt sent with every request)
    max_persona_chars: int = Field(default=4_000, ge=1)


@dataclass(slots=True, frozen=True)
class BuiltContext:
    """What the LLM receives as history: `(role, author, text)` turns, oldest first, and
    one line on the user's frequent contacts in the server. `digest` covers both."""

    turns: tuple[tuple[str, str, str], ...]
    digest: str
    version: int
    social: str = ""
    #: the server's persona (its own system prompt), "" when it has none
    persona: str = ""
    #: the model the server chose, "" for the bot's default
    model: str = ""


@dataclass(slots=True, eq=False)
class _Conversation:
    turns: list[TurnRow]
    chars: int = 0
    version: int = 0
    last_active: float = 0.0
    #: writes issued and not yet committed: such a conversation never leaves memory
    pending: int = 0
    #: the row exists on disk once every issued statement has run
    on_disk: bool = False
    #: the disk copy is stale (idle past the threshold): delete it before the next write
    purge: bool = False
    #: a write failed: drop the memory copy once nothing is pending, so disk is reread
    reload: bool = False

    @property
    def nbytes(self) -> int:
        return _CONVERSATION_BYTES + _TURN_BYTES * len(self.turns) + self.chars


@dataclass(slots=True, eq=False)
class _Edge:
    """One direction of a contact: how often `user` mentioned or replied to `other` and
    was mentioned or replied to by them, and when they last interacted."""

    mentioned: int = 0
    replied: int = 0
    mentioned_by: int = 0
    replied_by: int = 0
    last_seen: float = 0.0

    @property
    def total(self) -> int:
        return self.mentioned + self.replied + self.mentioned_by + self.replied_by


@dataclass(slots=True, eq=False)
class _Node:
    contacts: dict[str, _Edge]
    #: from a store-wide counter, so a removed and recreated node never repeats a version
    version: int


@dataclass(slots=True, eq=False)
class _BuiltEntry:
    built: BuiltContext
    server: str | None
    node_version: int

    @property
    def nbytes(self) -> int:
        return _BUILT_BYTES + _BUILT_TURN_BYTES * len(self.built.turns) + len(self.built.social)


class ContextStats(ServiceStats):
    #: conversations held in memory (the rest are on disk only)
    conversations: int
    conversations_on_disk: int
    turns: int
    chars: int
    #: approximate bytes held in memory: conversations, built contexts and the graph
    bytes: int
    memory_budget_bytes: int
    graph_edges: int
    built_entries: int
    built_hits: int
    built_misses: int
    built_hit_rate: float
    spilled: int
    reloaded: int
    cleanup_runs: int
    cleaned_conversations: int
    cleaned_edges: int
    #: SQLite group commits (one per batch of writers), i.e. state-file transactions
    commits: int
    #: syncs of the state file to the disk (storage.sqlite.GroupCommitter.syncs)
    syncs: int = 0
    #: commits answered and not yet synced (NORMAL: until the next durability point)
    unsynced_commits: int = 0


def _check_id(what: str, value: str) -> None:
    if not isinstance(value, str) or not value or _SEP in value:
        raise ValueError(f"{what} must be a non-empty string without \\x1f, got {value!r}")


def conversation_key(scope: str, user: str) -> str:
    """The key a conversation is stored and routed by.

    Raises:
        ValueError: `scope` or `user` is empty or holds the separator.
    """
    _check_id("scope", scope)
    _check_id("user", user)
    return f"{scope}{_SEP}{user}"


def graph_key(server: str) -> str:
    """The key a server's social graph is routed by: one shard owns a whole server."""
    _check_id("server", server)
    return f"server{_SEP}{server}"


def assemble(
    turns: tuple[tuple[str, str, str], ...],
    version: int,
    social: str = "",
    persona: str = "",
    model: str = "",
) -> BuiltContext:
    """A BuiltContext with the digest of everything the LLM will see (the persona too, so
    a changed persona changes every cache key it goes into)."""
    h = hashlib.blake2b(digest_size=16)
    for role, author, text in turns:
        h.update(f"{role}{_SEP}{author}{_SEP}{text}\x1e".encode())
    if social:
        h.update(f"\x1dsocial{_SEP}{social}".encode())
    if persona:
        h.update(f"\x1dpersona{_SEP}{persona}".encode())
    # the model is not in the digest: the cache key names it on its own
    return BuiltContext(turns, h.hexdigest(), version, social, persona, model)


def check_persona(persona: str, max_chars: int) -> None:
    """Raises ValueError when `persona` cannot be a server's persona: empty, or too long."""
    if not persona.strip():
        raise ValueError("a persona cannot be empty (/persona reset clears it)")
    if len(persona) > max_chars:
        raise ValueError(f"the persona is {len(persona):,} characters long; the limit is {max_chars:,}")


class ContextStore(Service):
    """Conversation memory and social graph of one shard.

    Every change to memory and the statements that make it durable are issued in one
    synchronous step, so the statements run in the order the changes were made (the
    order of arrival); the caller is answered after the commit.
    """

    def __init__(
        self,
        config: ContextConfig | None = None,
        state_dir: StateLocation | None = None,
        shard: int = 0,
        clock: Clock | None = None,
    ) -> None:
        """`state_dir`: the directory of the shard's SQLite file, or a `PgTarget`.

        Raises:
            ValueError: no state location.
            SchemaTooNew: the stored schema was written by a newer raycord.
        """
        super().__init__(clock)
        if state_dir is None:
            raise ValueError("ContextStore needs a state_dir: every write is made durable there")
        self.config = config or ContextConfig()
        self.shard = shard
        location = state_dir if isinstance(state_dir, PgTarget) else Path(state_dir)
        #: in order of last activity (append or build), least recent first
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()
        self._user_keys: dict[str, set[str]] = {}
        #: conversations whose last activity (a build) is newer than on disk
        self._touched: set[str] = set()
        #: users whose deletion on disk is issued but not yet committed
        self._forgetting: dict[str, int] = {}
        #: user -> when they were forgotten: a turn from before then is not stored again
        self._tombstones: dict[str, float] = {}
        self._built: OrderedDict[str, _BuiltEntry] = OrderedDict()
        #: (server, user, other) in order of last interaction, least recent first
        self._edges: OrderedDict[tuple[str, str, str], _Edge] = OrderedDict()
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._user_servers: dict[str, set[str]] = {}
        #: server -> its persona and its model, for the servers whose graph this shard owns
        self._personas: dict[str, str] = {}
        self._models: dict[str, str] = {}
        self._graph_version = 0
        self._turn_total = self._char_total = self._bytes = 0
        self._disk_conversations = 0
        self._last_cleanup = self.clock()
        self.built_hits = self.built_misses = 0
        self.spilled = self.reloaded = 0
        self.cleanup_runs = self.cleaned_conversations = self.cleaned_edges = 0
        self._maintenance_lock = asyncio.Lock()
        self._init_metrics()
        self._state = StateOpener(lambda: self._open_state(location), f"context shard {shard}")
        with contextlib.suppress(ServiceUnavailable):
            # the database is down: the actor answers "restarting" and retries the open
            self._state.get()

    def _open_state(self, location: StateLocation) -> ContextDB:
        db = ContextDB(location, self.shard, self.config.commit_delay_seconds, self.config.synchronous)
        try:
            self._disk_conversations = db.count_conversations()
            self._load_graph(db)
            chosen = db.load_server_settings()
            self._personas = {s: p for s, (p, _) in chosen.items() if p}
            self._models = {s: m for s, (_, m) in chosen.items() if m}
        except BaseException:
            db.close()
            raise
        return db

    @property
    def _db(self) -> ContextDB:
        """The shard's opened state (every public method has opened it first)."""
        return self._state.get()

    # --- conversations ---

    @needs_state
    async def append(self, scope: str, user: str, turns: Sequence[Turn]) -> int:
        """Add turns to the (scope, user) conversation; returns its new version once durable.

        Raises:
            ValueError: an empty or malformed scope, user or turn.
            sqlite3.Error: the commit failed; the turns are not kept and may be resent.
        """
        self._ensure_maintenance()
        key = conversation_key(scope, user)
        rows = [self._turn_row(t) for t in turns]
        forgotten_at = self._tombstones.get(user)
        if forgotten_at is not None:
            # a write that was in flight when the user was forgotten brings nothing back
            rows = [r for r in rows if r[3] > forgotten_at]
        conv = self._touch(key, user)
        if not rows:
            return conv.version
        statements: list[Statement] = self._purge_statements(key, conv)
        self._account(conv, -1)
        conv.turns.extend(rows)
        conv.chars += sum(len(r[2]) for r in rows)
        dropped = 0
        cfg = self.config
        if len(conv.turns) > cfg.max_turns or conv.chars > cfg.max_chars:
            keep_turns, keep_chars = max(1, int(cfg.max_turns * cfg.trim_to)), cfg.max_chars * cfg.trim_to
            while len(conv.turns) > 1 and (len(conv.turns) > keep_turns or conv.chars > keep_chars):
                conv.chars -= len(conv.turns.pop(0)[2])
                dropped += 1
        conv.version += 1
        self._account(conv, +1)
        self._drop_built(key)
        statements.append(ContextDB.upsert_conversation(key, scope, user, conv.version, conv.last_active))
        statements += ContextDB.insert_turns(key, rows)
        if dropped:
            statements.append(ContextDB.keep_newest_turns(key, len(conv.turns)))
        if not conv.on_disk:
            conv.on_disk = True
            self._disk_conversations += 1
        self._touched.discard(key)
        version = conv.version
        await self._write(key, conv, statements, failed_rows=rows)
        return version

    @needs_state
    async def build(self, scope: str, user: str, server: str | None = None) -> BuiltContext:
        """The context for the (scope, user) conversation, with the user's social line in
        `server` when given. Served from the cache while nothing it depends on changed."""
        self._ensure_maintenance()
        key = conversation_key(scope, user)
        if server is not None:
            _check_id("server", server)
        conv = self._touch(key, user)
        if conv.on_disk:
            self._touched.add(key)
        node = self._nodes.get((server, user)) if server is not None else None
        node_version = node.version if node is not None else 0
        entry = self._built.get(key)
        if (
            entry is not None
            and entry.built.version == conv.version
            and entry.server == server
            and entry.node_version == node_version
            and (entry.built.persona, entry.built.model) == self._profile(server)
        ):
            self._built.move_to_end(key)
            self.built_hits += 1
            return entry.built
        self.built_misses += 1
        built = assemble(
            tuple((r, a, t) for r, a, t, _ in conv.turns),
            conv.version,
            self._social_line(user, node),
            *self._profile(server),
        )
        self._drop_built(key)
        entry = _BuiltEntry(built, server, node_version)
        self._built[key] = entry
        self._bytes += entry.nbytes
        while len(self._built) > self.config.built_cache_entries:
            self._bytes -= self._built.popitem(last=False)[1].nbytes
        return built

    @needs_state
    async def reset(self, scope: str, user: str) -> bool:
        """Empty the (scope, user) conversation; True when it held turns."""
        self._ensure_maintenance()
        key = conversation_key(scope, user)
        conv = self._touch(key, user)
        had_turns = bool(conv.turns)
        self._account(conv, -1)
        conv.turns = []
        conv.chars = 0
        conv.version += 1
        self._account(conv, +1)
        self._drop_built(key)
        statements = self._purge_statements(key, conv)
        if conv.on_disk:
            statements += ContextDB.delete_conversation(key)
            conv.on_disk = False
            self._disk_conversations -= 1
        # the emptied conversation stays in memory, so nothing reloads the rows being deleted
        await self._write(key, conv, statements, urgent=True)
        return had_turns

    @needs_state
    async def forget(self, user: str) -> int:
        """Delete every conversation, reply link and graph edge of `user` in memory, on disk
        and in the built-context cache; returns how many conversations there were.

        On SQLite the deleted rows are overwritten (`secure_delete`) and the WAL is
        checkpointed and truncated, so no file keeps their text. Turns written before the
        forget that arrive after it (still in flight elsewhere) are dropped on arrival.
        """
        self._ensure_maintenance()
        _check_id("user", user)
        self._tombstones[user] = self.clock()
        memory_keys = self._user_keys.get(user, set())
        disk_keys = set(self._db.conversation_keys_of(user)) - memory_keys
        disk_keys.update(k for k in memory_keys if self._conversations[k].on_disk)
        forgotten = disk_keys | {k for k in memory_keys if self._conversations[k].turns}
        for key in list(memory_keys):
            self._drop(key)
        self._disk_conversations -= len(disk_keys)
        for server in list(self._user_servers.get(user, ())):
            node = self._nodes.get((server, user))
            for other in list(node.contacts) if node is not None else ():
                self._remove_edge(server, user, other)
                self._remove_edge(server, other, user)
        # until the deletion commits, a load of this user's conversations finds nothing
        self._forgetting[user] = self._forgetting.get(user, 0) + 1
        try:
            await self._db.write(ContextDB.delete_user(user), urgent=True)
        finally:
            self._forgetting[user] -= 1
            if not self._forgetting[user]:
                del self._forgetting[user]
        if not await self._db.truncate_log():
            log.warning("forget %s: a reader held the WAL back; the next durability point truncates it", user)
        return len(forgotten)

    # --- server settings ---

    @needs_state
    async def set_persona(self, server: str, persona: str) -> None:
        """Store `server`'s persona durably; it goes into the server's requests from now on.

        Raises:
            ValueError: an empty or over-long persona, or a malformed server id.
        """
        _check_id("server", server)
        check_persona(persona, self.config.max_persona_chars)
        await self._db.write([ContextDB.set_persona(server, persona)], urgent=True)
        self._personas[server] = persona

    @needs_state
    async def reset_persona(self, server: str) -> bool:
        """Clear `server`'s persona; False when it had none."""
        _check_id("server", server)
        had = server in self._personas
        await self._db.write([ContextDB.set_persona(server, "")], urgent=True)
        self._personas.pop(server, None)
        return had

    @needs_state
    async def persona(self, server: str) -> str:
        """`server`'s persona, "" when it has none."""
        _check_id("server", server)
        return self._personas.get(server, "")

    @needs_state
    async def set_model(self, server: str, model: str) -> None:
        """Store the model `server` chose ("" goes back to the bot's default)."""
        _check_id("server", server)
        if model:
            _check_id("model", model)
        await self._db.write([ContextDB.set_model(server, model)], urgent=True)
        if model:
            self._models[server] = model
        else:
            self._models.pop(server, None)

    @needs_state
    async def profile(self, server: str) -> tuple[str, str]:
        """`server`'s persona and model ("" for none)."""
        _check_id("server", server)
        return self._profile(server)

    @needs_state
    async def server_context(self, server: str, user: str) -> tuple[str, str, str]:
        """`user`'s social line in `server`, the server's persona and model (one call for a
        build whose conversation lives on another shard)."""
        return (await self.social(server, user), *self._profile(server))

    def _profile(self, server: str | None) -> tuple[str, str]:
        if server is None:
            return "", ""
        return self._personas.get(server, ""), self._models.get(server, "")

    # --- reply links ---

    @needs_state
    async def link_replies(self, scope: str, user: str, message_ids: Sequence[str]) -> int:
        """Remember that `message_ids` (the bot's replies, a thread) continue the (scope, user)
        conversation; the links go with it (reset, forget, stale cleanup). Returns how many."""
        self._ensure_maintenance()
        key = conversation_key(scope, user)
        if isinstance(message_ids, str):
            raise ValueError("message_ids must be a list of ids, not one string")
        for m in message_ids:
            _check_id("message_id", m)
        await self._db.write(
            ContextDB.link_replies(message_ids, scope, user, key, self.config.max_reply_links)
        )
        return len(message_ids)

    @needs_state
    async def reply_scope(self, message_id: str) -> str | None:
        """The scope of the conversation `message_id` continues, or None when unknown."""
        _check_id("message_id", message_id)
        return self._db.reply_scope(message_id)

    # --- social graph ---

    @needs_state
    async def record_interaction(
        self, server: str, user: str, mentions: Sequence[str] = (), reply_to: str | None = None
    ) -> int:
        """Count `user`'s mentions of and reply to others in `server`, both ways; returns
        how many contacts were updated.

        Raises:
            ValueError: an empty or malformed id.
        """
        self._ensure_maintenance()
        _check_id("server", server)
        _check_id("user", user)
        if isinstance(mentions, str):
            raise ValueError("mentions must be a list of user ids, not one string")
        counts: dict[str, list[int]] = {}
        for other in mentions:
            _check_id("mention", other)
            if other != user:
                counts.setdefault(other, [0, 0])[0] = 1
        if reply_to is not None:
            _check_id("reply_to", reply_to)
            if reply_to != user:
                counts.setdefault(reply_to, [0, 0])[1] = 1
        if not counts:
            return 0
        now = self.clock()
        statements: list[Statement] = []
        for other, (mentioned, replied) in counts.items():
            out = self._edge(server, user, other)
            out.mentioned += mentioned
            out.replied += replied
            out.last_seen = now
            back = self._edge(server, other, user)
            back.mentioned_by += mentioned
            back.replied_by += replied
            back.last_seen = now
            statements.append(ContextDB.upsert_edge(_edge_row(server, user, other, out)))
            statements.append(ContextDB.upsert_edge(_edge_row(server, other, user, back)))
        for who in (user, *counts):
            statements += self._cap_contacts(server, who, keep=counts.keys() | {user})
        await self._db.write(statements)
        return len(counts)

    @needs_state
    async def social(self, server: str, user: str) -> str:
        """The social line of `user` in `server` (for a client whose graph shard differs)."""
        _check_id("server", server)
        _check_id("user", user)
        return self._social_line(user, self._nodes.get((server, user)))

    # --- maintenance ---

    async def maintain(self) -> None:
        """Remove stale entries when due, move conversations to disk while over budget,
        export gauges."""
        if not self._state.try_open():
            # the database is down: the open was retried (or is not due yet), and logged
            return
        async with self._maintenance_lock:
            now = self.clock()
            statements: list[Statement] = []
            if now - self._last_cleanup >= self.config.cleanup_interval_seconds:
                statements += self._cleanup(now)
                self._last_cleanup = now
                expired = now - self.config.forget_tombstone_seconds
                for user in [u for u, at in self._tombstones.items() if at < expired]:
                    del self._tombstones[user]
            # after the cleanup: its disk read must still see spilled conversations as in memory,
            # as their last activity reaches disk only with this write
            statements += self._spill()
            self._export_metrics()
            await self._db.write(statements)

    async def flush(self) -> None:
        """Persist last-activity times that only builds have changed."""
        if not self._touched:
            # nothing to write, so nothing to wait for, even with the database down
            return
        await self._db.write(
            [ContextDB.touch_conversation(k, self._conversations[k].last_active) for k in self._touched]
        )
        self._touched.clear()

    async def close(self) -> None:
        await super().close()
        db = self._state.opened
        if db is not None:
            db.close()

    async def stats(self) -> ContextStats:
        lookups = self.built_hits + self.built_misses
        return ContextStats(
            service="context",
            shard=self.shard,
            conversations=len(self._conversations),
            conversations_on_disk=self._disk_conversations,
            turns=self._turn_total,
            chars=self._char_total,
            bytes=self._bytes,
            memory_budget_bytes=self.config.memory_budget_bytes,
            graph_edges=len(self._edges),
            built_entries=len(self._built),
            built_hits=self.built_hits,
            built_misses=self.built_misses,
            built_hit_rate=self.built_hits / lookups if lookups else 0.0,
            spilled=self.spilled,
            reloaded=self.reloaded,
            cleanup_runs=self.cleanup_runs,
            cleaned_conversations=self.cleaned_conversations,
            cleaned_edges=self.cleaned_edges,
            commits=0 if self._state.opened is None else self._state.opened.committer.commits,
            syncs=0 if self._state.opened is None else self._state.opened.committer.syncs,
            unsynced_commits=0 if self._state.opened is None else self._state.opened.committer.unsynced,
        )

    @needs_state
    async def synced(self) -> None:
        """Return once every write answered so far is on disk (the next durability point)."""
        await self._db.committer.synced()

    @needs_state
    async def disk_rows(self, user: str) -> tuple[int, int]:
        """Conversation rows and graph edges on disk that name `user` (to check `forget`)."""
        return self._db.user_rows(user)

    # --- internals: conversations ---

    def _turn_row(self, turn: Turn) -> TurnRow:
        if not isinstance(turn, Turn):
            turn = Turn.model_validate(turn)
        text, limit = turn.text, self.config.max_chars
        if len(text) > limit:
            # a turn alone over the window's bound keeps its start rather than vanishing
            text = text[: limit - 1] + "…"
        # authors and roles repeat across many turns: one string object each
        return (sys.intern(turn.role), sys.intern(turn.author), text, float(turn.time))

    def _touch(self, key: str, user: str) -> _Conversation:
        """The conversation at `key`, loaded from disk or created on first touch; it is
        now the most recently active."""
        now = self.clock()
        conv = self._conversations.get(key)
        if conv is None:
            conv = self._load(key, user, now)
            self._conversations[key] = conv
            self._user_keys.setdefault(user, set()).add(key)
            self._account(conv, +1)
        else:
            self._conversations.move_to_end(key)
        conv.last_active = now
        return conv

    def _load(self, key: str, user: str, now: float) -> _Conversation:
        if user in self._forgetting:
            return _Conversation([])
        stored: StoredConversation | None = self._db.load_conversation(key)
        if stored is None:
            return _Conversation([])
        if stored.last_active < now - self.config.stale_after_seconds:
            # cleanup has not reached it yet; it is gone all the same
            self._disk_conversations -= 1
            return _Conversation([], version=stored.version, purge=True)
        self.reloaded += 1
        turns = [(sys.intern(r), sys.intern(a), t, tm) for r, a, t, tm in stored.turns]
        return _Conversation(turns, sum(len(t[2]) for t in turns), stored.version, on_disk=True)

    def _purge_statements(self, key: str, conv: _Conversation) -> list[Statement]:
        if not conv.purge:
            return []
        conv.purge = False
        return ContextDB.delete_conversation(key)

    async def _write(
        self,
        key: str,
        conv: _Conversation,
        statements: list[Statement],
        failed_rows: Iterable[TurnRow] = (),
        urgent: bool = False,
    ) -> None:
        """Commit statements about one conversation; on failure take back `failed_rows`
        and reread the conversation from disk once no other write on it is pending."""
        conv.pending += 1
        try:
            await self._db.write(statements, urgent)
        except Exception:
            if self._conversations.get(key) is conv:
                failed = {id(r) for r in failed_rows}
                self._account(conv, -1)
                conv.turns = [t for t in conv.turns if id(t) not in failed]
                conv.chars = sum(len(t[2]) for t in conv.turns)
                conv.version += 1
                conv.reload = True
                self._account(conv, +1)
                self._drop_built(key)
            raise
        finally:
            conv.pending -= 1
            if conv.reload and not conv.pending and self._conversations.get(key) is conv:
                self._drop(key)

    def _account(self, conv: _Conversation, sign: int) -> None:
        self._turn_total += sign * len(conv.turns)
        self._char_total += sign * conv.chars
        self._bytes += sign * conv.nbytes

    def _drop(self, key: str) -> _Conversation:
        """Take a conversation out of memory (its disk copy, if any, stays)."""
        conv = self._conversations.pop(key)
        self._account(conv, -1)
        self._drop_built(key)
        self._touched.discard(key)
        user = key.split(_SEP, 1)[1]
        keys = self._user_keys[user]
        keys.discard(key)
        if not keys:
            del self._user_keys[user]
        return conv

    def _drop_built(self, key: str) -> None:
        entry = self._built.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes

    def _spill(self) -> list[Statement]:
        budget = self.config.memory_budget_bytes
        if self._bytes <= budget:
            return []
        before, moved, statements = self._bytes, 0, []
        # down to 90% of the budget, so spilling does not run again on the next tick
        target = budget * 9 // 10
        busy = 0
        while self._bytes > target and len(self._conversations) > busy:
            key, conv = next(iter(self._conversations.items()))
            if conv.pending:
                # a write is in flight: it is active, and must not be reread before it commits
                self._conversations.move_to_end(key)
                busy += 1
                continue
            if conv.purge:
                statements += ContextDB.delete_conversation(key)
            elif key in self._touched and conv.on_disk:
                statements.append(ContextDB.touch_conversation(key, conv.last_active))
            self._drop(key)
            moved += 1
        self.spilled += moved
        log.warning(
            "context shard %d over its memory budget (%d > %d bytes): moved %d least recently active "
            "conversations to disk, now %d bytes, %d conversations in memory, %d on disk",
            self.shard,
            before,
            budget,
            moved,
            self._bytes,
            len(self._conversations),
            self._disk_conversations,
        )
        return statements

    def _cleanup(self, now: float) -> list[Statement]:
        """Remove what has been idle past the threshold, walking from the least recently
        active end, so the cost grows with what is removed."""
        cutoff = now - self.config.stale_after_seconds
        statements: list[Statement] = []
        removed = 0
        dropped: set[str] = set()
        while self._conversations:
            key, conv = next(iter(self._conversations.items()))
            if conv.last_active >= cutoff or conv.pending:
                break
            self._drop(key)
            dropped.add(key)
            if conv.on_disk or conv.purge:
                statements += ContextDB.delete_conversation(key)
            if conv.on_disk:
                self._disk_conversations -= 1
            removed += 1
        for key in self._db.stale_conversation_keys(cutoff):
            user = key.split(_SEP, 1)[1]
            if key in self._conversations or key in dropped or user in self._forgetting:
                continue
            statements += ContextDB.delete_conversation(key)
            self._disk_conversations -= 1
            removed += 1
        edges = 0
        while self._edges:
            (server, user, other), edge = next(iter(self._edges.items()))
            if edge.last_seen >= cutoff:
                break
            self._remove_edge(server, user, other)
            edges += 1
        if edges:
            statements.append(ContextDB.delete_stale_edges(cutoff))
        self.cleanup_runs += 1
        self.cleaned_conversations += removed
        self.cleaned_edges += edges
        if removed or edges:
            log.info("context shard %d removed %d stale conversations, %d edges", self.shard, removed, edges)
        return statements

    # --- internals: social graph ---

    def _load_graph(self, db: ContextDB) -> None:
        """The whole graph lives in memory (it is small: contacts are capped and cleaned)."""
        for server, user, other, m, r, mb, rb, seen in db.load_edges():
            edge = self._edge(server, user, other)
            edge.mentioned, edge.replied, edge.mentioned_by, edge.replied_by = m, r, mb, rb
            edge.last_seen = seen

    def _edge(self, server: str, user: str, other: str) -> _Edge:
        """The edge user -> other in server, created if new; now the most recently seen."""
        node = self._nodes.get((server, user))
        if node is None:
            node = self._nodes[(server, user)] = _Node({}, 0)
            self._user_servers.setdefault(user, set()).add(server)
        self._graph_version += 1
        node.version = self._graph_version
        edge = node.contacts.get(other)
        if edge is None:
            edge = node.contacts[other] = _Edge()
            self._edges[(server, user, other)] = edge
            self._bytes += _EDGE_BYTES
        else:
            self._edges.move_to_end((server, user, other))
        return edge

    def _remove_edge(self, server: str, user: str, other: str) -> None:
        if self._edges.pop((server, user, other), None) is None:
            return
        self._bytes -= _EDGE_BYTES
        node = self._nodes[(server, user)]
        del node.contacts[other]
        self._graph_version += 1
        node.version = self._graph_version
        if not node.contacts:
            del self._nodes[(server, user)]
            servers = self._user_servers[user]
            servers.discard(server)
            if not servers:
                del self._user_servers[user]

    def _cap_contacts(self, server: str, user: str, keep: set[str]) -> list[Statement]:
        node = self._nodes[(server, user)]
        statements: list[Statement] = []
        while len(node.contacts) > self.config.max_contacts:
            other = min(
                (o for o in node.contacts if o not in keep),
                key=lambda o: node.contacts[o].last_seen,
                default=None,
            )
            if other is None:
                break
            self._remove_edge(server, user, other)
            self._remove_edge(server, other, user)
            statements.append(ContextDB.delete_edge(server, user, other))
            statements.append(ContextDB.delete_edge(server, other, user))
        return statements

    def _social_line(self, user: str, node: _Node | None) -> str:
        if node is None or not self.config.social_contacts:
            return ""
        top = sorted(node.contacts.items(), key=lambda kv: (kv[1].total, kv[1].last_seen), reverse=True)
        parts = [
            f"{other} ({edge.total} mentions or replies, last "
            f"{datetime.fromtimestamp(edge.last_seen, UTC):%Y-%m-%d})"
            for other, edge in top[: self.config.social_contacts]
        ]
        return f"In this server, {user} talks most with: {', '.join(parts)}."

    # --- metrics ---

    def _init_metrics(self) -> None:
        tag = ("shard",)
        self._tags = {"shard": str(self.shard)}
        self._gauges = {
            name: metrics.gauge(f"context_{name}", doc, tag)
            for name, doc in (
                ("conversations_in_memory", "conversations held in memory"),
                ("conversations_on_disk", "conversations stored on disk"),
                ("bytes", "approximate bytes held in memory"),
                ("graph_edges", "social graph edges"),
                ("built_hit_rate", "share of build() calls served from the built-context cache"),
            )
        }
        self._counters = {
            name: metrics.counter(f"context_{name}", doc, tag)
            for name, doc in (
                ("built_hits", "build() calls served from the cache"),
                ("built_misses", "build() calls that assembled a context"),
                ("spilled", "conversations moved out of memory over the budget"),
                ("reloaded", "conversations loaded back from disk"),
                ("cleaned_conversations", "stale conversations removed"),
                ("cleaned_edges", "stale graph edges removed"),
            )
        }
        self._exported: dict[str, int] = dict.fromkeys(self._counters, 0)

    def _export_metrics(self) -> None:
        lookups = self.built_hits + self.built_misses
        values = {
            "conversations_in_memory": len(self._conversations),
            "conversations_on_disk": self._disk_conversations,
            "bytes": self._bytes,
            "graph_edges": len(self._edges),
            "built_hit_rate": self.built_hits / lookups if lookups else 0.0,
        }
        for name, value in values.items():
            self._gauges[name].set(value, self._tags)
        for name, counter in self._counters.items():
            total = getattr(self, name)
            if total > self._exported[name]:
                counter.inc(total - self._exported[name], self._tags)
                self._exported[name] = total


def _edge_row(server: str, user: str, other: str, e: _Edge) -> EdgeRow:
    return (server, user, other, e.mentioned, e.replied, e.mentioned_by, e.replied_by, e.last_seen)


class ContextClient(ShardedClient):
    """The bot's handle on the context store: conversations are routed by (scope, user),
    a server's social graph by the server id."""

    #: a reply-link lookup is a read: retried while its replica restarts
    idempotent_methods = ShardedClient.idempotent_methods | {"reply_scope", "persona", "profile"}

    # An append never shares a build's round trip: a round trip is answered when all its
    # calls are, and an append is answered once durable, which the bot's commit delay holds
    # back, so a build beside it would wait for the commit (the load test saw its admit
    # stage stall for the delay). Writes linger in their own lane instead.

    async def append(self, scope: str, user: str, turns: list[Turn], *, background: bool = False) -> int:
        """Add turns to the (scope, user) conversation; returns its new version once durable.
        `background`: nobody waits for it, so it rides with the shard's next append (or
        leaves after `linger_seconds`)."""
        key = conversation_key(scope, user)
        send = self._background if background else self._batched
        return await send(self.handle_for(key), ContextStore.append, scope, user, turns)

    async def build(self, scope: str, user: str, server: str | None = None) -> BuiltContext:
        """The context for (scope, user); with `server`, plus the user's social line there.
        When another shard owns the server's graph, both are asked at once (one round trip)."""
        owner = self.handle_for(conversation_key(scope, user))
        if server is None:
            return await self._batched(owner, ContextStore.build, scope, user)
        graph_owner = self.handle_for(graph_key(server))
        if graph_owner is owner:
            return await self._batched(owner, ContextStore.build, scope, user, server)
        built, (social, persona, model) = await asyncio.gather(
            self._batched(owner, ContextStore.build, scope, user),
            self._batched(graph_owner, ContextStore.server_context, server, user),
        )
        if social or persona or model:
            return assemble(built.turns, built.version, social, persona, model)
        return built

    async def set_persona(self, server: str, persona: str) -> None:
        """A server's settings live on the shard that owns its graph."""
        await self._call(self.handle_for(graph_key(server)), ContextStore.set_persona, server, persona)

    async def reset_persona(self, server: str) -> bool:
        return await self._call(self.handle_for(graph_key(server)), ContextStore.reset_persona, server)

    async def persona(self, server: str) -> str:
        return await self._call(self.handle_for(graph_key(server)), ContextStore.persona, server)

    async def set_model(self, server: str, model: str) -> None:
        await self._call(self.handle_for(graph_key(server)), ContextStore.set_model, server, model)

    async def profile(self, server: str) -> tuple[str, str]:
        """`server`'s persona and model ("" for none), in one call."""
        return await self._batched(self.handle_for(graph_key(server)), ContextStore.profile, server)

    async def record_interaction(
        self,
        server: str,
        user: str,
        mentions: list[str],
        reply_to: str | None = None,
        *,
        background: bool = False,
    ) -> int:
        """Count `user`'s mentions of and reply to others in `server`'s graph; `background`
        as for `append`."""
        owner = self.handle_for(graph_key(server))
        send = self._background if background else self._batched
        return await send(owner, ContextStore.record_interaction, server, user, mentions, reply_to)

    async def link_replies(self, scope: str, user: str, message_ids: list[str]) -> int:
        """Links live with their conversation, on its shard."""
        key = conversation_key(scope, user)
        return await self._call(self.handle_for(key), ContextStore.link_replies, scope, user, message_ids)

    async def reply_scope(self, message_id: str) -> str | None:
        """Asks every shard at once (a link lives on its conversation's shard)."""
        found = await self._call_all(ContextStore.reply_scope, message_id)
        return next((f for f in found if f is not None), None)

    async def reset(self, scope: str, user: str) -> bool:
        key = conversation_key(scope, user)
        return await self._call(self.handle_for(key), ContextStore.reset, scope, user)

    async def forget(self, user: str) -> int:
        return sum(await self._call_all(ContextStore.forget, user))

    async def stats(self) -> list[ContextStats]:
        return await self._call_all(ContextStore.stats)
