"""Ray start/connect and the service actors: the one place plain classes become actors.

`Runtime.start()` starts an embedded Ray (or connects to `ray_address`), gets or
creates every service's replicas by name in the configured namespace, and builds the
`ChatPipeline` over their handles. `Runtime.shutdown()` drains the pipeline and flushes
what the services hold.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray

import actors
from actors.analytics import AnalyticsClient, AnalyticsSink
from actors.base import ShardedClient
from actors.cache import CacheClient, ResponseCache
from actors.context import ContextClient, ContextStore
from actors.ratelimit import RateLimitClient, RateLimiter
from bot.attach import NoBotFound, answers, forget_bot, record_bot
from bot.config import Settings
from bot.llm import LLM
from bot.llm.gateway import GatewayClient, GatewayConfig, LLMGateway, default_model
from bot.pipeline import ChatPipeline
from storage.postgres import PgTarget

log = logging.getLogger(__name__)
C = TypeVar("C", bound=ShardedClient)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    cls: type
    client: type[ShardedClient]
    #: attribute of `Settings` holding the service's config
    config_attr: str
    #: DuckDB allows one writing process, so the analytics sink is never sharded
    shardable: bool = True
    #: builds the service's config from the settings, when it needs more than one section
    config_of: Callable[[Settings], Any] | None = None
    #: keeps files in the state directory (unless `state_url` moves them to PostgreSQL)
    stateful: bool = False


#: the services whose state `state_url` moves to PostgreSQL
POSTGRES_SERVICES = frozenset({"context", "ratelimit"})

SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("cache", ResponseCache, CacheClient, "cache"),
    ServiceSpec("context", ContextStore, ContextClient, "context", stateful=True),
    ServiceSpec("ratelimit", RateLimiter, RateLimitClient, "ratelimit", stateful=True),
    ServiceSpec("analytics", AnalyticsSink, AnalyticsClient, "analytics", shardable=False, stateful=True),
    # the gateway's replicas (`llm.replicas`) split the quota between them
    ServiceSpec("llm", LLMGateway, GatewayClient, "llm", config_of=GatewayConfig.from_settings),
)


def project_root() -> Path:
    """The directory holding the `actors`, `bot` and `storage` packages."""
    return Path(actors.__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class RayStarted:
    #: this call started (and so owns) the Ray instance
    owns: bool
    #: the Ray dashboard's URL, None when it is off (or Ray was already up)
    dashboard_url: str | None = None


def init_ray(settings: Settings, **kwargs: Any) -> bool:
    """Start an embedded Ray or connect to `settings.ray_address`.

    Returns True when this call started (and so owns) the Ray instance.
    """
    return start_ray(settings, **kwargs).owns


def start_ray(settings: Settings, **kwargs: Any) -> RayStarted:
    """`init_ray`, saying also where the dashboard is.

    Raises:
        NoBotFound: nothing answers at `settings.ray_address` (Ray would retry for minutes).
    """
    if ray.is_initialized():
        return RayStarted(False)
    if settings.ray_address:
        if settings.ray_address != "auto" and not answers(settings.ray_address):
            raise NoBotFound(
                f"nothing answers at the Ray address {settings.ray_address} (--address).\n"
                "Start the cluster (`ray up ray_config.yaml`), or leave --address out for an embedded Ray."
            )
        context = ray.init(
            address=settings.ray_address,
            namespace=settings.namespace,
            logging_level=logging.WARNING,
            **kwargs,
        )
        return RayStarted(False, _url(context.dashboard_url))
    # Workers must import our packages from wherever the driver does. The raylet we
    # start inherits this environment and passes it on to workers, which costs nothing
    # at actor start (a runtime_env would add a few seconds to each).
    root = str(project_root())
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, *paths]))
    options: dict[str, Any] = {
        "namespace": settings.namespace,
        "include_dashboard": settings.dashboard,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": settings.dashboard_port,
        "logging_level": logging.WARNING,
    }
    options.update(kwargs)
    context = ray.init(**options)
    return RayStarted(True, _url(context.dashboard_url) if options["include_dashboard"] else None)


def _url(address: str | None) -> str | None:
    if not address:
        return None
    return address if "://" in address else f"http://{address}"


#: where Ray's own log records go, in the state directory, while a command runs Ray
RAY_LOG_FILE = "ray.log"


def ray_log_path(settings: Settings) -> Path:
    return settings.state_dir.resolve() / RAY_LOG_FILE


def route_ray_logs(log_file: Path) -> None:
    """Send Ray's own log records (the token-authentication notice at start, among
    others) to `log_file` instead of the terminal; its errors reach stderr as well.

    Ray logs through the `ray` logger with a handler of its own on stderr; swapping the
    handlers is the logging module's public way to redirect it (token auth stays on)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # no formatters: ray.init sets its own on the `ray` logger's handlers
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    errors = logging.StreamHandler()
    errors.setLevel(logging.ERROR)
    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        ray_logger.removeHandler(handler)
    ray_logger.addHandler(to_file)
    ray_logger.addHandler(errors)


