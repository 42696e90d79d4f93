"""Cluster mode on a three-node Ray cluster on one machine: services spread over the
nodes, a second front-end attaches, and losing the node of a rate-limit shard loses
no acknowledged decision or analytics event while traffic keeps flowing.

The cluster runs in its own process (`tests/cluster_scenario.py`): the suite's session
Ray lives in this one, and a process joins one Ray at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_scenario import BUDGET

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.cluster_scenario",
            "--state-dir",
            str(tmp_path_factory.mktemp("cluster-state")),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))  # shown with -s, and with the report of a failure
    return result


def test_services_spread_over_the_nodes(outcome: dict[str, Any]) -> None:
    nodes = set(outcome["placement_before"].values())
    assert len(nodes) >= 2
    assert nodes <= {outcome["nodes"]["head"], *outcome["nodes"]["workers"]}


def test_a_second_front_end_attaches_to_the_same_actors(outcome: dict[str, Any]) -> None:
    second = outcome["second_front_end"]
    assert second["pids"] == outcome["first_front_end_pids"]
    assert second["verdicts"] == ["allowed"] * BUDGET
    # the budget the second front-end spent is spent for the first too: same shard, same counts
    assert outcome["second_user_after_attach"] == "denied"


def test_the_lost_shard_restarts_on_another_node(outcome: dict[str, Any]) -> None:
    shard = outcome["restarted_shard"]
    assert shard["name"] in outcome["victim"]["services"]
    assert shard["node_after"] != shard["node_before"]
    assert shard["node_after"] != outcome["victim"]["node_id"]
    assert shard["pid_after"] != shard["pid_before"]


def test_rate_limit_decisions_survive_the_node(outcome: dict[str, Any]) -> None:
    assert outcome["heavy_before"] == ["allowed"] * BUDGET + ["denied"]
    assert outcome["heavy_after"] == "denied"
    # one of the budget was spent before the failure: exactly the rest is left after it
    assert outcome["partial_before"] == ["allowed"]
    assert outcome["partial_after"] == ["allowed"] * (BUDGET - 1) + ["denied"]


def test_traffic_keeps_flowing_with_only_retryable_errors(outcome: dict[str, Any]) -> None:
    traffic = outcome["traffic"]
    assert set(traffic) <= {"ok", "service_unavailable"}
    assert traffic["ok"] >= outcome["sent_before_removal"] + 15
    # reads wait for the restart; a rate-limit check (not idempotent) sent to the shard
    # while Ray has not yet noticed the node's death fails, retryably, and nothing after
    assert outcome["failures_after_recovery"] == []


def test_the_analytics_sink_restarts_after_its_process_dies(outcome: dict[str, Any]) -> None:
    restart = outcome["analytics_restart"]
    assert restart["pid_after"] != restart["pid_before"]


def test_every_acknowledged_event_is_in_duckdb(outcome: dict[str, Any]) -> None:
    a = outcome["analytics"]
    assert a["client_committed"] == a["client_recorded"], a
    assert a["rows_in_duckdb"] == a["distinct_ids_in_duckdb"], a
    # this front-end's events and the second front-end's messages (recorded through its
    # own client), each stored once
    assert a["rows_in_duckdb"] == a["handled_here"] + BUDGET, (a, outcome["traffic"])
    assert a["rows_in_duckdb"] >= outcome["events_acknowledged_before_failure"], a


def test_a_custom_metric_reaches_a_node_metrics_endpoint(outcome: dict[str, Any]) -> None:
    seen = {name for names in outcome["metrics_seen"].values() for name in names}
    assert any(name.startswith("ray_raycord_") for name in seen), outcome["metrics_seen"]
