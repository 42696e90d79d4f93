"""The offline responder: a deterministic stand-in for Gemini that needs no network or key.

It lets anyone run and test raycord with nothing configured; every reply says it is
offline, in its text and in its metadata.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator

from bot.llm.base import Chunk, ImagePart, LLMRequest, LLMResult, LLMStream

OFFLINE_MODEL = "offline-echo"

_OPENERS = (
    "Here's what I have on that",
    "Good question",
    "Let me think about that",
    "Interesting",
)


class OfflineResponder:
    """Answers from the prompt alone, the same way every time for the same request."""

    name = OFFLINE_MODEL

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.calls = 0

    def _compose(self, request: LLMRequest) -> str:
        digest = hashlib.blake2b(request.prompt.encode("utf-8"), digest_size=4).digest()
        opener = _OPENERS[digest[0] % len(_OPENERS)]
        prompt = " ".join(request.prompt.split())
        quoted = prompt if len(prompt) <= 200 else prompt[:197] + "..."
        remembered = sum(1 for role, _, _ in request.history if role == "user")
        memory = f" I remember {remembered} earlier message(s) from you here." if remembered else ""
        images = f" You sent {len(request.images)} image(s)." if request.images else ""
        return (
            f"{opener}: you said \u201c{quoted}\u201d.{memory}{images} "
            "(offline mode: set GEMINI_API_KEY for real answers)"
        )

    async def generate(self, request: LLMRequest) -> LLMResult:
        self.calls += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        text = self._compose(request)
        return LLMResult(
            text=text,
            model=OFFLINE_MODEL,
            tokens_in=len(request.prompt.split()) + sum(len(t.split()) for _, _, t in request.history),
            tokens_out=len(text.split()),
            offline=True,
            metadata={"backend": "offline"},
        )

    def stream(self, request: LLMRequest) -> LLMStream:
        async def chunks() -> AsyncIterator[str]:
            result = await self.generate(request)
            words = result.text.split(" ")
            for i in range(0, len(words), 8):
                yield " ".join(words[i : i + 8]) + (" " if i + 8 < len(words) else "")
            stream.result = result

        stream = LLMStream(chunks())
        return stream

    async def aclose(self) -> None:
        return None


class OfflineBackend:
    """The offline responder as a backend of the LLM gateway: the same replies, in chunks."""

    name = "offline"

    def __init__(self, latency: float = 0.0) -> None:
        self.responder = OfflineResponder(latency)

    async def call(
        self, model: str, request: LLMRequest, images: tuple[ImagePart, ...], streamed: bool
    ) -> AsyncGenerator[Chunk, None]:
        result = await self.responder.generate(request)
        words = result.text.split(" ")
        step = 8 if streamed else len(words)
        for i in range(0, len(words), step):
            last = i + step >= len(words)
            text = " ".join(words[i : i + step]) + ("" if last else " ")
            usage = (result.tokens_in, result.tokens_out, 0, 0) if last else None
            yield Chunk(text, True, "STOP" if last else None, None, usage)
            # pieces arrive one at a time, as a network stream's do
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        return None
