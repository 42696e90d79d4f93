"""Soak on the injected clock: 10k users over a simulated day, RSS sampled per hour.

The real service classes run in this process behind `LocalHandle`s (the same client
code the bot uses, minus the Ray hop), all on one fake clock, so a day passes in
minutes and each service's maintenance (cleanup, expiry, flush) runs as it would.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from actors.analytics import AnalyticsClient, AnalyticsSink
from actors.cache import CacheClient, ResponseCache
from actors.context import ContextClient, ContextStore
from actors.ratelimit import RateLimitClient, RateLimitConfig, RateLimiter, WindowLimits
from actors.schemas import IncomingMessage
from bench.common import RESULTS_DIR, rss_bytes, write_results
from bot.config import Settings
from bot.llm.offline import OfflineResponder
from bot.pipeline import ChatPipeline


class _LocalMethod:
    def __init__(self, fn: Callable[..., Awaitable[Any]]) -> None:
        self.remote = fn


class LocalHandle:
    """An in-process stand-in for an actor handle: `h.method.remote(...)` awaits the method."""

    def __init__(self, target: object) -> None:
        self._target = target

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._target, name))


class SimClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


async def _while_time_passes(clock: SimClock, work: Awaitable[Any], tick: float = 1.0) -> None:
    """Await `work` while simulated time moves on, so age-based flushes can happen."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=0.05)
        clock.now += tick
    task.result()


async def soak(
    users: int, hours: float, messages_per_user_day: float, state_dir: Path, seed: int = 11
) -> dict[str, Any]:
    clock = SimClock()
    generous = WindowLimits(minute=1000, hour=10_000, day=100_000)
    settings = Settings(
        state_dir=state_dir,
        dashboard=False,
        discord_token=None,
        gemini_api_key=None,
        ratelimit=RateLimitConfig(message=generous, command=generous),
    )
    services = {
        "cache": ResponseCache(settings.cache, state_dir, 0, clock=clock),
        "context": ContextStore(settings.context, state_dir, 0, clock=clock),
        "ratelimit": RateLimiter(settings.ratelimit, state_dir, 0, clock=clock),
        "analytics": AnalyticsSink(settings.analytics, state_dir, 0, clock=clock),
    }
    pipeline = ChatPipeline(
        settings,
        cache=CacheClient([LocalHandle(services["cache"])]),
        context=ContextClient([LocalHandle(services["context"])]),
        limiter=RateLimitClient([LocalHandle(services["ratelimit"])]),
        analytics=AnalyticsClient([LocalHandle(services["analytics"])], settings.analytics),
        llm=OfflineResponder(),
        clock=clock,
    )
    rng = random.Random(seed)
    step = 60.0  # one simulated minute per step
    per_step = users * messages_per_user_day * step / 86400
    samples: list[dict[str, float]] = []
    steps = int(hours * 3600 / step)
    # churn: each simulated hour a tenth of the population is replaced by new users
    population = list(range(users))
    next_user = users
    for i in range(steps):
        clock.now += step
        sends = int(per_step) + (1 if rng.random() < per_step % 1 else 0)
        for _ in range(sends):
            u = rng.choice(population)
            await pipeline.handle(
                IncomingMessage(
                    text=f"topic {rng.randint(0, 500)} please",
                    user_id=f"soak-{u}",
                    scope=f"channel:{u % 50}",
                    server_id=f"server-{u % 10}",
                )
            )
        await pipeline.writes.drain(None)
        for svc in services.values():
            await svc.maintain()
        if i % 60 == 59:
            for _ in range(users // 10):
                population[rng.randrange(users)] = next_user
                next_user += 1
            await _while_time_passes(clock, pipeline.analytics.flush())
            gc.collect()
            samples.append({"hour": (i + 1) / 60, "rss_mb": rss_bytes() / 2**20})
    await _while_time_passes(clock, pipeline.drain(None))
    for svc in services.values():
        await svc.close()
    return {
        "users": users,
        "hours": hours,
        "messages_per_user_day": messages_per_user_day,
        "rss_by_hour": samples,
    }


def run(size: str = "full", results_dir: Path | None = None) -> dict[str, Any]:
    users, hours, rate = (10_000, 24.0, 5.0) if size == "full" else (100, 2.0, 40.0)
    with tempfile.TemporaryDirectory(prefix="raycord-soak-") as tmp:
        result = asyncio.run(soak(users, hours, rate, Path(tmp)))
    series = [s["rss_mb"] for s in result["rss_by_hour"]]
    later = series[len(series) // 4 :] or series
    result["rss_growth_after_first_quarter_mb"] = (later[-1] - later[0]) if later else 0.0
    write_results(f"soak-{size}", result, results_dir or RESULTS_DIR)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    result = run(parser.parse_args(argv).size)
    for s in result["rss_by_hour"]:
        print(f"hour {s['hour']:5.1f}  rss {s['rss_mb']:7.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
