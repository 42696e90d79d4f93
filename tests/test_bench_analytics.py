"""Smoke test of the analytics ingest benchmark at its tiny size (no timing thresholds)."""

from __future__ import annotations

from pathlib import Path

from bench.analytics_bench import run


def test_analytics_bench_tiny_reports_every_design(ray_session: None, tmp_path: Path) -> None:
    results = run("tiny", tmp_path)
    assert (tmp_path / "analytics_bench.json").is_file()
    designs = (
        "before_insert_per_event",
        "executemany",
        "storage_ceiling_arrow_insert",
        "sink_in_process",
        "sink_actor_arrow_batches",
        "sink_actor_end_to_end",
    )
    for name in designs:
        assert results[name]["events"] > 0
        assert results[name]["events_per_second"] > 0
    # one transaction per event before; the sink groups a flush of batches into one
    assert results["before_insert_per_event"]["transactions_per_10k_events"] == 10_000
    assert results["sink_in_process"]["transactions_per_10k_events"] <= 20
    assert results["sink_actor_end_to_end"]["record_us"] > 0
    assert results["sink_actor_end_to_end"]["build_and_record_us"] > 0
    assert results["record_in_isolation"]["convert_to_arrow_us"] > 0
    # the sustained runs report their rate per quarter, to show whether it holds
    for name in ("storage_ceiling_arrow_insert", "sink_in_process", "sink_actor_arrow_batches"):
        quarters = results[name]["events_per_second_by_quarter"]
        assert len(quarters) == 4 and all(q > 0 for q in quarters)
    assert set(results["ratios"]) == {
        "sink_vs_before_events_per_second",
        "sink_vs_executemany_events_per_second",
        "sink_vs_storage_ceiling_events_per_second",
        "sink_actor_vs_storage_ceiling_events_per_second",
    }
