"""`raycord deploy`: the bot as a Ray job on a cluster, submitted through the head's job API.

What the job gets: the project directory without state, virtualenvs or caches (the
runtime_env's `excludes`, the same list as `deploy/runtime_env.yaml`), and as its environment
the `RAYCORD_*` settings and the secrets of this shell, never printed. `--stop` stops the job
and then drains the services by a second, short job inside the cluster (`python -m bot.deploy
teardown`), since Ray gives a stopped job's entrypoint only seconds before SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import Settings

__all__ = [
    "DEPLOY_EXCLUDES",
    "ENTRYPOINT",
    "SECRET_VARIABLES",
    "DeployError",
    "Deployment",
    "entrypoint",
    "in_ray_job",
    "job_environment",
    "runtime_env",
    "stop",
    "submit",
    "teardown",
]

log = logging.getLogger(__name__)

#: what the job's copy of the working directory leaves out: state, virtualenvs, caches
DEPLOY_EXCLUDES: tuple[str, ...] = (
    ".raycord",
    ".venv",
    "venv",
    ".git",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "*.egg-info",
    "build",
    "dist",
    "bench/results",
)
#: the job's entrypoint: the uploaded code (the working directory is the job's cwd), not
#: whatever raycord the cluster's Python has installed
ENTRYPOINT = "python -m bot.cli run --address auto"
TEARDOWN_ENTRYPOINT = "python -m bot.deploy teardown"
#: secrets passed to the job's environment under their own names
SECRET_VARIABLES: tuple[str, ...] = ("DISCORD_TOKEN", "GEMINI_API_KEY", "GOOGLE_API_KEY")
#: the job metadata key that marks a raycord job, holding its namespace
METADATA_KEY = "raycord"
#: the job metadata value of the drain job
TEARDOWN_KIND = "teardown"
#: seconds `--stop` waits for the bot job to stop, and for the drain job to finish
STOP_TIMEOUT = 60.0
_AUTH_MODE = "RAY_AUTH_MODE"


class DeployError(Exception):
    """The deployment cannot go ahead (no cluster at the address, a refused token); the
    message says what to do."""


@dataclass(frozen=True, slots=True)
class Deployment:
    job_id: str
    address: str


def job_environment(
    environ: Mapping[str, str], settings: Settings, flags: Mapping[str, str | None] | None = None
) -> dict[str, str]:
    """The job's environment: every `RAYCORD_*` variable and the secrets from `environ`, the
    state directory and namespace in effect, and `flags` (variable -> value given on the
    command line, None when not given)."""
    env = {k: v for k, v in environ.items() if k.startswith("RAYCORD_") or k in SECRET_VARIABLES}
    env["RAYCORD_STATE_DIR"] = str(settings.state_dir)
    env["RAYCORD_NAMESPACE"] = settings.namespace
    # the job finds the cluster by itself (`--address auto` in the entrypoint)
    env.pop("RAYCORD_RAY_ADDRESS", None)
    env.update({k: v for k, v in (flags or {}).items() if v is not None})
    return env


def in_ray_job(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is a Ray job's entrypoint (the job supervisor sets its config)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in environ


def runtime_env(working_dir: Path, env_vars: Mapping[str, str]) -> dict[str, Any]:
    return {"working_dir": str(working_dir), "excludes": list(DEPLOY_EXCLUDES), "env_vars": dict(env_vars)}


def entrypoint(working_dir: Path, config: Path | None = None, frontends: int | None = None) -> str:
    """The job's command: `ENTRYPOINT`, with `--frontends N` when given, and `--config` when a
    YAML file is given, which the job finds in its copy of the working directory.

    Raises:
        DeployError: the file is outside the working directory, so the job would not have it.
    """
    command = ENTRYPOINT if frontends is None else f"{ENTRYPOINT} --frontends {int(frontends)}"
    if config is None:
        return command
    resolved, root = config.resolve(), working_dir.resolve()
    if root not in resolved.parents:
        raise DeployError(
            f"the config file {config} is outside the working directory {root}, which is all the job "
            "gets: move it there (or pass --working-dir), or set its values as RAYCORD_* variables."
        )
    return f"{command} --config {shlex.quote(str(resolved.relative_to(root)))}"


def _client(address: str) -> Any:
    """Ray's job client for the dashboard at `address`, with token authentication when the
    cluster uses it: RAY_AUTH_MODE as given, else on when a token is at hand (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), as `ray job submit` does."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )
    from ray.job_submission import JobSubmissionClient

    # after the imports, which give Ray's logger its level: its INFO lines (the upload of the
    # working directory) are not this command's output
    logging.getLogger("ray").setLevel(logging.ERROR)
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # Ray's connection errors are several; the first line says which
        raise DeployError(_reason(address, exc)) from exc


