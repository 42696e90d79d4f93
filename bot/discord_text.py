"""Text shaping for Discord: split long replies at the 2000-character limit.

Splits fall on line, then sentence, then word boundaries, and a ``` code block cut
by a split is closed at the end of one message and reopened (with its language) in
the next, so every message renders on its own.
"""

from __future__ import annotations

import re

DISCORD_LIMIT = 2000
_FENCE = re.compile(r"^\s*```(\S*)")
_SENTENCE_END = re.compile(r"[.!?][)\"'\u201d]?\s")


def _cut_point(text: str, limit: int) -> int:
    """Where to cut `text` so the head is at most `limit` long, at the best boundary."""
    if len(text) <= limit:
        return len(text)
    window = text[:limit]
    newline = window.rfind("\n")
    if newline >= limit // 2:
        return newline + 1
    sentence_ends = [m.end() for m in _SENTENCE_END.finditer(window)]
    if sentence_ends and sentence_ends[-1] >= limit // 2:
        return sentence_ends[-1]
    space = window.rfind(" ")
    if space >= limit // 2:
        return space + 1
    return limit


def _open_fence(text: str, start_lang: str | None) -> str | None:
    """The language of the code block still open at the end of `text` (None if closed)."""
    lang = start_lang
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if m:
            lang = None if lang is not None else m.group(1)
    return lang


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Split `text` into messages of at most `limit` characters, keeping code blocks whole."""
    if limit < 20:
        raise ValueError("limit too small to hold a code fence")
    parts: list[str] = []
    rest = text
    lang: str | None = None  # language of a block carried over from the previous part
    while rest:
        prefix = f"```{lang}\n" if lang is not None else ""
        # room for the prefix and for a closing fence we may need to add
        budget = limit - len(prefix) - len("\n```")
        cut = _cut_point(rest, budget) if len(prefix) + len(rest) > limit else len(rest)
        head, rest = rest[:cut], rest[cut:]
        body = prefix + head
        still_open = _open_fence(head, lang)
        if still_open is not None and rest:
            body = body.rstrip("\n") + "\n```"
        lang = still_open if rest else None
        if body.strip():
            parts.append(body)
    return parts or [""]
