"""The google-genai SDK in a process of its own, so its CPU never stalls the bot's loop.

The SDK spends about 20 ms of CPU per call here (pydantic building of the request and
parsing of every response or streamed chunk). In the bot's process that CPU holds the
GIL, and the event loop that serves Discord and the actors waits for it: with the SDK
on a thread of its own, 200 streaming calls put the loop's lag p99 at 60 ms. Here the
SDK runs in a child process with its own event loop and one client (one connection
pool), and the bot exchanges small frames with it over a socket pair: a request out, and
back a `Chunk` per response (its text, finish and block reasons and usage), never the
SDK's models.

Each frame is a 4-byte big-endian length and a pickle. The parent sends
`("init", SDKOptions)` once, then `("generate" | "stream", id, model, contents, config)`
and `("cancel", id)`. The child answers `("chunk", id, Chunk)` per streamed response,
`("done", id, Chunk | None)` at the end, or one failure: `("api_error", id, code,
response_json)`, `("timeout", id, detail)`, `("conn_error", id, detail)` or
`("error", id, type_name, detail)`.

If the child dies, every request in flight fails with `ConnectionError` (which the
backend retries like any broken connection) and the next request starts a new child.
The child exits when the parent closes the socket, or dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.context
import pickle
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from google import genai
from google.genai import errors, types
from yarl import URL

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
#: where the SDK sends requests when no base URL is configured
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
#: what the fork server imports once, so that each child starts in milliseconds and makes
#: its first call without building the SDK's models: importing the SDK takes 4-7 s of CPU
#: here, building its models ~1 s, and a child is started per backend and after a crash
_PRELOAD = ["google.genai", "aiohttp", __name__, "bot.llm.sdk_preload"]
_context: multiprocessing.context.ForkServerContext | None = None


def _fork_server() -> multiprocessing.context.ForkServerContext:
    """The `forkserver` start method: children fork from a single-threaded server process
    that has the SDK imported, never from this (threaded) process."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


class Chunk(NamedTuple):
    """What the backend needs from one `GenerateContentResponse`."""

    #: the response's text, thought parts left out (never `response.text`, which has
    #: nothing to give for a blocked or empty reply)
    text: str
    has_candidates: bool
    finish_reason: str | None
    block_reason: str | None
    #: (prompt, candidates, thoughts) token counts, when the response carried usage
    usage: tuple[int, int, int] | None


@dataclass(frozen=True, slots=True)
class SDKOptions:
    api_key: str = field(repr=False)
    base_url: str | None
    api_version: str
    #: the HTTP(S) proxy for the API's host, from the bot's environment (`env_proxy`)
    proxy: str | None = field(default=None, repr=False)


def env_proxy(base_url: str | None) -> str | None:
    """The proxy the environment (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`...) gives for the
    API's host, credentials included, or None. Looked up in the bot's process when the
    backend is made: the SDK's children fork from a server started earlier."""
    try:
        proxy, auth = get_env_proxy_for_url(URL(base_url or DEFAULT_BASE_URL))
    except LookupError:
        return None
    if auth is not None:
        proxy = proxy.with_user(auth.login).with_password(auth.password)
    return str(proxy)


class SDKFailure(RuntimeError):
    """The SDK raised something that is neither an API error nor a connection failure."""


# --- the parent's side ------------------------------------------------------------------


class _Child:
    """One running child process and the requests waiting on it."""

    def __init__(self, proc: multiprocessing.process.BaseProcess, writer: asyncio.StreamWriter) -> None:
        self.proc = proc
        self.writer = writer
        self.waiting: dict[int, asyncio.Queue[tuple[Any, ...]]] = {}
        self.reader_task: asyncio.Task[None] | None = None
        self.alive = True

    def send(self, message: tuple[Any, ...]) -> None:
        self.writer.write(_frame(message))


