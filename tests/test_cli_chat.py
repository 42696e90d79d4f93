"""`raycord chat` with piped input, from a shell: embedded Ray, offline model, replies only, exit 0."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def test_piped_chat_prints_only_the_replies_and_exits_zero(tmp_path: Path) -> None:
    exe = shutil.which("raycord", path=str(Path(sys.executable).parent)) or shutil.which("raycord")
    assert exe, "the raycord console script is installed"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "DISCORD_TOKEN", "RAY_ADDRESS", "RAY_AUTH_MODE")
    }
    env["RAYCORD_DASHBOARD"] = "false"
    done = subprocess.run(
        [exe, "chat", "--state-dir", str(tmp_path / "state")],
        input="hello\n\n/nope\nsecond line\n",
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3
    assert "\u201chello\u201d" in lines[0] and "offline mode" in lines[0]
    assert lines[1] == "/nope: unknown command, try /help"
    assert "\u201csecond line\u201d" in lines[2]
    # silent: no prompt, no banner, no start block, and Ray's notice went to its log
    assert "you>" not in done.stdout and "/help for the commands" not in done.stdout
    assert "raycord is running" not in done.stderr
    assert "Token authentication" not in done.stderr
    assert "Token authentication is enabled" in (tmp_path / "state" / "ray.log").read_text()
