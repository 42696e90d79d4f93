"""A fake Gemini REST server (aiohttp) for trying, testing and load-testing raycord without a key.

It serves `POST /{version}/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`
in Gemini's wire format, with configurable latency and token counts, and injects failures
(429 with RetryInfo, 500, 503, timeouts, safety blocks) per request or from a server-level script.
Like the real API it enforces a per-key quota (requests and prompt tokens per rolling minute,
answered 429 with `QuotaFailure` and `RetryInfo`), answers 404 for a model it does not know and
503 for models it is told are overloaded, and reports cached (a prompt prefix it saw in the last
minutes) and thinking tokens in `usageMetadata`, and grounding metadata for a request that
carries the Google Search tool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from bot.standin import serve_until_stopped

#: the failures the server can inject
FAULTS = ("400", "403", "429", "500", "503", "timeout", "safety", "blocked", "max_tokens", "empty")
_ERROR_FAULTS = ("400", "403", "429", "500", "503")
FAULT_HEADER = "x-fake-gemini-fault"
RETRY_DELAY_HEADER = "x-fake-gemini-retry-delay"
_MARKER = re.compile(r"\[\[fault:([a-z0-9_]+)(?::([0-9.]+))?\]\]")
#: the model names the server serves: Gemini's and Gemma's families, any version
_KNOWN_MODEL = re.compile(r"^(gemini|gemma)-[a-z0-9.-]+$")
#: how long a prompt prefix stays in the implicit cache
CACHE_SECONDS = 300.0
#: prefixes remembered before the expired ones are let go
MAX_PREFIXES = 100_000

_STATUS = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    403: ("PERMISSION_DENIED", "The caller does not have permission."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    500: ("INTERNAL", "An internal error has occurred."),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
}


@dataclass(slots=True)
class Fault:
    kind: str
    #: seconds the client is told to wait (RetryInfo.retryDelay) on a 429
    retry_delay: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULTS:
            raise ValueError(f"unknown fault {self.kind!r}; known: {', '.join(FAULTS)}")


@dataclass(slots=True)
class Arrival:
    """One generate request as the server saw it."""

    at: float
    model: str
    streamed: bool
    prompt: str
    fault: str | None
    images: int
    #: the turns sent (history and the new message)
    turns: int = 0
    #: the request's generation config, as sent (`generationConfig`)
    config: dict[str, Any] = field(default_factory=dict)
    #: the text of each turn before the new message, oldest first
    history: list[str] = field(default_factory=list)
    #: the MIME type of each inline part of the new message, as sent on the wire
    inline_types: list[str] = field(default_factory=list)


@dataclass(slots=True)
class FakeGeminiConfig:
    #: seconds before the reply (before the first chunk when streaming)
    latency: float = 0.3
    #: words in a normal reply; the usage metadata reports them as output tokens
    reply_tokens: int = 24
    stream_chunks: int = 4
    #: seconds between streamed chunks
    chunk_interval: float = 0.01
    #: how long a "timeout" fault keeps the client waiting
    hang_seconds: float = 120.0
    #: per API key, requests per rolling minute (0: no limit); over it, 429 + QuotaFailure
    quota_requests_per_minute: int = 0
    #: per API key, prompt tokens per rolling minute (0: no limit)
    quota_tokens_per_minute: int = 0
    #: models that answer 503 UNAVAILABLE (overloaded) to every request
    overloaded_models: list[str] = field(default_factory=list)
    #: thinking tokens reported per reply (`thoughtsTokenCount`)
    thinking_tokens: int = 0
    #: the model's input limit in prompt tokens (0: none); longer prompts get Gemini's 400
    max_input_tokens: int = 0


@dataclass
class FakeGemini:
    """The server's state: config, the failure script, and what it received."""

    config: FakeGeminiConfig = field(default_factory=FakeGeminiConfig)
    script: deque[Fault] = field(default_factory=deque)
    arrivals: list[Arrival] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    #: streams whose client went away before their last chunk
    abandoned: int = 0
    #: requests refused with 429 because their key was over its quota
    quota_rejections: int = 0
    clock: Callable[[], float] = time.monotonic
    #: per API key: (time, prompt tokens) of the requests it made in the last minute
    _usage: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)
    #: digest of each prompt prefix (system instruction, then whole turns) -> when it was
    #: last seen (the implicit cache)
    _prefixes: dict[str, float] = field(default_factory=dict)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    base_url: str = ""

    @property
    def calls(self) -> int:
        return len(self.arrivals)

    async def wait_for_calls(self, count: int) -> None:
        """Return once the server has received at least `count` generate requests."""
        while self.calls < count:
            self._arrived.clear()
            await self._arrived.wait()

    def fail_next(self, count: int, kind: str, retry_delay: float | None = None) -> None:
        """The next `count` generate requests get `kind` instead of a normal reply."""
        self.script.extend(Fault(kind, retry_delay) for _ in range(count))

    def reset(self) -> None:
        self.script.clear()
        self.arrivals.clear()
        self._usage.clear()
        self._prefixes.clear()
        self.quota_rejections = 0
        self.peak_in_flight = self.in_flight

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "abandoned": self.abandoned,
            "quota_rejections": self.quota_rejections,
            "scripted": len(self.script),
            "config": asdict(self.config),
        }

    # --- the HTTP side -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{version}/models/{target}", self._generate)
        app.router.add_get("/admin/stats", self._admin_stats)
        app.router.add_post("/admin/reset", self._admin_reset)
        app.router.add_post("/admin/script", self._admin_script)
        app.router.add_post("/admin/config", self._admin_config)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on `host:port` (0 picks a free port); returns the base URL."""
        # handler_cancellation: a client that gives up on a hanging request frees its handler
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024)
        await site.start()
        bound = self._runner.addresses[0]
        self.base_url = f"http://{host}:{bound[1]}"
        return self.base_url

    async def stop(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        model, _, action = request.match_info["target"].partition(":")
        if action not in ("generateContent", "streamGenerateContent"):
            return _error(404, "NOT_FOUND", f"unknown method {action!r}")
        if not _KNOWN_MODEL.match(model):
            return _error(
                404,
                "NOT_FOUND",
                f"models/{model} is not found for API version {request.match_info['version']}, or is not "
                "supported for generateContent. Call ListModels to see the list of available models "
                "and their supported methods.",
            )
        try:
            body = await request.json()
            contents = body["contents"]
            prompt = _last_user_text(contents)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return _error(400, "INVALID_ARGUMENT", f"malformed request: {exc}")
        fault = self._fault_for(request, prompt)
        streamed = action == "streamGenerateContent"
        tokens_in = _prompt_tokens(body)
        over = self._over_quota(request.headers.get("x-goog-api-key", ""), model, tokens_in)
        if over is not None:
            self.quota_rejections += 1
            return over
        self.arrivals.append(
            Arrival(
                time.monotonic(),
                model,
                streamed,
                prompt,
                fault.kind if fault else None,
                sum(1 for c in contents for p in c.get("parts", ()) if "inlineData" in p),
                len(contents),
                dict(body.get("generationConfig") or {}),
                [" ".join(p.get("text", "") for p in c.get("parts", ())) for c in contents[:-1]],
                [
                    # the API's JSON takes either case, and the SDK sends dict parts in snake_case
                    str(p["inlineData"].get("mimeType") or p["inlineData"].get("mime_type") or "")
                    for p in (contents[-1].get("parts", ()) if contents else ())
                    if "inlineData" in p
                ],
            )
        )
        self._arrived.set()
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._respond(request, body, prompt, fault, streamed)
        finally:
            self.in_flight -= 1

    def _fault_for(self, request: web.Request, prompt: str) -> Fault | None:
        kind = request.headers.get(FAULT_HEADER)
        delay = request.headers.get(RETRY_DELAY_HEADER)
        if kind is None and (marker := _MARKER.search(prompt)):
            kind, delay = marker.group(1), marker.group(2)
        if kind is not None:
            return Fault(kind, float(delay) if delay else None)
        return self.script.popleft() if self.script else None

    async def _respond(
        self, request: web.Request, body: dict[str, Any], prompt: str, fault: Fault | None, streamed: bool
    ) -> web.StreamResponse:
        cfg = self.config
        if fault is not None and fault.kind == "timeout":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), cfg.hang_seconds)
            return _error(504, "DEADLINE_EXCEEDED", "the fake server hung on purpose")
        if cfg.latency:
            await asyncio.sleep(cfg.latency)
        if fault is not None and fault.kind in _ERROR_FAULTS:
            return _error(int(fault.kind), *_STATUS[int(fault.kind)], retry_delay=fault.retry_delay)
        model = request.match_info["target"].partition(":")[0]
        if model in cfg.overloaded_models:
            return _error(503, *_STATUS[503])
        if cfg.max_input_tokens and _prompt_tokens(body) > cfg.max_input_tokens:
            return _error(
                400,
                "INVALID_ARGUMENT",
                f"The input token count ({_prompt_tokens(body)}) exceeds the maximum number of tokens "
                f"allowed ({cfg.max_input_tokens}).",
            )

        words = _reply_words(prompt, cfg.reply_tokens)
        tokens_in = _prompt_tokens(body)
        cached = self._cached_tokens(body)
        thinking = _thinking_tokens(body, cfg.thinking_tokens)
        grounding = _grounding(body, prompt)
        finish = "STOP"
        if fault is not None and fault.kind == "max_tokens":
            words, finish = words[: max(1, len(words) // 2)], "MAX_TOKENS"
        chunks: list[dict[str, Any]]
        if fault is not None and fault.kind in ("safety", "blocked", "empty"):
            chunks = [_blocked(fault.kind, tokens_in)]
        else:
            pieces = _split(words, cfg.stream_chunks if streamed else 1)
            chunks = []
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                candidate: dict[str, Any] = {
                    "content": {"role": "model", "parts": [{"text": piece}]},
                    "index": 0,
                }
                if last:
                    candidate["finishReason"] = finish
                    if grounding is not None:
                        candidate["groundingMetadata"] = grounding
                done = sum(len(p.split()) for p in pieces[: i + 1])
                chunks.append(
                    {
                        "candidates": [candidate],
                        "usageMetadata": _usage(tokens_in, done, cached, thinking),
                        "modelVersion": request.match_info["target"].partition(":")[0],
                    }
                )
        if not streamed:
            return web.json_response(chunks[0])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i, chunk in enumerate(chunks):
                if i and cfg.chunk_interval:
                    await asyncio.sleep(cfg.chunk_interval)
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n")
            await response.write_eof()
        except ConnectionResetError:  # the client closed the connection as we wrote
            self.abandoned += 1
        except asyncio.CancelledError:
            # aiohttp cancels the handler when its client disconnects (or the server stops)
            if not self._closing.is_set():
                self.abandoned += 1
            raise
        return response

    def _over_quota(self, key: str, model: str, tokens: int) -> web.Response | None:
        """The 429 Google sends when `key` is over its per-minute quota; None if within it.
        A request that is refused counts against nothing."""
        cfg = self.config
        if not (cfg.quota_requests_per_minute or cfg.quota_tokens_per_minute):
            return None
        now = self.clock()
        used = self._usage.setdefault(key, deque())
        while used and used[0][0] <= now - 60.0:
            used.popleft()
        violation = None
        if cfg.quota_requests_per_minute and len(used) >= cfg.quota_requests_per_minute:
            violation = (
                "requests",
                "GenerateRequestsPerMinutePerProjectPerModel",
                cfg.quota_requests_per_minute,
            )
            free_at = used[len(used) - cfg.quota_requests_per_minute][0] + 60.0
        elif (
            cfg.quota_tokens_per_minute
            and used
            and sum(t for _, t in used) + tokens > cfg.quota_tokens_per_minute
        ):
            violation = (
                "input_token_count",
                "GenerateContentInputTokensPerModelPerMinute",
                cfg.quota_tokens_per_minute,
            )
            free_at = used[0][0] + 60.0
        if violation is None:
            used.append((now, tokens))
            return None
        metric, quota_id, value = violation
        delay = max(1, math.ceil(free_at - now))
        details = [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": f"generativelanguage.googleapis.com/generate_content_{metric}",
                        "quotaId": quota_id,
                        "quotaDimensions": {"location": "global", "model": model},
                        "quotaValue": str(value),
                    }
                ],
            },
            {
                "@type": "type.googleapis.com/google.rpc.Help",
                "links": [
                    {
                        "description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                    }
                ],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{delay}s"},
        ]
        message = (
            f"You exceeded your current quota, please check your plan and billing details. "
            f"Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_{metric}, "
            f"limit: {value}, model: {model}. Please retry in {delay}s."
        )
        return web.json_response(
            {"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED", "details": details}},
            status=429,
        )

    def _cached_tokens(self, body: dict[str, Any]) -> int:
        """Tokens of the longest prefix (the system instruction, then whole turns) this request
        shares with one that came in the last `CACHE_SECONDS`: Gemini's implicit caching,
        which serves a request's beginning from cache when an earlier request began the same.
        The new message is never part of it: a request that repeats another whole is still
        answered afresh."""
        contents = body["contents"]
        system = body.get("systemInstruction")
        items = ([system] if system is not None else []) + list(contents)
        now = self.clock()
        if len(self._prefixes) > MAX_PREFIXES:
            expired = now - CACHE_SECONDS
            self._prefixes = {d: at for d, at in self._prefixes.items() if at > expired}
        h = hashlib.blake2b(digest_size=16)
        cached = 0
        for i, item in enumerate(items):
            h.update(json.dumps(item, sort_keys=True).encode())
            digest = h.copy().hexdigest()
            seen = self._prefixes.get(digest)
            self._prefixes[digest] = now
            if i < len(items) - 1 and seen is not None and seen > now - CACHE_SECONDS:
                cached = i + 1
        if not cached:
            return 0
        prefix = items[:cached]
        if system is not None:
            return _prompt_tokens({"contents": prefix[1:], "systemInstruction": system})
        return _prompt_tokens({"contents": prefix})

    # --- admin endpoints, so a separate process (the benchmark) can steer the server -------

    async def _admin_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _admin_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response(self.stats())

    async def _admin_script(self, request: web.Request) -> web.Response:
        try:
            doc = await request.json()
            self.fail_next(int(doc.get("count", 1)), str(doc["kind"]), doc.get("retry_delay"))
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, "INVALID_ARGUMENT", str(exc))
        return web.json_response(self.stats())

    async def _admin_config(self, request: web.Request) -> web.Response:
        try:
            doc = await request.json()
            for name, value in doc.items():
                if not hasattr(self.config, name):
                    raise KeyError(name)
                setattr(self.config, name, type(getattr(self.config, name))(value))
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, "INVALID_ARGUMENT", f"bad config: {exc}")
        return web.json_response(self.stats())


def _last_user_text(contents: list[dict[str, Any]]) -> str:
    """The new message: the last text part of the last user turn (a context note the
    bot sends ahead of it, in the same turn, is not what the user said)."""
    for content in reversed(contents):
        if content.get("role", "user") == "user":
            texts = [p["text"] for p in content.get("parts", ()) if "text" in p]
            return texts[-1] if texts else ""
    raise ValueError("no user content")


def _reply_words(prompt: str, count: int) -> list[str]:
    said = " ".join(prompt.split()[:12])
    words = f"(fake gemini) you said: {said}.".split()
    filler = ("lorem", "ipsum", "dolor", "sit", "amet")
    while len(words) < count:
        words.append(filler[len(words) % len(filler)])
    return words


def _split(words: list[str], parts: int) -> list[str]:
    parts = max(1, min(parts, len(words)))
    size = -(-len(words) // parts)
    pieces = [words[i : i + size] for i in range(0, len(words), size)]
    return [" ".join(p) + (" " if i < len(pieces) - 1 else "") for i, p in enumerate(pieces)]


def _prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens as the fake counts them: words of every text part, system included."""
    system = body.get("systemInstruction") or {}
    contents = [*body["contents"], *([system] if isinstance(system, dict) else [])]
    return sum(len(str(p.get("text", "")).split()) for c in contents for p in c.get("parts", ()))


