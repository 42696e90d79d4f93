"""Discord front-ends as Ray actors: `raycord run --address auto --frontends N`.

Each `DiscordFrontend` actor runs a `RaycordBot` over a contiguous block of the bot's gateway
shards, with a `ChatPipeline` of its own over the shared service actors and LLM gateway. The
driver (`run_frontends`) fixes the shard count once, registers the commands, starts the actors
(no CPU, one node after another, restarted without limit with the same shards), waits on them
and stops them; `raycord status` asks each for its `status()`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import discord
import ray
from pydantic import BaseModel
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bot.config import Settings
from bot.discord_app import RaycordBot, RaycordClient, run_discord, use_api_base
from bot.runtime import PLACEMENT_MEMORY, Runtime, cluster_mode

__all__ = [
    "FRONTEND_PREFIX",
    "DiscordFrontend",
    "FrontendError",
    "FrontendStatus",
    "ShardStatus",
    "check_frontends",
    "frontend_name",
    "frontend_statuses",
    "prepare_frontends",
    "run_frontends",
    "split_shards",
]

log = logging.getLogger(__name__)

FRONTEND_PREFIX = "frontend"
#: seconds a front-end has to drain and close when the driver stops it
STOP_TIMEOUT = 20.0
#: seconds one front-end has to answer `status()`
STATUS_TIMEOUT = 5.0


class FrontendError(Exception):
    """The front-end actors cannot start as configured; the message says what to change."""


class ShardStatus(BaseModel):
    shard_id: int
    connected: bool
    #: HEARTBEAT to HEARTBEAT_ACK of the shard's gateway connection; None before the first ack
    latency_ms: float | None


class FrontendStatus(BaseModel):
    """What one front-end actor says about itself, for `raycord status`."""

    name: str
    node_id: str
    node_ip: str
    pid: int
    shard_count: int
    shards: list[ShardStatus]
    #: logged in, every shard READY (discord.py's on_ready)
    ready: bool
    #: whether Ray restarted this actor after a death (its constructor replayed)
    restarted: bool
    uptime_seconds: float
    #: why the front-end stopped serving, when it did
    error: str | None = None


def frontend_name(index: int) -> str:
    return f"{FRONTEND_PREFIX}-{index}"


def split_shards(shard_ids: Sequence[int], frontends: int) -> list[list[int]]:
    """`shard_ids` in `frontends` contiguous blocks whose sizes differ by at most one, the
    larger first (contiguous, so each block's shards identify in parallel buckets of Discord's
    `max_concurrency`, as Discord's large-bot clusters do)."""
    if not 1 <= frontends <= len(shard_ids):
        raise ValueError(f"cannot share {len(shard_ids)} shard(s) among {frontends} front-end(s)")
    size, extra = divmod(len(shard_ids), frontends)
    blocks: list[list[int]] = []
    start = 0
    for i in range(frontends):
        end = start + size + (1 if i < extra else 0)
        blocks.append(list(shard_ids[start:end]))
        start = end
    return blocks


def check_frontends(settings: Settings, front_end: str) -> None:
    """Refuse, before anything starts, `discord.frontends` where it cannot work.

    Raises:
        FrontendError: the terminal chat was asked for front-ends, or there is no cluster.
    """
    frontends = settings.discord.frontends
    if frontends is None:
        return
    if front_end != "discord":
        raise FrontendError(
            f"--frontends {frontends} starts Discord front-ends, and this is the terminal chat "
            "(no DISCORD_TOKEN): set DISCORD_TOKEN, or leave --frontends (RAYCORD_DISCORD__FRONTENDS) out"
        )
    if not cluster_mode(settings):
        raise FrontendError(
            f"--frontends {frontends} runs the front-ends as actors on a Ray cluster: pass "
            "--address auto (or HOST:PORT of the cluster), or leave --frontends out to run the "
            "front-end in this process"
        )


async def prepare_frontends(settings: Settings) -> Settings:
    """Log in over REST once for every front-end: register the command tree when it changed
    (the driver runs where the state directory is; the actors may not), and fix the shard
    count (`discord.shard_count`, or Discord's `/gateway/bot` recommendation) so every actor
    agrees. Returns the settings with the shard count set.

    Raises:
        FrontendError: Discord refused the token or could not be reached, or there are
            fewer shards than front-ends.
    """
    token = settings.discord_token
    if token is None:
        raise FrontendError("DISCORD_TOKEN is not set")
    use_api_base(settings.discord.api_base_url)
    client = RaycordClient(settings, None)
    try:
        async with client:
            await client.login(token.get_secret_value())
            await client.sync_commands()
            shard_count = settings.discord.shard_count
            if shard_count is None:
                shard_count, _, _ = await client.http.get_bot_gateway()
    except discord.LoginFailure as exc:
        raise FrontendError(f"Discord refused the token: {exc}") from exc
    except (discord.HTTPException, discord.GatewayNotFound, OSError) as exc:
        raise FrontendError(
            f"could not ask Discord at {settings.discord.api_base_url} for the shard count: {exc}"
        ) from exc
    try:
        return settings.with_discord(shard_count=shard_count)
    except ValueError as exc:
        raise FrontendError(" ".join(str(exc).split())) from exc


class DiscordFrontend:
    """One Discord front-end, run as a Ray actor: a `RaycordBot` over `settings.discord.shard_ids`.

    The constructor starts it, so Ray's restart (which replays the constructor with the same
    arguments) brings it back with the same shards; discord.py identifies them again."""

    def __init__(self, settings: Settings, index: int) -> None:
        if settings.discord.shard_ids is None or settings.discord.shard_count is None:
            raise ValueError("a front-end actor needs discord.shard_count and discord.shard_ids")
        self.settings = settings
        self.name = frontend_name(index)
        self.shard_ids: list[int] = list(settings.discord.shard_ids)
        self.shard_count: int = settings.discord.shard_count
        self._started = time.monotonic()
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._bot: RaycordBot | None = None
        self._error: str | None = None
        self._runtime = Runtime(settings, create_services=False)
        self._node_id = ray.get_runtime_context().get_node_id()
        self._node_ip = _node_ip(self._node_id)
        # async actors run `__init__` on their event loop
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        try:
            pipeline = await self._runtime.start()
            self._bot = RaycordBot(self.settings, pipeline, sync_at_start=False)
            await run_discord(self.settings, pipeline, self._stop, on_ready=self._on_ready, bot=self._bot)
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            log.exception("%s stopped serving", self.name)
            raise
        finally:
            await self._runtime.shutdown(kill_actors=False)

    def _on_ready(self, bot_name: str, servers: int) -> None:
        log.info(
            "%s logged in as %s over shards %s, on %d server(s)", self.name, bot_name, self.shard_ids, servers
        )
        self._ready.set()

    async def wait_ready(self) -> tuple[str, int]:
        """Until every shard of this front-end is READY: the bot's name and its servers here.

        Raises:
            FrontendError: the front-end stopped first (the message says why).
        """
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.is_set():
            ready.cancel()
            raise FrontendError(f"{self.name} stopped before it was ready: {self._error}")
        assert self._bot is not None
        return str(self._bot.user), len(self._bot.guilds)

    async def serve(self) -> None:
        """Until this front-end stops serving: returns after `stop()`, raises its failure."""
        try:
            await asyncio.shield(self._task)
        except Exception as exc:
            raise FrontendError(f"{self.name} stopped serving: {self._error or exc}") from None

    async def stop(self) -> None:
        """Close the gateway connections, then drain the pipeline's background writes."""
        self._stop.set()
        await asyncio.gather(self._task, return_exceptions=True)

    async def flush(self) -> None:
        """Drain the pipeline's background writes (`raycord deploy --stop` flushes every actor
        of the namespace, then closes it)."""
        if self._runtime.pipeline is not None:
            await self._runtime.pipeline.drain()

    async def close(self) -> None:
        await self.stop()

    async def status(self) -> FrontendStatus:
        context = ray.get_runtime_context()
        shards = []
        for shard_id in self.shard_ids:
            info = self._bot.get_shard(shard_id) if self._bot is not None else None
            latency = info.latency if info is not None else math.inf
            shards.append(
                ShardStatus(
                    shard_id=shard_id,
                    connected=info is not None and not info.is_closed(),
                    latency_ms=latency * 1000 if math.isfinite(latency) else None,
                )
            )
        return FrontendStatus(
            name=self.name,
            node_id=self._node_id,
            node_ip=self._node_ip,
            pid=os.getpid(),
            shard_count=self.shard_count,
            shards=shards,
            ready=self._ready.is_set(),
            restarted=context.was_current_actor_reconstructed,
            uptime_seconds=time.monotonic() - self._started,
            error=self._error,
        )


def _live_nodes() -> dict[str, str]:
    """The live nodes of the cluster: node id -> the node's address as Ray records it."""
    nodes = ray.nodes()  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
    return {str(n["NodeID"]): str(n["NodeManagerAddress"]) for n in nodes if n["Alive"]}


def _node_ip(node_id: str) -> str:
    return _live_nodes().get(node_id, "?")


def spread_nodes() -> list[str]:
    """The ids of the live nodes, in the order front-ends are placed on them round-robin."""
    return sorted(_live_nodes())


def _start(settings: Settings, index: int, shard_ids: list[int], nodes: list[str]) -> Any:
    remote_cls: Any = ray.remote(DiscordFrontend)
    # the actor runs its block of shards itself: `frontends` is the driver's setting
    own = settings.with_discord(shard_ids=shard_ids, frontends=None)
    try:
        return remote_cls.options(
            name=frontend_name(index),
            namespace=settings.namespace,
            num_cpus=0,
            # Stateless: spread, so a node's death takes down as few front-ends as possible:
            # each asks for a node of its own, round-robin; soft, so a restart after that
            # node's death lands on a live one; a token `memory` request, or Ray would place
            # this zero-resource actor at random (`PLACEMENT_MEMORY`).
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[index % len(nodes)], soft=True),
            memory=PLACEMENT_MEMORY,
            max_restarts=-1,
            # the driver's `serve()` call waits across a restart
            max_task_retries=-1,
        ).remote(own, index)
    except ValueError as exc:  # the name is taken
        raise FrontendError(
            f"{frontend_name(index)} already runs in namespace {settings.namespace!r}: another "
            f"`raycord run --frontends` serves it; stop that one, or set RAYCORD_NAMESPACE ({exc})"
        ) from exc


