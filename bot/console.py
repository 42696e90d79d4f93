"""The terminal chat: the same pipeline as Discord, one line in and one reply out.

Works interactively and with piped input (`echo hi | raycord chat`), where it answers
every line and exits at end of input.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from typing import TextIO

from actors.errors import RaycordError
from actors.schemas import IncomingMessage
from bot.pipeline import ChatPipeline

HELP = "commands: /reset (clear this conversation), /forget (delete what I know of you), /quit"


class ConsoleChat:
    def __init__(
        self,
        pipeline: ChatPipeline,
        stdin: TextIO = sys.stdin,
        stdout: TextIO = sys.stdout,
        user: str | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.stdin = stdin
        self.stdout = stdout
        self.user = user or getpass.getuser()
        self.interactive = stdin.isatty()
        self.scope = f"console:{self.user}"

    def _print(self, text: str = "", end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    async def _readline(self) -> str | None:
        if self.interactive:
            self._print("you> ", end="")
        line = await asyncio.get_running_loop().run_in_executor(None, self.stdin.readline)
        return None if line == "" else line.rstrip("\n")

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        if self.interactive:
            self._print(HELP)
        while not stop.is_set():
            reading = asyncio.ensure_future(self._readline())
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if reading not in done:
                reading.cancel()
                return
            stopping.cancel()
            line = reading.result()
            if line is None:
                return
            if not line.strip() and not self.interactive:
                continue
            if not await self.handle_line(line):
                return

    async def handle_line(self, line: str) -> bool:
        """Answer one line; False when the user asked to quit."""
        command = line.strip().lower()
        if command in ("/quit", "/exit"):
            return False
        if command == "/reset":
            await self.pipeline.context.reset(self.scope, self.user)
            self._print("raycord> conversation cleared.")
            return True
        if command == "/forget":
            await self.pipeline.context.forget(self.user)
            await self.pipeline.cache.invalidate_user(self.user)
            self._print("raycord> I have forgotten everything about you.")
            return True
        msg = IncomingMessage(text=line, user_id=self.user, user_name=self.user, scope=self.scope)
        try:
            if self.interactive:
                self._print("raycord> ", end="")
                shown = 0

                async def show(text: str) -> None:
                    nonlocal shown
                    self._print(text[shown:], end="")
                    shown = len(text)

                await self.pipeline.handle(msg, on_chunk=show)
                self._print()
            else:
                reply = await self.pipeline.handle(msg)
                self._print(reply.text)
        except RaycordError as exc:
            self._print(exc.user_message())
        return True
