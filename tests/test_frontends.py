"""Discord front-ends as Ray actors: `raycord run --address <ray> --frontends 2` over 4 shards,
against `raycord fake-discord` on the session's Ray.

The driver (a `raycord run` subprocess) starts `frontend-0` and `frontend-1`, each a
`RaycordBot` over a contiguous block of the shards with a pipeline over the shared services;
one front-end is killed and Ray brings it back with the same shards. The refusals before
anything starts run in-process, without Ray.
"""

from __future__ import annotations

import asyncio
import io
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from rich.console import Console

from bot.cli import main
from bot.config import Settings
from bot.deploy import ENTRYPOINT, entrypoint
from bot.frontend import (
    FrontendError,
    FrontendStatus,
    check_frontends,
    frontend_statuses,
    prepare_frontends,
    split_shards,
)
from bot.status import run_status
from tests.conftest import make_settings
from tests.discord_harness import (
    TOKEN,
    BotProcess,
    StandIn,
    answer_to,
    connected_shards,
    kill_services,
    reply_to,
    wait_for,
)

SHARDS = 4

# -- what is refused before anything starts -------------------------------------------------


def test_shards_are_shared_out_in_contiguous_blocks_differing_by_at_most_one() -> None:
    assert split_shards(range(4), 2) == [[0, 1], [2, 3]]
    assert split_shards(range(5), 3) == [[0, 1], [2, 3], [4]]
    assert split_shards([4, 5, 6], 3) == [[4], [5], [6]]
    with pytest.raises(ValueError):
        split_shards(range(2), 3)


def test_more_frontends_than_shards_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="more than the 2 shard"):
        Settings(discord={"shard_count": 2, "frontends": 3})  # type: ignore[arg-type]  # validated as a dict
    with pytest.raises(ValueError, match="more than the 1 shard"):
        Settings(discord={"shard_count": 4, "shard_ids": [3], "frontends": 2})  # type: ignore[arg-type]


