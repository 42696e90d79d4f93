"""`python -m bench.run_all`: every benchmark alone, and BENCHMARKS.md's generated
sections rebuilt from the results while the prose stays."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from bench import run_all


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
    build_hit = doc["results"]["summary"]["build_hit_p50_ms"]
    assert f"| summary.build_hit_p50_ms | {build_hit:.4g} |" in section
    # a benchmark not run says so; everything outside the markers is unchanged
    assert "*Not measured yet: `python -m bench.cache_bench --size full`" in after

    def prose(text: str) -> str:
        return re.sub(r"(<!-- generated: [^>]+ -->\n).*?(<!-- /generated)", r"\1\2", text, flags=re.DOTALL)

    assert prose(after) == prose(before)


def test_a_document_without_a_section_for_a_benchmark_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no generated section for cache_bench"):
        run_all.regenerate("# Benchmarks\n", run_all.RUNS, tiny=True, results_dir=tmp_path)
