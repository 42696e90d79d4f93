"""Gemini (the fake server, through the SDK in the LLM gateway actor) behind the real
pipeline and Ray actors: streamed replies grow in order, coalesced into a few pieces on
their way through Ray, and their token usage reaches the analytics events."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import duckdb
import pytest

from actors.errors import InputRejected
from actors.schemas import Attachment, IncomingMessage
from bot.config import LLMSettings
from bot.llm.fake_server import FakeGemini, FakeGeminiConfig
from bot.runtime import Runtime, project_root
from tests.conftest import make_settings


@pytest.mark.asyncio
async def test_a_streamed_gemini_reply_carries_its_tokens_into_analytics(
    ray_session: None, tmp_path: Path
) -> None:
    # thirty chunks in one burst: the gateway sends them on in far fewer pieces
    server = FakeGemini(
        config=FakeGeminiConfig(latency=0.0, reply_tokens=30, stream_chunks=30, chunk_interval=0)
    )
    url = await server.start()
    settings = make_settings(tmp_path, llm=LLMSettings(base_url=url))
    rt = Runtime(settings)
    try:
        pipeline = await rt.start()
        assert pipeline.llm.name == "gemini-2.5-flash"
        seen: list[str] = []

        async def on_chunk(text: str) -> None:
            seen.append(text)

        msg = IncomingMessage(text="stream this please", user_id="u-stream", scope="c", stateless=True)
        reply = await pipeline.handle(msg, on_chunk=on_chunk)
        assert 1 <= len(seen) < 30 and all(b.startswith(a) for a, b in itertools.pairwise(seen))
        assert seen[-1] == reply.text
        # the prompt's words and the system prompt's, as the fake server counts them
        prompt_tokens = 3 + len(settings.pipeline.system_prompt.split())
        assert (reply.tokens_in, reply.tokens_out, reply.finish_reason) == (prompt_tokens, 30, "STOP")

        bad = IncomingMessage(
            text="",
            user_id="u-stream",
            scope="c",
            stateless=True,
            attachments=[Attachment(filename="a.bin", size=5, data=b"\x00\x01\x02\x03\x04")],
        )
        # a message of nothing but a refused file is refused, naming the file
        with pytest.raises(InputRejected, match=r"a\.bin \(it is a binary file"):
            await pipeline.handle(bad)
    finally:
        await rt.shutdown(kill_actors=True)
        await server.stop()
    conn = duckdb.connect(str(settings.state_dir / "analytics.duckdb"), read_only=True)
    rows = conn.execute("SELECT type, tokens_in, tokens_out FROM events ORDER BY type").fetchall()
    conn.close()
    # the reply's event, and the gateway's event of the upstream call that made it
    assert rows == [("error", 0, 0), ("llm_call", prompt_tokens, 30), ("message", prompt_tokens, 30)]


def test_raycord_fake_gemini_serves_until_interrupted() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "fake-gemini", "--port", "0", "--latency", "0"],
        cwd=project_root(),
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(project_root())},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("fake gemini listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1].strip()
        with urllib.request.urlopen(f"{url}/admin/stats", timeout=10) as resp:
            assert b'"calls": 0' in resp.read()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
