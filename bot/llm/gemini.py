"""Gemini through the google-genai SDK's async client: one client per process, at most N
calls in flight (FIFO), identical requests coalesced, 429/5xx/timeouts retried with backoff
honouring RetryInfo, a circuit breaker, explicit safety/empty/MAX_TOKENS replies, streaming.

The SDK itself runs in a child process (`bot.llm.sdk_process`), so its CPU per call never
holds the bot's event loop; everything else here runs on the caller's loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager

import aiohttp
from google.genai import errors, types
from pydantic import BaseModel

from actors.errors import InputRejected, UpstreamUnavailable
from actors.metrics import LATENCY_MS_BOUNDARIES, counter, gauge, histogram
from bot.config import Settings
from bot.llm.base import ImagePart, LLMRequest, LLMResult, LLMStream, check_images
from bot.llm.resilience import Backoff, CircuitBreaker, ConcurrencyGate, SingleFlight
from bot.llm.sdk_process import Chunk, SDKOptions, SDKProcess, env_proxy

log = logging.getLogger(__name__)

#: statuses worth another attempt; every other 4xx is the request's fault and is final
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})

#: what the user reads when the model ends a reply for a reason other than finishing it
_ENDINGS = {
    "SAFETY": "I can't help with that one: the model's safety filters blocked the reply.",
    "PROHIBITED_CONTENT": "I can't help with that one: the model's safety filters blocked the reply.",
    "BLOCKLIST": "I can't help with that one: the reply contained blocked terms.",
    "SPII": "I can't help with that one: the reply would have contained personal information.",
    "RECITATION": "I had to withhold that reply: it repeated published material too closely.",
    "MAX_TOKENS": "*(reply cut short: it reached the length limit)*",
}
_PROMPT_BLOCKED = "I can't help with that one: the model's safety filters blocked the request."
_EMPTY = "The model returned no answer this time. Please try rephrasing."
_UNFINISHED = "*(the model stopped early: {reason})*"


class UpstreamCoolingDown(UpstreamUnavailable):
    """The circuit breaker is open: calls fail fast until the cool-down ends."""

    def user_message(self) -> str:
        secs = max(1, round(self.retry_after or 1))
        return (
            "The model has been failing repeatedly, so I'm giving it a short break. "
            f"Please try again in about {secs} second{'s' if secs != 1 else ''}."
        )


class LLMStats(BaseModel):
    requests: int
    streams: int
    upstream_calls: int
    coalesced: int
    retries: int
    failures: int
    in_flight: int
    queued: int
    peak_in_flight: int
    breaker_state: str
    breaker_opened: int
    tokens_in: int
    tokens_out: int


class _Retryable(Exception):
    """An attempt failed in a way another attempt may fix."""

    def __init__(self, detail: str, server_delay: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.server_delay = server_delay


class GeminiLLM:
    """The Gemini backend. One instance per process; its SDK client pools connections."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        cfg = settings.llm
        self.settings = cfg
        self.name = cfg.model
        key = settings.gemini_api_key.get_secret_value() if settings.gemini_api_key else None
        if key is None and cfg.base_url is None:
            raise ValueError("the Gemini backend needs GEMINI_API_KEY (or GOOGLE_API_KEY) or llm.base_url")
        # a local fake server or a keyed proxy accepts any key
        options = SDKOptions(
            api_key=key or "unused",
            base_url=cfg.base_url,
            api_version=cfg.api_version,
            proxy=env_proxy(cfg.base_url),
        )
        # each process holds one SDK client, reused for every call (its connection pool)
        self._sdks = [SDKProcess(options, name=f"gemini-sdk-{i}") for i in range(cfg.sdk_processes)]
        self._generation = {"temperature": cfg.temperature, "max_output_tokens": cfg.max_output_tokens}
        self._gate = ConcurrencyGate(cfg.max_concurrency)
        self._flights: SingleFlight[LLMResult] = SingleFlight()
        self._breaker = CircuitBreaker(cfg.breaker_threshold, cfg.breaker_cooldown_seconds, clock)
        self._backoff = Backoff(cfg.backoff_base_seconds, cfg.backoff_max_seconds)
        self.requests = self.streams = self.upstream_calls = self.retries = self.failures = 0
        self.tokens_in = self.tokens_out = 0
        self._m_in_flight = gauge("llm_in_flight", "Gemini calls in flight")
        self._m_queued = gauge("llm_queued", "Gemini calls waiting for a slot")
        self._m_queue_wait = histogram(
            "llm_queue_wait_ms", "time a Gemini call waited for a slot", LATENCY_MS_BOUNDARIES
        )
        self._m_attempts = counter("llm_upstream_calls", "Gemini HTTP calls by outcome", ("outcome",))
        self._m_coalesced = counter("llm_coalesced", "requests answered by another request's call")
        self._m_tokens = counter("llm_tokens", "Gemini tokens by direction", ("direction",))
        self._m_breaker = gauge("llm_breaker_open", "1 while the Gemini circuit breaker is open")

    # --- the LLM protocol ---------------------------------------------------------------

    async def generate(self, request: LLMRequest) -> LLMResult:
        """The whole reply.

        Raises:
            InputRejected: an attachment is refused, or the API rejected the request.
            UpstreamUnavailable: retries exhausted, the deadline passed, or the breaker is open.
        """
        images = self._images(request)
        self.requests += 1
        if not request.key:
            return await self._generate(request, images)
        if request.key in self._flights:
            self._m_coalesced.inc()
        return await self._flights.do(request.key, lambda: self._generate(request, images))

    def stream(self, request: LLMRequest) -> LLMStream:
        """The reply as text chunks, in order; `result` carries usage once it is exhausted.

        Errors are those of `generate`, raised while iterating. A stream is retried only
        until its first chunk: after that a failure ends it with `UpstreamUnavailable`.
        """
        stream = LLMStream(self._stream_chunks(request, lambda result: setattr(stream, "result", result)))
        return stream

    async def start(self) -> None:
        """Start the SDK processes now rather than on the first call (which would wait
        for them). Raises `ConnectionError` when one exits before it is ready."""
        await asyncio.gather(*(sdk.start() for sdk in self._sdks))

    def sdk_pids(self) -> list[int]:
        """The process ids of the SDK processes that are running."""
        return [sdk.pid for sdk in self._sdks if sdk.pid is not None]

    async def aclose(self) -> None:
        await asyncio.gather(*(sdk.close() for sdk in self._sdks))

    async def _sdk(self, deadline: float) -> SDKProcess:
        """The SDK process with the fewest calls in flight, started if it is not running.

        Starting takes a second or two (the SDK's imports), once per process: it is kept
        out of the attempt's timeout and bounded by the request's deadline only.
        """
        sdk = min(self._sdks, key=lambda sdk: sdk.in_flight)
        try:
            async with asyncio.timeout_at(deadline):
                await sdk.start()
        except (TimeoutError, OSError) as exc:
            raise _Retryable(f"the SDK process did not start: {exc or type(exc).__name__}") from exc
        return sdk

    def stats(self) -> LLMStats:
        return LLMStats(
            requests=self.requests,
            streams=self.streams,
            upstream_calls=self.upstream_calls,
            coalesced=self._flights.joined,
            retries=self.retries,
            failures=self.failures,
            in_flight=self._gate.in_flight,
            queued=self._gate.queued,
            peak_in_flight=self._gate.peak_in_flight,
            breaker_state=self._breaker.state,
            breaker_opened=self._breaker.times_opened,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
        )

    # --- one request --------------------------------------------------------------------

    async def _generate(self, request: LLMRequest, images: tuple[ImagePart, ...]) -> LLMResult:
        contents, config = self._build(request, images)
        model = request.model or self.name
        deadline = asyncio.get_running_loop().time() + self.settings.timeout_seconds

        async def once() -> Chunk:
            sdk = await self._sdk(deadline)
            async with self._attempt(deadline):
                async with asyncio.timeout_at(self._attempt_deadline(deadline)):
                    response = await sdk.generate(model, contents, config)
            return response

        response = await self._with_retries(deadline, once)
        reply = _Reply()
        reply.add(response)
        return self._finish(reply, model)

    async def _stream_chunks(
        self, request: LLMRequest, done: Callable[[LLMResult], None]
    ) -> AsyncIterator[str]:
        images = self._images(request)
        self.requests += 1
        self.streams += 1
        contents, config = self._build(request, images)
        model = request.model or self.name
        deadline = asyncio.get_running_loop().time() + self.settings.timeout_seconds
        reply = _Reply()
        attempt = 0
        while True:
            attempt += 1
            try:
                sdk = await self._sdk(deadline)
                async with self._attempt(deadline):
                    chunks = sdk.stream(model, contents, config)
                    async with aclosing(chunks):
                        while True:
                            try:
                                # the timeout covers the wait for a chunk (the first one
                                # included), never the consumer's work
                                async with asyncio.timeout_at(self._attempt_deadline(deadline)):
                                    response = await anext(chunks)
                            except StopAsyncIteration:
                                break
                            text = reply.add(response)
                            if text:
                                yield text
                break
            except _Retryable as exc:
                if reply.parts:
                    self.failures += 1
                    raise UpstreamUnavailable(f"the reply broke off: {exc.detail}") from exc
                await self._pause_before_retry(attempt, deadline, exc)
        note = reply.closing_note()
        if note:
            yield note
        done(self._finish(reply, model))

    async def _with_retries(self, deadline: float, once: Callable[[], Awaitable[Chunk]]) -> Chunk:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await once()
            except _Retryable as exc:
                await self._pause_before_retry(attempt, deadline, exc)

    async def _pause_before_retry(self, attempt: int, deadline: float, exc: _Retryable) -> None:
        """Sleep before the next attempt, or raise when there is no next attempt to make."""
        if attempt >= self.settings.max_attempts:
            self.failures += 1
            raise UpstreamUnavailable(
                f"gave up after {attempt} attempts: {exc.detail}", retry_after=exc.server_delay
            ) from exc
        delay = self._backoff.delay(attempt, exc.server_delay)
        if asyncio.get_running_loop().time() + delay >= deadline:
            self.failures += 1
            raise UpstreamUnavailable(
                f"no time left for another attempt within {self.settings.timeout_seconds:g}s: {exc.detail}",
                retry_after=delay,
            ) from exc
        self.retries += 1
        log.info("Gemini attempt %d failed (%s); retrying in %.2fs", attempt, exc.detail, delay)
        await asyncio.sleep(delay)

    def _attempt_deadline(self, deadline: float) -> float:
        return min(deadline, asyncio.get_running_loop().time() + self.settings.attempt_timeout_seconds)

    @asynccontextmanager
    async def _attempt(self, deadline: float) -> AsyncIterator[None]:
        """One upstream attempt: past the breaker, through a slot, its failure classified.

        Raises `_Retryable` for 429/5xx/timeouts/connection errors, the final typed error
        otherwise; the breaker hears about every attempt that reached the upstream.
        """
        if not self._breaker.allow():
            self.failures += 1
            self._m_breaker.set(1)
            wait = self._breaker.retry_after()
            raise UpstreamCoolingDown(f"circuit open; retry in {wait:.1f}s", retry_after=wait)
        settled = False
        try:
            await self._acquire(deadline)
            try:
                self.upstream_calls += 1
                yield
            except TimeoutError as exc:
                settled = self._upstream_failed("timeout")
                raise _Retryable("timed out") from exc
            except errors.APIError as exc:
                if exc.code in RETRYABLE_STATUS:
                    settled = self._upstream_failed(str(exc.code))
                    raise _Retryable(f"{exc.code} {exc.status}", _retry_delay(exc)) from exc
                # the upstream is up and answered: it is the request that is wrong
                settled = self._upstream_answered(str(exc.code))
                self.failures += 1
                raise _final_error(exc) from exc
            except (aiohttp.ClientError, OSError) as exc:
                settled = self._upstream_failed("connection")
                raise _Retryable(f"connection failed: {exc}") from exc
            finally:
                self._gate.release()
                self._m_in_flight.set(self._gate.in_flight)
            settled = self._upstream_answered("ok")
        finally:
            if not settled:
                self._breaker.record_abandoned()

    async def _acquire(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        queued_at = loop.time()
        self._m_queued.set(self._gate.queued + 1)
        try:
            async with asyncio.timeout_at(deadline):
                await self._gate.acquire()
        except TimeoutError as exc:
            self.failures += 1
            raise UpstreamUnavailable(
                f"no free slot within {self.settings.timeout_seconds:g}s ({self._gate.limit} calls in flight)"
            ) from exc
        self._m_queue_wait.observe((loop.time() - queued_at) * 1000)
        self._m_queued.set(self._gate.queued)
        self._m_in_flight.set(self._gate.in_flight)

    def _upstream_failed(self, outcome: str) -> bool:
        self._breaker.record_failure()
        self._m_breaker.set(1 if self._breaker.state == CircuitBreaker.OPEN else 0)
        self._m_attempts.inc(tags={"outcome": outcome})
        return True

    def _upstream_answered(self, outcome: str) -> bool:
        self._breaker.record_success()
        self._m_breaker.set(0)
        self._m_attempts.inc(tags={"outcome": outcome})
        return True

    # --- building the request and reading the reply ---------------------------------------

    def _images(self, request: LLMRequest) -> tuple[ImagePart, ...]:
        return check_images(
            request.images, max_images=self.settings.max_images, max_bytes=self.settings.max_image_bytes
        )

    def _build(
        self, request: LLMRequest, images: tuple[ImagePart, ...]
    ) -> tuple[list[types.ContentDict], types.GenerateContentConfigDict]:
        # Plain dicts, not `types.Content` models: the SDK validates what it is given
        # into its own models anyway, and re-validating model instances costs it ~6x
        # more CPU (44 ms against 8 ms for 20 turns here); history is most of a request.
        contents: list[types.ContentDict] = []
        for role, author, text in request.history:
            if role == "model":
                contents.append({"role": "model", "parts": [{"text": text}]})
            else:
                # several people talk in one channel: the model needs to know who said what
                said = f"{author}: {text}" if author else text
                contents.append({"role": "user", "parts": [{"text": said}]})
        parts: list[types.PartDict] = [{"text": request.prompt}] if request.prompt else []
        parts.extend({"inline_data": {"data": image.data, "mime_type": image.mime_type}} for image in images)
        contents.append({"role": "user", "parts": parts})
        config: types.GenerateContentConfigDict = {
            "temperature": self._generation["temperature"],
            "max_output_tokens": self._generation["max_output_tokens"],
        }
        if request.system_prompt:
            config["system_instruction"] = request.system_prompt
        return contents, config

    def _finish(self, reply: _Reply, model: str) -> LLMResult:
        result = reply.result(model)
        self.tokens_in += result.tokens_in
        self.tokens_out += result.tokens_out
        # Ray counters refuse an increment of zero
        if result.tokens_in:
            self._m_tokens.inc(result.tokens_in, tags={"direction": "in"})
        if result.tokens_out:
            self._m_tokens.inc(result.tokens_out, tags={"direction": "out"})
        return result


class _Reply:
    """A reply assembled from one response or a stream of them."""

    __slots__ = ("block_reason", "finish_reason", "parts", "tokens_in", "tokens_out")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.block_reason: str | None = None
        self.tokens_in = 0
        self.tokens_out = 0

    def add(self, chunk: Chunk) -> str:
        """Take in one response (as the SDK process summed it up); returns its new text."""
        if chunk.usage is not None:
            # streamed chunks carry running totals: the last one holds the reply's usage
            prompt, candidates, thoughts = chunk.usage
            self.tokens_in = prompt
            self.tokens_out = candidates + thoughts
        if chunk.block_reason is not None:
            self.block_reason = chunk.block_reason
        if not chunk.has_candidates:
            return ""
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.text:
            self.parts.append(chunk.text)
        return chunk.text

    @property
    def reason(self) -> str:
        if self.block_reason is not None:
            return (
                "SAFETY"
                if self.block_reason in ("SAFETY", "BLOCKED_REASON_UNSPECIFIED")
                else self.block_reason
            )
        if self.finish_reason is None or self.finish_reason == "FINISH_REASON_UNSPECIFIED":
            return "STOP" if self.parts else "EMPTY"
        if self.finish_reason == "STOP" and not self.parts:
            return "EMPTY"
        return self.finish_reason

    def closing_note(self) -> str:
        """What to add after the text so the user knows why the reply ends where it does."""
        reason = self.reason
        if reason == "STOP":
            return ""
        if self.block_reason is not None:
            note = _PROMPT_BLOCKED
        elif reason == "EMPTY":
            note = _EMPTY
        else:
            note = _ENDINGS.get(reason, _UNFINISHED.format(reason=reason.lower().replace("_", " ")))
        return f"\n\n{note}" if self.parts else note

    def result(self, model: str) -> LLMResult:
        return LLMResult(
            text="".join(self.parts) + self.closing_note(),
            model=model,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            finish_reason=self.reason,
            metadata={"backend": "gemini"},
        )


_DURATION = re.compile(r"^\s*([0-9.]+)s\s*$")


def _retry_delay(exc: errors.APIError) -> float | None:
    """The server's `RetryInfo.retryDelay` (e.g. "0.2s"), in seconds, when it sent one."""
    details = exc.details if isinstance(exc.details, dict) else {}
    error = details.get("error", details)
    for detail in error.get("details", ()) if isinstance(error, dict) else ():
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def _final_error(exc: errors.APIError) -> Exception:
    message = exc.message or exc.status or "no detail"
    if exc.code == 400:
        return InputRejected(f"the model refused the request ({message})")
    log.error("Gemini call failed with %s %s: %s", exc.code, exc.status, message)
    return UpstreamUnavailable(f"{exc.code} {exc.status}: {message}")
