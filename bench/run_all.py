"""Every benchmark and load test, one after another and alone, then BENCHMARKS.md's
generated sections rebuilt from their JSON results.

`python -m bench.run_all` runs each command BENCHMARKS.md documents in its own process
(a fresh Ray each), waits for it, and only then starts the next; before each it waits for
the machine to be quiet (`../shared/tools/quiet`, when present). The generated sections
sit between `<!-- generated: NAME -->` and `<!-- /generated: NAME -->` markers; the prose
around them is hand-written and left alone. `--tiny` runs every command at its smoke-test
size; `--only` picks some; `--render-only` rebuilds the sections from results already there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import floors, tables
from bench.common import RESULTS_DIR

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
#: the environment variable that sends a run's results elsewhere (bench.common reads it)
RESULTS_ENV = "RAYCORD_BENCH_RESULTS"
#: the shared tool that waits for the machine to be quiet (exit 0) or gives up (exit 1)
QUIET_TOOL = ROOT.parent / "shared" / "tools" / "quiet"

_LOAD_TINY = [
    "--size",
    "tiny",
    "--users",
    "5",
    "--duration",
    "2",
    "--ramp-up",
    "0.5",
    "--llm-latency",
    "0.01",
]


@dataclass(frozen=True)
class Run:
    #: the JSON result's name (`<results>/<name>.json`) and the marker of its section
    name: str
    #: the module and arguments BENCHMARKS.md documents
    module: str
    args: tuple[str, ...]
    #: the arguments of the smoke-test size
    tiny_args: tuple[str, ...]
    #: the result's name at the smoke-test size, when it differs
    tiny_name: str = ""

    def command(self, tiny: bool = False) -> list[str]:
        return [sys.executable, "-m", self.module, *(self.tiny_args if tiny else self.args)]

    def shown(self) -> str:
        """The command as BENCHMARKS.md shows it."""
        prefix = f"python -m {self.module}"
        return " ".join([prefix, *self.args])

    def result_name(self, tiny: bool) -> str:
        return (self.tiny_name or self.name) if tiny else self.name


def _load(name: str, *args: str) -> Run:
    return Run(name, "bench.loadtest", (*args, "--name", name), (*_LOAD_TINY, "--name", name))


def _micro(module: str) -> Run:
    name = module.removeprefix("bench.")
    return Run(name, module, ("--size", "full"), ("--size", "tiny"))


RUNS: tuple[Run, ...] = (
    _micro("bench.cache_bench"),
    _micro("bench.context_bench"),
    _micro("bench.ratelimit_bench"),
    _micro("bench.analytics_bench"),
    _micro("bench.llm_bench"),
    _load(
        "loadtest-100u-300ms", "--users", "100", "--duration", "30", "--ramp-up", "5", "--llm-latency", "0.3"
    ),
    _load("loadtest-100u-0ms", "--users", "100", "--duration", "30", "--ramp-up", "5", "--llm-latency", "0"),
    _load(
        "loadtest-100u-think5-300ms",
        *("--users", "100", "--duration", "30", "--ramp-up", "5", "--think", "5", "--llm-latency", "0.3"),
    ),
    _load(
        "loadtest-1000u-300ms",
        *("--users", "1000", "--duration", "60", "--ramp-up", "30", "--think", "30", "--llm-latency", "0.3"),
    ),
    Run("soak-full", "bench.soak", ("--size", "full"), ("--size", "tiny"), tiny_name="soak-tiny"),
)


def run_one(run: Run, tiny: bool, results_dir: Path) -> int:
    """Run one benchmark in its own process and wait for it; its exit status."""
    env = {**os.environ, RESULTS_ENV: str(results_dir)}
    print(f"== {' '.join(run.command(tiny)[1:])}", flush=True)
    return subprocess.run(run.command(tiny), cwd=ROOT, env=env, check=False).returncode


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, f"{path}.{key}" if path else str(key))
    elif isinstance(value, bool | int | float) or value is None:
        yield path, value


def _table(name: str, results: dict[str, Any], shown: str) -> list[str]:
    if "raycord" in results and "naive" in results:
        from bench.loadtest import LoadConfig, markdown

        report = markdown(name, LoadConfig(**results["config"]), results, shown).splitlines()
        return [line for line in report if line.startswith("|")]
    if name in tables.RENDERERS:
        return tables.RENDERERS[name](results)
    # a benchmark without a renderer: every numeric leaf of its result
    keys = [k for k in results if k not in ("floors", "size")]
    rows = [(path, value) for key in keys for path, value in _leaves(results[key], key)]
    return ["| figure | value |", "|---|---|", *(f"| {path} | {tables.fmt(value)} |" for path, value in rows)]


def render_section(run: Run, tiny: bool, results_dir: Path) -> list[str]:
    """The generated lines of one benchmark's section, from its JSON result."""
    name = run.result_name(tiny)
    path = results_dir / f"{name}.json"
    if not path.exists():
        return [f"*Not measured yet: `{run.shown()}` (`python -m bench.run_all`).*"]
    doc = json.loads(path.read_text())
    results = doc["results"]
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return [
        *floors.header(results.get("floors")),
        "",
        f"`{run.shown()}`: {doc['when']}, {doc['machine']['cpus']} CPUs, `{where}`.",
        "",
        *_table(name, results, run.shown()),
    ]


