"""A node failure on a three-node Ray cluster on one machine, run as its own process.

`tests/test_cluster.py` starts this with `sys.executable` (the suite's Ray lives in the
pytest process) and asserts on the JSON it prints: where the services ran, what
survived the loss of the node holding a rate-limit shard, and which `raycord_*`
metrics a node's `/metrics` endpoint served. Run by hand: `python -m tests.cluster_scenario`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Workers import raycord from the environment their raylet inherits; set it before any
# node starts, and keep this cluster's files (and its "current cluster" address file,
# which a bare `ray.init()` would otherwise connect to) out of the default /tmp/ray.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.pop("RAY_ADDRESS", None)
if "RAY_TMPDIR" not in os.environ:
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rc-", dir="/tmp")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from actors.errors import RateLimited, ServiceUnavailable  # noqa: E402
from actors.sharding import shard_index  # noqa: E402
from bot.config import Settings  # noqa: E402
from bot.runtime import Runtime  # noqa: E402

#: the per-user message budget of the scenario (minute, hour and day alike, so a
#: denial outlasts the node failure however long the restart takes)
BUDGET = 3
RATELIMIT_SHARDS = 2
#: bounds on the polls of cross-process state, in seconds
RESTART_TIMEOUT = 90.0
METRICS_TIMEOUT = 45.0
#: how long the traffic waits for one message: longer than a client keeps retrying a
#: replica that is down (`ShardedClient.retry_seconds`) plus the time Ray takes to notice
#: the dead node, so the test sees the client's own outcome (an answer, or the retryable
#: `ServiceUnavailable`), never this harness giving up first
MESSAGE_TIMEOUT = 90.0
#: restarts allowed to move a rate-limit shard off the head node
MAX_MOVES = 8


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free right now (the session Ray of the test suite holds others)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def scenario_settings(address: str, state_dir: Path) -> Settings:
    limits = {"minute": BUDGET, "hour": BUDGET, "day": BUDGET}
    return Settings(
        state_dir=state_dir,
        ray_address=address,
        namespace="raycord",
        dashboard=False,
        discord_token=None,
        gemini_api_key=None,
        cache={"shards": 2},
        context={"shards": 2},
        ratelimit={"shards": RATELIMIT_SHARDS, "message": limits},
        analytics={"flush_seconds": 0.2, "client_batch_seconds": 0.05},
    )


def users_on_shard(shard: int, count: int, prefix: str) -> list[str]:
    """User ids the limiter routes to `shard`."""
    found = []
    i = 0
    while len(found) < count:
        name = f"{prefix}-{i}"
        if shard_index(name, RATELIMIT_SHARDS) == shard:
            found.append(name)
        i += 1
    return found


def message(user: str, text: str = "hello") -> dict[str, Any]:
    return {"user_id": user, "channel_id": "c-1", "scope": "channel:c-1", "text": text}


async def placement(rt: Runtime) -> dict[str, dict[str, Any]]:
    """Actor name -> its `health()` (node id and pid), asked of every replica."""
    names = [f"{svc}-{i}" for svc, hs in rt.handles.items() for i in range(len(hs))]
    answers = await asyncio.gather(*(h.health.remote() for hs in rt.handles.values() for h in hs))
    return {name: a.model_dump() for name, a in zip(names, answers, strict=True)}


async def health_of(handle: Any, not_pid: int | None = None) -> dict[str, Any]:
    """The replica's health once it answers, from a process other than `not_pid` (a call
    in flight when it died fails, and a dying process may still answer: ask again)."""
    deadline = time.monotonic() + RESTART_TIMEOUT
    while True:
        try:
            health = (await handle.health.remote()).model_dump()
            if health["pid"] != not_pid:
                return health
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new replica answered within {RESTART_TIMEOUT}s")
        await asyncio.sleep(0.2)


def scrape(port: int) -> set[str]:
    """Names of the `raycord` metrics a node's Prometheus endpoint serves."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return set()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_raycord_")}


class Traffic:
    """Messages from fresh users, one after another, until stopped: the load that must
    keep flowing while a node dies. Counts each outcome."""

    def __init__(self, rt: Runtime) -> None:
        assert rt.pipeline is not None
        self.pipeline = rt.pipeline
        self.outcomes: Counter[str] = Counter()
        #: when each failed request was sent (time.monotonic), and what it failed with
        self.failed: list[tuple[float, str]] = []
        self.stop = asyncio.Event()

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    async def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            sent_at = time.monotonic()
            try:
                await asyncio.wait_for(
                    self.pipeline.handle(message(f"flow-{n}", f"question {n}")), MESSAGE_TIMEOUT
                )
                self.outcomes["ok"] += 1
            except ServiceUnavailable as exc:
                self.outcomes["service_unavailable"] += 1
                self.failed.append((sent_at, str(exc)))
            except Exception as exc:
                self.outcomes[type(exc).__name__] += 1
                self.failed.append((sent_at, repr(exc)))

    async def ok_count_reaches(self, target: int) -> None:
        deadline = time.monotonic() + RESTART_TIMEOUT
        while self.outcomes["ok"] < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"traffic stalled at {self.outcomes}")
            await asyncio.sleep(0.1)


