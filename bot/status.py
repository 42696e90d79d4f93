"""`raycord status`: a live terminal dashboard of the running services, with alerts.

Attaches to the named service actors (it never creates one), asks each replica for its
`health()` and `stats()` and each Discord front-end actor (`--frontends N`) for its
`status()`, reads p95 latency and the error rate of the recent messages from the analytics
events in DuckDB, and renders them with rich.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import ray
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from actors.base import ServiceHealth
from bot.attach import NoBotFound, attach
from bot.config import Settings
from bot.frontend import FrontendStatus, frontend_statuses

#: the services whose replicas `bot.runtime` names `<service>-<shard>`
SERVICE_NAMES = ("cache", "context", "ratelimit", "analytics", "llm")
#: seconds one replica has to answer before it counts as down
CALL_TIMEOUT = 5.0


@dataclass(slots=True, frozen=True)
class ProcessMemory:
    """One process's memory three ways. RSS counts every page the process maps, shared
    libraries included, once per process, so RSS summed over processes counts them again
    and again; PSS splits each shared page among the processes sharing it, so it adds up;
    USS is the memory only this process holds, what its exit would give back."""

    rss: int
    pss: int
    uss: int


def process_memory(pid: int) -> ProcessMemory | None:
    """The memory of process `pid` on this machine; None when it is gone or unreadable."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.Error, OSError):
        return None
    # PSS is Linux's; elsewhere USS is the closest share of it
    return ProcessMemory(info.rss, getattr(info, "pss", info.uss), info.uss)


@dataclass(slots=True)
class ReplicaStatus:
    service: str
    shard: int
    health: ServiceHealth | None = None
    #: round trip of the health check, in milliseconds
    ping_ms: float | None = None
    stats: Any = None
    error: str | None = None
    #: RSS, PSS and USS of the replica's process, when it runs on this machine
    memory: ProcessMemory | None = None

    @property
    def up(self) -> bool:
        return self.health is not None


@dataclass(slots=True)
class RecentTraffic:
    """Messages of the last `window_seconds`, from the analytics events (sampling weights
    applied). Latency counts answered and failed messages; rate-limit denials, answered
    at once, would only pull it down."""

    window_seconds: float
    messages: float = 0.0
    errors: float = 0.0
    rate_limited: float = 0.0
    p95_latency_ms: float | None = None

    @property
    def error_rate(self) -> float:
        handled = self.messages + self.errors
        return self.errors / handled if handled else 0.0


@dataclass(slots=True)
class Snapshot:
    replicas: list[ReplicaStatus]
    traffic: RecentTraffic | None
    spill_files: int
    spill_bytes: int
    taken_at: float
    alerts: list[str] = field(default_factory=list)
    #: the Discord front-end actors (`raycord run --frontends N`), by name: status or error
    frontends: dict[str, FrontendStatus | str] = field(default_factory=dict)

    def of(self, service: str) -> list[ReplicaStatus]:
        return [r for r in self.replicas if r.service == service]


def replica_count(settings: Settings, service: str) -> int:
    if service == "analytics":  # DuckDB allows one writing process: never sharded
        return 1
    if service == "llm":
        return settings.llm.replicas
    shards: int = getattr(settings, service).shards
    return shards


async def _ask(handle: Any, method: str, *args: Any) -> Any:
    return await asyncio.wait_for(getattr(handle, method).remote(*args), CALL_TIMEOUT)


async def _replica(settings: Settings, service: str, shard: int) -> ReplicaStatus:
    status = ReplicaStatus(service, shard)
    try:
        handle = ray.get_actor(f"{service}-{shard}", namespace=settings.namespace)
    except ValueError:
        status.error = "not running"
        return status
    try:
        started = time.perf_counter()
        status.health = await _ask(handle, "health")
        status.ping_ms = (time.perf_counter() - started) * 1000
        status.stats = await _ask(handle, "stats")
    except Exception as exc:  # a dead, restarting or hung replica is shown, not raised
        status.error = f"{type(exc).__name__}: {exc}"[:120]
    return status


