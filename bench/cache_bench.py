"""Response cache benchmark: per-operation cost as the cache grows, the actor round trip,
compression of LLM-style replies, hit rate on a Zipf workload, and Redis on loopback.

Baselines measured in the same run: `cachetools.LRUCache`, the optimization plan's
array-based LRU with gzip+base64 (the "before"), and a local `redis-server`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import gzip
import hashlib
import json
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cachetools
import lz4.block

from actors.cache import CacheClient, CacheConfig, ResponseCache, cache_key, normalize_prompt, pack, unpack
from bench import floors
from bench.common import percentile, ratio, summarize_ms, write_results

NAME = "cache_bench"

PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {
        "sizes": [1_000, 5_000],
        "ops": 2_000,
        "before_budget": 2_000_000,
        "actor_entries": 500,
        "actor_gets": 100,
        "actor_batches": 20,
        "replies": 60,
        "zipf_universe": 2_000,
        "zipf_requests": 5_000,
        "zipf_capacity": 500,
        "zipf_users": 20,
        "redis_ops": 100,
    },
    "full": {
        "sizes": [1_000, 100_000, 1_000_000],
        "ops": 200_000,
        # element visits the array LRU may spend per size: its ops shrink as it grows
        "before_budget": 50_000_000,
        "actor_entries": 10_000,
        "actor_gets": 3_000,
        "actor_batches": 300,
        "replies": 2_000,
        "zipf_universe": 50_000,
        "zipf_requests": 300_000,
        "zipf_capacity": 10_000,
        "zipf_users": 500,
        "redis_ops": 3_000,
    },
}

TTL = 3600.0


# -- the optimization plan's cache, faithfully, as the "before" -------------------------


def plan_encode(response: str) -> tuple[str, bool]:
    """The plan's compression: gzip responses over 1 KB, then base64 the gzip bytes."""
    if len(response) > 1024:
        return base64.b64encode(gzip.compress(response.encode("utf-8"))).decode("ascii"), True
    return response, False


class ArrayLRU:
    """The plan's CacheManager: a Map of entries plus an `accessOrder: string[]` array.

    `updateAccessOrder` is indexOf + splice + push and eviction shifts the array, so
    every get and set walks or moves the whole array: O(n).
    """

    def __init__(self, max_size: int, clock: Callable[[], float] = time.time) -> None:
        self.max_size = max_size
        self.clock = clock
        self.cache: dict[str, dict[str, Any]] = {}
        self.access_order: list[str] = []

    def get(self, key: str) -> str | None:
        entry = self.cache.get(key)
        if entry is None:
            return None
        if self.clock() - entry["timestamp"] > TTL:
            del self.cache[key]
            self.access_order.remove(key)
            return None
        self._update_access_order(key)
        if entry["compressed"]:
            return gzip.decompress(base64.b64decode(entry["response"])).decode("utf-8")
        return entry["response"]

    def set(self, key: str, response: str) -> None:
        if key not in self.cache and len(self.cache) >= self.max_size:
            self._evict_lru()
        stored, compressed = plan_encode(response)
        self.cache[key] = {"response": stored, "compressed": compressed, "timestamp": self.clock()}
        self._update_access_order(key)

    def _update_access_order(self, key: str) -> None:
        try:
            index = self.access_order.index(key)
        except ValueError:
            index = -1
        if index > -1:
            del self.access_order[index]
        self.access_order.append(key)

    def _evict_lru(self) -> None:
        lru = self.access_order.pop(0)
        del self.cache[lru]

    def prefill(self, keys: list[str], response: str) -> None:
        """The state `len(keys)` sets leave behind, built directly: through `set` it is quadratic."""
        now = self.clock()
        for key in keys:
            self.cache[key] = {"response": response, "compressed": False, "timestamp": now}
        self.access_order = list(keys)


# -- workloads ---------------------------------------------------------------------------


def digest_keys(count: int, salt: str = "") -> list[str]:
    return [hashlib.blake2b(f"{salt}{i}".encode(), digest_size=16).hexdigest() for i in range(count)]


