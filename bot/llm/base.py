"""The LLM protocol the pipeline talks to, and the plain request/result types."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True, frozen=True)
class ImagePart:
    mime_type: str
    data: bytes


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


@dataclass(slots=True)
class LLMResult:
    text: str
    model: str
    tokens_in: int = 0
    tokens_out: int = 0
    finish_reason: str = "STOP"
    offline: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


class LLM(Protocol):
    """What every backend offers. `stream` yields the reply's text in order."""

    name: str

    async def generate(self, request: LLMRequest) -> LLMResult: ...

    def stream(self, request: LLMRequest) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...