def _traffic_sql(since: datetime) -> str:
    cutoff = since.strftime("%Y-%m-%d %H:%M:%S.%f+00")
    return (
        "SELECT "
        "coalesce(sum(weight) FILTER (WHERE type IN ('message', 'command')), 0), "
        "coalesce(sum(weight) FILTER (WHERE type = 'error'), 0), "
        "coalesce(sum(weight) FILTER (WHERE type = 'rate_limited'), 0), "
        "quantile_cont(latency_ms, 0.95) FILTER (WHERE type IN ('message', 'command', 'error')) "
        f"FROM events WHERE time >= TIMESTAMPTZ '{cutoff}'"
    )


async def _traffic(settings: Settings, now: float) -> RecentTraffic | None:
    window = settings.status.window_seconds
    try:
        sink = ray.get_actor("analytics-0", namespace=settings.namespace)
        result = await _ask(sink, "query", _traffic_sql(datetime.fromtimestamp(now - window, UTC)), 1)
    except Exception:  # shown as "no data"; the sink's own row says why
        return None
    messages, errors, limited, p95 = result.rows[0]
    return RecentTraffic(window, float(messages), float(errors), float(limited), p95)


def _spill(settings: Settings) -> tuple[int, int]:
    """Analytics batches the front-ends spilled to disk and have not replayed yet."""
    spill_dir = settings.analytics.spill_dir or settings.state_dir / "analytics-spill"
    if not Path(spill_dir).is_dir():
        return 0, 0
    files = list(Path(spill_dir).glob("spill-*.jsonl"))
    return len(files), sum(f.stat().st_size for f in files)


def alerts(snapshot: Snapshot, settings: Settings) -> list[str]:
    """The thresholds of `settings.status` that the snapshot crosses, as messages."""
    limits = settings.status
    found = [f"{r.service}-{r.shard} is down: {r.error}" for r in snapshot.replicas if not r.up]
    for name, front in snapshot.frontends.items():
        if isinstance(front, str):
            found.append(f"{name} is down: {front}")
            continue
        closed = [s.shard_id for s in front.shards if not s.connected]
        if front.error is not None:
            found.append(f"{name} stopped serving: {front.error}")
        elif closed:
            found.append(f"{name} has shard(s) {', '.join(map(str, closed))} disconnected")
    for r in snapshot.replicas:
        if r.health is not None and r.health.rss_bytes > limits.memory_mb_alert * 2**20:
            found.append(
                f"{r.service}-{r.shard} uses {r.health.rss_bytes / 2**20:,.0f} MB "
                f"(alert above {limits.memory_mb_alert:,.0f} MB)"
            )
    t = snapshot.traffic
    if t is not None and t.p95_latency_ms is not None and t.p95_latency_ms > limits.p95_latency_ms_alert:
        found.append(
            f"p95 latency {t.p95_latency_ms:,.1f} ms (alert above {limits.p95_latency_ms_alert:,.0f} ms)"
        )
    if t is not None and t.error_rate > limits.error_rate_alert:
        found.append(f"error rate {t.error_rate:.1%} (alert above {limits.error_rate_alert:.1%})")
    return found


async def collect(settings: Settings, clock: Any = time.time) -> Snapshot:
    """One snapshot of every replica of every service, the recent traffic and the alerts."""
    now = clock()
    replicas, traffic, frontends = await asyncio.gather(
        asyncio.gather(
            *(
                _replica(settings, service, shard)
                for service in SERVICE_NAMES
                for shard in range(replica_count(settings, service))
            )
        ),
        _traffic(settings, now),
        frontend_statuses(settings),
    )
    here = ray.get_runtime_context().get_node_id()
    for r in replicas:
        if r.health is not None and r.health.node_id in (here, None):
            r.memory = process_memory(r.health.pid)
    files, size = _spill(settings)
    snapshot = Snapshot(list(replicas), traffic, files, size, now, frontends=frontends)
    snapshot.alerts = alerts(snapshot, settings)
    return snapshot


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def _memory(r: ReplicaStatus, rss: int) -> str:
    """RSS / PSS / USS when the process is on this machine, else RSS alone."""
    m = r.memory
    if m is None:
        return f"{_mb(rss)} RSS"
    return f"{m.rss / 2**20:,.1f} / {m.pss / 2**20:,.1f} / {m.uss / 2**20:,.1f} MB"


