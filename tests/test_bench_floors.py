"""The floors a benchmark run records, and the verdict they give on its figures."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from bench import floors


def _floors(**measured: float | None) -> dict[str, object]:
    """Floors as a run records them: each at its quiet value unless given."""
    quiet = {name: 1.0 if value is None else value for name, value in floors.QUIET_FLOORS.items()}
    return {"measured": {**quiet, **measured}, "other_cpu_cores": 0.0}


def test_a_run_within_twice_the_quiet_floors_and_alone_is_valid() -> None:
    at_limit = {n: 2 * v for n, v in floors.QUIET_FLOORS.items() if v is not None}
    assert floors.verdict(_floors(**at_limit)) == []


def test_a_floor_over_twice_its_quiet_value_or_busy_neighbours_make_a_run_invalid() -> None:
    quiet_call = floors.QUIET_FLOORS["empty_actor_call_ms"]
    assert quiet_call is not None
    slow = floors.verdict(_floors(empty_actor_call_ms=2.5 * quiet_call))
    assert len(slow) == 1 and slow[0].startswith("empty_actor_call_ms ")
    assert "is over 2x" in slow[0]
    busy = floors.verdict({**_floors(), "other_cpu_cores": 0.3})
    assert len(busy) == 1 and "0.30 of a core" in busy[0]


def test_a_floor_without_a_recorded_quiet_value_judges_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(floors.QUIET_FLOORS, "fsync_ms", None)
    assert floors.verdict(_floors(fsync_ms=1e9)) == []


#: burns half a CPU second, then waits to be stopped
_BURN = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\ntime.sleep(120)"
#: starts the burner apart and leaves it: it is nobody's descendant, as another job would be
_DETACH = (
    "import subprocess, sys\n"
    "d = subprocess.DEVNULL\n"
    "p = subprocess.Popen([sys.executable, '-c', sys.argv[1]], start_new_session=True,\n"
    "                     stdin=d, stdout=d, stderr=d)\n"
    "print(p.pid)"
)


def test_a_watched_run_measures_every_floor_and_counts_other_processes_cpu(ray_session: None) -> None:
    burner: psutil.Process | None = None
    try:
        with floors.watch("tiny") as watch:
            out = subprocess.run(
                [sys.executable, "-c", _DETACH, _BURN], capture_output=True, text=True, check=True, timeout=60
            )
            burner = psutil.Process(int(out.stdout))
            deadline = time.monotonic() + 60
            while burner.cpu_times().user + burner.cpu_times().system < 0.5:
                assert time.monotonic() < deadline, "the burner did not run"
                time.sleep(0.05)
    finally:
        if burner is not None:
            burner.kill()
    result = watch.result
    assert all(value is not None and value > 0 for value in result["measured"].values())
    assert {"load_before", "load_after", "steal_before", "steal_during"} <= set(result)
    # the detached burner's half second is counted among the other processes' CPU
    assert result["other_cpu_cores"] * result["wall_seconds"] >= 0.45
    assert result["valid"] == (result["reasons"] == [])
    lines = floors.header(result)
    assert lines[0].startswith("**INVALID run**" if result["reasons"] else "Valid run")
