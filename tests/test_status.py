"""`raycord status`: the figures it shows are the services' own, and crossed thresholds alert."""

from __future__ import annotations

import io
import os

import pytest
from rich.console import Console

from actors.errors import RateLimited
from actors.schemas import IncomingMessage
from bot.cli import main
from bot.config import Settings, StatusSettings
from bot.llm.gateway import GatewayClient
from bot.pipeline import ChatPipeline
from bot.runtime import Runtime
from bot.status import collect, render, run_status


def _text(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=220, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def _msg(user: str, text: str) -> IncomingMessage:
    return IncomingMessage(text=text, user_id=user, scope=f"dm:{user}", channel_id="c-status")


async def _traffic(pipeline: ChatPipeline, user: str) -> None:
    """Answered messages, one cache hit, and a rate-limited user."""
    for text in ("status one", "status two", "status one"):
        await pipeline.handle(_msg(user, text))
    heavy = f"{user}-heavy"
    with pytest.raises(RateLimited):
        for i in range(pipeline.settings.ratelimit.message.minute + 1):
            await pipeline.handle(_msg(heavy, f"spam {i}"))


@pytest.mark.asyncio
async def test_once_shows_the_services_figures(runtime: Runtime, pipeline: ChatPipeline, user: str) -> None:
    await _traffic(pipeline, user)
    await runtime.flush()
    settings = runtime.settings
    snapshot = await collect(settings)
    cache = await runtime.clients["cache"].stats()  # type: ignore[attr-defined]
    limiter = await runtime.clients["ratelimit"].stats()  # type: ignore[attr-defined]
    sink = await runtime.clients["analytics"].stats()  # type: ignore[attr-defined]
    gateway = await runtime.client("llm", GatewayClient).stats()

    assert all(r.up and r.error is None for r in snapshot.replicas)
    assert {(r.service, r.shard) for r in snapshot.replicas} == {
        (name, shard) for name, handles in runtime.handles.items() for shard in range(len(handles))
    }
    # every replica reports its own process: the pid and memory the dashboard shows are real
    assert all(r.health is not None and r.health.pid != os.getpid() for r in snapshot.replicas)
    assert all(r.health is not None and r.health.rss_bytes > 10 * 2**20 for r in snapshot.replicas)
    assert snapshot.traffic is not None and snapshot.traffic.messages >= 3
    assert snapshot.traffic.p95_latency_ms is not None and snapshot.traffic.p95_latency_ms > 0
    assert snapshot.alerts == []

    out = _text(render(snapshot, settings))
    hits, misses = sum(s.hits for s in cache), sum(s.misses for s in cache)
    assert f"hit rate {hits / (hits + misses):.1%} ({hits:,} hits, {misses:,} misses)" in out
    assert f"{sum(s.entries for s in cache):,} entries" in out
    allowed, denied = sum(s.allowed for s in limiter), sum(s.denied for s in limiter)
    assert f"{allowed:,} allowed · {denied:,} denied" in out
    assert denied >= 1
    assert f"{sum(s.committed for s in sink):,} committed" in out
    assert f"{sum(s.pending for s in sink):,} queued" in out
    assert f"{sum(s.requests for s in gateway):,} requests" in out and "spent" in out
    assert "all services healthy" in out
    for r in snapshot.replicas:
        assert f"{r.service}-{r.shard}" in out and str(r.health.pid) in out  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_crossed_thresholds_raise_alerts(runtime: Runtime, pipeline: ChatPipeline, user: str) -> None:
    await pipeline.handle(_msg(user, "anything slow?"))
    await runtime.flush()
    strict = runtime.settings.model_copy(
        update={
            "status": StatusSettings(p95_latency_ms_alert=0.001, memory_mb_alert=1.0, error_rate_alert=0.5)
        }
    )
    snapshot = await collect(strict)
    out = _text(render(snapshot, strict))

    assert any(a.startswith("p95 latency") for a in snapshot.alerts)
    assert sum("MB (alert above 1 MB)" in a for a in snapshot.alerts) == len(snapshot.replicas)
    assert not any(a.startswith("error rate") for a in snapshot.alerts)
    assert "ALERT p95 latency" in out
    assert "all services healthy" not in out


@pytest.mark.asyncio
async def test_a_missing_service_is_shown_down(runtime: Runtime) -> None:
    elsewhere = runtime.settings.model_copy(update={"namespace": "no-such-raycord"})
    snapshot = await collect(elsewhere)
    assert not any(r.up for r in snapshot.replicas)
    assert snapshot.traffic is None
    out = _text(render(snapshot, elsewhere))
    assert "DOWN not running" in out
    assert "ALERT cache-0 is down: not running" in out


@pytest.mark.asyncio
async def test_run_status_once_renders_and_exits_zero(runtime: Runtime) -> None:
    console = Console(file=io.StringIO(), width=220, color_system=None)
    assert await run_status(runtime.settings, once=True, console=console) == 0
    assert "Services" in console.file.getvalue()  # type: ignore[attr-defined]


def test_cli_status_once(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`raycord status --once` in a process already joined to the cluster: exit code 0,
    the dashboard on stdout, every replica of the runtime's namespace listed."""
    settings: Settings = runtime.settings
    monkeypatch.setenv("RAYCORD_NAMESPACE", settings.namespace)
    assert main(["status", "--once", "--state-dir", str(settings.state_dir)]) == 0
    out = capsys.readouterr().out
    assert "raycord status" in out
    for name in runtime.handles:
        assert f"{name}-0" in out


@pytest.mark.asyncio
async def test_memory_is_shown_as_rss_pss_and_uss_for_replicas_on_this_machine(runtime: Runtime) -> None:
    snapshot = await collect(runtime.settings)
    out = _text(render(snapshot, runtime.settings))
    assert "RSS / PSS / USS" in out
    for r in snapshot.replicas:
        assert r.memory is not None and r.health is not None
        # RSS counts shared libraries in every process; PSS splits them; USS is the process's own
        assert 0 < r.memory.uss <= r.memory.pss
        shown = f"{r.memory.rss / 2**20:,.1f} / {r.memory.pss / 2**20:,.1f} / {r.memory.uss / 2**20:,.1f} MB"
        assert shown in out
