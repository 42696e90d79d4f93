"""Smoke test of the cache benchmark at its tiny size, so it never rots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import cache_bench


@pytest.mark.ray
def test_cache_bench_tiny_writes_every_section_with_sane_values(ray_session: None, tmp_path: Path) -> None:
    results = cache_bench.run("tiny", tmp_path)

    saved = json.loads((tmp_path / "cache_bench.json").read_text())
    assert saved["name"] == "cache_bench" and saved["results"]["size"] == "tiny"
    assert set(results) >= {"in_process", "compression", "zipf", "actor", "redis", "comparisons", "targets"}

    for row in results["in_process"]["sizes"].values():
        for column in ("ours_get_us", "ours_set_evicting_us", "cachetools_get_us", "before_get_us"):
            assert row[column] > 0
    generated = results["compression"]["generated_replies"]
    assert 0 < generated["ours_lz4_stored_bytes"] < generated["raw_bytes"]
    assert generated["plan_gzip_base64_bytes"] > 0
    zipf = results["zipf"]
    assert 0 < zipf["server_scope_hit_rate"] <= zipf["infinite_cache_hit_rate"] < 1
    assert zipf["user_scope_hit_rate"] <= zipf["server_scope_hit_rate"]
    actor = results["actor"]
    assert actor["get"]["n"] > 0 and actor["get"]["p50_ms"] > 0
    assert actor["get_many_100"]["p50_ms"] > 0
    redis = results["redis"]
    assert "get" in redis or redis == {"skipped": "redis-server not installed"}
    assert {
        "in_process_us_at_largest_size",
        "actor_get_p50_ms",
        "bytes_saved_over_1kib",
        "zipf_hit_rate",
    } <= set(results["targets"])
