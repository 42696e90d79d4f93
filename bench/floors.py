"""The machine's floors, measured in the run they judge: whether a benchmark's figures
can be trusted.

`watch()` wraps a benchmark run: before it, an empty actor call, a bare fsync and a
process ping-pong are timed and the load average and CPU steal read; over the run, the
CPU steal, the load average and the CPU used by processes other than the benchmark's own
(this process and its descendants: its Ray, its servers) are measured. A run is INVALID
when a floor is over `TOLERANCE` times this machine kind's quiet floor, or other
processes used more than `OTHER_CPU_MAX_CORES` of a core.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import psutil

from bench.common import percentile

__all__ = [
    "OTHER_CPU_MAX_CORES",
    "QUIET_FLOORS",
    "TOLERANCE",
    "FloorWatch",
    "header",
    "measure_floors",
    "verdict",
    "watch",
]

#: quiet floors of the machine kind the benchmarks run on (2-core CI VM), in ms, p50.
#: Each is taken with the machine idle (load average under 0.3, `../shared/tools/quiet`
#: first, nothing else running) by `python -m bench.floors`, as the p50 of the sizes
#: `measure_floors` uses, over five runs; the lowest run's figure is kept. None: not
#: recorded yet, so that floor is reported but judges nothing.
QUIET_FLOORS: dict[str, float | None] = {
    #: the issue's quiet-machine runs: 0.53-0.94 ms p50
    "empty_actor_call_ms": 0.9,
    #: five quiet runs of `python -m bench.floors` (2026-12-01): 0.152-0.247 ms
    "fsync_ms": 0.15,
    #: the same five runs: 0.065-0.085 ms
    "ping_pong_ms": 0.065,
}
#: a floor over this many times its quiet value makes the run invalid
TOLERANCE = 2.0
#: CPU other processes may use during a run, in cores
OTHER_CPU_MAX_CORES = 0.10

_ECHO = "import sys\nfor line in sys.stdin:\n    sys.stdout.write(line)\n    sys.stdout.flush()\n"


def empty_actor_call_ms(calls: int = 300, start_ray: bool = True) -> float | None:
    """p50 of sequential empty calls to a fresh actor. Without a running Ray, one is
    started for the measure and stopped after it (`start_ray`), or None is returned."""
    import ray

    if not ray.is_initialized():
        if not start_ray:
            return None
        from bot.config import Settings
        from bot.runtime import init_ray

        init_ray(Settings(dashboard=False), num_cpus=2, include_dashboard=False)
        try:
            return empty_actor_call_ms(calls)
        finally:
            ray.shutdown()

    @ray.remote(num_cpus=0)
    class _Empty:
        def ping(self) -> None:
            return None

    actor = _Empty.remote()  # type: ignore[attr-defined]
    try:
        ray.get(actor.ping.remote())
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            ray.get(actor.ping.remote())
            samples.append((time.perf_counter() - start) * 1000)
    finally:
        ray.kill(actor)
    return percentile(samples, 50)


def fsync_ms(samples: int = 100, directory: str | None = None) -> float:
    """p50 of one 4 KiB write and fsync of a file in `directory` (the temp directory,
    where the benchmarks keep their state)."""
    times = []
    with tempfile.NamedTemporaryFile(dir=directory, prefix="floor-fsync-") as f:
        block = b"x" * 4096
        for _ in range(samples):
            start = time.perf_counter()
            f.write(block)
            f.flush()
            os.fsync(f.fileno())
            times.append((time.perf_counter() - start) * 1000)
    return percentile(times, 50)


def ping_pong_ms(rounds: int = 500) -> float:
    """p50 of one line sent to a child process and echoed back through pipes."""
    child = subprocess.Popen(
        [sys.executable, "-u", "-c", _ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        child.stdin.write(b"warm\n")
        child.stdout.readline()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            child.stdin.write(b"x\n")
            child.stdout.readline()
            times.append((time.perf_counter() - start) * 1000)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()
    return percentile(times, 50)


def _cpu_jiffies() -> tuple[float, float]:
    """(all, steal) CPU time of the machine from /proc/stat; (0, 0) where it is absent."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return 0.0, 0.0
    values = [float(v) for v in fields]
    # guest time is already counted in user time
    total = sum(values[:8])
    steal = values[7] if len(values) > 7 else 0.0
    return total, steal


def _steal_share(before: tuple[float, float], after: tuple[float, float]) -> float:
    total = after[0] - before[0]
    return (after[1] - before[1]) / total if total > 0 else 0.0


