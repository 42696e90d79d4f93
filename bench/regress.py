"""The regression check: a short load test whose ratios (raycord against the naive
pipeline, measured in the same run) are compared with a committed baseline.

`python -m bench.regress` exits 1 when a ratio is worse than the baseline by more than
the tolerance; `--update` records the current ratios as the new baseline. Ratios, not
times, so the check means the same on a busy or a quiet machine. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE = Path(__file__).resolve().parent / "baseline.json"

#: the short load: long enough for the cache and batching to matter, short enough to run often
SHORT_LOAD: dict[str, Any] = {"users": 40, "duration": 12.0, "ramp_up": 2.0, "llm_latency": 0.05}


@dataclass(frozen=True)
class Check:
    name: str
    #: +1 when a larger value is better, -1 when a smaller one is
    direction: int


CHECKS = (
    Check("throughput_x", +1),
    Check("p95_latency_ratio", -1),
    Check("db_writes_ratio", -1),
    Check("file_writes_ratio", -1),
)


def compare(current: dict[str, float], baseline: dict[str, float], tolerance: float) -> list[str]:
    """What got worse than `baseline` by more than `tolerance` (a fraction), as messages."""
    failures = []
    for check in CHECKS:
        if check.name not in baseline:
            continue
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


def measure(load: dict[str, Any]) -> dict[str, float]:
    from bench.loadtest import run

    with tempfile.TemporaryDirectory(prefix="raycord-regress-") as tmp:
        summary = run("full", Path(tmp), name="regress", progress=False, **load)
    return {check.name: float(summary["ratios"][check.name]) for check in CHECKS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.regress", description=__doc__)
    parser.add_argument("--tolerance", type=float, default=0.25, help="allowed worsening, as a fraction")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--update", action="store_true", help="record this run as the baseline")
    args = parser.parse_args(argv)
    current = measure(SHORT_LOAD)
    print(json.dumps(current, indent=2))
    if args.update or not args.baseline.exists():
        args.baseline.write_text(json.dumps({"load": SHORT_LOAD, "ratios": current}, indent=2) + "\n")
        print(f"baseline written to {args.baseline}")
        return 0
    baseline = json.loads(args.baseline.read_text())["ratios"]
    failures = compare(current, baseline, args.tolerance)
    for failure in failures:
        print(f"REGRESSION {failure}")
    if not failures:
        print("no ratio worse than the baseline beyond the tolerance")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
