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
    # the SDK works in this process (the in-process gateway), and that CPU is counted
    assert bounded["cpu_seconds"] > 0
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
    shared = results["shared_quota"]
    # 3 front-ends x 4 users against a quota of 6 a minute: the gateway spends it once and
    # answers the rest "busy"; front-ends spending it on their own run into 429s
    assert shared["gateway"]["upstream_429s"] == 0
    assert shared["gateway"]["answered"] == 6 and shared["gateway"]["busy"] == 6
    assert shared["per_frontend"]["upstream_429s"] > 0
    fair = results["fairness"]
    assert fair["gateway"]["light_wait"]["n"] == fair["fifo"]["light_wait"]["n"] == 4
    streamed = results["stream_overhead"]
    assert streamed["gateway"]["round_trips_per_reply"] >= 2
    assert streamed["sdk_in_process"]["reply"]["n"] == 4
    cost = results["workload_cost"]
    per = cost["per_1000_messages"]
    assert cost["messages"] == 40 and cost["failed"] == 0
    assert 0 < per["upstream_calls"] <= 1_000 and per["prompt_tokens"] > 0 and per["output_tokens"] > 0
    # a conversation's later turns find their prefix in the implicit cache, which costs less
    assert 0 < per["cached_prompt_tokens"] < per["prompt_tokens"]
    assert 0 < per["cost_usd"] < per["cost_usd_without_implicit_caching"]