def _sum(rows: list[ReplicaStatus], name: str) -> float:
    return float(sum(getattr(r.stats, name) for r in rows if r.stats is not None))


def render(snapshot: Snapshot, settings: Settings) -> Group:
    limits = settings.status
    services = Table(title="Services", expand=True)
    for column in ("replica", "health", "ping", "node", "pid", "memory RSS / PSS / USS", "up for"):
        services.add_column(column, justify="left" if column in ("replica", "health", "node") else "right")
    for r in snapshot.replicas:
        name = f"{r.service}-{r.shard}"
        if r.health is None:
            down = Text(f"DOWN {r.error or ''}".strip())
            services.add_row(name, down, "", "", "", "", "", style="bold red")
            continue
        h = r.health
        heavy = h.rss_bytes > limits.memory_mb_alert * 2**20
        services.add_row(
            name,
            "ok" if r.error is None else f"degraded: {r.error}",
            f"{r.ping_ms:,.1f} ms",
            (h.node_id or "local")[:12],
            str(h.pid),
            _memory(r, h.rss_bytes),
            f"{h.uptime_seconds:,.0f} s",
            style="bold red" if heavy or r.error else None,
        )

    figures = Table(title="Figures", expand=True, show_header=False)
    figures.add_column("service")
    figures.add_column("figures")
    cache, limiter = snapshot.of("cache"), snapshot.of("ratelimit")
    context, sink = snapshot.of("context"), snapshot.of("analytics")
    hits, misses = _sum(cache, "hits"), _sum(cache, "misses")
    lookups = hits + misses
    figures.add_row(
        "cache",
        f"hit rate {hits / lookups if lookups else 0:.1%} ({hits:,.0f} hits, {misses:,.0f} misses) · "
        f"{_sum(cache, 'entries'):,.0f} entries · {_mb(_sum(cache, 'stored_bytes'))} stored",
    )
    figures.add_row(
        "rate limiter",
        f"{_sum(limiter, 'allowed'):,.0f} allowed · {_sum(limiter, 'denied'):,.0f} denied · "
        f"{_sum(limiter, 'keys'):,.0f} keys",
    )
    figures.add_row(
        "context",
        f"{_sum(context, 'conversations'):,.0f} conversations in memory · "
        f"{_sum(context, 'conversations_on_disk'):,.0f} on disk · {_mb(_sum(context, 'bytes'))}",
    )
    figures.add_row(
        "analytics",
        f"{_sum(sink, 'pending'):,.0f} queued · {_sum(sink, 'committed'):,.0f} committed · "
        f"spilled {snapshot.spill_files} files ({_mb(snapshot.spill_bytes)})",
    )
    gateway = snapshot.of("llm")
    prompt_tokens = _sum(gateway, "tokens_in")
    cached = _sum(gateway, "cached_tokens")
    spent = sum(sum(r.stats.cost_usd.values()) for r in gateway if r.stats is not None)
    figures.add_row(
        "LLM gateway",
        f"{_sum(gateway, 'requests'):,.0f} requests · {_sum(gateway, 'upstream_calls'):,.0f} upstream · "
        f"{_sum(gateway, 'queued'):,.0f} queued · {_sum(gateway, 'busy'):,.0f} busy · "
        f"prompt tokens from cache {cached / prompt_tokens if prompt_tokens else 0:.0%} · "
        f"${spent:,.4f} spent",
    )
    t = snapshot.traffic
    if t is None:
        figures.add_row("traffic", Text("no data (analytics sink unreachable)", style="yellow"))
    else:
        p95 = "n/a" if t.p95_latency_ms is None else f"{t.p95_latency_ms:,.1f} ms"
        slow = t.p95_latency_ms is not None and t.p95_latency_ms > limits.p95_latency_ms_alert
        failing = t.error_rate > limits.error_rate_alert
        figures.add_row(
            f"last {t.window_seconds:,.0f} s",
            Text.assemble(
                f"{t.messages + t.errors:,.0f} messages · p95 latency ",
                (p95, "bold red" if slow else ""),
                " · error rate ",
                (f"{t.error_rate:.1%}", "bold red" if failing else ""),
                f" · {t.rate_limited:,.0f} rate-limited",
            ),
        )

    parts: list[Any] = [services]
    if snapshot.frontends:
        parts.append(frontends_table(snapshot.frontends))
    parts.append(figures)
    taken = datetime.fromtimestamp(snapshot.taken_at, UTC).strftime("%H:%M:%S UTC")
    if snapshot.alerts:
        banner = Panel(
            Text("\n".join(f"ALERT {a}" for a in snapshot.alerts), style="bold red"),
            title=f"raycord status · {taken}",
            border_style="red",
        )
    else:
        banner = Panel(Text("all services healthy", style="green"), title=f"raycord status · {taken}")
    return Group(banner, *parts)


