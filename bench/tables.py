"""BENCHMARKS.md's tables, rendered from each benchmark's JSON result.

Each renderer takes a result's `results` object and returns the Markdown table lines that
`python -m bench.run_all` puts between the benchmark's generated markers, so no figure in
BENCHMARKS.md is copied by hand. A result written before a field existed renders `-` there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

Renderer = Callable[[dict[str, Any]], list[str]]


def fmt(value: Any) -> str:
    """A figure as BENCHMARKS.md shows it: 4 significant digits, thousands separated."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def get(tree: Any, *path: str | int) -> Any:
    """`tree[path[0]][path[1]]...`, or None where a step is missing."""
    for key in path:
        if isinstance(tree, dict):
            tree = tree.get(key, tree.get(str(key)))
        else:
            return None
    return tree


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return lines


def pair(a: Any, b: Any, sep: str = " / ") -> str:
    return f"{fmt(a)}{sep}{fmt(b)}"


def ratio(a: Any, b: Any) -> Any:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return a / b
    return None


def percent(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, int | float) else "-"


def met(value: Any, ok: bool | None) -> str:
    return f"{fmt(value)} ({'met' if ok else 'not met'})" if ok is not None else fmt(value)


def cache_bench(r: dict[str, Any]) -> list[str]:
    sizes = get(r, "in_process", "sizes") or {}
    lines = table(
        ("entries", "raycord get / set (µs)", "cachetools get / set (µs)", "plan's array LRU get / set (µs)"),
        (
            (
                f"{int(n):,}",
                pair(s.get("ours_get_us"), s.get("ours_set_evicting_us")),
                pair(s.get("cachetools_get_us"), s.get("cachetools_set_evicting_us")),
                pair(s.get("before_get_us"), s.get("before_set_evicting_us")),
            )
            for n, s in sizes.items()
        ),
    )
    a, redis = r.get("actor", {}), r.get("redis", {})
    lines += [
        "",
        *table(
            ("through one process boundary, p50 / p99 (ms)", "raycord cache actor", "Redis on loopback"),
            (
                ("empty call", pair(get(a, "empty_call", "p50_ms"), get(a, "empty_call", "p99_ms")), "-"),
                (
                    "get",
                    pair(get(a, "get", "p50_ms"), get(a, "get", "p99_ms")),
                    pair(get(redis, "get", "p50_ms"), get(redis, "get", "p99_ms")),
                ),
                (
                    "set",
                    pair(get(a, "set", "p50_ms"), get(a, "set", "p99_ms")),
                    pair(get(redis, "set", "p50_ms"), get(redis, "set", "p99_ms")),
                ),
                (
                    "100 keys in one call",
                    pair(get(a, "get_many_100", "p50_ms"), get(a, "get_many_100", "p99_ms")),
                    pair(get(redis, "mget_100", "p50_ms"), get(redis, "mget_100", "p99_ms")),
                ),
                ("100 keys, one get each, in sequence (p50)", fmt(a.get("sequential_100_gets_p50_ms")), "-"),
            ),
        ),
    ]
    comp = r.get("compression", {})
    lines += [
        "",
        *table(
            (
                "replies over 1 KiB",
                "lz4 bytes saved",
                "plan's gzip+base64 saved",
                "lz4 / plan decompress (µs)",
            ),
            (
                (
                    name.replace("_", " "),
                    percent(c.get("ours_bytes_saved")),
                    percent(c.get("plan_bytes_saved")),
                    pair(c.get("ours_decompress_us"), c.get("plan_decompress_us")),
                )
                for name, c in comp.items()
            ),
        ),
    ]
    z = r.get("zipf", {})
    t = r.get("targets", {})
    lines += [
        "",
        *table(
            ("figure", "value"),
            (
                (
                    f"Zipf hit rate at server scope ({fmt(z.get('requests'))} requests, capacity "
                    f"{fmt(z.get('capacity'))})",
                    percent(z.get("server_scope_hit_rate")),
                ),
                (
                    "the same without prompt normalization",
                    percent(z.get("server_scope_hit_rate_without_normalization")),
                ),
                ("the same at per-user scope", percent(z.get("user_scope_hit_rate"))),
                ("an unbounded cache's hit rate", percent(z.get("infinite_cache_hit_rate"))),
                *(
                    (
                        f"target: {name.replace('_', ' ')} {spec.get('target', '')}",
                        met(spec.get("value"), spec.get("met")),
                    )
                    for name, spec in t.items()
                ),
            ),
        ),
    ]
    return lines


