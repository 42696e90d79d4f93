"""The LLM gateway as a Ray actor behind real front-ends, against the fake Gemini server:
two front-end processes attached to one Ray share one quota, and /stats shows what both
spent today; two replicas split the quota; a gateway killed mid-stream ends the stream with
a retryable error and restarts; one user's 200 concurrent requests leave every other user
served in turn; identical streams share one upstream call; each upstream call is one
analytics event, which `raycord analytics --report cost` sums by the price table; a
conversation's turns share their prefix, so Gemini's implicit cache serves a growing share.

One runtime and one fake server serve the module (and one pair of gateway replicas).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
import ray

from actors.errors import ServiceUnavailable
from actors.schemas import IncomingMessage
from bot.cli import main
from bot.config import LLMSettings, ModelPrice, ModelQuota, QuotaSettings
from bot.llm import LLMRequest
from bot.llm.base import GatewayBusy, LLMResult
from bot.llm.fake_server import FakeGemini, FakeGeminiConfig
from bot.llm.gateway import GatewayClient, GatewayConfig, GatewayStats, LLMGateway
from bot.runtime import Runtime, ServiceSpec, project_root, service_handles
from tests.conftest import make_settings

#: the model whose quota the shared-quota test spends; the other tests use the default model
QUOTA_MODEL = "gemini-2.0-flash"
QUOTA = 6


@pytest_asyncio.fixture(scope="module")
async def server() -> AsyncIterator[FakeGemini]:
    fake = FakeGemini(config=FakeGeminiConfig(latency=0.0, reply_tokens=24, stream_chunks=4))
    await fake.start()
    yield fake
    await fake.stop()


def gateway_llm(url: str) -> LLMSettings:
    return LLMSettings(
        base_url=url,
        max_concurrency=4,
        max_queue_seconds=5,
        quota=QuotaSettings(models={QUOTA_MODEL: ModelQuota(requests_per_minute=QUOTA)}),
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.05,
    )


@pytest_asyncio.fixture(scope="module")
async def gateway_runtime(
    ray_session: None, server: FakeGemini, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Runtime]:
    rt = Runtime(make_settings(tmp_path_factory.mktemp("gateway"), llm=gateway_llm(server.base_url)))
    await rt.start()
    yield rt
    await rt.shutdown(kill_actors=True)


@pytest.fixture
def fresh(server: FakeGemini) -> FakeGemini:
    """The module's server with its counts and script cleared and its defaults back."""
    server.reset()
    server.config = FakeGeminiConfig(latency=0.0, reply_tokens=24, stream_chunks=4)
    return server


_SECOND_FRONT_END = """
import asyncio, json, sys
from pathlib import Path
from bot.config import LLMSettings, Settings
from bot.llm import LLMRequest
from bot.llm.base import GatewayBusy
from bot.runtime import Runtime

async def main(address, namespace, state_dir, llm_json, model, count):
    settings = Settings(
        state_dir=Path(state_dir), namespace=namespace, ray_address=address, dashboard=False,
        discord_token=None, gemini_api_key=None, llm=LLMSettings.model_validate_json(llm_json),
    )
    rt = Runtime(settings)
    pipeline = await rt.start()
    outcomes = []
    try:
        for i in range(int(count)):
            try:
                await pipeline.llm.generate(LLMRequest(prompt=f"second {i}", model=model, user=f"b{i}"))
                outcomes.append("answered")
            except GatewayBusy as exc:
                outcomes.append(f"busy {exc.retry_after:.0f}")
    finally:
        await rt.shutdown()  # actors outlive a front-end attached to a Ray it did not start
    print(json.dumps({"outcomes": outcomes}))

asyncio.run(main(*sys.argv[1:]))
"""


async def _answer(rt: Runtime, prompt: str, model: str, user: str) -> str:
    assert rt.pipeline is not None
    try:
        await rt.pipeline.llm.generate(LLMRequest(prompt=prompt, model=model, user=user))
    except GatewayBusy as exc:
        return f"busy {exc.retry_after:.0f}"
    return "answered"


def call_cost(price: ModelPrice, prompt: int, cached: int, output: int, thinking: int) -> float:
    """What one call costs by the price table: cached prompt tokens at their own price,
    thinking billed as output."""
    return (
        (prompt - cached) * price.input + cached * price.cached_input + (output + thinking) * price.output
    ) / 1e6


