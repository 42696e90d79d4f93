"""`python -m bench.run_all`: every benchmark alone, and BENCHMARKS.md's generated
sections rebuilt from the results while the prose stays."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from bench import run_all, tables


def test_a_tiny_run_rebuilds_its_section_from_its_result_and_keeps_the_prose(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    shutil.copy(run_all.BENCHMARKS_MD, md)
    before = md.read_text()
    results = tmp_path / "results"
    status = run_all.main(
        ["--tiny", "--only", "context_bench", "--results-dir", str(results), "--benchmarks-md", str(md)]
    )
    assert status == 0
    doc = json.loads((results / "context_bench.json").read_text())
    assert doc["results"]["size"] == "tiny" and doc["valid"] is not None
    after = md.read_text()
    start = after.index("<!-- generated: context_bench -->")
    section = after[start : after.index("<!-- /generated: context_bench -->")]
    # the section opens with the run's verdict, names its command, and shows its figures
    assert ("**INVALID run**" in section) != doc["valid"]
    assert "`python -m bench.context_bench --size full`" in section
    build = doc["results"]["build"]
    hit, miss = build["ours_hit"]["p50_ms"], build["ours_miss"]["p50_ms"]
    assert f"| build p50, hit / miss (ms) | {tables.fmt(hit)} / {tables.fmt(miss)} |" in section
    # a benchmark not run says so; everything outside the markers is unchanged
    assert "*Not measured yet: `python -m bench.cache_bench --size full`" in after

    def prose(text: str) -> str:
        return re.sub(r"(<!-- generated: [^>]+ -->\n).*?(<!-- /generated)", r"\1\2", text, flags=re.DOTALL)

    assert prose(after) == prose(before)


def test_a_document_without_a_section_for_a_benchmark_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no generated section for cache_bench"):
        run_all.regenerate("# Benchmarks\n", run_all.RUNS, tiny=True, results_dir=tmp_path)


def _load_result(results: Path, name: str, raycord: dict[str, object], naive: dict[str, object]) -> None:
    doc = {
        "name": name,
        "valid": True,
        "when": "2026-12-01T15:00:00+00:00",
        "results": {"raycord": raycord, "naive": naive},
    }
    (results / f"{name}.json").write_text(json.dumps(doc))


def test_the_load_targets_are_judged_from_their_runs_results(tmp_path: Path) -> None:
    _load_result(
        tmp_path,
        "loadtest-100u-think5-300ms",
        {"file_syncs": 9, "overhead_ms": {"p50": 2.5, "p99": 12.0}},
        {"file_syncs": 100},
    )
    _load_result(tmp_path, "loadtest-100u-0ms", {"throughput_rps": 250.0}, {"throughput_rps": 100.0})
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:3]
        for line in tables.load_targets(tmp_path)[2:]
    }
    assert rows["fsyncs vs naive, 100 users, think 5 s (≤ 0.10)"] == ["0.09", "met"]
    assert rows["overhead excluding the LLM p50, 100 users, think 5 s (≤ 3 ms)"] == ["2.5", "met"]
    assert rows["overhead excluding the LLM p99, 100 users, think 5 s (≤ 10 ms)"] == ["12", "not met"]
    assert rows["closed-loop throughput vs naive, 100 users, LLM 0 ms (at least 3x)"] == ["2.5", "not met"]
    # a run not made is said to be so, not judged
    assert rows["fsyncs vs naive, 1,000 users, think 30 s (≤ 0.10)"] == ["-", "not measured"]
