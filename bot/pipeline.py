"""ChatPipeline: one message from a front-end to a reply, through the service actors.

Critical path: (rate-limit check ‖ context build) → cache get → LLM on a miss; a
stateless command needs no context, so its cache get joins the check's round trip. The
writes the user does not wait for (cache set, context append, analytics) run in the
background and are retried until the service acknowledges them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from actors import metrics
from actors.analytics import AnalyticsClient
from actors.cache import CacheClient, cache_key
from actors.context import BuiltContext, ContextClient, assemble, check_persona
from actors.errors import (
    InputRejected,
    RateLimited,
    RaycordError,
    ServiceUnavailable,
    UpstreamUnavailable,
)
from actors.ratelimit import RateLimitClient
from actors.schemas import AnalyticsEvent, ChatReply, IncomingMessage, Turn, WindowUsage
from bot.attachments import AttachmentPolicy, Fetch, Prepared, prepare
from bot.config import Settings
from bot.llm.base import LLM, UPSTREAM_MS, LLMRequest, LLMResult
from storage.analytics_db import SPEND_TODAY

log = logging.getLogger(__name__)

ChunkCallback = Callable[[str], Awaitable[None]]
_EMPTY_CONTEXT = BuiltContext((), "", 0)
#: a lone surrogate cannot be encoded to UTF-8, so no store, cache key or log can hold it
_SURROGATE = re.compile("[\ud800-\udfff]")
#: ids are keys in every store: no control characters (the stores' separator among them)
_ID_REFUSED = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_MAX_ID_CHARS = 200


def _retryable_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions

    # what a later attempt can get past: a service restarting or unreachable, a timeout,
    # a disk that is full or busy for now
    return (
        ServiceUnavailable,
        TimeoutError,
        ConnectionError,
        OSError,
        sqlite3.OperationalError,
        ray.exceptions.RayActorError,
        ray.exceptions.ActorUnavailableError,
        ray.exceptions.GetTimeoutError,
    )


class BackgroundWrites:
    """Fire-and-forget writes that are never dropped silently: what can succeed later is
    retried until it does; what never can (a value the service refuses) is logged once
    with the message's ids, counted, and dropped."""

    def __init__(self, max_backoff: float = 5.0) -> None:
        self.max_backoff = max_backoff
        self._tasks: set[asyncio.Task[None]] = set()
        self._retryable = _retryable_errors()
        self.failures = 0
        self.dropped = 0
        self._m_dropped = metrics.counter(
            "background_writes_dropped", "background writes refused for good, by write", ("write",)
        )

    def submit(self, name: str, make: Callable[[], Coroutine[Any, Any, Any]], ids: str = "") -> None:
        """Run `make()` in the background; `ids` names the message it belongs to in logs."""
        task = asyncio.get_running_loop().create_task(self._run(name, make, ids))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, name: str, make: Callable[[], Coroutine[Any, Any, Any]], ids: str) -> None:
        delay = 0.05
        while True:
            try:
                await make()
                return
            except asyncio.CancelledError:
                raise
            except self._retryable as exc:
                self.failures += 1
                log.warning("background %s failed, retrying in %.2fs: %s", name, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
            except Exception as exc:
                self.dropped += 1
                self._m_dropped.inc(tags={"write": name})
                log.error("background %s refused for good, dropped (%s): %r", name, ids, exc)
                return

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float | None = None) -> int:
        """Wait for every pending write; returns how many were still pending at the timeout."""
        if not self._tasks:
            return 0
        _, still = await asyncio.wait(set(self._tasks), timeout=timeout)
        return len(still)


@dataclass(frozen=True, slots=True)
class PipelineSummary:
    """What `/stats` shows an operator, in every front-end."""

    model: str
    cache_hits: int
    cache_lookups: int
    cache_entries: int
    background_writes_pending: int
    analytics_pending: int
    #: the whole bot's estimated LLM spend this UTC day (every front-end's), and its calls
    spent_today_usd: float = 0.0
    calls_today: int = 0

    @property
    def cache_hit_rate(self) -> float | None:
        return self.cache_hits / self.cache_lookups if self.cache_lookups else None

    def lines(self) -> list[str]:
        rate = "n/a" if self.cache_hit_rate is None else f"{self.cache_hit_rate:.0%}"
        return [
            f"model: {self.model}",
            f"cache: {rate} hit rate ({self.cache_hits}/{self.cache_lookups}), {self.cache_entries} entries",
            f"background writes pending: {self.background_writes_pending}",
            f"analytics events pending: {self.analytics_pending}",
            f"LLM spend today (UTC, estimated): ${self.spent_today_usd:.4f} over {self.calls_today} calls",
        ]


