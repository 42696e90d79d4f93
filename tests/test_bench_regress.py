"""The regression check: per-message ratios, compared with the baseline in the direction
each improves, with tolerances from the spread of the baseline's quiet runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.regress import (
    BASELINE,
    CHECKS,
    LEGACY_TOLERANCE,
    MIN_TOLERANCE,
    baseline_doc,
    compare,
    derive_tolerances,
    load_baseline,
    per_message_ratios,
)

BASE = {
    "throughput_x": 2.0,
    "p95_latency_ratio": 0.5,
    "db_writes_per_message_ratio": 0.01,
    "file_writes_per_message_ratio": 0.1,
    "file_syncs_per_message_ratio": 0.05,
}


def test_a_ratio_within_tolerance_passes() -> None:
    current = {**BASE, "throughput_x": 1.7, "p95_latency_ratio": 0.6}
    assert compare(current, BASE, tolerances=0.25) == []


def test_lower_throughput_and_higher_latency_or_writes_fail() -> None:
    current = {
        **BASE,
        "throughput_x": 1.4,
        "p95_latency_ratio": 0.7,
        "db_writes_per_message_ratio": 0.02,
        "file_syncs_per_message_ratio": 0.1,
    }
    failures = compare(current, BASE, tolerances=0.25)
    assert [f.split(":")[0] for f in failures] == [
        "throughput_x",
        "p95_latency_ratio",
        "db_writes_per_message_ratio",
        "file_syncs_per_message_ratio",
    ]


def test_improvements_never_fail() -> None:
    current = {
        "throughput_x": 9.0,
        "p95_latency_ratio": 0.1,
        "db_writes_per_message_ratio": 0.0,
        "file_writes_per_message_ratio": 0.0,
        "file_syncs_per_message_ratio": 0.0,
    }
    assert compare(current, BASE, tolerances=0.0) == []


def test_writes_are_compared_per_message_not_per_run() -> None:
    # raycord served twice the messages with twice the writes: per message, the same as naive
    summary = {
        "raycord": {"requests": 200, "db_writes": 20, "file_writes": 40, "file_syncs": 10},
        "naive": {"requests": 100, "db_writes": 10, "file_writes": 20, "file_syncs": 20},
        "ratios": {"throughput_x": 2.0, "p95_latency_ratio": 0.5},
    }
    ratios = per_message_ratios(summary)
    assert ratios["db_writes_per_message_ratio"] == 1.0
    assert ratios["file_writes_per_message_ratio"] == 1.0
    assert ratios["file_syncs_per_message_ratio"] == 0.25


def test_tolerances_follow_the_spread_of_the_quiet_runs() -> None:
    steady = {name: 1.0 for name in BASE}
    runs = [
        {**steady, "throughput_x": 2.0, "p95_latency_ratio": 0.4},
        {**steady, "throughput_x": 2.0, "p95_latency_ratio": 0.6},
        {**steady, "throughput_x": 2.0, "p95_latency_ratio": 0.5},
    ]
    means, tolerances = derive_tolerances(runs)
    assert means["p95_latency_ratio"] == pytest.approx(0.5)
    # a ratio that moved between quiet runs gets room for at least that much movement ...
    assert tolerances["p95_latency_ratio"] >= (0.6 - 0.4) / 0.5
    assert compare({**means, "p95_latency_ratio": 0.6}, means, tolerances) == []
    # ... and one that never moved gets the least tolerance, so a real change shows
    assert tolerances["throughput_x"] == MIN_TOLERANCE
    assert compare({**means, "throughput_x": 1.8}, means, tolerances) != []
    with pytest.raises(ValueError, match="at least two runs"):
        derive_tolerances(runs[:1])


def test_a_recorded_baseline_keeps_its_runs_and_reads_back(tmp_path: Path) -> None:
    runs = [{"ratios": {**BASE, "throughput_x": x}, "floors": {"valid": True}} for x in (1.9, 2.0, 2.1)]
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline_doc({"users": 40}, runs)))
    ratios, tolerances = load_baseline(path)
    assert ratios["throughput_x"] == pytest.approx(2.0)
    assert set(tolerances) == {c.name for c in CHECKS}
    assert len(json.loads(path.read_text())["runs"]) == 3


def test_the_committed_baseline_reads_back_with_a_tolerance_for_each_ratio() -> None:
    ratios, tolerances = load_baseline(BASELINE)
    assert ratios and set(ratios) <= set(tolerances)
    if "tolerances" not in json.loads(BASELINE.read_text()):
        # recorded before tolerances were stored: every ratio gets the legacy one
        assert set(tolerances.values()) == {LEGACY_TOLERANCE}
