"""`ray_config.yaml` is a cluster-launcher config `ray up` accepts, and says what the
README promises: an on-premises cluster, raycord installed, metrics exported."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parent.parent / "ray_config.yaml"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def _flags(commands: list[str]) -> dict[str, str]:
    """`--flag=value` pairs of the `ray start` command among `commands`."""
    start = next(c for c in commands if "ray start" in c)
    words = shlex.split(start.split(";")[-1])
    return dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)


def test_ray_up_accepts_it(config: dict[str, Any]) -> None:
    """What `ray up` does with the file: fill defaults for the provider, then validate
    against Ray's autoscaler JSON schema."""
    prepared = prepare_config(config)
    validate_config(prepared)
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == 2


def test_every_top_level_key_is_in_the_schema(config: dict[str, Any]) -> None:
    """Keys the local provider moves before validating aside, nothing is unknown to Ray."""
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    raw = {k: v for k, v in config.items() if k != "min_workers"}
    jsonschema.validate(raw, schema)
    assert set(schema["required"]) <= set(config)


def test_on_premises_provider_with_placeholders(config: dict[str, Any]) -> None:
    provider = config["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] == "HEAD_NODE_IP"
    assert provider["worker_ips"] and all(ip.startswith("WORKER_NODE_IP") for ip in provider["worker_ips"])
    assert isinstance(config["auth"]["ssh_user"], str)


def test_setup_installs_raycord(config: dict[str, Any]) -> None:
    assert any("pip install" in c and "raycord" in c for c in config["setup_commands"])


def test_start_commands_export_metrics_and_open_the_dashboard(config: dict[str, Any]) -> None:
    head = _flags(config["head_start_ray_commands"])
    worker = _flags(config["worker_start_ray_commands"])
    assert head["metrics-export-port"] == worker["metrics-export-port"] == "8080"
    assert head["dashboard-host"] == "0.0.0.0"
    assert head["autoscaling-config"] == "~/ray_bootstrap_config.yaml"
    assert worker["address"] == "$RAY_HEAD_IP:6379"
    assert config["head_start_ray_commands"][0] == config["worker_start_ray_commands"][0] == "ray stop"


def test_cloud_provider_is_documented() -> None:
    text = CONFIG.read_text()
    assert "provider: {type: aws" in text
    assert "RAYCORD_STATE_DIR" in text