def _process_cpu() -> dict[int, tuple[float, float]]:
    """{pid: (create time, user + system CPU seconds)} of every process readable."""
    out = {}
    for proc in psutil.process_iter(["create_time", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is not None:
            out[proc.pid] = (proc.info["create_time"], times.user + times.system)
    return out


def _own_pids() -> set[int]:
    me = psutil.Process()
    pids = {me.pid}
    with contextlib.suppress(psutil.Error):
        pids.update(child.pid for child in me.children(recursive=True))
    return pids


def measure_floors(start_ray: bool = True) -> dict[str, float | None]:
    """The three floors, now: empty actor call, bare fsync, process ping-pong."""
    return {
        "empty_actor_call_ms": empty_actor_call_ms(start_ray=start_ray),
        "fsync_ms": fsync_ms(),
        "ping_pong_ms": ping_pong_ms(),
    }


def verdict(floors: dict[str, Any]) -> list[str]:
    """Why a run with these floors cannot be trusted; empty when it can."""
    reasons = []
    for name, quiet in QUIET_FLOORS.items():
        measured = floors.get("measured", {}).get(name)
        if quiet is not None and measured is not None and measured > TOLERANCE * quiet:
            reasons.append(f"{name} {measured:.3g} ms is over {TOLERANCE:g}x the quiet floor of {quiet:g} ms")
    other = floors.get("other_cpu_cores")
    if other is not None and other > OTHER_CPU_MAX_CORES:
        reasons.append(f"other processes used {other:.2f} of a core (at most {OTHER_CPU_MAX_CORES:g})")
    return reasons


def header(floors: dict[str, Any] | None) -> list[str]:
    """The lines that open a report: INVALID with its reasons, or the floors it held."""
    if not floors:
        return ["**No floors recorded for this run: it cannot be judged.**"]
    measured = floors["measured"]
    shown = ", ".join(
        f"{name} {value:.3g} ms" if value is not None else f"{name} -" for name, value in measured.items()
    )
    facts = (
        f"floors: {shown}; load average {floors['load_before']:.2f} before, "
        f"{floors['load_after']:.2f} after; "
        f"CPU steal {floors['steal_before']:.1%} before, {floors['steal_during']:.1%} during; "
        f"other processes {floors['other_cpu_cores']:.2f} cores"
    )
    if floors["reasons"]:
        return [f"**INVALID run**: {'; '.join(floors['reasons'])}.", "", facts]
    return [f"Valid run ({facts})."]


class FloorWatch:
    """Floors before a run, the machine's state over it; `result` once stopped."""

    def __init__(self, start_ray: bool = True) -> None:
        self.start_ray = start_ray
        self.result: dict[str, Any] = {}
        self._t0 = 0.0
        self._jiffies = (0.0, 0.0)
        self._cpu: dict[int, tuple[float, float]] = {}

    def start(self) -> None:
        load_before = os.getloadavg()[0]
        jiffies = _cpu_jiffies()
        measured = measure_floors(self.start_ray)
        steal_before = _steal_share(jiffies, _cpu_jiffies())
        self.result = {"measured": measured, "load_before": load_before, "steal_before": steal_before}
        self._t0 = time.monotonic()
        self._jiffies = _cpu_jiffies()
        self._cpu = _process_cpu()

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self._t0
        own = _own_pids()
        after = _process_cpu()
        other = 0.0
        for pid, (created, seconds) in after.items():
            if pid in own:
                continue
            was = self._cpu.get(pid)
            # a pid reused by a new process counts from zero
            other += seconds - was[1] if was is not None and was[0] == created else seconds
        self.result.update(
            {
                "load_after": os.getloadavg()[0],
                "steal_during": _steal_share(self._jiffies, _cpu_jiffies()),
                "other_cpu_cores": other / wall if wall > 0 else 0.0,
                "wall_seconds": wall,
                "quiet_floors": dict(QUIET_FLOORS),
            }
        )
        self.result["reasons"] = verdict(self.result)
        self.result["valid"] = not self.result["reasons"]
        return self.result


@contextlib.contextmanager
def watch(size: str = "full") -> Iterator[FloorWatch]:
    """`with watch(size) as floors: run...`, then `floors.result` holds the run's floors.
    A tiny (smoke) run measures the actor call only on a Ray already running."""
    w = FloorWatch(start_ray=size != "tiny")
    w.start()
    try:
        yield w
    finally:
        w.stop()


def main() -> None:
    """Print this machine's floors now (how the quiet floors above are taken)."""
    import json

    print(json.dumps(measure_floors(), indent=2))


if __name__ == "__main__":
    main()
