"""The load test: N simulated users against the real pipeline on Ray, then the same load
against the naive "before" pipeline, in one command, with every figure as a ratio.

raycord runs as production does: the LLM in the `LLMGateway` actor, reached through
`GatewayClient`. A reply's overhead is its latency minus the upstream call's own time as
the gateway measured it (so the gateway's queue and the Ray round trip to it count as
overhead); the naive pipeline's is its latency minus its in-process LLM call.

`python -m bench.loadtest` and `python -m bench.loadtest` run it; results go to
bench/results/<name>.json, <name>.md and <name>.png (BENCHMARKS.md quotes them).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from actors.errors import RaycordError
from actors.ratelimit import RateLimitConfig, WindowLimits
from actors.schemas import Attachment, ChatReply, IncomingMessage
from bench import floors
from bench.common import RESULTS_DIR, percentile, write_results
from bench.naive import NaivePipeline
from bot.config import Settings
from bot.llm.gateway import GatewayClient, GatewayStats, GeminiLLM
from bot.status import process_memory

# a 1x1 PNG: what the 10% of messages with an image carry
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


class Pipeline(Protocol):
    async def handle(self, raw: IncomingMessage, on_chunk: Any = None) -> ChatReply: ...


@dataclass
class LoadConfig:
    users: int = 100
    duration: float = 30.0
    ramp_up: float = 5.0
    llm_latency: float = 0.3
    llm_concurrency: int = 64
    #: raycord's LLM gateway replicas (`llm.replicas`): the SDK's CPU is theirs, one event
    #: loop each, so one replica bounds a closed loop's throughput
    llm_replicas: int = 1
    #: mean pause between a user's reply and their next message (0 = closed loop)
    think: float = 0.0
    prompts: int = 300
    zipf_s: float = 1.1
    seed: int = 7
    sample_every: float = 0.5
    progress: bool = True


@dataclass
class Sample:
    start: float
    latency: float
    overhead: float
    ok: bool
    cached: bool
    kind: str
    error: str = ""


@dataclass
class RunResult:
    label: str
    samples: list[Sample] = field(default_factory=list)
    rss: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    #: (seconds, {process: (pss, uss)}) sampled with `rss`: RSS counts shared pages in
    #: every process that maps them, PSS splits them, USS is each process's own
    shares: list[tuple[float, dict[str, tuple[int, int]]]] = field(default_factory=list)
    elapsed: float = 0.0
    llm_calls: int = 0
    coalesced: int = 0
    db_writes: int = 0
    file_writes: int = 0
    #: state-file commits per service (raycord only)
    file_writes_by_service: dict[str, int] = field(default_factory=dict)
    #: syncs of state files to the disk, in total and per store (from the stores' own stats)
    file_syncs: int = 0
    #: per store: {"commits": n, "syncs": n}
    stores: dict[str, dict[str, int]] = field(default_factory=dict)
    #: service calls the pipeline made, and the actor round trips that carried them
    service_calls: int = 0
    round_trips: int = 0
    #: p50 of an empty actor call on the idle system before the load: the floor of a round trip
    empty_call_ms: float = 0.0
    #: prompt tokens sent upstream: the conversation context each request carries
    tokens_in: int = 0
    #: CPU seconds each process spent during the run, and the whole machine's busy seconds
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    #: the driver's CPU seconds by thread: its event loop (the pipeline's Python) apart
    #: from the threads Ray runs in it
    driver_threads: dict[str, float] = field(default_factory=dict)
    #: the pipeline's per-stage latencies (ms), as its `stage_latency_ms` histogram saw them
    stages: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.ok]
        lat = [s.latency * 1000 for s in ok]
        over = [s.overhead * 1000 for s in ok]
        n = len(self.samples)
        peak = max((sum(r.values()) for _, r in self.rss), default=0)
        pss_peak = max((sum(p for p, _ in s.values()) for _, s in self.shares), default=0)
        uss_peak = max((sum(u for _, u in s.values()) for _, s in self.shares), default=0)
        labels = sorted({label for _, snap in self.rss for label in snap})
        return {
            "requests": n,
            "errors": n - len(ok),
            "error_rate": (n - len(ok)) / n if n else 0.0,
            "throughput_rps": len(ok) / self.elapsed if self.elapsed else 0.0,
            "latency_ms": {q: percentile(lat, int(q[1:])) for q in ("p50", "p95", "p99")},
            "overhead_ms": {q: percentile(over, int(q[1:])) for q in ("p50", "p95", "p99")},
            "cache_hit_rate": sum(s.cached for s in ok) / len(ok) if ok else 0.0,
            # by message kind: a chat message's key covers its conversation, which every
            # turn changes, so its hits are rare by design; commands are stateless
            "cache_hit_rate_by_kind": {
                kind: sum(s.cached for s in ok if s.kind == kind) / count
                for kind in sorted({s.kind for s in ok})
                if (count := sum(1 for s in ok if s.kind == kind))
            },
            "llm_calls": self.llm_calls,
            "llm_calls_saved_by_cache": sum(s.cached for s in ok),
            "llm_calls_saved_by_coalescing": self.coalesced,
            "db_writes": self.db_writes,
            "file_writes": self.file_writes,
            "file_writes_by_service": self.file_writes_by_service,
            "file_syncs": self.file_syncs,
            "stores": self.stores,
            "rss_peak_mb": peak / 2**20,
            "pss_peak_mb": pss_peak / 2**20,
            "uss_peak_mb": uss_peak / 2**20,
            # per process, its peak of each: what a user sees in top (RSS) and what it costs
            "memory_peak_mb_by_process": {
                label: {
                    "rss": max((snap.get(label, 0) for _, snap in self.rss), default=0) / 2**20,
                    "pss": max((s.get(label, (0, 0))[0] for _, s in self.shares), default=0) / 2**20,
                    "uss": max((s.get(label, (0, 0))[1] for _, s in self.shares), default=0) / 2**20,
                }
                for label in labels
            },
            "error_kinds": sorted({s.error for s in self.samples if s.error}),
            "service_calls_per_reply": self.service_calls / len(ok) if ok else 0.0,
            "round_trips_per_reply": self.round_trips / len(ok) if ok else 0.0,
            "empty_actor_call_p50_ms": self.empty_call_ms,
            "llm_tokens_in_per_call": self.tokens_in / self.llm_calls if self.llm_calls else 0.0,
            # where the CPU went: ms of CPU per reply, per process ("machine" is every
            # process on it, Ray's own and the fake Gemini server included)
            "cpu_ms_per_reply": {
                label: 1000 * seconds / len(ok) for label, seconds in self.cpu_seconds.items()
            }
            if ok
            else {},
            "driver_cpu_ms_per_reply_by_thread": {
                name: 1000 * seconds / len(ok) for name, seconds in self.driver_threads.items()
            }
            if ok
            else {},
            # where a reply's time goes, stage by stage (a stage a reply skips, as a cache
            # hit skips the LLM, has fewer samples than there are replies)
            "stage_latency_ms": {
                stage: {
                    "count": len(values),
                    **{q: percentile(values, int(q[1:])) for q in ("p50", "p95", "p99")},
                }
                for stage, values in sorted(self.stages.items())
            },
        }


class Workload:
    """70% chat messages, 20% commands (/ask, cacheable per server), 10% with an image;
    prompts drawn from a Zipf distribution, so popular questions repeat."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.rng = random.Random(cfg.seed)
        weights = [1.0 / (rank**cfg.zipf_s) for rank in range(1, cfg.prompts + 1)]
        total = sum(weights)
        self.cumulative = list(itertools.accumulate(w / total for w in weights))
        self.topics = [f"question {i}: how do I do thing {i} with raycord?" for i in range(cfg.prompts)]

    def prompt(self) -> str:
        return self.topics[min(bisect.bisect_left(self.cumulative, self.rng.random()), len(self.topics) - 1)]

    def message(self, user: int, run_id: str) -> IncomingMessage:
        roll = self.rng.random()
        base: dict[str, Any] = {
            "user_id": f"load-{run_id}-{user}",
            "server_id": f"server-{user % 5}",
            "channel_id": f"chan-{user % 20}",
            "scope": f"channel:chan-{user % 20}",
        }
        if roll < 0.7:
            return IncomingMessage(text=self.prompt(), **base)
        if roll < 0.9:
            return IncomingMessage(
                text=self.prompt(), kind="command", stateless=True, cache_scope="server", **base
            )
        image = Attachment(filename="pic.png", content_type="image/png", size=len(TINY_PNG), data=TINY_PNG)
        return IncomingMessage(text="what is in this picture?", attachments=(image,), **base)


