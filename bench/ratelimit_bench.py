"""Rate-limiter benchmark: the plan's JSON-file "before", the `limits` library, and ours.

Ours runs in-process and through the Ray actor at 1, 10 and 100 concurrent callers
(durable decisions included); memory per user, and how much of an ideal sliding log's
admissions the bucketed windows give, are measured in the same run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import limits
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from actors.ratelimit import USER_WINDOWS, RateLimitClient, RateLimitConfig, RateLimiter, WindowLimits
from bench import floors
from bench.common import ratio, size_cli, summarize_ms, write_results
from bench.pgserver import StateBackends

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"checks": 300, "users": 100, "memory_users": (1_000, 10_000), "trace": 2_000},
    "full": {"checks": 5_000, "users": 1_000, "memory_users": (10_000, 1_000_000), "trace": 50_000},
}
CONCURRENCY = (1, 10, 100)
#: high limits, so every check is allowed and so written durably (the expensive path)
OPEN = WindowLimits(minute=10**9, hour=10**9, day=10**9)
LIMITS = {"minute": 10, "hour": 100, "day": 500}


class JsonFileLimiter:
    """The optimization plan's "before": a sliding log per user in one JSON state file,
    read, updated and rewritten (with fsync) on every check."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fsyncs = 0
        path.write_text("{}")

    def check(self, user: str, kind: str, now: float) -> bool:
        state: dict[str, list[float]] = json.loads(self.path.read_text())
        log = [t for t in state.get(f"{user}:{kind}", []) if t > now - 86400]
        for name, seconds in USER_WINDOWS:
            if sum(1 for t in log if t > now - seconds) >= LIMITS[name]:
                return False
        log.append(now)
        state[f"{user}:{kind}"] = log
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        self.fsyncs += 1
        os.replace(tmp, self.path)
        return True


def bench_before(checks: int, users: int, workdir: Path) -> dict[str, Any]:
    limiter = JsonFileLimiter(workdir / "ratelimit-state.json")
    samples = []
    start = time.perf_counter()
    for i in range(checks):
        t0 = time.perf_counter()
        limiter.check(f"u{i % users}", "message", time.time())
        samples.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return {
        **summarize_ms(samples),
        "checks_per_s": checks / elapsed,
        "fsyncs_per_1000": 1000 * limiter.fsyncs / checks,
    }


def bench_limits_library(checks: int, users: int) -> dict[str, Any]:
    items = [limits.parse(f"{LIMITS[name]}/{name}") for name, _ in USER_WINDOWS]
    out: dict[str, Any] = {}
    for label, strategy in (
        ("moving_window", MovingWindowRateLimiter),
        ("sliding_window_counter", SlidingWindowCounterRateLimiter),
    ):
        limiter = strategy(MemoryStorage())
        samples = []
        start = time.perf_counter()
        for i in range(checks):
            user = f"u{i % users}"
            t0 = time.perf_counter()
            if all(limiter.test(item, user, "message") for item in items):
                for item in items:
                    limiter.hit(item, user, "message")
            samples.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        out[label] = {**summarize_ms(samples), "checks_per_s": checks / elapsed, "durable": False}
    return out


async def _drive(check: Any, checks: int, concurrency: int, users: int) -> tuple[list[float], float]:
    """`checks` calls of `check(user)` from `concurrency` closed-loop callers."""
    samples: list[float] = []
    per_caller = max(1, checks // concurrency)

    async def caller(n: int) -> None:
        for i in range(per_caller):
            t0 = time.perf_counter()
            await check(f"u{(n * per_caller + i) % users}")
            samples.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(concurrency)))
    return samples, time.perf_counter() - start


def _row(samples: list[float], elapsed: float, commits: int, syncs: int) -> dict[str, Any]:
    return {
        **summarize_ms(samples),
        "checks_per_s": len(samples) / elapsed,
        "commits_per_1000": 1000 * commits / len(samples),
        # the store's own count (RateLimitStats.syncs): FULL syncs each commit, NORMAL once a second
        "fsyncs_per_1000": 1000 * syncs / len(samples),
    }


def bench_fsync_floor(workdir: Path, samples: int = 100) -> dict[str, Any]:
    """One small write + fsync on the same disk: the least a FULL-durable check can cost."""
    times = []
    with open(workdir / "fsync-probe", "wb") as f:
        for _ in range(samples):
            f.write(b"x" * 128)
            f.flush()
            t0 = time.perf_counter()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - t0)
    return summarize_ms(times)


