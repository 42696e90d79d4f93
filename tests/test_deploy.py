"""`raycord deploy` and the cluster refusals, without a cluster: what the job is given, what
is refused before any actor starts, and where each service may run.

The real cluster (`ray start` nodes, `raycord deploy`, a worker killed) is `tests/test_cluster.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bot.config import Settings
from bot.deploy import DEPLOY_EXCLUDES, ENTRYPOINT, DeployError, entrypoint, job_environment, runtime_env
from bot.runtime import (
    SERVICES,
    ConfigurationError,
    check_state,
    filesystem_type,
    placement,
    project_root,
)

ROOT = project_root()

MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw
30 22 0:25 / /mnt/state rw,relatime shared:9 - nfs4 server:/export rw,vers=4.2
31 30 0:26 / /mnt/state/local rw,relatime shared:10 - ext4 /dev/sdb1 rw
32 22 0:27 / /mnt/my\\040share rw,relatime shared:11 - cifs //server/share rw
"""


def settings(**kw: object) -> Settings:
    base: dict[str, object] = {"dashboard": False, "discord_token": None, "gemini_api_key": None}
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]  # pydantic-settings takes any field by name


def test_the_committed_runtime_env_leaves_out_what_deploy_leaves_out() -> None:
    committed = yaml.safe_load((ROOT / "deploy" / "runtime_env.yaml").read_text())
    assert committed["excludes"] == list(DEPLOY_EXCLUDES)
    assert committed["working_dir"] == "."
    assert {".raycord", ".venv", "__pycache__"} <= set(committed["excludes"])


def test_the_job_gets_the_settings_and_secrets_and_nothing_else(tmp_path: Path) -> None:
    environ = {
        "RAYCORD_CACHE__SHARDS": "3",
        "RAYCORD_RAY_ADDRESS": "http://head:8265",
        "DISCORD_TOKEN": "secret-token",
        "GEMINI_API_KEY": "secret-key",
        "HOME": "/home/me",
        "RAY_AUTH_TOKEN": "ray-secret",
    }
    env = job_environment(
        environ, settings(state_dir=tmp_path, namespace="prod"), {"RAYCORD_LLM__MODEL": "m", "X": None}
    )
    assert env == {
        "RAYCORD_CACHE__SHARDS": "3",
        "DISCORD_TOKEN": "secret-token",
        "GEMINI_API_KEY": "secret-key",
        "RAYCORD_STATE_DIR": str(tmp_path),
        "RAYCORD_NAMESPACE": "prod",
        "RAYCORD_LLM__MODEL": "m",
    }
    assert runtime_env(tmp_path, env)["excludes"] == list(DEPLOY_EXCLUDES)