class SDKProcess:
    """The parent's handle on an SDK child process, started on first use and restarted
    after it dies. Requests to it run concurrently; each has its own id."""

    def __init__(self, options: SDKOptions, name: str = "gemini-sdk") -> None:
        self._options = options
        self._name = name
        self._child: _Child | None = None
        self._starting = asyncio.Lock()
        self._ids = itertools.count(1)
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._child.proc.pid if self._child is not None and self._child.alive else None

    @property
    def in_flight(self) -> int:
        return len(self._child.waiting) if self._child is not None else 0

    async def start(self) -> None:
        """Start the child (if it is not running) and wait until its client is ready.

        Raises:
            ConnectionError: the child exited before it was ready.
        """
        await self._running()

    async def generate(self, model: str, contents: Any, config: Any) -> Chunk:
        """One `generate_content` call in the child.

        Raises:
            errors.APIError: the API answered with an error status.
            TimeoutError, ConnectionError: the call or the child failed on the way.
            SDKFailure: the SDK raised anything else.
        """
        async with self._request("generate", model, contents, config) as answers:
            message = await answers.get()
        if message[0] == "done":
            return message[2]  # type: ignore[no-any-return]
        raise _failure(message)

    async def stream(self, model: str, contents: Any, config: Any) -> AsyncIterator[Chunk]:
        """One `generate_content_stream` call in the child: its responses in order.

        Closing the iterator early cancels the call in the child, which frees its
        connection. Raises what `generate` raises, while iterating.
        """
        async with self._request("stream", model, contents, config) as answers:
            while True:
                message = await answers.get()
                if message[0] == "chunk":
                    yield message[2]
                elif message[0] == "done":
                    return
                else:
                    raise _failure(message)

    @contextlib.asynccontextmanager
    async def _request(self, kind: str, *args: Any) -> AsyncIterator[asyncio.Queue[tuple[Any, ...]]]:
        child = await self._running()
        request_id = next(self._ids)
        answers: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        child.waiting[request_id] = answers
        try:
            child.send((kind, request_id, *args))
            yield answers
        finally:
            # still registered: the caller left before the end (cancelled, timed out or
            # closed the stream early), so the child stops working on it
            if child.waiting.pop(request_id, None) is not None and child.alive:
                with contextlib.suppress(Exception):
                    child.send(("cancel", request_id))

    async def _running(self) -> _Child:
        child = self._child
        if child is not None and child.alive:
            return child
        async with self._starting:
            if self._child is None or not self._child.alive:
                self._child = await self._start()
            return self._child

    async def _start(self) -> _Child:
        ours, theirs = socket.socketpair()
        proc = _fork_server().Process(target=_child_main, args=(theirs,), name=self._name, daemon=True)
        try:
            # off the loop: the first start also starts the fork server (the SDK's imports)
            await asyncio.to_thread(proc.start)
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        child = _Child(proc, writer)
        child.send(("init", self._options))
        try:
            # the child imports the SDK and builds its client: a second or two here
            message = await _read_frame(reader)
            if message[0] != "ready":
                raise ConnectionError(f"the {self._name} process sent {message[0]!r} before it was ready")
        except BaseException as exc:
            _stop(child)
            proc.kill()
            await asyncio.to_thread(proc.join)
            if isinstance(exc, asyncio.IncompleteReadError):
                raise ConnectionError(
                    f"the {self._name} process exited during start-up with {proc.exitcode}"
                ) from None
            raise
        child.reader_task = asyncio.get_running_loop().create_task(self._read(child, reader))
        self.starts += 1
        log.info("started %s process %d", self._name, proc.pid)
        return child

    async def _read(self, child: _Child, reader: asyncio.StreamReader) -> None:
        reason = "closed its connection"
        try:
            while True:
                message = await _read_frame(reader)
                answers = child.waiting.get(message[1])
                if answers is None:
                    continue  # its caller has gone
                if message[0] != "chunk":
                    del child.waiting[message[1]]  # the request's last message
                answers.put_nowait(message)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            reason = f"closed its connection ({type(exc).__name__})"
        except Exception as exc:  # an unreadable frame: this child cannot be trusted further
            reason = f"sent an unreadable frame ({exc!r})"
        finally:
            child.alive = False
            code = child.proc.exitcode
            detail = f"the {self._name} process {child.proc.pid} {reason}" + (
                f" and exited with {code}" if code is not None else ""
            )
            if child.waiting:
                log.warning("%s; failing %d requests in flight", detail, len(child.waiting))
            for request_id, answers in child.waiting.items():
                answers.put_nowait(("conn_error", request_id, detail))
            child.waiting.clear()
            _stop(child)
            if child.proc.exitcode is None:
                child.proc.kill()  # alive but no longer trusted
            await asyncio.to_thread(child.proc.join)

    async def close(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        child.alive = False
        _stop(child)
        if child.reader_task is not None:
            child.reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await child.reader_task
        # closing the socket ends the child's loop; it closes its client and exits
        await asyncio.to_thread(child.proc.join, 5)
        if child.proc.exitcode is None:
            child.proc.kill()
            await asyncio.to_thread(child.proc.join)


def _stop(child: _Child) -> None:
    with contextlib.suppress(Exception):
        child.writer.close()


def _failure(message: tuple[Any, ...]) -> Exception:
    kind = message[0]
    if kind == "api_error":
        code, response_json = message[2], message[3]
        if 400 <= code < 500:
            return errors.ClientError(code, response_json)
        if code >= 500:
            return errors.ServerError(code, response_json)
        return errors.APIError(code, response_json)
    if kind == "timeout":
        return TimeoutError(message[2])
    if kind == "conn_error":
        return ConnectionError(message[2])
    return SDKFailure(f"{message[2]}: {message[3]}")


def _frame(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))  # from our own child or parent


# --- the child's side -------------------------------------------------------------------


