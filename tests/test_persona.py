"""Per-server personas and models: stored durably in the context store (both backends),
bounded (a persona) or chosen from `llm.allowed_models` (a model), sent with the server's
requests, and part of the cache key."""

from __future__ import annotations

import pytest

from actors.errors import InputRejected
from actors.schemas import IncomingMessage
from bot.llm import LLMRequest, LLMResult, OfflineResponder
from bot.pipeline import ChatPipeline
from bot.runtime import Runtime
from tests.conftest import MakeStore, both_backends


@both_backends
@pytest.mark.asyncio
async def test_a_persona_survives_a_restart_and_reset_removes_it(make_store: MakeStore) -> None:
    store = make_store()
    await store.set_persona("srv", "You are a pirate.")
    await store.set_model("srv", "gemini-2.5-pro")
    await store.close()
    reopened = make_store()
    assert await reopened.persona("srv") == "You are a pirate."
    assert await reopened.profile("srv") == ("You are a pirate.", "gemini-2.5-pro")
    assert (await reopened.build("chan", "ada", "srv")).model == "gemini-2.5-pro"
    assert await reopened.persona("other") == ""
    built = await reopened.build("chan", "ada", "srv")
    assert built.persona == "You are a pirate."
    assert await reopened.reset_persona("srv") is True
    assert await reopened.reset_persona("srv") is False
    assert (await reopened.build("chan", "ada", "srv")).persona == ""
    await reopened.set_model("srv", "")
    assert await reopened.profile("srv") == ("", "")
    await reopened.close()
    assert await make_store().persona("srv") == ""


class RecordingResponder(OfflineResponder):
    """The offline model, keeping each request it was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[LLMRequest] = []

    async def generate(self, request: LLMRequest) -> LLMResult:
        self.requests.append(request)
        return await super().generate(request)


@pytest.mark.asyncio
async def test_a_persona_follows_the_global_prompt_and_a_changed_one_never_serves_an_old_reply(
    runtime: Runtime, user: str
) -> None:
    responder = RecordingResponder()
    clients = runtime.clients
    pipeline = ChatPipeline(
        runtime.settings,
        cache=clients["cache"],  # type: ignore[arg-type]
        context=clients["context"],  # type: ignore[arg-type]
        limiter=clients["ratelimit"],  # type: ignore[arg-type]
        analytics=clients["analytics"],  # type: ignore[arg-type]
        llm=responder,
    )
    server = f"srv-{user}"

    async def ask(stateless: bool, text: str = "who are you?") -> None:
        await pipeline.handle(
            IncomingMessage(
                text=text,
                user_id=user,
                scope=f"channel:{server}",
                server_id=server,
                kind="command" if stateless else "message",
                stateless=stateless,
                cache_scope="server",
            )
        )
        await pipeline.writes.drain(10)

    await ask(stateless=True)
    await ask(stateless=True)
    assert len(responder.requests) == 1  # the second was served from the cache
    await pipeline.set_persona(server, "You are a pirate.")
    await ask(stateless=True)
    await ask(stateless=False, text="and in this channel?")
    assert len(responder.requests) == 3
    glob = runtime.settings.pipeline.system_prompt
    assert responder.requests[0].system_prompt == glob
    for request in responder.requests[1:]:
        assert request.system_prompt.startswith(f"{glob}\n\nYou are a pirate.")
    await pipeline.set_persona(server, "You are a poet.")
    await ask(stateless=True)
    assert len(responder.requests) == 4
    assert "You are a poet." in responder.requests[-1].system_prompt


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("persona", "says"), [("", "cannot be empty"), ("x" * 100_000, "100,000 characters")]
)
async def test_an_empty_or_huge_persona_is_refused(pipeline: ChatPipeline, persona: str, says: str) -> None:
    with pytest.raises(InputRejected, match=says):
        await pipeline.set_persona("srv-refused", persona)
    assert await pipeline.persona("srv-refused") == ""


@pytest.mark.asyncio
async def test_a_servers_model_serves_its_requests_and_its_cached_replies_carry_it(
    runtime: Runtime, user: str
) -> None:
    responder = RecordingResponder()
    clients = runtime.clients
    pipeline = ChatPipeline(
        runtime.settings,
        cache=clients["cache"],  # type: ignore[arg-type]
        context=clients["context"],  # type: ignore[arg-type]
        limiter=clients["ratelimit"],  # type: ignore[arg-type]
        analytics=clients["analytics"],  # type: ignore[arg-type]
        llm=responder,
    )
    server = f"srv-{user}"
    question = IncomingMessage(
        text="which model?", user_id=user, scope="c", server_id=server, stateless=True, cache_scope="server"
    )
    await pipeline.handle(question)
    await pipeline.writes.drain(10)
    with pytest.raises(InputRejected, match="gpt-4 is not an allowed model"):
        await pipeline.set_model(server, "gpt-4")
    await pipeline.set_model(server, "gemini-2.5-pro")
    await pipeline.handle(question)  # the default model's cached reply is not served
    await pipeline.writes.drain(10)
    cached = await pipeline.handle(question)
    assert [r.model for r in responder.requests] == [pipeline.model, "gemini-2.5-pro"]
    assert cached.cached and cached.model == "gemini-2.5-pro"
    assert (await pipeline.summary(server)).model == "gemini-2.5-pro"