async def bench_in_process(checks: int, users: int, workdir: Path) -> dict[str, Any]:
    """The plain class on a durable (FULL) SQLite file: group commit without Ray's round trip."""
    out = {}
    for concurrency in CONCURRENCY:
        limiter = RateLimiter(
            RateLimitConfig(message=OPEN, synchronous="FULL"), workdir / f"inproc-{concurrency}"
        )
        samples, elapsed = await _drive(limiter.check, checks, concurrency, users)
        stats = await limiter.stats()
        out[str(concurrency)] = _row(samples, elapsed, stats.commits, stats.syncs)
        await limiter.close()
    return out


async def bench_state_backends(checks: int, users: int, workdir: Path) -> dict[str, Any]:
    """The plain class on each state backend side by side: SQLite (FULL) in the state
    directory, and PostgreSQL on loopback (a server started for the run). Check latency
    and commits per second at 1, 10 and 100 callers, every check a durable allowance."""
    out: dict[str, Any] = {}
    with StateBackends(workdir) as backends:
        for backend in backends.names:
            rows = {}
            for concurrency in CONCURRENCY:
                location = await backends.fresh(backend, f"rl_{concurrency}")
                limiter = RateLimiter(RateLimitConfig(message=OPEN), location)
                samples, elapsed = await _drive(limiter.check, checks, concurrency, users)
                commits = (await limiter.stats()).commits
                rows[str(concurrency)] = {
                    **_row(samples, elapsed, commits, True),
                    "commits_per_s": commits / elapsed,
                }
                await limiter.close()
            out[backend] = rows
        out["skipped"] = backends.skipped
    return out


async def bench_actor(checks: int, users: int, workdir: Path) -> dict[str, Any]:
    """Through the Ray actor, as the pipeline calls it, in both sync modes."""
    import ray

    from bot.config import Settings
    from bot.runtime import SERVICES, init_ray, service_handles

    spec = next(s for s in SERVICES if s.name == "ratelimit")
    out: dict[str, Any] = {}
    owns_ray = False
    try:
        for mode in ("FULL", "NORMAL"):
            settings = Settings(
                state_dir=workdir / f"actor-{mode}",
                namespace=f"bench-{uuid.uuid4().hex[:8]}",
                dashboard=False,
                ratelimit=RateLimitConfig(message=OPEN, synchronous=mode),
            )
            owns_ray = init_ray(settings, num_cpus=2, include_dashboard=False) or owns_ray
            handles = service_handles(settings, spec)
            client = RateLimitClient(handles)
            try:
                await client.check("warm-up")
                rows = {}
                for concurrency in CONCURRENCY:
                    before = (await client.stats())[0]
                    samples, elapsed = await _drive(client.check, checks, concurrency, users)
                    after = (await client.stats())[0]
                    rows[str(concurrency)] = _row(
                        samples, elapsed, after.commits - before.commits, after.syncs - before.syncs
                    )
                out[mode] = rows
            finally:
                for handle in handles:
                    ray.kill(handle, no_restart=True)
    finally:
        if owns_ray:
            ray.shutdown()
    return out


def _traced_bytes(fill: Any) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        keep = fill()
        after = tracemalloc.get_traced_memory()[0]
        del keep
        return after - before
    finally:
        tracemalloc.stop()


def bench_memory(user_counts: tuple[int, ...]) -> dict[str, Any]:
    """Bytes of in-memory state per user after one message each (the SQLite copy is on disk)."""
    out: dict[str, Any] = {}
    now_us = round(time.time() * 1_000_000)
    for users in user_counts:

        def fill(users: int = users) -> RateLimiter:
            limiter = RateLimiter(RateLimitConfig())
            for i in range(users):
                # `_decide` is the whole in-memory side of a check; the write is left out
                limiter._decide(limiter._targets(f"user-{i:08d}", "message", None), now_us)
            return limiter

        used = _traced_bytes(fill)
        out[f"ours_{users}"] = {"bytes": used, "mb": used / 2**20, "bytes_per_user": used / users}
    small = user_counts[0]
    items = [limits.parse(f"{LIMITS[name]}/{name}") for name, _ in USER_WINDOWS]
    for label, strategy in (
        ("limits_moving_window", MovingWindowRateLimiter),
        ("limits_sliding_window_counter", SlidingWindowCounterRateLimiter),
    ):

        def fill_limits(strategy: Any = strategy) -> Any:
            storage = MemoryStorage()
            limiter = strategy(storage)
            for i in range(small):
                for item in items:
                    limiter.hit(item, f"user-{i:08d}", "message")
            return storage

        used = _traced_bytes(fill_limits)
        out[f"{label}_{small}"] = {"bytes": used, "mb": used / 2**20, "bytes_per_user": used / small}
    return out