def test_a_config_file_reaches_the_job_from_inside_the_working_directory_only(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    assert entrypoint(tmp_path) == ENTRYPOINT
    assert entrypoint(tmp_path, tmp_path / "conf" / "bot.yaml") == f"{ENTRYPOINT} --config conf/bot.yaml"
    with pytest.raises(DeployError, match="outside the working directory"):
        entrypoint(tmp_path / "conf", tmp_path / "bot.yaml")


def test_a_relative_state_dir_is_refused_in_cluster_mode_only() -> None:
    check_state(settings(state_dir=Path("rel"), ray_address=None), in_job=False)
    with pytest.raises(ConfigurationError, match=r"relative.*RAYCORD_STATE_DIR"):
        check_state(settings(state_dir=Path("rel"), ray_address="auto"), in_job=False)


def test_a_state_dir_inside_the_jobs_working_directory_is_refused(tmp_path: Path) -> None:
    inside = settings(state_dir=tmp_path / "work" / ".raycord", ray_address="auto")
    check_state(inside, in_job=False, cwd=tmp_path / "work")
    with pytest.raises(ConfigurationError, match=r"working directory.*RAYCORD_STATE_DIR"):
        check_state(inside, in_job=True, cwd=tmp_path / "work")
    ray_copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_1" / ".raycord"
    with pytest.raises(ConfigurationError, match="working directory"):
        check_state(settings(state_dir=ray_copy, ray_address="auto"), in_job=False)


def test_the_filesystem_type_is_read_from_the_nearest_mount() -> None:
    assert filesystem_type(Path("/mnt/state/bot"), MOUNTINFO) == "nfs4"
    assert filesystem_type(Path("/mnt/state/local/bot"), MOUNTINFO) == "ext4"
    assert filesystem_type(Path("/mnt/my share/bot"), MOUNTINFO) == "cifs"
    assert filesystem_type(Path("/srv"), MOUNTINFO) == "overlay"
    assert filesystem_type(Path("/srv"), "") is None


def test_sqlite_state_on_a_network_filesystem_is_refused_naming_the_alternatives(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"22 1 0:21 / / rw - ext4 /dev/sda1 rw\n30 22 0:25 / {tmp_path} rw - nfs4 s:/e rw\n")
    monkeypatch.setattr("bot.runtime.MOUNTINFO", mountinfo)
    with pytest.raises(
        ConfigurationError, match=r"network filesystem \(nfs4\).*node-local.*RAYCORD_STATE_URL"
    ):
        check_state(settings(state_dir=tmp_path / "state"), in_job=False)
    # with PostgreSQL state no SQLite file is there
    check_state(settings(state_dir=tmp_path / "state", state_url="postgresql://u@h:5432/db"), in_job=False)


def test_stateful_services_are_pinned_to_the_state_node_and_the_rest_spread() -> None:
    local = settings(ray_address="auto")
    pinned = {s.name for s in SERVICES if "resources" in placement(local, s)}
    assert pinned == {"context", "ratelimit", "analytics"}
    assert all(
        placement(local, s)["resources"] == {"node:__internal_head__": 0.001}
        for s in SERVICES
        if s.name in pinned
    )
    assert {
        s.name: placement(local, s).get("scheduling_strategy") for s in SERVICES if s.name not in pinned
    } == {
        "cache": "SPREAD",
        "llm": "SPREAD",
    }
    pg = settings(ray_address="auto", state_url="postgresql://u@h:5432/db", state_resource="raycord_state")
    assert {s.name for s in SERVICES if "resources" in placement(pg, s)} == {"analytics"}
    analytics = next(s for s in SERVICES if s.name == "analytics")
    assert placement(pg, analytics)["resources"] == {"raycord_state": 0.001}
    assert all(placement(settings(), s) == {} for s in SERVICES)


def _raycord(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYCORD_", "RAY_"))}
    env.pop("DISCORD_TOKEN", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_a_job_with_no_token_and_no_terminal_says_so_and_fails(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**clean_env, "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}", "RAYCORD_STATE_DIR": str(tmp_path / "s")}
    proc = _raycord(["run", "--address", "auto"], env, tmp_path)
    assert proc.returncode == 2
    assert "no Discord token and no terminal" in proc.stderr
    assert "DISCORD_TOKEN" in proc.stderr


def test_deploy_refuses_a_relative_state_dir_and_never_prints_a_secret(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**clean_env, "DISCORD_TOKEN": "do-not-print-me", "GEMINI_API_KEY": "nor-me"}
    relative = _raycord(["deploy", "--address", "http://127.0.0.1:9"], env, tmp_path)
    assert relative.returncode == 2
    assert "RAYCORD_STATE_DIR" in relative.stderr
    nobody = _raycord(
        ["deploy", "--address", "http://127.0.0.1:9", "--state-dir", str(tmp_path / "s")], env, tmp_path
    )
    assert nobody.returncode == 1
    assert "could not reach the Ray job API at http://127.0.0.1:9" in nobody.stderr
    for out in (relative.stdout + relative.stderr, nobody.stdout + nobody.stderr):
        assert "do-not-print-me" not in out and "nor-me" not in out


def test_the_readme_cluster_section_runs_what_the_cluster_test_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Running on a Ray cluster") : readme.index("## Monitoring")]
    test = (ROOT / "tests" / "test_cluster.py").read_text()
    for command, argv in (
        (
            "raycord deploy --address http://HEAD:8265 --state-dir /var/lib/raycord --frontends 2",
            '"--state-dir", str(state_dir), "--frontends", "2"]',
        ),
        (
            "raycord status --address HEAD:6379 --once",
            '["status", "--address", cluster.gcs_address, "--once"]',
        ),
        ("raycord deploy --address http://HEAD:8265 --stop", '"--address", cluster.dashboard_url, "--stop"]'),
    ):
        assert command in section
        assert argv in test
    assert "ray job submit --address http://HEAD:8265 --runtime-env deploy/runtime_env.yaml" in section
