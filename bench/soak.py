"""Soak on the injected clock: 10k users over a simulated day, RSS of every process
(the driver and each service actor) sampled per simulated hour.

The bot's real runtime runs on Ray; each actor's clock is swapped for a simulated one
(through `__ray_call__`) that the driver moves on a minute at a time, and each actor's
maintenance (cleanup, expiry, flush) is run after every simulated minute, so a day
passes in minutes and memory shows whatever a day of state would leave behind.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sys
import tempfile
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from actors.cache import CacheConfig
from actors.context import ContextConfig
from actors.ratelimit import RateLimitConfig, WindowLimits
from actors.schemas import IncomingMessage
from bench import floors
from bench.common import RESULTS_DIR, rss_bytes, write_results
from bot.config import Settings
from bot.llm.offline import OfflineResponder
from bot.status import process_memory


class SimClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _set_sim_time(service: Any, now: float) -> int:
    """Runs inside an actor: the first call swaps its clock for a `SimClock`."""
    clock = service.clock
    if not isinstance(clock, SimClock):
        clock = service.clock = SimClock(now)
    clock.now = now
    return os.getpid()


class SimulatedTime:
    """One simulated time for the driver and every actor of a runtime."""

    def __init__(self, handles: list[Any]) -> None:
        self.clock = SimClock()
        self.handles = handles

    async def advance(self, seconds: float) -> list[int]:
        """Move time on everywhere; returns the actors' pids."""
        self.clock.now += seconds
        return list(
            await asyncio.gather(
                *(h.__ray_call__.remote(_set_sim_time, self.clock.now) for h in self.handles)
            )
        )

    async def while_passing(self, work: Awaitable[Any], tick: float = 1.0) -> None:
        """Await `work` while time moves on, so age-based flushes can happen."""
        task = asyncio.ensure_future(work)
        while not task.done():
            await asyncio.wait({task}, timeout=0.05)
            await self.advance(tick)
        task.result()


