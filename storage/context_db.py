"""The context store's SQLite file: schema and every statement the ContextStore runs.

One file per shard (`context-<shard>.sqlite`): conversations with their turns, the
links from front-end messages to conversations, and the social graph's edges. Writes go
through a `GroupCommitter`; reads use their own WAL connection so they never wait for a
commit in flight.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from storage.sqlite import GroupCommitter, Statement, SyncMode, open_sqlite

SCHEMA = """
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
-- a front-end message (a bot reply, a thread) -> the conversation it belongs to; rows go
-- with their conversation, and the oldest go first past the bound
CREATE TABLE IF NOT EXISTS reply_links (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    user TEXT NOT NULL,
    key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reply_links_by_key ON reply_links(key);
CREATE INDEX IF NOT EXISTS reply_links_by_user ON reply_links(user);
"""

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

    def __init__(self, path: Path, commit_delay: float = 0.0, synchronous: SyncMode = "NORMAL") -> None:
        self.path = path
        self.committer = GroupCommitter(open_sqlite(path, SCHEMA, synchronous), max_delay=commit_delay)
        self._reader: sqlite3.Connection = open_sqlite(path, synchronous=synchronous)

    async def write(self, statements: list[Statement], urgent: bool = False) -> None:
        """Run `statements` in order in the next group commit; return once durable.
        `urgent`: a user waits on it, so the commit does not wait for more writers."""
        if statements:
            await self.committer.write(statements, urgent)

    # --- reads (committed state only) ---

    def load_conversation(self, key: str) -> StoredConversation | None:
        row = self._reader.execute(
            "SELECT version, last_active FROM conversations WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        turns = self._reader.execute(
            "SELECT role, author, text, time FROM turns WHERE key = ? ORDER BY id", (key,)
        ).fetchall()
        return StoredConversation(row[0], row[1], turns)

    def count_conversations(self) -> int:
        return int(self._reader.execute("SELECT count(*) FROM conversations").fetchone()[0])

    def conversation_keys_of(self, user: str) -> list[str]:
        rows = self._reader.execute("SELECT key FROM conversations WHERE user = ?", (user,)).fetchall()
        return [r[0] for r in rows]

    def stale_conversation_keys(self, cutoff: float) -> list[str]:
        """Keys idle since before `cutoff`, found through the last-activity index."""
        rows = self._reader.execute(
            "SELECT key FROM conversations WHERE last_active < ?", (cutoff,)
        ).fetchall()
        return [r[0] for r in rows]

    def load_edges(self) -> list[EdgeRow]:
        """Every edge, oldest first, so the caller can rebuild its last-seen order."""
        return self._reader.execute(
            "SELECT server, user, other, mentioned, replied, mentioned_by, replied_by, last_seen "
            "FROM graph_edges ORDER BY last_seen"
        ).fetchall()

    def user_rows(self, user: str) -> tuple[int, int]:
        """How many conversation rows and graph edges on disk mention `user` (for checks)."""
        convs = self._reader.execute("SELECT count(*) FROM conversations WHERE user = ?", (user,)).fetchone()
        edges = self._reader.execute(
            "SELECT count(*) FROM graph_edges WHERE user = ? OR other = ?", (user, user)
        ).fetchone()
        return int(convs[0]), int(edges[0])

    def reply_scope(self, message_id: str) -> str | None:
        row = self._reader.execute(
            "SELECT scope FROM reply_links WHERE message_id = ?", (message_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    # --- statements ---

    @staticmethod
    def upsert_conversation(key: str, scope: str, user: str, version: int, last_active: float) -> Statement:
        return (
            "INSERT INTO conversations (key, scope, user, version, last_active) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET version = excluded.version, last_active = excluded.last_active",
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
                "INSERT INTO reply_links (message_id, scope, user, key) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(message_id) DO UPDATE SET scope = excluded.scope, user = excluded.user, "
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
            ("DELETE FROM turns WHERE key IN (SELECT key FROM conversations WHERE user = ?)", (user,)),
            ("DELETE FROM conversations WHERE user = ?", (user,)),
            ("DELETE FROM reply_links WHERE user = ?", (user,)),
            ("DELETE FROM graph_edges WHERE user = ? OR other = ?", (user, user)),
        ]

    @staticmethod
    def upsert_edge(row: EdgeRow) -> Statement:
        return (
            "INSERT OR REPLACE INTO graph_edges "
            "(server, user, other, mentioned, replied, mentioned_by, replied_by, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            row,
        )

    @staticmethod
    def delete_edge(server: str, user: str, other: str) -> Statement:
        return ("DELETE FROM graph_edges WHERE server = ? AND user = ? AND other = ?", (server, user, other))

    @staticmethod
    def delete_stale_edges(cutoff: float) -> Statement:
        return ("DELETE FROM graph_edges WHERE last_seen < ?", (cutoff,))

    def close(self) -> None:
        self.committer.close()
        self._reader.close()
