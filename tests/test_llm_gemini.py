"""The LLM gateway (in this process) with its Gemini backend, driven through the real
google-genai SDK against the fake Gemini server: retries, breaker, coalescing, replies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from actors.errors import InputRejected, UpstreamUnavailable
from bot.config import LLMSettings, Settings
from bot.llm import ImagePart, LLMRequest
from bot.llm.base import UpstreamCoolingDown
from bot.llm.fake_server import FakeGemini, FakeGeminiConfig
from bot.llm.gateway import GeminiLLM
from tests.conftest import FakeClock

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64

MakeLLM = Callable[..., GeminiLLM]


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeGemini]:
    fake = FakeGemini(config=FakeGeminiConfig(latency=0.0, reply_tokens=24, stream_chunks=4))
    await fake.start()
    yield fake
    await fake.stop()


@pytest_asyncio.fixture
async def make_llm(server: FakeGemini) -> AsyncIterator[MakeLLM]:
    made: list[GeminiLLM] = []

    def make(clock: Callable[[], float] | None = None, **llm: Any) -> GeminiLLM:
        fields: dict[str, Any] = {
            "base_url": server.base_url,
            "backoff_base_seconds": 0.01,
            "backoff_max_seconds": 0.05,
            # every chunk passed on as it comes: these tests count the server's chunks
            "stream_interval_seconds": 0,
            "stream_chunk_chars": 1,
        }
        fields.update(llm)
        settings = Settings(gemini_api_key=None, discord_token=None, llm=LLMSettings(**fields))
        backend = GeminiLLM(settings, clock=clock) if clock else GeminiLLM(settings)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


def ask(prompt: str, key: str = "", images: tuple[ImagePart, ...] = ()) -> LLMRequest:
    return LLMRequest(
        prompt=prompt, model="gemini-2.5-flash", system_prompt="be brief", key=key, images=images
    )


@pytest.mark.asyncio
async def test_a_reply_comes_back_with_its_token_usage(server: FakeGemini, make_llm: MakeLLM) -> None:
    llm = make_llm()
    result = await llm.generate(ask("hello there"))
    assert "you said: hello there" in result.text
    assert result.finish_reason == "STOP"
    # the system prompt ("be brief") counts as prompt tokens, as Gemini counts it
    assert (result.tokens_in, result.tokens_out) == (4, 24)
    assert server.arrivals[0].model == "gemini-2.5-flash"
    assert llm.stats().tokens_out == 24


@pytest.mark.asyncio
async def test_a_429_is_retried_after_the_servers_retry_delay(server: FakeGemini, make_llm: MakeLLM) -> None:
    llm = make_llm()
    server.fail_next(1, "429", retry_delay=0.2)
    result = await llm.generate(ask("busy?"))
    assert result.finish_reason == "STOP"
    assert server.calls == 2
    first, second = server.arrivals
    assert second.at - first.at >= 0.2
    assert llm.stats().retries == 1


@pytest.mark.asyncio
async def test_server_errors_are_retried(server: FakeGemini, make_llm: MakeLLM) -> None:
    llm = make_llm(max_attempts=4)
    server.fail_next(1, "500")
    server.fail_next(2, "503")
    assert (await llm.generate(ask("flaky"))).finish_reason == "STOP"
    assert server.calls == 4


@pytest.mark.asyncio
@pytest.mark.parametrize(("kind", "error"), [("400", InputRejected), ("403", UpstreamUnavailable)])
async def test_other_4xx_are_not_retried(
    server: FakeGemini, make_llm: MakeLLM, kind: str, error: type[Exception]
) -> None:
    llm = make_llm()
    server.fail_next(1, kind)
    with pytest.raises(error):
        await llm.generate(ask("bad"))
    assert server.calls == 1
    # the request was wrong, not the upstream: the breaker stays closed
    assert llm.stats().breaker_state == "closed"


@pytest.mark.asyncio
async def test_exhausted_retries_raise_a_friendly_upstream_error(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    llm = make_llm(max_attempts=3)
    server.fail_next(5, "500")
    with pytest.raises(UpstreamUnavailable) as caught:
        await llm.generate(ask("down"))
    assert server.calls == 3
    assert "gave up after 3 attempts" in str(caught.value)
    assert "try again" in caught.value.user_message()


@pytest.mark.asyncio
async def test_a_hung_attempt_times_out_and_is_retried(server: FakeGemini, make_llm: MakeLLM) -> None:
    # an attempt timeout ample for a normal call on a loaded machine; the hung one never ends
    llm = make_llm(attempt_timeout_seconds=2.0)
    server.fail_next(1, "timeout")
    assert (await llm.generate(ask("slow"))).finish_reason == "STOP"
    assert server.calls == 2
    assert llm.stats().retries >= 1


@pytest.mark.asyncio
async def test_the_total_deadline_ends_the_request(server: FakeGemini, make_llm: MakeLLM) -> None:
    llm = make_llm(attempt_timeout_seconds=0.2, timeout_seconds=0.5, max_attempts=10)
    await llm.generate(ask("warm up"))  # the SDK's client, made outside the request's deadline
    server.reset()
    server.fail_next(10, "timeout")
    with pytest.raises(UpstreamUnavailable):
        await llm.generate(ask("never"))
    # 0.5 s hold two or three 0.2 s attempts (with their backoff), never the ten allowed
    assert 1 <= server.calls <= 3


@pytest.mark.asyncio
async def test_the_circuit_breaker_opens_fails_fast_and_recovers(
    server: FakeGemini, make_llm: MakeLLM, clock: FakeClock
) -> None:
    llm = make_llm(clock, max_attempts=1, breaker_threshold=2, breaker_cooldown_seconds=30)
    server.fail_next(3, "503")
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable):
            await llm.generate(ask("down"))
    with pytest.raises(UpstreamCoolingDown) as caught:
        await llm.generate(ask("down"))
    assert server.calls == 2  # failed fast, without a call
    assert "30 seconds" in caught.value.user_message()
    assert llm.stats().breaker_state == "open"

    clock.advance(30)
    # the half-open probe fails (the third scripted 503): open again for another cool-down
    with pytest.raises(UpstreamUnavailable):
        await llm.generate(ask("probe"))
    with pytest.raises(UpstreamCoolingDown):
        await llm.generate(ask("down"))
    assert server.calls == 3

    clock.advance(30)
    assert (await llm.generate(ask("probe again"))).finish_reason == "STOP"
    assert llm.stats().breaker_state == "closed"
    assert llm.stats().breaker_opened == 2


@pytest.mark.asyncio
async def test_identical_concurrent_requests_make_one_upstream_call(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    server.config.latency = 0.05
    llm = make_llm()
    results = await asyncio.gather(*(llm.generate(ask("same", key="k1")) for _ in range(20)))
    assert server.calls == 1
    assert len({r.text for r in results}) == 1
    assert llm.stats().coalesced == 19


@pytest.mark.asyncio
async def test_cancelling_one_coalesced_caller_leaves_the_others_their_answer(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    server.config.latency = 0.3
    llm = make_llm()
    callers = [asyncio.create_task(llm.generate(ask("shared", key="k2"))) for _ in range(3)]
    await server.wait_for_calls(1)
    callers[0].cancel()
    answers = await asyncio.gather(*callers[1:])
    assert callers[0].cancelled()
    assert all("you said: shared" in a.text for a in answers)
    assert server.calls == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kind", "reason", "says"),
    [
        ("safety", "SAFETY", "safety filters blocked the reply"),
        ("blocked", "SAFETY", "safety filters blocked the request"),
        ("empty", "EMPTY", "no answer"),
        ("max_tokens", "MAX_TOKENS", "reply cut short"),
    ],
)
async def test_blocked_empty_and_truncated_replies_get_a_clear_text(
    make_llm: MakeLLM, kind: str, reason: str, says: str
) -> None:
    llm = make_llm()
    result = await llm.generate(ask(f"something [[fault:{kind}]]"))
    assert result.finish_reason == reason
    assert says in result.text
    streamed = llm.stream(ask(f"something [[fault:{kind}]]"))
    text = "".join([chunk async for chunk in streamed])
    assert streamed.result is not None and streamed.result.finish_reason == reason
    assert says in text


@pytest.mark.asyncio
async def test_streamed_chunks_arrive_in_order_with_usage(server: FakeGemini, make_llm: MakeLLM) -> None:
    llm = make_llm()
    whole = await llm.generate(ask("tell me a story"))
    stream = llm.stream(ask("tell me a story"))
    chunks = [chunk async for chunk in stream]
    assert len(chunks) == 4
    assert "".join(chunks) == whole.text
    assert chunks[0].startswith("(fake gemini) you said")
    assert stream.result is not None
    assert (stream.result.text, stream.result.tokens_out) == (whole.text, 24)
    assert server.arrivals[-1].streamed


@pytest.mark.asyncio
async def test_a_stream_is_retried_before_its_first_chunk(server: FakeGemini, make_llm: MakeLLM) -> None:
    llm = make_llm()
    server.fail_next(1, "429", retry_delay=0.05)
    chunks = [chunk async for chunk in llm.stream(ask("retry the stream"))]
    assert server.calls == 2
    assert "you said: retry the stream" in "".join(chunks)


@pytest.mark.asyncio
async def test_the_concurrency_bound_holds_under_200_callers(server: FakeGemini, make_llm: MakeLLM) -> None:
    server.config.latency = 0.02
    llm = make_llm(max_concurrency=5)

    async def one(i: int) -> str:
        if i % 4 == 0:
            return "".join([chunk async for chunk in llm.stream(ask(f"stream {i}"))])
        return (await llm.generate(ask(f"question {i}"))).text

    replies = await asyncio.gather(*(one(i) for i in range(200)))
    assert all(f" {i}." in reply for i, reply in enumerate(replies))
    assert server.calls == 200
    assert server.peak_in_flight <= 5
    assert llm.stats().peak_in_flight == 5
    assert llm.stats().in_flight == 0


@pytest.mark.asyncio
async def test_queued_calls_go_upstream_in_arrival_order(server: FakeGemini, make_llm: MakeLLM) -> None:
    server.config.latency = 0.01
    llm = make_llm(max_concurrency=1)
    await asyncio.gather(*(llm.generate(ask(f"n{i}")) for i in range(10)))
    assert [a.prompt for a in server.arrivals] == [f"n{i}" for i in range(10)]


@pytest.mark.asyncio
async def test_an_image_goes_upstream_as_an_inline_part(server: FakeGemini, make_llm: MakeLLM) -> None:
    llm = make_llm()
    # the declared type is wrong; the bytes say PNG, and PNG is what is sent
    result = await llm.generate(ask("what is this?", images=(ImagePart("image/jpeg", PNG, "cat.png"),)))
    assert result.finish_reason == "STOP"
    assert server.arrivals[0].images == 1
    assert server.arrivals[0].inline_types == ["image/png"]


@pytest.mark.asyncio
async def test_a_pdf_and_a_gif_go_upstream_as_inline_parts_of_their_own_type(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    llm = make_llm()
    pdf = ImagePart("application/octet-stream", b"%PDF-1.4\n%\xe2\xe3\n1 0 obj\n", "paper.pdf")
    gif = ImagePart("image/gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "dot.gif")
    result = await llm.generate(ask("summarise", images=(pdf, gif)))
    assert result.finish_reason == "STOP"
    assert server.arrivals[0].inline_types == ["application/pdf", "image/gif"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("image", "says"),
    [
        (
            ImagePart("text/plain", b"just some text", "notes.txt"),
            "notes.txt (text/plain) is not an image or a PDF",
        ),
        (
            ImagePart("image/png", b"no image at all", "fake.png"),
            "fake.png (image/png) is not an image or a PDF",
        ),
        (ImagePart("image/png", PNG + b"\x00" * 2000, "big.png"), "big.png is 2.0 KiB; the limit is 1.0 KiB"),
        (
            ImagePart("application/pdf", b"%PDF-1.7\n" + b"0" * 2000, "big.pdf"),
            "big.pdf is 2.0 KiB; the limit is 1.0 KiB",
        ),
    ],
)
async def test_a_bad_attachment_is_refused_with_a_reason(
    server: FakeGemini, make_llm: MakeLLM, image: ImagePart, says: str
) -> None:
    llm = make_llm(max_image_bytes=1024, max_pdf_bytes=1024)
    with pytest.raises(InputRejected) as caught:
        await llm.generate(ask("look", images=(image,)))
    assert says in caught.value.reason
    with pytest.raises(InputRejected):
        async for _ in llm.stream(ask("look", images=(image,))):
            pass
    assert server.calls == 0


@pytest.mark.asyncio
async def test_too_many_images_are_refused(server: FakeGemini, make_llm: MakeLLM) -> None:
    llm = make_llm(max_attachments=2)
    with pytest.raises(InputRejected, match="3 files were attached; the limit is 2"):
        await llm.generate(ask("look", images=(ImagePart("image/png", PNG),) * 3))
    assert server.calls == 0


@pytest.mark.asyncio
async def test_closing_a_stream_early_drops_its_http_stream(server: FakeGemini, make_llm: MakeLLM) -> None:
    server.config.latency = 0.05
    server.config.chunk_interval = 0.5  # the rest of the stream would take 1.5 s
    llm = make_llm()
    stream = llm.stream(ask("a long story"))
    first = await anext(aiter(stream))
    await stream.aclose()
    assert first.startswith("(fake gemini)")
    # the gateway dropped the HTTP stream: the server saw its client leave mid-stream
    for _ in range(500):  # up to 10 s
        if server.abandoned:
            break
        await asyncio.sleep(0.02)
    assert server.abandoned == 1
    stats = llm.stats()
    assert stats.in_flight == 0
    # what Gemini generated before the reader left is billed, and counted
    assert (stats.tokens_in, stats.tokens_out) == (3 + 2, len(first.split()))  # "be brief" too
    assert stats.cost_usd["gemini-2.5-flash"] > 0
    # the gateway is still serving after the cancelled stream
    assert "you said: next" in (await llm.generate(ask("next"))).text


@pytest.mark.asyncio
async def test_calls_go_through_the_proxy_the_environment_names(
    server: FakeGemini, make_llm: MakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the SDK's session does not read the environment on every request: the proxy is
    # looked up once, where the gateway is made, and every call goes through it
    proxied: list[str] = []

    async def forward(request: web.Request) -> web.Response:
        proxied.append(str(request.url))
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method,
                server.base_url + request.path_qs,
                data=await request.read(),
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
            ) as upstream,
        ):
            return web.Response(
                status=upstream.status, body=await upstream.read(), content_type=upstream.content_type
            )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    try:
        llm = make_llm()
        result = await llm.generate(ask("through the proxy"))
        assert "you said: through the proxy" in result.text
        assert len(proxied) == 1 and proxied[0].startswith(server.base_url)
        assert server.calls == 1
    finally:
        await runner.cleanup()