def summarise(response: Any) -> Chunk:
    """A `GenerateContentResponse` as a `Chunk`."""
    usage = response.usage_metadata
    counts = (
        (usage.prompt_token_count or 0, usage.candidates_token_count or 0, usage.thoughts_token_count or 0)
        if usage is not None
        else None
    )
    feedback = response.prompt_feedback
    block = None
    if feedback is not None and feedback.block_reason is not None:
        block = _enum_name(feedback.block_reason)
    if not response.candidates:
        return Chunk("", False, None, block, counts)
    candidate = response.candidates[0]
    finish = _enum_name(candidate.finish_reason) if candidate.finish_reason is not None else None
    parts = candidate.content.parts if candidate.content and candidate.content.parts else []
    text = "".join(p.text for p in parts if p.text and not p.thought)
    return Chunk(text, True, finish, block, counts)


def _enum_name(value: Any) -> str:
    return str(getattr(value, "value", value))


def _http_session(proxy: str | None) -> aiohttp.ClientSession:
    """The SDK's connection pool, made here rather than by the SDK.

    The SDK's own session has `trust_env=True`, so aiohttp looks up `~/.netrc` and the
    proxy variables on a worker thread for every request: two thread hops that took about
    half of the SDK's CPU per call here (17 ms against 8 ms, and 20 against 10 ms of wall
    time, against the fake server at no latency). The proxy comes from `env_proxy`, looked
    up once; netrc, which an API key does not use, not at all.
    """
    return aiohttp.ClientSession(
        # as the SDK makes it: no limit on connections (the backend bounds calls), a 4 MiB
        # read buffer for large responses
        connector=aiohttp.TCPConnector(limit=0),
        read_bufsize=2**22,
        trust_env=False,
        proxy=proxy,
    )


async def _serve(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)
    kind, options = await _read_frame(reader)
    if kind != "init":
        raise SystemExit(f"expected init, got {kind!r}")
    session = _http_session(options.proxy)
    http_options = types.HttpOptions(
        api_version=options.api_version,
        # attempts=1 turns off the SDK's own retries (including its implicit retry of
        # connection errors): the parent's retries, deadline and breaker are the only ones
        retry_options=types.HttpRetryOptions(attempts=1),
        aiohttp_client=session,
    )
    if options.base_url:
        http_options.base_url = options.base_url
    client = genai.Client(api_key=options.api_key, vertexai=False, http_options=http_options)
    models = client.aio.models
    tasks: dict[int, asyncio.Task[None]] = {}

    def send(message: tuple[Any, ...]) -> None:
        writer.write(_frame(message))

    send(("ready", 0))

    async def run(kind: str, request_id: int, model: str, contents: Any, config: Any) -> None:
        try:
            if kind == "generate":
                response = await models.generate_content(model=model, contents=contents, config=config)
                send(("done", request_id, summarise(response)))
                return
            stream = await models.generate_content_stream(model=model, contents=contents, config=config)
            try:
                async for response in stream:
                    send(("chunk", request_id, summarise(response)))
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
            send(("done", request_id, None))
        except asyncio.CancelledError:
            raise
        except errors.APIError as exc:
            send(("api_error", request_id, exc.code, exc.details))
        except TimeoutError as exc:
            send(("timeout", request_id, f"timed out: {exc}"))
        except (aiohttp.ClientError, OSError) as exc:
            send(("conn_error", request_id, f"{type(exc).__name__}: {exc}"))
        except Exception as exc:
            send(("error", request_id, type(exc).__name__, str(exc)))

    try:
        while True:
            try:
                message = await _read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the parent has gone
            if message[0] == "cancel":
                task = tasks.pop(message[1], None)
                if task is not None:
                    task.cancel()
                continue
            request_id = message[1]
            task = asyncio.get_running_loop().create_task(run(*message))
            tasks[request_id] = task
            task.add_done_callback(lambda _t, rid=request_id: tasks.pop(rid, None))
    finally:
        for task in list(tasks.values()):
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        with contextlib.suppress(Exception):
            await client.aio.aclose()
        await session.close()  # ours: the SDK closes only the sessions it made
        writer.close()


def _model_contains(self: Any, item: object) -> bool:
    """`item in model` with pydantic's own answer, without its scan for a string.

    Pydantic gives models no `__contains__`, so `in` walks `__iter__`, which yields a
    `(name, value)` pair per field: a string is never among them. The SDK's request
    converters ask `key in part` for every field they know of (`_common.get_value_by_path`),
    so each `Part` of the history was scanned ~25 times over its ~20 fields: 25 of the
    57 ms of CPU a call with 20 turns of history took here, against 32 ms with this answer.
    """
    if isinstance(item, str):
        return False
    return any(item == pair for pair in self)


def fast_model_membership() -> None:
    """Give the SDK's models `_model_contains` (in the SDK's process only)."""
    from google.genai import _common

    if "__contains__" not in vars(_common.BaseModel):
        _common.BaseModel.__contains__ = _model_contains  # type: ignore[attr-defined]


def _child_main(sock: socket.socket) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fast_model_membership()
    asyncio.run(_serve(sock))