@pytest.mark.asyncio
async def test_two_front_end_processes_share_one_quota_and_stats_shows_what_both_spent_today(
    gateway_runtime: Runtime, fresh: FakeGemini
) -> None:
    # the fake server enforces the same quota on the key: a second front-end spending a
    # quota of its own would draw 429s from it
    fresh.config.quota_requests_per_minute = QUOTA
    settings = gateway_runtime.settings
    pipeline = gateway_runtime.pipeline
    assert pipeline is not None
    await gateway_runtime.flush()  # the calls of earlier tests are in the sink before the count
    before = await pipeline.summary()
    # the second front-end spends four of the minute's six; this one asks right after it
    # exits, well within the same minute whatever its start-up took
    out = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-c",
            _SECOND_FRONT_END,
            ray.get_runtime_context().gcs_address,
            settings.namespace,
            str(settings.state_dir),
            settings.llm.model_dump_json(),
            QUOTA_MODEL,
            "4",
        ],
        cwd=project_root(),
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(project_root())},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    second = json.loads(out.stdout.strip().splitlines()[-1])["outcomes"]
    first = [await _answer(gateway_runtime, f"first {i}", QUOTA_MODEL, f"a{i}") for i in range(4)]
    assert second == ["answered"] * 4
    # two of the six left for the minute, then "busy" at once, until the minute frees one
    assert first[:2] == ["answered", "answered"]
    assert [o.split()[0] for o in first[2:]] == ["busy", "busy"]
    assert all(1 <= int(o.split()[1]) <= 60 for o in first[2:])
    assert fresh.calls == QUOTA and fresh.quota_rejections == 0
    stats = await gateway_runtime.clients["llm"].stats()  # type: ignore[attr-defined]
    assert sum(s.quota_used[QUOTA_MODEL][0] for s in stats) == QUOTA
    # /stats reads the spend from the analytics sink, so the other process's calls are in it:
    # six calls of two prompt words ("first 0", "second 3") and 24 reply words each
    await gateway_runtime.flush()
    after = await pipeline.summary()
    assert after.calls_today - before.calls_today == QUOTA
    price = settings.llm.prices[QUOTA_MODEL]
    spent = after.spent_today_usd - before.spent_today_usd
    assert spent == pytest.approx(QUOTA * call_cost(price, 2, 0, 24, 0), rel=1e-6)
    assert f"${after.spent_today_usd:.4f} over {after.calls_today} calls" in after.lines()[-1]


@pytest.mark.asyncio
async def test_a_gateway_killed_mid_stream_ends_it_with_a_retryable_error_and_restarts(
    gateway_runtime: Runtime, fresh: FakeGemini
) -> None:
    fresh.config.chunk_interval = 1.0  # the stream would take 3 s after its first chunk
    pipeline = gateway_runtime.pipeline
    assert pipeline is not None
    (gateway,) = gateway_runtime.handles["llm"]
    before = (await gateway.health.remote()).pid
    first_chunk = asyncio.Event()

    async def on_chunk(text: str) -> None:
        first_chunk.set()

    msg = IncomingMessage(text="a long story please", user_id="killed", scope="c", stateless=True)
    reply = asyncio.create_task(pipeline.handle(msg, on_chunk=on_chunk))
    await asyncio.wait_for(first_chunk.wait(), 60)
    ray.kill(gateway, no_restart=False)
    with pytest.raises(ServiceUnavailable) as caught:
        await asyncio.wait_for(reply, 60)
    assert "try again" in caught.value.user_message()
    # the next message is answered by the restarted gateway
    again = IncomingMessage(text="are you back?", user_id="killed", scope="c", stateless=True)
    answered = await asyncio.wait_for(pipeline.handle(again), 60)
    assert "you said: are you back?" in answered.text
    assert (await gateway.health.remote()).pid != before


@pytest.mark.asyncio
async def test_one_users_200_concurrent_requests_leave_other_users_served_in_turn(
    gateway_runtime: Runtime, fresh: FakeGemini
) -> None:
    fresh.config.latency = 0.05
    llm: Any = gateway_runtime.clients["llm"]
    flood = [
        asyncio.create_task(
            llm.generate(LLMRequest(prompt=f"flood {i}", model="gemini-2.5-flash", user="flood"))
        )
        for i in range(200)
    ]
    await fresh.wait_for_calls(4)
    started = fresh.calls
    light = [
        llm.generate(LLMRequest(prompt=f"light {i}", model="gemini-2.5-flash", user=f"light-{i}"))
        for i in range(5)
    ]
    await asyncio.gather(*light)
    await asyncio.gather(*flood)
    prompts = [a.prompt for a in fresh.arrivals]
    light_at = [prompts.index(f"light {i}") for i in range(5)]
    # first in, first out would put them after the flood's 200; in turn, each waits for
    # at most one flood request per light user ahead of it, plus those in flight and
    # those the flood sent while the light requests were on their way
    assert max(light_at) < started + 80
    assert len(prompts) == 205


