"""The LLM gateway as a Ray actor behind real front-ends, against the fake Gemini server:
two front-end processes attached to one Ray share one quota; a gateway killed mid-stream
ends the stream with a retryable error and restarts; one user's 200 concurrent requests
leave every other user served in turn; identical streams share one upstream call.

One runtime and one fake server serve the module.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import ray

from actors.errors import ServiceUnavailable
from actors.schemas import IncomingMessage
from bot.config import LLMSettings, ModelQuota, QuotaSettings
from bot.llm import LLMRequest
from bot.llm.fake_server import FakeGemini, FakeGeminiConfig
from bot.runtime import Runtime, project_root
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
    from bot.llm.base import GatewayBusy

    assert rt.pipeline is not None
    try:
        await rt.pipeline.llm.generate(LLMRequest(prompt=prompt, model=model, user=user))
    except GatewayBusy as exc:
        return f"busy {exc.retry_after:.0f}"
    return "answered"


@pytest.mark.asyncio
async def test_two_front_end_processes_share_one_quota(gateway_runtime: Runtime, fresh: FakeGemini) -> None:
    # the fake server enforces the same quota on the key: a second front-end spending a
    # quota of its own would draw 429s from it
    fresh.config.quota_requests_per_minute = QUOTA
    settings = gateway_runtime.settings
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
