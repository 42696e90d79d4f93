"""Smoke run of the injected-clock soak at a tiny size."""

from __future__ import annotations

from pathlib import Path

from bench.soak import run


def test_the_tiny_soak_runs_a_simulated_span_and_samples_rss_each_hour(tmp_path: Path) -> None:
    result = run("tiny", tmp_path)
    assert [s["hour"] for s in result["rss_by_hour"]] == [1.0, 2.0]
    assert all(s["rss_mb"] > 0 for s in result["rss_by_hour"])
    assert (tmp_path / "soak-tiny.json").exists()
