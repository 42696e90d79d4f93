"""A reply assembled from an upstream's responses (`Chunk`s), with the clear text a user
reads when it was blocked, empty or cut short; backend-agnostic, free of the SDK."""

from __future__ import annotations

from bot.llm.base import Chunk, LLMResult

__all__ = ["Reply"]

#: links listed under a grounded reply at most
MAX_SOURCES = 5

#: what the user reads when the model ends a reply for a reason other than finishing it
_ENDINGS = {
    "SAFETY": "I can't help with that one: the model's safety filters blocked the reply.",
    "PROHIBITED_CONTENT": "I can't help with that one: the model's safety filters blocked the reply.",
    "BLOCKLIST": "I can't help with that one: the reply contained blocked terms.",
    "SPII": "I can't help with that one: the reply would have contained personal information.",
    "RECITATION": "I had to withhold that reply: it repeated published material too closely.",
    "MAX_TOKENS": "*(reply cut short: it reached the length limit)*",
}
_PROMPT_BLOCKED = "I can't help with that one: the model's safety filters blocked the request."
_EMPTY = "The model returned no answer this time. Please try rephrasing."
_UNFINISHED = "*(the model stopped early: {reason})*"


class Reply:
    """A reply assembled from one response or a stream of them."""

    __slots__ = (
        "block_reason",
        "cached",
        "finish_reason",
        "parts",
        "sources",
        "thoughts",
        "tokens_in",
        "tokens_out",
    )

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.block_reason: str | None = None
        self.tokens_in = 0
        self.tokens_out = 0
        self.thoughts = 0
        self.cached = 0
        #: uri -> title of the pages a grounded reply drew on, in the order first cited
        self.sources: dict[str, str] = {}

    def add(self, chunk: Chunk) -> str:
        """Take in one response; returns its new text."""
        if chunk.usage is not None:
            # streamed chunks carry running totals: the last one holds the reply's usage
            prompt, candidates, thoughts, cached = chunk.usage
            self.tokens_in = prompt
            self.tokens_out = candidates + thoughts
            self.thoughts = thoughts
            self.cached = cached
        if chunk.block_reason is not None:
            self.block_reason = chunk.block_reason
        for title, uri in chunk.sources:
            self.sources.setdefault(uri, title)
        if not chunk.has_candidates:
            return ""
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.text:
            self.parts.append(chunk.text)
        return chunk.text

    @property
    def reason(self) -> str:
        if self.block_reason is not None:
            return (
                "SAFETY"
                if self.block_reason in ("SAFETY", "BLOCKED_REASON_UNSPECIFIED")
                else self.block_reason
            )
        if self.finish_reason is None or self.finish_reason == "FINISH_REASON_UNSPECIFIED":
            return "STOP" if self.parts else "EMPTY"
        if self.finish_reason == "STOP" and not self.parts:
            return "EMPTY"
        return self.finish_reason

    def closing_note(self) -> str:
        """What to add after the text: why the reply ends where it does, and the pages a
        grounded reply drew on."""
        reason = self.reason
        if reason == "STOP":
            return self._source_list()
        if self.block_reason is not None:
            note = _PROMPT_BLOCKED
        elif reason == "EMPTY":
            note = _EMPTY
        else:
            note = _ENDINGS.get(reason, _UNFINISHED.format(reason=reason.lower().replace("_", " ")))
        return (f"\n\n{note}" if self.parts else note) + self._source_list()

    def _source_list(self) -> str:
        if not self.sources or not self.parts:
            return ""
        # <...> keeps Discord from unfurling a preview of every link
        links = "\n".join(f"- [{title}](<{uri}>)" for uri, title in list(self.sources.items())[:MAX_SOURCES])
        return f"\n\nSources:\n{links}"

    def result(self, model: str, backend: str, offline: bool = False) -> LLMResult:
        metadata = {"backend": backend}
        if self.cached:
            metadata["cached_tokens"] = str(self.cached)
        if self.thoughts:
            metadata["thinking_tokens"] = str(self.thoughts)
        return LLMResult(
            text="".join(self.parts) + self.closing_note(),
            model=model,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            finish_reason=self.reason,
            offline=offline,
            metadata=metadata,
        )