async def _stop_all(handles: list[Any]) -> None:
    try:
        await asyncio.wait_for(asyncio.gather(*(h.stop.remote() for h in handles)), STOP_TIMEOUT)
    except Exception:
        log.exception("the front-ends did not stop in time; killing them")
    for handle in handles:
        ray.kill(handle, no_restart=True)


async def run_frontends(
    settings: Settings, stop: asyncio.Event, on_ready: Callable[[str, int], None] | None = None
) -> None:
    """Start `discord.frontends` front-end actors over the shards of `settings` (see
    `prepare_frontends`), tell `on_ready(bot name, servers)` once all are ready, and serve
    until `stop` is set; then stop them. The actors are owned by this process (not
    detached): if it dies, they go with it.

    Raises:
        FrontendError: a front-end failed for good (a refused token), or the names are taken.
    """
    config = settings.discord
    if config.frontends is None or config.shard_count is None:
        raise ValueError("run_frontends needs discord.frontends and discord.shard_count")
    shard_ids = config.shard_ids if config.shard_ids is not None else list(range(config.shard_count))
    handles: list[Any] = []
    nodes = spread_nodes()
    try:
        for index, block in enumerate(split_shards(shard_ids, config.frontends)):
            handles.append(_start(settings, index, block, nodes))
        stopper = asyncio.ensure_future(stop.wait())
        ready = asyncio.ensure_future(asyncio.gather(*(h.wait_ready.remote() for h in handles)))
        served = [asyncio.ensure_future(h.serve.remote()) for h in handles]
        waiting: set[asyncio.Future[Any]] = {stopper, ready, *served}
        while not stopper.done():
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if ready in done:
                readies: list[tuple[str, int]] = ready.result()
                if on_ready is not None:
                    on_ready(readies[0][0], sum(servers for _, servers in readies))
            for finished in done & set(served):
                finished.result()  # a front-end that stopped serving on its own failed
                raise FrontendError("a front-end stopped serving")
        for pending in waiting:
            pending.cancel()
    except ray.exceptions.RayTaskError as exc:  # the actor's own error, said without Ray's traceback
        raise FrontendError(str(exc.cause)) from None
    except ray.exceptions.RayActorError as exc:  # killed with no_restart by someone else
        raise FrontendError(f"a front-end actor is gone for good: {exc}") from None
    finally:
        await _stop_all(handles)


async def frontend_statuses(settings: Settings) -> dict[str, FrontendStatus | str]:
    """Every front-end actor of the namespace, by name: its status, or why it gave none."""
    names = sorted(
        (
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == settings.namespace and a["name"].startswith(f"{FRONTEND_PREFIX}-")
        ),
        key=lambda name: int(name.rsplit("-", 1)[1]) if name.rsplit("-", 1)[1].isdigit() else -1,
    )

    async def one(name: str) -> FrontendStatus | str:
        try:
            handle = ray.get_actor(name, namespace=settings.namespace)
            status: FrontendStatus = await asyncio.wait_for(handle.status.remote(), STATUS_TIMEOUT)
        except Exception as exc:  # a dead or restarting front-end is shown, not raised
            return f"{type(exc).__name__}: {exc}"[:160]
        return status

    return dict(zip(names, await asyncio.gather(*(one(name) for name in names)), strict=True))
