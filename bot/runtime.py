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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

import actors
from actors.analytics import AnalyticsClient, AnalyticsSink
from actors.base import ShardedClient
from actors.cache import CacheClient, ResponseCache
from actors.context import ContextClient, ContextStore
from actors.ratelimit import RateLimitClient, RateLimiter
from bot.config import Settings
from bot.llm import LLM, OfflineResponder
from bot.pipeline import ChatPipeline
from storage.postgres import PgTarget

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    cls: type
    client: type[ShardedClient]
    #: attribute of `Settings` holding the service's config
    config_attr: str
    #: DuckDB allows one writing process, so the analytics sink is never sharded
    shardable: bool = True


#: the services whose state `state_url` moves to PostgreSQL
POSTGRES_SERVICES = frozenset({"context", "ratelimit"})

SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("cache", ResponseCache, CacheClient, "cache"),
    ServiceSpec("context", ContextStore, ContextClient, "context"),
    ServiceSpec("ratelimit", RateLimiter, RateLimitClient, "ratelimit"),
    ServiceSpec("analytics", AnalyticsSink, AnalyticsClient, "analytics", shardable=False),
)


def project_root() -> Path:
    """The directory holding the `actors`, `bot` and `storage` packages."""
    return Path(actors.__file__).resolve().parent.parent


def init_ray(settings: Settings, **kwargs: Any) -> bool:
    """Start an embedded Ray or connect to `settings.ray_address`.

    Returns True when this call started (and so owns) the Ray instance.
    """
    if ray.is_initialized():
        return False
    if settings.ray_address:
        ray.init(
            address=settings.ray_address,
            namespace=settings.namespace,
            logging_level=logging.WARNING,
            **kwargs,
        )
        return False
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
    ray.init(**options)
    return True


def cluster_mode(settings: Settings) -> bool:
    """Connected to a Ray cluster that outlives this process (`ray_address` is set)."""
    return settings.ray_address is not None


def placement(settings: Settings, spec: ServiceSpec) -> dict[str, Any]:
    """Where a service's replicas may run (Ray actor options).

    On a cluster the services outlive any one front-end, and shards of one service go to
    different nodes so a node's death takes down as few of them as possible. A store whose
    state is in PostgreSQL holds nothing a node must keep, so it may run on any node."""
    if not cluster_mode(settings):
        return {}
    return {"lifetime": "detached", "scheduling_strategy": "SPREAD"}


def state_location(settings: Settings, spec: ServiceSpec) -> Path | PgTarget:
    """The state a service's replicas open: PostgreSQL for the context store and the rate
    limiter when `state_url` is set, the state directory otherwise (analytics: DuckDB)."""
    location = settings.state_location()
    if isinstance(location, PgTarget) and spec.name in POSTGRES_SERVICES:
        return location
    state_dir = settings.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    return state_dir


def service_handles(settings: Settings, spec: ServiceSpec) -> list[Any]:
    """Get or create the replicas of one service, by name, in the configured namespace."""
    config = getattr(settings, spec.config_attr)
    shards = getattr(config, "shards", 1) if spec.shardable else 1
    state = state_location(settings, spec)
    remote_cls = ray.remote(spec.cls)
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


def make_llm(settings: Settings) -> LLM:
    if settings.llm_backend() == "offline":
        return OfflineResponder()
    from bot.llm.gemini import GeminiLLM

    return GeminiLLM(settings)


class Runtime:
    """Owns the Ray connection, the service clients and the pipeline of one front-end."""

    def __init__(self, settings: Settings, llm: LLM | None = None) -> None:
        self.settings = settings
        self._llm = llm
        self.owns_ray = False
        self.clients: dict[str, ShardedClient] = {}
        self.handles: dict[str, list[Any]] = {}
        self.pipeline: ChatPipeline | None = None

    async def start(self, **ray_kwargs: Any) -> ChatPipeline:
        self.owns_ray = init_ray(self.settings, **ray_kwargs)
        for spec in SERVICES:
            handles = service_handles(self.settings, spec)
            self.handles[spec.name] = handles
            if spec.client is AnalyticsClient:
                self.clients[spec.name] = AnalyticsClient(
                    handles, self.settings.analytics, state_dir=self.settings.state_dir.resolve()
                )
            else:
                self.clients[spec.name] = spec.client(handles)
        # every replica answers before the front-end takes traffic
        await asyncio.gather(*(h.ping.remote() for hs in self.handles.values() for h in hs))
        llm = self._llm or make_llm(self.settings)
        warm = getattr(llm, "start", None)
        if warm is not None:
            # the Gemini backend's SDK process: started now, not on the first message
            try:
                await warm()
            except Exception:
                log.exception("the LLM backend did not start; its first call will retry")
        self.pipeline = ChatPipeline(
            self.settings,
            cache=self.clients["cache"],  # type: ignore[arg-type]
            context=self.clients["context"],  # type: ignore[arg-type]
            limiter=self.clients["ratelimit"],  # type: ignore[arg-type]
            analytics=self.clients["analytics"],  # type: ignore[arg-type]
            llm=llm,
        )
        return self.pipeline

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
            ray.shutdown()
            self.owns_ray = False
