"""Every `raycord` command fails like a tool: with nothing running, with bad arguments and
with bad configuration it says what is wrong in one or two lines, never a traceback, and
exits non-zero. Each case is a real subprocess; all of them run at once."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.cli import build_parser

#: what a command that needs a running bot says to do
NEEDS_A_BOT = ("raycord run", "--address")


@dataclass(frozen=True, slots=True)
class Case:
    argv: tuple[str, ...]
    #: substrings its message must contain; a case without them must fail in one line
    says: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Done:
    returncode: int
    stdout: str
    stderr: str


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


#: each case's argv and environment, with {placeholders} for the paths and the dead address
CASES: dict[str, Case] = {
    "status --once, nothing running": Case(("status", "--once", "--state-dir", "{empty}"), NEEDS_A_BOT),
    "status, a dead bot's record": Case(("status", "--once", "--state-dir", "{stale}"), NEEDS_A_BOT),
    "status --address, nothing there": Case(
        ("status", "--once", "--address", "{dead}"), ("{dead}", "raycord run")
    ),
    "status, RAY_ADDRESS with nothing there": Case(
        ("status", "--once", "--state-dir", "{empty}"),
        ("{dead}", "RAY_ADDRESS"),
        (("RAY_ADDRESS", "{dead}"),),
    ),
    "analytics, nothing running": Case(("analytics", "SELECT 1", "--state-dir", "{empty}"), NEEDS_A_BOT),
    "analytics --address, nothing there": Case(
        ("analytics", "--report", "daily", "--address", "{dead}"), ("{dead}", "raycord run")
    ),
    "run --address, nothing there": Case(
        ("run", "--address", "{dead}", "--state-dir", "{empty}"), ("{dead}",)
    ),
    "unknown subcommand": Case(("frobnicate",)),
    "analytics --max-rows 0": Case(("analytics", "--max-rows", "0", "SELECT 1", "--state-dir", "{empty}")),
    "status --address not-an-address": Case(("status", "--once", "--address", "nowhere")),
    "run, the state directory is a file": Case(("run", "--state-dir", "{a_file}")),
    "status, malformed YAML config": Case(("status", "--once", "--config", "{bad_yaml}")),
    "config, bad value in the environment": Case(("config",), env=(("RAYCORD_DASHBOARD_PORT", "many"),)),
    "run, the Gemini backend without a key": Case(
        ("run", "--state-dir", "{empty}"),
        env=(("RAYCORD_LLM__BACKEND", "gemini"), ("RAYCORD_DASHBOARD", "false")),
    ),
    # every subcommand, those added later included
    **{f"{name} --no-such-flag": Case((name, "--no-such-flag")) for name in _subcommands()},
}


def _places(tmp: Path) -> dict[str, str]:
    """The files the cases name, made; a killed bot's stale record among them."""
    stale = tmp / "stale-state"
    stale.mkdir()
    dead = f"127.0.0.1:{_closed_port()}"
    (stale / "ray-address.json").write_text(json.dumps({"address": dead, "pid": 1, "namespace": "raycord"}))
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("cache: [unclosed\n")
    a_file = tmp / "a-file"
    a_file.write_text("not a directory")
    return {
        "empty": str(tmp / "empty-state"),
        "stale": str(stale),
        "dead": dead,
        "bad_yaml": str(bad_yaml),
        "a_file": str(a_file),
    }


def _filled(case: Case, places: dict[str, str]) -> Case:
    return Case(
        tuple(a.format(**places) for a in case.argv),
        tuple(w.format(**places) for w in case.says),
        tuple((k, v.format(**places)) for k, v in case.env),
    )


@pytest.fixture(scope="module")
def failures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Case, Done]]]:
    tmp = tmp_path_factory.mktemp("cli-failures")
    exe = shutil.which("raycord", path=str(Path(sys.executable).parent))
    assert exe, "the raycord console script is installed"
    # nothing configured and nothing to find: no address, no keys, no state in the cwd
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RAYCORD_")
        and k not in ("RAY_ADDRESS", "GEMINI_API_KEY", "GOOGLE_API_KEY", "DISCORD_TOKEN")
    }
    places = _places(tmp)
    cases = {name: _filled(case, places) for name, case in CASES.items()}
    procs = {
        name: subprocess.Popen(
            [exe, *case.argv],
            env={**env, **dict(case.env)},
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, case in cases.items()
    }
    done: dict[str, tuple[Case, Done]] = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            done[name] = (cases[name], Done(proc.returncode, out, err))
        yield done
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("name", sorted(CASES))
def test_fails_like_a_tool(failures: dict[str, tuple[Case, Done]], name: str) -> None:
    case, done = failures[name]
    said = done.stderr.strip().splitlines()
    assert done.returncode != 0, done
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert done.stdout == ""
    if case.says:
        assert 1 <= len(said) <= 2, done.stderr
        for words in case.says:
            assert words in done.stderr
    else:
        assert len(said) == 1, done.stderr
    assert said[0].startswith("raycord"), said
