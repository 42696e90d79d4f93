"""Test harness for the Discord tests on the wire: the stand-in (`raycord fake-discord`) and
`raycord run` as subprocesses, each in its own process group, stopped by their pids only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bot.fake_discord import FakeDiscordControl
from bot.runtime import project_root

T = TypeVar("T")
TOKEN = "fake-token"


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0, every: float = 0.05) -> T:
    """Poll `probe` until it returns something truthy (a condition on the stand-in's state)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


class StandIn:
    """`raycord fake-discord` in a subprocess, with its control API."""

    def __init__(self, guilds: int = 2) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "fake-discord", "--port", "0", "--guilds", str(guilds)],
            cwd=project_root(),
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"the stand-in did not start: {line!r}")
        self.url = line.rsplit(" ", 1)[1].strip()
        self.control = FakeDiscordControl(self.url)

    def call(self, action: str, body: dict[str, Any] | None = None, **query: Any) -> Any:
        return self.control.call(action, body, **query)

    def state(self) -> dict[str, Any]:
        return self.call("state")  # type: ignore[no-any-return]

    def requests(self, since: float = 0.0) -> list[dict[str, Any]]:
        return self.call("requests", since=since)  # type: ignore[no-any-return]

    def messages(self, channel_id: str) -> list[dict[str, Any]]:
        return self.call("messages", channel_id=channel_id)  # type: ignore[no-any-return]

    def bot_messages(self, channel_id: str) -> list[dict[str, Any]]:
        bot_id = self.state()["bot_user"]["id"]
        return [m for m in self.messages(channel_id) if m["author"]["id"] == bot_id]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class BotProcess:
    """`raycord run` against the stand-in, with a real state directory and the offline LLM."""

    def __init__(
        self,
        stand_in: StandIn,
        state_dir: Path,
        discord: dict[str, Any] | None = None,
        address: str | None = None,
        namespace: str = "raycord",
        log_name: str = "bot",
        args: tuple[str, ...] = (),
    ) -> None:
        self.stand_in = stand_in
        state_dir.mkdir(parents=True, exist_ok=True)
        config = state_dir.parent / f"{log_name}.yaml"
        settings: dict[str, Any] = {"discord": {"api_base_url": stand_in.url, **(discord or {})}}
        config.write_text(yaml.safe_dump(settings))
        self.log_path = state_dir.parent / f"{log_name}.log"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RAYCORD_", "RAY_ADDRESS", "GEMINI", "GOOGLE"))
        }
        env.update(
            {
                "RAYCORD_DISCORD_TOKEN": TOKEN,
                "RAYCORD_DASHBOARD": "false",
                "RAYCORD_LLM__BACKEND": "offline",
                # every piece of a reply crosses from the gateway as it comes, so a reply
                # streams in several edits, as a real model's does
                "RAYCORD_LLM__STREAM_INTERVAL_SECONDS": "0",
                "RAYCORD_NAMESPACE": namespace,
            }
        )
        argv = [
            sys.executable,
            "-m",
            "bot.cli",
            "run",
            "--config",
            str(config),
            "--state-dir",
            str(state_dir),
        ]
        if address is not None:
            argv += ["--address", address]
        argv += args
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv,
            cwd=project_root(),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_connected(self, sessions_before: int, timeout: float = 120.0) -> None:
        """Until the bot has identified on the gateway (after its command sync)."""

        def connected() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the bot exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            sessions = self.stand_in.state()["sessions"]
            return len(sessions) > sessions_before and all(s["connected"] for s in sessions[sessions_before:])

        wait_for("the bot to connect", connected, timeout)

    def stop(self, sig: signal.Signals = signal.SIGINT, timeout: float = 60.0) -> int:
        """Stop the bot: SIGINT/SIGTERM let it drain; SIGKILL goes to its whole process group
        (the bot and the embedded Ray it started), which only this harness started."""
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if sig != signal.SIGKILL:
            # what the bot left behind in its group (Ray's processes) goes with it
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                pass
            else:
                wait_for("the bot's process group to exit", lambda: not _group_alive(self.proc.pid), 60)
        self._log.close()
        return self.proc.returncode


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_services(namespace: str) -> None:
    """Stop the service actors the bot processes created in `namespace` of the session Ray
    (on a Ray they connect to with `--address`, actors outlive their front-ends)."""
    import ray

    from bot.runtime import SERVICES

    for spec in SERVICES:
        try:
            handle = ray.get_actor(f"{spec.name}-0", namespace=namespace)
        except ValueError:
            continue
        ray.kill(handle, no_restart=True)


def connected_shards(stand_in: StandIn) -> set[int]:
    """The shards with a live gateway session on the stand-in."""
    return {s["shard"][0] for s in stand_in.state()["sessions"] if s["connected"]}


def reply_to(stand_in: StandIn, channel: str, user: str, content: str, **extra: Any) -> dict[str, Any]:
    return stand_in.call(  # type: ignore[no-any-return]
        "messages", {"channel_id": channel, "author_id": user, "content": content, **extra}
    )


def answer_to(stand_in: StandIn, channel: str, message_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """The bot's reply to `message_id` once its final text is in (edits included)."""

    def done() -> dict[str, Any] | None:
        for m in stand_in.bot_messages(channel):
            ref = m.get("message_reference") or {}
            if ref.get("message_id") == message_id and "offline mode" in m["content"]:
                return m
        return None

    return wait_for(f"the reply to {message_id}", done, timeout)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)[:4000]