@pytest.mark.asyncio
async def test_identical_streams_through_ray_share_one_upstream_call(
    gateway_runtime: Runtime, fresh: FakeGemini
) -> None:
    fresh.config.latency = 0.3
    llm: Any = gateway_runtime.clients["llm"]

    async def read() -> str:
        stream = llm.stream(LLMRequest(prompt="the same", model="gemini-2.5-flash", user="s", key="same-key"))
        return "".join([chunk async for chunk in stream])

    texts = await asyncio.gather(*(read() for _ in range(5)))
    assert len(set(texts)) == 1 and "you said: the same" in texts[0]
    assert fresh.calls == 1


# --- two replicas, cost events, implicit caching ----------------------------------------------

#: the pair's quota on QUOTA_MODEL, which each of the two replicas enforces half of
PAIR_QUOTA = 4
#: the pair moves a request for an overloaded model to this one
FALLBACK = "gemini-2.5-flash-lite"


@pytest_asyncio.fixture(scope="module")
async def pair(gateway_runtime: Runtime, server: FakeGemini) -> AsyncIterator[GatewayClient]:
    """Two gateway replicas in the runtime's namespace (so their call events reach its
    analytics sink), made as the runtime makes its own, splitting one quota."""
    llm = gateway_llm(server.base_url).model_copy(
        update={
            "replicas": 2,
            "fallback_models": [FALLBACK],
            "quota": QuotaSettings(models={QUOTA_MODEL: ModelQuota(requests_per_minute=PAIR_QUOTA)}),
        }
    )
    settings = gateway_runtime.settings.model_copy(update={"llm": llm})
    spec = ServiceSpec("llm-pair", LLMGateway, GatewayClient, "llm", config_of=GatewayConfig.from_settings)
    handles = service_handles(settings, spec)
    await asyncio.gather(*(h.ping.remote() for h in handles))
    yield GatewayClient(handles, name=llm.model)
    for handle in handles:
        ray.kill(handle, no_restart=True)


def users_of_each_replica(client: GatewayClient, per_replica: int) -> list[list[str]]:
    """User ids the client routes to each replica, `per_replica` of each."""
    found: list[list[str]] = [[] for _ in client.handles]
    i = 0
    while any(len(users) < per_replica for users in found):
        user = f"pair-{i}"
        shard = client.handles.index(client.handle_for(user))
        if len(found[shard]) < per_replica:
            found[shard].append(user)
        i += 1
    return found


