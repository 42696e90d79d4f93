"""The LLM gateway: one service owning the upstream client for every front-end attached
to the same Ray, so the quota, the in-flight bound, the circuit breaker and single-flight
hold across all of them.

`LLMGateway` is the plain class (`bot/runtime.py` makes it an actor): a request waits in
a fair queue (round-robin by server, then user) until a slot and its model's quota allow
it, or is answered "busy" at once when that would take longer than `llm.max_queue_seconds`;
identical requests share one upstream call, streamed ones included; a 429/503 moves the
request down `llm.fallback_models`. `GatewayClient` is a front-end's handle on the actors
(replies stream back through a Ray streaming generator, in coalesced pieces); `GeminiLLM`
runs the same gateway in the caller's own process.

It lives in `bot/llm/`, not `actors/`: it owns the google-genai client and the LLM types
and settings of `bot/`, and nothing in `actors/` may import `bot/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from pydantic import BaseModel, SecretStr
from yarl import URL

from actors import metrics
from actors.analytics import AnalyticsClient, AnalyticsConfig
from actors.base import Clock, Service, ShardedClient
from actors.errors import InputRejected, RaycordError, ServiceUnavailable, UpstreamUnavailable
from actors.schemas import AnalyticsEvent
from bot.attachments import AttachmentPolicy, check_inline_parts
from bot.config import LLMSettings, Settings
from bot.llm.base import (
    UPSTREAM_MS,
    Backend,
    GatewayBusy,
    ImagePart,
    LLMRequest,
    LLMResult,
    LLMStream,
    UnknownModel,
    UpstreamCoolingDown,
    result_stream,
)
from bot.llm.offline import OFFLINE_MODEL, OfflineBackend
from bot.llm.quota import FairQueue, ModelLimits, ModelQuota, Ticket, estimate_prompt_tokens
from bot.llm.replies import Reply
from bot.llm.resilience import Backoff, CircuitBreaker

__all__ = [
    "GatewayClient",
    "GatewayConfig",
    "GatewayStats",
    "GeminiLLM",
    "LLMGateway",
    "default_model",
    "env_proxy",
]

log = logging.getLogger(__name__)

#: statuses worth another attempt; every other 4xx is the request's fault and is final
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: quota exhausted or model overloaded: the next fallback model is tried at once
FALLBACK_STATUS = frozenset({429, 503})
#: conversations whose token calibration the gateway keeps (least recently used go first)
CALIBRATED_CONVERSATIONS = 10_000
#: a conversation's measured tokens per estimated token, kept within these bounds
CALIBRATION_BOUNDS = (0.25, 4.0)
#: where the SDK sends requests when no base URL is configured
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
#: a trim over the prompt budget leaves out a multiple of this many turns, so the history
#: sent starts at the same turn for several turns in a row and Gemini's implicit cache
#: keeps serving its prefix (a trim of one turn at a time would change it every turn)
TRIM_STEP_TURNS = 8
#: the analytics event of one upstream call (`raycord analytics --report cost`)
LLM_CALL_EVENT = "llm_call"
#: the analytics sink's actor, looked up by name in the gateway's namespace
ANALYTICS_ACTOR = "analytics-0"
#: call events kept while the analytics sink cannot be found
UNSENT_EVENTS = 10_000
#: seconds between lookups of an analytics sink that was not found
SINK_LOOKUP_INTERVAL = 1.0


def env_proxy(base_url: str | None) -> str | None:
    """The proxy the environment (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`...) gives for the
    API's host, credentials included, or None. Looked up by the front-end that makes the
    gateway, whose environment is the operator's; a Ray worker's may not be."""
    try:
        proxy, auth = get_env_proxy_for_url(URL(base_url or DEFAULT_BASE_URL))
    except LookupError:
        return None
    if auth is not None:
        proxy = proxy.with_user(auth.login).with_password(auth.password)
    return str(proxy)


class GatewayConfig(BaseModel):
    """What a gateway actor is made with: the LLM settings and what the front-end that
    made it resolved (backend, key, proxy), since a Ray worker's environment may differ."""

    llm: LLMSettings
    backend: Literal["gemini", "offline"]
    api_key: SecretStr | None = None
    proxy: SecretStr | None = None
    #: the Ray namespace whose analytics sink hears of every upstream call (None: no events)
    namespace: str | None = None
    analytics: AnalyticsConfig = AnalyticsConfig()

    @property
    def shards(self) -> int:
        return self.llm.replicas

    @property
    def google_api(self) -> bool:
        return self.llm.base_url is None

    @classmethod
    def from_settings(
        cls, settings: Settings, backend: Literal["gemini", "offline"] | None = None
    ) -> GatewayConfig:
        chosen = backend or settings.llm_backend()
        proxy = None
        if chosen == "gemini":
            if settings.gemini_api_key is None and settings.llm.base_url is None:
                raise ValueError(
                    "the Gemini backend needs GEMINI_API_KEY (or GOOGLE_API_KEY) or llm.base_url"
                )
            found = env_proxy(settings.llm.base_url)
            proxy = SecretStr(found) if found else None
        return cls(
            llm=settings.llm,
            backend=chosen,
            api_key=settings.gemini_api_key,
            proxy=proxy,
            namespace=settings.namespace,
            analytics=settings.analytics,
        )

    def model_name(self) -> str:
        """The model the pipeline asks for by default."""
        return default_model(self.backend, self.llm)


def _in_ray_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def default_model(backend: str, llm: LLMSettings) -> str:
    """The model a pipeline on `backend` asks for unless told otherwise."""
    return OFFLINE_MODEL if backend == "offline" else llm.model


class GatewayStats(BaseModel):
    shard: int
    backend: str
    requests: int
    streams: int
    upstream_calls: int
    coalesced: int
    retries: int
    failures: int
    fallbacks: int
    busy: int
    #: requests whose history was trimmed to fit the prompt budget
    trimmed: int
    in_flight: int
    queued: int
    peak_in_flight: int
    breaker_state: str
    breaker_opened: int
    tokens_in: int
    tokens_out: int
    cached_tokens: int
    thinking_tokens: int
    #: share of prompt tokens served from Gemini's cache
    cached_prompt_share: float
    #: estimated US dollars spent since the gateway started, per model
    cost_usd: dict[str, float]
    #: upstream calls handed to analytics as events; those waiting for the sink to be
    #: found, and those dropped when it could not be found for too long
    calls_recorded: int = 0
    calls_waiting: int = 0
    calls_dropped: int = 0
    #: per model: requests this minute, prompt tokens this minute, requests today
    quota_used: dict[str, tuple[int, int, int]]


@dataclass(slots=True, eq=False)
class _Waiter:
    """A request waiting for its turn: granted a (model, ticket) through `future`."""

    chain: tuple[str, ...]
    tokens: int
    future: asyncio.Future[tuple[str, Ticket]]


@dataclass(slots=True, eq=False)
class _Flight:
    """One upstream call and everyone reading it: its text so far, then its outcome."""

    streamed: bool
    chunks: list[str] = field(default_factory=list)
    result: LLMResult | None = None
    error: BaseException | None = None
    done: bool = False
    subscribers: int = 0
    task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, text: str) -> None:
        self.chunks.append(text)
        self._notify()

    def finish(self, result: LLMResult | None, error: BaseException | None) -> None:
        self.result, self.error, self.done = result, error, True
        self._notify()

    def _notify(self) -> None:
        # every reader holds the event it waits on; a fresh one serves the next change
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def changed(self, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def outcome(self) -> LLMResult:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class _TooLong(Exception):
    """The API refused the prompt as longer than the model takes (a 400)."""


class _Retryable(Exception):
    """An attempt failed in a way another attempt (or another model) may fix."""

    def __init__(self, detail: str, status: int | None = None, server_delay: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.server_delay = server_delay


class LLMGateway(Service):
    """The quota, fair queue, single-flight, breaker and fallbacks in front of one backend."""

    def __init__(
        self,
        config: GatewayConfig,
        state_dir: Path | None = None,
        shard: int = 0,
        *,
        clock: Clock | None = None,
        backend: Backend | None = None,
        analytics: AnalyticsClient | None = None,
    ) -> None:
        """`analytics`: where the events of upstream calls go; as a Ray actor with a
        `config.namespace`, the namespace's analytics sink is found by name."""
        super().__init__(clock)
        self.config = config
        self.settings = cfg = config.llm
        self.shard = shard
        self._backend = backend
        self._analytics = analytics
        self._state_dir = state_dir
        #: as a Ray actor, the analytics sink is looked up by name (in process, only the
        #: client given is used)
        self._find_sink = analytics is None and config.namespace is not None and _in_ray_actor()
        #: events of upstream calls made before the analytics sink was found
        self._unsent: list[AnalyticsEvent] = []
        self._sink_missing_said = False
        #: monotonic time before which a missing sink is not looked up again
        self._sink_retry_at = 0.0
        self.events_dropped = 0
        self._quotas: dict[str, ModelQuota] = {}
        self._queue: FairQueue[_Waiter] = FairQueue()
        self._in_flight = 0
        self.peak_in_flight = 0
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._flights: dict[str, _Flight] = {}
        self._breaker = CircuitBreaker(cfg.breaker_threshold, cfg.breaker_cooldown_seconds, self.clock)
        self._backoff = Backoff(cfg.backoff_base_seconds, cfg.backoff_max_seconds)
        #: model -> clock time before which the server asked us not to call it again
        self._cooling: dict[str, float] = {}
        #: conversation -> prompt tokens the API counted per token estimated, last time
        self._calibration: OrderedDict[str, float] = OrderedDict()
        self.trimmed = 0
        self.requests = self.streams = self.upstream_calls = self.coalesced = 0
        self.retries = self.failures = self.fallbacks = self.busy = 0
        self.tokens_in = self.tokens_out = self.cached_tokens = self.thinking_tokens = 0
        #: estimated US dollars spent, per model
        self.cost_usd: dict[str, float] = {}
        self._m_requests = metrics.counter("llm_requests", "requests to the LLM gateway", ("kind",))
        self._m_attempts = metrics.counter(
            "llm_upstream_calls", "upstream LLM calls by model and outcome", ("model", "outcome")
        )
        self._m_coalesced = metrics.counter("llm_coalesced", "requests answered by another request's call")
        self._m_busy = metrics.counter(
            "llm_busy", "requests answered busy: the quota would keep them too long"
        )
        self._m_fallbacks = metrics.counter("llm_fallbacks", "requests moved to a fallback model", ("model",))
        self._m_tokens = metrics.counter("llm_tokens", "LLM tokens by kind", ("kind",))
        self._m_cached_share = metrics.gauge(
            "llm_cached_prompt_share", "share of prompt tokens served from Gemini's cache", ("shard",)
        )
        self._m_cost = metrics.counter("llm_cost_usd", "estimated LLM cost in US dollars", ("model",))
        self._m_queue_wait = metrics.histogram(
            "llm_queue_wait_ms", "time a request waited for its turn", metrics.LATENCY_MS_BOUNDARIES
        )
        self._m_in_flight = metrics.gauge("llm_in_flight", "upstream LLM calls in flight", ("shard",))
        self._m_queued = metrics.gauge("llm_queued", "requests waiting for their turn", ("shard",))
        self._m_breaker = metrics.gauge("llm_breaker_open", "1 while the circuit breaker is open", ("shard",))
        self._m_quota = metrics.gauge(
            "llm_quota_used", "share of a model's quota used", ("shard", "model", "window")
        )

    # --- the two ways in ----------------------------------------------------------------

    async def generate(self, request: LLMRequest) -> LLMResult:
        """The whole reply.

        Raises:
            InputRejected: an attachment is refused, or the API rejected the request.
            GatewayBusy: the quota would keep it waiting too long; carries `retry_after`.
            UnknownModel: the API does not know the model.
            UpstreamUnavailable: retries exhausted, the deadline passed, or the breaker is open.
        """
        self._ensure_maintenance()
        images = self._images(request)
        self.requests += 1
        self._m_requests.inc(tags={"kind": "generate"})
        flight = self._join(request, images, streamed=False)
        try:
            while not flight.done:
                await flight.changed(None)
            return flight.outcome()
        finally:
            self._leave(request.key, flight)

    async def stream(self, request: LLMRequest) -> AsyncGenerator[str | LLMResult, None]:
        """The reply as text pieces, in order, then its `LLMResult` as the last item.

        Pieces leave at most every `llm.stream_interval_seconds` (the first at once) or
        when `llm.stream_chunk_chars` are waiting, so a reply costs a few round trips
        through Ray, not one per token. A request joining an identical one in flight gets
        every piece from the start. Errors are those of `generate`; a stream is retried
        only until its first piece, after which a failure ends it with `UpstreamUnavailable`.
        """
        self._ensure_maintenance()
        images = self._images(request)
        self.requests += 1
        self.streams += 1
        self._m_requests.inc(tags={"kind": "stream"})
        cfg = self.settings
        flight = self._join(request, images, streamed=True)
        try:
            read = 0
            pending: list[str] = []
            sent_at = -math.inf
            while True:
                fresh = flight.chunks[read:]
                read += len(fresh)
                pending.extend(fresh)
                waited = time.monotonic() - sent_at
                size = sum(map(len, pending))
                if pending and (
                    flight.done or size >= cfg.stream_chunk_chars or waited >= cfg.stream_interval_seconds
                ):
                    yield "".join(pending)
                    pending.clear()
                    sent_at = time.monotonic()
                    continue
                if flight.done:
                    break
                await flight.changed(cfg.stream_interval_seconds - waited if pending else None)
            yield flight.outcome()
        finally:
            self._leave(request.key, flight)

    # --- single-flight ------------------------------------------------------------------

    def _join(self, request: LLMRequest, images: tuple[ImagePart, ...], *, streamed: bool) -> _Flight:
        key = request.key
        flight = self._flights.get(key) if key else None
        if flight is not None:
            self.coalesced += 1
            self._m_coalesced.inc()
        else:
            flight = _Flight(streamed)
            flight.task = asyncio.get_running_loop().create_task(self._produce(request, images, flight))
            if key:
                self._flights[key] = flight
        flight.subscribers += 1
        return flight

    def _leave(self, key: str, flight: _Flight) -> None:
        flight.subscribers -= 1
        if flight.subscribers == 0 and not flight.done:
            # nobody wants the answer any more: stop the upstream call; a later caller starts afresh
            self._forget(key, flight)
            if flight.task is not None:
                flight.task.cancel()

    def _forget(self, key: str, flight: _Flight) -> None:
        if key and self._flights.get(key) is flight:
            del self._flights[key]

    async def _produce(self, request: LLMRequest, images: tuple[ImagePart, ...], flight: _Flight) -> None:
        try:
            result = await self._run(request, images, flight)
        except asyncio.CancelledError:
            flight.finish(None, UpstreamUnavailable("the request was cancelled"))
            raise
        except Exception as exc:
            flight.finish(None, exc)
        else:
            flight.finish(result, None)
        finally:
            self._forget(request.key, flight)

    # --- one request: admission, attempts, fallbacks ------------------------------------

    def _chain(self, request: LLMRequest) -> tuple[str, ...]:
        first = request.model or self.config.model_name()
        if self.config.backend == "offline":
            return (first,)
        return (first, *(m for m in dict.fromkeys(self.settings.fallback_models) if m != first))

    async def _run(self, request: LLMRequest, images: tuple[ImagePart, ...], flight: _Flight) -> LLMResult:
        cfg = self.settings
        backend = self._upstream()
        chain = self._chain(request)
        request = self._fit(request)
        estimate = estimate_prompt_tokens(request)
        tokens = round(estimate * self._ratio(request.conversation))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.timeout_seconds
        attempt = 0
        trimmed_for_length = False
        while True:
            attempt += 1
            model, ticket = await self._admit(request, chain, tokens, deadline, first=attempt == 1)
            reply = Reply()
            emitted = False
            called_at = loop.time()
            try:
                self.upstream_calls += 1
                called_at = loop.time()
                chunks = backend.call(model, request, images, flight.streamed)
                async with contextlib.aclosing(chunks):
                    while True:
                        try:
                            # the timeout covers the wait for a piece, never a reader's work
                            async with asyncio.timeout_at(
                                min(deadline, loop.time() + cfg.attempt_timeout_seconds)
                            ):
                                chunk = await anext(chunks)
                        except StopAsyncIteration:
                            break
                        text = reply.add(chunk)
                        if text:
                            flight.push(text)
                            emitted = True
            except asyncio.CancelledError:
                # nobody reads on, but what Gemini generated until now is billed
                self._account(request, model, chain[0], reply, (loop.time() - called_at) * 1000)
                raise
            except Exception as exc:
                failure = self._classify(exc, model)
                if isinstance(failure, _TooLong):
                    if trimmed_for_length or len(request.history) < 2 or emitted or flight.chunks:
                        self.failures += 1
                        raise InputRejected(
                            "the conversation is longer than the model takes; /reset starts a fresh one"
                        ) from exc
                    # the estimate was off: keep the newer half of the history, once
                    trimmed_for_length = True
                    self.trimmed += 1
                    request = replace(
                        request, history=_from_user_turn(request.history[len(request.history) // 2 :])
                    )
                    estimate = estimate_prompt_tokens(request)
                    tokens = round(estimate * self._ratio(request.conversation))
                    continue
                if not isinstance(failure, _Retryable):
                    self.failures += 1
                    raise failure from exc
                if emitted or flight.chunks:
                    self.failures += 1
                    # the part that came is billed
                    self._account(request, model, chain[0], reply, (loop.time() - called_at) * 1000)
                    raise UpstreamUnavailable(f"the reply broke off: {failure.detail}") from exc
                if failure.status in FALLBACK_STATUS:
                    self._cool(model, failure.server_delay, attempt)
                    if attempt < cfg.max_attempts and self._fallback_ready(chain, model):
                        self.fallbacks += 1
                        self._m_fallbacks.inc(tags={"model": model})
                        log.info("%s answered %s; trying the next fallback model", model, failure.status)
                        continue
                await self._pause_before_retry(attempt, deadline, failure)
                continue
            finally:
                self._release()
            self._upstream_answered(model, "ok")
            self._quota(model).correct(ticket, reply.tokens_in)
            self._calibrate(request.conversation, estimate, reply.tokens_in)
            note = reply.closing_note()
            if note:
                flight.push(note)
            offline = backend.name == "offline"
            result = reply.result(OFFLINE_MODEL if offline else model, backend.name, offline)
            # the answering call's own time, so a caller can tell the upstream's share of its
            # wait from the queue's, the gateway's and the transport's
            result.metadata[UPSTREAM_MS] = f"{(loop.time() - called_at) * 1000:.3f}"
            if model != chain[0]:
                result.metadata["fallback_from"] = chain[0]
            cost = self._account(request, result.model, chain[0], reply, (loop.time() - called_at) * 1000)
            if cost:
                result.metadata["cost_usd"] = f"{cost:.8f}"
            return result

    def _fit(self, request: LLMRequest) -> LLMRequest:
        """`request` with its oldest turns left out until its prompt fits
        `llm.max_prompt_tokens` (by the conversation's calibrated estimate)."""
        budget = self.settings.max_prompt_tokens
        ratio = self._ratio(request.conversation)
        total = estimate_prompt_tokens(request) * ratio
        if total <= budget or not request.history:
            return request
        history = request.history
        drop = 0
        while drop < len(history) and total > budget:
            _, author, text = history[drop]
            total -= (len(author) + len(text) + 2) / 4 * ratio
            drop += 1
        # up to the next step: the next turns' requests (two turns longer each) then start
        # at the same turn until they too outgrow the budget
        drop = min(len(history), -(-drop // TRIM_STEP_TURNS) * TRIM_STEP_TURNS)
        self.trimmed += 1
        return replace(request, history=_from_user_turn(history[drop:]))

    def _ratio(self, conversation: str) -> float:
        return self._calibration.get(conversation, 1.0) if conversation else 1.0

    def _calibrate(self, conversation: str, estimate: int, counted: int) -> None:
        if not conversation or estimate <= 0 or counted <= 0:
            return
        low, high = CALIBRATION_BOUNDS
        self._calibration[conversation] = min(high, max(low, counted / estimate))
        self._calibration.move_to_end(conversation)
        while len(self._calibration) > CALIBRATED_CONVERSATIONS:
            self._calibration.popitem(last=False)

    async def _admit(
        self, request: LLMRequest, chain: tuple[str, ...], tokens: int, deadline: float, *, first: bool
    ) -> tuple[str, Ticket]:
        """Wait for a slot and a model whose quota takes the request: (model, its ticket).

        Raises:
            UpstreamCoolingDown: the circuit breaker is open.
            GatewayBusy: on a first attempt, the wait would pass `llm.max_queue_seconds`
                or the queue is full.
            UpstreamUnavailable: no turn came before the request's deadline.
        """
        if not self._breaker.allow():
            self.failures += 1
            wait = self._breaker.retry_after()
            raise UpstreamCoolingDown(f"circuit open; retry in {wait:.1f}s", retry_after=wait)
        now = self.clock()
        if not self._queue and self._in_flight < self.settings.max_concurrency:
            model, _ = self._pick(chain, tokens, now)
            if model is not None:
                return self._grant(model, tokens, now)
        server, user = request.server or "", request.user or ""
        if first:
            eta = self._eta(chain, tokens, server, user, now)
            if eta > self.settings.max_queue_seconds or len(self._queue) >= self.settings.max_queued:
                self.busy += 1
                self._m_busy.inc()
                self._breaker.record_abandoned()
                raise GatewayBusy(
                    f"the quota would keep the request waiting {eta:.0f}s ({len(self._queue)} queued)",
                    retry_after=max(1.0, eta),
                )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(chain, tokens, loop.create_future())
        self._queue.push(server, user, waiter)
        self._kick()
        queued_at = loop.time()
        try:
            async with asyncio.timeout_at(deadline):
                granted = await waiter.future
        except BaseException as exc:
            self._breaker.record_abandoned()
            if waiter.future.done() and not waiter.future.cancelled():
                self._release()  # the turn came as the caller left: pass it on
            else:
                self._queue.remove(server, user, waiter)
            if isinstance(exc, TimeoutError):
                self.failures += 1
                raise UpstreamUnavailable(
                    f"no turn within {self.settings.timeout_seconds:g}s ({len(self._queue)} queued)"
                ) from exc
            raise
        self._m_queue_wait.observe((loop.time() - queued_at) * 1000)
        return granted

    def _pick(self, chain: tuple[str, ...], tokens: int, now: float) -> tuple[str | None, float]:
        """The first model of `chain` that may take the request now, or (None, seconds
        until one may). A model the server asked to cool down is passed over while
        another is ready; when all are cooling, the one that cools first is taken."""
        ready = [m for m in chain if self._cooling.get(m, 0.0) <= now]
        if not ready:
            ready = [min(chain, key=lambda m: self._cooling[m])]
        wait = math.inf
        for model in ready:
            w = self._quota(model).wait(now, tokens)
            if w <= 0:
                return model, 0.0
            wait = min(wait, w)
        return None, wait

    def _eta(self, chain: tuple[str, ...], tokens: int, server: str, user: str, now: float) -> float:
        """Seconds until a new request from `user` would get its turn, by the quota."""
        ahead = self._queue.ahead(server, user)
        return min(
            max(self._cooling.get(m, 0.0) - now, self._quota(m).eta(now, ahead, tokens)) for m in chain
        )

    def _grant(self, model: str, tokens: int, now: float) -> tuple[str, Ticket]:
        self._in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        return model, self._quota(model).take(now, tokens)

    def _release(self) -> None:
        self._in_flight -= 1
        if self._queue:
            self._kick()

    def _kick(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())
        self._wake.set()

    async def _dispatch(self) -> None:
        """Hand turns to waiting requests, round-robin, as slots and quota free up."""
        while True:
            self._wake.clear()
            delay = self._hand_out()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _hand_out(self) -> float | None:
        """Grant every turn that can go now; seconds until the next may (None: on a wake)."""
        while self._queue and self._in_flight < self.settings.max_concurrency:
            waiter = self._queue.peek()
            assert waiter is not None
            if waiter.future.done():
                self._queue.pop()
                continue
            now = self.clock()
            model, wait = self._pick(waiter.chain, waiter.tokens, now)
            if model is None:
                return max(wait, 0.001)
            self._queue.pop()
            waiter.future.set_result(self._grant(model, waiter.tokens, now))
        return None

    def _quota(self, model: str) -> ModelQuota:
        quota = self._quotas.get(model)
        if quota is None:
            limits = ModelLimits()
            if self.config.backend != "offline":
                q = self.settings.quota.for_model(model, google_api=self.config.google_api)
                limits = ModelLimits(q.requests_per_minute, q.tokens_per_minute, q.requests_per_day)
                limits = limits.split(self.settings.replicas)
            quota = self._quotas[model] = ModelQuota(limits)
        return quota

    def _cool(self, model: str, server_delay: float | None, attempt: int) -> None:
        delay = server_delay if server_delay is not None else self._backoff.delay(attempt)
        self._cooling[model] = max(self._cooling.get(model, 0.0), self.clock() + delay)

    def _fallback_ready(self, chain: tuple[str, ...], failed: str) -> bool:
        now = self.clock()
        return any(m != failed and self._cooling.get(m, 0.0) <= now for m in chain)

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
        log.info("attempt %d failed (%s); retrying in %.2fs", attempt, exc.detail, delay)
        await asyncio.sleep(delay)

    def _classify(self, exc: Exception, model: str) -> Exception:
        """A failed attempt as `_Retryable` or the final, typed error; the breaker hears
        about every attempt that reached the upstream."""
        errors = sys.modules.get("google.genai.errors")
        if errors is not None and isinstance(exc, errors.APIError):
            code = exc.code
            if code in RETRYABLE_STATUS:
                from bot.llm.gemini import retry_delay

                if code == 429:
                    # the key's quota, not the upstream's health: the breaker stays out of it
                    self._upstream_answered(model, "429")
                else:
                    self._upstream_failed(model, str(code))
                return _Retryable(f"{code} {exc.status}", code, retry_delay(exc))
            # the upstream is up and answered: it is the request that is wrong
            self._upstream_answered(model, str(code))
            message = exc.message or exc.status or "no detail"
            if code == 404:
                return UnknownModel(model)
            if code == 400 and _TOO_LONG.search(message):
                return _TooLong(message)
            if code == 400:
                return InputRejected(f"the model refused the request ({message})")
            log.error("LLM call failed with %s %s: %s", code, exc.status, message)
            return UpstreamUnavailable(f"{code} {exc.status}: {message}")
        if isinstance(exc, TimeoutError):
            self._upstream_failed(model, "timeout")
            return _Retryable("timed out")
        if isinstance(exc, aiohttp.ClientError | OSError):
            self._upstream_failed(model, "connection")
            return _Retryable(f"connection failed: {exc}")
        self._breaker.record_abandoned()
        log.exception("the LLM backend failed unexpectedly", exc_info=exc)
        return UpstreamUnavailable(f"{type(exc).__name__}: {exc}")

    def _upstream_failed(self, model: str, outcome: str) -> None:
        self._breaker.record_failure()
        self._m_attempts.inc(tags={"model": model, "outcome": outcome})

    def _upstream_answered(self, model: str, outcome: str) -> None:
        self._breaker.record_success()
        self._m_attempts.inc(tags={"model": model, "outcome": outcome})

    def _count_tokens(self, reply: Reply) -> None:
        self.tokens_in += reply.tokens_in
        self.tokens_out += reply.tokens_out
        self.cached_tokens += reply.cached
        self.thinking_tokens += reply.thoughts
        for kind, value in (
            ("prompt", reply.tokens_in),
            ("output", reply.tokens_out),
            ("cached", reply.cached),
            ("thinking", reply.thoughts),
        ):
            if value:  # Ray counters refuse an increment of zero
                self._m_tokens.inc(value, tags={"kind": kind})

    def _cost(self, model: str, reply: Reply) -> float:
        """The call's estimated cost by the price table, added to the totals."""
        price = self.settings.prices.get(model)
        if price is None:
            return 0.0
        cached = min(reply.cached, reply.tokens_in)
        cost = (
            (reply.tokens_in - cached) * price.input
            + cached * price.cached_input
            # Gemini bills thinking as output; `candidates_token_count` leaves it out
            + (reply.tokens_out + reply.thoughts) * price.output
        ) / 1e6
        if cost > 0:
            self.cost_usd[model] = self.cost_usd.get(model, 0.0) + cost
            self._m_cost.inc(cost, tags={"model": model})
        return cost

    def _account(self, request: LLMRequest, model: str, asked: str, reply: Reply, latency_ms: float) -> float:
        """Count one upstream call's tokens and estimated cost, and record it as an analytics
        event (not the offline responder's, which costs nothing); returns the cost. A call
        whose reply carried no usage (it failed before any came) was not billed."""
        if not (reply.tokens_in or reply.tokens_out):
            return 0.0
        self._count_tokens(reply)
        cost = self._cost(model, reply)
        if self.config.backend != "offline":
            self._record_call(request, model, asked, reply, cost, latency_ms)
        return cost

    def _record_call(
        self, request: LLMRequest, model: str, asked: str, reply: Reply, cost: float, latency_ms: float
    ) -> None:
        """One analytics event for one upstream call Gemini answered, under the model that
        answered (`asked` is the one asked for, when a fallback answered) and the user, server
        and channel whose request made it. Never blocks: the analytics client buffers it and
        ships it with others."""
        if self._analytics is None and not self._find_sink:
            return
        event = AnalyticsEvent(
            type=LLM_CALL_EVENT,
            server_id=request.server,
            channel_id=request.channel,
            user_id=request.user or None,
            latency_ms=max(latency_ms, 0.0),
            tokens_in=reply.tokens_in,
            tokens_out=reply.tokens_out,
            payload={
                "model": model,
                "cached": min(reply.cached, reply.tokens_in),
                "thinking": reply.thoughts,
                "cost_usd": cost,
                **({"fallback_from": asked} if asked != model else {}),
            },
        )
        self._unsent.append(event)
        self._ship_events()

    def _ship_events(self) -> AnalyticsClient | None:
        """Hand the waiting events to the analytics client; the client, or None while the
        sink cannot be found (the newest `UNSENT_EVENTS` wait for it, older ones are
        dropped and logged)."""
        client = self._events_client()
        if client is not None:
            for event in self._unsent:
                client.record(event)
            self._unsent.clear()
        elif len(self._unsent) > UNSENT_EVENTS:
            lost = len(self._unsent) - UNSENT_EVENTS
            del self._unsent[:lost]
            self.events_dropped += lost
            log.error("no analytics sink: %d upstream call events dropped", lost)
        return client

    def _events_client(self) -> AnalyticsClient | None:
        """The analytics client, made on first use from the sink found by name."""
        if self._analytics is not None or not self._find_sink:
            return self._analytics
        import ray

        assert self.config.namespace is not None
        now = time.monotonic()
        if now < self._sink_retry_at:
            # the lookup blocks the loop on the GCS: not on every call while the sink is missing
            return None
        try:
            sink = ray.get_actor(ANALYTICS_ACTOR, namespace=self.config.namespace)
        except ValueError:
            self._sink_retry_at = now + SINK_LOOKUP_INTERVAL
            # said once (then at debug level)
            level = logging.DEBUG if self._sink_missing_said else logging.WARNING
            self._sink_missing_said = True
            log.log(
                level,
                "no analytics sink %s yet; %d call events wait for it",
                ANALYTICS_ACTOR,
                len(self._unsent),
            )
            return None
        state_dir = Path(self._state_dir or ".raycord")
        # a spill directory of its own: front-ends replay the shared one's files
        spill = self.config.analytics.model_copy(
            update={"spill_dir": state_dir / "analytics-spill" / f"llm-{self.shard}"}
        )
        self._analytics = AnalyticsClient([sink], spill, state_dir=state_dir)
        return self._analytics

    def _images(self, request: LLMRequest) -> tuple[ImagePart, ...]:
        cfg = self.settings
        # text files are in the prompt by now: only inline parts are checked here
        policy = AttachmentPolicy(cfg.max_attachments, cfg.max_image_bytes, cfg.max_pdf_bytes, 0)
        return check_inline_parts(request.images, policy)

    def _upstream(self) -> Backend:
        """The backend, made on first use (in the running loop its HTTP session belongs to)."""
        if self._backend is None:
            if self.config.backend == "offline":
                self._backend = OfflineBackend()
            else:
                from bot.llm.gemini import GeminiBackend

                cfg = self.settings
                key = self.config.api_key.get_secret_value() if self.config.api_key else None
                proxy = self.config.proxy.get_secret_value() if self.config.proxy else None
                self._backend = GeminiBackend(
                    # a local fake server or a keyed proxy accepts any key
                    api_key=key or "unused",
                    base_url=cfg.base_url,
                    api_version=cfg.api_version,
                    proxy=proxy,
                    temperature=cfg.temperature,
                    max_output_tokens=cfg.max_output_tokens,
                    google_search=cfg.google_search,
                    thinking_budget=cfg.thinking_budget,
                )
        return self._backend

    # --- the service's side -------------------------------------------------------------

    async def maintain(self) -> None:
        tags = {"shard": str(self.shard)}
        self._m_in_flight.set(self._in_flight, tags=tags)
        self._m_queued.set(len(self._queue), tags=tags)
        self._m_breaker.set(1 if self._breaker.state == CircuitBreaker.OPEN else 0, tags=tags)
        self._m_cached_share.set(self._cached_share(), tags=tags)
        if self._unsent:
            self._ship_events()
        now = self.clock()
        for model, quota in self._quotas.items():
            used = quota.used(now)
            lim = quota.limits
            for window, n, limit in (
                ("requests_per_minute", used[0], lim.requests_per_minute),
                ("tokens_per_minute", used[1], lim.tokens_per_minute),
                ("requests_per_day", used[2], lim.requests_per_day),
            ):
                if limit:
                    self._m_quota.set(n / limit, tags={**tags, "model": model, "window": window})

    async def stats(self) -> GatewayStats:
        return self.snapshot()

    def snapshot(self) -> GatewayStats:
        """`stats()` without waiting: for a gateway in the caller's own process."""
        now = self.clock()
        return GatewayStats(
            shard=self.shard,
            backend=self.config.backend,
            requests=self.requests,
            streams=self.streams,
            upstream_calls=self.upstream_calls,
            coalesced=self.coalesced,
            retries=self.retries,
            failures=self.failures,
            fallbacks=self.fallbacks,
            busy=self.busy,
            trimmed=self.trimmed,
            in_flight=self._in_flight,
            queued=len(self._queue),
            peak_in_flight=self.peak_in_flight,
            breaker_state=self._breaker.state,
            breaker_opened=self._breaker.times_opened,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            cached_tokens=self.cached_tokens,
            thinking_tokens=self.thinking_tokens,
            cached_prompt_share=self._cached_share(),
            cost_usd=dict(self.cost_usd),
            quota_used={m: q.used(now) for m, q in self._quotas.items()},
            calls_recorded=self._analytics.recorded if self._analytics is not None else 0,
            calls_waiting=len(self._unsent),
            calls_dropped=self.events_dropped,
        )

    def _cached_share(self) -> float:
        return self.cached_tokens / self.tokens_in if self.tokens_in else 0.0

    async def flush(self) -> None:
        """Ship the events of the calls made so far and wait until the sink has them."""
        client = self._ship_events()
        if client is not None:
            await client.flush()

    async def close(self) -> None:
        await super().close()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        if self._backend is not None:
            await self._backend.aclose()
            self._backend = None
        if self._analytics is not None:
            await self._analytics.close()


#: how Gemini says a prompt is longer than the model takes
_TOO_LONG = re.compile(r"input token count|exceeds the maximum number of tokens|too long", re.IGNORECASE)


def _from_user_turn(history: tuple[tuple[str, str, str], ...]) -> tuple[tuple[str, str, str], ...]:
    """`history` starting at a user turn, as a conversation does (a trim may cut between)."""
    start = 0
    while start < len(history) and history[start][0] == "model":
        start += 1
    return history[start:]


# --- the front-end's side -------------------------------------------------------------------


def _unwrap(exc: BaseException) -> BaseException:
    """The gateway's typed error out of Ray's wrapper, so the front-end answers with it."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, RaycordError) else exc


class GatewayClient(ShardedClient):
    """A front-end's handle on the gateway replicas, implementing the `LLM` protocol.

    A request goes to the replica its key (or its user) hashes to, so identical requests
    meet in one single-flight table and one user's turns in one fair queue.
    """

    #: an LLM call changes nothing but the quota: one cut off by a restarting gateway is sent again
    idempotent_methods = ShardedClient.idempotent_methods | {"generate"}

    def __init__(self, handles: list[object], *, name: str) -> None:
        super().__init__(handles)
        self.name = name
        #: requests this front-end sent (answered from a cache, a message makes none)
        self.calls = 0

    def _handle(self, request: LLMRequest) -> Any:
        return self.handle_for(request.key or request.user or request.prompt)

    async def generate(self, request: LLMRequest) -> LLMResult:
        import ray.exceptions

        self.calls += 1
        try:
            return await self._call(self._handle(request), LLMGateway.generate, request)
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None

    def stream(self, request: LLMRequest) -> LLMStream:
        self.calls += 1
        return result_stream(self._items(request))

    async def _items(self, request: LLMRequest) -> AsyncGenerator[str | LLMResult, None]:
        import ray
        import ray.exceptions

        self.ray_calls += 1
        generator = self._handle(request).stream.options(num_returns="streaming").remote(request)
        finished = False
        try:
            async for ref in generator:
                item = await ref
                yield item
                if isinstance(item, LLMResult):
                    finished = True
        except ray.exceptions.RayTaskError as exc:
            finished = True
            raise _unwrap(exc) from None
        except ray.exceptions.RayError as exc:
            # the gateway died mid-reply: Ray restarts it, and the user may simply ask again
            finished = True
            raise ServiceUnavailable(f"the LLM gateway went away mid-reply ({type(exc).__name__})") from exc
        finally:
            if not finished:
                # the reader left early: stop the gateway's side (and its upstream call)
                with contextlib.suppress(Exception):
                    ray.cancel(generator)

    async def stats(self) -> list[GatewayStats]:
        return await self._call_all(LLMGateway.stats)

    async def aclose(self) -> None:
        """Nothing to close here: the gateway actors outlive a front-end."""


class GeminiLLM:
    """The gateway run in the caller's own process, behind the `LLM` protocol: for tools,
    tests and benchmarks that want the SDK in-process rather than through Ray."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] | None = None) -> None:
        config = GatewayConfig.from_settings(settings, backend="gemini")
        self.gateway = LLMGateway(config, clock=clock)
        self.name = config.model_name()

    async def generate(self, request: LLMRequest) -> LLMResult:
        return await self.gateway.generate(request)

    def stream(self, request: LLMRequest) -> LLMStream:
        return result_stream(self.gateway.stream(request))

    def stats(self) -> GatewayStats:
        return self.gateway.snapshot()

    async def aclose(self) -> None:
        await self.gateway.close()