def cluster_mode(settings: Settings) -> bool:
    """Connected to a Ray cluster that outlives this process (`ray_address` is set)."""
    return settings.ray_address is not None


#: bytes of Ray's `memory` resource a spread actor reserves. Ray places an actor that asks for
#: no resources at all on a random node and heeds no scheduling strategy for it (its
#: scheduling docs say so; the cluster test saw every such replica on one node): a token
#: request makes "SPREAD" and node affinity apply
PLACEMENT_MEMORY = 2**20

#: the share of `state_resource` a pinned actor asks for: any node holding the resource
#: takes every pinned actor (Ray pins its own head-node actors the same way)
PIN_AMOUNT = 0.001


def keeps_local_state(settings: Settings, spec: ServiceSpec) -> bool:
    """Whether the service's replicas keep embedded-store files (SQLite, DuckDB) on disk."""
    return spec.stateful and not (settings.state_url is not None and spec.name in POSTGRES_SERVICES)


def placement(settings: Settings, spec: ServiceSpec) -> dict[str, Any]:
    """Where a service's replicas may run (Ray actor options).

    On a cluster the services outlive any one front-end. An actor keeping SQLite or DuckDB
    files is pinned to the node whose local disk holds them (`state_resource`, the head by
    default), so a worker's death takes no state with it and a restart finds its files;
    stateless replicas (and the stores whose state is in PostgreSQL) spread over the nodes
    so a node's death takes down as few of them as possible."""
    if not cluster_mode(settings):
        return {}
    if keeps_local_state(settings, spec):
        return {"lifetime": "detached", "resources": {settings.state_resource: PIN_AMOUNT}}
    return {"lifetime": "detached", "scheduling_strategy": "SPREAD", "memory": PLACEMENT_MEMORY}


