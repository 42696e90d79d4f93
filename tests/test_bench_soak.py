"""Smoke run of the injected-clock soak at a tiny size."""

from __future__ import annotations

from pathlib import Path

from bench.soak import run


def test_the_tiny_soak_runs_a_simulated_span_and_samples_each_process_rss_each_hour(
    ray_session: None, tmp_path: Path
) -> None:
    result = run("tiny", tmp_path)
    assert [s["hour"] for s in result["rss_by_hour"]] == [1.0, 2.0]
    for sample in result["rss_by_hour"]:
        assert set(sample["rss_mb"]) == {"driver", "cache-0", "context-0", "ratelimit-0", "analytics-0"}
        assert all(mb > 0 for mb in sample["rss_mb"].values())
        # memory as users count it, beside RSS: shared pages split (PSS), and each process's own (USS)
        assert set(sample["pss_mb"]) == set(sample["uss_mb"]) == set(sample["rss_mb"])
        assert all(0 < sample["uss_mb"][p] <= sample["pss_mb"][p] for p in sample["rss_mb"])
    assert (tmp_path / "soak-tiny.json").exists()
    assert set(result["floors"]["measured"]) == {"empty_actor_call_ms", "fsync_ms", "ping_pong_ms"}