def bench_precision(requests: int) -> dict[str, Any]:
    """Admitted requests vs an ideal sliding log on one bursty trace (minute limit 10):
    ours never admits more than the log allows in any window, and gives up a little."""
    rng = random.Random(7)
    times, t = [], 0
    for _ in range(requests):
        t += rng.choice((rng.randint(0, 500_000), rng.randint(0, 20_000_000)))
        times.append(t)
    admitted: list[int] = []
    low = 0
    for now in times:
        while low < len(admitted) and admitted[low] <= now - 60_000_000:
            low += 1
        if len(admitted) - low < 10:
            admitted.append(now)
    out: dict[str, Any] = {"ideal_sliding_log": len(admitted), "requests": requests}
    big = WindowLimits(minute=10, hour=10**6, day=10**6)
    base_us = 1_700_000_000 * 1_000_000
    for buckets in (10, 20, 60):
        limiter = RateLimiter(RateLimitConfig(message=big, buckets=buckets))
        ours = 0
        for now in times:
            now_us = base_us + now
            decision, _ = limiter._decide(limiter._targets("u", "message", None), now_us)
            ours += decision.allowed
        out[f"buckets_{buckets}"] = {"admitted": ours, "share_of_ideal": ours / len(admitted)}
    return out


def run(size: str = "full", results_dir: Path | None = None) -> dict[str, Any]:
    spec = SIZES[size]
    checks, users = spec["checks"], spec["users"]
    with floors.watch(size) as watch, tempfile.TemporaryDirectory(prefix="ratelimit-bench-") as tmp:
        workdir = Path(tmp)
        before = bench_before(min(checks, 2_000), users, workdir)
        library = bench_limits_library(checks, users)
        in_process = asyncio.run(bench_in_process(checks, users, workdir))
        actor = asyncio.run(bench_actor(checks, users, workdir))
        fsync_floor = bench_fsync_floor(workdir)
        state_backends = asyncio.run(bench_state_backends(checks, users, workdir))
    memory = bench_memory(spec["memory_users"])
    precision = bench_precision(spec["trace"])
    at_100 = actor["FULL"]["100"]
    results: dict[str, Any] = {
        "size": size,
        "before_json_file": before,
        "limits_library_in_memory": library,
        "ours_in_process": in_process,
        "ours_actor": actor,
        "fsync_floor": fsync_floor,
        "state_backends": state_backends,
        "memory": memory,
        "precision": precision,
        "ratios": {
            "actor_100_p50_vs_before_p50": ratio(at_100["p50_ms"], before["p50_ms"]),
            "actor_100_throughput_vs_before": at_100["checks_per_s"] / before["checks_per_s"],
            "fsync_reduction_vs_before": 1 - at_100["fsyncs_per_1000"] / before["fsyncs_per_1000"],
            "actor_100_normal_p50_vs_before_p50": ratio(actor["NORMAL"]["100"]["p50_ms"], before["p50_ms"]),
        },
        "targets": {
            "actor_100_p50_ms_under_5": at_100["p50_ms"] < 5,
            "actor_100_normal_p50_ms_under_5": actor["NORMAL"]["100"]["p50_ms"] < 5,
            "fsyncs_per_1000_at_most_20": at_100["fsyncs_per_1000"] <= 20,
            "mb_for_10k_users_under_10": memory.get("ours_10000", {"mb": 0})["mb"] < 10,
        },
    }
    results["floors"] = watch.result
    write_results("ratelimit_bench", results, results_dir)
    return results


def main() -> None:
    size_cli(run, __doc__, SIZES)


if __name__ == "__main__":
    main()