def _reason(address: str, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = str(exc)
    if "Authentication" in text or "401" in text or "403" in text:
        return (
            f"the Ray cluster at {address} refused the request: {first}\n"
            f"Token authentication: set {_AUTH_MODE}=token and the cluster's token in RAY_AUTH_TOKEN "
            "(or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token; `ray get-auth-token` on the head prints it)."
        )
    return (
        f"could not reach the Ray job API at {address}: {first}\n"
        "Pass the head's dashboard address, e.g. --address http://HEAD:8265."
    )


def submit(
    settings: Settings,
    address: str,
    working_dir: Path,
    environ: Mapping[str, str],
    flags: Mapping[str, str | None] | None = None,
    config: Path | None = None,
    frontends: int | None = None,
) -> Deployment:
    """Submit the bot as a Ray job (with `frontends`: that many front-end actors).

    Raises:
        DeployError: the job API cannot be reached or refuses the request.
    """
    command = entrypoint(working_dir, config, frontends)
    client = _client(address)
    job_id = f"raycord-{uuid.uuid4().hex[:12]}"
    try:
        client.submit_job(
            entrypoint=command,
            submission_id=job_id,
            runtime_env=runtime_env(working_dir, job_environment(environ, settings, flags)),
            metadata={METADATA_KEY: settings.namespace},
        )
    except Exception as exc:
        raise DeployError(_reason(address, exc)) from exc
    return Deployment(job_id, address)


def how_to_follow(deployment: Deployment) -> str:
    job, address = deployment.job_id, deployment.address
    return "\n".join(
        [
            f"raycord: submitted job {job} to {address}",
            f"  follow  ray job logs --address {address} --follow {job}",
            f"  query   ray job status --address {address} {job}",
            f"  stop    raycord deploy --address {address} --stop",
        ]
    )


def _running_bots(client: Any, namespace: str) -> list[str]:
    from ray.job_submission import JobStatus

    return [
        job.submission_id
        for job in client.list_jobs()
        if (job.metadata or {}).get(METADATA_KEY) == namespace
        and job.submission_id
        and job.status in (JobStatus.PENDING, JobStatus.RUNNING)
    ]


def _wait_terminal(client: Any, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value)
        if time.monotonic() > deadline:
            raise DeployError(f"job {job_id} is still {status.value} after {timeout:.0f} s")
        time.sleep(0.5)


def stop(settings: Settings, address: str, working_dir: Path) -> list[str]:
    """Stop every raycord job of `settings.namespace` at `address`, then drain and remove its
    services by a teardown job in the cluster. Returns the stopped job ids.

    Raises:
        DeployError: the job API cannot be reached, or the teardown job failed.
    """
    client = _client(address)
    try:
        stopped = _running_bots(client, settings.namespace)
        for job_id in stopped:
            client.stop_job(job_id)
        for job_id in stopped:
            _wait_terminal(client, job_id, STOP_TIMEOUT)
        teardown_id = f"raycord-teardown-{uuid.uuid4().hex[:12]}"
        client.submit_job(
            entrypoint=TEARDOWN_ENTRYPOINT,
            submission_id=teardown_id,
            runtime_env=runtime_env(working_dir, {"RAYCORD_NAMESPACE": settings.namespace}),
            metadata={METADATA_KEY: TEARDOWN_KIND},
        )
        outcome = _wait_terminal(client, teardown_id, STOP_TIMEOUT)
    except DeployError:
        raise
    except Exception as exc:
        raise DeployError(_reason(address, exc)) from exc
    if outcome != "SUCCEEDED":
        logs = client.get_job_logs(teardown_id)
        raise DeployError(f"draining the services failed ({outcome}):\n{logs[-2000:]}")
    return stopped


async def teardown(namespace: str, timeout: float = 30.0) -> list[str]:
    """Flush, close and kill every named actor of `namespace` (run inside the cluster, where
    `ray.init(address="auto")` finds it). Returns the actors' names."""
    import ray

    ray.init(address="auto", namespace=namespace, logging_level=logging.WARNING)
    names = sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace
    )
    handles = []
    for name in names:
        try:
            handles.append(ray.get_actor(name, namespace=namespace))
        except ValueError:  # gone since it was listed: a front-end goes with the job that owned it
            continue
    for step in ("flush", "close"):
        try:
            await asyncio.wait_for(asyncio.gather(*(getattr(h, step).remote() for h in handles)), timeout)
        except Exception:
            log.exception("%s of the services failed; they are killed anyway", step)
    for handle in handles:
        ray.kill(handle, no_restart=True)
    return names


def _teardown_main() -> int:
    namespace = Settings().namespace
    names = asyncio.run(teardown(namespace))
    print(f"raycord: drained and removed {len(names)} actor(s) in namespace {namespace}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["teardown"]:
        sys.exit("usage: python -m bot.deploy teardown")
    sys.exit(_teardown_main())