def regenerate(text: str, runs: tuple[Run, ...], tiny: bool, results_dir: Path) -> str:
    """`text` with every generated section rebuilt; the rest is kept as it is.

    Raises:
        ValueError: a run's section, or the load test's targets (`load-targets`), has no
            markers in `text`.
    """
    for run in runs:
        text = _replace(text, run.name, "\n".join(render_section(run, tiny, results_dir)))
    return _replace(text, "load-targets", "\n".join(tables.load_targets(results_dir)))


def _replace(text: str, name: str, body: str) -> str:
    """`text` with the generated section `name` holding `body`.

    Raises:
        ValueError: `text` has no markers for `name`.
    """
    pattern = re.compile(
        rf"(<!-- generated: {re.escape(name)} -->\n).*?(<!-- /generated: {re.escape(name)} -->)", re.DOTALL
    )
    if not pattern.search(text):
        raise ValueError(f"BENCHMARKS.md has no generated section for {name}")
    return pattern.sub(lambda m: f"{m.group(1)}{body}\n{m.group(2)}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="every command at its smoke-test size")
    parser.add_argument("--only", help="comma-separated result names to run (default: all)")
    parser.add_argument("--render-only", action="store_true", help="rebuild the sections, run nothing")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--benchmarks-md", type=Path, default=BENCHMARKS_MD)
    parser.add_argument(
        "--quiet-tool",
        type=Path,
        default=QUIET_TOOL,
        help="run before each full-size benchmark, which is skipped if the machine never gets quiet",
    )
    args = parser.parse_args(argv)
    chosen = RUNS
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {r.name for r in RUNS}
        if unknown:
            parser.error(f"unknown benchmarks {sorted(unknown)}; known: {[r.name for r in RUNS]}")
        chosen = tuple(r for r in RUNS if r.name in wanted)
    failed = []
    if not args.render_only:
        wait_quiet = not args.tiny and args.quiet_tool.exists()
        for run in chosen:
            if wait_quiet and subprocess.run([str(args.quiet_tool)], check=False).returncode != 0:
                failed.append(f"{run.name} (the machine never got quiet)")
                continue
            if run_one(run, args.tiny, args.results_dir) != 0:
                failed.append(run.name)
    text = regenerate(args.benchmarks_md.read_text(), RUNS, args.tiny, args.results_dir)
    args.benchmarks_md.write_text(text)
    print(f"regenerated {args.benchmarks_md}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