#: PSS and USS are read on every this many RSS samples: reading them walks each process's
#: page tables, which costs the driver more CPU than reading RSS does
SHARES_EVERY = 5


class MemorySampler(threading.Thread):
    """Samples each process's memory every `every` seconds, in a thread of its own: reading
    PSS walks page tables, which is the load test's work, not the pipeline's, so the
    thread's CPU is taken out of the driver's and shown apart."""

    def __init__(
        self,
        pids: dict[str, int],
        out: list[tuple[float, dict[str, int]]],
        every: float,
        t0: float,
        shares: list[tuple[float, dict[str, tuple[int, int]]]],
    ) -> None:
        super().__init__(name="loadtest-memory-sampler", daemon=True)
        self.args = (pids, out, every, t0, shares)
        self.stopped = threading.Event()

    def run(self) -> None:
        _sample_memory(*self.args, self.stopped)

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def _sample_memory(
    pids: dict[str, int],
    out: list[tuple[float, dict[str, int]]],
    every: float,
    t0: float,
    shares: list[tuple[float, dict[str, tuple[int, int]]]],
    stopped: threading.Event,
) -> None:
    for sample in itertools.count():
        snap: dict[str, int] = {}
        share: dict[str, tuple[int, int]] = {}
        full = sample % SHARES_EVERY == 0
        for label, pid in pids.items():
            if not full:
                with suppress(psutil.Error):
                    snap[label] = psutil.Process(pid).memory_info().rss
                continue
            memory = process_memory(pid)
            if memory is not None:
                snap[label] = memory.rss
                share[label] = (memory.pss, memory.uss)
        now = time.perf_counter() - t0
        out.append((now, snap))
        if full:
            shares.append((now, share))
        if stopped.wait(every):
            return


