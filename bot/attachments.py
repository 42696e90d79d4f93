"""The one attachment policy: which files the bot reads, judged from their bytes, how large
each kind may be and how many one message may carry. The pipeline applies it for every
front-end (before and after the download), and the LLM gateway checks inline parts by it.

Images (PNG, JPEG, GIF, WebP, HEIC/HEIF) and PDFs go to the model as inline data; text
(valid UTF-8 without NULs: plain text, code, Markdown, JSON, CSV) goes into the prompt,
fenced, under its file name. Anything else is refused with its name and the reason.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from actors.errors import InputRejected
from actors.schemas import Attachment
from bot.config import Settings
from bot.llm.base import ImagePart

__all__ = [
    "AttachmentPolicy",
    "Fetch",
    "Prepared",
    "Refusal",
    "check_inline_parts",
    "display_name",
    "prepare",
    "sniff",
]

Kind = Literal["image", "pdf", "text"]
Fetch = Callable[[Attachment], Awaitable[bytes]]

#: the binary kinds the model takes inline, by the first bytes of the file
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (8, b"WEBP", "image/webp"),
    (4, b"ftypheic", "image/heic"),
    (4, b"ftypheix", "image/heic"),
    (4, b"ftypmif1", "image/heif"),
    (4, b"ftypheif", "image/heif"),
    (0, b"%PDF-", "application/pdf"),
)
_BINARY_SUFFIXES = {
    ".png": "image",
    ".jpg": "image",
    ".jpeg": "image",
    ".gif": "image",
    ".webp": "image",
    ".heic": "image",
    ".heif": "image",
    ".pdf": "pdf",
}
#: a name that could address a path, or hides characters a reader cannot see
_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f]|^\.\.?$")
_MAX_NAME_CHARS = 100


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} bytes"


def sniff(data: bytes) -> str | None:
    """The inline type (an image or a PDF) the bytes are, by their signature; None otherwise."""
    for offset, magic, mime in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            if mime == "image/webp" and not data.startswith(b"RIFF"):
                continue
            return mime
    return None


def _kind_of(mime: str) -> Kind:
    return "pdf" if mime == "application/pdf" else "image"


def _claimed_kind(name: str, declared: str | None) -> Kind | None:
    """The binary kind a file's label (its type, else its suffix) claims, if any."""
    declared = (declared or "").split(";")[0].strip().lower()
    if declared == "application/pdf":
        return "pdf"
    if declared.startswith("image/"):
        return "image"
    dot = name.rfind(".")
    kind = _BINARY_SUFFIXES.get(name[dot:].lower()) if dot >= 0 else None
    return "pdf" if kind == "pdf" else "image" if kind == "image" else None


def display_name(name: str) -> str:
    """`name` fit to show in a reply: control characters and separators made visible."""
    shown = re.sub(r"[\x00-\x1f\x7f]", "?", name).replace("`", "'")
    return shown if len(shown) <= _MAX_NAME_CHARS else shown[: _MAX_NAME_CHARS - 1] + "…"


@dataclass(frozen=True, slots=True)
class AttachmentPolicy:
    """How many attachments one message may carry, and how large each kind may be."""

    max_count: int
    max_image_bytes: int
    max_pdf_bytes: int
    max_text_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> AttachmentPolicy:
        """The policy the settings configure (`llm.max_*`, `discord.max_text_attachment_bytes`)."""
        llm, text_bytes = settings.llm, settings.discord.max_text_attachment_bytes
        return cls(llm.max_attachments, llm.max_image_bytes, llm.max_pdf_bytes, text_bytes)

    def limit(self, kind: Kind) -> int:
        return {"image": self.max_image_bytes, "pdf": self.max_pdf_bytes, "text": self.max_text_bytes}[kind]

    def summary(self) -> str:
        return (
            f"images up to {_size(self.max_image_bytes)}, PDFs up to {_size(self.max_pdf_bytes)}, "
            f"UTF-8 text up to {_size(self.max_text_bytes)}; {self.max_count} files per message"
        )


@dataclass(frozen=True, slots=True)
class Refusal:
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{display_name(self.name)} ({self.reason})"


@dataclass(frozen=True, slots=True)
class Prepared:
    """A message's attachments after the policy: inline parts, text files, refusals."""

    parts: tuple[ImagePart, ...] = ()
    #: (file name, text) of each text attachment, in the message's order
    texts: tuple[tuple[str, str], ...] = ()
    refused: tuple[Refusal, ...] = ()

    def prompt(self, text: str) -> str:
        """`text` followed by each text attachment, fenced, under its file name."""
        if not self.texts:
            return text
        blocks = [text] if text.strip() else []
        for name, body in self.texts:
            longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
            fence = "`" * max(3, longest + 1)
            blocks.append(f"{display_name(name)}:\n{fence}\n{body.rstrip()}\n{fence}")
        return "\n\n".join(blocks)

    def note(self) -> str:
        """What the reply says about the files left out ("" when none were)."""
        if not self.refused:
            return ""
        return "I left out " + "; ".join(str(r) for r in self.refused) + "."


