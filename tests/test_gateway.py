"""The LLM gateway's own parts, in this process: the quota over rolling windows and the
fair queue (with an injected clock, no waiting), and the gateway against the fake Gemini
server through the real SDK: the quota's busy answer, token correction, model fallback
decided by RetryInfo, unknown models, fair turns, and coalesced streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from pydantic import ValidationError

from actors.errors import InputRejected
from bot.config import LLMSettings, ModelQuota, QuotaSettings, Settings
from bot.llm import LLMRequest
from bot.llm.base import UPSTREAM_MS, GatewayBusy, UnknownModel
from bot.llm.fake_server import FakeGemini, FakeGeminiConfig
from bot.llm.gateway import GeminiLLM, LLMResult
from bot.llm.quota import FairQueue, ModelLimits
from bot.llm.quota import ModelQuota as Window
from tests.conftest import FakeClock

MakeLLM = Callable[..., GeminiLLM]


# --- the quota and the queue on their own -----------------------------------------------------


def test_requests_per_minute_free_up_as_the_window_rolls(clock: FakeClock) -> None:
    quota = Window(ModelLimits(requests_per_minute=2))
    quota.take(clock(), 1)
    clock.advance(10)
    quota.take(clock(), 1)
    assert quota.wait(clock(), 1) == pytest.approx(50)
    # with 3 more ahead of it, a request waits for the second window after this one
    assert quota.eta(clock(), 3) == pytest.approx(120)
    clock.advance(50)
    assert quota.wait(clock(), 1) == 0
    assert quota.used(clock())[0] == 1


def test_prompt_tokens_are_estimated_then_corrected_from_usage(clock: FakeClock) -> None:
    quota = Window(ModelLimits(tokens_per_minute=100))
    ticket = quota.take(clock(), 90)
    assert quota.wait(clock(), 20) == pytest.approx(60)
    quota.correct(ticket, 30)  # the API counted fewer than the estimate
    assert quota.wait(clock(), 20) == 0
    assert quota.used(clock())[1] == 30


def test_requests_per_day_hold_across_minutes(clock: FakeClock) -> None:
    quota = Window(ModelLimits(requests_per_minute=100, requests_per_day=3))
    for _ in range(3):
        quota.take(clock(), 1)
        clock.advance(120)
    assert quota.wait(clock(), 1) == pytest.approx(86_400 - 360)


def test_a_split_quota_gives_each_replica_its_share() -> None:
    assert ModelLimits(10, 1_000, None).split(3) == ModelLimits(3, 333, None)
    assert ModelLimits(1, None, 5).split(4) == ModelLimits(1, None, 1)


def test_the_fair_queue_serves_users_in_turn_and_servers_in_turn() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(4):
        queue.push("s1", "flood", f"flood{i}")
    queue.push("s1", "light", "light")
    queue.push("s2", "other", "other")
    # a second light request waits for its own first, and up to two of each other user's
    assert queue.ahead("s1", "light") == 4
    order = [queue.pop() for _ in range(len(queue))]
    assert order == ["flood0", "other", "light", "flood1", "flood2", "flood3"]


def test_the_fair_queue_counts_who_goes_first_and_forgets_a_removed_item() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(5):
        queue.push("", "flood", f"f{i}")
    # a light user's next request waits for one flood request, not five
    assert queue.ahead("", "light") == 1
    assert queue.remove("", "flood", "f0") and not queue.remove("", "flood", "f0")
    assert queue.peek() == "f1" and len(queue) == 4


@pytest.mark.parametrize("field", ["requests_per_minute", "tokens_per_minute", "requests_per_day"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_zero_or_negative_quota_is_a_clear_error_at_start(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str
) -> None:
    monkeypatch.setenv(f"RAYCORD_LLM__QUOTA__{field.upper()}", value)
    with pytest.raises(ValidationError, match=f"{field} must be a positive number"):
        Settings()


def test_presets_hold_for_googles_api_and_the_environment_overrides_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quota = QuotaSettings()
    assert quota.for_model("gemini-2.5-flash", google_api=True).requests_per_minute == 10
    # a configured server (a fake or a proxy) is not Google's: no preset applies there
    assert quota.for_model("gemini-2.5-flash", google_api=False) == ModelQuota()
    assert (
        QuotaSettings(preset="tier1").for_model("gemini-2.5-pro", google_api=True).requests_per_minute == 150
    )
    monkeypatch.setenv("RAYCORD_LLM__QUOTA__REQUESTS_PER_MINUTE", "7")
    monkeypatch.setenv("RAYCORD_LLM__QUOTA__PRESET", "free")
    settings = Settings()
    flash = settings.llm.quota.for_model("gemini-2.5-flash", google_api=True)
    assert (flash.requests_per_minute, flash.tokens_per_minute) == (7, 250_000)


# --- the gateway against the fake server ------------------------------------------------------


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
        }
        fields.update(llm)
        settings = Settings(gemini_api_key=None, discord_token=None, llm=LLMSettings(**fields))
        backend = GeminiLLM(settings, clock=clock)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


def ask(prompt: str, model: str = "gemini-2.5-flash", user: str = "u", key: str = "") -> LLMRequest:
    return LLMRequest(prompt=prompt, model=model, user=user, key=key)


@pytest.mark.asyncio
async def test_a_request_the_quota_would_keep_too_long_is_answered_busy_at_once(
    server: FakeGemini, make_llm: MakeLLM, clock: FakeClock
) -> None:
    llm = make_llm(clock, quota=QuotaSettings(requests_per_minute=2), max_queue_seconds=5)
    for i in range(2):
        await llm.generate(ask(f"q{i}"))
    with pytest.raises(GatewayBusy) as caught:
        await llm.generate(ask("one too many"))
    # the first request leaves the minute's window 60 s after it went
    assert caught.value.retry_after == pytest.approx(60)
    assert "try again in 60 seconds" in caught.value.user_message()
    assert server.calls == 2
    clock.advance(60)
    assert "you said: now" in (await llm.generate(ask("now"))).text
    assert llm.stats().busy == 1


@pytest.mark.asyncio
async def test_the_token_count_is_corrected_from_usage_metadata(make_llm: MakeLLM, clock: FakeClock) -> None:
    llm = make_llm(clock, quota=QuotaSettings(tokens_per_minute=10_000))
    result = await llm.generate(LLMRequest(prompt="a " * 400, model="gemini-2.5-flash"))
    # estimated from 800 characters (~200 tokens), counted by the server as 400 words
    assert llm.stats().quota_used["gemini-2.5-flash"][1] == result.tokens_in == 400


@pytest.mark.asyncio
async def test_a_result_says_how_long_its_upstream_call_took_within_the_callers_wait(
    make_llm: MakeLLM,
) -> None:
    llm = make_llm()
    loop = asyncio.get_running_loop()
    asked = loop.time()
    result = await llm.generate(ask("how long?"))
    waited_ms = (loop.time() - asked) * 1000
    assert 0 < float(result.metadata[UPSTREAM_MS]) <= waited_ms


@pytest.mark.asyncio
async def test_an_overloaded_model_falls_back_and_the_reply_says_which_model_answered(
    server: FakeGemini, make_llm: MakeLLM, clock: FakeClock
) -> None:
    server.config.overloaded_models = ["gemini-2.5-pro"]
    llm = make_llm(clock, fallback_models=["gemini-2.5-flash", "gemini-2.5-flash-lite"])
    result = await llm.generate(ask("who answers?", model="gemini-2.5-pro"))
    assert result.model == "gemini-2.5-flash"
    assert result.metadata["fallback_from"] == "gemini-2.5-pro"
    assert [a.model for a in server.arrivals] == ["gemini-2.5-pro", "gemini-2.5-flash"]
    assert llm.stats().fallbacks == 1


@pytest.mark.asyncio
async def test_retry_info_decides_when_the_first_model_is_tried_again(
    server: FakeGemini, make_llm: MakeLLM, clock: FakeClock
) -> None:
    llm = make_llm(clock, fallback_models=["gemini-2.5-flash"])
    server.fail_next(1, "429", retry_delay=30)
    first = await llm.generate(ask("one", model="gemini-2.5-pro"))
    second = await llm.generate(ask("two", model="gemini-2.5-pro"))
    assert (first.model, second.model) == ("gemini-2.5-flash", "gemini-2.5-flash")
    clock.advance(30)
    third = await llm.generate(ask("three", model="gemini-2.5-pro"))
    assert third.model == "gemini-2.5-pro"
    assert [a.model for a in server.arrivals] == [
        "gemini-2.5-pro",
        "gemini-2.5-flash",
        "gemini-2.5-flash",
        "gemini-2.5-pro",
    ]


@pytest.mark.asyncio
async def test_an_unknown_model_gets_a_clear_reply(server: FakeGemini, make_llm: MakeLLM) -> None:
    llm = make_llm()
    with pytest.raises(UnknownModel) as caught:
        await llm.generate(ask("hello", model="no-such-model"))
    assert "no-such-model" in caught.value.user_message()
    assert "llm.model" in caught.value.user_message()
    stream = llm.stream(ask("hello", model="no-such-model"))
    with pytest.raises(UnknownModel):
        async for _ in stream:
            pass
    # the API answered: the upstream is healthy, nothing was retried
    assert llm.stats().breaker_state == "closed" and llm.stats().retries == 0


async def _until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition` holds (each pass lets every ready task step)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


@pytest.mark.asyncio
async def test_one_users_burst_waits_behind_every_other_users_next_request(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    server.config.latency = 0.2
    llm = make_llm(max_concurrency=1)
    flood = [asyncio.create_task(llm.generate(ask(f"flood {i}", user="flood"))) for i in range(10)]
    await server.wait_for_calls(1)
    await _until(lambda: llm.stats().queued == 9)
    light = [asyncio.create_task(llm.generate(ask(f"light {i}", user=f"light-{i}"))) for i in range(3)]
    await _until(lambda: llm.stats().queued == 12)
    await asyncio.gather(*light)
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    prompts = [a.prompt for a in server.arrivals]
    # the flood's first request was in flight and its second had the next turn; then each
    # light user's one request went before the flood's third
    assert prompts[:5] == ["flood 0", "flood 1", "light 0", "light 1", "light 2"]


@pytest.mark.asyncio
async def test_a_stream_joining_an_identical_one_gets_every_chunk_from_the_start(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    server.config.chunk_interval = 0.2
    llm = make_llm(stream_interval_seconds=0)
    leader = llm.stream(ask("tell me", key="same"))
    first = await anext(aiter(leader))
    follower = llm.stream(ask("tell me", key="same"))
    late = asyncio.create_task(llm.generate(ask("tell me", key="same")))
    followed = "".join([chunk async for chunk in follower])
    led = first + "".join([chunk async for chunk in leader])
    assert followed == led and (await late).text == led
    assert leader.result is not None and follower.result is not None
    assert isinstance(follower.result, LLMResult) and follower.result.tokens_out == 24
    assert server.calls == 1
    assert llm.stats().coalesced == 2


@pytest.mark.asyncio
async def test_pieces_of_a_stream_are_coalesced_on_their_way_out(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    server.config.stream_chunks = 24
    server.config.chunk_interval = 0.01
    llm = make_llm(stream_interval_seconds=10, stream_chunk_chars=40)
    stream = llm.stream(ask("a long one"))
    pieces = [chunk async for chunk in stream]
    # the first piece goes at once; the rest wait for 40 characters (or the end)
    assert len(pieces) < 24
    assert all(len(p) >= 40 for p in pieces[1:-1])
    assert stream.result is not None and "".join(pieces) == stream.result.text


def _history(turns: int, words: int, word: str = "word") -> tuple[tuple[str, str, str], ...]:
    return tuple(
        ("user" if i % 2 == 0 else "model", "", f"turn{i} " + f"{word} " * words) for i in range(turns)
    )


@pytest.mark.asyncio
async def test_the_history_is_trimmed_oldest_turns_first_to_the_prompt_budget(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    llm = make_llm(max_prompt_tokens=150)
    history = _history(10, 40)  # each turn ~205 characters, ~51 tokens by the estimate
    await llm.generate(LLMRequest(prompt="latest", model="gemini-2.5-flash", history=history))
    sent = server.arrivals[-1].history
    assert 0 < len(sent) < len(history)
    # the newest turns, in order, from a user turn
    assert [h.split()[0] for h in sent] == [t[2].split()[0] for t in history[-len(sent) :]]
    assert sent[0].startswith(("turn0", "turn2", "turn4", "turn6", "turn8"))
    assert llm.stats().trimmed == 1


@pytest.mark.asyncio
async def test_the_budget_is_calibrated_per_conversation_from_what_the_api_counted(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    llm = make_llm(max_prompt_tokens=300)
    # long words: ~7 estimated tokens each, one each as the server counts them
    history = _history(10, 10, "abcdefghijklmnopqrstuvwxyz")

    def turn(conversation: str) -> LLMRequest:
        return LLMRequest(prompt="next", model="gemini-2.5-flash", history=history, conversation=conversation)

    await llm.generate(turn("c1"))
    first = len(server.arrivals[-1].history)
    await llm.generate(turn("c1"))
    calibrated = len(server.arrivals[-1].history)
    await llm.generate(turn("c2"))
    other = len(server.arrivals[-1].history)
    assert first < calibrated == len(history)
    assert other == first  # another conversation has no calibration yet


@pytest.mark.asyncio
async def test_a_prompt_the_api_finds_too_long_is_trimmed_further_and_retried_once(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    server.config.max_input_tokens = 60
    llm = make_llm()
    history = _history(10, 7)  # 80 words: over the model's 60
    result = await llm.generate(LLMRequest(prompt="go on", model="gemini-2.5-flash", history=history))
    assert result.finish_reason == "STOP"
    assert [len(a.history) for a in server.arrivals] == [10, 4]
    server.config.max_input_tokens = 5
    with pytest.raises(InputRejected, match="longer than the model takes"):
        await llm.generate(LLMRequest(prompt="go on", model="gemini-2.5-flash", history=history))
    assert len(server.arrivals) == 4  # one trim and one retry, never more


@pytest.mark.asyncio
async def test_grounded_replies_list_their_sources_and_thoughts_stay_hidden(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    server.config.thinking_tokens = 50
    llm = make_llm(google_search=True, thinking_budget=20)
    stream = llm.stream(ask("what is ray"))
    text = "".join([chunk async for chunk in stream])
    assert "\n\nSources:\n- [example.com](<https://example.com/search?q=what+is+ray>)" in text
    assert stream.result is not None and stream.result.text == text
    # the budget reached the API, and the thinking it reported is counted, never shown
    assert server.arrivals[-1].config["thinkingConfig"]["thinking_budget"] == 20
    assert stream.result.metadata["thinking_tokens"] == "20"
    assert llm.stats().thinking_tokens == 20


@pytest.mark.asyncio
async def test_without_the_features_configured_no_search_or_thinking_is_asked_for(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    result = await make_llm().generate(ask("plain"))
    assert "Sources" not in result.text
    assert "thinkingConfig" not in server.arrivals[-1].config


@pytest.mark.asyncio
async def test_a_repeated_prompt_prefix_counts_as_cached_tokens_and_costs_less(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    llm = make_llm()
    history = _history(2, 5)
    first = await llm.generate(LLMRequest(prompt="one", model="gemini-2.5-flash", history=history))
    second = await llm.generate(LLMRequest(prompt="two", model="gemini-2.5-flash", history=history))
    assert "cached_tokens" not in first.metadata
    # the two turns of history, six words each, came back from the implicit cache
    assert second.metadata["cached_tokens"] == "12"
    stats = llm.stats()
    assert stats.cached_tokens == 12
    assert stats.cached_prompt_share == pytest.approx(12 / (first.tokens_in + second.tokens_in))
    # cached prompt tokens cost a quarter of the others (gemini-2.5-flash's list prices)
    price = LLMSettings().prices["gemini-2.5-flash"]
    expected = (
        (second.tokens_in - 12) * price.input + 12 * price.cached_input + second.tokens_out * price.output
    ) / 1e6
    assert float(second.metadata["cost_usd"]) == pytest.approx(expected, rel=1e-6)
    assert stats.cost_usd["gemini-2.5-flash"] == pytest.approx(
        float(first.metadata["cost_usd"]) + expected, rel=1e-6
    )


@pytest.mark.asyncio
async def test_the_budget_trim_drops_turns_in_steps_so_a_conversations_requests_start_alike(
    server: FakeGemini, make_llm: MakeLLM
) -> None:
    llm = make_llm(max_prompt_tokens=200)
    starts = []
    # a conversation two turns longer each time, soon over the budget (~15 tokens a turn)
    for turns in range(12, 24, 2):
        await llm.generate(LLMRequest(prompt="next", model="gemini-2.5-flash", history=_history(turns, 10)))
        starts.append(server.arrivals[-1].history[0].split()[0])
    # dropping one turn at a time would start each request two turns later than the last;
    # steps of eight keep the start for four requests, and their prefix stays cacheable
    assert starts == ["turn0", "turn8", "turn8", "turn8", "turn8", "turn16"]