def _busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """This process's threads: {thread id: (name, CPU seconds)}; the calling thread, which
    runs the event loop, is "event loop"."""
    me = psutil.Process()
    loop_thread = threading.get_native_id()
    seconds: dict[int, tuple[str, float]] = {}
    for thread in me.threads():
        if thread.id == loop_thread:
            name = "event loop"
        else:
            try:
                name = Path(f"/proc/{me.pid}/task/{thread.id}/comm").read_text().strip()
            except OSError:
                name = "other"
        seconds[thread.id] = (name, thread.user_time + thread.system_time)
    return seconds


def _thread_split(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], sampler: int | None
) -> tuple[dict[str, float], float]:
    """({thread name: CPU seconds between the snapshots}, the memory sampler's seconds)."""
    by_name: dict[str, float] = {}
    sampling = 0.0
    for tid, (name, seconds) in after.items():
        spent = seconds - before.get(tid, (name, 0.0))[1]
        if tid == sampler:
            sampling = spent
        else:
            by_name[name] = by_name.get(name, 0.0) + spent
    return by_name, sampling


def _cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    snap = {"machine": _busy_seconds()}
    for label, pid in pids.items():
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        snap[label] = times.user + times.system
    return snap


async def drive(
    pipeline: Pipeline,
    cfg: LoadConfig,
    label: str,
    pids: dict[str, int],
    cpu_only: dict[str, int] | None = None,
) -> RunResult:
    """Run the simulated users against `pipeline` for `cfg.duration` seconds. `pids` are
    sampled for RSS and CPU, `cpu_only` (processes not ours, like the fake server) for CPU."""
    result = RunResult(label)
    workload = Workload(cfg)
    run_id = uuid.uuid4().hex[:6]
    t0 = time.perf_counter()
    deadline = t0 + cfg.ramp_up + cfg.duration
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=int(cfg.ramp_up + cfg.duration), desc=f"{label:>8}", unit="s", file=sys.stderr)

    async def user(i: int) -> None:
        await asyncio.sleep(cfg.ramp_up * i / max(cfg.users, 1))
        rng = random.Random(cfg.seed * 1000 + i)
        while time.perf_counter() < deadline:
            msg = workload.message(i, run_id)
            kind = "image" if msg.attachments else msg.kind
            start = time.perf_counter()
            try:
                reply = await pipeline.handle(msg)
                took = time.perf_counter() - start
                llm_ms = reply.upstream_ms or reply.llm_ms
                result.samples.append(
                    Sample(start - t0, took, max(took - llm_ms / 1000, 0.0), True, reply.cached, kind)
                )
            except RaycordError as exc:
                result.samples.append(
                    Sample(
                        start - t0,
                        time.perf_counter() - start,
                        0.0,
                        False,
                        False,
                        kind,
                        type(exc).__name__,
                    )
                )
            if cfg.think:
                # a pause never runs past the end: the run ends when its time is up
                pause = rng.expovariate(1 / cfg.think)
                await asyncio.sleep(min(pause, max(deadline - time.perf_counter(), 0.0)))

    async def ticker() -> None:
        while bar is not None:
            await asyncio.sleep(1)
            bar.update(1)

    tick = asyncio.create_task(ticker())
    sampler = MemorySampler(pids, result.rss, cfg.sample_every, t0, result.shares)
    sampler.start()
    cpu_before = _cpu_snapshot({**pids, **(cpu_only or {})})
    threads_before = _thread_cpu()
    await asyncio.gather(*(user(i) for i in range(cfg.users)))
    result.elapsed = time.perf_counter() - t0 - cfg.ramp_up * 0.5
    cpu_after = _cpu_snapshot({**pids, **(cpu_only or {})})
    threads_after = _thread_cpu()
    sampler.stop()
    result.driver_threads, sampling = _thread_split(threads_before, threads_after, sampler.native_id)
    result.cpu_seconds = {k: cpu_after[k] - v for k, v in cpu_before.items() if k in cpu_after}
    result.cpu_seconds["driver"] -= sampling
    result.cpu_seconds["load-test memory sampler, in the driver"] = sampling
    tick.cancel()
    if bar is not None:
        bar.close()
    return result


