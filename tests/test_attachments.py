"""The attachment policy (bot/attachments.py) and where the pipeline applies it: a file is
downloaded only after the rate-limit check passes, text is fenced into the prompt."""

from __future__ import annotations

import pytest

from actors.errors import RateLimited
from actors.schemas import Attachment, IncomingMessage
from bot.attachments import AttachmentPolicy, prepare
from bot.pipeline import ChatPipeline

POLICY = AttachmentPolicy(max_count=4, max_image_bytes=1024, max_pdf_bytes=2048, max_text_bytes=64)


def _file(name: str, data: bytes, content_type: str | None = None) -> Attachment:
    return Attachment(filename=name, content_type=content_type, size=len(data), data=data)


@pytest.mark.asyncio
async def test_a_text_file_is_fenced_past_any_backticks_it_holds_and_loses_its_bom() -> None:
    body = "```py\nprint(1)\n```"
    files = await prepare([_file("a.md", b"\xef\xbb\xbf" + body.encode())], POLICY, None)
    assert files.prompt("see") == f"see\n\na.md:\n````\n{body}\n````"
    assert files.refused == ()


@pytest.mark.asyncio
async def test_each_kind_has_its_own_limit_judged_from_the_bytes() -> None:
    pdf = b"%PDF-1.7\n" + b"0" * 1500  # over the image limit, under the PDF one
    files = await prepare(
        [_file("doc.pdf", pdf), _file("long.txt", b"x" * 65), _file("pic.png", pdf[:100], "image/png")],
        POLICY,
        None,
    )
    assert [p.mime_type for p in files.parts] == ["application/pdf"]
    assert files.note() == (
        "I left out long.txt (65 bytes; the limit for a text file is 64 bytes); "
        "pic.png (it is labelled image/png but is application/pdf)."
    )


@pytest.mark.asyncio
async def test_a_rate_limited_message_downloads_none_of_its_files(pipeline: ChatPipeline, user: str) -> None:
    fetched: list[str] = []

    async def fetch(a: Attachment) -> bytes:
        fetched.append(a.filename)
        return b"some notes"

    def message(text: str, who: str) -> IncomingMessage:
        note = Attachment(
            filename="notes.txt", content_type="text/plain", size=10, url="https://cdn/notes.txt"
        )
        return IncomingMessage(text=text, user_id=who, scope=f"dm:{who}", attachments=(note,))

    limit = pipeline.settings.ratelimit.message.minute
    for i in range(limit):
        await pipeline.handle(IncomingMessage(text=f"hi {i}", user_id=user, scope=f"dm:{user}"))
    with pytest.raises(RateLimited):
        await pipeline.handle(message("read this", user), fetch=fetch)
    assert fetched == []
    reply = await pipeline.handle(message("read this", f"{user}-other"), fetch=fetch)
    assert fetched == ["notes.txt"]
    assert "notes.txt: ``` some notes ```" in reply.text
