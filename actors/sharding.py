"""Stable routing of a key to one of N replicas of a service.

Python's `hash()` is salted per process, so two front-ends would disagree; we use a
fixed 64-bit digest instead, identical in every process and on every node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def stable_hash(key: str) -> int:
    """A 64-bit hash of `key` that is the same in every process and Python version."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


def shard_index(key: str, shards: int) -> int:
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    return stable_hash(key) % shards


def pick(key: str, replicas: Sequence[T]) -> T:
    """The replica that owns `key`."""
    return replicas[shard_index(key, len(replicas))]


def group_by_shard(keys: Sequence[str], shards: int) -> dict[int, list[int]]:
    """Positions of `keys` grouped by owning shard, so a batch costs one call per shard."""
    groups: dict[int, list[int]] = {}
    for pos, key in enumerate(keys):
        groups.setdefault(shard_index(key, shards), []).append(pos)
    return groups