def context_bench(r: dict[str, Any]) -> list[str]:
    b = r.get("build", {})
    mem = r.get("memory", {})
    day = r.get("day", {})
    stale = b.get("stale_builds_after_append") or {}
    rows: list[Sequence[Any]] = [
        (
            "build p50, hit / miss (ms)",
            pair(get(b, "ours_hit", "p50_ms"), get(b, "ours_miss", "p50_ms")),
            pair(get(b, "before_hit", "p50_ms"), get(b, "before_miss", "p50_ms")),
        ),
        (
            "stale builds right after an append",
            f"{fmt(stale.get('ours'))} of {fmt(stale.get('checked'))}",
            f"{fmt(stale.get('before'))} of {fmt(stale.get('checked'))}",
        ),
    ]
    rows += [
        (
            f"bytes per conversation beyond its text, {int(n):,} conversations",
            fmt(m.get("overhead_bytes_per_conversation")),
            fmt(get(m, "before", "overhead_bytes_per_conversation")),
        )
        for n, m in mem.items()
    ]
    rows.append(
        (
            "RSS over a simulated day, hour 4 → 24 (MiB)",
            f"{fmt(get(day, 'ours', 'rss_mib_hour_4'))} → {fmt(get(day, 'ours', 'rss_mib_hour_24'))}",
            f"{fmt(get(day, 'before', 'rss_mib_hour_4'))} → {fmt(get(day, 'before', 'rss_mib_hour_24'))}",
        )
    )
    rows += [
        (
            f"cleanup, {fmt(row['stale'])} stale of {fmt(row['stale'] + row['kept'])} (ms)",
            f"{fmt(row['ours_ms'])} (durable deletes)",
            f"{fmt(row['before_ms'])} (memory only)",
        )
        for row in get(r, "cleanup", "rows") or []
    ]
    lines = table(("figure", "raycord", "plan's design (5-min TTL, full-scan cleanup)"), rows)
    return [*lines, "", *backends(r, "appends")]


def backends(r: dict[str, Any], what: str) -> list[str]:
    """The state backends side by side: the store's durable path through SQLite and
    PostgreSQL, by concurrent callers."""
    found = r.get("state_backends") or {}
    rows = []
    for backend in ("sqlite", "postgres"):
        for callers, s in (found.get(backend) or {}).items():
            rows.append(
                (
                    f"{backend}, {callers} caller{'s' if str(callers) != '1' else ''}",
                    pair(s.get("p50_ms"), s.get("p99_ms")),
                    fmt(s.get(f"{what}_per_s")),
                    fmt(s.get("commits_per_1000")),
                    fmt(s.get("fsyncs_per_1000")),
                )
            )
    skipped = found.get("skipped") or {}
    rows += [(f"{backend}: skipped", str(why), "-", "-", "-") for backend, why in skipped.items()]
    return table(
        (
            f"durable {what} through the store",
            "p50 / p99 (ms)",
            f"{what}/s",
            "commits per 1000",
            "fsyncs per 1000",
        ),
        rows,
    )


