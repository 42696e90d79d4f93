"""Gemini through the google-genai SDK's async client, as a backend of the LLM gateway:
one client (one connection pool) per gateway process, requests built as plain dicts,
responses summed up as `Chunk`s (assembled into a reply by `bot.llm.replies`).

Retries, quota, breaker and coalescing are the gateway's (`bot.llm.gateway`); the SDK's
own retries are off. `GeminiLLM` (the gateway run in the caller's own process) is kept
under this module's old name for callers that want the SDK in-process.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import aiohttp
from google import genai
from google.genai import errors, types

from bot.llm.base import Chunk, ImagePart, LLMRequest

__all__ = ["GeminiBackend", "retry_delay", "summarise"]

log = logging.getLogger(__name__)


def summarise(response: Any) -> Chunk:
    """A `GenerateContentResponse` as a `Chunk`."""
    usage = response.usage_metadata
    counts = (
        (
            usage.prompt_token_count or 0,
            usage.candidates_token_count or 0,
            usage.thoughts_token_count or 0,
            usage.cached_content_token_count or 0,
        )
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
    return Chunk(text, True, finish, block, counts, _sources(candidate))


def _sources(candidate: Any) -> tuple[tuple[str, str], ...]:
    """(title, uri) of each web page a grounded candidate cites."""
    grounding = candidate.grounding_metadata
    if grounding is None or not grounding.grounding_chunks:
        return ()
    return tuple(
        (chunk.web.title or chunk.web.uri, chunk.web.uri)
        for chunk in grounding.grounding_chunks
        if chunk.web is not None and chunk.web.uri
    )


def _enum_name(value: Any) -> str:
    return str(getattr(value, "value", value))


class GeminiBackend:
    """One google-genai client over its own aiohttp session, for every call of a gateway."""

    name = "gemini"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        api_version: str,
        proxy: str | None,
        temperature: float,
        max_output_tokens: int,
        google_search: bool = False,
        thinking_budget: int | None = None,
    ) -> None:
        # The SDK's own session has `trust_env=True`, so aiohttp would look up `~/.netrc`
        # and the proxy variables on a worker thread for every request; the proxy is
        # looked up once instead (`env_proxy`), netrc (which an API key does not use) never.
        self._session = aiohttp.ClientSession(
            # as the SDK makes it: no limit on connections (the gateway bounds calls), a
            # 4 MiB read buffer for large responses
            connector=aiohttp.TCPConnector(limit=0),
            read_bufsize=2**22,
            trust_env=False,
            proxy=proxy,
        )
        http_options = types.HttpOptions(
            api_version=api_version,
            # attempts=1 turns off the SDK's own retries (its implicit retry of connection
            # errors included): the gateway's retries, deadline and breaker are the only ones
            retry_options=types.HttpRetryOptions(attempts=1),
            aiohttp_client=self._session,
        )
        if base_url:
            http_options.base_url = base_url
        self._client = genai.Client(api_key=api_key, vertexai=False, http_options=http_options)
        self._temperature = temperature
        self._max_output_tokens = max_output_tokens
        self._google_search = google_search
        self._thinking_budget = thinking_budget

    async def call(
        self, model: str, request: LLMRequest, images: tuple[ImagePart, ...], streamed: bool
    ) -> AsyncGenerator[Chunk, None]:
        """The reply's responses in order (one when not streamed).

        Raises:
            errors.APIError: the API answered with an error status.
            TimeoutError, aiohttp.ClientError, OSError: the call failed on the way.
        """
        contents, config = self._build(request, images)
        models = self._client.aio.models
        if not streamed:
            yield summarise(await models.generate_content(model=model, contents=contents, config=config))
            return
        stream = await models.generate_content_stream(model=model, contents=contents, config=config)
        try:
            async for response in stream:
                yield summarise(response)
        finally:
            # closing early drops the HTTP stream, which frees its connection
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def aclose(self) -> None:
        await self._client.aio.aclose()
        await self._session.close()  # ours: the SDK closes only the sessions it made

    def _build(
        self, request: LLMRequest, images: tuple[ImagePart, ...]
    ) -> tuple[list[types.ContentDict], types.GenerateContentConfigDict]:
        # Plain dicts, not `types.Content` models: the SDK validates what it is given
        # into its own models anyway, and re-validating model instances costs it several
        # times more CPU; history is most of a request.
        contents: list[types.ContentDict] = []
        for role, author, text in request.history:
            if role == "model":
                contents.append({"role": "model", "parts": [{"text": text}]})
            else:
                # several people talk in one channel: the model needs to know who said what
                said = f"{author}: {text}" if author else text
                contents.append({"role": "user", "parts": [{"text": said}]})
        # what changes every turn goes with the new message, after the history: the system
        # instruction and the older turns then begin every request of a conversation alike,
        # and Gemini's implicit cache serves them
        parts: list[types.PartDict] = [{"text": request.note}] if request.note else []
        if request.prompt:
            parts.append({"text": request.prompt})
        parts.extend({"inline_data": {"data": image.data, "mime_type": image.mime_type}} for image in images)
        contents.append({"role": "user", "parts": parts})
        config: types.GenerateContentConfigDict = {
            "temperature": self._temperature,
            "max_output_tokens": self._max_output_tokens,
        }
        if request.system_prompt:
            config["system_instruction"] = request.system_prompt
        if self._google_search:
            config["tools"] = [{"google_search": {}}]
        if self._thinking_budget is not None:
            # thoughts stay out of the reply: `summarise` drops thought parts as well. (The
            # SDK sends this object's keys in snake_case; the API's JSON takes either case.)
            config["thinking_config"] = {"thinking_budget": self._thinking_budget, "include_thoughts": False}
        return contents, config


_DURATION = re.compile(r"^\s*([0-9.]+)s\s*$")


def retry_delay(exc: errors.APIError) -> float | None:
    """The server's `RetryInfo.retryDelay` (e.g. "0.2s"), in seconds, when it sent one."""
    details = exc.details if isinstance(exc.details, dict) else {}
    error = details.get("error", details)
    for detail in error.get("details", ()) if isinstance(error, dict) else ():
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


if TYPE_CHECKING:
    from bot.llm.gateway import GeminiLLM as GeminiLLM


def __getattr__(name: str) -> Any:
    # `GeminiLLM` lives with the gateway it runs in-process; imported lazily because the
    # gateway imports this module
    if name == "GeminiLLM":
        from bot.llm.gateway import GeminiLLM

        return GeminiLLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
