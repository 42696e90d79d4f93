"""Smoke test: the LLM benchmark runs at its tiny size and reports what it promises."""

from __future__ import annotations

from pathlib import Path

from bench.llm_bench import run


def test_the_llm_benchmark_runs_tiny(tmp_path: Path) -> None:
    results = run("tiny", tmp_path)
    assert (tmp_path / "llm_bench.json").is_file()
    bounded = results["throughput_by_bound"]["4"]
    assert bounded["upstream_calls"] == bounded["calls"]
    assert bounded["peak_in_flight"] == 4
    assert bounded["server_peak_in_flight"] <= 4
    # the SDK works in its own process, and that CPU is counted
    assert bounded["sdk_process_cpu_seconds"] > 0
    # and so is the fake server's, which shares the cores
    assert bounded["fake_server_cpu_seconds"] > 0
    assert bounded["cores_needed_at_target"] > 0
    assert results["identical_prompts"]["ours"]["upstream_calls"] == 1
    assert results["identical_prompts"]["naive_client_per_call"]["upstream_calls"] == 3
    lag = results["streaming_loop_lag"]
    assert lag["upstream_calls"] == lag["streams"] == 40
    assert lag["lag"]["n"] > 0 and lag["lag"]["p99_ms"] >= 0
    assert results["sequential_before"]["calls_per_s"] > 0
    assert results["sequential_before"]["first_call_ms"] > 0
    assert results["speedup_vs_sequential"] > 0
    assert results["sdk_direct_sequential"]["upstream_calls"] == 4
