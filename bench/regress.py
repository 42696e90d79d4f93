"""The regression check: a short load test whose ratios (raycord against the naive
pipeline, measured in the same run) are compared with a committed baseline.

Write counts are compared per message served (a run that serves more messages makes
more writes without being worse), and each ratio's tolerance comes from the spread of
the quiet runs the baseline was recorded from, stored with it.

`python -m bench.regress` exits 1 when a ratio is worse than the baseline by more than
its tolerance, and 2 when the run's own floors say the machine was too busy to judge.
`--record N` runs the short load N times on a quiet machine and writes the baseline: the
mean of each ratio and a tolerance from its spread. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE = Path(__file__).resolve().parent / "baseline.json"

#: the short load: long enough for the cache and batching to matter, short enough to run often
SHORT_LOAD: dict[str, Any] = {"users": 40, "duration": 12.0, "ramp_up": 2.0, "llm_latency": 0.05}
#: quiet runs a baseline is recorded from by default (the issue asks for five)
BASELINE_RUNS = 5
#: a tolerance is this many standard deviations of the quiet runs, or their whole range
#: when wider, so a figure that moved as much between quiet runs is never flagged
SPREAD_SIGMAS = 3.0
#: the least tolerance, as a fraction: counts that came out identical in every quiet run
#: (a batch of writes more or less) still get room for one more
MIN_TOLERANCE = 0.05
#: the tolerance of a baseline recorded before tolerances were stored with it
LEGACY_TOLERANCE = 0.25


@dataclass(frozen=True)
class Check:
    name: str
    #: +1 when a larger value is better, -1 when a smaller one is
    direction: int


CHECKS = (
    Check("throughput_x", +1),
    Check("p95_latency_ratio", -1),
    Check("db_writes_per_message_ratio", -1),
    Check("file_writes_per_message_ratio", -1),
    Check("file_syncs_per_message_ratio", -1),
)


def per_message_ratios(summary: dict[str, Any]) -> dict[str, float]:
    """The checked ratios of one load-test summary: writes are divided by the messages
    each pipeline served before raycord's are set against naive's."""
    ours, naive = summary["raycord"], summary["naive"]

    def per_message(side: dict[str, Any], key: str) -> float:
        return float(side[key]) / side["requests"] if side["requests"] else 0.0

    def against(key: str) -> float:
        theirs = per_message(naive, key)
        return per_message(ours, key) / theirs if theirs else float("inf")

    return {
        "throughput_x": float(summary["ratios"]["throughput_x"]),
        "p95_latency_ratio": float(summary["ratios"]["p95_latency_ratio"]),
        "db_writes_per_message_ratio": against("db_writes"),
        "file_writes_per_message_ratio": against("file_writes"),
        "file_syncs_per_message_ratio": against("file_syncs"),
    }


def derive_tolerances(runs: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """(mean, tolerance as a fraction of the mean) of each checked ratio over quiet runs.

    Raises:
        ValueError: fewer than two runs (one run has no spread).
    """
    if len(runs) < 2:
        raise ValueError(f"a baseline needs at least two runs to measure their spread, got {len(runs)}")
    means, tolerances = {}, {}
    for check in CHECKS:
        values = [run[check.name] for run in runs]
        mean = statistics.fmean(values)
        spread = max(SPREAD_SIGMAS * statistics.stdev(values), max(values) - min(values))
        means[check.name] = mean
        tolerances[check.name] = max(MIN_TOLERANCE, spread / abs(mean)) if mean else MIN_TOLERANCE
    return means, tolerances


def compare(
    current: dict[str, float], baseline: dict[str, float], tolerances: dict[str, float] | float
) -> list[str]:
    """What got worse than `baseline` by more than its tolerance (a fraction), as messages."""
    failures = []
    for check in CHECKS:
        if check.name not in baseline or check.name not in current:
            continue
        tolerance = (
            tolerances if isinstance(tolerances, float) else tolerances.get(check.name, LEGACY_TOLERANCE)
        )
        was, now = baseline[check.name], current[check.name]
        if check.direction > 0:
            worse = now < was * (1 - tolerance)
        else:
            worse = now > was * (1 + tolerance)
        if worse:
            failures.append(
                f"{check.name}: {now:.4g} against a baseline of {was:.4g} (tolerance {tolerance:.0%})"
            )
    return failures


def load_baseline(path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(ratios, tolerances) of a baseline file; one recorded before tolerances were stored
    gets `LEGACY_TOLERANCE` for each ratio."""
    doc = json.loads(path.read_text())
    ratios = {k: float(v) for k, v in doc["ratios"].items()}
    tolerances = doc.get("tolerances") or dict.fromkeys(ratios, LEGACY_TOLERANCE)
    return ratios, {k: float(v) for k, v in tolerances.items()}


def baseline_doc(load: dict[str, Any], runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The baseline file's content from `runs` ({"ratios": ..., "floors": ...} each)."""
    means, tolerances = derive_tolerances([run["ratios"] for run in runs])
    return {
        "load": load,
        "ratios": means,
        "tolerances": tolerances,
        "tolerance_rule": (
            f"max({SPREAD_SIGMAS:g} standard deviations, the range) of {len(runs)} quiet runs, "
            f"as a fraction of the mean, at least {MIN_TOLERANCE:.0%}"
        ),
        "runs": list(runs),
    }


def measure(load: dict[str, Any]) -> dict[str, Any]:
    """One short load test: its checked ratios and its floors."""
    from bench.loadtest import run

    with tempfile.TemporaryDirectory(prefix="raycord-regress-") as tmp:
        summary = run("full", Path(tmp), name="regress", progress=False, **load)
    return {"ratios": per_message_ratios(summary), "floors": summary.get("floors", {})}


def _record(args: argparse.Namespace) -> int:
    runs = []
    for i in range(args.record):
        result = measure(SHORT_LOAD)
        floors = result["floors"]
        print(f"run {i + 1}/{args.record}: {json.dumps(result['ratios'])}")
        if not floors.get("valid") and not args.force:
            print(f"INVALID run, no baseline written: {'; '.join(floors.get('reasons', []))}")
            return 2
        runs.append(result)
    args.baseline.write_text(json.dumps(baseline_doc(SHORT_LOAD, runs), indent=2) + "\n")
    print(f"baseline of {len(runs)} runs written to {args.baseline}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.regress", description=__doc__)
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument(
        "--record",
        type=int,
        nargs="?",
        const=BASELINE_RUNS,
        metavar="N",
        help=f"record the baseline from N quiet runs (default {BASELINE_RUNS})",
    )
    parser.add_argument(
        "--force", action="store_true", help="record even from runs their floors call invalid"
    )
    parser.add_argument(
        "--tolerance", type=float, help="one tolerance for every ratio, overriding the baseline's"
    )
    args = parser.parse_args(argv)
    if args.record is not None:
        return _record(args)
    current = measure(SHORT_LOAD)
    print(json.dumps(current["ratios"], indent=2))
    if not current["floors"].get("valid"):
        print(f"INVALID run, not judged: {'; '.join(current['floors'].get('reasons', []))}")
        return 2
    ratios, tolerances = load_baseline(args.baseline)
    failures = compare(
        current["ratios"], ratios, args.tolerance if args.tolerance is not None else tolerances
    )
    for failure in failures:
        print(f"REGRESSION {failure}")
    if not failures:
        print("no ratio worse than the baseline beyond its tolerance")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