def test_frontends_need_a_cluster_and_the_discord_front_end(tmp_path: Path) -> None:
    local = make_settings(tmp_path, discord={"frontends": 2})
    with pytest.raises(FrontendError, match="--address auto"):
        check_frontends(local, "discord")
    on_cluster = make_settings(tmp_path, discord={"frontends": 2}, ray_address="auto")
    with pytest.raises(FrontendError, match="terminal chat"):
        check_frontends(on_cluster, "terminal")
    check_frontends(on_cluster, "discord")
    check_frontends(make_settings(tmp_path), "terminal")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["run", "--frontends", "2"], "--address auto"),
        (["run", "--frontends", "3", "--address", "auto"], "more than the 2 shard"),
        (["chat", "--address", "auto"], "terminal chat"),
    ],
)
def test_raycord_run_refuses_frontends_that_cannot_work_before_starting_anything(
    argv: list[str],
    said: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RAYCORD_DISCORD_TOKEN", "fake-token")
    monkeypatch.setenv("RAYCORD_DISCORD__SHARD_COUNT", "2")
    if argv[0] == "chat":
        monkeypatch.setenv("RAYCORD_DISCORD__FRONTENDS", "2")
    assert main([*argv, "--state-dir", str(tmp_path / "state")]) == 2
    assert said in capsys.readouterr().err


def test_deploy_passes_the_frontends_to_the_jobs_entrypoint(tmp_path: Path) -> None:
    assert entrypoint(tmp_path, frontends=2) == f"{ENTRYPOINT} --frontends 2"
    config = tmp_path / "bot.yaml"
    assert entrypoint(tmp_path, config, 3) == f"{ENTRYPOINT} --frontends 3 --config bot.yaml"


def test_the_driver_asks_discord_for_the_shard_count_once_and_refuses_what_cannot_work(
    tmp_path: Path,
) -> None:
    stand_in = StandIn(guilds=1)
    try:

        def settings(token: str, frontends: int) -> Settings:
            discord = {"api_base_url": stand_in.url, "frontends": frontends}
            return make_settings(tmp_path, discord_token=token, discord=discord, ray_address="auto")

        # the stand-in's /gateway/bot recommends one shard
        assert asyncio.run(prepare_frontends(settings(TOKEN, 1))).discord.shard_count == 1
        with pytest.raises(FrontendError, match="more than the 1 shard"):
            asyncio.run(prepare_frontends(settings(TOKEN, 2)))
        with pytest.raises(FrontendError, match="Discord refused the token"):
            asyncio.run(prepare_frontends(settings("not-the-token", 1)))
    finally:
        stand_in.stop()


# -- two front-end actors on the session's Ray ----------------------------------------------


@dataclass
class Frontends:
    stand_in: StandIn
    bot: BotProcess
    settings: Settings


def _shard_of(guild_id: str) -> int:
    return (int(guild_id) >> 22) % SHARDS


def statuses(settings: Settings) -> dict[str, FrontendStatus | str]:
    return asyncio.run(frontend_statuses(settings))


@pytest.fixture(scope="module")
def frontends(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Frontends]:
    stand_in = StandIn(guilds=SHARDS)
    namespace = f"frontends-{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("frontends")
    bot: BotProcess | None = None
    try:
        bot = BotProcess(
            stand_in,
            root / "state",
            {"shard_count": SHARDS, "edit_interval_seconds": 0},
            address=ray.get_runtime_context().gcs_address,
            namespace=namespace,
            args=("--frontends", "2"),
        )
        running = bot

        def all_shards() -> bool:
            if running.proc.poll() is not None:
                raise AssertionError(f"the bot exited ({running.proc.returncode}):\n{running.log()[-3000:]}")
            return connected_shards(stand_in) == set(range(SHARDS))

        wait_for("every shard to connect", all_shards, timeout=180)
        wait_for("the driver to say it logged in", lambda: "logged in to Discord" in running.log(), 60)
        yield Frontends(stand_in, bot, make_settings(root, namespace=namespace))
    finally:
        if bot is not None:
            bot.stop(signal.SIGINT)
        kill_services(namespace)
        stand_in.stop()


def ask_every_shard(frontends: Frontends, user: str, text: str) -> dict[int, str]:
    """A mention in each guild (one per shard), and the bot's answer to each, by shard."""
    answers: dict[int, str] = {}
    for guild in frontends.stand_in.state()["guilds"]:
        channel = guild["channels"][0]["id"]
        asked = reply_to(frontends.stand_in, channel, user, f"{text} {guild['name']}", mention_bot=True)
        answers[_shard_of(guild["id"])] = answer_to(frontends.stand_in, channel, asked["id"])["content"]
    return answers


def test_each_frontend_actor_identifies_its_own_block_of_shards(frontends: Frontends) -> None:
    state = frontends.stand_in.state()
    assert sorted(state["identifies"]) == [[shard, SHARDS] for shard in range(SHARDS)]
    found = statuses(frontends.settings)
    assert sorted(found) == ["frontend-0", "frontend-1"]
    shards = {
        name: [s.shard_id for s in front.shards]
        for name, front in found.items()
        if not isinstance(front, str)
    }
    assert shards == {"frontend-0": [0, 1], "frontend-1": [2, 3]}
    assert "2 front-end actor(s) over 4 shard(s)" in frontends.bot.log()


def test_messages_on_the_guilds_of_every_shard_are_answered(frontends: Frontends) -> None:
    user = frontends.stand_in.call("users", {"name": "ada"})["id"]
    answers = ask_every_shard(frontends, user, "hello from")
    assert sorted(answers) == list(range(SHARDS))
    for shard, content in answers.items():
        assert f"hello from guild {shard}" in content


def test_status_lists_every_frontend_with_its_node_shards_and_latency(frontends: Frontends) -> None:
    found = statuses(frontends.settings)
    here = ray.get_runtime_context().get_node_id()
    for front in found.values():
        assert isinstance(front, FrontendStatus), front
        assert front.node_id == here and front.ready
        assert all(s.connected and s.latency_ms is not None for s in front.shards)
    out = io.StringIO()
    assert asyncio.run(run_status(frontends.settings, once=True, console=Console(file=out, width=200))) == 0
    shown = out.getvalue()
    assert "Discord front-ends" in shown
    assert "frontend-0" in shown and "0, 1 of 4" in shown
    assert "frontend-1" in shown and "2, 3 of 4" in shown
    assert "2: " in shown and " ms" in shown


def test_a_killed_frontend_comes_back_with_the_same_shards_and_answers(frontends: Frontends) -> None:
    stand_in = frontends.stand_in
    identified = len(stand_in.state()["identifies"])
    handle = ray.get_actor("frontend-1", namespace=frontends.settings.namespace)
    ray.kill(handle, no_restart=False)

    def back() -> bool:
        again = stand_in.state()["identifies"][identified:]
        return sorted(again) == [[2, SHARDS], [3, SHARDS]] and connected_shards(stand_in) == set(
            range(SHARDS)
        )

    wait_for("frontend-1 to identify its shards again", back, timeout=180)
    found = statuses(frontends.settings)["frontend-1"]
    assert isinstance(found, FrontendStatus), found
    assert [s.shard_id for s in found.shards] == [2, 3]
    assert found.restarted
    user = stand_in.call("users", {"name": "grace"})["id"]
    answers = ask_every_shard(frontends, user, "after the restart")
    assert sorted(answers) == list(range(SHARDS))
    assert "after the restart guild 2" in answers[2] and "after the restart guild 3" in answers[3]


def test_ctrl_c_stops_the_frontends_and_their_gateway_sessions(frontends: Frontends) -> None:
    assert frontends.bot.stop(signal.SIGINT) == 0, frontends.bot.log()[-3000:]
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == frontends.settings.namespace
    ]
    assert not [n for n in names if n.startswith("frontend-")], names
    assert connected_shards(frontends.stand_in) == set()
