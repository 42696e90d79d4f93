"""Gateway sharding: two `raycord run` front-ends over two shards of one bot, against
`raycord fake-discord`, each answering the guilds of its own shard.

Both connect to the session's Ray with `--address` and share one namespace, so they share
the service actors (one bot, one memory, one budget), as two front-end processes on a
cluster do; an embedded Ray in each would give them separate services.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator

import pytest
import ray

from tests.discord_harness import BotProcess, StandIn, answer_to, kill_services, reply_to


@pytest.fixture(scope="module")
def two_shards(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    stand_in = StandIn(guilds=2)
    namespace = f"shards-{uuid.uuid4().hex[:8]}"
    address = ray.get_runtime_context().gcs_address
    root = tmp_path_factory.mktemp("shards")
    bots: list[BotProcess] = []
    try:
        for shard in (0, 1):
            bot = BotProcess(
                stand_in,
                root / "state",
                {"shard_count": 2, "shard_ids": [shard], "edit_interval_seconds": 0},
                address=address,
                namespace=namespace,
                log_name=f"shard-{shard}",
            )
            bot.wait_connected(shard)
            bots.append(bot)
        yield stand_in
    finally:
        for bot in bots:
            bot.stop(signal.SIGINT)
        kill_services(namespace)
        stand_in.stop()


def test_each_front_end_identifies_as_its_own_shard(two_shards: StandIn) -> None:
    state = two_shards.state()
    assert sorted(state["identifies"]) == [[0, 2], [1, 2]]
    assert sorted(s["shard"][0] for s in state["sessions"] if s["connected"]) == [0, 1]


def test_two_front_ends_each_answer_the_guild_of_their_shard(two_shards: StandIn) -> None:
    state = two_shards.state()
    user = two_shards.call("users", {"name": "grace"})["id"]
    # one guild per shard: the stand-in sends a guild's events only to its shard's session,
    # so each answer comes from the front-end that runs that shard
    assert sorted((int(g["id"]) >> 22) % 2 for g in state["guilds"]) == [0, 1]
    for guild in state["guilds"]:
        channel = guild["channels"][0]["id"]
        asked = reply_to(two_shards, channel, user, f"hello from {guild['name']}", mention_bot=True)
        answer = answer_to(two_shards, channel, asked["id"])
        assert f"hello from {guild['name']}" in answer["content"]
