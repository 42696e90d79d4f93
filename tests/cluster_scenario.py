"""A real Ray cluster on this machine for `tests/test_cluster.py`: `ray start --head` and
`ray start --address` as separate node processes, each with its own resources, temp dir and
ports, token authentication on; the cluster's state read through the dashboard's HTTP API.

Each node runs `ray start --block` in a session of its own, so its raylet, agents and workers
share one process group: SIGKILL to that group is the node's death, and stopping the nodes
touches no other Ray on the machine (never `ray stop`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bot.runtime import project_root

__all__ = ["Cluster", "RayNode", "free_ports", "raycord"]

ROOT = project_root()
T = TypeVar("T")
#: seconds a node has to come up, and Ray to notice a node's death
NODE_TIMEOUT = 90.0


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free right now (other Rays on the machine hold their defaults)."""
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


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = NODE_TIMEOUT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def cluster_env(token: str) -> dict[str, str]:
    """The environment of the nodes and of the raycord commands run against them: this venv's
    `python` and `ray` first on PATH, token authentication on, no other Ray's address."""
    dropped = ("RAYCORD_", "RAY_", "DISCORD_", "GEMINI")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PYTHONPATH", None)
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            # Ray notices a dead node within seconds, not its default half-minute
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    return env


class RayNode:
    """One `ray start --block` node process (and its process group)."""

    def __init__(self, args: list[str], temp_dir: Path, env: dict[str, str], log: Path) -> None:
        agent, agent_grpc, runtime_env_agent, metrics = free_ports(4)
        self._log = log.open("ab")
        self.temp_dir = temp_dir
        self.proc = subprocess.Popen(
            [
                "ray",
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={temp_dir}",
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={runtime_env_agent}",
                f"--metrics-export-port={metrics}",
                "--disable-usage-stats",
                *args,
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL to every process of the node (its group), then reap `ray start`."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()


class Cluster:
    """A head and worker nodes on this machine, and the head's HTTP API."""

    def __init__(self, root: Path, workers: int = 1) -> None:
        self.root = root
        self.token = uuid.uuid4().hex
        self.env = cluster_env(self.token)
        self.gcs_port, self.dashboard_port, client_port = free_ports(3)
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.head = RayNode(
            [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={client_port}",
                "--num-cpus=1",
            ],
            root / "head",
            self.env,
            root / "head.log",
        )
        self.workers: list[RayNode] = []
        try:
            wait_for("the head's job API", lambda: self._answers("/api/version"))
            for i in range(workers):
                self.workers.append(
                    RayNode(
                        [f"--address={self.gcs_address}", "--num-cpus=1", '--resources={"worker_node": 1}'],
                        root / f"worker-{i}",
                        self.env,
                        root / f"worker-{i}.log",
                    )
                )
            wait_for(f"{workers + 1} nodes", lambda: len(self.alive_nodes()) == workers + 1)
        except BaseException:
            self.stop()
            raise

    def _answers(self, path: str) -> bool:
        try:
            self.get(path)
        except (OSError, ValueError):
            return False
        return True

    def get(self, path: str) -> Any:
        request = urllib.request.Request(
            self.dashboard_url + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def _state(self, kind: str, query: str = "") -> list[dict[str, Any]]:
        body = self.get(f"/api/v0/{kind}?limit=1000&detail=true{query}")
        rows: list[dict[str, Any]] = body["data"]["result"]["result"]
        return rows

    def alive_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self._state("nodes") if n["state"] == "ALIVE"]

    def alive_actors(self, namespace: str) -> list[dict[str, Any]]:
        actors = self._state("actors")
        return [a for a in actors if a["state"] == "ALIVE" and a.get("ray_namespace") == namespace]

    def worker_node_ids(self) -> set[str]:
        """The node ids of the workers (they hold the `worker_node` resource), dead or alive."""
        nodes = self._state("nodes")
        return {str(n["node_id"]) for n in nodes if "worker_node" in n.get("resources_total", {})}

    def stop(self) -> None:
        for node in [*self.workers, self.head]:
            if node.proc.poll() is None or node.proc.returncode is None:
                node.kill()


def raycord(args: list[str], env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """A `raycord` command (this checkout's), with `env`."""
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