def _problem_before_download(a: Attachment, policy: AttachmentPolicy) -> str | None:
    if _BAD_NAME.search(a.filename) or not a.filename:
        return "its name holds a path separator or a control character"
    if a.size == 0:
        return "it is empty"
    claimed = _claimed_kind(a.filename, a.content_type)
    limit = (
        policy.limit(claimed)
        if claimed is not None
        else max(policy.max_image_bytes, policy.max_pdf_bytes, policy.max_text_bytes)
    )
    if a.size > limit:
        what = {"image": "an image", "pdf": "a PDF", None: "a file"}[claimed]
        return f"{_size(a.size)}; the limit for {what} is {_size(limit)}"
    return None


def _check(
    name: str, declared: str | None, data: bytes, policy: AttachmentPolicy
) -> ImagePart | str | Refusal:
    """One downloaded file: an inline part, the text of a text file, or why it is refused."""
    if not data:
        return Refusal(name, "it is empty")
    mime = sniff(data)
    claimed = _claimed_kind(name, declared)
    if mime is not None:
        kind = _kind_of(mime)
        if claimed is not None and claimed != kind:
            return Refusal(name, f"it is labelled {declared or 'as ' + claimed} but is {mime}")
        if len(data) > policy.limit(kind):
            return Refusal(name, f"{_size(len(data))}; the limit for a {kind} is {_size(policy.limit(kind))}")
        return ImagePart(mime, data, name)
    if claimed is not None:
        what = "a PDF" if claimed == "pdf" else "an image"
        return Refusal(name, f"it is labelled {declared or claimed} but is not {what}")
    if b"\x00" in data:
        return Refusal(name, "it is a binary file of a type I do not read")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return Refusal(name, "it is not UTF-8 text (a legacy encoding?); save it as UTF-8")
    if len(data) > policy.max_text_bytes:
        limit = _size(policy.max_text_bytes)
        return Refusal(name, f"{_size(len(data))}; the limit for a text file is {limit}")
    return text


async def prepare(
    attachments: Sequence[Attachment], policy: AttachmentPolicy, fetch: Fetch | None
) -> Prepared:
    """Apply the policy to a message's attachments: what can be refused from the metadata
    (count, name, declared size) is, without a download; the rest are fetched (by `fetch`,
    unless they carry their bytes) and checked from their bytes."""
    parts: list[ImagePart] = []
    texts: list[tuple[str, str]] = []
    refused: list[Refusal] = []
    for i, a in enumerate(attachments):
        if i >= policy.max_count:
            refused.append(Refusal(a.filename, f"over the limit of {policy.max_count} files per message"))
            continue
        problem = _problem_before_download(a, policy)
        if problem is not None:
            refused.append(Refusal(a.filename, problem))
            continue
        if a.data is not None:
            data = a.data
        elif fetch is not None:
            data = await fetch(a)
        else:
            refused.append(Refusal(a.filename, "it could not be downloaded"))
            continue
        checked = _check(a.filename, a.content_type, data, policy)
        if isinstance(checked, Refusal):
            refused.append(checked)
        elif isinstance(checked, str):
            texts.append((a.filename, checked))
        else:
            parts.append(checked)
    return Prepared(tuple(parts), tuple(texts), tuple(refused))


def check_inline_parts(parts: Sequence[ImagePart], policy: AttachmentPolicy) -> tuple[ImagePart, ...]:
    """The inline parts as they should be sent, their type taken from their bytes.

    Raises:
        InputRejected: too many parts, one too large, or one that is not an image or PDF
            (whatever its declared type says).
    """
    if len(parts) > policy.max_count:
        raise InputRejected(f"{len(parts)} files were attached; the limit is {policy.max_count}")
    checked = []
    for i, part in enumerate(parts, 1):
        label = display_name(part.name) if part.name else f"attachment {i}"
        mime = sniff(part.data)
        if mime is None:
            declared = part.mime_type or "unknown type"
            raise InputRejected(f"{label} ({declared}) is not an image or a PDF")
        limit = policy.limit(_kind_of(mime))
        if len(part.data) > limit:
            raise InputRejected(f"{label} is {_size(len(part.data))}; the limit is {_size(limit)}")
        checked.append(ImagePart(mime, part.data, part.name))
    return tuple(checked)