_TOPICS = (
    "Ray actors",
    "the asyncio event loop",
    "Python's GIL",
    "a Discord bot",
    "SQLite in WAL mode",
    "an LRU cache",
    "rate limiting",
    "DuckDB",
    "gradient descent",
    "Kubernetes pods",
    "TCP backpressure",
    "Rust ownership",
    "garbage collection",
    "vector databases",
    "HTTP/2 streams",
    "unit tests",
)
_VERBS = (
    "keeps",
    "stores",
    "schedules",
    "retries",
    "serializes",
    "splits",
    "batches",
    "compresses",
    "invalidates",
    "replicates",
    "streams",
    "validates",
    "routes",
    "buffers",
    "measures",
)
_OBJECTS = (
    "the request",
    "each message",
    "the state",
    "a snapshot",
    "every key",
    "the reply",
    "the queue",
    "one transaction",
    "the worker pool",
    "a single shard",
    "the whole batch",
    "its own memory",
    "the slowest call",
    "a stable hash",
    "the last window",
    "a background task",
)
_QUALIFIERS = (
    "without blocking the caller",
    "in constant time",
    "once per second",
    "before it replies",
    "so that nothing is lost",
    "when the process restarts",
    "at the cost of some memory",
    "unless you configure it otherwise",
    "which keeps latency predictable",
    "in most setups",
    "for every user separately",
    "as long as the key is stable",
    "even under heavy load",
)
_OPENERS = (
    "Great question!",
    "Short answer: it depends.",
    "Here's how it works.",
    "Let's break this down.",
    "Sure, here is an overview.",
    "Good catch.",
    "There are a few things to consider.",
)
_CODE = (
    "```python\nimport ray\n\n@ray.remote\nclass Counter:\n    def __init__(self):\n        self.n = 0\n\n"
    "    def incr(self):\n        self.n += 1\n        return self.n\n\n"
    "counter = Counter.remote()\nprint(ray.get(counter.incr.remote()))\n```",
    "```python\nasync def fetch_all(urls):\n    async with aiohttp.ClientSession() as session:\n"
    "        tasks = [session.get(url) for url in urls]\n        return await asyncio.gather(*tasks)\n```",
    "```sql\nSELECT user_id, count(*) AS messages\nFROM events\nWHERE time > now() - INTERVAL 1 DAY\n"
    "GROUP BY user_id\nORDER BY messages DESC\nLIMIT 10;\n```",
    "```bash\npip install raycord\nexport GEMINI_API_KEY=...\nraycord run --config raycord.yaml\n```",
)


def _sentence(rng: random.Random, topic: str) -> str:
    shape = rng.randrange(4)
    if shape == 0:
        return f"{topic} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_QUALIFIERS)}."
    if shape == 1:
        return (
            f"In practice, {rng.choice(_OBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}, "
            f"and {topic} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_QUALIFIERS)}."
        )
    if shape == 2:
        return f"This matters because {rng.choice(_OBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
    return f"If {rng.choice(_OBJECTS)} {rng.choice(_VERBS)} too much, {topic} {rng.choice(_QUALIFIERS)}."


def make_reply(rng: random.Random) -> str:
    """A multi-paragraph Markdown reply of the kind an assistant writes in Discord."""
    topic = rng.choice(_TOPICS)
    parts = [rng.choice(_OPENERS), f"## {topic[0].upper()}{topic[1:]}"]
    for _ in range(rng.randint(1, 5)):
        parts.append(" ".join(_sentence(rng, topic) for _ in range(rng.randint(2, 6))))
        roll = rng.random()
        if roll < 0.3:
            parts.append("\n".join(f"- **{rng.choice(_OBJECTS)}** {_sentence(rng, topic)}" for _ in range(3)))
        elif roll < 0.45:
            parts.append(rng.choice(_CODE))
    parts.append(f"Let me know if you want more detail on {rng.choice(_TOPICS)}.")
    return "\n\n".join(parts)


