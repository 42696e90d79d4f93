"""Smoke test: the rate-limiter benchmark runs at a tiny size and reports sane numbers."""

from __future__ import annotations

import json
from pathlib import Path

from bench.ratelimit_bench import run


def test_the_ratelimit_bench_reports_every_design_side_by_side(ray_session: None, tmp_path: Path) -> None:
    results = run("tiny", tmp_path)
    assert json.loads((tmp_path / "ratelimit_bench.json").read_text())["results"]["size"] == "tiny"
    assert results["before_json_file"]["fsyncs_per_1000"] == 1000
    assert set(results["limits_library_in_memory"]) == {"moving_window", "sliding_window_counter"}
    tables = [results["ours_in_process"], results["ours_actor"]["FULL"], results["ours_actor"]["NORMAL"]]
    for table in tables:
        assert set(table) == {"1", "10", "100"}
        for row in table.values():
            assert row["p50_ms"] > 0 and row["checks_per_s"] > 0
            # every allowed check is committed: at least one commit, never more than one per check
            assert 0 < row["commits_per_1000"] <= 1000
    full = results["ours_actor"]["FULL"]
    # concurrent callers share commits
    assert full["100"]["fsyncs_per_1000"] < full["1"]["fsyncs_per_1000"]
    # FULL syncs every commit; NORMAL syncs once per durability interval, not per check
    assert full["1"]["fsyncs_per_1000"] == full["1"]["commits_per_1000"]
    normal = results["ours_actor"]["NORMAL"]
    assert normal["1"]["fsyncs_per_1000"] < normal["1"]["commits_per_1000"]
    assert results["fsync_floor"]["p50_ms"] > 0
    assert results["memory"]["ours_10000"]["bytes_per_user"] > 0
    for buckets in (10, 20, 60):
        assert 0 < results["precision"][f"buckets_{buckets}"]["share_of_ideal"] <= 1.0
    assert set(results["ratios"]) and set(results["targets"])
    # SQLite and PostgreSQL on loopback side by side (PostgreSQL is installed by .ci/run)
    backends = results["state_backends"]
    assert backends["skipped"] == {}
    for backend in ("sqlite", "postgres"):
        assert set(backends[backend]) == {"1", "10", "100"}
        for row in backends[backend].values():
            assert row["p99_ms"] >= row["p50_ms"] > 0 and row["commits_per_s"] > 0
            assert 0 < row["commits_per_1000"] <= 1000
