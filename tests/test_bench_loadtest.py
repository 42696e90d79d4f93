"""Smoke run of the load test at a tiny size, so it never rots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    # raycord runs as production does, the LLM in the gateway actor
    assert "llm-0" in ours["cpu_ms_per_reply"]
    assert ours["cpu_ms_per_reply"]["load-test memory sampler, in the driver"] >= 0
    assert ours["driver_cpu_ms_per_reply_by_thread"]["event loop"] > 0
    assert ours["service_calls_per_reply"] >= ours["round_trips_per_reply"] > 0
    _check_stages(ours)
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert doc["results"]["config"]["users"] == 5
    report = (tmp_path / "smoke.md").read_text().splitlines()
    assert report[0] == "# Load test `smoke`"
    # the run's own floors judge it, at the top of its report and in its JSON
    assert report[2].startswith("**INVALID run**" if doc["valid"] is False else "Valid run")
    assert doc["valid"] == summary["floors"]["valid"]
    assert "peak PSS, all processes" in "\n".join(report)
    assert any(line.startswith("| stage admit (") for line in report)
    assert (tmp_path / "smoke.png").stat().st_size > 0


def _check_stages(ours: dict[str, Any]) -> None:
    """The per-stage figures are there and agree with the whole: every reply passes
    validation, admission and recording; a stage inside a reply never outlasts it."""
    stages = ours["stage_latency_ms"]
    replies = ours["requests"] - ours["errors"]
    expected = {"validate", "admit", "cache", "llm", "upstream", "llm_transport", "reply", "record"}
    assert expected <= set(stages)
    for stage in ("validate", "admit", "record"):
        assert stages[stage]["count"] == replies
    # a miss goes upstream, a hit does not; each upstream call is inside its LLM stage
    assert stages["llm"]["count"] == stages["upstream"]["count"] == stages["llm_transport"]["count"]
    assert stages["llm"]["count"] == replies - round(ours["cache_hit_rate"] * replies)
    for figures in stages.values():
        assert 0 <= figures["p50"] <= figures["p95"] <= figures["p99"]
        assert figures["count"] <= replies
    # the admit stage is part of every reply: its percentiles lie under the replies'
    assert stages["admit"]["p50"] <= ours["latency_ms"]["p50"]
    assert stages["admit"]["p99"] <= ours["latency_ms"]["p99"]
    assert stages["upstream"]["p50"] <= stages["llm"]["p50"]
    assert ours["overhead_ms"]["p50"] <= ours["latency_ms"]["p50"]
