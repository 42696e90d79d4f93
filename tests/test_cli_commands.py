"""The terminal chat's commands, through the same pipeline calls Discord uses."""

from __future__ import annotations

import io
import re

import pytest

from actors.ratelimit import RateLimitClient
from bot.console import COMMANDS, ConsoleChat
from bot.llm import OfflineResponder
from bot.pipeline import FORGET_QUESTION, ChatPipeline
from bot.runtime import Runtime


def _pipeline(runtime: Runtime) -> tuple[ChatPipeline, OfflineResponder]:
    """A pipeline over the session's services with a model of its own, whose calls we count."""
    responder = OfflineResponder()
    clients = runtime.clients
    pipeline = ChatPipeline(
        runtime.settings,
        cache=clients["cache"],  # type: ignore[arg-type]
        context=clients["context"],  # type: ignore[arg-type]
        limiter=clients["ratelimit"],  # type: ignore[arg-type]
        analytics=clients["analytics"],  # type: ignore[arg-type]
        llm=responder,
    )
    return pipeline, responder


async def _chat(pipeline: ChatPipeline, user: str, text: str) -> list[str]:
    """Pipe `text` into the chat as `user`; the lines it printed."""
    out = io.StringIO()
    await ConsoleChat(pipeline, stdin=io.StringIO(text), stdout=out, user=user).run()
    return out.getvalue().splitlines()


@pytest.mark.asyncio
async def test_help_lists_every_command_one_line_each(runtime: Runtime, user: str) -> None:
    pipeline, responder = _pipeline(runtime)
    lines = await _chat(pipeline, user, "/help\n")
    assert lines[0] == "commands:"
    assert len(lines) == 1 + len(COMMANDS)
    for name, line in zip(COMMANDS, lines[1:], strict=True):
        assert line.startswith(name) and line.endswith(COMMANDS[name])
    assert {name.split()[0] for name in COMMANDS} >= {
        "/help",
        "/limits",
        "/stats",
        "/model",
        "/reset",
        "/forget",
        "/quit",
    }
    assert responder.calls == 0


@pytest.mark.asyncio
async def test_an_unknown_command_never_reaches_the_model(runtime: Runtime, user: str) -> None:
    pipeline, responder = _pipeline(runtime)
    lines = await _chat(pipeline, user, "/persona pirate\n/Bogus\n/etc/hosts is where?\n")
    assert lines[:2] == ["/persona: unknown command, try /help", "/Bogus: unknown command, try /help"]
    # a path is a message, not a command
    assert responder.calls == 1 and "\u201c/etc/hosts is where?\u201d" in lines[2]


@pytest.mark.asyncio
async def test_limits_shows_both_budgets_and_counts_nothing(runtime: Runtime, user: str) -> None:
    pipeline, responder = _pipeline(runtime)
    limiter: RateLimitClient = runtime.clients["ratelimit"]  # type: ignore[assignment]
    lines = await _chat(pipeline, user, "hello there\n/limits\n/limits\n")
    config = runtime.settings.ratelimit
    after = await limiter.usage(user)
    # the one message is counted; two /limits counted nothing
    assert {(u.kind, u.used) for u in after} == {("message", 1), ("command", 0)}
    size = 1 + len(after)
    first, second = lines[1 : 1 + size], lines[1 + size : 1 + 2 * size]
    assert len(second) == size
    assert first[0] == "your budgets (asking counts nothing):"
    assert [line.split(";")[0] for line in first] == [line.split(";")[0] for line in second]
    assert (
        f"messages per minute: 1 of {config.message.minute} used, {config.message.minute - 1} left"
        in first[1]
    )
    assert "one frees in " in first[1]
    assert f"commands per minute: 0 of {config.command.minute} used, {config.command.minute} left" in lines
    assert responder.calls == 1


@pytest.mark.asyncio
async def test_stats_is_the_pipeline_summary(runtime: Runtime, user: str) -> None:
    pipeline, responder = _pipeline(runtime)
    before = await pipeline.summary()
    # a one-off question twice: the second answer is the cached first
    for _ in range(2):
        await _chat(pipeline, user, "/ask what is cached?\n")
        await pipeline.writes.drain(10)
    after = await pipeline.summary()
    assert responder.calls == 1
    assert (after.cache_hits - before.cache_hits, after.cache_lookups - before.cache_lookups) == (1, 2)
    assert after.cache_entries == sum(s.entries for s in await pipeline.cache.stats())
    assert after.model == "offline-echo" and after.background_writes_pending == 0
    lines = await _chat(pipeline, user, "/stats\n")
    # the analytics queue may move between the two reads; the rest may not
    assert lines[:3] == after.lines()[:3] and lines[4] == after.lines()[4] and len(lines) == 5
    assert lines[0] == "model: offline-echo"
    hits, lookups = after.cache_hits, after.cache_lookups
    assert (
        lines[1] == f"cache: {hits / lookups:.0%} hit rate ({hits}/{lookups}), {after.cache_entries} entries"
    )
    # (the spend's query commits what the sink holds, so its queue moves between reads)
    assert lines[2] == "background writes pending: 0"
    assert re.fullmatch(r"analytics events pending: \d+", lines[3])
    # the offline responder costs nothing
    assert lines[4].startswith("LLM spend today (UTC, estimated): $")


@pytest.mark.asyncio
async def test_model_shows_and_switches_the_model(runtime: Runtime, user: str) -> None:
    pipeline, _ = _pipeline(runtime)
    lines = await _chat(pipeline, user, "/model\n/model no-such-model\n/model gemini-2.5-pro\n/model\n")
    allowed = ", ".join(pipeline.settings.llm.allowed_models)
    assert lines == [
        "model: offline-echo",
        f"no-such-model is not an allowed model; choose one of {allowed}.",
        "Model switched from offline-echo to gemini-2.5-pro.",
        "model: gemini-2.5-pro",
    ]
    assert pipeline.model == "gemini-2.5-pro"


@pytest.mark.asyncio
async def test_reset_clears_the_conversation(runtime: Runtime, user: str) -> None:
    pipeline, _ = _pipeline(runtime)
    lines = []
    # each reply's turns are stored in the background: let them land before the next line
    for text in ("first\n", "second\n", "/reset\n/reset\nthird\n"):
        lines += await _chat(pipeline, user, text)
        await pipeline.writes.drain(10)
    assert "I remember 1 earlier message(s)" in lines[1]
    assert lines[2:4] == ["Conversation cleared.", "There was nothing to clear."]
    assert "I remember" not in lines[4]


@pytest.mark.asyncio
async def test_forget_asks_first_and_piped_input_answers(runtime: Runtime, user: str) -> None:
    pipeline, _ = _pipeline(runtime)
    scope = f"console:{user}"
    lines = await _chat(pipeline, user, "remember me\n/forget\nn\n/forget\ny\n")
    assert lines[1:3] == [
        f"{FORGET_QUESTION} [y/N]",
        "Nothing was deleted.",
    ]
    assert lines[4].startswith("Done: I deleted 1 conversation(s), 1 cached reply(ies)")
    assert "rate-limit counts are kept" in lines[4]
    assert (await pipeline.context.build(scope, user)).turns == ()
    # the answer line is an answer, never a message to the model
    assert not any("\u201cn\u201d" in line or "\u201cy\u201d" in line for line in lines)


@pytest.mark.asyncio
async def test_quit_stops_reading(runtime: Runtime, user: str) -> None:
    pipeline, responder = _pipeline(runtime)
    lines = await _chat(pipeline, user, "/quit\nnever read\n")
    assert lines == [] and responder.calls == 0
