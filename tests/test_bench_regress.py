"""The regression check compares ratios with the baseline in the direction each improves."""

from __future__ import annotations

import json

from bench.regress import BASELINE, CHECKS, compare

BASE = {"throughput_x": 2.0, "p95_latency_ratio": 0.5, "db_writes_ratio": 0.01, "file_writes_ratio": 0.1}


def test_a_ratio_within_tolerance_passes() -> None:
    current = {**BASE, "throughput_x": 1.7, "p95_latency_ratio": 0.6}
    assert compare(current, BASE, tolerance=0.25) == []


def test_lower_throughput_and_higher_latency_or_writes_fail() -> None:
    current = {
        "throughput_x": 1.4,
        "p95_latency_ratio": 0.7,
        "db_writes_ratio": 0.02,
        "file_writes_ratio": 0.1,
    }
    failures = compare(current, BASE, tolerance=0.25)
    assert [f.split(":")[0] for f in failures] == ["throughput_x", "p95_latency_ratio", "db_writes_ratio"]


def test_improvements_never_fail() -> None:
    current = {
        "throughput_x": 9.0,
        "p95_latency_ratio": 0.1,
        "db_writes_ratio": 0.0,
        "file_writes_ratio": 0.0,
    }
    assert compare(current, BASE, tolerance=0.0) == []


def test_the_committed_baseline_holds_every_checked_ratio() -> None:
    ratios = json.loads(BASELINE.read_text())["ratios"]
    assert {c.name for c in CHECKS} <= set(ratios)
