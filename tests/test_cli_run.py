"""`raycord run` on a terminal: it says what it started before the first prompt, keeps
Ray's own notices in its log, edits lines with readline, and `raycord status` finds it."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from bot.cli import announce_discord_ready, start_block
from bot.config import LLMSettings, Settings


class Terminal:
    """A program on a pseudo-terminal, read up to the text we wait for."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd)
        os.close(slave)
        self.shown = ""
        self._read_to = 0

    def expect(self, text: str, timeout: float = 180.0) -> str:
        """Everything shown from the last expected text up to and including `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.shown[self._read_to :]:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(left, 0))
            chunk = b""
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the program closed the terminal
                    chunk = b""
            if not chunk:
                raise AssertionError(f"{text!r} never appeared; the terminal shows:\n{self.shown[-3000:]}")
            self.shown += chunk.decode("utf-8", errors="replace")
        end = self.shown.index(text, self._read_to) + len(text)
        seen, self._read_to = self.shown[self._read_to : end], end
        return seen

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def _env() -> dict[str, str]:
    """Nothing configured; Ray's token-auth mode unset, so Ray gives its start-up notice."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RAYCORD_")
        and k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "GEMINI_API_KEY", "GOOGLE_API_KEY", "DISCORD_TOKEN")
    }
    env.update(RAYCORD_DASHBOARD="false", TERM="xterm", PYTHONIOENCODING="utf-8")
    return env


def test_run_on_a_terminal_says_what_it_started_and_edits_lines(tmp_path: Path) -> None:
    exe = shutil.which("raycord", path=str(Path(sys.executable).parent))
    assert exe, "the raycord console script is installed"
    state = tmp_path / "state"
    env = _env()
    term = Terminal([exe, "run", "--state-dir", "state"], env, tmp_path)
    try:
        before_prompt = term.expect("you> ")
        block = before_prompt[before_prompt.index("raycord is running") :]
        assert "front-end  terminal chat" in block
        assert "model      offline-echo (offline responder" in block
        assert f"state      {state.resolve()}" in block
        assert "dashboard  off" in block
        assert "stop       /quit or Ctrl-D" in block
        assert "/help" in block
        assert "Token authentication" not in before_prompt

        # the bot recorded its Ray: `raycord status` and `raycord analytics` find it from
        # the same state directory (the query goes through the bot's own sink)
        status, analytics = (
            subprocess.Popen(
                [exe, *argv, "--state-dir", "state"],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for argv in (["status", "--once"], ["analytics", "--format", "csv", "SELECT 41 + 1 AS answer"])
        )
        out, err = status.communicate(timeout=180)
        assert status.returncode == 0, err
        assert "Token authentication" not in err
        for service in ("cache-0", "context-0", "ratelimit-0", "analytics-0"):
            assert service in out
        out, err = analytics.communicate(timeout=180)
        assert analytics.returncode == 0, err
        assert out.splitlines() == ["answer", "42"]

        # readline edits the line: Ctrl-A goes to its start, where the "h" is typed
        term.type("ello\x01h\r")
        assert "you said \u201chello\u201d" in term.expect("you> ")
        term.type("/nope\r")
        assert "/nope: unknown command, try /help" in term.expect("you> ")
        term.type("/quit\r")
        assert term.proc.wait(timeout=120) == 0
    finally:
        term.close()
    assert "Token authentication" not in term.shown
    # Ray's notice is logged, token authentication left on
    assert "Token authentication is enabled" in (state / "ray.log").read_text()
    assert not (state / "ray-address.json").exists()


def test_the_start_block_names_the_backend_and_the_dashboard(tmp_path: Path) -> None:
    settings = Settings(
        state_dir=tmp_path / "s",
        gemini_api_key=None,
        llm=LLMSettings(base_url="http://127.0.0.1:8765"),
    )
    log = tmp_path / "s" / "ray.log"
    block = start_block(settings, "discord", "gemini-2.5-flash", "http://127.0.0.1:8265", log).splitlines()
    assert block[0] == "raycord is running"
    assert block[1].startswith("  front-end  Discord")
    assert block[2] == "  model      gemini-2.5-flash (Gemini API at http://127.0.0.1:8765)"
    assert block[3] == f"  state      {(tmp_path / 's').resolve()}"
    assert block[4] == "  dashboard  http://127.0.0.1:8265"
    assert block[5] == f"  Ray log    {log}"
    assert block[-1] == "  stop       Ctrl-C"


def test_discord_login_is_announced_with_the_bots_name(capsys: pytest.CaptureFixture[str]) -> None:
    announce_discord_ready("raycord#0420", 3)
    assert capsys.readouterr().err == "raycord: logged in to Discord as raycord#0420, on 3 server(s)\n"