@asynccontextmanager
async def fake_gemini(latency: float) -> AsyncIterator[tuple[str, int]]:
    """`raycord fake-gemini` in a process of its own (so it does not share our event loop):
    its URL and pid."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "fake-gemini",
        "--port",
        "0",
        "--latency",
        str(latency),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if "listening on" not in line:
            raise RuntimeError(f"fake gemini did not start: {line!r}")
        yield line.rsplit(" ", 1)[-1].strip(), proc.pid
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


def gemini_llm(url: str, concurrency: int) -> GeminiLLM:
    from bot.config import LLMSettings

    settings = Settings(
        dashboard=False,
        discord_token=None,
        gemini_api_key=None,
        llm=LLMSettings(base_url=url, max_concurrency=concurrency),
    )
    return GeminiLLM(settings)


def llm_counts(stats: Sequence[GatewayStats]) -> tuple[int, int, int]:
    """(upstream calls, requests answered by another request's call, prompt tokens sent),
    summed over the gateway's replicas."""
    return (
        sum(s.upstream_calls for s in stats),
        sum(s.coalesced for s in stats),
        sum(s.tokens_in for s in stats),
    )


def load_settings(state_dir: Path, url: str, concurrency: int, replicas: int = 1) -> Settings:
    """raycord's settings for the run: limits no user reaches, the LLM gateway on `url`."""
    from bot.config import LLMSettings

    generous = WindowLimits(minute=100_000, hour=1_000_000, day=10_000_000)
    return Settings(
        state_dir=state_dir,
        namespace=f"loadtest-{uuid.uuid4().hex[:8]}",
        dashboard=False,
        discord_token=None,
        gemini_api_key=None,
        ratelimit=RateLimitConfig(message=generous, command=generous),
        llm=LLMSettings(backend="gemini", base_url=url, max_concurrency=concurrency, replicas=replicas),
    )


async def run_async(cfg: LoadConfig, state_dir: Path) -> dict[str, Any]:
    from bot.runtime import Runtime

    results: dict[str, RunResult] = {}
    async with fake_gemini(cfg.llm_latency) as (url, server_pid):
        # as production runs it: the gateway actor owns the SDK, the pipeline holds a client
        runtime = Runtime(load_settings(state_dir / "raycord", url, cfg.llm_concurrency, cfg.llm_replicas))
        pipeline = await runtime.start(num_cpus=2, include_dashboard=False)
        pipeline.stage_samples = {}
        pids = {"driver": os.getpid()}
        cpu_only = {"fake-gemini": server_pid}
        for name, handles in runtime.handles.items():
            for i, h in enumerate(handles):
                pids[f"{name}-{i}"] = await h.__ray_call__.remote(lambda self: os.getpid())
        empty_call_ms = await _empty_call_p50(runtime.handles["cache"][0])
        try:
            ours = await drive(pipeline, cfg, "raycord", pids, cpu_only)
            ours.empty_call_ms = empty_call_ms
            ours.stages = pipeline.stage_samples
            await runtime.flush()
            gateway = runtime.client("llm", GatewayClient)
            ours.llm_calls, ours.coalesced, ours.tokens_in = llm_counts(await gateway.stats())
            ours.db_writes, ours.stores = await _service_writes(runtime)
            ours.file_writes_by_service = {name: io["commits"] for name, io in ours.stores.items()}
            ours.file_writes = sum(io["commits"] for io in ours.stores.values())
            ours.file_syncs = sum(io["syncs"] for io in ours.stores.values())
            for client in runtime.clients.values():
                batching = client.batching()
                ours.service_calls += batching["calls"]
                ours.round_trips += batching["round_trips"]
        finally:
            await runtime.shutdown(kill_actors=True)
        results["raycord"] = ours

        naive_llm = gemini_llm(url, cfg.llm_concurrency)
        naive = NaivePipeline(state_dir / "naive", naive_llm, per_minute=100_000)
        try:
            # the naive pipeline's LLM is the gateway in its own process, SDK included
            before = await drive(naive, cfg, "naive", {"driver": os.getpid()}, cpu_only)
            before.llm_calls, before.coalesced, before.tokens_in = llm_counts([naive_llm.stats()])
            before.db_writes, before.file_writes = naive.db_writes, naive.file_writes
            # the naive limiter fsyncs its file on every write; its context lives in memory
            before.file_syncs = naive.file_writes
            before.stores = {"ratelimit": {"commits": naive.file_writes, "syncs": naive.file_writes}}
        finally:
            naive.close()
            await naive_llm.aclose()
        results["naive"] = before
    return {k: v for k, v in results.items()}


async def _empty_call_p50(handle: Any, calls: int = 200) -> float:
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        await handle.ping.remote()
        samples.append((time.perf_counter() - t) * 1000)
    return percentile(samples, 50)


async def _service_writes(runtime: Any) -> tuple[int, dict[str, dict[str, int]]]:
    """(database transactions, {store: {"commits", "syncs"}} summed over its shards) the
    services made, from their own stats; a service without state files is left out."""
    db = 0
    stores: dict[str, dict[str, int]] = {}
    for name, client in runtime.clients.items():
        for stats in await client.stats():
            data = stats.model_dump()
            if name == "analytics":
                db += int(data.get("transactions", 0))
            elif "commits" in data:
                io = stores.setdefault(name, {"commits": 0, "syncs": 0})
                io["commits"] += int(data["commits"])
                io["syncs"] += int(data.get("syncs", 0))
    return db, stores


def _ratios(ours: dict[str, Any], naive: dict[str, Any]) -> dict[str, float]:
    def r(a: float, b: float) -> float:
        return a / b if b else float("inf")

    return {
        "throughput_x": r(ours["throughput_rps"], naive["throughput_rps"]),
        "p95_latency_ratio": r(ours["latency_ms"]["p95"], naive["latency_ms"]["p95"]),
        "db_writes_ratio": r(ours["db_writes"], naive["db_writes"]),
        "file_writes_ratio": r(ours["file_writes"], naive["file_writes"]),
        "file_syncs_ratio": r(ours["file_syncs"], naive["file_syncs"]),
    }


def plot(runs: dict[str, RunResult], path_prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, run in runs.items():
        buckets: dict[int, list[float]] = {}
        for s in run.samples:
            if s.ok:
                buckets.setdefault(int(s.start), []).append(s.latency * 1000)
        xs = sorted(buckets)
        for q, style in ((50, "-"), (95, "--"), (99, ":")):
            axes[0].plot(xs, [percentile(buckets[x], q) for x in xs], style, label=f"{label} p{q}")
        axes[1].plot(xs, [len(buckets[x]) for x in xs], label=label)
        for proc in sorted({p for _, snap in run.rss for p in snap}):
            axes[2].plot(
                [t for t, snap in run.rss if proc in snap],
                [snap[proc] / 2**20 for _, snap in run.rss if proc in snap],
                label=f"{label}:{proc}",
            )
    axes[0].set(title="latency percentiles (ms)", xlabel="s")
    axes[1].set(title="throughput (replies/s)", xlabel="s")
    axes[2].set(title="RSS per process (MiB)", xlabel="s")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    out = path_prefix.with_suffix(".png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    paths.append(out)
    return paths


def markdown(name: str, cfg: LoadConfig, summary: dict[str, Any], command: str) -> str:
    ours, naive, ratios = summary["raycord"], summary["naive"], summary["ratios"]
    rows = [
        ("throughput (replies/s)", "throughput_rps", "{:.1f}"),
        ("error rate", "error_rate", "{:.4%}"),
        ("cache hit rate", "cache_hit_rate", "{:.1%}"),
        ("LLM calls", "llm_calls", "{}"),
        ("prompt tokens per LLM call (context carried)", "llm_tokens_in_per_call", "{:.0f}"),
        ("database writes", "db_writes", "{}"),
        ("state-file commits", "file_writes", "{}"),
        ("state-file syncs (fsyncs)", "file_syncs", "{}"),
        ("peak RSS, all processes (MiB)", "rss_peak_mb", "{:.0f}"),
        ("peak PSS, all processes (MiB; shared pages counted once)", "pss_peak_mb", "{:.0f}"),
        ("peak USS, all processes (MiB; memory no other process shares)", "uss_peak_mb", "{:.0f}"),
    ]
    lines = [
        f"# Load test `{name}`",
        "",
        *floors.header(summary.get("floors")),
        "",
        f"`{command}`",
        "",
        f"{cfg.users} users, {cfg.duration:.0f} s after a {cfg.ramp_up:.0f} s ramp-up, LLM latency "
        f"{cfg.llm_latency * 1000:.0f} ms, think time {cfg.think:.2f} s; 70% chat, 20% /ask, 10% images; "
        f"raycord's LLM gateway in {cfg.llm_replicas} actor(s).",
        "",
        "Overhead excluding the LLM: raycord's is a reply's latency minus the upstream call's own "
        "time as the gateway measured it (the gateway's queue and the round trip to it count); the "
        "naive pipeline's is its latency minus its in-process LLM call.",
        "",
        "| figure | raycord | naive | ratio |",
        "|---|---|---|---|",
    ]
    for title, key, fmt in rows:
        # a result from before a figure existed shows it as "-"
        a, b = ours.get(key), naive.get(key)
        ratio = f"{a / b:.3g}" if isinstance(a, int | float) and b else "-"
        shown_a, shown_b = ("-" if v is None else fmt.format(v) for v in (a, b))
        lines.append(f"| {title} | {shown_a} | {shown_b} | {ratio} |")
    ours_stores, naive_stores = ours.get("stores", {}), naive.get("stores", {})
    for store in sorted(set(ours_stores) | set(naive_stores)):
        a_io, b_io = ours_stores.get(store), naive_stores.get(store)
        for what in ("commits", "syncs"):
            a = None if a_io is None else a_io[what]
            b = None if b_io is None else b_io[what]
            ratio = f"{a / b:.3g}" if a is not None and b else "-"
            lines.append(
                f"| {store} store {what} | {'-' if a is None else a} | {'-' if b is None else b} | {ratio} |"
            )
    for kind, title in (("message", "chat messages"), ("command", "/ask commands")):
        a, b = ours["cache_hit_rate_by_kind"].get(kind, 0.0), naive["cache_hit_rate_by_kind"].get(kind, 0.0)
        lines.append(f"| cache hit rate, {title} | {a:.1%} | {b:.1%} | {a / b if b else 0:.3g} |")
    lines.append(f"| empty actor call p50, idle (ms) | {ours['empty_actor_call_p50_ms']:.2f} | - | - |")
    lines.append(
        f"| service calls / actor round trips per reply | {ours['service_calls_per_reply']:.2f} / "
        f"{ours['round_trips_per_reply']:.2f} | in-process | - |"
    )
    for q in ("p50", "p95", "p99"):
        a, b = ours["latency_ms"][q], naive["latency_ms"][q]
        lines.append(f"| latency {q} (ms) | {a:.1f} | {b:.1f} | {a / b if b else 0:.3g} |")
    for q in ("p50", "p95", "p99"):
        a, b = ours["overhead_ms"][q], naive["overhead_ms"][q]
        lines.append(f"| overhead excl. LLM {q} (ms) | {a:.2f} | {b:.2f} | {a / b if b else 0:.3g} |")
    ours_mem, naive_mem = (
        ours.get("memory_peak_mb_by_process", {}),
        naive.get("memory_peak_mb_by_process", {}),
    )
    for proc in sorted(set(ours_mem) | set(naive_mem)):
        cells = [
            "-" if m is None else f"{m['rss']:.0f} / {m['pss']:.0f} / {m['uss']:.0f}"
            for m in (ours_mem.get(proc), naive_mem.get(proc))
        ]
        lines.append(f"| peak memory, {proc}: RSS / PSS / USS (MiB) | {cells[0]} | {cells[1]} | - |")
    for proc in sorted(set(ours["cpu_ms_per_reply"]) | set(naive["cpu_ms_per_reply"])):
        a, b = ours["cpu_ms_per_reply"].get(proc), naive["cpu_ms_per_reply"].get(proc)
        lines.append(
            f"| CPU per reply, {proc} (ms) | {'-' if a is None else f'{a:.1f}'} | "
            f"{'-' if b is None else f'{b:.1f}'} | - |"
        )
    threads = ours.get("driver_cpu_ms_per_reply_by_thread", {})
    for thread, ms in sorted(threads.items(), key=lambda item: -item[1]):
        if ms >= 0.05:
            lines.append(f"| CPU per reply, driver thread {thread} (ms) | {ms:.2f} | - | - |")
    lines += stage_rows(ours.get("stage_latency_ms", {}))
    lines += [
        "",
        f"Throughput {ratios['throughput_x']:.2f}x the naive pipeline; p95 latency ratio "
        f"{ratios['p95_latency_ratio']:.2f}.",
        "",
    ]
    return "\n".join(lines)


#: what each of the pipeline's stages covers, in the order a message meets them
STAGES = {
    "validate": "the message checked and normalized",
    "admit": "rate-limit check and context build (a stateless command's cache get with them)",
    "cache": "cache get, for a message with context",
    "attachments": "attachments checked and prepared",
    "llm": "the LLM call as the pipeline waits for it",
    "upstream": "of which the upstream call, as the gateway measured it",
    "llm_transport": "of which the gateway's queue and the round trip to it",
    "reply": "background writes submitted, the reply built",
    "record": "metrics and the analytics event, after the reply is built",
}


def stage_rows(stages: dict[str, dict[str, float]]) -> list[str]:
    """Where a raycord reply's time goes: rows of the pipeline's `stage_latency_ms` stages
    (a stage a reply skips, as a cache hit skips the LLM, has fewer samples than replies)."""
    order = [s for s in STAGES if s in stages] + sorted(set(stages) - set(STAGES))
    return [
        f"| stage {stage} ({STAGES.get(stage, 'not described')}; {figures['count']} samples): "
        f"p50 / p95 / p99 (ms) | {figures['p50']:.2f} / {figures['p95']:.2f} / {figures['p99']:.2f} "
        "| - | - |"
        for stage in order
        if (figures := stages[stage])
    ]


def run(
    size: str = "full", results_dir: Path | None = None, name: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """Run the load test; `size="tiny"` is the smoke-test size."""
    cfg = LoadConfig()
    if size == "tiny":
        cfg = LoadConfig(users=5, duration=2.0, ramp_up=0.5, llm_latency=0.01, prompts=20, progress=False)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    out_dir = results_dir or RESULTS_DIR
    name = name or f"loadtest-{cfg.users}u-{int(cfg.llm_latency * 1000)}ms"
    import tempfile

    with floors.watch(size) as watch, tempfile.TemporaryDirectory(prefix="raycord-load-") as tmp:
        runs = asyncio.run(run_async(cfg, Path(tmp)))
    summary: dict[str, Any] = {label: r.summary() for label, r in runs.items()}
    summary["ratios"] = _ratios(summary["raycord"], summary["naive"])
    summary["config"] = asdict(cfg)
    summary["rss_series"] = {label: r.rss for label, r in runs.items()}
    summary["floors"] = watch.result
    write_results(name, summary, out_dir)
    command = " ".join(["python -m bench.loadtest", *sys.argv[1:]]) if size != "tiny" else "tiny smoke run"
    (out_dir / f"{name}.md").write_text(markdown(name, cfg, summary, command))
    plot(runs, out_dir / name)
    return summary


def main(argv: list[str] | None = None) -> int:
    from bot.cli import ToolParser

    parser = ToolParser(prog="python -m bench.loadtest", description=__doc__)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--ramp-up", type=float, default=5.0)
    parser.add_argument("--llm-latency", type=float, default=0.3, help="seconds")
    parser.add_argument("--think", type=float, default=0.0, help="mean seconds between a user's messages")
    parser.add_argument(
        "--llm-replicas", type=int, default=1, help="raycord's LLM gateway replicas (llm.replicas)"
    )
    parser.add_argument("--name", help="results name (default from users and latency)")
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    args = parser.parse_args(argv)
    summary = run(
        args.size,
        name=args.name,
        users=args.users,
        duration=args.duration,
        ramp_up=args.ramp_up,
        llm_latency=args.llm_latency,
        think=args.think,
        llm_replicas=args.llm_replicas,
    )
    print(
        markdown(
            args.name or "loadtest", LoadConfig(**summary["config"]), summary, "python -m bench.loadtest"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