@pytest.mark.asyncio
async def test_two_gateway_replicas_each_enforce_half_of_the_quota(
    pair: GatewayClient, fresh: FakeGemini
) -> None:
    async def ask(user: str) -> str:
        result = await pair.generate(LLMRequest(prompt=f"split {user}", model=QUOTA_MODEL, user=user))
        return result.model

    # three users on each replica: each sends two to the model, its half of four, and moves
    # the third to the fallback model, whose quota is not spent
    outcomes = [[await ask(user) for user in users] for users in users_of_each_replica(pair, 3)]
    assert outcomes == [[QUOTA_MODEL, QUOTA_MODEL, FALLBACK]] * 2
    stats: list[GatewayStats] = await pair.stats()
    assert [s.quota_used[QUOTA_MODEL][0] for s in stats] == [PAIR_QUOTA // 2] * 2
    assert [a.model for a in fresh.arrivals].count(QUOTA_MODEL) == PAIR_QUOTA


async def cost_report(
    settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> list[dict[str, Any]]:
    """`raycord analytics --report cost --format json`, as an operator runs it."""
    monkeypatch.setenv("RAYCORD_NAMESPACE", settings.namespace)
    capsys.readouterr()
    code = await asyncio.to_thread(
        main, ["analytics", "--state-dir", str(settings.state_dir), "--report", "cost", "--format", "json"]
    )
    assert code == 0
    rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return rows


@pytest.mark.asyncio
async def test_each_upstream_call_is_one_cost_event_and_the_cost_report_sums_them_by_the_price_table(
    gateway_runtime: Runtime,
    pair: GatewayClient,
    fresh: FakeGemini,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fresh.config.thinking_tokens = 5
    tag = uuid.uuid4().hex[:8]
    server_a, server_b = f"a-{tag}", f"b-{tag}"
    history = (("user", "", "one two three four"), ("model", "", "five six seven eight"))

    def request(
        prompt: str, user: str, server: str, model: str = "gemini-2.5-flash", **more: Any
    ) -> LLMRequest:
        return LLMRequest(
            prompt=prompt, model=model, user=f"{user}-{tag}", server=server, channel=f"ch-{tag}", **more
        )

    results: list[LLMResult] = []
    # the same history twice: the second call's history comes from the implicit cache
    for prompt in ("first question", "second question"):
        results.append(await pair.generate(request(prompt, "u1", server_a, history=history)))
    # four identical streams share one upstream call: one event, not four
    key = f"same-{tag}"

    async def read() -> LLMResult:
        stream = pair.stream(request("shared words", "u2", server_a, key=key))
        async for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    fresh.config.latency = 0.2
    shared = await asyncio.gather(*(read() for _ in range(4)))
    fresh.config.latency = 0.0
    results.append(shared[0])
    # an overloaded model's 503 costs nothing; the fallback that answers is counted
    fresh.config.overloaded_models = ["gemini-2.5-pro"]
    results.append(await pair.generate(request("fall back", "u3", server_b, model="gemini-2.5-pro")))
    # a 429 costs nothing either; the retry that answers is counted once
    fresh.fail_next(1, "429", retry_delay=0.01)
    results.append(await pair.generate(request("after a 429", "u3", server_b, model=FALLBACK)))
    assert fresh.calls == 2 + 1 + 2 + 2
    assert [r.model for r in results] == ["gemini-2.5-flash"] * 3 + [FALLBACK] * 2
    assert results[1].metadata["cached_tokens"] == "8"  # the eight words of history

    await asyncio.gather(*(h.flush.remote() for h in pair.handles))
    rows = [
        r
        for r in await cost_report(gateway_runtime.settings, monkeypatch, capsys)
        if r["user_id"].endswith(tag)
    ]

    prices = gateway_runtime.settings.llm.prices
    expected: dict[tuple[str, str, str], dict[str, Any]] = {}
    for (user, server), result in zip(
        [("u1", server_a), ("u1", server_a), ("u2", server_a), ("u3", server_b), ("u3", server_b)],
        results,
        strict=True,
    ):
        cached, thinking = (
            int(result.metadata.get("cached_tokens", 0)),
            int(result.metadata["thinking_tokens"]),
        )
        row = expected.setdefault(
            (server, f"{user}-{tag}", result.model),
            {
                "calls": 0,
                "prompt_tokens": 0,
                "cached_tokens": 0,
                "output_tokens": 0,
                "thinking_tokens": 0,
                "cost_usd": 0.0,
            },
        )
        row["calls"] += 1
        row["prompt_tokens"] += result.tokens_in
        row["cached_tokens"] += cached
        row["output_tokens"] += result.tokens_out
        row["thinking_tokens"] += thinking
        row["cost_usd"] += call_cost(
            prices[result.model], result.tokens_in, cached, result.tokens_out, thinking
        )
    today = str(datetime.now(UTC).date())
    got = {(r["server_id"], r["user_id"], r["model"]): r for r in rows}
    assert set(got) == set(expected)
    for group, want in expected.items():
        row = got[group]
        assert row["day"] == today
        assert {k: row[k] for k in want if k != "cost_usd"} == {
            k: v for k, v in want.items() if k != "cost_usd"
        }
        assert row["cost_usd"] == pytest.approx(want["cost_usd"], abs=1e-6)
    assert got[(server_a, f"u1-{tag}", "gemini-2.5-flash")]["cached_tokens"] == 8
    assert all(row["thinking_tokens"] == 5 * row["calls"] for row in got.values())


@pytest.mark.asyncio
async def test_a_conversations_turns_share_their_prefix_so_the_cached_share_grows(
    gateway_runtime: Runtime, fresh: FakeGemini
) -> None:
    pipeline = gateway_runtime.pipeline
    assert pipeline is not None
    llm: Any = gateway_runtime.clients["llm"]
    tag = uuid.uuid4().hex[:8]

    async def totals() -> tuple[int, int]:
        stats: list[GatewayStats] = await llm.stats()
        return sum(s.tokens_in for s in stats), sum(s.cached_tokens for s in stats)

    shares = []
    for i in range(5):
        # each message mentions someone, so the social line (with its counts) changes every
        # turn: it goes after the history, not into the system prompt ahead of it
        text = f"turn {i} tell me about ray actors"
        msg = IncomingMessage(
            text=text,
            user_id=f"talker-{tag}",
            scope=f"chan-{tag}",
            server_id=f"srv-{tag}",
            mentions=(f"bob-{tag}",),
        )
        before = await totals()
        reply = await pipeline.handle(msg)
        after = await totals()
        # what the conversation needs next is written before it goes on
        assert await pipeline.writes.drain(30) == 0
        assert reply.text.startswith(f"(fake gemini) you said: {text}.")
        shares.append((after[1] - before[1]) / (after[0] - before[0]))
    # the social line went with the new message, and no turn of the history carries it
    assert fresh.arrivals[-1].prompt == text
    assert not any("talks most with" in turn for turn in fresh.arrivals[-1].history)
    assert all(share > 0 for share in shares[1:])
    assert shares[1:] == sorted(shares[1:]) and shares[-1] > shares[1]
