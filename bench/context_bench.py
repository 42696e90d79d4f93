"""ContextStore benchmarks against the optimization plan's design, side by side in one run.

`build()` on a cache hit and a miss; memory per conversation at two sizes; a simulated
day with user churn on the injected clock sampling RSS; cleanup cost against the number
of stale entries. The "before" is the plan's design: a 5-minute TTL context cache and an
hourly full scan over every conversation. Append latency and commits per second at 1, 10
and 100 callers, on SQLite and on PostgreSQL on loopback side by side.

    python -m bench.context_bench [--size tiny|full]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from actors.context import DAY, BuiltContext, ContextConfig, ContextStore, assemble
from actors.schemas import Turn
from bench import floors
from bench.common import ratio, rss_bytes, summarize_ms, write_results
from bench.pgserver import StateBackends

NAME = "context_bench"
HOUR = 3600.0

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "build_conversations": 50,
        "build_samples": 60,
        "memory_sizes": (200, 1_000),
        "day_step_minutes": 15,
        "day_messages_per_step": 5,
        "day_active_users": 100,
        "day_stale_hours": 2.0,
        "day_budget_bytes": 64 * 1024,
        "cleanup_kept": 300,
        "cleanup_stale": (10, 50, 200),
        "backend_appends": 150,
    },
    "full": {
        "build_conversations": 5_000,
        "build_samples": 2_000,
        "memory_sizes": (10_000, 100_000),
        "day_step_minutes": 2,
        "day_messages_per_step": 30,
        "day_active_users": 2_000,
        "day_stale_hours": 2.0,
        "day_budget_bytes": 2 * 2**20,
        "cleanup_kept": 20_000,
        "cleanup_stale": (100, 1_000, 10_000),
        "backend_appends": 3_000,
    },
}

TURNS_PER_CONVERSATION = 4
TEXT = "a typical chat line of about one hundred characters, give or take a few, to fill a window turn. "


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TTLContextStore:
    """The plan's ContextManager: per-turn objects, a built-context cache with a 5-minute
    TTL (expired entries swept when it holds over 1000), stale cleanup by a full scan."""

    def __init__(self, clock: Callable[[], float], max_turns: int = 20, max_chars: int = 8_000) -> None:
        self.clock = clock
        self.max_turns = max_turns
        self.max_chars = max_chars
        self.ttl = 300.0
        self.conversations: dict[str, dict[str, Any]] = {}
        self.cache: dict[str, tuple[BuiltContext, float]] = {}

    def append(self, key: str, turns: list[Turn]) -> None:
        conv = self.conversations.setdefault(key, {"turns": [], "last_interaction": 0.0})
        conv["turns"].extend(t.model_dump() for t in turns)
        while (
            len(conv["turns"]) > self.max_turns or sum(len(t["text"]) for t in conv["turns"]) > self.max_chars
        ):
            conv["turns"].pop(0)
        conv["last_interaction"] = self.clock()

    def build(self, key: str) -> BuiltContext:
        now = self.clock()
        cached = self.cache.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        conv = self.conversations.get(key, {"turns": []})
        built = assemble(tuple((t["role"], t["author"], t["text"]) for t in conv["turns"]), 0)
        self.cache[key] = (built, now + self.ttl)
        if len(self.cache) > 1000:
            for k in [k for k, (_, exp) in self.cache.items() if exp <= now]:
                del self.cache[k]
        return built

    def cleanup(self, stale_after: float) -> int:
        cutoff = self.clock() - stale_after
        doomed = [k for k, c in self.conversations.items() if c["last_interaction"] < cutoff]
        for k in doomed:
            del self.conversations[k]
        return len(doomed)


def _turns(clock: Clock, tag: str) -> list[Turn]:
    return [
        Turn(
            role="user" if i % 2 == 0 else "model",
            author="someone" if i % 2 == 0 else "raycord",
            text=f"{tag} {i} {TEXT}",
            time=clock(),
        )
        for i in range(TURNS_PER_CONVERSATION)
    ]


def _quiet(store: ContextStore) -> ContextStore:
    """The benchmark calls `maintain()` itself, at the moments it measures."""
    store.maintenance_interval = 10 * DAY
    return store


async def _fill(store: ContextStore, keys: list[tuple[str, str]], clock: Clock, batch: int = 1_000) -> None:
    """Append to many conversations, `batch` at a time so they share group commits."""
    for start in range(0, len(keys), batch):
        await asyncio.gather(*(store.append(s, u, _turns(clock, s)) for s, u in keys[start : start + batch]))


# --- append on each state backend ---

BACKEND_CALLERS = (1, 10, 100)


async def _append_from(
    store: ContextStore, callers: int, per_caller: int, clock: Clock
) -> tuple[list[float], float]:
    """`per_caller` appends of two turns from each of `callers` closed-loop callers, each
    on its own conversation; the latency of each, and the wall time of all."""
    samples: list[float] = []

    async def caller(n: int) -> None:
        for i in range(max(1, per_caller)):
            turns = _turns(clock, f"c{n}-{i}")[:2]
            t0 = time.perf_counter()
            await store.append(f"chan-{n}", f"user-{n}", turns)
            samples.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    return samples, time.perf_counter() - start


async def bench_backends(p: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Durable appends (one user turn and one model turn, as the bot writes after a reply)
    from 1, 10 and 100 closed-loop callers, each on a conversation of its own, with no
    commit delay: SQLite in the state directory beside PostgreSQL on loopback."""
    clock = Clock()
    out: dict[str, Any] = {}
    with StateBackends(tmp) as backends:
        for backend in backends.names:
            rows = {}
            for callers in BACKEND_CALLERS:
                location = await backends.fresh(backend, f"ctx_{callers}")
                store = _quiet(ContextStore(ContextConfig(), location, clock=clock))
                samples, elapsed = await _append_from(store, callers, p["backend_appends"] // callers, clock)
                commits = (await store.stats()).commits
                rows[str(callers)] = {
                    **summarize_ms(samples),
                    "appends_per_s": len(samples) / elapsed,
                    "commits_per_s": commits / elapsed,
                    "commits_per_1000": 1000 * commits / len(samples),
                }
                await store.close()
            out[backend] = rows
        out["skipped"] = backends.skipped
    return out


# --- build: hit and miss ---


async def bench_build(p: dict[str, Any], tmp: Path) -> dict[str, Any]:
    clock = Clock()
    store = _quiet(ContextStore(ContextConfig(), tmp / "build", clock=clock))
    before = TTLContextStore(clock)
    keys = [(f"chan-{i}", f"user-{i}") for i in range(p["build_conversations"])]
    await _fill(store, keys, clock)
    for s, u in keys:
        before.append(f"{s}\x1f{u}", _turns(clock, s))
    n = p["build_samples"]
    samples: dict[str, list[float]] = {"ours_hit": [], "ours_miss": [], "before_hit": [], "before_miss": []}
    new_turn = [Turn(role="user", author="someone", text="a new message", time=clock())]
    for i in range(n):
        s, u = keys[i % len(keys)]
        # ours misses exactly when the conversation changed since its last build
        await store.append(s, u, new_turn)
        t0 = time.perf_counter()
        await store.build(s, u)
        samples["ours_miss"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await store.build(s, u)
        samples["ours_hit"].append(time.perf_counter() - t0)
        # the TTL design misses when its entry expired
        key = f"{s}\x1f{u}"
        clock.now += before.ttl
        t0 = time.perf_counter()
        before.build(key)
        samples["before_miss"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        before.build(key)
        samples["before_hit"].append(time.perf_counter() - t0)
    # build, append, build again at once: does the second build show the new turn?
    stale = {"ours": 0, "before": 0}
    checked = min(n, len(keys))
    for s, u in keys[:checked]:
        key = f"{s}\x1f{u}"
        await store.build(s, u)
        before.build(key)
        fresh = [Turn(role="user", author="someone", text=f"news for {u}", time=clock())]
        await store.append(s, u, fresh)
        before.append(key, fresh)
        stale["ours"] += (await store.build(s, u)).turns[-1][2] != fresh[0].text
        stale["before"] += before.build(key).turns[-1][2] != fresh[0].text
    await store.close()
    out: dict[str, Any] = {k: summarize_ms(v) for k, v in samples.items()}
    out["stale_builds_after_append"] = {**stale, "checked": checked}
    out["ours_hit_speedup_vs_miss"] = ratio(out["ours_hit"]["p50_ms"], out["ours_miss"]["p50_ms"])
    return out


# --- memory per conversation ---


async def _measure_ours(n: int, tmp: Path) -> dict[str, Any]:
    clock = Clock()
    store = _quiet(ContextStore(ContextConfig(), tmp / f"mem-{n}", clock=clock))
    keys = [(f"chan-{i}", f"user-{i}") for i in range(n)]
    # first calls import and cache what the measurement must not count
    await store.append("warm", "up", _turns(clock, "warm"))
    await store.build("warm", "up")
    text_bytes = 0
    gc.collect()
    rss0 = rss_bytes()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for start in range(0, n, 1_000):
        # texts are made here, as a deserialized request would make them: they count as text
        batch = [(s, u, _turns(clock, s)) for s, u in keys[start : start + 1_000]]
        text_bytes += sum(len(t.text) for _, _, ts in batch for t in ts)
        await asyncio.gather(*(store.append(s, u, ts) for s, u, ts in batch))
        del batch
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    rss = rss_bytes() - rss0
    stats = await store.stats()
    await store.close()
    return {
        "conversations": n,
        "text_bytes": text_bytes,
        "traced_bytes": traced,
        "overhead_bytes_per_conversation": (traced - text_bytes) / n,
        "store_estimate_bytes": stats.bytes,
        "estimate_vs_traced": stats.bytes / traced,
        "rss_delta_bytes": rss,
    }


def _measure_before(n: int) -> dict[str, Any]:
    clock = Clock()
    store = TTLContextStore(clock)
    store.append("warm\x1fup", _turns(clock, "warm"))
    store.build("warm\x1fup")
    text_bytes = 0
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        turns = _turns(clock, f"chan-{i}")
        text_bytes += sum(len(t.text) for t in turns)
        store.append(f"chan-{i}\x1fuser-{i}", turns)
    del turns
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return {"traced_bytes": traced, "overhead_bytes_per_conversation": (traced - text_bytes) / n}


def _memory_worker(n: int, tmp: str) -> dict[str, Any]:
    ours = asyncio.run(_measure_ours(n, Path(tmp)))
    ours["before"] = _measure_before(n)
    ours["overhead_ratio_before_over_ours"] = ratio(
        ours["overhead_bytes_per_conversation"], ours["before"]["overhead_bytes_per_conversation"]
    )
    return ours


# --- a simulated day with churn ---


async def _simulate_day(design: str, p: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """24 simulated hours in steps of a few minutes: each step some users of a sliding
    window of active users send a message (build, then append the user turn and the
    reply); the window slides so users keep arriving and leaving."""
    clock = Clock()
    stale_after = p["day_stale_hours"] * HOUR
    config = ContextConfig(
        stale_after_seconds=stale_after,
        cleanup_interval_seconds=60.0,
        memory_budget_bytes=p["day_budget_bytes"],
    )
    ours = _quiet(ContextStore(config, tmp / "day", clock=clock)) if design == "ours" else None
    before = TTLContextStore(clock) if design == "before" else None
    step, per_step, active = p["day_step_minutes"], p["day_messages_per_step"], p["day_active_users"]
    # the active window moves by a whole population every 6 hours
    slide = active / 360.0
    samples = []
    t_start = time.perf_counter()
    for minute in range(step - 1, 24 * 60, step):
        clock.now += 60.0 * step
        base = int(minute * slide)
        msgs = []
        for j in range(per_step):
            u = base + (minute * 7919 + j * 104729) % active
            msgs.append((f"chan-{u % 50}", f"user-{u}"))
        if ours is not None:
            await asyncio.gather(*(ours.build(s, u) for s, u in msgs))
            await asyncio.gather(*(ours.append(s, u, _turns(clock, s)[:2]) for s, u in msgs))
            await ours.maintain()
        else:
            assert before is not None
            for s, u in msgs:
                before.build(f"{s}\x1f{u}")
                before.append(f"{s}\x1f{u}", _turns(clock, s)[:2])
            if minute % 60 == 59:
                before.cleanup(stale_after)
        if minute % 60 == 59:
            sample: dict[str, Any] = {"hour": (minute + 1) // 60, "rss_mib": rss_bytes() / 2**20}
            if ours is not None:
                st = await ours.stats()
                sample.update(in_memory=st.conversations, on_disk=st.conversations_on_disk, bytes=st.bytes)
            else:
                assert before is not None
                sample.update(in_memory=len(before.conversations), cached=len(before.cache))
            samples.append(sample)
    elapsed = time.perf_counter() - t_start
    if ours is not None:
        st = await ours.stats()
        extra = {
            "cleaned_conversations": st.cleaned_conversations,
            "spilled": st.spilled,
            "built_hit_rate": st.built_hit_rate,
        }
        await ours.close()
    else:
        extra = {}
    rss = [s["rss_mib"] for s in samples]
    return {
        "samples": samples,
        "wall_seconds": elapsed,
        "rss_mib_hour_4": rss[3],
        "rss_mib_hour_24": rss[-1],
        "rss_growth_hour_4_to_24": rss[-1] / rss[3],
        **extra,
    }


def _day_worker(design: str, p: dict[str, Any], tmp: str) -> dict[str, Any]:
    return asyncio.run(_simulate_day(design, p, Path(tmp)))


# --- cleanup cost against stale entries ---


async def bench_cleanup(p: dict[str, Any], tmp: Path) -> dict[str, Any]:
    kept = p["cleanup_kept"]
    rows = []
    for stale in (0, *p["cleanup_stale"]):
        clock = Clock()
        config = ContextConfig(cleanup_interval_seconds=1.0)
        store = _quiet(ContextStore(config, tmp / f"cleanup-{stale}", clock=clock))
        before = TTLContextStore(clock)
        stale_keys = [(f"old-{i}", f"user-{i}") for i in range(stale)]
        fresh_keys = [(f"new-{i}", f"user-{i}") for i in range(kept)]
        await _fill(store, stale_keys, clock)
        for s, u in stale_keys:
            before.append(f"{s}\x1f{u}", _turns(clock, s))
        clock.now += 31 * DAY
        await _fill(store, fresh_keys, clock)
        for s, u in fresh_keys:
            before.append(f"{s}\x1f{u}", _turns(clock, s))
        clock.now += 60.0
        t0 = time.perf_counter()
        await store.maintain()
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        removed_before = before.cleanup(config.stale_after_seconds)
        before_s = time.perf_counter() - t0
        st = await store.stats()
        assert st.cleaned_conversations == stale == removed_before
        await store.close()
        rows.append(
            {
                "stale": stale,
                "kept": kept,
                "ours_ms": ours_s * 1000,
                "before_ms": before_s * 1000,
                "ours_us_per_removed": ours_s * 1e6 / stale if stale else None,
            }
        )
    return {"rows": rows}


def run(size: str = "full", results_dir: Path | None = None) -> dict[str, Any]:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    p = SIZES[size]
    ctx = multiprocessing.get_context("spawn")
    with floors.watch(size) as watch, tempfile.TemporaryDirectory(prefix="context-bench-") as tmp_name:
        tmp = Path(tmp_name)
        results: dict[str, Any] = {"size": size, "params": {k: v for k, v in p.items()}}
        results["build"] = asyncio.run(bench_build(p, tmp))
        # memory and RSS in fresh processes, so one measurement does not inherit another's heap
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            results["memory"] = {
                str(n): pool.submit(_memory_worker, n, str(tmp / f"m{n}")).result() for n in p["memory_sizes"]
            }
        day = {}
        for design in ("ours", "before"):
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                day[design] = pool.submit(_day_worker, design, p, str(tmp / f"d-{design}")).result()
        results["day"] = day
        results["cleanup"] = asyncio.run(bench_cleanup(p, tmp))
        results["state_backends"] = asyncio.run(bench_backends(p, tmp))
    largest = results["cleanup"]["rows"][-1]
    results["summary"] = {
        "build_hit_p50_ms": results["build"]["ours_hit"]["p50_ms"],
        "build_miss_p50_ms": results["build"]["ours_miss"]["p50_ms"],
        "stale_builds_ours": results["build"]["stale_builds_after_append"]["ours"],
        "stale_builds_before": results["build"]["stale_builds_after_append"]["before"],
        "overhead_bytes_per_conversation": {
            n: m["overhead_bytes_per_conversation"] for n, m in results["memory"].items()
        },
        "rss_growth_hour_4_to_24": {d: r["rss_growth_hour_4_to_24"] for d, r in day.items()},
        "cleanup_speedup_at_most_stale": ratio(largest["ours_ms"], largest["before_ms"]),
        "cleanup_ours_ms_by_stale": {r["stale"]: r["ours_ms"] for r in results["cleanup"]["rows"]},
        "cleanup_before_ms_by_stale": {r["stale"]: r["before_ms"] for r in results["cleanup"]["rows"]},
    }
    results["floors"] = watch.result
    write_results(NAME, results, results_dir)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    args = parser.parse_args()
    results = run(args.size)
    import json

    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
