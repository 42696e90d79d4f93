"""The Discord stand-in's own wire format, where a bot cannot show it: Discord's 429 as
discord.py reads it, zlib-stream frames, and which shard a guild's events go to."""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from bot.fake_discord import HELLO, IDENTIFY, FakeDiscord


@pytest_asyncio.fixture
async def stand_in() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord(guilds=2)
    await server.start()
    yield server
    await server.stop()


@pytest.mark.asyncio
async def test_a_faulted_route_answers_discords_429(stand_in: FakeDiscord) -> None:
    route = "/channels/{channel_id}/messages"
    for is_global in (False, True):
        fault = {"method": "POST", "route": route, "retry_after": 2.5, "global": is_global}
        async with aiohttp.ClientSession() as http:
            await http.post(f"{stand_in.base_url}/_control/faults", json=fault)
            channel = next(iter(stand_in.channels))
            resp = await http.post(
                f"{stand_in.base_url}/api/v10/channels/{channel}/messages",
                json={"content": "hi"},
                headers={"Authorization": f"Bot {stand_in.token}"},
            )
            body = await resp.json()
            assert resp.status == 429
            assert body == {"message": "You are being rate limited.", "retry_after": 2.5, "global": is_global}
            assert resp.headers["Content-Type"] == "application/json"
            assert resp.headers["Via"] and resp.headers["Retry-After"] == "2"
            assert resp.headers["X-RateLimit-Scope"] == ("global" if is_global else "user")
            if is_global:
                assert resp.headers["X-RateLimit-Global"] == "true"
            else:
                assert resp.headers["X-RateLimit-Remaining"] == "0"
                assert resp.headers["X-RateLimit-Reset-After"] == "2.500"
            # the fault was for one request: the next one goes through
            again = await http.post(
                f"{stand_in.base_url}/api/v10/channels/{channel}/messages",
                json={"content": "hi"},
                headers={"Authorization": f"Bot {stand_in.token}"},
            )
            assert again.status == 200


async def _frames(ws: aiohttp.ClientWebSocketResponse, inflate: Any, count: int) -> list[dict[str, Any]]:
    frames = []
    while len(frames) < count:
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.BINARY
        assert msg.data[-4:] == b"\x00\x00\xff\xff"  # every frame ends on a zlib sync flush
        frames.append(json.loads(inflate.decompress(msg.data)))
    return frames


@pytest.mark.asyncio
async def test_each_shard_gets_the_guilds_of_its_shard_over_zlib_stream(stand_in: FakeDiscord) -> None:
    got: dict[int, list[str]] = {}
    async with aiohttp.ClientSession() as http:
        for shard in (0, 1):
            ws = await http.ws_connect(f"{stand_in.ws_url}?v=10&encoding=json&compress=zlib-stream")
            inflate = zlib.decompressobj()
            (hello,) = await _frames(ws, inflate, 1)
            assert hello["op"] == HELLO and hello["d"]["heartbeat_interval"] > 0
            await ws.send_json(
                {"op": IDENTIFY, "d": {"token": stand_in.token, "shard": [shard, 2], "intents": 0}}
            )
            ready, guild_create = await _frames(ws, inflate, 2)
            assert ready["t"] == "READY" and ready["d"]["shard"] == [shard, 2]
            assert guild_create["t"] == "GUILD_CREATE"
            got[shard] = [g["id"] for g in ready["d"]["guilds"]]
            assert guild_create["d"]["id"] == got[shard][0]
            await ws.close()
    assert sorted(got[0] + got[1]) == sorted(stand_in.guilds)
    for shard, guilds in got.items():
        assert all((int(g) >> 22) % 2 == shard for g in guilds)


@pytest.mark.asyncio
async def test_a_bad_control_call_gets_a_clear_error_and_changes_nothing(stand_in: FakeDiscord) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{stand_in.base_url}/_control/messages", json={"channel_id": "1"})
        assert resp.status == 400
        assert "author_id" in (await resp.json())["error"]
    assert not any(stand_in.messages.values())