#: filesystem types (`/proc/self/mountinfo`) whose locking SQLite's WAL cannot use
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "fuse.sshfs",
        "fuse.glusterfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.rclone",
        "fuse.cephfs",
        "davfs",
    }
)
MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem holding `path` (its nearest existing ancestor), from the
    longest mount point above it in `mountinfo` (default: this process's); None when unknown.

    `statvfs` carries no filesystem type, and the mount table is what says "nfs4"."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return None
    target = path.resolve()
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 5:
            continue
        mount_point = Path(_unescape(fields[4]))
        fstype = fields[fields.index("-") + 1]
        if target == mount_point or mount_point in target.parents:
            depth = len(mount_point.parts)
            # a later mount on the same point hides the earlier one
            if best is None or depth >= best[0]:
                best = (depth, fstype)
    return best[1] if best else None


def check_state(settings: Settings, *, in_job: bool | None = None, cwd: Path | None = None) -> None:
    """Refuse, before any actor starts, a state directory the services could not keep.

    Raises:
        ConfigurationError: in cluster mode a relative state directory (the actors run in
            other directories, on other nodes) or one inside a Ray job's working directory
            (Ray deletes it); SQLite files on a network filesystem (WAL needs local locks).
    """
    from bot.deploy import in_ray_job

    state_dir = settings.state_dir
    what_to_set = (
        "Set RAYCORD_STATE_DIR (or --state-dir) to an absolute path on the local disk of the node "
        f"that keeps the state (the one with the Ray resource {settings.state_resource!r}; "
        "the head by default)"
    )
    if cluster_mode(settings) and not state_dir.is_absolute():
        raise ConfigurationError(
            f"the state directory {state_dir} is relative, and on a cluster. {what_to_set}."
        )
    job = in_ray_job() if in_job is None else in_job
    resolved = state_dir.resolve()
    workdir = (cwd or Path.cwd()).resolve()
    if "working_dir_files" in resolved.parts or (
        job and (resolved == workdir or workdir in resolved.parents)
    ):
        raise ConfigurationError(
            f"the state directory {resolved} is inside the Ray job's working directory, which Ray "
            f"deletes after the job. {what_to_set}."
        )
    if settings.state_url is None:
        fstype = filesystem_type(state_dir)
        if fstype in NETWORK_FILESYSTEMS:
            raise ConfigurationError(
                f"the state directory {resolved} is on a network filesystem ({fstype}), where "
                "SQLite's write-ahead log cannot lock. Use a path on a node-local disk, or keep the "
                "context store and rate limiter in PostgreSQL (RAYCORD_STATE_URL=postgresql://...)."
            )


def state_location(settings: Settings, spec: ServiceSpec) -> Path | PgTarget:
    """The state a service's replicas open: PostgreSQL for the context store and the rate
    limiter when `state_url` is set, the state directory otherwise (analytics: DuckDB)."""
    location = settings.state_location()
    if isinstance(location, PgTarget) and spec.name in POSTGRES_SERVICES:
        return location
    state_dir = settings.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    return state_dir


def service_handles(settings: Settings, spec: ServiceSpec, *, create: bool = True) -> list[Any]:
    """Get or create the replicas of one service, by name, in the configured namespace;
    with `create=False` only get them (ValueError when one is not running)."""
    config = spec.config_of(settings) if spec.config_of else getattr(settings, spec.config_attr)
    shards = getattr(config, "shards", 1) if spec.shardable else 1
    if not create:
        # a front-end actor attaches to the services its driver started, from any node: it
        # creates neither them nor a state directory on its own node's disk
        return [
            ray.get_actor(f"{spec.name}-{shard}", namespace=settings.namespace) for shard in range(shards)
        ]
    state = state_location(settings, spec)
    remote_cls: Any = ray.remote(spec.cls)
    options = placement(settings, spec)
    handles = []
    for shard in range(shards):
        handle = remote_cls.options(
            name=f"{spec.name}-{shard}",
            namespace=settings.namespace,
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            max_concurrency=1000,
            **options,
        ).remote(config, state, shard)
        handles.append(handle)
    return handles


class ConfigurationError(Exception):
    """The settings cannot work as given (a backend without its key); the message says why."""


def check_llm(settings: Settings) -> None:
    """Refuse, before any actor starts, an LLM configuration the gateway could not use.

    Raises:
        ConfigurationError: the Gemini backend has neither an API key nor a base URL.
    """
    try:
        GatewayConfig.from_settings(settings)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from exc


def make_llm(settings: Settings, handles: list[Any]) -> GatewayClient:
    """The pipeline's LLM: a client of the gateway replicas, offline or Gemini alike."""
    return GatewayClient(handles, name=default_model(settings.llm_backend(), settings.llm))


class Runtime:
    """Owns the Ray connection, the service clients and the pipeline of one front-end."""

    def __init__(self, settings: Settings, llm: LLM | None = None, *, create_services: bool = True) -> None:
        self.settings = settings
        self._llm = llm
        #: False in a front-end actor: the services are its driver's, found by name
        self._create_services = create_services
        self.owns_ray = False
        self.clients: dict[str, ShardedClient] = {}
        self.handles: dict[str, list[Any]] = {}
        self.pipeline: ChatPipeline | None = None
        self.dashboard_url: str | None = None

    async def start(self, **ray_kwargs: Any) -> ChatPipeline:
        check_state(self.settings)
        started = start_ray(self.settings, **ray_kwargs)
        self.owns_ray, self.dashboard_url = started.owns, started.dashboard_url
        try:
            if self._llm is None:
                check_llm(self.settings)
        except ConfigurationError:
            if self.owns_ray:
                ray.shutdown()
                self.owns_ray = False
            raise
        for spec in SERVICES:
            if spec.client is GatewayClient and self._llm is not None:
                continue  # the caller brought its own LLM
            handles = service_handles(self.settings, spec, create=self._create_services)
            self.handles[spec.name] = handles
            if spec.client is GatewayClient:
                self.clients[spec.name] = make_llm(self.settings, handles)
            elif spec.client is AnalyticsClient:
                self.clients[spec.name] = AnalyticsClient(
                    handles, self.settings.analytics, state_dir=self.settings.state_dir.resolve()
                )
            else:
                self.clients[spec.name] = spec.client(handles)
        # every replica answers before the front-end takes traffic
        await asyncio.gather(*(h.ping.remote() for hs in self.handles.values() for h in hs))
        llm: LLM = self._llm or self.client("llm", GatewayClient)
        self.pipeline = ChatPipeline(
            self.settings,
            cache=self.client("cache", CacheClient),
            context=self.client("context", ContextClient),
            limiter=self.client("ratelimit", RateLimitClient),
            analytics=self.client("analytics", AnalyticsClient),
            llm=llm,
        )
        if self.owns_ray:
            # `raycord status` and `raycord analytics` find this Ray from the state directory
            record_bot(self.settings, self.dashboard_url)
        return self.pipeline

    def client(self, name: str, kind: type[C]) -> C:
        """The started client of service `name`, as the type it was made."""
        found = self.clients[name]
        if not isinstance(found, kind):
            raise TypeError(f"the {name} client is a {type(found).__name__}, not a {kind.__name__}")
        return found

    async def flush(self, timeout: float = 30.0) -> None:
        """Drain the pipeline's background writes, then make every service durable."""
        if self.pipeline is not None:
            await self.pipeline.drain(timeout)
        await asyncio.wait_for(
            asyncio.gather(*(h.flush.remote() for hs in self.handles.values() for h in hs)),
            timeout,
        )

    async def shutdown(self, *, kill_actors: bool | None = None, timeout: float = 30.0) -> None:
        """Flush, close the LLM client, and stop the actors when this process owns them.

        Embedded Ray is stopped with the actors in it; actors on a cluster outlive a
        front-end unless `kill_actors` says otherwise.
        """
        try:
            await self.flush(timeout)
        except Exception:
            log.exception("flush at shutdown failed")
        if self.pipeline is not None:
            await self.pipeline.llm.aclose()
            analytics = self.clients.get("analytics")
            if isinstance(analytics, AnalyticsClient):
                await analytics.close()
        kill = self.owns_ray if kill_actors is None else kill_actors
        if kill:
            closing = [h.close.remote() for hs in self.handles.values() for h in hs]
            try:
                await asyncio.wait_for(asyncio.gather(*closing), timeout)
            except Exception:
                log.exception("graceful close failed; killing the actors")
            for hs in self.handles.values():
                for h in hs:
                    ray.kill(h, no_restart=True)
        if self.owns_ray:
            forget_bot(self.settings)
            ray.shutdown()
            self.owns_ray = False
