"""Smoke test: the context benchmark runs at its tiny size and reports what it should."""

from __future__ import annotations

import json
from pathlib import Path

from bench.context_bench import run


def test_context_bench_tiny_reports_every_section_with_sane_values(tmp_path: Path) -> None:
    results = run("tiny", tmp_path)
    assert json.loads((tmp_path / "context_bench.json").read_text())["results"]["size"] == "tiny"
    build = results["build"]
    for name in ("ours_hit", "ours_miss", "before_hit", "before_miss"):
        assert build[name]["n"] > 0 and build[name]["p50_ms"] > 0
    stale = build["stale_builds_after_append"]
    assert stale["ours"] == 0 and stale["before"] == stale["checked"] > 0
    for measured in results["memory"].values():
        assert measured["overhead_bytes_per_conversation"] > 0
        assert measured["before"]["overhead_bytes_per_conversation"] > 0
    for design in ("ours", "before"):
        samples = results["day"][design]["samples"]
        assert [s["hour"] for s in samples] == list(range(1, 25))
        assert all(s["rss_mib"] > 0 for s in samples)
    assert results["day"]["ours"]["cleaned_conversations"] > 0
    rows = results["cleanup"]["rows"]
    assert [r["stale"] for r in rows] == [0, 10, 50, 200]
    assert set(results["summary"]) >= {"build_hit_p50_ms", "cleanup_speedup_at_most_stale"}
    # SQLite and PostgreSQL on loopback side by side (PostgreSQL is installed by .ci/run)
    backends = results["state_backends"]
    assert backends["skipped"] == {}
    for backend in ("sqlite", "postgres"):
        assert set(backends[backend]) == {"1", "10", "100"}
        for row in backends[backend].values():
            assert row["p99_ms"] >= row["p50_ms"] > 0 and row["commits_per_s"] > 0
            assert 0 < row["commits_per_1000"] <= 1000
