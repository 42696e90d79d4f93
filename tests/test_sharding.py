"""Stable routing of keys to service replicas."""

from __future__ import annotations

from actors.sharding import group_by_shard, shard_index, stable_hash


def test_sharding_is_stable_and_spreads_keys() -> None:
    assert stable_hash("user-1") == stable_hash("user-1")
    # pinned: every process and every node must route the same key to the same shard
    assert stable_hash("user-1") == 0x9AAC5A8621EAE188
    counts = [0, 0, 0, 0]
    for i in range(4000):
        counts[shard_index(f"user-{i}", 4)] += 1
    assert min(counts) > 800
    groups = group_by_shard(["a", "b", "a"], 3)
    assert sorted(p for ps in groups.values() for p in ps) == [0, 1, 2]