def real_markdown(limit: int) -> list[str]:
    """Human-written Markdown from the installed packages' descriptions, cut into reply-sized pieces."""
    pieces: list[str] = []
    site = Path(lz4.__file__).resolve().parent.parent
    for meta in sorted(site.glob("*.dist-info/METADATA")):
        text = meta.read_text("utf-8", errors="replace")
        _, _, body = text.partition("\n\n")
        piece: list[str] = []
        for para in body.split("\n\n"):
            piece.append(para)
            if sum(len(p) for p in piece) > 2000:
                pieces.append("\n\n".join(piece))
                piece = []
        if len(pieces) >= limit:
            break
    return pieces[:limit]


# -- sections ----------------------------------------------------------------------------


def _time_ops(fn: Callable[[str], object], keys: list[str]) -> float:
    """Seconds per call of `fn` over `keys`, best of three."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for key in keys:
            fn(key)
        best = min(best, time.perf_counter() - start)
    return best / len(keys)


def _stream(keys: list[str]) -> Iterator[str]:
    yield from keys


def bench_in_process(p: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(1)
    value = make_reply(rng)[:300]
    rows: dict[str, Any] = {}
    for n in p["sizes"]:
        keys = digest_keys(n)
        hits = [rng.choice(keys) for _ in range(p["ops"])]
        fresh = digest_keys(p["ops"] * 3, salt="new")
        row: dict[str, Any] = {"entries": n}

        cache = ResponseCache(CacheConfig(max_entries=n, max_bytes=1 << 40, ttl_seconds=TTL))
        for i, key in enumerate(keys):
            cache.set_now(key, value, f"user:{i % 1000}", str(i % 1000))
        new = _stream(fresh)
        row["ours_get_us"] = _time_ops(cache.get_now, hits) * 1e6
        row["ours_set_evicting_us"] = (
            _time_ops(lambda _k, c=cache, it=new: c.set_now(next(it), value, "user:7", "7"), hits) * 1e6
        )
        assert len(cache._entries) == n
        del cache
        gc.collect()

        lru: cachetools.LRUCache[str, str] = cachetools.LRUCache(maxsize=n)
        for key in keys:
            lru[key] = value
        new = _stream(fresh)
        row["cachetools_get_us"] = _time_ops(lru.get, hits) * 1e6
        row["cachetools_set_evicting_us"] = (
            _time_ops(lambda _k, c=lru, it=new: c.__setitem__(next(it), value), hits) * 1e6
        )
        del lru
        gc.collect()

        # the array LRU is O(n) per call: give it as many ops as the budget allows
        before_ops = max(10, min(p["ops"], p["before_budget"] // n))
        before = ArrayLRU(n)
        before.prefill(keys, value)
        new = _stream(fresh)
        row["before_ops_measured"] = before_ops
        row["before_get_us"] = _time_ops(before.get, hits[:before_ops]) * 1e6
        row["before_set_evicting_us"] = (
            _time_ops(lambda _k, c=before, it=new: c.set(next(it), value), hits[:before_ops]) * 1e6
        )
        del before, keys
        gc.collect()

        row["get_speedup_vs_before"] = ratio(row["ours_get_us"], row["before_get_us"])
        row["set_speedup_vs_before"] = ratio(row["ours_set_evicting_us"], row["before_set_evicting_us"])
        row["get_vs_cachetools"] = ratio(row["ours_get_us"], row["cachetools_get_us"])
        rows[str(n)] = row
        print(f"  in-process {n:>9,}: {json.dumps({k: round(v, 3) for k, v in row.items()})}", flush=True)
    first, last = rows[str(p["sizes"][0])], rows[str(p["sizes"][-1])]
    return {
        "value_bytes": len(value.encode()),
        "sizes": rows,
        # how much a call slows from the smallest to the largest size: 1.0 is perfectly flat
        "ours_growth_get": last["ours_get_us"] / first["ours_get_us"],
        "ours_growth_set": last["ours_set_evicting_us"] / first["ours_set_evicting_us"],
        "before_growth_get": last["before_get_us"] / first["before_get_us"],
    }


def bench_compression(p: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(2)
    datasets = {
        "generated_replies": [make_reply(rng) for _ in range(p["replies"])],
        "package_readme_markdown": real_markdown(p["replies"]),
    }
    out: dict[str, Any] = {}
    for name, replies in datasets.items():
        large = [r for r in replies if len(r.encode("utf-8")) > 1024]
        if not large:
            out[name] = {"skipped": "no reply over 1 KiB"}
            continue
        cache = ResponseCache(CacheConfig(max_bytes=1 << 40, max_entries=len(large) + 1))
        for i, reply in enumerate(large):
            cache.set_now(f"k{i}", reply)
        raw = sum(len(r.encode("utf-8")) for r in large)
        plan = sum(len(plan_encode(r)[0]) for r in large)
        gzip_only = sum(len(gzip.compress(r.encode("utf-8"))) for r in large)
        sample = large[: min(200, len(large))]
        level = cache.config.compression_level
        lz4_in = _time_ops(lambda r, lv=level: pack(r.encode("utf-8"), lv), sample)
        packed = [(pack(r.encode("utf-8"), level), len(r.encode("utf-8"))) for r in sample]
        lz4_out = _time_ops(lambda b: unpack(*b).decode("utf-8"), packed)  # type: ignore[misc]
        plan_packed = [plan_encode(r)[0] for r in sample]
        plan_in = _time_ops(plan_encode, sample)
        plan_out = _time_ops(lambda s: gzip.decompress(base64.b64decode(s)).decode("utf-8"), plan_packed)
        out[name] = {
            "replies_over_1kib": len(large),
            "mean_reply_bytes": raw / len(large),
            "raw_bytes": raw,
            "ours_lz4_stored_bytes": cache._stored_bytes,
            "ours_bytes_saved": 1 - cache._stored_bytes / raw,
            "plan_gzip_base64_bytes": plan,
            "plan_bytes_saved": 1 - plan / raw,
            "gzip_alone_bytes_saved": 1 - gzip_only / raw,
            "ours_compress_us": lz4_in * 1e6,
            "ours_decompress_us": lz4_out * 1e6,
            "plan_compress_us": plan_in * 1e6,
            "plan_decompress_us": plan_out * 1e6,
            "decompress_speedup_vs_plan": ratio(lz4_out, plan_out),
        }
        print(f"  compression {name}: saved {out[name]['ours_bytes_saved']:.1%}", flush=True)
    return out


def _vary(prompt: str, rng: random.Random) -> str:
    """How people retype the same question: other case, other spacing."""
    roll = rng.random()
    if roll < 0.15:
        return prompt.upper() if rng.random() < 0.3 else prompt.capitalize()
    if roll < 0.3:
        return "  ".join(prompt.split()) + " "
    return prompt


def bench_zipf(p: dict[str, Any]) -> dict[str, Any]:
    """Hit rate of an LRU holding `zipf_capacity` replies on Zipf(1.0)-popular prompts."""
    rng = random.Random(3)
    universe = [f"question number {i} about {_TOPICS[i % len(_TOPICS)]}" for i in range(p["zipf_universe"])]
    weights = [1.0 / rank for rank in range(1, len(universe) + 1)]
    asked = rng.choices(universe, weights=weights, k=p["zipf_requests"])
    typed = [_vary(q, rng) for q in asked]
    users = [f"u{u}" for u in range(p["zipf_users"])]
    user_weights = [1.0 / rank for rank in range(1, len(users) + 1)]
    who = rng.choices(users, weights=user_weights, k=len(typed))

    def replay(scope_of: Callable[[int], str], normalize: bool) -> float:
        cache = ResponseCache(CacheConfig(max_entries=p["zipf_capacity"], max_bytes=1 << 40))
        for i, prompt in enumerate(typed):
            if normalize:
                key = cache_key("gemini-2.5-flash", "1", scope_of(i), prompt, "")
            else:
                key = hashlib.blake2b(f"{scope_of(i)}\x00{prompt}".encode(), digest_size=16).hexdigest()
            if cache.get_now(key) is None:
                cache.set_now(key, "reply", scope_of(i))
        return cache.hits / (cache.hits + cache.misses)

    seen: set[str] = set()
    repeats = 0
    for prompt in typed:
        norm = normalize_prompt(prompt)
        repeats += norm in seen
        seen.add(norm)
    return {
        "requests": len(typed),
        "distinct_prompts": len(seen),
        "capacity": p["zipf_capacity"],
        "zipf_s": 1.0,
        "retyped_share": 0.3,
        "server_scope_hit_rate": replay(lambda i: "server:1", True),
        "server_scope_hit_rate_without_normalization": replay(lambda i: "server:1", False),
        "infinite_cache_hit_rate": repeats / len(typed),
        # per-user scope: the same questions, but a reply only serves the user who asked
        "user_scope_hit_rate": replay(lambda i: f"user:{who[i]}", True),
    }


async def _bench_actor_async(p: dict[str, Any]) -> dict[str, Any]:
    import ray

    handle = ray.remote(ResponseCache).options(num_cpus=0, max_concurrency=1000).remote(CacheConfig())
    try:
        client = CacheClient([handle])
        await handle.ping.remote()
        rng = random.Random(4)
        keys = digest_keys(p["actor_entries"])
        value = make_reply(rng)
        for start in range(0, len(keys), 1000):
            await client.set_many([(k, value, "server:1", None) for k in keys[start : start + 1000]])
        for key in keys[:50]:
            await client.get(key)

        # an empty actor call: the floor that Ray and the machine set under every get
        ping_samples = []
        for _ in range(p["actor_gets"]):
            t = time.perf_counter()
            await handle.ping.remote()
            ping_samples.append(time.perf_counter() - t)
        get_samples = []
        for _ in range(p["actor_gets"]):
            key = rng.choice(keys)
            t = time.perf_counter()
            await client.get(key)
            get_samples.append(time.perf_counter() - t)
        set_samples = []
        for i in range(p["actor_gets"] // 2):
            t = time.perf_counter()
            await client.set(f"new-{i}", value, "server:1", None)
            set_samples.append(time.perf_counter() - t)
        many_samples, one_by_one = [], []
        for _ in range(p["actor_batches"]):
            batch = rng.sample(keys, 100)
            t = time.perf_counter()
            got = await client.get_many(batch)
            many_samples.append(time.perf_counter() - t)
            assert all(v == value for v in got)
        for _ in range(max(3, p["actor_batches"] // 20)):
            batch = rng.sample(keys, 100)
            t = time.perf_counter()
            for key in batch:
                await client.get(key)
            one_by_one.append(time.perf_counter() - t)
        get = summarize_ms(get_samples)
        many = summarize_ms(many_samples)
        sequential_100 = percentile([s * 1000 for s in one_by_one], 50)
        return {
            "value_bytes": len(value.encode()),
            "empty_call": summarize_ms(ping_samples),
            "get": get,
            "set": summarize_ms(set_samples),
            "get_many_100": many,
            "sequential_100_gets_p50_ms": sequential_100,
            "get_many_speedup_vs_100_gets": ratio(many["p50_ms"], sequential_100),
        }
    finally:
        ray.kill(handle, no_restart=True)


def bench_actor(p: dict[str, Any]) -> dict[str, Any]:
    """One get through a real actor from an asyncio front-end, and get_many of 100 keys."""
    import ray

    from bot.config import Settings
    from bot.runtime import init_ray

    owns = init_ray(Settings(dashboard=False), num_cpus=2, include_dashboard=False)
    try:
        return asyncio.run(_bench_actor_async(p))
    finally:
        if owns:
            ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _bench_redis_async(port: int, p: dict[str, Any]) -> dict[str, Any]:
    import redis.asyncio as aredis

    client = aredis.Redis(host="127.0.0.1", port=port)
    try:
        rng = random.Random(4)
        keys = digest_keys(p["actor_entries"])
        value = make_reply(rng)
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.set(key, value, ex=int(TTL))
        await pipe.execute()
        for key in keys[:50]:
            await client.get(key)
        get_samples, set_samples, mget_samples = [], [], []
        for _ in range(p["redis_ops"]):
            key = rng.choice(keys)
            t = time.perf_counter()
            await client.get(key)
            get_samples.append(time.perf_counter() - t)
        for i in range(p["redis_ops"] // 2):
            t = time.perf_counter()
            await client.set(f"new-{i}", value, ex=int(TTL))
            set_samples.append(time.perf_counter() - t)
        for _ in range(p["actor_batches"]):
            batch = rng.sample(keys, 100)
            t = time.perf_counter()
            got = await client.mget(batch)
            mget_samples.append(time.perf_counter() - t)
            assert all(v is not None for v in got)
        return {
            "value_bytes": len(value.encode()),
            "get": summarize_ms(get_samples),
            "set": summarize_ms(set_samples),
            "mget_100": summarize_ms(mget_samples),
        }
    finally:
        await client.aclose()


def bench_redis(p: dict[str, Any]) -> dict[str, Any]:
    """The same gets and sets against redis-server on loopback, through redis.asyncio."""
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        return {"skipped": "redis-server not installed"}
    port = _free_port()
    server = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        probe = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 15
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    return {"skipped": "redis-server did not start"}
                time.sleep(0.05)
        probe.close()
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
        result = asyncio.run(_bench_redis_async(port, p))
        result["server"] = version.strip()
        return result
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def loop_ns_per_iteration() -> float:
    """How fast this machine runs plain Python right now, recorded at the start and end of
    a run: other work on a shared box inflates every timing, and this shows by how much."""
    start = time.perf_counter()
    for _ in range(2_000_000):
        pass
    return (time.perf_counter() - start) / 2_000_000 * 1e9


def run(size: str = "full", results_dir: Path | None = None) -> dict[str, Any]:
    if size not in PARAMS:
        raise ValueError(f"size must be one of {sorted(PARAMS)}, got {size!r}")
    p = PARAMS[size]
    with floors.watch(size) as watch:
        print(f"cache bench ({size})", flush=True)
        calibration_before = loop_ns_per_iteration()
        # the actor first: Ray is gone again before the in-process timings start
        try:
            actor = bench_actor(p)
        except Exception as exc:
            # Ray can fail to start on an overloaded box; the other sections still stand
            actor = {"error": f"Ray did not start: {type(exc).__name__}: {exc}"}
        print(f"  actor: {actor}", flush=True)
        redis_result = bench_redis(p)
        print(f"  redis: {redis_result}", flush=True)
        in_process = bench_in_process(p)
        compression = bench_compression(p)
        zipf = bench_zipf(p)
        print(f"  zipf: {zipf}", flush=True)
    largest = in_process["sizes"][str(p["sizes"][-1])]
    worst_us = max(largest["ours_get_us"], largest["ours_set_evicting_us"])
    saved = compression["generated_replies"].get("ours_bytes_saved", 0.0)
    comparisons: dict[str, Any] = {
        "in_process_get_vs_redis_get": ratio(largest["ours_get_us"] / 1000, redis_result["get"]["p50_ms"])
        if "get" in redis_result
        else None,
        # below 1.0: a Redis round trip is quicker than an actor call
        "actor_get_speedup_vs_redis_get": ratio(actor["get"]["p50_ms"], redis_result["get"]["p50_ms"])
        if "get" in redis_result and "get" in actor
        else None,
    }
    targets = {
        "in_process_us_at_largest_size": {"value": worst_us, "target": "< 5", "met": worst_us < 5},
        "actor_get_p50_ms": {
            "value": actor["get"]["p50_ms"] if "get" in actor else None,
            "target": "< 1",
            "met": actor["get"]["p50_ms"] < 1 if "get" in actor else None,
        },
        "bytes_saved_over_1kib": {"value": saved, "target": ">= 0.5", "met": saved >= 0.5},
        "zipf_hit_rate": {
            "value": zipf["server_scope_hit_rate"],
            "target": "> 0.4",
            "met": zipf["server_scope_hit_rate"] > 0.4,
        },
    }
    results = {
        "size": size,
        "calibration_empty_loop_ns": {"start": calibration_before, "end": loop_ns_per_iteration()},
        "in_process": in_process,
        "compression": compression,
        "zipf": zipf,
        "actor": actor,
        "redis": redis_result,
        "comparisons": comparisons,
        "targets": targets,
        "floors": watch.result,
    }
    path = write_results(NAME, results, results_dir)
    print(f"wrote {path}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=sorted(PARAMS), default="full")
    args = parser.parse_args(argv)
    run(args.size)


if __name__ == "__main__":
    main(sys.argv[1:])