def _thinking_tokens(body: dict[str, Any], configured: int) -> int:
    """Thinking tokens of a reply: the configured count, within the request's budget
    (`thinkingConfig.thinkingBudget`; 0 turns thinking off)."""
    # like Google's JSON parser, either spelling of a field (the SDK sends this one in snake_case)
    thinking = (body.get("generationConfig") or {}).get("thinkingConfig") or {}
    budget = thinking.get("thinkingBudget", thinking.get("thinking_budget"))
    if budget is None or budget < 0:
        return configured
    return min(configured, int(budget))


def _grounding(body: dict[str, Any], prompt: str) -> dict[str, Any] | None:
    """Grounding metadata citing two pages, for a request with the Google Search tool."""
    if not any("googleSearch" in tool or "google_search" in tool for tool in body.get("tools") or ()):
        return None
    query = "+".join(prompt.split()[:6]) or "query"
    pages = [
        {"web": {"uri": f"https://example.com/search?q={query}", "title": "example.com"}},
        {"web": {"uri": f"https://example.org/wiki/{query}", "title": "example.org"}},
    ]
    return {"webSearchQueries": [prompt[:80]], "groundingChunks": pages, "groundingSupports": []}


def _usage(tokens_in: int, tokens_out: int, cached: int = 0, thinking: int = 0) -> dict[str, int]:
    usage = {
        "promptTokenCount": tokens_in,
        "candidatesTokenCount": tokens_out,
        "totalTokenCount": tokens_in + tokens_out + thinking,
    }
    if cached:
        usage["cachedContentTokenCount"] = cached
    if thinking:
        usage["thoughtsTokenCount"] = thinking
    return usage