def ratelimit_bench(r: dict[str, Any]) -> list[str]:
    def row(label: str, s: dict[str, Any] | None) -> tuple[str, ...]:
        s = s or {}
        return (
            label,
            pair(s.get("p50_ms"), s.get("p99_ms")),
            fmt(s.get("checks_per_s")),
            fmt(s.get("fsyncs_per_1000")),
            "yes" if s.get("durable", True) else "no",
        )

    rows = [
        row('plan\'s "before": JSON state file rewritten and fsynced per check', r.get("before_json_file"))
    ]
    for name, s in (r.get("limits_library_in_memory") or {}).items():
        rows.append(row(f"`limits` {name.replace('_', ' ')}, memory only", s))
    for callers, s in (r.get("ours_in_process") or {}).items():
        rows.append(row(f"raycord in process, {callers} callers", s))
    for mode, by in (r.get("ours_actor") or {}).items():
        for callers, s in by.items():
            rows.append(row(f"raycord through the actor, {callers} callers, synchronous={mode}", s))
    lines = table(("design", "check p50 / p99 (ms)", "checks/s", "fsyncs per 1000", "durable"), rows)
    lines += ["", *backends(r, "checks")]
    mem, prec = r.get("memory") or {}, r.get("precision") or {}
    facts: list[Sequence[Any]] = [
        (f"memory, {name.replace('_', ' ')} (bytes per user)", fmt(m.get("bytes_per_user")))
        for name, m in mem.items()
    ]
    facts += [
        (
            f"admitted, {name.removeprefix('buckets_')} buckets per window (share of an ideal sliding log)",
            percent(p.get("share_of_ideal")),
        )
        for name, p in prec.items()
        if isinstance(p, dict)
    ]
    facts += [(f"ratio: {k.replace('_', ' ')}", fmt(v)) for k, v in (r.get("ratios") or {}).items()]
    facts += [
        (f"target: {k.replace('_', ' ')}", "met" if v else "not met")
        for k, v in (r.get("targets") or {}).items()
    ]
    return [*lines, "", *table(("figure", "value"), facts)]


ANALYTICS_DESIGNS = (
    ("before_insert_per_event", 'plan\'s "before": one INSERT per event'),
    ("executemany", "`executemany`, one transaction per flush"),
    (
        "storage_ceiling_arrow_insert",
        "DuckDB alone: prebuilt Arrow tables, the sink's statements (storage ceiling)",
    ),
    ("sink_in_process", "raycord sink in process, fed the client's Arrow batches"),
    ("sink_actor_arrow_batches", "raycord sink actor, fed through Ray as a backlogged client sends"),
    (
        "sink_actor_end_to_end",
        "raycord end to end from one front-end: build, `record()`, batch, actor, commit",
    ),
)


def analytics_bench(r: dict[str, Any]) -> list[str]:
    lines = table(
        ("design", "events", "events/s", "transactions per 10k events"),
        (
            (
                label,
                fmt(get(r, key, "events")),
                fmt(get(r, key, "events_per_second")),
                fmt(get(r, key, "transactions_per_10k_events")),
            )
            for key, label in ANALYTICS_DESIGNS
            if key in r
        ),
    )
    t = r.get("targets") or {}
    iso = r.get("record_in_isolation") or {}
    rate = get(r, "sink_in_process", "events_per_second")
    tx = get(r, "sink_in_process", "transactions_per_10k_events")
    rec = iso.get("record_us")
    facts = [
        (
            "front-end `record()` of a built event (µs)",
            met(rec, rec <= t["record_us_max"]) if rec is not None and "record_us_max" in t else fmt(rec),
        ),
        ("front-end: build (validate) and record one event (µs)", fmt(iso.get("build_and_record_us"))),
        ("front-end: convert one event to Arrow (µs)", fmt(iso.get("convert_to_arrow_us"))),
        (
            f"target: sink ≥ {fmt(t.get('events_per_second_min'))} events/s",
            "met" if rate is not None and rate >= t.get("events_per_second_min", 0) else "not met",
        ),
        (
            f"target: ≤ {fmt(t.get('transactions_per_10k_max'))} transactions per 10k events",
            "met" if tx is not None and tx <= t.get("transactions_per_10k_max", 0) else "not met",
        ),
        *((f"ratio: {k.replace('_', ' ')}", fmt(v)) for k, v in (r.get("ratios") or {}).items()),
    ]
    return [*lines, "", *table(("figure", "value"), facts)]


