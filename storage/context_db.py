"""The context store's durable state: schema and every statement the ContextStore runs.

One SQLite file per shard (`context-<shard>.sqlite`), or one PostgreSQL schema per shard
(`context_<shard>`): conversations with their turns, the links from front-end messages to
conversations, and the social graph's edges. Writes go through a group committer; reads
use their own connection so they never wait for a commit in flight. The statements are
portable SQL (see `storage.postgres`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.migrations import Migration, migrate_sqlite
from storage.postgres import PgCommitter, PgDatabase, PgTarget
from storage.sqlite import BatchCommitter, GroupCommitter, Statement, SyncMode, open_sqlite

STORE = "context"

#: the context store's schema, oldest first; a new table is one more `Migration`
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        sqlite="""
CREATE TABLE IF NOT EXISTS conversations (
    key TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    user TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_active REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_user ON conversations(user);
CREATE INDEX IF NOT EXISTS conversations_by_last_active ON conversations(last_active);
-- the rowid orders turns by arrival: statements run in the order the store issued them
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    role TEXT NOT NULL,
    author TEXT NOT NULL,
    text TEXT NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_key ON turns(key, id);
CREATE TABLE IF NOT EXISTS graph_edges (
    server TEXT NOT NULL,
    user TEXT NOT NULL,
    other TEXT NOT NULL,
    mentioned INTEGER NOT NULL,
    replied INTEGER NOT NULL,
    mentioned_by INTEGER NOT NULL,
    replied_by INTEGER NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (server, user, other)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS graph_edges_by_user ON graph_edges(user);
CREATE INDEX IF NOT EXISTS graph_edges_by_other ON graph_edges(other);
CREATE INDEX IF NOT EXISTS graph_edges_by_last_seen ON graph_edges(last_seen);
""",
        # "user" is a reserved word in PostgreSQL, hence quoted (in the statements too)
        postgres="""
CREATE TABLE conversations (
    key TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    "user" TEXT NOT NULL,
    version BIGINT NOT NULL,
    last_active DOUBLE PRECISION NOT NULL
);
CREATE INDEX conversations_by_user ON conversations("user");
CREATE INDEX conversations_by_last_active ON conversations(last_active);
-- the identity orders turns by arrival: one committer issues them in the store's order
CREATE TABLE turns (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key TEXT NOT NULL,
    role TEXT NOT NULL,
    author TEXT NOT NULL,
    text TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL
);
CREATE INDEX turns_by_key ON turns(key, id);
CREATE TABLE graph_edges (
    server TEXT NOT NULL,
    "user" TEXT NOT NULL,
    other TEXT NOT NULL,
    mentioned BIGINT NOT NULL,
    replied BIGINT NOT NULL,
    mentioned_by BIGINT NOT NULL,
    replied_by BIGINT NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (server, "user", other)
);
CREATE INDEX graph_edges_by_user ON graph_edges("user");
CREATE INDEX graph_edges_by_other ON graph_edges(other);
CREATE INDEX graph_edges_by_last_seen ON graph_edges(last_seen);
""",
    ),
    Migration(
        2,
        # a front-end message (a bot reply, a thread) -> the conversation it belongs to;
        # rows go with their conversation, and the oldest go first past the bound
        sqlite="""
CREATE TABLE IF NOT EXISTS reply_links (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    user TEXT NOT NULL,
    key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reply_links_by_key ON reply_links(key);
CREATE INDEX IF NOT EXISTS reply_links_by_user ON reply_links(user);
""",
        postgres="""
CREATE TABLE reply_links (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    "user" TEXT NOT NULL,
    key TEXT NOT NULL
);
CREATE INDEX reply_links_by_key ON reply_links(key);
CREATE INDEX reply_links_by_user ON reply_links("user");
""",
    ),
    Migration(
        3,
        # what a server chose for itself: its persona (a system prompt after the global
        # one) and its model ("" for either: the bot's default)
        sqlite="""
CREATE TABLE IF NOT EXISTS server_settings (
    server TEXT PRIMARY KEY,
    persona TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT ''
);
""",
        postgres="""
CREATE TABLE server_settings (
    server TEXT PRIMARY KEY,
    persona TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT ''
);
""",
    ),
)

#: (role, author, text, time) as stored
TurnRow = tuple[str, str, str, float]
#: (server, user, other, mentioned, replied, mentioned_by, replied_by, last_seen)
EdgeRow = tuple[str, str, str, int, int, int, int, float]


@dataclass(slots=True, frozen=True)
class StoredConversation:
    version: int
    last_active: float
    turns: list[TurnRow]


def db_path(state_dir: Path, shard: int) -> Path:
    return state_dir / f"context-{shard}.sqlite"


class ContextDB:
    """Statements and reads over one shard's file. Statement builders return lists for
    `write()`, so a caller can put several changes into one group commit, in order."""

    def __init__(
        self,
        state: Path | PgTarget,
        shard: int = 0,
        commit_delay: float = 0.0,
        synchronous: SyncMode = "NORMAL",
    ) -> None:
        """Open (creating and migrating) the shard's file under the state directory
        `state`, or its schema in the PostgreSQL database `state` names.

        Raises:
            SchemaTooNew: the stored schema was written by a newer raycord.
            StateUnavailable: the PostgreSQL server cannot be reached.
        """
        self.committer: BatchCommitter
        self._rows: Callable[..., list[tuple[Any, ...]]]
        if isinstance(state, PgTarget):
            db = PgDatabase(state, f"{STORE}_{shard}", STORE, MIGRATIONS)
            self.where = db.where
            self.committer = PgCommitter(db, max_delay=commit_delay)
            self._rows = db.read
            self._reader: sqlite3.Connection | None = None
        else:
            path = db_path(state, shard)
            self.where = str(path)
            # secure_delete: a forgotten user's text is overwritten where it was stored,
            # not left in freed cells and pages (`forget` promises it is gone)
            conn = open_sqlite(path, synchronous=synchronous, secure_delete=True)
            migrate_sqlite(conn, STORE, MIGRATIONS, self.where)
            self.committer = GroupCommitter(conn, max_delay=commit_delay)
            reader = self._reader = open_sqlite(path, synchronous=synchronous, secure_delete=True)
            self._rows = lambda sql, params=(): reader.execute(sql, params).fetchall()

    async def write(self, statements: list[Statement], urgent: bool = False) -> None:
        """Run `statements` in order in the next group commit; return once durable.
        `urgent`: a user waits on it, so the commit does not wait for more writers."""
        if statements:
            await self.committer.write(statements, urgent)

    async def truncate_log(self) -> bool:
        """After a deletion: leave no older copy of the deleted rows in the store's log
        (the SQLite WAL is checkpointed and truncated). True once that is so."""
        return await self.committer.truncate_log()

    # --- reads (committed state only) ---

    def load_conversation(self, key: str) -> StoredConversation | None:
        rows = self._rows("SELECT version, last_active FROM conversations WHERE key = ?", (key,))
        if not rows:
            return None
        turns = self._rows("SELECT role, author, text, time FROM turns WHERE key = ? ORDER BY id", (key,))
        return StoredConversation(rows[0][0], rows[0][1], turns)

    def count_conversations(self) -> int:
        return int(self._rows("SELECT count(*) FROM conversations")[0][0])

    def conversation_keys_of(self, user: str) -> list[str]:
        rows = self._rows('SELECT key FROM conversations WHERE "user" = ?', (user,))
        return [r[0] for r in rows]

    def stale_conversation_keys(self, cutoff: float) -> list[str]:
        """Keys idle since before `cutoff`, found through the last-activity index."""
        rows = self._rows("SELECT key FROM conversations WHERE last_active < ?", (cutoff,))
        return [r[0] for r in rows]

    def load_edges(self) -> list[EdgeRow]:
        """Every edge, oldest first, so the caller can rebuild its last-seen order."""
        return self._rows(
            'SELECT server, "user", other, mentioned, replied, mentioned_by, replied_by, last_seen '
            "FROM graph_edges ORDER BY last_seen"
        )

    def user_rows(self, user: str) -> tuple[int, int]:
        """How many conversation rows and graph edges on disk mention `user` (for checks)."""
        convs = self._rows('SELECT count(*) FROM conversations WHERE "user" = ?', (user,))
        edges = self._rows('SELECT count(*) FROM graph_edges WHERE "user" = ? OR other = ?', (user, user))
        return int(convs[0][0]), int(edges[0][0])

    def load_server_settings(self) -> dict[str, tuple[str, str]]:
        """server -> (persona, model) for every server that chose either."""
        rows = self._rows(
            "SELECT server, persona, model FROM server_settings WHERE persona <> '' OR model <> ''"
        )
        return {str(r[0]): (str(r[1]), str(r[2])) for r in rows}

    def reply_scope(self, message_id: str) -> str | None:
        rows = self._rows("SELECT scope FROM reply_links WHERE message_id = ?", (message_id,))
        return None if not rows else str(rows[0][0])

    # --- statements ---

    @staticmethod
    def upsert_conversation(key: str, scope: str, user: str, version: int, last_active: float) -> Statement:
        return (
            'INSERT INTO conversations (key, scope, "user", version, last_active) VALUES (?, ?, ?, ?, ?) '
            "ON CONFLICT (key) DO UPDATE SET version = excluded.version, last_active = excluded.last_active",
            (key, scope, user, version, last_active),
        )

    @staticmethod
    def insert_turns(key: str, turns: Iterable[TurnRow]) -> list[Statement]:
        return [
            ("INSERT INTO turns (key, role, author, text, time) VALUES (?, ?, ?, ?, ?)", (key, *t))
            for t in turns
        ]

    @staticmethod
    def keep_newest_turns(key: str, keep: int) -> Statement:
        """Drop a conversation's oldest turns on disk so that `keep` remain, as in memory."""
        return (
            "DELETE FROM turns WHERE key = ? AND id NOT IN "
            "(SELECT id FROM turns WHERE key = ? ORDER BY id DESC LIMIT ?)",
            (key, key, keep),
        )

    @staticmethod
    def touch_conversation(key: str, last_active: float) -> Statement:
        return ("UPDATE conversations SET last_active = ? WHERE key = ?", (last_active, key))

    @staticmethod
    def link_replies(
        message_ids: Iterable[str], scope: str, user: str, key: str, keep: int
    ) -> list[Statement]:
        """Point each message at the (scope, user) conversation; then keep the newest `keep` links."""
        statements: list[Statement] = [
            (
                'INSERT INTO reply_links (message_id, scope, "user", key) VALUES (?, ?, ?, ?) '
                'ON CONFLICT (message_id) DO UPDATE SET scope = excluded.scope, "user" = excluded."user", '
                "key = excluded.key",
                (m, scope, user, key),
            )
            for m in message_ids
        ]
        statements.append(
            ("DELETE FROM reply_links WHERE id <= (SELECT max(id) FROM reply_links) - ?", (keep,))
        )
        return statements

    @staticmethod
    def delete_conversation(key: str) -> list[Statement]:
        return [
            ("DELETE FROM reply_links WHERE key = ?", (key,)),
            ("DELETE FROM turns WHERE key = ?", (key,)),
            ("DELETE FROM conversations WHERE key = ?", (key,)),
        ]

    @staticmethod
    def delete_user(user: str) -> list[Statement]:
        """Everything stored about `user`: conversations, turns, and graph edges either way."""
        return [
            ('DELETE FROM turns WHERE key IN (SELECT key FROM conversations WHERE "user" = ?)', (user,)),
            ('DELETE FROM conversations WHERE "user" = ?', (user,)),
            ('DELETE FROM reply_links WHERE "user" = ?', (user,)),
            ('DELETE FROM graph_edges WHERE "user" = ? OR other = ?', (user, user)),
        ]

    @staticmethod
    def set_persona(server: str, persona: str) -> Statement:
        """Store (or, with "", clear) a server's persona."""
        return (
            "INSERT INTO server_settings (server, persona) VALUES (?, ?) "
            "ON CONFLICT (server) DO UPDATE SET persona = excluded.persona",
            (server, persona),
        )

    @staticmethod
    def set_model(server: str, model: str) -> Statement:
        """Store (or, with "", clear) a server's model."""
        return (
            "INSERT INTO server_settings (server, model) VALUES (?, ?) "
            "ON CONFLICT (server) DO UPDATE SET model = excluded.model",
            (server, model),
        )

    @staticmethod
    def upsert_edge(row: EdgeRow) -> Statement:
        return (
            "INSERT INTO graph_edges "
            '(server, "user", other, mentioned, replied, mentioned_by, replied_by, last_seen) '
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            'ON CONFLICT (server, "user", other) DO UPDATE SET mentioned = excluded.mentioned, '
            "replied = excluded.replied, mentioned_by = excluded.mentioned_by, "
            "replied_by = excluded.replied_by, last_seen = excluded.last_seen",
            row,
        )

    @staticmethod
    def delete_edge(server: str, user: str, other: str) -> Statement:
        return (
            'DELETE FROM graph_edges WHERE server = ? AND "user" = ? AND other = ?',
            (server, user, other),
        )

    @staticmethod
    def delete_stale_edges(cutoff: float) -> Statement:
        return ("DELETE FROM graph_edges WHERE last_seen < ?", (cutoff,))

    def close(self) -> None:
        self.committer.close()
        if self._reader is not None:
            self._reader.close()