def _blocked(kind: str, tokens_in: int) -> dict[str, Any]:
    if kind == "blocked":
        return {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": _usage(tokens_in, 0)}
    if kind == "empty":
        return {"candidates": [], "usageMetadata": _usage(tokens_in, 0)}
    rating = {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
    return {
        "candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [rating]}],
        "usageMetadata": _usage(tokens_in, 0),
    }


def _error(code: int, status: str, message: str, retry_delay: float | None = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if retry_delay is not None:
        error["details"] = [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_delay:g}s"}
        ]
    return web.json_response({"error": error}, status=code)


async def serve(host: str, port: int, config: FakeGeminiConfig) -> None:
    """Run the fake server until SIGINT/SIGTERM; prints its base URL first."""
    await serve_until_stopped(FakeGemini(config=config), "fake gemini", host, port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = FakeGeminiConfig()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=defaults.latency, help="seconds per reply")
    parser.add_argument("--reply-tokens", type=int, default=defaults.reply_tokens)
    parser.add_argument("--stream-chunks", type=int, default=defaults.stream_chunks)
    parser.add_argument("--chunk-interval", type=float, default=defaults.chunk_interval)
    parser.add_argument(
        "--quota-requests-per-minute", type=int, default=0, help="per API key, answered 429 above it; 0: none"
    )
    parser.add_argument("--quota-tokens-per-minute", type=int, default=0, help="prompt tokens, per API key")


def config_from_args(args: argparse.Namespace) -> FakeGeminiConfig:
    return FakeGeminiConfig(
        latency=args.latency,
        reply_tokens=args.reply_tokens,
        stream_chunks=args.stream_chunks,
        chunk_interval=args.chunk_interval,
        quota_requests_per_minute=args.quota_requests_per_minute,
        quota_tokens_per_minute=args.quota_tokens_per_minute,
    )