#: what `/forget` asks before it deletes, in every front-end
FORGET_QUESTION = (
    "This deletes your conversations with me, my cached replies to you and your analytics "
    "events; your rate-limit counts are kept. Sure?"
)


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What a forget deleted."""

    conversations: int
    cached_replies: int
    events: int

    def message(self) -> str:
        """The reply every front-end gives."""
        return (
            f"Done: I deleted {self.conversations} conversation(s), {self.cached_replies} cached "
            f"reply(ies) and {self.events} analytics event(s) of yours. Your rate-limit counts "
            "are kept: forgetting them would reset your limits."
        )


def cache_scope_id(msg: IncomingMessage) -> str:
    """The audience a cached reply may be served to."""
    if msg.cache_scope == "global":
        return "global"
    if msg.cache_scope == "server" and msg.server_id is not None:
        return f"server:{msg.server_id}"
    return f"user:{msg.user_id}"


class ChatPipeline:
    def __init__(
        self,
        settings: Settings,
        *,
        cache: CacheClient,
        context: ContextClient,
        limiter: RateLimitClient,
        analytics: AnalyticsClient,
        llm: LLM,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.context = context
        self.limiter = limiter
        self.analytics = analytics
        self.llm = llm
        self.clock = clock
        self.writes = BackgroundWrites()
        self.policy = AttachmentPolicy.of(settings)
        self.model = llm.name if getattr(llm, "name", "") else settings.llm.model
        self._m_messages = metrics.counter("messages", "messages handled, by outcome", ("outcome",))
        self._m_latency = metrics.histogram(
            "message_latency_ms", "end-to-end message latency", metrics.LATENCY_MS_BOUNDARIES, ("outcome",)
        )
        self._m_stage = metrics.histogram(
            "stage_latency_ms", "latency of one pipeline stage", metrics.LATENCY_MS_BOUNDARIES, ("stage",)
        )
        self._m_llm_errors = metrics.counter("llm_errors", "LLM calls that failed, by error", ("error",))
        #: when a dict, every stage's latency (ms) is also kept here by stage, as the
        #: `stage_latency_ms` histogram observes it: for the load test, which reads it after a run
        self.stage_samples: dict[str, list[float]] | None = None

    def _stage(self, stage: str, ms: float) -> None:
        self._m_stage.observe(ms, tags={"stage": stage})
        if self.stage_samples is not None:
            self.stage_samples.setdefault(stage, []).append(ms)

    def validate(self, msg: IncomingMessage | dict[str, Any]) -> IncomingMessage:
        """An `IncomingMessage` fit to process, or `InputRejected` saying why not."""
        if not isinstance(msg, IncomingMessage):
            try:
                msg = IncomingMessage.model_validate(msg)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "message"
                raise InputRejected(f"{where}: {first['msg']}") from exc
        _check_ids(msg)
        if _SURROGATE.search(msg.text) or _SURROGATE.search(msg.user_name):
            # broken UTF-16 from a client: keep the message, mark what could not be read
            msg = msg.model_copy(
                update={
                    "text": _SURROGATE.sub("\ufffd", msg.text),
                    "user_name": _SURROGATE.sub("\ufffd", msg.user_name),
                }
            )
        text = msg.text.strip()
        if not text and not msg.attachments:
            raise InputRejected("the message is empty")
        limit = self.settings.pipeline.max_message_chars
        if len(msg.text) > limit:
            raise InputRejected(f"the message is {len(msg.text):,} characters long; the limit is {limit:,}")
        return msg

    async def handle(
        self,
        raw: IncomingMessage | dict[str, Any],
        on_chunk: ChunkCallback | None = None,
        fetch: Fetch | None = None,
    ) -> ChatReply:
        """Answer one message. With `on_chunk`, a generated reply is streamed as it grows.
        Attachments without their bytes are downloaded by `fetch`, only once the rate-limit
        check has passed; those the attachment policy refuses are named in the reply.

        Raises:
            InputRejected: the message is empty, too long or malformed.
            RateLimited: the user (or server) is over a limit; carries `retry_after`.
            UpstreamUnavailable: the LLM failed.
            ServiceUnavailable: a service actor died mid-request; the request may be retried.
        """
        started = self.clock()
        msg = self.validate(raw)
        self._stage("validate", (self.clock() - started) * 1000)
        try:
            reply = await self._answer(msg, started, on_chunk, fetch)
        except RaycordError as exc:
            outcome = "rate_limited" if isinstance(exc, RateLimited) else "error"
            latency_ms = (self.clock() - started) * 1000
            self._m_messages.inc(tags={"outcome": outcome})
            self._m_latency.observe(latency_ms, tags={"outcome": outcome})
            self._record(msg, type=outcome, latency_ms=latency_ms, error=type(exc).__name__)
            raise
        recording = self.clock()
        outcome = "cached" if reply.cached else "answered"
        self._m_messages.inc(tags={"outcome": outcome})
        self._m_latency.observe(reply.latency_ms, tags={"outcome": outcome})
        self._record(
            msg,
            type=msg.kind,
            latency_ms=reply.latency_ms,
            cache_hit=reply.cached,
            tokens_in=reply.tokens_in,
            tokens_out=reply.tokens_out,
            payload={"llm_ms": round(reply.llm_ms, 3), "model": reply.model},
        )
        self._stage("record", (self.clock() - recording) * 1000)
        return reply

    async def _answer(
        self, msg: IncomingMessage, started: float, on_chunk: ChunkCallback | None, fetch: Fetch | None
    ) -> ChatReply:
        settings = self.settings
        cacheable = not msg.attachments
        scope_id = cache_scope_id(msg)
        if msg.stateless:
            # no context to wait for: the key is known now, so the cache lookup shares the
            # rate-limit check's round trip (a denied request's lookup is simply dropped)
            built = _EMPTY_CONTEXT
            check = self.limiter.check(msg.user_id, msg.kind, msg.server_id)
            if msg.server_id is not None:
                # the server's persona and model are part of the key: asked beside the check,
                # with the lookup of the key most servers have (no persona, the default
                # model); a server with its own asks again once its profile is known
                profile = self.context.profile(msg.server_id)
                if cacheable:
                    plain_key = self._key(msg, scope_id, _EMPTY_CONTEXT)
                    decision, (persona, model), cached = await asyncio.gather(
                        check, profile, self.cache.get(plain_key, scope_id)
                    )
                else:
                    decision, (persona, model) = await asyncio.gather(check, profile)
                    cached = None
                built = assemble((), 0, "", persona, model) if persona or model else _EMPTY_CONTEXT
                key = self._key(msg, scope_id, built) if cacheable else ""
                if cacheable and built is not _EMPTY_CONTEXT:
                    cached = await self.cache.get(key, scope_id) if decision.allowed else None
            elif cacheable:
                key = self._key(msg, scope_id, built)
                decision, cached = await asyncio.gather(check, self.cache.get(key, scope_id))
            else:
                key, decision, cached = "", await check, None
            # one round trip: the admit stage includes the cache lookup here
            self._stage("admit", (self.clock() - started) * 1000)
            if not decision.allowed:
                raise RateLimited(decision.retry_after, decision.window, decision.limit)
        else:
            decision, built = await asyncio.gather(
                self.limiter.check(msg.user_id, msg.kind, msg.server_id),
                self.context.build(msg.scope, msg.user_id, msg.server_id),
            )
            self._stage("admit", (self.clock() - started) * 1000)
            if not decision.allowed:
                raise RateLimited(decision.retry_after, decision.window, decision.limit)
            key = self._key(msg, scope_id, built) if cacheable else ""
            cached = None
            if cacheable:
                looked_up = self.clock()
                cached = await self.cache.get(key, scope_id)
                self._stage("cache", (self.clock() - looked_up) * 1000)

        model = built.model or self.model
        if cached is not None:
            if on_chunk is not None:
                await on_chunk(cached)
            self._remember(msg, cached)
            return ChatReply(
                text=cached,
                # the key names the model, so the reply it finds is that model's
                model=model,
                cached=True,
                offline=model == "offline-echo",
                latency_ms=(self.clock() - started) * 1000,
            )

        # after the check: a denied message costs no download
        preparing = self.clock()
        files = await prepare(msg.attachments, self.policy, fetch) if msg.attachments else Prepared()
        prompt = files.prompt(msg.text)
        if not prompt.strip() and not files.parts:
            raise InputRejected(files.note() or "the message is empty")
        if msg.attachments:
            self._stage("attachments", (self.clock() - preparing) * 1000)
        request = LLMRequest(
            prompt=prompt,
            model=model,
            # what stays put through a conversation comes first, so Gemini's implicit cache
            # serves it; the social line, which moves with the server's talk, comes last
            system_prompt="\n\n".join(filter(None, (settings.pipeline.system_prompt, built.persona))),
            history=built.turns,
            note=built.social,
            images=files.parts,
            key=key,
            user=msg.user_id,
            server=msg.server_id,
            channel=msg.channel_id,
            conversation="" if msg.stateless else f"{msg.scope}\x1f{msg.user_id}",
        )
        llm_started = self.clock()
        result = await self._generate(request, on_chunk)
        answered = self.clock()
        llm_ms = (answered - llm_started) * 1000
        self._stage("llm", llm_ms)
        upstream_ms = float(result.metadata.get(UPSTREAM_MS, 0.0))
        if upstream_ms:
            # the upstream call's own time, and what the LLM stage spent around it: the
            # gateway's queue and the round trip to it
            self._stage("upstream", upstream_ms)
            self._stage("llm_transport", max(llm_ms - upstream_ms, 0.0))
        if cacheable and result.finish_reason == "STOP" and result.text:
            user = msg.user_id
            self.writes.submit(
                "cache.set",
                lambda: self.cache.set(key, result.text, scope_id, user, background=True),
                _ids(msg),
            )
        self._remember(msg, result.text)
        note = files.note()
        reply = ChatReply(
            text=f"{result.text}\n\n{note}" if note else result.text,
            model=result.model,
            cached=False,
            offline=result.offline,
            finish_reason=result.finish_reason,
            tokens_in=result.tokens_in,
            tokens_out=result.tokens_out,
            latency_ms=(self.clock() - started) * 1000,
            llm_ms=llm_ms,
            upstream_ms=upstream_ms,
        )
        self._stage("reply", (self.clock() - answered) * 1000)
        return reply

    # -- the commands every front-end offers (Discord's slash commands, the terminal's /words)

    async def reset(self, scope: str, user: str) -> bool:
        """Clear `user`'s conversation in `scope`; False when there was nothing to clear."""
        return await self.context.reset(scope, user)

    async def forget(self, user: str, timeout: float = 10.0) -> Forgotten:
        """Delete `user`'s conversations (their reply links and graph edges with them),
        cached replies and analytics events. Background writes already under way are let
        through first, so none of them lands after the forget and brings data back (the
        stores also drop late writes from before the forget, from any front-end).
        Rate-limit counts are kept: forgetting them would reset the user's limits."""
        await self.writes.drain(timeout)
        conversations = await self.context.forget(user)
        cached = await self.cache.invalidate_user(user)
        events = await self.analytics.forget_user(user)
        return Forgotten(conversations, cached, events)

    async def set_persona(self, server: str, persona: str) -> None:
        """Give `server` its own persona, sent after the global system prompt.

        Raises:
            InputRejected: the persona is empty or over `context.max_persona_chars`.
        """
        try:
            check_persona(persona, self.settings.context.max_persona_chars)
        except ValueError as exc:
            raise InputRejected(str(exc)) from None
        await self.context.set_persona(server, persona)

    async def persona(self, server: str) -> str:
        """`server`'s persona, "" when it has none."""
        return await self.context.persona(server)

    async def reset_persona(self, server: str) -> bool:
        """Clear `server`'s persona; False when it had none."""
        return await self.context.reset_persona(server)

    async def set_model(self, server: str, model: str) -> None:
        """Make `model` (one of `llm.allowed_models`; "" for the default) `server`'s model.

        Raises:
            InputRejected: the model is not one of `llm.allowed_models`.
        """
        allowed = self.settings.llm.allowed_models
        if model and model not in allowed:
            raise InputRejected(f"{model} is not an allowed model; choose one of {', '.join(allowed)}")
        await self.context.set_model(server, model)

    async def server_model(self, server: str | None) -> str:
        """The model `server`'s requests go to: its own choice, or the default."""
        if server is None:
            return self.model
        return (await self.context.profile(server))[1] or self.model

    async def limits(self, user: str, server: str | None = None) -> list[WindowUsage]:
        """`user`'s message and command budgets (and the server's): reading them costs nothing."""
        return await self.limiter.usage(user, server)

    async def summary(self, server: str | None = None) -> PipelineSummary:
        """The model (`server`'s, when given), the cache's hit rate and entries, the writes
        still pending, and today's LLM spend from the analytics sink (the calls of every
        front-end, as the gateways recorded them; the last fraction of a second's may be on
        their way)."""
        cache, analytics, model, spend = await asyncio.gather(
            self.cache.stats(),
            self.analytics.stats(),
            self.server_model(server),
            self.analytics.query(SPEND_TODAY),
        )
        ((spent, calls),) = spend.rows
        hits = sum(s.hits for s in cache)
        return PipelineSummary(
            model=model,
            cache_hits=hits,
            cache_lookups=hits + sum(s.misses for s in cache),
            cache_entries=sum(s.entries for s in cache),
            background_writes_pending=self.writes.pending,
            analytics_pending=sum(s.pending for s in analytics),
            spent_today_usd=float(spent),
            calls_today=int(calls),
        )

    def _key(self, msg: IncomingMessage, scope_id: str, built: BuiltContext) -> str:
        return cache_key(
            built.model or self.model,
            self.settings.pipeline.system_prompt_version,
            scope_id,
            msg.text,
            built.digest,
        )

    async def _generate(self, request: LLMRequest, on_chunk: ChunkCallback | None) -> LLMResult:
        try:
            if on_chunk is None:
                return await self.llm.generate(request)
            parts: list[str] = []
            stream = self.llm.stream(request)
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    parts.append(chunk)
                    await on_chunk("".join(parts))
            # the stream's result carries token usage and the finish reason
            result = getattr(stream, "result", None)
            return result if result is not None else LLMResult(text="".join(parts), model=self.model)
        except RaycordError as exc:
            self._m_llm_errors.inc(tags={"error": type(exc).__name__})
            raise
        except Exception as exc:
            self._m_llm_errors.inc(tags={"error": type(exc).__name__})
            raise UpstreamUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _remember(self, msg: IncomingMessage, reply: str) -> None:
        if msg.stateless:
            return
        now = self.clock()
        turns = [
            Turn(role="user", author=msg.user_name or msg.user_id, text=msg.text, time=now),
            Turn(role="model", author="raycord", text=reply, time=now),
        ]
        self.writes.submit(
            "context.append",
            lambda: self.context.append(msg.scope, msg.user_id, turns, background=True),
            _ids(msg),
        )
        server = msg.server_id
        if server is not None and (msg.mentions or msg.reply_to_user):
            mentions = list(msg.mentions)
            self.writes.submit(
                "context.record_interaction",
                lambda: self.context.record_interaction(
                    server, msg.user_id, mentions, msg.reply_to_user, background=True
                ),
                _ids(msg),
            )

    def _record(self, msg: IncomingMessage, **fields: Any) -> None:
        # exact per-minute counters beside the (possibly sampled) events
        outcome = fields["type"]
        counter = {"rate_limited": "rate_limited", "error": "errors"}.get(outcome, "messages")
        self.analytics.count(counter, msg.server_id)
        if fields.get("cache_hit"):
            self.analytics.count("cache_hits", msg.server_id)
        self.analytics.record(
            AnalyticsEvent(
                server_id=msg.server_id,
                channel_id=msg.channel_id,
                user_id=msg.user_id,
                **fields,
            )
        )

    async def drain(self, timeout: float | None = 30.0) -> None:
        """Wait for background writes and ship buffered analytics (called on shutdown)."""
        left = await self.writes.drain(timeout)
        if left:
            log.error("%d background writes still pending at shutdown", left)
        await asyncio.wait_for(self.analytics.flush(), timeout)


def _ids(msg: IncomingMessage) -> str:
    """The ids a log line about `msg` names."""
    return f"user={msg.user_id} scope={msg.scope} server={msg.server_id} message={msg.message_id}"


def _check_ids(msg: IncomingMessage) -> None:
    """Refuse ids no store can key by: empty, over-long, or holding control characters."""
    named: list[tuple[str, str | None]] = [
        ("user_id", msg.user_id),
        ("scope", msg.scope),
        ("server_id", msg.server_id),
        ("channel_id", msg.channel_id),
        ("message_id", msg.message_id),
        ("reply_to_user", msg.reply_to_user),
    ]
    named += [("mentions", m) for m in msg.mentions]
    for field, value in named:
        if value is None:
            continue
        if not value:
            raise InputRejected(f"{field} is empty")
        if len(value) > _MAX_ID_CHARS:
            raise InputRejected(f"{field} is longer than {_MAX_ID_CHARS} characters")
        if _ID_REFUSED.search(value):
            raise InputRejected(f"{field} holds a control character or broken unicode")
