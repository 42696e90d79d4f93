"""Small shared tools for the benchmarks: percentiles, timing loops, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

#: where results go; `bench.run_all` points a run elsewhere through RAYCORD_BENCH_RESULTS
RESULTS_DIR = Path(os.environ.get("RAYCORD_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean in milliseconds of samples given in seconds."""
    ms = [s * 1000.0 for s in samples_s]
    return {
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms) if ms else 0.0,
        "n": len(ms),
    }


def per_op_seconds(fn: Callable[[], Any], ops: int, repeat: int = 3) -> float:
    """Best-of-`repeat` seconds per call of `fn`, which performs `ops` operations."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / ops


def rss_bytes(pid: int | None = None) -> int:
    return psutil.Process(pid or os.getpid()).memory_info().rss


def ratio(ours: float, theirs: float) -> float:
    """theirs / ours: how many times better we are when lower is better."""
    return theirs / ours if ours else float("inf")


def write_results(name: str, results: dict[str, Any], results_dir: Path | None = None) -> Path:
    """Write `results` with machine facts to `<results_dir>/<name>.json`; returns the path."""
    out_dir = results_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    run_floors = results.get("floors") or {}
    doc = {
        "name": name,
        # whether the run's own floors say its figures can be trusted (bench.floors)
        "valid": run_floors.get("valid"),
        "invalid_reasons": run_floors.get("reasons", ["no floors recorded"]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": results,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def size_cli(run: Callable[[str], dict[str, Any]], description: str | None, sizes: Sequence[str]) -> None:
    """`python -m bench.<name> --size ...`: run the benchmark and print its results as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=sorted(sizes), default="full")
    print(json.dumps(run(parser.parse_args().size), indent=2, default=str))
