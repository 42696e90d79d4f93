"""The terminal chat: the same pipeline and the same commands as Discord, a line at a time.

Interactive use shows a prompt with readline line editing; piped input
(`echo hi | raycord chat`) prints only the replies and exits at end of input.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import math
import re
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TextIO

from actors.errors import RaycordError
from actors.schemas import IncomingMessage, WindowUsage
from bot.pipeline import FORGET_QUESTION as FORGET_QUESTION_TEXT
from bot.pipeline import ChatPipeline

__all__ = ["COMMANDS", "ConsoleChat", "format_limits"]

#: every command of the terminal chat, with its one line of help (what `/help` prints)
COMMANDS: dict[str, str] = {
    "/help": "list these commands",
    "/ask QUESTION": "a one-off question, outside this conversation",
    "/limits": "your message and command budgets: used, left, and when each window frees",
    "/stats": "the model, the cache's hit rate and entries, the writes still pending",
    "/model [NAME]": "show the model, or switch to NAME",
    "/reset": "clear this conversation",
    "/forget": "delete everything raycord remembers about you (asks first)",
    "/quit": "leave (Ctrl-D works too)",
}
BANNER = "raycord chat: type a message, or /help for the commands."
FORGET_QUESTION = f"{FORGET_QUESTION_TEXT} [y/N]"
#: a line is a command when its first word looks like one: "/etc/hosts?" is a message
_COMMAND = re.compile(r"/([A-Za-z][\w-]*)(?:\s+(.*))?", re.DOTALL)


def _duration(seconds: float) -> str:
    whole = math.ceil(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m"


def format_limits(usage: list[WindowUsage]) -> list[str]:
    """One line per budget window: used, left, and when its oldest counted request leaves."""
    lines = []
    for u in usage:
        what = {"message": "messages", "command": "commands", "server": "server messages"}.get(u.kind, u.kind)
        frees = f"; one frees in {_duration(u.frees_in)}" if u.used else ""
        lines.append(f"{what} per {u.window}: {u.used} of {u.limit} used, {u.left} left{frees}")
    return lines


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
        self._stop = asyncio.Event()
        self._commands: dict[str, Callable[[str], Awaitable[bool]]] = {
            "help": self._help,
            "ask": self._ask,
            "limits": self._limits,
            "stats": self._stats,
            "model": self._model,
            "reset": self._reset,
            "forget": self._forget,
            "quit": self._quit,
            "exit": self._quit,
        }

    def _print(self, text: str = "", end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    def _say(self, *lines: str) -> None:
        """A reply of raycord's own (not the model's)."""
        if self.interactive:
            self._print("raycord> " + "\n  ".join(lines))
        else:
            self._print("\n".join(lines))

    async def _readline(self, prompt: str) -> str | None:
        """The next line of input; None at its end, or once the chat is told to stop.

        Read in a daemon thread, not the loop's executor: a Ctrl-C that stops the chat
        must not wait, at exit, for a line nobody is typing."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[str | None] = loop.create_future()
        # input() edits the line with readline, but only on the process's own terminal
        use_input = self.interactive and self.stdin is sys.stdin

        def settle(line: str | None) -> None:
            if not answer.done():
                answer.set_result(line)

        def read() -> None:
            try:
                if use_input:
                    line: str | None = input(prompt)
                else:
                    if self.interactive:
                        self._print(prompt, end="")
                    raw = self.stdin.readline()
                    line = None if raw == "" else raw.rstrip("\n")
            except (EOFError, OSError, ValueError):
                line = None
            loop.call_soon_threadsafe(settle, line)

        threading.Thread(target=read, name="raycord-console-input", daemon=True).start()
        stopping = asyncio.ensure_future(self._stop.wait())
        waiting: list[asyncio.Future[Any]] = [answer, stopping]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        return answer.result() if answer.done() else None

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Answer every line until the input ends, `/quit`, or `stop` is set."""
        self._stop = stop or asyncio.Event()
        with _terminal_restored(self.stdin if self.interactive else None):
            if self.interactive:
                with contextlib.suppress(ImportError):
                    import readline  # noqa: F401  (importing it turns on input()'s line editing)
                self._print(BANNER)
            while (line := await self._readline("you> ")) is not None:
                if line.strip() and not await self.handle_line(line):
                    break
            if self.interactive:
                self._print()

    async def handle_line(self, line: str) -> bool:
        """Answer one line, a command or a message; False when the user asked to quit."""
        try:
            command = _COMMAND.fullmatch(line.strip())
            if command is not None:
                handler = self._commands.get(command.group(1).lower())
                if handler is None:
                    self._say(f"/{command.group(1)}: unknown command, try /help")
                    return True
                return await handler((command.group(2) or "").strip())
            await self._chat(
                IncomingMessage(text=line, user_id=self.user, user_name=self.user, scope=self.scope)
            )
        except RaycordError as exc:
            self._say(exc.user_message())
        return True

    async def _chat(self, msg: IncomingMessage) -> None:
        if not self.interactive:
            self._print((await self.pipeline.handle(msg)).text)
            return
        self._print("raycord> ", end="")
        shown = 0

        async def show(text: str) -> None:
            nonlocal shown
            self._print(text[shown:], end="")
            shown = len(text)

        try:
            await self.pipeline.handle(msg, on_chunk=show)
        finally:
            self._print()

    def _no_arguments(self, name: str, args: str) -> bool:
        if args:
            self._say(f"/{name} takes no arguments; try /help")
        return not args

    # -- the commands: each returns False to end the chat

    async def _help(self, args: str) -> bool:
        width = max(map(len, COMMANDS))
        self._say("commands:", *(f"{name.ljust(width)}  {text}" for name, text in COMMANDS.items()))
        return True

    async def _ask(self, question: str) -> bool:
        if not question:
            self._say("usage: /ask QUESTION")
            return True
        await self._chat(
            IncomingMessage(
                text=question,
                user_id=self.user,
                user_name=self.user,
                scope=self.scope,
                kind="command",
                stateless=True,
                cache_scope="user",
            )
        )
        return True

    async def _limits(self, args: str) -> bool:
        if self._no_arguments("limits", args):
            self._say(
                "your budgets (asking counts nothing):", *format_limits(await self.pipeline.limits(self.user))
            )
        return True

    async def _stats(self, args: str) -> bool:
        if self._no_arguments("stats", args):
            self._say(*(await self.pipeline.summary()).lines())
        return True

    async def _model(self, name: str) -> bool:
        # the terminal's user runs the bot: they may switch the model, as Discord's admins do
        if not name:
            self._say(f"model: {self.pipeline.model}")
            return True
        allowed = self.pipeline.settings.llm.allowed_models
        if name not in allowed:
            # the same rule as Discord's /model: only models the operator allowed
            self._say(f"{name} is not an allowed model; choose one of {', '.join(allowed)}.")
            return True
        previous, self.pipeline.model = self.pipeline.model, name
        self._say(f"Model switched from {previous} to {self.pipeline.model}.")
        return True

    async def _reset(self, args: str) -> bool:
        if self._no_arguments("reset", args):
            cleared = await self.pipeline.reset(self.scope, self.user)
            self._say("Conversation cleared." if cleared else "There was nothing to clear.")
        return True

    async def _forget(self, args: str) -> bool:
        if not self._no_arguments("forget", args):
            return True
        if self.interactive:
            answer = await self._readline(f"raycord> {FORGET_QUESTION} ")
        else:
            self._print(FORGET_QUESTION)
            answer = await self._readline("")
        if (answer or "").strip().lower() not in ("y", "yes"):
            self._say("Nothing was deleted.")
            return answer is not None
        self._say((await self.pipeline.forget(self.user)).message())
        return True

    async def _quit(self, args: str) -> bool:
        return False


@contextlib.contextmanager
def _terminal_restored(stream: TextIO | None) -> Iterator[None]:
    """Put the terminal back as it was: a chat stopped by a signal mid-line would leave
    readline's settings (no echo) on the user's shell."""
    import termios

    fd, saved = -1, None
    if stream is not None:
        with contextlib.suppress(OSError, ValueError, termios.error):
            fd = stream.fileno()
            saved = termios.tcgetattr(fd)
    try:
        yield
    finally:
        if saved is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)
