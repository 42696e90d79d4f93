"""Smoke run of the load test at a tiny size, so it never rots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.loadtest import run


@pytest.mark.asyncio
async def test_the_tiny_load_test_runs_both_pipelines_and_writes_its_report(
    ray_session: None, tmp_path: Path
) -> None:
    import asyncio

    summary = await asyncio.to_thread(run, "tiny", tmp_path, "smoke")
    for label in ("raycord", "naive"):
        figures = summary[label]
        assert figures["requests"] > 0
        assert figures["error_rate"] == 0.0
        assert figures["llm_calls"] > 0
    # the naive design writes a file per check and a row per event; raycord batches both
    assert summary["naive"]["file_writes"] == summary["naive"]["requests"]
    assert summary["naive"]["db_writes"] == summary["naive"]["requests"]
    assert summary["raycord"]["db_writes"] < summary["naive"]["db_writes"]
    assert set(summary["ratios"]) == {
        "throughput_x",
        "p95_latency_ratio",
        "db_writes_ratio",
        "file_writes_ratio",
        "file_syncs_ratio",
    }
    # syncs are counted per store, from each store's own stats
    ours = summary["raycord"]
    assert set(ours["stores"]) == {"context", "ratelimit"}
    assert ours["file_syncs"] == sum(io["syncs"] for io in ours["stores"].values())
    assert ours["file_writes"] == sum(io["commits"] for io in ours["stores"].values())
    assert summary["naive"]["stores"]["ratelimit"]["syncs"] == summary["naive"]["requests"]
    # each process's memory as RSS, and as users count it: PSS (shared pages split) and USS
    by_process = ours["memory_peak_mb_by_process"]
    assert {"driver", "context-0", "ratelimit-0"} <= set(by_process)
    assert all(0 < m["uss"] <= m["pss"] and m["rss"] > 0 for m in by_process.values())
    assert 0 < ours["uss_peak_mb"] <= ours["pss_peak_mb"]
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert doc["results"]["config"]["users"] == 5
    report = (tmp_path / "smoke.md").read_text().splitlines()
    assert report[0] == "# Load test `smoke`"
    # the run's own floors judge it, at the top of its report and in its JSON
    assert report[2].startswith("**INVALID run**" if doc["valid"] is False else "Valid run")
    assert doc["valid"] == summary["floors"]["valid"]
    assert "peak PSS, all processes" in "\n".join(report)
    assert (tmp_path / "smoke.png").stat().st_size > 0
