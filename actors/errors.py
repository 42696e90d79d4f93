"""Typed errors shared by the services and the front-ends.

The front-end turns each into a short, friendly reply; none of them is a crash.
"""

from __future__ import annotations


class RaycordError(Exception):
    """Base class of the errors a user may be told about."""

    def user_message(self) -> str:
        return str(self)


class InputRejected(RaycordError):
    """The message cannot be processed as given; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def user_message(self) -> str:
        return f"I can't take that message: {self.reason}."


class RateLimited(RaycordError):
    """The user is over a limit; they may try again after `retry_after` seconds."""

    def __init__(self, retry_after: float, window: str = "", limit: int = 0) -> None:
        super().__init__(f"rate limited over the {window or 'current'} window; retry in {retry_after:.1f}s")
        self.retry_after = retry_after
        self.window = window
        self.limit = limit

    def user_message(self) -> str:
        secs = max(1, round(self.retry_after))
        when = f"{secs} second{'s' if secs != 1 else ''}" if secs < 120 else f"{round(secs / 60)} minutes"
        return f"You're sending messages faster than I can take them. Try again in {when}."


class UpstreamUnavailable(RaycordError):
    """The LLM (or another upstream) failed or is cooling down after repeated failures."""

    def __init__(self, detail: str = "the model is unavailable", retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after

    def user_message(self) -> str:
        return "I couldn't reach the model just now. Please try again in a moment."


class ServiceUnavailable(RaycordError):
    """A service actor could not answer (it died or is restarting); the request may be retried."""

    def user_message(self) -> str:
        return "Something on my side is restarting. Please try again in a few seconds."
