"""An event loop on a thread of its own for the google-genai SDK's coroutines.

The SDK spends milliseconds of CPU per request and per streamed chunk (pydantic building
and parsing). On the caller's loop a burst of them stalls everything else; on this loop
the caller's loop only waits for the GIL, which Python hands over every switch interval.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()


class SDKThread:
    def __init__(self, name: str = "gemini-sdk") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the SDK loop; cancelling the caller cancels it there too."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def iterate(
        self, open_stream: Callable[[], Coroutine[Any, Any, AsyncIterator[T]]]
    ) -> AsyncIterator[T]:
        """The items of the async iterator `open_stream()` returns, iterated on the SDK loop.

        Items are handed over as they arrive; closing this generator early cancels the
        iteration there, which closes the SDK's stream and frees its connection.
        """
        caller = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            try:
                stream = await open_stream()
                try:
                    async for item in stream:
                        caller.call_soon_threadsafe(items.put_nowait, item)
                finally:
                    aclose = getattr(stream, "aclose", None)
                    if aclose is not None:
                        await aclose()
            except asyncio.CancelledError:
                raise  # the consumer has gone
            except BaseException as exc:
                caller.call_soon_threadsafe(items.put_nowait, _Failure(exc))
                return
            caller.call_soon_threadsafe(items.put_nowait, _DONE)

        future = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        try:
            while True:
                item = await items.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            future.cancel()

    async def close(self, last: Coroutine[Any, Any, Any] | None = None) -> None:
        """Run `last` (e.g. the client's close) on the SDK loop, then stop the thread."""
        if last is not None:
            await self.call(last)
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self._thread.join)
        self.loop.close()


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