def _latency(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms:,.1f} ms"


def frontends_table(frontends: dict[str, FrontendStatus | str]) -> Table:
    """One row per front-end actor: where it runs, its shards with their gateway latency."""
    table = Table(title="Discord front-ends", expand=True)
    for column in ("front-end", "node", "shards", "connected", "gateway latency", "restarted", "up for"):
        table.add_column(column, justify="right" if column in ("restarted", "up for") else "left")
    for name, front in frontends.items():
        if isinstance(front, str):
            table.add_row(name, Text(f"DOWN {front}"), "", "", "", "", "", style="bold red")
            continue
        connected = sum(s.connected for s in front.shards)
        healthy = front.error is None and connected == len(front.shards)
        table.add_row(
            name,
            f"{front.node_ip} {front.node_id[:8]}",
            f"{', '.join(str(s.shard_id) for s in front.shards)} of {front.shard_count}",
            f"{connected}/{len(front.shards)}" + ("" if front.ready else " (starting)"),
            " · ".join(f"{s.shard_id}: {_latency(s.latency_ms)}" for s in front.shards),
            "yes" if front.restarted else "no",
            f"{front.uptime_seconds:,.0f} s",
            style=None if healthy else "bold red",
        )
    return table


def no_services(snapshot: Snapshot, settings: Settings) -> NoBotFound | None:
    """An error when the cluster runs none of raycord's services in our namespace."""
    if any(r.up or r.error != "not running" for r in snapshot.replicas):
        return None
    return NoBotFound(
        f"no raycord services in namespace {settings.namespace!r} on this Ray cluster.\n"
        "Start the bot with `raycord run`, or set RAYCORD_NAMESPACE to the namespace it runs in."
    )


async def run_status(settings: Settings, *, once: bool = False, console: Console | None = None) -> int:
    """Render the dashboard once, or live until interrupted. Returns the exit code.

    Raises:
        NoBotFound: no bot runs where the settings point, or none of its services do.
    """
    console = console or Console()
    attach(settings)
    snapshot = await collect(settings)
    missing = no_services(snapshot, settings)
    if missing is not None:
        raise missing
    if once:
        console.print(render(snapshot, settings))
        return 0
    with Live(render(snapshot, settings), console=console, screen=False, auto_refresh=False) as live:
        try:
            while True:
                await asyncio.sleep(settings.status.refresh_seconds)
                live.update(render(await collect(settings), settings), refresh=True)
        except (KeyboardInterrupt, asyncio.CancelledError):
            pass
    return 0
