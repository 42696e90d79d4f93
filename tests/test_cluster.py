"""The bot on a real Ray cluster: `ray start --head` and `ray start --address` as separate node
processes on this machine (token authentication on), the bot submitted by `raycord deploy`
against the Discord stand-in with the offline LLM, traffic sent, the worker node killed with
SIGKILL, then: no acknowledged rate-limit decision, conversation turn or analytics event lost,
`raycord status --address` showing the services, `raycord deploy --stop` leaving no actor.

The stateful services are pinned to the head (their files are on its disk); the worker holds
stateless replicas only, and its death costs a restart of those on the head. The scenario runs
once for the module; each test asserts one part of its outcome. It replaces the in-process
`ray.cluster_utils.Cluster` scenario, which never ran `ray start`, `ray job submit` or token
authentication, and relied on a shared state directory that SQLite's WAL cannot use.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from bot.deploy import ENTRYPOINT
from tests.cluster_scenario import ROOT, Cluster, raycord, wait_for
from tests.discord_harness import TOKEN, StandIn, connected_shards, reply_to

pytestmark = pytest.mark.cluster

#: the per-user message budget (minute, hour and day alike: a denial outlasts the scenario)
BUDGET = 3
NAMESPACE = "raycord"
STATEFUL = {"context-0", "ratelimit-0", "analytics-0"}
#: the bot's gateway shards, shared by as many front-end actors (one shard each)
SHARDS = 2
FRONTENDS = {"frontend-0": [0], "frontend-1": [1]}
DENIED = "faster than I can take them"
ANSWERED = "offline mode"


def bot_reply(stand_in: StandIn, channel: str, message_id: str, marker: str) -> str:
    """The bot's reply to `message_id` once its text holds `marker`."""

    seen: list[str] = []

    def done() -> str | None:
        for m in stand_in.bot_messages(channel):
            if (m.get("message_reference") or {}).get("message_id") == message_id:
                seen[:] = [str(m["content"])]
                if marker in m["content"]:
                    return str(m["content"])
        return None

    try:
        return wait_for(f"the reply to {message_id} ({marker!r})", done, timeout=90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the bot replied {seen}") from None


def ask(stand_in: StandIn, channel: str, user: str, text: str, marker: str = ANSWERED) -> str:
    asked = reply_to(stand_in, channel, user, text, mention_bot=True)
    return bot_reply(stand_in, channel, str(asked["id"]), marker)


def deploy_env(cluster: Cluster, stand_in: StandIn) -> dict[str, str]:
    limits = {f"RAYCORD_RATELIMIT__MESSAGE__{w}": str(BUDGET) for w in ("MINUTE", "HOUR", "DAY")}
    return {
        **cluster.env,
        **limits,
        "DISCORD_TOKEN": TOKEN,
        "RAYCORD_DISCORD__API_BASE_URL": stand_in.url,
        "RAYCORD_DISCORD__SHARD_COUNT": str(SHARDS),
        "RAYCORD_LLM__BACKEND": "offline",
        "RAYCORD_DASHBOARD": "false",
        "RAYCORD_CACHE__SHARDS": "2",
        "RAYCORD_LLM__REPLICAS": "2",
        "RAYCORD_ANALYTICS__FLUSH_SECONDS": "0.2",
    }


def live_identifies(stand_in: StandIn) -> list[list[int]]:
    """Every IDENTIFY the stand-in received, in order: [shard id, shard count]."""
    identifies: list[list[int]] = stand_in.state()["identifies"]
    return identifies


def stored_turns(state_dir: Path) -> list[str]:
    texts: list[str] = []
    for path in sorted(state_dir.glob("*.sqlite*")):
        if path.suffix in (".sqlite", ".sqlite3", ".db") or path.name.endswith(".sqlite"):
            with sqlite3.connect(path) as db:
                if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'turns'").fetchone():
                    texts += [row[0] for row in db.execute("SELECT text FROM turns")]
    return texts


@pytest.fixture(scope="module")
def outcome() -> Iterator[dict[str, Any]]:
    # short paths: Ray's unix sockets live under the temp dir
    root = Path(tempfile.mkdtemp(prefix="rcl-", dir="/tmp"))
    state_dir = root / "state"
    # one guild per shard (guild i is on shard i)
    stand_in = StandIn(guilds=SHARDS)
    cluster: Cluster | None = None
    out: dict[str, Any] = {"phases": {}}
    started = time.monotonic()

    def mark(phase: str) -> None:
        # where the scenario's time goes, shown with its output (never asserted)
        out["phases"][phase] = round(time.monotonic() - started, 1)

    try:
        cluster = live = Cluster(root)
        env = deploy_env(cluster, stand_in)
        mark("cluster up")
        out["worker_ids"] = sorted(cluster.worker_node_ids())
        wrong = {**env, "RAY_AUTH_TOKEN": "0" * 32}
        refused = raycord(
            ["deploy", "--address", cluster.dashboard_url, "--state-dir", str(state_dir)], wrong
        )
        out["wrong_token"] = {"rc": refused.returncode, "stderr": refused.stderr[-2000:]}
        deployed = raycord(
            ["deploy", "--address", cluster.dashboard_url, "--state-dir", str(state_dir), "--frontends", "2"],
            env,
        )
        out["deploy"] = {"rc": deployed.returncode, "stdout": deployed.stdout, "stderr": deployed.stderr}
        assert deployed.returncode == 0, deployed.stderr
        out["job_id"] = deployed.stdout.split("submitted job ", 1)[1].split()[0]
        wait_for(
            "the deployed front-ends to connect every shard",
            lambda: connected_shards(stand_in) == set(range(SHARDS)),
            timeout=120,
        )
        mark("bot connected")
        guild = stand_in.state()["guilds"][0]["id"]
        channel = str(stand_in.call("channels", {"guild_id": guild, "name": "cluster"})["id"])
        heavy, talker = (str(stand_in.call("users", {"name": n})["id"]) for n in ("heavy", "talker"))

        out["heavy_before"] = [ask(stand_in, channel, heavy, f"heavy {i}") for i in range(BUDGET)]
        out["heavy_denied_before"] = ask(stand_in, channel, heavy, "one too many", DENIED)
        said = [f"talker before {i}" for i in range(BUDGET - 1)]
        out["talker_before"] = [ask(stand_in, channel, talker, text) for text in said]
        out["actors_before"] = {a["name"]: a["node_id"] for a in cluster.alive_actors(NAMESPACE)}

        mark("traffic before")
        identified = len(stand_in.state()["identifies"])
        worker = cluster.workers[0]
        worker.kill()
        wait_for("the worker's death", lambda: len(live.alive_nodes()) == 1)
        services = set(out["actors_before"])
        wait_for(
            "every service back",
            lambda: {a["name"] for a in live.alive_actors(NAMESPACE)} >= services,
            timeout=90,
        )
        mark("services back")
        # the worker's front-end identifies its shards again from the head
        wait_for(
            "every shard connected again",
            lambda: (
                len(live_identifies(stand_in)) > identified
                and connected_shards(stand_in) == set(range(SHARDS))
            ),
            timeout=90,
        )
        out["identified_after_kill"] = live_identifies(stand_in)[identified:]
        mark("shards back")
        out["actors_after"] = {a["name"]: a["node_id"] for a in cluster.alive_actors(NAMESPACE)}
        roamer = str(stand_in.call("users", {"name": "roamer"})["id"])
        out["each_shard_after"] = {
            str(shard): ask(stand_in, str(g["channels"][0]["id"]), roamer, f"roaming on shard {shard}")
            for g in stand_in.state()["guilds"]
            for shard in [(int(g["id"]) >> 22) % SHARDS]
        }
        out["heavy_after"] = ask(stand_in, channel, heavy, "still over budget?", DENIED)
        # the talker's last message of its budget, and a newcomer's first ones
        out["talker_after"] = [ask(stand_in, channel, talker, "talker after the node")]
        newcomer = str(stand_in.call("users", {"name": "newcomer"})["id"])
        more = [f"newcomer {i}" for i in range(2)]
        out["newcomer"] = [ask(stand_in, channel, newcomer, text) for text in more]
        said += ["talker after the node", *more]
        mark("traffic after")

        # wide enough that rich puts each front-end on one line
        status_env = {**env, "RAYCORD_CACHE__SHARDS": "2", "COLUMNS": "220"}
        status = raycord(["status", "--address", cluster.gcs_address, "--once"], status_env)
        out["status"] = {"rc": status.returncode, "stdout": status.stdout, "stderr": status.stderr[-2000:]}

        mark("status")
        stopped = raycord(["deploy", "--address", cluster.dashboard_url, "--stop"], env)
        out["stop"] = {"rc": stopped.returncode, "stdout": stopped.stdout, "stderr": stopped.stderr[-3000:]}
        out["actors_after_stop"] = [a["name"] for a in cluster.alive_actors(NAMESPACE)]
        mark("stopped")
        # the README's `ray job submit` with the committed runtime env; no Discord token in it
        submitted = subprocess.run(
            [
                "ray", "job", "submit", "--address", cluster.dashboard_url,
                "--runtime-env", "deploy/runtime_env.yaml", "--", *ENTRYPOINT.split(),
            ],
            cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        out["ray_job_submit"] = {
            "rc": submitted.returncode,
            "output": (submitted.stdout + submitted.stderr)[-3000:],
        }
        mark("ray job submit")

        out["said"] = said
        out["turns"] = stored_turns(state_dir)
        with duckdb.connect(str(state_dir / "analytics.duckdb"), read_only=True) as db:
            names = {heavy: "heavy", talker: "talker", newcomer: "newcomer"}
            rows = db.execute(
                "SELECT user_id, type, count(*), count(DISTINCT event_id) FROM events "
                "WHERE user_id IN (?, ?, ?) GROUP BY ALL",
                list(names),
            ).fetchall()
        out["events"] = {f"{names[u]}:{t}": [n, d] for u, t, n, d in rows}
        print(json.dumps(out, indent=1))  # shown with -s, and with the report of a failure
        yield out
    except BaseException:
        if cluster is not None and "job_id" in out:
            job = subprocess.run(
                ["ray", "job", "logs", "--address", cluster.dashboard_url, out["job_id"]],
                env=cluster.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            print("job log:", job.stdout[-6000:], job.stderr[-1000:])
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        stand_in.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_deploy_prints_the_job_and_how_to_follow_query_and_stop_it(outcome: dict[str, Any]) -> None:
    printed = outcome["deploy"]["stdout"]
    assert "submitted job raycord-" in printed
    for how in ("ray job logs", "ray job status", "raycord deploy --address"):
        assert how in printed
    assert TOKEN not in printed + outcome["deploy"]["stderr"]


def test_a_wrong_token_is_refused_saying_how_to_pass_the_right_one(outcome: dict[str, Any]) -> None:
    refused = outcome["wrong_token"]
    assert refused["rc"] == 1, refused
    assert "refused" in refused["stderr"] and "RAY_AUTH_TOKEN" in refused["stderr"], refused
    assert TOKEN not in refused["stderr"]


def test_a_job_with_no_token_and_no_terminal_fails_saying_so(outcome: dict[str, Any]) -> None:
    submitted = outcome["ray_job_submit"]
    assert "no Discord token and no terminal" in submitted["output"], submitted
    assert submitted["rc"] != 0 and "failed" in submitted["output"].lower(), submitted


def test_state_is_pinned_to_the_head_and_stateless_replicas_spread(outcome: dict[str, Any]) -> None:
    before = outcome["actors_before"]
    workers = set(outcome["worker_ids"])
    assert STATEFUL <= set(before)
    assert not {before[name] for name in STATEFUL} & workers
    # the worker ran something, so its death was felt
    assert {n for name, n in before.items() if name not in STATEFUL} & workers
    # each stateless service's two replicas are on different nodes
    for service in ("cache", "llm"):
        assert before[f"{service}-0"] != before[f"{service}-1"], before


def test_the_frontends_spread_over_the_nodes_and_the_workers_comes_back_with_its_shards(
    outcome: dict[str, Any],
) -> None:
    before, after = outcome["actors_before"], outcome["actors_after"]
    workers = set(outcome["worker_ids"])
    on_worker = [name for name in FRONTENDS if before[name] in workers]
    assert len(on_worker) == 1, before
    # the worker's front-end, and only it, identified its shards again (from the head)
    assert outcome["identified_after_kill"] == [[shard, SHARDS] for shard in FRONTENDS[on_worker[0]]]
    assert set(FRONTENDS) <= set(after) and not {after[name] for name in FRONTENDS} & workers
    for shard, answer in outcome["each_shard_after"].items():
        assert f"roaming on shard {shard}" in answer


def test_the_workers_replicas_come_back_on_the_head(outcome: dict[str, Any]) -> None:
    after = outcome["actors_after"]
    assert set(after) >= set(outcome["actors_before"])
    assert not set(after.values()) & set(outcome["worker_ids"])
    assert all(outcome["actors_before"][name] == after[name] for name in STATEFUL)


def test_no_acknowledged_rate_limit_decision_is_lost(outcome: dict[str, Any]) -> None:
    assert len(outcome["heavy_before"]) == BUDGET
    assert DENIED in outcome["heavy_denied_before"]
    assert DENIED in outcome["heavy_after"]
    assert len(outcome["talker_after"]) == 1
    assert len(outcome["newcomer"]) == 2


def test_no_conversation_turn_is_lost(outcome: dict[str, Any]) -> None:
    turns = outcome["turns"]
    for text in outcome["said"]:
        assert any(text in t for t in turns), (text, turns)


def test_no_analytics_event_is_lost_nor_doubled(outcome: dict[str, Any]) -> None:
    events = outcome["events"]
    assert all(n == distinct for n, distinct in events.values()), events
    assert events["heavy:message"][0] == BUDGET
    assert events["heavy:rate_limited"][0] == 2
    assert events["talker:message"][0] == BUDGET
    assert events["newcomer:message"][0] == 2


def test_status_on_the_cluster_shows_the_services(outcome: dict[str, Any]) -> None:
    status = outcome["status"]
    assert status["rc"] == 0, status
    for name in ("cache-0", "cache-1", "context-0", "ratelimit-0", "analytics-0"):
        assert name in status["stdout"]
    rows = {line.split()[1]: line for line in status["stdout"].splitlines() if "frontend-" in line}
    assert set(rows) >= set(FRONTENDS), status["stdout"]
    for name, shards in FRONTENDS.items():
        # its shards, all connected, each with a gateway latency
        assert f"{shards[0]} of {SHARDS}" in rows[name] and "1/1" in rows[name] and " ms" in rows[name], rows
    assert "has shard" not in status["stdout"] and "frontend-0 is down" not in status["stdout"]


def test_deploy_stop_drains_and_leaves_no_actor(outcome: dict[str, Any]) -> None:
    stop = outcome["stop"]
    assert stop["rc"] == 0, stop
    assert "stopped job(s): raycord-" in stop["stdout"]
    assert outcome["actors_after_stop"] == []