async def soak(
    users: int,
    hours: float,
    messages_per_user_day: float,
    state_dir: Path,
    seed: int = 11,
    step: float = 60.0,
    cache_entries: int = 20_000,
    context_budget_bytes: int = 16 * 2**20,
) -> dict[str, Any]:
    """`step` is the simulated seconds between two rounds of messages and maintenance."""
    from bot.runtime import Runtime

    generous = WindowLimits(minute=1000, hour=10_000, day=100_000)
    settings = Settings(
        state_dir=state_dir,
        namespace=f"soak-{uuid.uuid4().hex[:8]}",
        dashboard=False,
        discord_token=None,
        gemini_api_key=None,
        ratelimit=RateLimitConfig(message=generous, command=generous),
        # bounds a day of this traffic reaches by mid-day, so the second half shows
        # whether memory stays flat once the bounded state is full
        cache=CacheConfig(max_entries=cache_entries),
        context=ContextConfig(memory_budget_bytes=context_budget_bytes),
    )
    runtime = Runtime(settings, llm=OfflineResponder())
    pipeline = await runtime.start(num_cpus=2, include_dashboard=False)
    labelled = [(f"{name}-{i}", h) for name, hs in runtime.handles.items() for i, h in enumerate(hs)]
    time = SimulatedTime([h for _, h in labelled])
    actor_pids = await time.advance(0)
    pids = {
        "driver": os.getpid(),
        **{label: pid for (label, _), pid in zip(labelled, actor_pids, strict=True)},
    }
    # the front-end's own clocks follow the simulated time too
    pipeline.clock = time.clock
    runtime.clients["analytics"].clock = time.clock  # type: ignore[attr-defined]
    rng = random.Random(seed)
    per_hour = round(3600 / step)
    per_step = users * messages_per_user_day * step / 86400
    samples: list[dict[str, Any]] = []
    steps = int(hours * 3600 / step)
    # churn: each simulated hour a tenth of the population is replaced by new users
    population = list(range(users))
    next_user = users
    try:
        for i in range(steps):
            await time.advance(step)
            sends = int(per_step) + (1 if rng.random() < per_step % 1 else 0)
            chosen = [rng.choice(population) for _ in range(sends)]
            await asyncio.gather(
                *(
                    pipeline.handle(
                        IncomingMessage(
                            text=f"topic {rng.randint(0, 500)} please",
                            user_id=f"soak-{u}",
                            scope=f"channel:{u % 50}",
                            server_id=f"server-{u % 10}",
                        )
                    )
                    for u in chosen
                )
            )
            await pipeline.writes.drain(None)
            await asyncio.gather(*(h.maintain.remote() for h in time.handles))
            if i % per_hour == per_hour - 1:
                for _ in range(users // 10):
                    population[rng.randrange(users)] = next_user
                    next_user += 1
                await time.while_passing(pipeline.analytics.flush())
                gc.collect()
                (cache,) = await runtime.clients["cache"].stats()  # type: ignore[attr-defined]
                (context,) = await runtime.clients["context"].stats()  # type: ignore[attr-defined]
                samples.append(
                    {
                        "hour": (i + 1) / per_hour,
                        "rss_mb": {label: rss_bytes(pid) / 2**20 for label, pid in pids.items()},
                        # RSS counts shared libraries in every process; PSS splits them, USS
                        # is what only this process holds
                        **_shares_mb(pids),
                        # the state the memory holds, to tell a full bound from a leak
                        "cache_entries": cache.entries,
                        "context_conversations_in_memory": context.conversations,
                        "context_bytes": context.bytes,
                    }
                )
        await time.while_passing(pipeline.drain(None))
    finally:
        await runtime.shutdown(kill_actors=True)
    return {
        "users": users,
        "hours": hours,
        "messages_per_user_day": messages_per_user_day,
        "step_seconds": step,
        "cache_max_entries": cache_entries,
        "context_memory_budget_bytes": context_budget_bytes,
        "rss_by_hour": samples,
    }


def _shares_mb(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    """{"pss_mb": {process: MiB}, "uss_mb": {...}} of the processes still readable."""
    memory = {label: process_memory(pid) for label, pid in pids.items()}
    return {
        "pss_mb": {label: m.pss / 2**20 for label, m in memory.items() if m is not None},
        "uss_mb": {label: m.uss / 2**20 for label, m in memory.items() if m is not None},
    }


def run(size: str = "full", results_dir: Path | None = None) -> dict[str, Any]:
    # full: a message round every 5 simulated minutes (~170 messages at once, as a busy
    # bot sees them); tiny: every minute, so its two hours still sample twice
    users, hours, rate, step = (10_000, 24.0, 5.0, 300.0) if size == "full" else (100, 2.0, 40.0, 60.0)
    with floors.watch(size) as watch, tempfile.TemporaryDirectory(prefix="raycord-soak-") as tmp:
        result = asyncio.run(soak(users, hours, rate, Path(tmp), step=step))
    result["floors"] = watch.result
    samples = result["rss_by_hour"]
    # growth per process over the second half of the day, once the bounded state is full
    later = samples[len(samples) // 2 - 1 :] if len(samples) > 1 else samples
    result["rss_growth_second_half_mb"] = (
        {label: later[-1]["rss_mb"][label] - later[0]["rss_mb"][label] for label in later[0]["rss_mb"]}
        if later
        else {}
    )
    write_results(f"soak-{size}", result, results_dir or RESULTS_DIR)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    result = run(parser.parse_args(argv).size)
    print("\n".join(floors.header(result["floors"])))
    for s in result["rss_by_hour"]:
        per_process = "  ".join(
            f"{label} {mb:6.1f}/{s['pss_mb'].get(label, 0):6.1f}/{s['uss_mb'].get(label, 0):6.1f}"
            for label, mb in s["rss_mb"].items()
        )
        print(
            f"hour {s['hour']:5.1f}  RSS/PSS/USS MiB: {per_process}  cache entries {s['cache_entries']}"
            f"  conversations in memory {s['context_conversations_in_memory']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
