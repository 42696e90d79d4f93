"""What the project's stand-ins (the fake Gemini server, the Discord stand-in) share: how
`raycord fake-*` serves one until it is told to stop."""

from __future__ import annotations

import asyncio
import signal
from typing import Protocol

__all__ = ["StandIn", "serve_until_stopped"]


class StandIn(Protocol):
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str: ...

    async def stop(self) -> None: ...


async def serve_until_stopped(server: StandIn, name: str, host: str, port: int) -> None:
    """Run `server` until SIGINT/SIGTERM; prints its base URL first (tests read that line)."""
    url = await server.start(host, port)
    print(f"{name} listening on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()