async def outcome(rt: Runtime, user: str) -> str:
    assert rt.pipeline is not None
    try:
        await rt.pipeline.handle(message(user))
    except RateLimited:
        return "denied"
    return "allowed"


def attach_second_front_end(address: str, state_dir: Path, user: str) -> dict[str, Any]:
    """A second front-end process: attaches to the same named actors and spends `user`'s
    whole budget through them."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.cluster_scenario", "--attach", address, str(state_dir), user],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the second front-end failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


async def attach_main(address: str, state_dir: Path, user: str) -> None:
    rt = Runtime(scenario_settings(address, state_dir))
    await rt.start()
    try:
        verdicts = [await outcome(rt, user) for _ in range(BUDGET)]
        pids = {name: h["pid"] for name, h in (await placement(rt)).items()}
    finally:
        # actors on a cluster outlive a front-end: this one leaves them running
        await rt.shutdown()
    print(json.dumps({"verdicts": verdicts, "pids": pids}))


async def rate_limit_shard_on_a_worker(rt: Runtime, head_id: str) -> int:
    """Make sure a rate-limit shard runs on a worker node (the head, holding the GCS, is
    never the node that dies). SPREAD placement is not deterministic: while every shard
    landed on the head, kill one there; Ray restarts it, spreading it elsewhere. Returns
    how many kills that took."""
    shard = rt.handles["ratelimit"][0]
    for moves in range(MAX_MOVES + 1):
        nodes = [h["node_id"] for h in await asyncio.gather(*(health_of(x) for x in rt.handles["ratelimit"]))]
        if any(node != head_id for node in nodes):
            return moves
        pid = (await health_of(shard))["pid"]
        ray.kill(shard, no_restart=False)
        await health_of(shard, not_pid=pid)
    raise RuntimeError(f"every rate-limit shard stayed on the head after {MAX_MOVES} restarts")


async def scenario(cluster: Cluster, metrics_ports: dict[str, int], state_dir: Path) -> dict[str, Any]:
    settings = scenario_settings(cluster.address, state_dir)
    rt = Runtime(settings)
    await rt.start()
    result: dict[str, Any] = {"metrics_ports": metrics_ports}
    try:
        assert rt.pipeline is not None
        head_id = cluster.head_node.node_id
        result["placement_first"] = {name: h["node_id"] for name, h in (await placement(rt)).items()}
        result["moves_to_a_worker"] = await rate_limit_shard_on_a_worker(rt, head_id)
        before = await placement(rt)
        result["placement_before"] = {name: h["node_id"] for name, h in before.items()}
        result["nodes"] = {"head": head_id, "workers": [n.node_id for n in cluster.worker_nodes]}

        # the node to lose: a worker holding a rate-limit shard, the analytics sink too if it can
        candidates = [(name, h["node_id"]) for name, h in before.items() if name.startswith("ratelimit-")]
        on_workers = [(name, node) for name, node in candidates if node != head_id]
        analytics_node = before["analytics-0"]["node_id"]
        victim_name, victim_node = next(
            ((n, node) for n, node in on_workers if node == analytics_node), on_workers[0]
        )
        victim_shard = int(victim_name.split("-")[1])
        victim = next(n for n in cluster.worker_nodes if n.node_id == victim_node)
        result["victim"] = {
            "node_id": victim_node,
            "services": sorted(n for n, h in before.items() if h["node_id"] == victim_node),
        }

        # a second front-end process attaches to the same actors and shares their state
        second_user, heavy, partial = users_on_shard(victim_shard, 3, f"u{uuid.uuid4().hex[:6]}")
        result["second_front_end"] = attach_second_front_end(cluster.address, state_dir, second_user)
        result["first_front_end_pids"] = {name: h["pid"] for name, h in before.items()}

        # decisions made before the failure: `heavy` spends the whole budget, `partial` one
        result["heavy_before"] = [await outcome(rt, heavy) for _ in range(BUDGET + 1)]
        result["partial_before"] = [await outcome(rt, partial)]
        result["second_user_after_attach"] = await outcome(rt, second_user)
        await rt.pipeline.analytics.flush()
        acked_before = rt.pipeline.analytics.stats_local().committed
        result["events_acknowledged_before_failure"] = acked_before

        traffic = Traffic(rt)
        flowing = asyncio.get_running_loop().create_task(traffic.run())
        await traffic.ok_count_reaches(5)
        # a machine's death takes every process on it at once: the actors with the raylet
        for name in result["victim"]["services"]:
            os.kill(before[name]["pid"], signal.SIGKILL)
        cluster.remove_node(victim, allow_graceful=False)
        removed_at = time.monotonic()
        result["sent_before_removal"] = traffic.sent

        shard_handle = rt.handles["ratelimit"][victim_shard]
        after = await health_of(shard_handle, not_pid=before[victim_name]["pid"])
        restarted_at = time.monotonic()
        result["restart_seconds"] = round(restarted_at - removed_at, 2)
        result["restarted_shard"] = {
            "name": victim_name,
            "node_before": victim_node,
            "node_after": after["node_id"],
            "pid_before": before[victim_name]["pid"],
            "pid_after": after["pid"],
        }
        # every replica that lived on the lost node answers again (from elsewhere)
        for name in result["victim"]["services"]:
            service, shard = name.rsplit("-", 1)
            await health_of(rt.handles[service][int(shard)], not_pid=before[name]["pid"])
        recovered_at = time.monotonic()
        await traffic.ok_count_reaches(traffic.outcomes["ok"] + 5)

        # the analytics sink dies too (its node survived, so its process is killed): it
        # restarts, and the front-end resends what it had not acknowledged
        sink = rt.handles["analytics"][0]
        sink_before = await health_of(sink)
        ray.kill(sink, no_restart=False)
        sink_after = await health_of(sink, not_pid=sink_before["pid"])
        result["analytics_restart"] = {"pid_before": sink_before["pid"], "pid_after": sink_after["pid"]}

        # traffic keeps flowing after the restarts
        await traffic.ok_count_reaches(traffic.outcomes["ok"] + 10)
        traffic.stop.set()
        await flowing
        result["traffic"] = dict(traffic.outcomes)
        # a message sent before every replica answered again may still fail after that
        # moment; one sent after it must not
        result["failures_after_recovery"] = [why for t, why in traffic.failed if t > recovered_at]

        # rate-limit decisions survived: heavy is still out of budget, partial has what was left
        result["heavy_after"] = await outcome(rt, heavy)
        result["partial_after"] = [await outcome(rt, partial) for _ in range(BUDGET)]

        # every message recorded exactly one event; all of them are in DuckDB
        handled = traffic.sent + (BUDGET + 1) + 1 + 1 + 1 + BUDGET
        await rt.flush()
        rows = await rt.pipeline.analytics.query("SELECT count(*), count(DISTINCT event_id) FROM events")
        client = rt.pipeline.analytics.stats_local()
        result["analytics"] = {
            "handled_here": handled,
            "client_recorded": client.recorded,
            "client_committed": client.committed,
            "client_spilled": client.spilled,
            "rows_in_duckdb": rows.rows[0][0],
            "distinct_ids_in_duckdb": rows.rows[0][1],
        }

        # a custom metric at a surviving node's /metrics endpoint
        alive = {label: port for label, port in metrics_ports.items() if label != victim_node}
        seen: dict[str, list[str]] = {}
        deadline = time.monotonic() + METRICS_TIMEOUT
        while time.monotonic() < deadline:
            seen = {name: sorted(scrape(port)) for name, port in alive.items()}
            if any(seen.values()):
                break
            await asyncio.sleep(1.0)
        result["metrics_seen"] = seen
    finally:
        await rt.shutdown(kill_actors=True)
    return result


def start_cluster() -> tuple[Cluster, dict[str, int]]:
    """A head and two worker nodes, each with its own agent and metrics ports; returns
    the cluster and each node's metrics export port by node id."""
    gcs, *ports = free_ports(7)
    agent_ports, metric_ports = ports[:3], ports[3:]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "gcs_server_port": gcs,
            "num_cpus": 1,
            "include_dashboard": False,
            "dashboard_agent_listen_port": agent_ports[0],
            "metrics_export_port": metric_ports[0],
            "_system_config": {
                # export metrics every second, not every ten
                "metrics_report_interval_ms": 1000,
                # notice a dead node in a few seconds, as Ray's own failure tests do
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 4,
            },
        },
    )
    ports_by_node = {cluster.head_node.node_id: metric_ports[0]}
    for i in (1, 2):
        node = cluster.add_node(
            num_cpus=1, dashboard_agent_listen_port=agent_ports[i], metrics_export_port=metric_ports[i]
        )
        ports_by_node[node.node_id] = metric_ports[i]
    cluster.wait_for_nodes()
    return cluster, ports_by_node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", type=Path, help="the shared state directory (default: a temp dir)")
    parser.add_argument("--attach", nargs=3, metavar=("ADDRESS", "STATE_DIR", "USER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attach:
        address, state_dir, user = args.attach
        asyncio.run(attach_main(address, Path(state_dir), user))
        return 0
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="raycord-cluster-"))
    cluster, metric_ports = start_cluster()
    try:
        result = asyncio.run(scenario(cluster, metric_ports, state_dir))
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        cluster.shutdown()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