def soak(r: dict[str, Any]) -> list[str]:
    hours = r.get("rss_by_hour") or []
    if not hours:
        return ["*No hourly samples in this result.*"]
    pick = [hours[0], hours[len(hours) // 2 - 1], hours[-1]]
    growth = r.get("rss_growth_second_half_mb") or {}
    lines = table(
        ("process (RSS, MiB)", *(f"hour {fmt(h['hour'])}" for h in pick), "growth, second half"),
        (
            (name, *(fmt(h["rss_mb"].get(name)) for h in pick), f"{growth.get(name, 0):+.1f}")
            for name in hours[-1]["rss_mb"]
        ),
    )
    facts = (
        (
            "users / simulated hours / messages per user a day",
            f"{fmt(r.get('users'))} / {fmt(r.get('hours'))} / {fmt(r.get('messages_per_user_day'))}",
        ),
        (
            "cache entries at hour " + fmt(pick[1]["hour"]) + " / " + fmt(pick[2]["hour"]),
            pair(pick[1].get("cache_entries"), pick[2].get("cache_entries")),
        ),
        ("cache bound (entries)", fmt(r.get("cache_max_entries"))),
        (
            "context conversations in memory at hour " + fmt(pick[1]["hour"]) + " / " + fmt(pick[2]["hour"]),
            pair(
                pick[1].get("context_conversations_in_memory"), pick[2].get("context_conversations_in_memory")
            ),
        ),
        ("context memory budget (MiB)", fmt((r.get("context_memory_budget_bytes") or 0) / 2**20)),
    )
    return [*lines, "", *table(("figure", "value"), facts)]


def llm_bench(r: dict[str, Any]) -> list[str]:
    bounds = r.get("throughput_by_bound") or {}
    seq = r.get("sequential_before") or {}
    lines = table(
        (
            "gateway in process, concurrency bound",
            "calls/s",
            "share of bound ÷ latency",
            "CPU per call (ms)",
            "cores the rate needs",
        ),
        (
            (
                f"bound {b}",
                fmt(t.get("calls_per_s")),
                fmt(t.get("ratio_to_target")),
                fmt(1000 * t["cpu_seconds"] / t["calls"]) if t.get("calls") else "-",
                fmt(t.get("cores_needed_at_target")),
            )
            for b, t in bounds.items()
        ),
    )
    same = r.get("identical_prompts") or {}
    lag, idle = r.get("streaming_loop_lag") or {}, r.get("idle_loop_lag") or {}
    facts: list[Sequence[Any]] = [
        ("sequential awaits (the plan's before), calls/s", fmt(seq.get("calls_per_s"))),
        (
            "a new SDK client per call, CPU per call (ms)",
            fmt(get(r, "cpu_per_call_ms", "naive_client_per_call")),
        ),
        (
            "one call alone, share of the server's latency (ours / the bare SDK)",
            pair(r.get("single_call_ceiling_ratio"), r.get("sdk_direct_ceiling_ratio")),
        ),
        (
            "upstream calls per caller, 100 identical concurrent prompts (ours / a client per call)",
            pair(
                get(same, "upstream_calls_per_caller", "ours"),
                get(same, "upstream_calls_per_caller", "naive_client_per_call"),
            ),
        ),
        (
            f"event-loop lag p99 with {fmt(lag.get('streams'))} streams at once / idle (ms)",
            pair(get(lag, "lag", "p99_ms"), idle.get("p99_ms")),
        ),
    ]
    lines += ["", *table(("figure", "value"), facts)]
    quota = r.get("shared_quota") or {}
    if quota:
        lines += [
            "",
            *table(
                (
                    f"{fmt(quota.get('frontends'))} front-ends, {fmt(quota.get('users'))} users in all, the "
                    f"server allowing {fmt(quota.get('quota_per_minute'))} requests a minute",
                    "one gateway",
                    "each front-end on its own",
                ),
                (
                    (
                        what.replace("_", " "),
                        fmt(get(quota, "gateway", what)),
                        fmt(get(quota, "per_frontend", what)),
                    )
                    for what in (
                        "answered",
                        "busy",
                        "failed",
                        "upstream_calls",
                        "upstream_429s",
                        "retries",
                        "seconds",
                    )
                ),
            ),
        ]
    fair = r.get("fairness") or {}
    if fair:
        lines += [
            "",
            *table(
                (
                    f"light users' wait while one user floods {fmt(fair.get('flood'))} requests (ms)",
                    "gateway (turns by user)",
                    "first in, first out",
                ),
                (
                    (
                        q,
                        fmt(get(fair, "gateway", "light_wait", f"{q}_ms")),
                        fmt(get(fair, "fifo", "light_wait", f"{q}_ms")),
                    )
                    for q in ("p50", "p95", "p99")
                ),
            ),
        ]
    streamed = r.get("stream_overhead") or {}
    if streamed:
        lines += [
            "",
            *table(
                ("a streamed reply (ms)", "through the gateway actor", "the SDK in the caller's process"),
                (
                    *(
                        (
                            f"{q}",
                            fmt(get(streamed, "gateway", "reply", f"{q}_ms")),
                            fmt(get(streamed, "sdk_in_process", "reply", f"{q}_ms")),
                        )
                        for q in ("p50", "p95", "p99")
                    ),
                    (
                        "actor round trips per reply",
                        fmt(get(streamed, "gateway", "round_trips_per_reply")),
                        "-",
                    ),
                    ("overhead of the actor, p50", fmt(streamed.get("overhead_p50_ms")), "-"),
                ),
            ),
        ]
    cost = r.get("workload_cost") or {}
    per = cost.get("per_1000_messages") or {}
    if per:
        lines += [
            "",
            *table(
                (
                    f"per 1,000 messages of the load test's workload "
                    f"({fmt(cost.get('messages'))} sent, {cost.get('model')})",
                    "value",
                ),
                ((k.replace("_", " "), fmt(v)) for k, v in per.items()),
            ),
        ]
    return lines


RENDERERS: dict[str, Renderer] = {
    "llm_bench": llm_bench,
    "cache_bench": cache_bench,
    "context_bench": context_bench,
    "ratelimit_bench": ratelimit_bench,
    "analytics_bench": analytics_bench,
    "soak-full": soak,
    "soak-tiny": soak,
}


def _load(results_dir: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    path = results_dir / f"{name}.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return doc, doc["results"]


#: issue #22's targets for the load test: (the run, what is compared, its figure, the bound)
LOAD_TARGETS: tuple[tuple[str, str, Callable[[dict[str, Any]], Any], Callable[[Any], bool]], ...] = (
    (
        "loadtest-100u-think5-300ms",
        "fsyncs vs naive, 100 users, think 5 s (≤ 0.10)",
        lambda r: ratio(get(r, "raycord", "file_syncs"), get(r, "naive", "file_syncs")),
        lambda v: v <= 0.10,
    ),
    (
        "loadtest-1000u-300ms",
        "fsyncs vs naive, 1,000 users, think 30 s (≤ 0.10)",
        lambda r: ratio(get(r, "raycord", "file_syncs"), get(r, "naive", "file_syncs")),
        lambda v: v <= 0.10,
    ),
    (
        "loadtest-100u-think5-300ms",
        "overhead excluding the LLM p50, 100 users, think 5 s (≤ 3 ms)",
        lambda r: get(r, "raycord", "overhead_ms", "p50"),
        lambda v: v <= 3.0,
    ),
    (
        "loadtest-100u-think5-300ms",
        "overhead excluding the LLM p99, 100 users, think 5 s (≤ 10 ms)",
        lambda r: get(r, "raycord", "overhead_ms", "p99"),
        lambda v: v <= 10.0,
    ),
    (
        "loadtest-100u-0ms",
        "closed-loop throughput vs naive, 100 users, LLM 0 ms (at least 3x)",
        lambda r: ratio(get(r, "raycord", "throughput_rps"), get(r, "naive", "throughput_rps")),
        lambda v: v >= 3.0,
    ),
)


def load_targets(results_dir: Path) -> list[str]:
    """The load test's targets as their runs measured them, each with its run's verdict."""
    rows = []
    for name, what, figure, bound in LOAD_TARGETS:
        found = _load(results_dir, name)
        if found is None:
            rows.append((what, "-", "not measured", "-"))
            continue
        doc, results = found
        value = figure(results)
        verdict = "-" if value is None else ("met" if bound(value) else "not met")
        validity = "valid" if doc.get("valid") else ("INVALID" if "valid" in doc else "no floors")
        rows.append((what, fmt(value), verdict, f"`{name}` ({doc['when'][:16]}, {validity})"))
    return table(("target", "measured", "verdict", "run"), rows)
