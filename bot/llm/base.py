"""The LLM protocol the pipeline talks to, the plain request/result types, the stream
object that carries a streamed reply's final result (the attachment checks are `bot.attachments`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from actors.errors import UpstreamUnavailable


@dataclass(slots=True, frozen=True)
class ImagePart:
    """A file the model takes inline: an image or a PDF (`bot.attachments` decides which)."""

    mime_type: str
    data: bytes
    #: the attachment's file name, for messages about it
    name: str = ""


@dataclass(slots=True, frozen=True)
class LLMRequest:
    prompt: str
    model: str
    system_prompt: str = ""
    #: earlier turns, oldest first, as `(role, author, text)`; role is "user" or "model"
    history: tuple[tuple[str, str, str], ...] = ()
    images: tuple[ImagePart, ...] = ()
    #: requests with the same key are identical and may share one upstream call
    key: str = ""
    #: who asks, and from which server: the gateway's fair queue takes turns by these
    user: str = ""
    server: str | None = None
    #: the channel asked in, for the cost accounting of the call
    channel: str | None = None
    #: the conversation this turn belongs to (its scope and user), "" for a stateless one:
    #: the gateway calibrates its token estimate per conversation
    conversation: str = ""
    #: context that changes from turn to turn (the social line): sent with the new message,
    #: after the history, so the system prompt and the older turns stay a prefix that
    #: Gemini's implicit cache serves
    note: str = ""


#: `LLMResult.metadata` key: milliseconds the answering upstream call took, as the gateway
#: measured it (the queue, retries before it and the transport back are not in it)
UPSTREAM_MS = "upstream_ms"


@dataclass(slots=True)
class LLMResult:
    text: str
    model: str
    tokens_in: int = 0
    tokens_out: int = 0
    finish_reason: str = "STOP"
    offline: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


class Chunk(NamedTuple):
    """What the gateway needs from one upstream response (one `GenerateContentResponse`)."""

    #: the response's text, thought parts left out (never `response.text`, which has
    #: nothing to give for a blocked or empty reply)
    text: str
    has_candidates: bool
    finish_reason: str | None
    block_reason: str | None
    #: (prompt, candidates, thoughts, cached) token counts, when the response carried usage
    usage: tuple[int, int, int, int] | None
    #: (title, uri) of the web pages a grounded reply drew on
    sources: tuple[tuple[str, str], ...] = ()


class Backend(Protocol):
    """What the gateway calls upstream: Gemini through its SDK, or the offline responder."""

    name: str

    def call(
        self, model: str, request: LLMRequest, images: tuple[ImagePart, ...], streamed: bool
    ) -> AsyncGenerator[Chunk, None]: ...

    async def aclose(self) -> None: ...


class UpstreamCoolingDown(UpstreamUnavailable):
    """The circuit breaker is open: calls fail fast until the cool-down ends."""

    def user_message(self) -> str:
        secs = max(1, round(self.retry_after or 1))
        return (
            "The model has been failing repeatedly, so I'm giving it a short break. "
            f"Please try again in about {secs} second{'s' if secs != 1 else ''}."
        )


class GatewayBusy(UpstreamUnavailable):
    """The quota would make the request wait longer than `llm.max_queue_seconds` (or the
    queue is full); `retry_after` is when it would have been served."""

    def user_message(self) -> str:
        secs = max(1, round(self.retry_after or 1))
        when = f"{secs} second{'s' if secs != 1 else ''}" if secs < 120 else f"{round(secs / 60)} minutes"
        return f"I'm busy answering other people right now. Please try again in {when}."


class UnknownModel(UpstreamUnavailable):
    """The API does not know the configured model (a 404): a setting to fix, not a crash."""

    def __init__(self, model: str) -> None:
        super().__init__(f"the API does not know the model {model!r}")
        self.model = model

    def user_message(self) -> str:
        return (
            f"I'm set up to use a model the API doesn't know ({self.model}). "
            "An admin needs to pick another one (llm.model or /model)."
        )


class LLMStream:
    """A streamed reply: iterate it for the text chunks in order; once it is exhausted,
    `result` holds the whole reply with its token usage and finish reason."""

    def __init__(self, chunks: AsyncIterator[str]) -> None:
        self._chunks = chunks
        self.result: LLMResult | None = None

    def __aiter__(self) -> LLMStream:
        return self

    async def __anext__(self) -> str:
        return await anext(self._chunks)

    async def aclose(self) -> None:
        """Stop early and free what the stream holds (its connection and concurrency slot)."""
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def result_stream(items: AsyncGenerator[str | LLMResult, None]) -> LLMStream:
    """An `LLMStream` over what a gateway yields: text chunks, then the `LLMResult`."""

    async def chunks() -> AsyncIterator[str]:
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, LLMResult):
                    stream.result = item
                else:
                    yield item

    stream = LLMStream(chunks())
    return stream


class LLM(Protocol):
    """What every backend offers. `stream` yields the reply's text in order."""

    name: str

    async def generate(self, request: LLMRequest) -> LLMResult: ...

    def stream(self, request: LLMRequest) -> LLMStream: ...

    async def aclose(self) -> None: ...
